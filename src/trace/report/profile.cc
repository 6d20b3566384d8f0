// Rebuilding call stacks from entry/exit/unwound events, one stack per thread.
//
// Events are matched by function address, not by position: a thread's trace can start inside
// live frames (their exits have no entry), lose events when its ring was full, or leave
// frames by unwinding. An exit closes the nearest open frame of its function and treats the
// frames above it as unwound (they can only have been skipped); an exit with no open frame
// of its function is counted and ignored. Function identities are addresses until finish(),
// so names from a functions chunk that comes after the events still apply.
//
// Work stays linear in the events however deep the stacks: the tree stops at max_depth (one
// "[truncated]" node per stack stands for the frames below), and an exit whose function has
// no open frame is found out without scanning a deep stack.
#include <algorithm>
#include <bit>
#include <map>
#include <unordered_map>

#include "common/format.h"
#include "trace/report/call_filter.h"
#include "trace/report/report.h"

namespace tramway::trace::report {

namespace {

using format::Event;
using format::EventKind;

// u64 -> u32 with open addressing: the per-event lookups (address -> function, (parent node,
// function) -> child node) are the builder's hot path, and a node-based map costs a cache miss
// per hop on large trees.
class FlatIndex {
 public:
  // The value stored for `key`, inserting `value_if_new` if there is none; `added` says which.
  std::uint32_t find_or_add(std::uint64_t key, std::uint32_t value_if_new, bool& added) {
    if ((size_ + 1) * 4 > slots_.size() * 3) grow();
    for (std::size_t i = slot_of(key);; i = (i + 1) & (slots_.size() - 1)) {
      Slot& slot = slots_[i];
      if (slot.value == kEmpty) {
        slot = {key, value_if_new};
        ++size_;
        added = true;
        return value_if_new;
      }
      if (slot.key == key) {
        added = false;
        return slot.value;
      }
    }
  }

 private:
  static constexpr std::uint32_t kEmpty = ~std::uint32_t{0};
  struct Slot {
    std::uint64_t key = 0;
    std::uint32_t value = kEmpty;
  };
  std::size_t slot_of(std::uint64_t key) const {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 64 : old.size() * 2, Slot{});
    shift_ = 64 - static_cast<unsigned>(std::countr_zero(slots_.size()));
    for (const Slot& slot : old) {
      if (slot.value == kEmpty) continue;
      std::size_t i = slot_of(slot.key);
      while (slots_[i].value != kEmpty) i = (i + 1) & (slots_.size() - 1);
      slots_[i] = slot;
    }
  }
  std::vector<Slot> slots_;
  std::size_t size_ = 0;
  unsigned shift_ = 64;  // set by grow(), which the first find_or_add calls
};

struct OpenFrame {
  std::uint64_t address;
  std::uint32_t function;
  std::uint32_t node;          // in the thread's tree
  FunctionStats* stats;        // its function's, in the thread's profile
  std::uint64_t start_ns;
  std::uint64_t children_ns = 0;  // time in traced children, closed so far
};

// Frames below this index of a stack are found by scanning; above it, a count per address
// says whether an exit has an open frame to close at all.
constexpr std::size_t kScannedDepth = 256;

// `s` cut to kMaxNameBytes (at a character boundary) and marked, if longer.
void bound_name(std::string& s) {
  if (s.size() <= kMaxNameBytes) return;
  std::size_t cut = kMaxNameBytes - 3;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  s.resize(cut);
  s += "...";
}

struct ThreadState {
  ThreadProfile profile;
  std::vector<OpenFrame> stack;
  FlatIndex child_of;                      // (parent node << 32 | function) -> node
  std::vector<FunctionStats*> node_stats;  // by node: its function's stats (stable: node-based map)
  std::unordered_map<std::uint64_t, std::uint32_t> deep_open;  // open frames at kScannedDepth and up, by address
  bool seen_event = false;

  ThreadState() {
    profile.tree.emplace_back();
    node_stats.push_back(nullptr);
  }
};

}  // namespace

struct ProfileBuilder::State {
  BuildOptions options;
  std::vector<FunctionInfo> functions;
  FlatIndex function_of;  // address -> index
  std::map<std::uint32_t, ThreadState> threads;  // by tid
  std::uint64_t unknown_kinds = 0;
  std::uint32_t truncated = kNoFunction;  // the pseudo-function of truncated frames, once needed

  std::uint32_t truncated_function() {
    if (truncated == kNoFunction) {
      truncated = static_cast<std::uint32_t>(functions.size());
      functions.push_back({0, "[truncated: frames deeper than " + std::to_string(options.max_depth) + "]"});
    }
    return truncated;
  }

  std::uint32_t intern(std::uint64_t address) {
    bool added;
    const std::uint32_t f = function_of.find_or_add(address, static_cast<std::uint32_t>(functions.size()), added);
    if (added) functions.push_back({address, {}});
    return f;
  }

  void enter(ThreadState& t, std::uint64_t address, std::uint64_t time) {
    const std::uint32_t f = intern(address);
    const std::uint32_t parent = t.stack.empty() ? 0 : t.stack.back().node;
    const bool truncate = options.max_depth != 0 && t.stack.size() >= options.max_depth;
    // Below a truncated frame: the same node.
    if (truncate && truncated != kNoFunction && t.profile.tree[parent].function == truncated) {
      push(t, {address, f, parent, &t.profile.functions[f], time});
      return;
    }
    const std::uint32_t node_function = truncate ? truncated_function() : f;
    const std::uint64_t key = (std::uint64_t{parent} << 32) | node_function;
    bool added;
    const std::uint32_t node = t.child_of.find_or_add(key, static_cast<std::uint32_t>(t.profile.tree.size()), added);
    if (added) {
      CallNode n;
      n.function = node_function;
      n.parent = parent;
      t.profile.tree.push_back(std::move(n));
      t.profile.tree[parent].children.push_back(node);
      t.node_stats.push_back(truncate ? nullptr : &t.profile.functions[f]);
    }
    push(t, {address, f, node, truncate ? &t.profile.functions[f] : t.node_stats[node], time});
  }

  static void push(ThreadState& t, const OpenFrame& frame) {
    if (t.stack.size() >= kScannedDepth) t.deep_open[frame.address]++;
    t.stack.push_back(frame);
  }

  // Closes the top frame at `time`.
  void close_top(ThreadState& t, std::uint64_t time, CallEnd how) {
    const OpenFrame frame = t.stack.back();
    t.stack.pop_back();
    if (t.stack.size() >= kScannedDepth) {
      auto it = t.deep_open.find(frame.address);
      if (--it->second == 0) t.deep_open.erase(it);
    }
    // Timestamps of one thread do not go backwards; if a damaged file says so, count zero.
    const std::uint64_t duration = time > frame.start_ns ? time - frame.start_ns : 0;
    const std::uint64_t self = duration - std::min(frame.children_ns, duration);
    CallNode& node = t.profile.tree[frame.node];
    node.calls++;
    // Truncated frames nest on one node: its total is the time of the outermost of them.
    if (t.stack.empty() || t.stack.back().node != frame.node) node.total_ns += duration;
    node.self_ns += self;
    FunctionStats& stats = *frame.stats;
    stats.calls++;
    stats.total_ns += duration;
    stats.self_ns += self;
    stats.durations.add(duration);
    if (!t.stack.empty()) t.stack.back().children_ns += duration;
    if (how == CallEnd::unwound) t.profile.unwound++;
    if (how == CallEnd::open) t.profile.open_at_end++;
    if (node.function == truncated) t.profile.truncated++;
    if (options.keep_calls)
      t.profile.calls.push_back({frame.start_ns, duration, frame.function,
                                 static_cast<std::uint32_t>(t.stack.size()), how});
  }

  void leave(ThreadState& t, std::uint64_t address, std::uint64_t time, CallEnd how) {
    // A scan that finds a frame closes every frame it passed; one that finds none would cost
    // the whole depth for nothing, once per such exit.
    if (t.stack.size() > kScannedDepth && !t.deep_open.count(address) &&
        std::none_of(t.stack.begin(), t.stack.begin() + kScannedDepth,
                     [&](const OpenFrame& f) { return f.address == address; })) {
      t.profile.unmatched_exits++;
      return;
    }
    auto match = std::find_if(t.stack.rbegin(), t.stack.rend(),
                              [&](const OpenFrame& f) { return f.address == address; });
    if (match == t.stack.rend()) {
      t.profile.unmatched_exits++;
      return;
    }
    const std::size_t keep = static_cast<std::size_t>(t.stack.rend() - match) - 1;
    while (t.stack.size() > keep + 1) close_top(t, time, CallEnd::unwound);
    close_top(t, time, how);
  }
};

ProfileBuilder::ProfileBuilder(BuildOptions options) : state_(std::make_unique<State>()) {
  state_->options = options;
}
ProfileBuilder::~ProfileBuilder() = default;

void ProfileBuilder::function(std::uint64_t address, std::string_view name) {
  const std::uint32_t f = state_->intern(address & Event::kAddressMask);
  if (!name.empty()) state_->functions[f].name.assign(name);
}

void ProfileBuilder::thread_name(std::uint32_t tid, std::string_view name) {
  ThreadState& t = state_->threads[tid];
  t.profile.tid = tid;
  t.profile.name.assign(name);
}

void ProfileBuilder::events(std::uint32_t tid, std::span<const format::Event> events) {
  ThreadState& t = state_->threads[tid];
  t.profile.tid = tid;
  if (events.empty()) return;
  if (!t.seen_event) {
    t.profile.first_ns = events.front().time_ns;
    t.seen_event = true;
  }
  t.profile.events += events.size();
  for (const Event& e : events) {
    t.profile.last_ns = std::max(t.profile.last_ns, e.time_ns);
    switch (e.kind()) {
      case EventKind::entry: state_->enter(t, e.address(), e.time_ns); break;
      case EventKind::exit: state_->leave(t, e.address(), e.time_ns, CallEnd::returned); break;
      case EventKind::unwound: state_->leave(t, e.address(), e.time_ns, CallEnd::unwound); break;
      default: state_->unknown_kinds++; break;
    }
  }
}

void ProfileBuilder::lost(std::uint32_t tid, std::uint64_t count) {
  ThreadState& t = state_->threads[tid];
  t.profile.tid = tid;
  t.profile.lost += count;
}

Profile ProfileBuilder::finish(ReadSummary source) {
  State& s = *state_;
  Profile p;
  std::uint64_t lost = 0;
  bool any_events = false;
  for (auto& [tid, t] : s.threads) {
    while (!t.stack.empty()) s.close_top(t, t.profile.last_ns, CallEnd::open);
    // Frames are recorded as they close; output wants them by start, parents first.
    std::sort(t.profile.calls.begin(), t.profile.calls.end(), [](const Call& a, const Call& b) {
      return a.start_ns != b.start_ns ? a.start_ns < b.start_ns : a.depth < b.depth;
    });
    p.events += t.profile.events;
    lost += t.profile.lost;
    if (t.seen_event) {
      p.begin_ns = any_events ? std::min(p.begin_ns, t.profile.first_ns) : t.profile.first_ns;
      p.end_ns = any_events ? std::max(p.end_ns, t.profile.last_ns) : t.profile.last_ns;
      any_events = true;
    }
    p.threads.push_back(std::move(t.profile));
  }
  for (FunctionInfo& f : s.functions) {
    if (f.name.empty()) f.name = common::hex_address(f.address);
    bound_name(f.name);
  }
  for (ThreadProfile& t : p.threads) bound_name(t.name);
  p.functions = std::move(s.functions);
  p.lost = std::max(lost, source.lost);
  p.unknown_kind_events = s.unknown_kinds;
  p.source = std::move(source);
  state_ = std::make_unique<State>();
  return p;
}

Result<Profile> load_profile(const std::string& path, const ReadOptions& read, const BuildOptions& build) {
  ProfileBuilder builder(build);
  Result<ReadSummary> summary = [&] {
    if (!build.filter.active()) return read_trace(path, builder, read);
    CallFilterSink filter(build.filter, builder);
    Result<ReadSummary> s = read_trace(path, filter, read);
    filter.finish();
    return s;
  }();
  if (!summary.ok()) return summary.status();
  Profile p = builder.finish(std::move(*summary));
  p.filter = build.filter;
  return p;
}

}  // namespace tramway::trace::report
