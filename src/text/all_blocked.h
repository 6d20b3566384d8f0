// tramway's own block-every-signal windows, marked so that other threads can tell them from a
// program's mask. Internal.
//
// The router blocks every signal for a moment while it updates its handler table, claims a
// thread slot or forks. To the batch precheck (batch_precheck.cc), which reads masks through
// /proc, such a window looks exactly like a program that blocked SIGTRAP with a raw system
// call; timing the window cannot tell the two apart on a loaded machine. So each window
// publishes the thread's tid and the mask it will restore in a small process-wide table: a
// thread inside one runs only tramway's code (never a patch site) and leaves it with that saved
// mask, which is the one to judge it by. Windows nest (an inner one changes nothing). Entering
// and leaving are async-signal-safe: atomics and raw system calls only.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <cstdint>

namespace tramway::text::detail {

// Blocks every signal and marks the window, until leave() (or the destructor).
class AllSignalsBlocked {
 public:
  AllSignalsBlocked() noexcept { enter(); }
  ~AllSignalsBlocked() { leave(); }
  AllSignalsBlocked(const AllSignalsBlocked&) = delete;
  AllSignalsBlocked& operator=(const AllSignalsBlocked&) = delete;

  // For windows that span two calls (fork's prepare and after handlers): one thread-local
  // window per thread, entered and left in that order.
  static void enter() noexcept;
  static void leave() noexcept;
};

// What the table says of a thread.
struct WindowLook {
  enum State { none, moving, inside } state = none;  // moving: entering or leaving right now
  std::uint64_t saved = 0;                          // inside: the mask it will restore
};
WindowLook look_at_window(pid_t tid) noexcept;

// fork() child: only the calling thread exists; its own window, if any, stays.
void all_blocked_after_fork_in_child() noexcept;

}  // namespace tramway::text::detail
