// tramway's own block-every-signal windows (see all_blocked.h).
#include "text/all_blocked.h"

#include <atomic>

#include "common/proc.h"
#include "text/thread_slots.h"

namespace tramway::text::detail {
namespace {

// A real mask never has every bit set (the kernel never blocks SIGKILL or SIGSTOP).
constexpr std::uint64_t kUnknown = ~std::uint64_t{0};
// More windows at once than this go unmarked; the precheck then falls back to its timing rules.
constexpr int kEntries = 64;

struct Entry {
  std::atomic<pid_t> tid{0};
  std::atomic<std::uint64_t> saved{kUnknown};
};
Entry g_entries[kEntries];

__thread int t_depth __attribute__((tls_model("initial-exec")));
__thread int t_entry __attribute__((tls_model("initial-exec")));  // index + 1, 0: unmarked
__thread sigset_t t_saved __attribute__((tls_model("initial-exec")));

std::uint64_t first_word(const sigset_t& s) noexcept {
  std::uint64_t w;
  static_assert(sizeof(sigset_t) >= sizeof w);
  __builtin_memcpy(&w, &s, sizeof w);
  return w;
}

}  // namespace

void AllSignalsBlocked::enter() noexcept {
  sigset_t all, old;
  sigfillset(&all);
  raw_sigprocmask(SIG_BLOCK, &all, &old);
  // Blocked first: no handler can run on this thread between here and leave(), so the depth
  // and the entry are this window's alone. The precheck may read the blocked mask before the
  // mark is published; it counts that reading as unexplained, and the next one is marked.
  if (t_depth++ > 0) return;
  t_saved = old;
  const pid_t me = common::current_tid();
  for (int i = 0; i < kEntries; ++i) {
    pid_t expected = 0;
    if (g_entries[i].tid.load(std::memory_order_relaxed) == 0 &&
        g_entries[i].tid.compare_exchange_strong(expected, me, std::memory_order_acq_rel)) {
      g_entries[i].saved.store(first_word(old), std::memory_order_release);
      t_entry = i + 1;
      return;
    }
  }
}

void AllSignalsBlocked::leave() noexcept {
  if (t_depth <= 0 || --t_depth > 0) return;
  const int e = t_entry;
  t_entry = 0;
  // Restored before the mark is withdrawn: while the mark is up, the mask is the saved one or
  // all-blocked, never anything else.
  raw_sigprocmask(SIG_SETMASK, &t_saved, nullptr);
  if (e > 0) {
    g_entries[e - 1].saved.store(kUnknown, std::memory_order_release);
    g_entries[e - 1].tid.store(0, std::memory_order_release);
  }
}

WindowLook look_at_window(pid_t tid) noexcept {
  for (const Entry& e : g_entries) {
    if (e.tid.load(std::memory_order_acquire) != tid) continue;
    const std::uint64_t saved = e.saved.load(std::memory_order_acquire);
    // The tid may have been withdrawn between the two loads: then the thread is leaving.
    if (saved == kUnknown || e.tid.load(std::memory_order_acquire) != tid) return {WindowLook::moving, 0};
    return {WindowLook::inside, saved};
  }
  return {};
}

void all_blocked_after_fork_in_child() noexcept {
  for (int i = 0; i < kEntries; ++i) {
    if (i + 1 == t_entry) continue;
    g_entries[i].saved.store(kUnknown, std::memory_order_relaxed);
    g_entries[i].tid.store(0, std::memory_order_relaxed);
  }
  // The forking thread's own entry carries its parent's tid; its tid in the child is new.
  if (t_entry > 0) g_entries[t_entry - 1].tid.store(common::current_tid(), std::memory_order_release);
}

}  // namespace tramway::text::detail
