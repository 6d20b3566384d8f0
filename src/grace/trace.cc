// Flavor trace: markers, the thread registry and grace periods (liburcu's memb algorithm).
//
// A grace period, with prior unpublishing stores done by the caller:
//   membarrier   every CPU running one of our threads executes a full barrier: a reader whose
//                marker store is still buffered has it drained, so the scans below see it;
//                a reader that loads after this point sees the unpublished state.
//   wait 1       for readers still active in the phase before the current one;
//   flip         the phase: regions that begin from now on carry the new phase;
//   wait 2       for readers active in the old phase.
// Readers that begin after the flip are never waited for, so readers entering regions back to
// back cannot stall a grace period.
// liburcu ends with a second membarrier, to order the caller's frees after every reader's
// last access. x86-64 (the only architecture tramway runs on) already gives that order: a
// reader's unlock is a store after its region's loads and stores, and TSO never lets a store
// become visible before earlier loads and stores of its CPU; so once a scan has seen the
// unlock, every access of the region is done, and the caller's frees are stores after that
// scan's load (an acquire fence keeps the compiler from moving them up). One membarrier per
// grace period, not two, halves its cost: a membarrier is most of it.
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <new>
#include <string>
#include <vector>

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>

#include "common/eject.h"
#include "common/fork_hooks.h"
#include "common/format.h"
#include "common/membarrier.h"
#include "common/own_stack.h"
#include "common/proc.h"
#include "grace/internal.h"
#include "tramway/grace.h"
#include "tramway/text/signal_router.h"
#include "common/unload_freed.h"

namespace tramway::grace {
namespace detail {
std::atomic<std::uint64_t> g_phase_and_one __asm__("tramway_grace_phase"){1};
std::atomic<int> g_waiting_futex __asm__("tramway_grace_waiting"){0};
constinit thread_local Marker* t_marker __asm__("tramway_grace_marker")
    __attribute__((tls_model("initial-exec"))) = nullptr;
}  // namespace detail

namespace {

using detail::kNestMask;
using detail::kPhaseBit;
using detail::Marker;

long futex(std::atomic<int>* addr, int op, int value, const timespec* timeout = nullptr) {
  return ::syscall(SYS_futex, reinterpret_cast<int*>(addr), op, value, timeout, nullptr, 0);
}

// ---- registry -------------------------------------------------------------------------------
// A registered thread's marker, with a robust mutex the thread holds for as long as it lives:
// however the thread ends (even a raw SYS_exit inside a region, which runs no TLS destructor),
// the kernel marks the mutex's owner dead, so a grace period can tell an exited thread from a
// live one without /proc and without mistaking a new thread that got the same tid.
//
// A marker outlives an eject's unload of libtramway: it is on its thread's robust list, which
// the kernel writes when the thread exits, so its memory cannot be freed while the thread
// lives (and only the thread itself may unlock it). A later injection's libtramway adopts it
// instead of leaving one more behind on every cycle: the thread's first region looks for a
// marker on its own robust list, known by `magic` just before the mutex.
constexpr std::uint64_t kLiveMarkerMagic = 0x746b'7261'6d79'6177;  // "wayramkt", version 1 of the layout
struct LiveMarker : Marker {
  std::uint64_t magic = kLiveMarkerMagic;
  pthread_mutex_t alive;
};

// The grace period holds `mu` while it scans and releases it while it waits, so a thread can
// register or exit between two scans but never during one: a scan never reads a freed marker.
// Lock rank grace_leaves (common/lock_order.h): taken by any thread's first region.
struct Registry {
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  std::vector<LiveMarker*> markers;
};
// Kept until unload: threads may exit after static destructors ran. The markers themselves
// stay: each is on its thread's robust list, which the kernel writes when the thread exits.
common::UnloadFreed<Registry> g_registry;
Registry& registry() { return g_registry.get(); }

pthread_key_t g_exit_key;
pthread_once_t g_exit_key_once = PTHREAD_ONCE_INIT;

void hold_alive(LiveMarker* m) {
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&m->alive, &attr);
  pthread_mutexattr_destroy(&attr);
  pthread_mutex_lock(&m->alive);
}

// The marker an earlier libtramway left on the calling thread's robust list, or nullptr. Signals
// are blocked (register_thread), so nothing else changes the list while it is walked. The
// list holds glibc's links: each entry is the `__list.__next` field of a robust mutex the
// thread holds (bit 0 tags a PI mutex), and the last one points back at the head.
LiveMarker* adopt_left_marker() noexcept {
  robust_list_head* head = nullptr;
  std::size_t len = 0;
  if (::syscall(SYS_get_robust_list, 0, &head, &len) != 0 || head == nullptr) return nullptr;
  static const std::uintptr_t next_offset = [] {
    static pthread_mutex_t probe;
    return reinterpret_cast<std::uintptr_t>(&probe.__data.__list.__next) - reinterpret_cast<std::uintptr_t>(&probe);
  }();
  const std::uintptr_t alive_offset = [] {
    alignas(LiveMarker) static unsigned char storage[sizeof(LiveMarker)];
    auto* m = reinterpret_cast<LiveMarker*>(storage);
    return reinterpret_cast<std::uintptr_t>(&m->alive) - reinterpret_cast<std::uintptr_t>(m);
  }();
  const auto end = reinterpret_cast<std::uintptr_t>(head);
  auto p = reinterpret_cast<std::uintptr_t>(head->list.next);
  for (int n = 0; (p & ~std::uintptr_t{1}) != end && p != 0 && n < ROBUST_LIST_LIMIT; ++n) {
    const std::uintptr_t entry = p & ~std::uintptr_t{1};
    const std::uintptr_t mutex = entry - next_offset;
    // The word before the mutex need not be mapped (a mutex at the start of a shared page):
    // read it through the kernel, which says EFAULT instead of faulting.
    std::uint64_t magic = 0;
    iovec local{&magic, sizeof magic}, remote{reinterpret_cast<void*>(mutex - sizeof magic), sizeof magic};
    if ((p & 1) == 0 && mutex >= alive_offset &&
        ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) == static_cast<ssize_t>(sizeof magic) &&
        magic == kLiveMarkerMagic) {
      return reinterpret_cast<LiveMarker*>(mutex - alive_offset);
    }
    p = *reinterpret_cast<const std::uintptr_t*>(entry);
  }
  return nullptr;
}

void unregister_thread(void* p) {
  auto* m = static_cast<LiveMarker*>(p);
  Registry& r = registry();
  pthread_mutex_lock(&r.mu);
  std::erase(r.markers, m);
  pthread_mutex_unlock(&r.mu);
  detail::t_marker = nullptr;
  pthread_mutex_unlock(&m->alive);  // off the thread's robust list before it is freed
  pthread_mutex_destroy(&m->alive);
  delete m;  // a thread that exits inside a region simply stops being waited for
}

// ---- grace periods ----------------------------------------------------------------------------
// Lock rank grace_period (common/lock_order.h): held for a whole trace grace period.
pthread_mutex_t g_gp_mu = PTHREAD_MUTEX_INITIALIZER;
std::atomic<std::uint64_t> g_started{0}, g_completed{0};
std::atomic<std::uint64_t> g_synchronize_calls{0}, g_callbacks_run{0};
common::Membarrier g_expedited{MEMBARRIER_CMD_PRIVATE_EXPEDITED, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                                "PRIVATE_EXPEDITED", "Linux >= 4.14 has it; tramway's grace periods need it"};

Status membarrier_expedited() { return g_expedited.run(); }

// True when the marker shows a region that began in a phase other than `phase`.
bool active_in_other_phase(std::uint64_t marker, std::uint64_t phase) {
  return (marker & kNestMask) != 0 && ((marker ^ phase) & kPhaseBit) != 0;
}

// The phase the grace period in progress waits out, or ~0 when none is waiting.
std::atomic<std::uint64_t> g_waiting_phase{~std::uint64_t{0}};
std::atomic<std::uint64_t> g_stall_reports{0};

std::string describe_location(pid_t tid) {
  const common::TaskProbe p = common::probe_task(tid);
  if (p.gone) return "exited";
  if (p.running) return "running";
  return detail::describe_pc(p.pc) + ", state " + p.state;
}

std::vector<Holdout> holdouts_for(std::uint64_t phase) {
  std::vector<std::pair<pid_t, std::uint32_t>> found;
  Registry& r = registry();
  pthread_mutex_lock(&r.mu);
  for (const Marker* m : r.markers) {
    const std::uint64_t v = m->value.load(std::memory_order_relaxed);
    if (active_in_other_phase(v, phase)) found.emplace_back(m->tid, static_cast<std::uint32_t>(v & kNestMask));
  }
  pthread_mutex_unlock(&r.mu);
  std::vector<Holdout> out;
  for (auto [tid, depth] : found) out.push_back({tid, common::thread_name(tid), depth, describe_location(tid), {}});
  return out;
}

void report_stall(std::uint64_t phase, std::int64_t waited_ns) {
  detail::count_stall_report();
  const auto holdouts = holdouts_for(phase);
  std::string text = "tramway: grace period stalled for " + std::to_string(waited_ns / 1'000'000) +
                     " ms waiting for " + std::to_string(holdouts.size()) + " thread(s) in read-side regions:\n";
  for (const Holdout& h : holdouts) {
    text += "  thread " + std::to_string(h.tid) + " (" + h.name + "), region depth " + std::to_string(h.depth) + ", " +
            h.where + "\n";
  }
  text += "  (still waiting; TRAMWAY_GRACE_STALL_SECONDS sets when this is reported)\n";
  std::fputs(text.c_str(), stderr);
}

// True once the marker's thread has ended without unregistering. Under the registry's lock.
bool owner_exited(LiveMarker* m) {
  const int e = pthread_mutex_trylock(&m->alive);
  if (e == EOWNERDEAD) {
    pthread_mutex_consistent(&m->alive);
    pthread_mutex_unlock(&m->alive);
    return true;
  }
  if (e == 0) pthread_mutex_unlock(&m->alive);  // never: a registered thread holds it
  return false;
}

// Drops the markers of threads that exited without unregistering (a raw SYS_exit, even inside
// a region: an exited thread is quiescent). Under the registry's lock; the slow path of a
// grace period only, since a trylock dirties the marker's line.
void drop_exited(Registry& r, std::uint64_t phase) {
  std::erase_if(r.markers, [&](LiveMarker* m) {
    if (!active_in_other_phase(m->value.load(std::memory_order_relaxed), phase) || !owner_exited(m)) return false;
    pthread_mutex_destroy(&m->alive);
    delete m;
    return true;
  });
}

// Waits until no registered thread is inside a region begun in a phase other than the
// current one: spin briefly (regions are short), then sleep on the futex the last unlock of
// such a region wakes.
Status wait_for_readers(std::uint64_t phase, std::int64_t gp_start_ns, bool& reported, Wait wait) {
  // Spinning: rescan every 8 pauses (a pause is up to 140 cycles), so that a reader leaving
  // its region is seen within a few hundred nanoseconds; about 0.3 ms in all.
  constexpr int kSpinAttempts = 800, kPausesPerSpin = 8;
  Registry& r = registry();
  g_waiting_phase.store(phase, std::memory_order_relaxed);
  const std::int64_t stall_ns = detail::stall_threshold_ns();
  for (int attempt = 0;; ++attempt) {
    pthread_mutex_lock(&r.mu);
    if (attempt >= kSpinAttempts) drop_exited(r, phase);
    const bool any = std::any_of(r.markers.begin(), r.markers.end(), [&](const Marker* m) {
      return active_in_other_phase(m->value.load(std::memory_order_relaxed), phase);
    });
    pthread_mutex_unlock(&r.mu);
    if (!any) {
      g_waiting_phase.store(~std::uint64_t{0}, std::memory_order_relaxed);
      return {};
    }
    if (attempt < kSpinAttempts) {  // far below any stall threshold: no clock read here
      for (int i = 0; i < kPausesPerSpin; ++i) __builtin_ia32_pause();
      continue;
    }
    if (!reported) {
      const std::int64_t waited = common::monotonic_ns() - gp_start_ns;
      if (waited >= stall_ns) {
        reported = true;  // once per grace period
        report_stall(phase, waited);
      }
    }
    if (attempt < kSpinAttempts + 10 || wait == Wait::expedited) {
      sched_yield();
      continue;
    }
    // Announce that we sleep, make the announcement and the readers' markers visible to each
    // other (membarrier), look once more, then sleep until an unlock wakes us.
    detail::g_waiting_futex.store(-1, std::memory_order_seq_cst);
    if (Status s = membarrier_expedited(); !s.ok()) return s;
    pthread_mutex_lock(&r.mu);
    drop_exited(r, phase);
    const bool still = std::any_of(r.markers.begin(), r.markers.end(), [&](const Marker* m) {
      return active_in_other_phase(m->value.load(std::memory_order_relaxed), phase);
    });
    pthread_mutex_unlock(&r.mu);
    if (still) {
      const timespec bound{0, 10'000'000};  // a wake-up is never lost for long
      futex(&detail::g_waiting_futex, FUTEX_WAIT_PRIVATE, -1, &bound);
    }
    detail::g_waiting_futex.store(0, std::memory_order_relaxed);
  }
}

// Phase flips so far: a region whose marker carries the current phase began after the latest
// flip (wait 1 of every grace period empties that phase before flipping to it).
std::atomic<std::uint64_t> g_flips{0};

// Grace periods left to fail, for tests of what callers do when one fails (detach).
std::atomic<int> g_injected_failures{0};

Status run_grace_period(Wait wait, const std::function<void()>* after_flip) {
  const std::int64_t start = common::monotonic_ns();
  bool reported = false;
  for (int n = g_injected_failures.load(); n > 0;) {
    if (g_injected_failures.compare_exchange_weak(n, n - 1)) {
      return Status::error("the grace period failed: a failure injected by a test", EIO);
    }
  }
  if (Status s = membarrier_expedited(); !s.ok()) return s;
  const std::uint64_t before = detail::g_phase_and_one.load(std::memory_order_relaxed);
  if (Status s = wait_for_readers(before, start, reported, wait); !s.ok()) return s;
  detail::g_phase_and_one.store(before ^ kPhaseBit, std::memory_order_seq_cst);
  g_flips.fetch_add(1, std::memory_order_seq_cst);
  if (after_flip) (*after_flip)();
  if (Status s = wait_for_readers(before ^ kPhaseBit, start, reported, wait); !s.ok()) return s;
  std::atomic_thread_fence(std::memory_order_acquire);  // see the top of this file
  return {};
}

// Runs a grace period with g_gp_mu held and counts it for the callers that share it.
Status run_counted_grace_period(Wait wait, const std::function<void()>* after_flip) {
  const std::uint64_t mine = g_started.fetch_add(1, std::memory_order_seq_cst) + 1;
  Status s = run_grace_period(wait, after_flip);
  if (s.ok()) {
    g_completed.store(mine, std::memory_order_release);
  } else {
    g_started.fetch_sub(1, std::memory_order_relaxed);
  }
  return s;
}

// ---- callbacks ------------------------------------------------------------------------------------
// Lock rank grace_leaves (common/lock_order.h).
struct Callbacks {
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t queued_cv = PTHREAD_COND_INITIALIZER;
  pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
  struct Pending {
    Flavor flavor;
    std::function<void()> fn;
  };
  std::deque<Pending> queue;
  // The batch the thread took: running[next_to_run..] have not begun; in_progress while the
  // one before them runs. A fork()ed child queues the ones not begun again.
  std::vector<Pending> running;
  std::size_t next_to_run = 0;
  bool in_progress = false;
  std::uint64_t queued = 0, done = 0;
  bool thread_running = false;
  bool stop = false;  // eject: the thread ends once the queue is empty
  common::OwnStackThread thread;
};
common::UnloadFreed<Callbacks> g_callbacks;
Callbacks& callbacks() { return g_callbacks.get(); }

void* callback_thread(void*) {
  pthread_setname_np(pthread_self(), "tramway-grace");
  Callbacks& c = callbacks();
  for (;;) {
    pthread_mutex_lock(&c.mu);
    while (c.queue.empty() && !c.stop) pthread_cond_wait(&c.queued_cv, &c.mu);
    if (c.queue.empty()) {  // stopping
      pthread_mutex_unlock(&c.mu);
      return nullptr;
    }
    c.running.assign(std::make_move_iterator(c.queue.begin()), std::make_move_iterator(c.queue.end()));
    c.queue.clear();
    c.next_to_run = 0;
    const bool tasks =
        std::any_of(c.running.begin(), c.running.end(), [](const auto& p) { return p.flavor == Flavor::tasks; });
    pthread_mutex_unlock(&c.mu);
    // Every callback of the batch was queued (and its ranges retired) before this grace
    // period began. A tasks grace period includes a trace one. One that fails (membarrier
    // refused) is retried: the callbacks run once one succeeds.
    while (!synchronize(tasks ? Flavor::tasks : Flavor::trace).ok()) {
      const timespec pause{0, 1'000'000};
      nanosleep(&pause, nullptr);
    }
    for (;;) {
      pthread_mutex_lock(&c.mu);
      if (c.next_to_run == c.running.size()) {
        c.running.clear();
        c.next_to_run = 0;
        pthread_mutex_unlock(&c.mu);
        break;
      }
      Callbacks::Pending p = std::move(c.running[c.next_to_run++]);
      c.in_progress = true;
      pthread_mutex_unlock(&c.mu);
      p.fn();
      g_callbacks_run.fetch_add(1, std::memory_order_relaxed);
      pthread_mutex_lock(&c.mu);
      c.in_progress = false;
      ++c.done;
      pthread_cond_broadcast(&c.done_cv);
      pthread_mutex_unlock(&c.mu);
    }
  }
  return nullptr;
}

// Starts the callback thread if it is not running (first use, or in a fork()ed child). Under c.mu.
Status start_callback_thread_locked(Callbacks& c) {
  if (c.thread_running) return {};
  // Joinable, on a stack of its own: eject ends it and leaves no stack mapped.
  const int e = c.thread.start(callback_thread, nullptr, nullptr);
  if (e != 0) return Status::error(std::string("starting the grace-period callback thread failed: ") + std::strerror(e), e);
  c.thread_running = true;
  return {};
}

// ---- fork (lock ranks grace_period and grace_leaves, common/lock_order.h) -------------------------
void gp_before_fork() { pthread_mutex_lock(&g_gp_mu); }
void gp_after_fork_in_parent() { pthread_mutex_unlock(&g_gp_mu); }
void gp_after_fork_in_child() {
  g_completed.store(g_started.load());
  // Membarrier registration belongs to the mm: the child's first grace period registers again.
  g_expedited.forget();
  pthread_mutex_unlock(&g_gp_mu);
}

void leaves_before_fork() {
  detail::tasks_before_fork();
  pthread_mutex_lock(&callbacks().mu);
  pthread_mutex_lock(&registry().mu);
}
void leaves_after_fork_in_parent() {
  pthread_mutex_unlock(&registry().mu);
  pthread_mutex_unlock(&callbacks().mu);
  detail::tasks_after_fork_in_parent();
}
void leaves_after_fork_in_child() {
  // Only the forking thread exists: keep its marker, forget the others (their memory is
  // leaked: their threads' exit handlers will never run here). Its liveness mutex is not on
  // the child's robust list (glibc empties it): take it again.
  Registry& r = registry();
  r.markers.clear();
  if (auto* m = static_cast<LiveMarker*>(detail::t_marker)) {
    m->tid = common::current_tid();  // the child's own
    hold_alive(m);
    r.markers.push_back(m);
  }
  detail::g_waiting_futex.store(0, std::memory_order_relaxed);
  // The callback thread is gone; it starts again on demand (call, barrier). Callbacks it had
  // taken but not begun are queued again; the one it was running, if any, is lost (its
  // thread's state is not in the child), and counted as done so that barrier() returns.
  Callbacks& c = callbacks();
  c.thread_running = false;
  c.thread.forget_after_fork();
  for (std::size_t i = c.running.size(); i-- > c.next_to_run;) c.queue.push_front(std::move(c.running[i]));
  if (c.in_progress) ++c.done;
  c.running.clear();
  c.next_to_run = 0;
  c.in_progress = false;
  // Threads of the parent that waited on them are not here: a condition variable that counts
  // them could swallow the child's wake-ups.
  new (&c.queued_cv) pthread_cond_t(PTHREAD_COND_INITIALIZER);
  new (&c.done_cv) pthread_cond_t(PTHREAD_COND_INITIALIZER);
  pthread_mutex_unlock(&r.mu);
  pthread_mutex_unlock(&c.mu);
  detail::tasks_after_fork_in_child();
}

__attribute__((constructor)) void register_grace_fork_hooks() {
  common::register_fork_hook(
      {common::LockRank::grace_period, gp_before_fork, gp_after_fork_in_parent, gp_after_fork_in_child});
  common::register_fork_hook(
      {common::LockRank::grace_leaves, leaves_before_fork, leaves_after_fork_in_parent, leaves_after_fork_in_child});
}

bool g_exit_key_made = false;
void init_once() { g_exit_key_made = pthread_key_create(&g_exit_key, unregister_thread) == 0; }

// Unloaded after an eject: a thread that exits later must not run unregister_thread, which is
// gone. Its marker stays allocated (its robust mutex is on the thread's robust list).
__attribute__((destructor)) void forget_exit_key_at_unload() {
  if (common::ejecting() && g_exit_key_made) pthread_key_delete(g_exit_key);
}

}  // namespace

namespace detail {

std::int64_t stall_threshold_ns() {
  if (const char* env = std::getenv("TRAMWAY_GRACE_STALL_SECONDS")) {
    char* end = nullptr;
    const double s = std::strtod(env, &end);
    if (end != env && s > 0) return static_cast<std::int64_t>(s * 1e9);
  }
  return 10'000'000'000;
}

void count_stall_report() noexcept { g_stall_reports.fetch_add(1, std::memory_order_relaxed); }

std::string describe_pc(std::uintptr_t pc) {
  char buf[256];
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(pc), &info) && info.dli_sname) {
    std::snprintf(buf, sizeof buf, "pc %#lx (%s+%#lx)", static_cast<unsigned long>(pc), info.dli_sname,
                  static_cast<unsigned long>(pc - reinterpret_cast<std::uintptr_t>(info.dli_saddr)));
  } else {
    std::snprintf(buf, sizeof buf, "pc %#lx", static_cast<unsigned long>(pc));
  }
  return buf;
}

std::uint32_t marker_depth(pid_t tid) {
  Registry& r = registry();
  std::uint32_t depth = 0;
  pthread_mutex_lock(&r.mu);
  for (const Marker* m : r.markers) {
    if (m->tid == tid) depth = static_cast<std::uint32_t>(m->value.load(std::memory_order_relaxed) & kNestMask);
  }
  pthread_mutex_unlock(&r.mu);
  return depth;
}

Status trace_grace_period_with(Wait wait, const std::function<void()>& after_flip) {
  pthread_once(&g_exit_key_once, init_once);
  g_synchronize_calls.fetch_add(1, std::memory_order_relaxed);
  pthread_mutex_lock(&g_gp_mu);
  Status s = run_counted_grace_period(wait, &after_flip);
  pthread_mutex_unlock(&g_gp_mu);
  return s;
}

Status grace_periods_usable() { return g_expedited.usable(); }

void inject_grace_period_failures(int count) noexcept { g_injected_failures.store(count); }

std::uint64_t phase_flips() noexcept { return g_flips.load(std::memory_order_seq_cst); }

bool quiet_since(std::uint64_t flips_before) noexcept {
  const Marker* m = t_marker;
  if (!m) return true;
  const std::uint64_t v = m->value.load(std::memory_order_relaxed);
  if ((v & kNestMask) == 0) return true;
  // In a region: quiet if it began after a flip that happened after `flips_before`. The flip
  // count is read first: if it moved, the phase read next is that flip's or a later one's.
  if (g_flips.load(std::memory_order_seq_cst) > flips_before &&
      ((v ^ g_phase_and_one.load(std::memory_order_seq_cst)) & kPhaseBit) == 0) {
    return true;
  }
  // Ask the region's outermost unlock to report. This handler interrupted the thread itself,
  // maybe between a load and a store of its own marker: then the bit is lost and the grace
  // period asks again later, which is only slower.
  t_marker->value.store(v | kReportBit, std::memory_order_relaxed);
  return false;
}

Marker* register_thread() noexcept {
  // Signals stay blocked meanwhile: a handler that ran hooked code on this thread would
  // register it again, inside the registry's lock or its static guard, and deadlock (the
  // tracer's signal test did). Still not async-signal-safe against the thread's own malloc:
  // a thread's first hooked call must not be in a handler that interrupted malloc.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_once(&g_exit_key_once, init_once);
  LiveMarker* m = adopt_left_marker();  // still locked by this thread: it is on its list
  if (m) {
    m->value.store(0, std::memory_order_relaxed);
  } else {
    m = new LiveMarker;
    hold_alive(m);
  }
  m->tid = common::current_tid();
  Registry& r = registry();
  pthread_mutex_lock(&r.mu);
  r.markers.push_back(m);
  pthread_mutex_unlock(&r.mu);
  pthread_setspecific(g_exit_key, m);
  t_marker = m;
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return m;
}

void wake_grace_period() noexcept {
  if (Marker* m = t_marker) {
    const std::uint64_t v = m->value.load(std::memory_order_relaxed);
    if ((v & kReportBit) && (v & kNestMask) == 0) {
      // A tasks grace period sampled us inside a region begun before its flip; now that it
      // has ended, answer at once (the fix-up handler samples this thread again).
      m->value.store(v & ~kReportBit, std::memory_order_relaxed);
      ::syscall(SYS_tgkill, ::getpid(), m->tid, text::fixup_signal());
    }
  }
  int expected = -1;
  if (g_waiting_futex.compare_exchange_strong(expected, 0)) futex(&g_waiting_futex, FUTEX_WAKE_PRIVATE, 1);
}

}  // namespace detail

Status synchronize() { return synchronize(Flavor::trace); }

Status synchronize(Flavor flavor, Wait wait) {
  if (flavor == Flavor::tasks) return detail::synchronize_tasks(wait);
  if (in_read_section()) {
    return Status::error("synchronize() called inside a read-side region: it would wait for itself");
  }
  pthread_once(&g_exit_key_once, init_once);
  g_synchronize_calls.fetch_add(1, std::memory_order_relaxed);
  // Any grace period that starts after this point covers the caller's earlier unpublishing;
  // one already running may not.
  const std::uint64_t target = g_started.load(std::memory_order_seq_cst) + 1;
  pthread_mutex_lock(&g_gp_mu);
  if (g_completed.load(std::memory_order_acquire) >= target) {
    pthread_mutex_unlock(&g_gp_mu);
    return {};  // shared with a concurrent caller
  }
  Status s = run_counted_grace_period(wait, nullptr);
  pthread_mutex_unlock(&g_gp_mu);
  return s;
}

Status call(std::function<void()> fn) { return call(Flavor::trace, std::move(fn)); }

Status call(Flavor flavor, std::function<void()> fn) {
  if (!fn) return Status::error("grace::call needs a callback");
  pthread_once(&g_exit_key_once, init_once);
  Callbacks& c = callbacks();
  pthread_mutex_lock(&c.mu);
  if (Status s = start_callback_thread_locked(c); !s.ok()) {
    pthread_mutex_unlock(&c.mu);
    return s;
  }
  c.queue.push_back({flavor, std::move(fn)});
  ++c.queued;
  pthread_cond_signal(&c.queued_cv);
  pthread_mutex_unlock(&c.mu);
  return {};
}

void detail::stop_callback_thread() {
  Callbacks& c = callbacks();
  pthread_mutex_lock(&c.mu);
  if (!c.thread_running) {
    pthread_mutex_unlock(&c.mu);
    return;
  }
  c.stop = true;
  pthread_cond_broadcast(&c.queued_cv);
  pthread_mutex_unlock(&c.mu);
  c.thread.join();
  pthread_mutex_lock(&c.mu);
  c.thread_running = false;
  c.stop = false;
  pthread_mutex_unlock(&c.mu);
}

Status barrier() {
  if (in_read_section()) {
    return Status::error("barrier() called inside a read-side region: callbacks wait for that region");
  }
  Callbacks& c = callbacks();
  pthread_mutex_lock(&c.mu);
  const std::uint64_t target = c.queued;
  if (c.done < target) {
    if (Status s = start_callback_thread_locked(c); !s.ok()) {  // a fork()ed child's queue
      pthread_mutex_unlock(&c.mu);
      return s;
    }
  }
  while (c.done < target) pthread_cond_wait(&c.done_cv, &c.mu);
  pthread_mutex_unlock(&c.mu);
  return {};
}

std::vector<Holdout> holdouts() {
  std::vector<Holdout> out = detail::tasks_holdouts();
  const std::uint64_t phase = g_waiting_phase.load(std::memory_order_relaxed);
  if (phase != ~std::uint64_t{0}) {
    for (Holdout& h : holdouts_for(phase)) out.push_back(std::move(h));
  }
  return out;
}

Stats stats() noexcept {
  Stats s;
  s.stall_reports = g_stall_reports.load(std::memory_order_relaxed);
  detail::tasks_stats(s);
  s.grace_periods = g_completed.load(std::memory_order_relaxed);
  s.synchronize_calls = g_synchronize_calls.load(std::memory_order_relaxed);
  s.callbacks_run = g_callbacks_run.load(std::memory_order_relaxed);
  Registry& r = registry();
  pthread_mutex_lock(&r.mu);
  s.threads_registered = r.markers.size();
  pthread_mutex_unlock(&r.mu);
  return s;
}

}  // namespace tramway::grace
