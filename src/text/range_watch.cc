// RangeWatch: observing threads against retired code ranges (the tasks grace period).
//
// The watched ranges are published for the fix-up handler as one immutable WatchSet. Every
// fix-up handler run (whoever sent the signal: a watch or move_pcs) samples its thread against
// the published set into its slot: the set's epoch, a PC found inside (0: none), then a bumped
// sample count. look() reads that answer once the count moved past its value when the thread
// was signalled. A set is freed only when no handler can be reading it (the trap table's
// scheme in patch.cc): handlers count themselves in g_watch_readers around their read.
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "arch/x86_64/emulate.h"
#include "common/proc.h"
#include "text/internal.h"
#include "text/thread_slots.h"

namespace tramway::text {
namespace {

struct WatchSet {
  std::uint64_t epoch;
  std::vector<PcRange> ranges;
};

std::atomic<const WatchSet*> g_watch{nullptr};
std::atomic<std::uint32_t> g_watch_stage{0};
std::atomic<RangeWatch::QuiescenceProbe> g_quiet_probe{nullptr};
std::atomic<int> g_watch_readers{0};
std::atomic<bool> g_watch_active{false};
std::uint64_t g_next_epoch = 0;               // touched only by the active watch's owner
std::vector<const WatchSet*> g_retired_sets;  // likewise

void free_retired_sets() {
  if (g_watch_readers.load(std::memory_order_seq_cst) != 0) return;
  for (const WatchSet* w : g_retired_sets) delete w;
  g_retired_sets.clear();
}

std::vector<PcRange> sorted_and_merged(std::vector<PcRange> r) {
  std::erase_if(r, [](const PcRange& x) { return x.begin >= x.end; });
  std::sort(r.begin(), r.end(), [](const PcRange& a, const PcRange& b) { return a.begin < b.begin; });
  std::vector<PcRange> out;
  for (const PcRange& x : r) {
    if (!out.empty() && x.begin <= out.back().end) {
      out.back().end = std::max(out.back().end, x.end);
    } else {
      out.push_back(x);
    }
  }
  return out;
}

}  // namespace

namespace detail {

// Called by the fix-up handler after it recorded its own frame (so frames[] holds the live
// PC too, unless nesting overflowed).
void sample_for_watch(ThreadSlot* s, const ucontext_t* uc) noexcept {
  g_watch_readers.fetch_add(1, std::memory_order_seq_cst);
  const WatchSet* w = g_watch.load(std::memory_order_seq_cst);
  if (w && s) {
    const std::span<const PcRange> ranges(w->ranges);
    std::uintptr_t hit = 0;
    const std::uintptr_t live = arch::context_pc(uc);
    if (in_ranges(live, ranges) || s->overflow.load(std::memory_order_relaxed)) hit = live ? live : 1;
    const std::uint32_t depth = s->depth.load(std::memory_order_relaxed);
    for (std::uint32_t i = 0; i < depth && i < kMaxNest && !hit; ++i) {
      const std::uintptr_t f = s->frames[i].load(std::memory_order_relaxed);
      if (!own_frame_live(s, i, f)) continue;
      // A trap frame: executing the instruction at the int3, or already sent on by its
      // emulation (a trap probe sends it into a copy): both count.
      const std::uintptr_t pc = arch::context_pc(frame_context(f));
      if (in_ranges(pc, ranges)) hit = pc;
      else if ((f & kTrapFrameTag) && in_ranges(pc - 1, ranges)) hit = pc - 1;
    }
    const RangeWatch::QuiescenceProbe quiet = g_quiet_probe.load(std::memory_order_relaxed);
    s->watch_pc.store(hit, std::memory_order_relaxed);
    s->watch_stage.store(g_watch_stage.load(std::memory_order_seq_cst), std::memory_order_relaxed);
    s->watch_quiet.store(quiet && quiet(), std::memory_order_relaxed);
    s->watch_epoch.store(w->epoch, std::memory_order_relaxed);
    s->watch_samples.fetch_add(1, std::memory_order_release);
  }
  g_watch_readers.fetch_sub(1, std::memory_order_seq_cst);
}

void watch_after_fork_in_child() noexcept {
  // The watch's owner did not survive: nothing is watched in the child. Its sets are leaked.
  g_watch.store(nullptr, std::memory_order_relaxed);
  g_watch_readers.store(0, std::memory_order_relaxed);
  g_retired_sets.clear();
  g_watch_active.store(false, std::memory_order_relaxed);
}

}  // namespace detail

Result<std::unique_ptr<RangeWatch>> RangeWatch::start(std::vector<PcRange> ranges, QuiescenceProbe quiet) {
  if (Status s = detail::ensure_router(); !s.ok()) return s;
  bool expected = false;
  if (!g_watch_active.compare_exchange_strong(expected, true, std::memory_order_acq_rel)) {
    return Status::error("RangeWatch: another watch is active (one at a time per process)");
  }
  free_retired_sets();
  const std::uint64_t epoch = ++g_next_epoch;
  auto* set = new WatchSet{epoch, sorted_and_merged(std::move(ranges))};
  g_quiet_probe.store(quiet, std::memory_order_relaxed);
  g_watch_stage.store(0, std::memory_order_relaxed);
  g_watch.store(set, std::memory_order_seq_cst);
  return std::unique_ptr<RangeWatch>(new RangeWatch(set->ranges, epoch));
}

RangeWatch::RangeWatch(std::vector<PcRange> ranges, std::uint64_t epoch) : ranges_(std::move(ranges)), epoch_(epoch) {}

RangeWatch::~RangeWatch() {
  const WatchSet* set = g_watch.exchange(nullptr, std::memory_order_seq_cst);
  if (set) g_retired_sets.push_back(set);
  free_retired_sets();
  g_watch_active.store(false, std::memory_order_release);
}

RangeWatch::Look RangeWatch::look(pid_t tid) {
  Asked& a = asked_[tid];
  detail::ThreadSlot* s = detail::find_slot(tid);
  if (a.outstanding && s && s->watch_samples.load(std::memory_order_acquire) != a.samples_at_ask &&
      s->watch_epoch.load(std::memory_order_relaxed) == epoch_) {
    a.outstanding = false;  // answered; anything but a final `outside` is asked again
    const std::uintptr_t pc = s->watch_pc.load(std::memory_order_relaxed);
    if (pc != 0) {
      a.last_inside = pc;
      return {Verdict::inside, pc};
    }
    if (s->watch_stage.load(std::memory_order_relaxed) == stage_ || s->watch_quiet.load(std::memory_order_relaxed)) {
      return {Verdict::outside};
    }
    // Outside, but sampled in an earlier stage while not quiet: look again.
  }
  const detail::OutsideProof proof = detail::prove_outside(tid, ranges_, detail::TrapFrames::at_site);
  if (proof.proven) return {Verdict::outside};
  if (!proof.running && proof.inside != 0) {
    a.last_inside = proof.inside;
    return {Verdict::inside, proof.inside};
  }
  if (a.outstanding) return {Verdict::asked, a.last_inside};
  // Running (or changing while we looked): ask it.
  return ask(tid, a);
}

void RangeWatch::ask_if_running(pid_t tid) {
  Asked& a = asked_[tid];
  if (!a.outstanding && common::probe_task(tid, common::Probe::pc_only).running) ask(tid, a);
}

// A thread without a slot claims one in the handler with a zero count, so its first sample
// moves the count past 0.
RangeWatch::Look RangeWatch::ask(pid_t tid, Asked& a) {
  const detail::ThreadSlot* s = detail::find_slot(tid);
  a.samples_at_ask = s ? s->watch_samples.load(std::memory_order_acquire) : 0;
  if (::syscall(SYS_tgkill, ::getpid(), tid, fixup_signal()) != 0) {
    if (errno == ESRCH) return {Verdict::outside};  // exited
    return {Verdict::asked, a.last_inside};         // EAGAIN (signal queue full): ask later
  }
  a.outstanding = true;
  if (!a.ever_signalled) ++threads_signalled_;
  a.ever_signalled = true;
  return {Verdict::asked, a.last_inside};
}

void RangeWatch::next_stage() {
  stage_ = g_watch_stage.fetch_add(1, std::memory_order_seq_cst) + 1;
}

}  // namespace tramway::text
