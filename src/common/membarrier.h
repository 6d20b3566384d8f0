// One private membarrier command, registered for on first use. Registration is per mm: a
// forked child calls forget() so that its first use registers again.
#pragma once

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <string>

#include "tramway/status.h"

namespace tramway::common {

// Why membarrier `step` ("QUERY", "registration for PRIVATE_EXPEDITED", "PRIVATE_EXPEDITED")
// failed with errno `e`, and what to do: a seccomp filter that refuses it (EPERM, the usual
// cause in containers and sandboxes), a kernel without the system call (ENOSYS) or without the
// command (EINVAL: `needs` says which kernel has it), or a missing registration.
// membarrier.cc.
std::string explain_membarrier_failure(const char* step, int e, const char* needs);

class Membarrier {
 public:
  // `name` is the command without its MEMBARRIER_CMD_ prefix; `needs` says which kernel has it
  // and what tramway needs it for, for the error on kernels without it.
  constexpr Membarrier(int command, int register_command, const char* name, const char* needs) noexcept
      : command_(command), register_command_(register_command), name_(name), needs_(needs) {}

  // Registers once (slow: a few ms). Fails clearly on a kernel without the command.
  Status prepare() {
    if (registered_.load(std::memory_order_acquire)) return {};
    const long mask = call(MEMBARRIER_CMD_QUERY);
    if (mask < 0) {
      const int e = errno;
      return Status::error(explain_membarrier_failure("QUERY", e, needs_), e);
    }
    if (!(mask & command_)) {
      return Status::error(std::string("this kernel does not offer membarrier(MEMBARRIER_CMD_") + name_ + ") (" +
                               needs_ + ")",
                           EINVAL);
    }
    if (call(register_command_) != 0) {
      const int e = errno;
      return Status::error(explain_membarrier_failure(("registration for " + std::string(name_)).c_str(), e, needs_), e);
    }
    registered_.store(true, std::memory_order_release);
    return {};
  }

  Status run() {
    if (Status s = prepare(); !s.ok()) return s;
    if (call(command_) != 0) {
      const int e = errno;
      failed_.store(true, std::memory_order_relaxed);
      return Status::error(explain_membarrier_failure(name_, e, needs_), e);
    }
    failed_.store(false, std::memory_order_relaxed);
    return {};
  }

  // Whether run() can be expected to work: registered, and working again if it failed last
  // time (then this runs the command once). No system call while it works.
  Status usable() {
    if (Status s = prepare(); !s.ok()) return s;
    return failed_.load(std::memory_order_relaxed) ? run() : Status();
  }

  void forget() noexcept { registered_.store(false, std::memory_order_relaxed); }

 private:
  static long call(int cmd) { return ::syscall(SYS_membarrier, cmd, 0, 0); }

  const int command_, register_command_;
  const char* const name_;
  const char* const needs_;
  std::atomic<bool> registered_{false};
  std::atomic<bool> failed_{false};
};

}  // namespace tramway::common
