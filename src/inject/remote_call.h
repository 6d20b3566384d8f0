// inject/remote_call.h — making one thread of another process call functions, then giving it
// back exactly as it was (the injector's primitive, inject/injector.h).
//
// A Hijack seizes one thread (PTRACE_SEIZE + PTRACE_INTERRUPT: the process's other threads never
// stop, and no SIGSTOP is ever queued), saves its registers, extended state and signal mask, and
// runs calls on it: each call's return address is 0, so the thread comes back to us as a
// SIGSEGV at address 0, which is never delivered. release() puts everything back and detaches:
//  * a thread stopped inside a system call the kernel would restart (-ERESTARTSYS, -NOINTR,
//    -NOHAND, -RESTART_RESTARTBLOCK) restarts it when it resumes, as after any signal without a
//    handler: the registers are restored while the thread is still inside the kernel's signal
//    path, which is where restarting is decided;
//  * some calls (epoll_wait, epoll_pwait, a read of an inotify descriptor: ptrace(2), BUGS)
//    return EINTR when a stop alone interrupted them: such a call, when no signal is pending
//    for the thread at release, is restarted by hand (its PC moved back onto the syscall
//    instruction, its number back in rax), so the program never sees the EINTR. A relative
//    timeout then counts again from the restart, as for any restart through -ERESTARTNOHAND;
//  * the calls run below the stack's red zone, and the thread's mask, restored by
//    PTRACE_SETSIGMASK, is what the program had, whatever the called code changed.
// A signal that comes for the thread while it is ours is delivered (it runs on top of the call,
// as it would on top of any code). Every wait is bounded; the process exiting meanwhile is an
// error that says so. Not thread-safe; one Hijack per thread. The destructor releases.
#pragma once

#include <sys/types.h>
#include <sys/user.h>

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "tramway/status.h"

namespace tramway::inject {

struct StopFacts {
  long syscall = -1;           // the system call the thread was stopped in (-1: user mode)
  bool restarts = false;       // the kernel restarts it on resume
  bool eintr_fixed = false;    // an EINTR the stop caused, undone by hand
  std::uintptr_t pc = 0;       // where it was stopped
};

class Hijack {
 public:
  // Seizes `tid` of `pid` and waits at most `stop_timeout` for it to stop.
  static Result<Hijack> seize(pid_t pid, pid_t tid, std::chrono::milliseconds stop_timeout);

  Hijack(Hijack&& other) noexcept;
  Hijack& operator=(Hijack&&) = delete;
  ~Hijack();

  // Calls `function(args...)` (at most 6 integer arguments) on the thread and returns its rax.
  // Fails when it does not return within `timeout` (the thread is then left running the call:
  // the message says so) or crashes.
  Result<std::uint64_t> call(std::uintptr_t function, std::initializer_list<std::uint64_t> args,
                             std::chrono::milliseconds timeout);

  // Copies bytes to the thread's scratch area (below the red zone, under the calls' frames)
  // and returns their address there; valid until release(). Strings get their NUL.
  Result<std::uintptr_t> put_string(const std::string& s);
  Result<std::string> read_string(std::uintptr_t address, std::size_t max);

  // Restores the thread and detaches. Idempotent.
  Status release();

  const StopFacts& stopped() const noexcept { return facts_; }
  pid_t tid() const noexcept { return tid_; }
  // Nanoseconds from the stop to the release (the thread's pause); 0 before release.
  std::int64_t pause_ns() const noexcept { return pause_ns_; }

 private:
  Hijack(pid_t pid, pid_t tid) : pid_(pid), tid_(tid) {}
  Status wait_stop(std::chrono::milliseconds timeout, int* status, const char* what);
  Status write_memory(std::uintptr_t address, const void* data, std::size_t size);

  pid_t pid_ = -1, tid_ = -1;
  bool attached_ = false;
  bool gone_ = false;          // the thread exited while ours
  user_regs_struct saved_{};   // as stopped (with the restart decided)
  std::vector<std::uint8_t> xstate_;
  std::uint64_t mask_ = 0;
  std::uintptr_t scratch_top_ = 0, scratch_ = 0;  // put_string allocates downwards from top
  std::int64_t stopped_at_ns_ = 0, pause_ns_ = 0;
  StopFacts facts_;
};

// Whether a thread stopped on its way out of a system call whose result register holds
// `result` restarts the call when it resumes without a signal (the kernel's rule), or got EINTR
// from the stop alone and is to be restarted by hand.
enum class RestartKind { none, kernel, by_hand };
RestartKind restart_kind(long long result) noexcept;

}  // namespace tramway::inject
