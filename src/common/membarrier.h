// One private membarrier command, registered for on first use. Registration is per mm: a
// forked child may call forget() so that its first use registers again.
#pragma once

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>

#include "tramway/status.h"

namespace tramway::common {

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
    if (mask < 0 || !(mask & command_)) {
      return Status::error(std::string("this kernel does not offer membarrier(MEMBARRIER_CMD_") + name_ + ") (" +
                               needs_ + ")",
                           mask < 0 ? errno : ENOSYS);
    }
    if (call(register_command_) != 0) {
      const int e = errno;
      return Status::error(std::string("membarrier registration for ") + name_ + " failed: " + std::strerror(e), e);
    }
    registered_.store(true, std::memory_order_release);
    return {};
  }

  Status run() {
    if (Status s = prepare(); !s.ok()) return s;
    if (call(command_) != 0) {
      const int e = errno;
      return Status::error(std::string("membarrier(") + name_ + ") failed: " + std::strerror(e), e);
    }
    return {};
  }

  void forget() noexcept { registered_.store(false, std::memory_order_relaxed); }

 private:
  static long call(int cmd) { return ::syscall(SYS_membarrier, cmd, 0, 0); }

  const int command_, register_command_;
  const char* const name_;
  const char* const needs_;
  std::atomic<bool> registered_{false};
};

}  // namespace tramway::common
