// tramway/grace.h — grace periods: when retired code and data can be reused.
//
// Readers mark the regions in which they may use something that can be retired:
//   { tramway::grace::ReadGuard g;  ... use ops, literal lists, callback data ... }
// A writer unpublishes something, then waits for a grace period before reusing it:
//   unpublish(p); tramway::grace::synchronize(); delete p;          // or:
//   unpublish(p); tramway::grace::call([p] { delete p; });           // later, on a helper thread
// When synchronize() returns, every read-side region that was running when it was called has
// ended (DESIGN invariant 3). Regions that begin later do not delay it: a thread that enters
// regions back to back does not stall a grace period (invariant 5).
//
// Flavor trace: the read side is a per-thread marker — initial-exec TLS, a nesting counter
// with a phase snapshot, no atomic read-modify-write and no fence; the grace period pays
// instead with one membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) and a two-phase scan of the
// registered markers (liburcu's memb algorithm, minus its closing membarrier, which x86's
// store ordering makes redundant: src/grace/trace.cc). Threads register on their first
// read-side region; a thread may exit at any time, even inside a region. Concurrent
// synchronize() callers share grace periods.
//
// Flavor tasks: for code that threads enter without raising a marker (generated code called
// directly from a patched site). Unpublish it, retire(begin, end), then wait:
//   unpatch(site); retire(code, code + n); synchronize(Flavor::tasks); reuse(code);
// A tasks grace period is a trace one plus observation of every thread of the process (all
// of /proc/self/task) against the ranges retired before it began: it returns once each thread
// was seen with its live PC, every PC of its nested signal frames and any int3 it is having
// emulated outside them. Blocked and stopped threads are read through /proc, undisturbed;
// running ones are sent one signal. Code in a retired range must not call out to code that
// can block without raising the marker first: a return address into the range on a thread's
// stack is not a PC, and is not seen.
//
// Not allowed inside a read-side region: synchronize() and barrier() (they would wait for
// themselves) — they fail with an error instead of deadlocking. Async-signal-safe: ReadGuard
// (after the thread's first region), never synchronize/call/barrier/retire.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tramway/status.h"

namespace tramway::grace {

namespace detail {
// A marker: 0 when outside any region; otherwise the nesting depth in the low bits and the
// grace-period phase observed when the outermost region began.
inline constexpr std::uint64_t kNestMask = (std::uint64_t{1} << 32) - 1;
inline constexpr std::uint64_t kPhaseBit = std::uint64_t{1} << 32;
// Set by a tasks grace period's sample of this thread while it was in a region begun before the
// phase flip: the outermost unlock then reports (wake_grace_period) instead of the grace
// period asking again one scheduling round later.
inline constexpr std::uint64_t kReportBit = std::uint64_t{1} << 33;

struct alignas(64) Marker {
  std::atomic<std::uint64_t> value{0};  // offset 0: assembly reads and writes it there
  pid_t tid = 0;                         // the owning thread, for stall reports
};
static_assert(sizeof(std::atomic<std::uint64_t>) == 8, "the marker is one 64-bit word");

// The assembler names are a stable interface for .S stubs: see tramway/asm/grace_marker.h.
// kNestMask-count 1 plus the current phase; read by the outermost raise.
extern std::atomic<std::uint64_t> g_phase_and_one __asm__("tramway_grace_phase");
// -1 while a grace period sleeps waiting for readers: the last unlock of a region wakes it.
extern std::atomic<int> g_waiting_futex __asm__("tramway_grace_waiting");
// constinit: no dynamic initialisation, so no TLS wrapper call guards each access.
extern thread_local constinit Marker* t_marker __asm__("tramway_grace_marker")
    __attribute__((tls_model("initial-exec")));
Marker* register_thread() noexcept __asm__("tramway_grace_register_thread");  // first region
// Wakes a sleeping grace period, and answers a tasks grace period's request to report.
void wake_grace_period() noexcept __asm__("tramway_grace_wake");
}  // namespace detail

inline void read_lock() noexcept {
  detail::Marker* m = detail::t_marker;
  if (__builtin_expect(m == nullptr, 0)) m = detail::register_thread();
  const std::uint64_t v = m->value.load(std::memory_order_relaxed);
  m->value.store((v & detail::kNestMask) == 0 ? detail::g_phase_and_one.load(std::memory_order_relaxed) : v + 1,
                 std::memory_order_relaxed);
  // The grace period's membarrier orders this store against the region's loads on the
  // reader's CPU; the compiler must not move them either.
  std::atomic_signal_fence(std::memory_order_seq_cst);
}

inline void read_unlock() noexcept {
  std::atomic_signal_fence(std::memory_order_seq_cst);
  detail::Marker* m = detail::t_marker;
  const std::uint64_t v = m->value.load(std::memory_order_relaxed) - 1;
  m->value.store(v, std::memory_order_relaxed);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  if (__builtin_expect((v & detail::kNestMask) == 0 &&
                           ((v & detail::kReportBit) || detail::g_waiting_futex.load(std::memory_order_relaxed) == -1),
                       0)) {
    detail::wake_grace_period();
  }
}

// True while the calling thread is inside a read-side region.
inline bool in_read_section() noexcept {
  const detail::Marker* m = detail::t_marker;
  return m && (m->value.load(std::memory_order_relaxed) & detail::kNestMask) != 0;
}

class ReadGuard {
 public:
  ReadGuard() noexcept { read_lock(); }
  ~ReadGuard() { read_unlock(); }
  ReadGuard(const ReadGuard&) = delete;
  ReadGuard& operator=(const ReadGuard&) = delete;
};

enum class Flavor { trace, tasks };
// expedited: poll holdouts without ever sleeping (lower latency, one CPU kept busy meanwhile).
enum class Wait { normal, expedited };

// Waits for a grace period. Fails (without waiting) inside a read-side region, or if the
// kernel lacks membarrier(PRIVATE_EXPEDITED).
Status synchronize();  // Flavor::trace
Status synchronize(Flavor flavor, Wait wait = Wait::normal);

// Tasks flavor: [begin, end) is code that is no longer published (no new thread can enter it).
// The next tasks grace period to begin waits until no thread is inside it; ranges retired while
// one runs wait for the next. Fails on an empty range.
Status retire(const void* begin, const void* end);

// Runs `fn` on tramway's callback thread after a grace period of `flavor` (trace if not
// given). Callbacks run in the order they were queued; many share one grace period. The
// thread starts on first use.
Status call(std::function<void()> fn);
Status call(Flavor flavor, std::function<void()> fn);

// Waits until every callback queued before it has run. Fails inside a read-side region.
Status barrier();

// A thread the running grace period is waiting for.
struct Holdout {
  pid_t tid;
  std::string name;            // /proc/self/task/TID/comm
  std::uint32_t depth;         // region nesting depth
  std::string where;           // "running", or the PC (with symbol) of a blocked/stopped thread
  std::string range;           // tasks flavor: the retired range holding it ("[0x.., 0x..)"), else empty
};
// The holdouts of the grace period in progress (empty when none is).
std::vector<Holdout> holdouts();
// A grace period waiting longer than this prints its holdouts once to stderr (like an RCU stall
// warning) and keeps waiting. Default 10 s; TRAMWAY_GRACE_STALL_SECONDS changes it.

struct Stats {
  std::uint64_t grace_periods = 0;      // trace grace periods run (tasks ones included)
  std::uint64_t tasks_grace_periods = 0;
  std::uint64_t threads_signalled = 0;   // by tasks grace periods: running threads asked for their PCs
  std::uint64_t threads_observed = 0;    // by tasks grace periods: seen outside without a signal
  std::uint64_t synchronize_calls = 0;  // synchronize() calls (shared ones included)
  std::uint64_t callbacks_run = 0;
  std::uint64_t threads_registered = 0;  // registered now
  std::uint64_t stall_reports = 0;
};
Stats stats() noexcept;

}  // namespace tramway::grace
