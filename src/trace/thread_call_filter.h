// trace/thread_call_filter.h — one thread's events in, the events of the calls kept out, whole:
// a call is kept when it starts inside [since, until) and lasts at least min_duration (so a
// caller of a kept call is kept too, since it lasts longer, unless it started before the
// window). Its entry is held until its exit, or a kept callee's, decides; a call still open at
// `until` is closed there. Memory is the thread's open frames. Used by `tramway report`'s
// filters (report/call_filter.h) and by the recorder's `record -t` (recorder.cc); compiled
// into both libraries.
#pragma once

#include <cstdint>
#include <vector>

#include "tramway/trace/format.h"

namespace tramway::trace::detail {

struct CallWindow {
  std::uint64_t since_ns = 0;
  std::uint64_t until_ns = ~std::uint64_t{0};
  std::uint64_t min_duration_ns = 0;
};

class ThreadCallFilter {
 public:
  explicit ThreadCallFilter(const CallWindow& window) : window_(window) {}

  // Appends to `out` what `e` lets through (in time order).
  void add(const format::Event& e, std::vector<format::Event>& out);
  // At the end: the entries of the open calls that are kept (they stay open in the output).
  void finish(std::vector<format::Event>& out);
  std::uint64_t dropped() const noexcept { return dropped_; }  // calls closed and not kept

 private:
  struct Frame {
    std::uint64_t address, start_ns;
    bool written;  // its entry was let through (a callee of it was kept)
  };
  bool in_window(const Frame& f) const noexcept { return f.start_ns >= window_.since_ns && f.start_ns < window_.until_ns; }
  void write_chain(std::size_t top, std::vector<format::Event>& out);
  void close_top(std::uint64_t time, format::EventKind kind, std::vector<format::Event>& out);

  CallWindow window_;
  std::vector<Frame> open_;
  std::uint64_t last_ns_ = 0, dropped_ = 0;
  bool past_window_ = false;
};

}  // namespace tramway::trace::detail
