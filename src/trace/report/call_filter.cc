// The call filter (call_filter.h), and parse_duration for its command-line forms.
#include "trace/report/call_filter.h"

#include "trace/thread_call_filter.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <unordered_map>

namespace tramway::trace::report {

using format::Event;
using format::EventKind;

struct CallFilterSink::State {
  struct Thread {
    explicit Thread(const detail::CallWindow& w) : filter(w) {}
    detail::ThreadCallFilter filter;
    std::vector<Event> out;  // forwarded at the end of each events() call
  };

  CallFilter filter;
  detail::CallWindow window;
  TraceSink& next;
  std::unordered_map<std::uint32_t, Thread> threads;

  State(const CallFilter& f, TraceSink& n) : filter(f), window{f.since_ns, f.until_ns, f.min_duration_ns}, next(n) {}

  bool selected(std::uint32_t tid) const {
    return filter.tids.empty() || std::find(filter.tids.begin(), filter.tids.end(), tid) != filter.tids.end();
  }
  Thread& thread(std::uint32_t tid) { return threads.try_emplace(tid, window).first->second; }
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
  State::Thread& t = state_->thread(tid);
  for (const Event& e : events) t.filter.add(e, t.out);
  state_->flush(tid, t);
}

void CallFilterSink::lost(std::uint32_t tid, std::uint64_t count) {
  if (state_->selected(tid)) state_->next.lost(tid, count);
}

void CallFilterSink::finish() {
  // Frames open at the end of the file: the kept ones are forwarded as still open (the
  // builder closes them at the thread's last timestamp and says so).
  for (auto& [tid, t] : state_->threads) {
    t.filter.finish(t.out);
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
