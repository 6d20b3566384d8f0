// Core serialisation for cross-modifying code. Intel SDM 8.1.3: a processor executing
// modified code must execute a serializing instruction after the modification;
// MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE makes every CPU running one of our threads do so
// (or guarantees it will before returning to user space).
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>

#include "text/internal.h"

namespace tramway::text::detail {
namespace {

std::atomic<bool> g_registered{false};

long membarrier(int cmd, unsigned flags = 0) { return ::syscall(SYS_membarrier, cmd, flags, 0); }

Status register_sync_core() {
  const long mask = membarrier(MEMBARRIER_CMD_QUERY);
  if (mask < 0 || !(mask & MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)) {
    return Status::error(
        "this kernel does not offer membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE) (Linux >= 4.16 "
        "on x86-64 has it); tramway cannot serialise other threads after rewriting code",
        mask < 0 ? errno : ENOSYS);
  }
  if (membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) != 0) {
    const int e = errno;
    return Status::error(std::string("membarrier registration for SYNC_CORE failed: ") + std::strerror(e), e);
  }
  g_registered.store(true, std::memory_order_release);
  return {};
}

}  // namespace

Status prepare_serialization() {
  if (g_registered.load(std::memory_order_acquire)) return {};
  return register_sync_core();
}

Status serialize_all_cores() {
  if (Status s = prepare_serialization(); !s.ok()) return s;
  if (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE) != 0) {
    const int e = errno;
    return Status::error(std::string("membarrier(PRIVATE_EXPEDITED_SYNC_CORE) failed: ") + std::strerror(e), e);
  }
  counters().serialisations.fetch_add(1, std::memory_order_relaxed);
  return {};
}

// Registration is per mm; re-register in a forked child before its first batch.
void serialize_after_fork_in_child() noexcept { g_registered.store(false, std::memory_order_relaxed); }

}  // namespace tramway::text::detail
