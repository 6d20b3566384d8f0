// The per-thread call filter (thread_call_filter.h).
#include "trace/thread_call_filter.h"

#include <algorithm>

namespace tramway::trace::detail {

using format::Event;
using format::EventKind;

// Lets through the entries not yet let through of the frames up to `top` that started in the
// window (they contain a kept call, so they last long enough), outermost first.
void ThreadCallFilter::write_chain(std::size_t top, std::vector<Event>& out) {
  for (std::size_t i = 0; i <= top; ++i) {
    Frame& f = open_[i];
    if (f.written || !in_window(f)) continue;
    out.push_back({f.start_ns, Event::make_word(f.address, EventKind::entry)});
    f.written = true;
  }
}

void ThreadCallFilter::close_top(std::uint64_t time, EventKind kind, std::vector<Event>& out) {
  const Frame f = open_.back();
  if (in_window(f) && time - f.start_ns >= window_.min_duration_ns) {
    write_chain(open_.size() - 1, out);
    out.push_back({time, Event::make_word(f.address, kind)});
  } else {
    ++dropped_;
  }
  open_.pop_back();
}

void ThreadCallFilter::add(const Event& e, std::vector<Event>& out) {
  if (past_window_) return;
  if (e.time_ns >= window_.until_ns) {  // the window ends: what is open closes there
    while (!open_.empty()) close_top(window_.until_ns, EventKind::exit, out);
    past_window_ = true;
    return;
  }
  last_ns_ = std::max(last_ns_, e.time_ns);
  switch (e.kind()) {
    case EventKind::entry: open_.push_back({e.address(), e.time_ns, false}); break;
    case EventKind::exit:
    case EventKind::unwound: {
      // As the report matches: the innermost open frame of the function, the frames above it
      // unwound; an exit with none open is not let through.
      const auto it = std::find_if(open_.rbegin(), open_.rend(), [&](const Frame& f) { return f.address == e.address(); });
      if (it == open_.rend()) break;
      const std::size_t below = static_cast<std::size_t>(open_.rend() - it) - 1;
      while (open_.size() > below + 1) close_top(e.time_ns, EventKind::unwound, out);
      close_top(e.time_ns, e.kind(), out);
      break;
    }
    default: out.push_back(e); break;  // unknown kinds: the reader counts them
  }
}

void ThreadCallFilter::finish(std::vector<Event>& out) {
  for (std::size_t i = 0; i < open_.size(); ++i) {
    const Frame& f = open_[i];
    if (in_window(f) && last_ns_ - f.start_ns >= window_.min_duration_ns) write_chain(i, out);
  }
  open_.clear();
}

}  // namespace tramway::trace::detail
