// Hit counters (tramway/hooks.h: OpsCounters, Function::hits).
//
// A locked increment per call costs about 5 ns, more than the rest of the call path, so each
// thread counts in its own block, which only it writes; counters() sums the blocks. Blocks
// are mmapped (async-signal-safe: callbacks may run in signal handlers), chained in a list
// that only grows, and a block whose thread has exited is taken over by the next new thread
// (its counts stay: only sums are read). An ops id is reused once its ops is detached; the
// new ops starts from the sum the blocks hold then. Sites count too, by an index given when a
// site is first hooked and never reused (a site past kMaxSites goes uncounted); the block is
// mapped without reserve, so only the pages of sites a thread ran take memory. The stubs'
// fast path counts inline (arch/x86_64/hook_entry.S), the dispatchers with bump().
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <vector>

#include "common/eject.h"
#include "sites/hooks/internal.h"

namespace tramway::hooks::detail {

thread_local constinit CounterBlock* t_block __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {
std::atomic<CounterBlock*> g_blocks{nullptr};

// Unloaded after an eject (common/eject.h): no hook runs any more.
__attribute__((destructor)) void unmap_blocks_at_unload() {
  if (!common::ejecting()) return;
  for (CounterBlock* b = g_blocks.exchange(nullptr); b;) {
    CounterBlock* next = b->next;
    ::munmap(b, sizeof(CounterBlock));
    b = next;
  }
}
}  // namespace

CounterBlock* claim_block() noexcept {
  const pid_t me = static_cast<pid_t>(::syscall(SYS_gettid));
  for (CounterBlock* b = g_blocks.load(std::memory_order_acquire); b; b = b->next) {
    pid_t owner = b->owner.load(std::memory_order_relaxed);
    if (::syscall(SYS_tgkill, ::getpid(), owner, 0) != 0 && errno == ESRCH &&
        b->owner.compare_exchange_strong(owner, me)) {
      return t_block = b;
    }
  }
  void* mem = ::mmap(nullptr, sizeof(CounterBlock), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
  if (mem == MAP_FAILED) return nullptr;
  auto* b = static_cast<CounterBlock*>(mem);  // zero-filled
  b->owner.store(me, std::memory_order_relaxed);
  b->next = g_blocks.load(std::memory_order_relaxed);
  while (!g_blocks.compare_exchange_weak(b->next, b, std::memory_order_acq_rel)) {
  }
  return t_block = b;
}

std::uint64_t sum_hits(std::uint32_t id) {
  std::uint64_t sum = 0;
  for (CounterBlock* b = g_blocks.load(std::memory_order_acquire); b; b = b->next) {
    sum += std::atomic_ref<std::uint64_t>(b->hits[id]).load(std::memory_order_relaxed);
  }
  return sum;
}

std::uint64_t sum_site_hits(std::uint32_t index) {
  std::uint64_t sum = 0;
  for (CounterBlock* b = g_blocks.load(std::memory_order_acquire); b; b = b->next) {
    sum += std::atomic_ref<std::uint64_t>(b->site_hits[index]).load(std::memory_order_relaxed);
  }
  return sum;
}

std::uint32_t g_next_site_index = 0;  // under g_mu

std::vector<std::uint32_t> g_free_ids;  // under g_mu
std::uint32_t g_next_id = 0;

}  // namespace tramway::hooks::detail
