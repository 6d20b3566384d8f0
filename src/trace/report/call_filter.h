// trace/report/call_filter.h — which calls a report covers: a time window, a minimum duration,
// a set of threads. A sink between the reader and the profile builder (or the streaming
// outputs) that forwards only the calls kept, whole, each thread's through a ThreadCallFilter
// (trace/thread_call_filter.h says which calls those are); the threads not selected are left
// out. Memory is each thread's open frames.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "trace/report/report.h"

namespace tramway::trace::report {

class CallFilterSink final : public TraceSink {
 public:
  CallFilterSink(const CallFilter& filter, TraceSink& next);
  ~CallFilterSink() override;

  void function(std::uint64_t address, std::string_view name) override;
  void thread_name(std::uint32_t tid, std::string_view name) override;
  void events(std::uint32_t tid, std::span<const format::Event> events) override;
  void lost(std::uint32_t tid, std::uint64_t count) override;
  // At the end of the file: calls still open that are kept are forwarded as open.
  void finish();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Reads the profile's trace file again into `sink`, through the filter the profile was built
// with (the streaming outputs: Perfetto, the call log). Damage was reported by the first read.
Status read_again(const Profile& profile, TraceSink& sink);

}  // namespace tramway::trace::report
