// trace/report/call_filter.h — which calls a report covers: a time window, a minimum duration,
// a set of threads. A sink between the reader and the profile builder (or the Perfetto
// writer) that forwards only the calls kept, whole: a call is kept when it starts inside the
// window and lasts at least the minimum (the parent of a kept call is kept too, since it lasts
// longer, unless it started before the window). A call still open at the window's end is
// closed there. Memory is each thread's open frames: the entry of a call is held until its
// exit says whether it is kept, or one of its callees is.
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
