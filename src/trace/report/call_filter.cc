// The call filter (call_filter.h), and parse_duration for its command-line forms.
#include "trace/report/call_filter.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <unordered_map>

namespace tramway::trace::report {

using format::Event;
using format::EventKind;

struct CallFilterSink::State {
  struct Frame {
    std::uint64_t address, start_ns;
    bool written;  // its entry was forwarded (a callee of it was kept)
  };
  struct Thread {
    std::vector<Frame> open;
    std::vector<Event> out;  // forwarded at the end of each events() call
    std::uint64_t last_ns = 0;
    bool past_window = false;  // an event at or after until_ns was seen: the rest is dropped
  };

  CallFilter filter;
  TraceSink& next;
  std::unordered_map<std::uint32_t, Thread> threads;

  State(const CallFilter& f, TraceSink& n) : filter(f), next(n) {}

  bool selected(std::uint32_t tid) const {
    return filter.tids.empty() || std::find(filter.tids.begin(), filter.tids.end(), tid) != filter.tids.end();
  }
  bool in_window(const Frame& f) const { return f.start_ns >= filter.since_ns && f.start_ns < filter.until_ns; }

  // Forwards the entries not yet forwarded of the frames below `top` that started in the
  // window (they contain a kept call, so they last long enough), outermost first, then its own.
  void write_chain(Thread& t, std::size_t top) {
    for (std::size_t i = 0; i <= top; ++i) {
      Frame& f = t.open[i];
      if (f.written || !in_window(f)) continue;
      t.out.push_back({f.start_ns, Event::make_word(f.address, EventKind::entry)});
      f.written = true;
    }
  }

  // Closes the innermost open frame at `time`.
  void close_top(Thread& t, std::uint64_t time, EventKind kind) {
    const Frame& f = t.open.back();
    if (in_window(f) && time - f.start_ns >= filter.min_duration_ns) {
      write_chain(t, t.open.size() - 1);
      t.out.push_back({time, Event::make_word(f.address, kind)});
    }
    t.open.pop_back();
  }

  void event(Thread& t, const Event& e) {
    if (t.past_window) return;
    if (e.time_ns >= filter.until_ns) {  // the window ends: what is open closes there
      while (!t.open.empty()) close_top(t, filter.until_ns, EventKind::exit);
      t.past_window = true;
      return;
    }
    t.last_ns = std::max(t.last_ns, e.time_ns);
    switch (e.kind()) {
      case EventKind::entry: t.open.push_back({e.address(), e.time_ns, false}); break;
      case EventKind::exit:
      case EventKind::unwound: {
        // As ProfileBuilder matches: the innermost open frame of the function, the frames
        // above it unwound; an exit with none open is not forwarded.
        const auto it = std::find_if(t.open.rbegin(), t.open.rend(),
                                     [&](const Frame& f) { return f.address == e.address(); });
        if (it == t.open.rend()) break;
        const std::size_t keep = static_cast<std::size_t>(t.open.rend() - it) - 1;
        while (t.open.size() > keep + 1) close_top(t, e.time_ns, EventKind::unwound);
        close_top(t, e.time_ns, e.kind());
        break;
      }
      default: t.out.push_back(e); break;  // unknown kinds: the builder counts them
    }
  }

  void flush(std::uint32_t tid, Thread& t) {
    if (t.out.empty()) return;
    next.events(tid, t.out);
    t.out.clear();
  }
};

CallFilterSink::CallFilterSink(const CallFilter& filter, TraceSink& next)
    : state_(std::make_unique<State>(filter, next)) {}
CallFilterSink::~CallFilterSink() = default;

void CallFilterSink::function(std::uint64_t address, std::string_view name) { state_->next.function(address, name); }

void CallFilterSink::thread_name(std::uint32_t tid, std::string_view name) {
  if (state_->selected(tid)) state_->next.thread_name(tid, name);
}

void CallFilterSink::events(std::uint32_t tid, std::span<const Event> events) {
  if (!state_->selected(tid)) return;
  State::Thread& t = state_->threads[tid];
  for (const Event& e : events) state_->event(t, e);
  state_->flush(tid, t);
}

void CallFilterSink::lost(std::uint32_t tid, std::uint64_t count) {
  if (state_->selected(tid)) state_->next.lost(tid, count);
}

void CallFilterSink::finish() {
  for (auto& [tid, t] : state_->threads) {
    // Frames open at the end of the file: the kept ones are forwarded as still open (the
    // builder closes them at the thread's last timestamp and says so).
    for (std::size_t i = 0; i < t.open.size(); ++i) {
      const State::Frame& f = t.open[i];
      if (state_->in_window(f) && t.last_ns - f.start_ns >= state_->filter.min_duration_ns) state_->write_chain(t, i);
    }
    t.open.clear();
    state_->flush(tid, t);
  }
}

Status read_again(const Profile& profile, TraceSink& sink) {
  ReadOptions read;
  read.diagnostics = nullptr;
  if (!profile.filter.active()) return read_trace(profile.source.path, sink, read).status();
  CallFilterSink filter(profile.filter, sink);
  Result<ReadSummary> summary = read_trace(profile.source.path, filter, read);
  if (!summary.ok()) return summary.status();
  filter.finish();
  return {};
}

Result<std::uint64_t> parse_duration(std::string_view text) {
  const std::string s(text);
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  const std::string unit = end ? std::string(end) : std::string();
  static constexpr struct { const char* unit; double ns; } kUnits[] = {
      {"ns", 1}, {"us", 1e3}, {"µs", 1e3}, {"ms", 1e6}, {"s", 1e9}, {"", 1e9}};
  if (end != s.c_str() && std::isfinite(v) && v >= 0) {
    for (const auto& u : kUnits) {
      if (unit != u.unit) continue;
      const double ns = v * u.ns;
      if (ns < 9e18) return static_cast<std::uint64_t>(ns + 0.5);
    }
  }
  return Status::error("'" + s + "' is not a duration: give a number and a unit, ns, us, ms or s (e.g. 10us, 1.5s)");
}

}  // namespace tramway::trace::report
