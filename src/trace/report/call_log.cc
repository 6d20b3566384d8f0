// `tramway report --calls`: the indented call log of every thread, uftrace-replay style,
// streamed as the trace file is read again (memory: each thread's open frames).
//
//   # thread 100 (main)
//     DURATION  FUNCTION
//               main_loop {
//        20 ns    parse(std::string const&)
//        50 ns  } main_loop
//
// A call with no traced callee is one line; one with callees opens a brace at its first
// callee and closes it with its duration. Frames are matched as ProfileBuilder matches them;
// a frame left by unwinding says so, as does one still open at the end of the trace.
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "trace/report/call_filter.h"
#include "trace/report/internal.h"

namespace tramway::trace::report {
namespace {

using format::Event;
using format::EventKind;

constexpr std::size_t kDurationWidth = 10;

class CallLogSink final : public TraceSink {
 public:
  CallLogSink(const Profile& profile, std::FILE* out) : out_(out) {
    for (const FunctionInfo& f : profile.functions) names_.emplace(f.address, detail::valid_utf8(f.name));
    for (const ThreadProfile& t : profile.threads) threads_[t.tid].label = detail::valid_utf8(detail::thread_label(t));
  }

  void function(std::uint64_t, std::string_view) override {}
  void thread_name(std::uint32_t, std::string_view) override {}
  void lost(std::uint32_t tid, std::uint64_t count) override {
    Thread& t = thread(tid);
    std::string text = "[";  // piecewise: GCC 12 -O3 warns (-Wrestrict, wrongly) on "literal" + string
    text += std::to_string(count);
    text += " events lost here]";
    line(t, std::string(), t.open.size(), text);
  }

  void events(std::uint32_t tid, std::span<const Event> events) override {
    Thread& t = thread(tid);
    for (const Event& e : events) {
      t.last_ns = e.time_ns;
      if (e.kind() == EventKind::entry) {
        open_brace_of_top(t);
        t.open.push_back({e.address(), e.time_ns, false});
        continue;
      }
      if (e.kind() != EventKind::exit && e.kind() != EventKind::unwound) continue;
      std::size_t k = t.open.size();
      while (k > 0 && t.open[k - 1].address != e.address()) --k;
      if (k == 0) continue;  // no open frame of it (the table counts it unmatched)
      while (t.open.size() >= k) close_top(t, e.time_ns, t.open.size() == k && e.kind() == EventKind::exit ? "" : " (unwound)");
    }
    flush();
  }

  Status finish() {
    for (auto& [tid, t] : threads_) {
      if (t.open.empty()) continue;
      select(tid, t);
      while (!t.open.empty()) close_top(t, t.last_ns, " (still running when the trace ended)");
    }
    flush();
    return status_;
  }

 private:
  struct Frame {
    std::uint64_t address, start_ns;
    bool braced;  // its "name {" line is out: it has callees
  };
  struct Thread {
    std::string label;
    std::vector<Frame> open;
    std::uint64_t last_ns = 0;
  };

  std::FILE* out_;
  std::unordered_map<std::uint64_t, std::string> names_;
  std::unordered_map<std::uint32_t, Thread> threads_;
  std::uint32_t current_tid_ = 0;
  bool any_ = false;
  std::string buffer_;
  Status status_;

  Thread& thread(std::uint32_t tid) {
    Thread& t = threads_[tid];
    select(tid, t);
    return t;
  }
  // A header line whenever the log moves to another thread.
  void select(std::uint32_t tid, Thread& t) {
    if (any_ && tid == current_tid_) return;
    if (t.label.empty()) t.label = std::to_string(tid);
    if (any_) buffer_ += '\n';
    buffer_ += "# thread ";
    buffer_ += t.label;
    buffer_ += '\n';
    buffer_ += std::string(kDurationWidth - 8, ' ');
    buffer_ += "DURATION  FUNCTION\n";
    current_tid_ = tid;
    any_ = true;
  }
  const std::string& name(std::uint64_t address) {
    auto [it, fresh] = names_.try_emplace(address);
    if (fresh) {
      char buf[24];
      std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(address));
      it->second = buf;
    }
    return it->second;
  }
  void line(const Thread&, const std::string& duration, std::size_t depth, const std::string& text) {
    const std::size_t w = detail::display_width(duration);  // "µs" is two bytes, one column
    if (w < kDurationWidth) buffer_ += std::string(kDurationWidth - w, ' ');
    buffer_ += duration;
    buffer_ += "  ";
    buffer_ += std::string(2 * depth, ' ');
    buffer_ += text;
    buffer_ += '\n';
    if (buffer_.size() >= (1u << 20)) flush();
  }
  void open_brace_of_top(Thread& t) {
    if (t.open.empty() || t.open.back().braced) return;
    std::string text = name(t.open.back().address);
    text += " {";
    line(t, std::string(), t.open.size() - 1, text);
    t.open.back().braced = true;
  }
  void close_top(Thread& t, std::uint64_t time, const char* how) {
    const Frame f = t.open.back();
    t.open.pop_back();
    const std::string duration = format_duration(time > f.start_ns ? time - f.start_ns : 0);
    std::string text = f.braced ? "} " : "";
    text += name(f.address);
    text += how;
    line(t, duration, t.open.size(), text);
  }
  void flush() {
    if (status_.ok() && !buffer_.empty() && std::fwrite(buffer_.data(), 1, buffer_.size(), out_) != buffer_.size()) {
      status_ = Status::error(std::string("printing the call log: ") + std::strerror(errno), errno);
    }
    buffer_.clear();
  }
};

}  // namespace

Status write_call_log(const Profile& profile, std::FILE* out) {
  CallLogSink sink(profile, out);
  if (Status s = read_again(profile, sink); !s.ok()) return s;
  return sink.finish();
}

}  // namespace tramway::trace::report
