// Flavor tasks: a trace grace period, then observation of every thread against the ranges
// retired before the grace period began (Tasks RCU for user threads; DESIGN "Grace-period
// flavors", invariants 3-5).
//
//   take the retired ranges    those retired later wait for the next grace period
//   trace grace period         no thread still holds a marker-protected way into them; right
//                              after its flip, running threads are sent the fix-up signal
//   observe                    every thread of /proc/self/task is seen outside them once:
//                              blocked/stopped through /proc (not disturbed), running ones by
//                              the handler's sample of its own frames
//   recheck holdouts           with backoff; a stall report once past the threshold
// A thread seen outside after the ranges were unpublished, in no read-side region begun
// before the flip, has no way back into them, so one such sighting per thread is enough. A
// sample taken during the trace grace period must show that; one taken after needs not (every
// region begun before the flip has ended by then).
#include <pthread.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "common/format.h"
#include "common/proc.h"
#include "grace/internal.h"
#include "tramway/grace.h"
#include "tramway/text/signal_router.h"

namespace tramway::grace {
namespace {

// Retired ranges waiting for a tasks grace period. Short critical sections only; lock rank
// grace_leaves (common/lock_order.h), like g_held_mu.
pthread_mutex_t g_retired_mu = PTHREAD_MUTEX_INITIALIZER;
std::vector<text::PcRange> g_retired;

// Serialises tasks grace periods; held for a whole one (which may stall), so fork() does not
// take it: a child re-initialises it instead (the grace period's thread is not in the child).
// Outside common/lock_order.h's list; taken before the grace-period lock (a tasks grace period
// includes a trace one) and never under a lock of the list.
pthread_mutex_t g_tasks_mu = PTHREAD_MUTEX_INITIALIZER;
std::atomic<std::uint64_t> g_tasks_started{0}, g_tasks_completed{0};
std::atomic<std::uint64_t> g_signalled{0}, g_observed{0};

struct HeldThread {
  pid_t tid;
  std::uintptr_t pc;  // last PC seen inside; 0: running, asked, no answer yet
};
// The holdouts of the observation in progress, for holdouts().
pthread_mutex_t g_held_mu = PTHREAD_MUTEX_INITIALIZER;
std::vector<HeldThread> g_held;
std::vector<text::PcRange> g_held_ranges;

std::string range_holding(std::uintptr_t pc, const std::vector<text::PcRange>& ranges) {
  for (const text::PcRange& r : ranges) {
    if (pc >= r.begin && pc < r.end) return common::range_text(r.begin, r.end);
  }
  return {};
}

std::vector<Holdout> describe(const std::vector<HeldThread>& held, const std::vector<text::PcRange>& ranges) {
  std::vector<Holdout> out;
  for (const HeldThread& h : held) {
    Holdout o{h.tid, common::thread_name(h.tid), detail::marker_depth(h.tid), {}, {}};
    if (h.pc == 0) {
      o.where = "running (signalled, no answer yet)";
    } else {
      const common::TaskProbe p = common::probe_task(h.tid);
      o.where = detail::describe_pc(h.pc) + (p.running ? ", running" : std::string(", state ") + p.state);
      o.range = range_holding(h.pc, ranges);
    }
    out.push_back(std::move(o));
  }
  return out;
}

void report_stall(const std::vector<HeldThread>& held, const std::vector<text::PcRange>& ranges, std::int64_t waited_ns) {
  detail::count_stall_report();
  std::string text = "tramway: tasks grace period stalled for " + std::to_string(waited_ns / 1'000'000) +
                     " ms waiting for " + std::to_string(held.size()) + " thread(s) inside retired code:\n";
  for (const Holdout& h : describe(held, ranges)) {
    text += "  thread " + std::to_string(h.tid) + " (" + h.name + "), " + h.where;
    if (!h.range.empty()) text += ", in retired range " + h.range;
    if (h.depth) text += ", region depth " + std::to_string(h.depth);
    text += "\n";
  }
  text += "  (still waiting; TRAMWAY_GRACE_STALL_SECONDS sets when this is reported)\n";
  std::fputs(text.c_str(), stderr);
}

void publish_held(std::vector<HeldThread> held, const std::vector<text::PcRange>* ranges) {
  pthread_mutex_lock(&g_held_mu);
  g_held = std::move(held);
  if (ranges) g_held_ranges = *ranges; else g_held_ranges.clear();
  pthread_mutex_unlock(&g_held_mu);
}

// Sleeps between rechecks: yields first (signalled threads need the CPU to answer), then
// naps from 20 us doubling to 1 ms, 10 ms once a grace period has waited a second.
void back_off(int round, long& pause_ns, std::int64_t waited_ns, Wait wait) {
  if (round < 16 || wait == Wait::expedited) {
    sched_yield();
    return;
  }
  const long cap = waited_ns > 1'000'000'000 ? 10'000'000L : 1'000'000L;
  pause_ns = pause_ns ? std::min(pause_ns * 2, cap) : 20'000L;
  const timespec pause{0, pause_ns};
  nanosleep(&pause, nullptr);
}

std::atomic<std::uint64_t> g_flips_at_start{0};
bool thread_quiet() noexcept { return detail::quiet_since(g_flips_at_start.load(std::memory_order_relaxed)); }

// Looks at every thread until each was seen outside; rechecks holdouts with backoff.
void observe(text::RangeWatch& w, std::vector<pid_t> pending, std::int64_t start_ns, Wait wait) {
  const std::size_t threads = pending.size();
  bool reported = false;
  long pause_ns = 0;
  std::vector<HeldThread> held;
  for (int round = 0;; ++round) {
    held.clear();
    std::erase_if(pending, [&](pid_t tid) {
      const text::RangeWatch::Look look = w.look(tid);
      if (look.verdict == text::RangeWatch::Verdict::outside) return true;
      held.push_back({tid, look.pc});
      return false;
    });
    if (pending.empty()) break;
    const std::int64_t waited = common::monotonic_ns() - start_ns;
    if (round >= 16) publish_held(held, &w.ranges());
    if (!reported && waited >= detail::stall_threshold_ns()) {
      reported = true;  // once per grace period
      report_stall(held, w.ranges(), waited);
    }
    back_off(round, pause_ns, waited, wait);
  }
  publish_held({}, nullptr);
  const auto signalled = static_cast<std::size_t>(w.threads_signalled());
  g_signalled.fetch_add(signalled, std::memory_order_relaxed);
  g_observed.fetch_add(threads - std::min(threads, signalled), std::memory_order_relaxed);
}

std::vector<text::PcRange> take_retired() {
  pthread_mutex_lock(&g_retired_mu);
  // Copied out, so that the list keeps its capacity: retire() then never reallocates under its
  // lock (a doubling series of copies, once per copy of a 10,000-function detach), and this
  // allocates once a grace period.
  std::vector<text::PcRange> out(g_retired.begin(), g_retired.end());
  g_retired.clear();
  pthread_mutex_unlock(&g_retired_mu);
  return out;
}

void give_back(std::vector<text::PcRange> ranges) {
  pthread_mutex_lock(&g_retired_mu);
  g_retired.insert(g_retired.end(), ranges.begin(), ranges.end());
  pthread_mutex_unlock(&g_retired_mu);
}

// Running threads are asked right after the trace grace period's flip, so that their answers
// come in while it waits: an answer counts if the thread was outside the ranges and quiet
// (no region, or one begun after the flip). The rest are looked at again once it is over.
Status run_tasks_grace_period(Wait wait) {
  const std::int64_t start = common::monotonic_ns();
  std::vector<text::PcRange> ranges = take_retired();
  if (ranges.empty()) return synchronize(Flavor::trace, wait);
  g_flips_at_start.store(detail::phase_flips(), std::memory_order_relaxed);
  auto watch = text::RangeWatch::start(ranges, thread_quiet);
  if (!watch.ok()) {
    give_back(std::move(ranges));
    return watch.status();
  }
  text::RangeWatch& w = **watch;
  std::vector<pid_t> threads = common::list_threads();
  std::erase(threads, common::current_tid());
  const std::function<void()> ask_running = [&] {
    for (pid_t tid : threads) w.ask_if_running(tid);
  };
  if (Status s = detail::trace_grace_period_with(wait, ask_running); !s.ok()) {
    give_back(std::move(ranges));
    return s;
  }
  w.next_stage();
  observe(w, std::move(threads), start, wait);
  return {};
}

}  // namespace

namespace detail {

Status synchronize_tasks(Wait wait) {
  if (in_read_section()) {
    return Status::error("synchronize(Flavor::tasks) called inside a read-side region: it would wait for itself");
  }
  // As for trace: a grace period that starts after this point covers the caller's retired
  // ranges; one already running may not.
  const std::uint64_t target = g_tasks_started.load(std::memory_order_seq_cst) + 1;
  pthread_mutex_lock(&g_tasks_mu);
  if (g_tasks_completed.load(std::memory_order_acquire) >= target) {
    pthread_mutex_unlock(&g_tasks_mu);
    return {};
  }
  const std::uint64_t mine = g_tasks_started.fetch_add(1, std::memory_order_seq_cst) + 1;
  Status s = run_tasks_grace_period(wait);
  if (s.ok()) {
    g_tasks_completed.store(mine, std::memory_order_release);
  } else {
    g_tasks_started.fetch_sub(1, std::memory_order_relaxed);
  }
  pthread_mutex_unlock(&g_tasks_mu);
  return s;
}

std::vector<Holdout> tasks_holdouts() {
  pthread_mutex_lock(&g_held_mu);
  const std::vector<HeldThread> held = g_held;
  const std::vector<text::PcRange> ranges = g_held_ranges;
  pthread_mutex_unlock(&g_held_mu);
  return describe(held, ranges);
}

void tasks_stats(Stats& s) noexcept {
  s.tasks_grace_periods = g_tasks_completed.load(std::memory_order_relaxed);
  s.threads_signalled = g_signalled.load(std::memory_order_relaxed);
  s.threads_observed = g_observed.load(std::memory_order_relaxed);
}

void tasks_before_fork() {
  pthread_mutex_lock(&g_retired_mu);
  pthread_mutex_lock(&g_held_mu);
}
void tasks_after_fork_in_parent() {
  pthread_mutex_unlock(&g_held_mu);
  pthread_mutex_unlock(&g_retired_mu);
}
void tasks_after_fork_in_child() {
  // A tasks grace period in progress belonged to a thread that is not in the child: its
  // lock is re-initialised (never unlocked by a thread that does not exist) and its ranges
  // are forgotten (whoever would reuse them is not in the child either).
  new (&g_tasks_mu) pthread_mutex_t(PTHREAD_MUTEX_INITIALIZER);
  g_tasks_completed.store(g_tasks_started.load(std::memory_order_relaxed), std::memory_order_relaxed);
  g_held.clear();
  g_held_ranges.clear();
  pthread_mutex_unlock(&g_held_mu);
  pthread_mutex_unlock(&g_retired_mu);
}

}  // namespace detail

Status retire(const void* begin, const void* end) {
  const auto b = reinterpret_cast<std::uintptr_t>(begin), e = reinterpret_cast<std::uintptr_t>(end);
  if (b >= e) {
    return Status::error("grace::retire: empty range [" + common::hex_address(b) + ", " + common::hex_address(e) + ")");
  }
  pthread_mutex_lock(&g_retired_mu);
  g_retired.push_back({b, e});
  pthread_mutex_unlock(&g_retired_mu);
  return {};
}

}  // namespace tramway::grace
