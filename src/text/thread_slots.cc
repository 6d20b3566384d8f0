// Per-thread frame records (see thread_slots.h).
#include "text/thread_slots.h"

#include <sys/uio.h>

#include <algorithm>
#include <cerrno>

#include "arch/x86_64/emulate.h"
#include "common/eject.h"
#include "text/all_blocked.h"
#include "common/proc.h"

namespace tramway::text::detail {

ThreadSlot g_slots[kMaxSlots];
std::atomic<bool> g_slots_exhausted{false};
__thread ThreadSlot* t_slot __attribute__((tls_model("initial-exec")));

namespace {

std::atomic<std::uint32_t> g_claims{0};

std::uint64_t owner_word(pid_t tid) noexcept {
  return (std::uint64_t{g_claims.fetch_add(1, std::memory_order_relaxed) + 1} << 32) | static_cast<std::uint32_t>(tid);
}

ThreadSlot* claim_slot() noexcept {
  const pid_t me = common::current_tid();
  // A slot still carrying our tid belongs to a dead thread whose tid was reused.
  for (ThreadSlot& s : g_slots) {
    std::uint64_t o = s.owner.load(std::memory_order_relaxed);
    if (o != 0 && static_cast<pid_t>(o & kTidMask) == me) s.owner.compare_exchange_strong(o, 0);
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    for (ThreadSlot& s : g_slots) {
      std::uint64_t expected = 0;
      if (s.owner.load(std::memory_order_relaxed) == 0 &&
          s.owner.compare_exchange_strong(expected, owner_word(me), std::memory_order_acq_rel)) {
        s.depth.store(0, std::memory_order_relaxed);
        s.overflow.store(false, std::memory_order_relaxed);
        s.acked.store(0, std::memory_order_relaxed);  // a previous owner's answers are not ours
        s.watch_epoch.store(0, std::memory_order_relaxed);
        s.watch_stage.store(0, std::memory_order_relaxed);
        s.watch_quiet.store(false, std::memory_order_relaxed);
        s.watch_pc.store(0, std::memory_order_relaxed);
        s.watch_samples.store(0, std::memory_order_relaxed);
        s.seq.fetch_add(1, std::memory_order_release);
        t_slot = &s;
        return &s;
      }
    }
    reclaim_dead_slots(me);  // full: free the slots of threads that have exited, once
  }
  g_slots_exhausted.store(true, std::memory_order_relaxed);
  return nullptr;
}

// A frame is dead once the thread's stack pointer is back above it on the same stack, or it
// lies on the alternate signal stack and the thread no longer runs there.
bool frame_is_dead(std::uintptr_t frame, std::uintptr_t sp, const stack_t& alt, bool have_alt) noexcept {
  auto on_alt = [&](std::uintptr_t p) {
    const auto b = reinterpret_cast<std::uintptr_t>(alt.ss_sp);
    return have_alt && p >= b && p < b + alt.ss_size;
  };
  const bool f_alt = on_alt(frame), sp_alt = on_alt(sp);
  return (f_alt && !sp_alt) || (f_alt == sp_alt && sp > frame);
}

// Reads words of this process without faulting if they have been unmapped meanwhile.
bool read_words(std::uintptr_t address, std::uintptr_t* out, std::size_t n) {
  const auto bytes = static_cast<ssize_t>(n * sizeof *out);
  iovec local{out, static_cast<std::size_t>(bytes)};
  iovec remote{reinterpret_cast<void*>(address), static_cast<std::size_t>(bytes)};
  return ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) == bytes;
}

}  // namespace

ThreadSlot* find_slot(pid_t tid) noexcept {
  for (ThreadSlot& s : g_slots)
    if (s.tid() == tid) return &s;
  return nullptr;
}

void reclaim_dead_slots(pid_t me) noexcept {
  const int saved_errno = errno;
  const pid_t pid = static_cast<pid_t>(::syscall(SYS_getpid));
  for (ThreadSlot& s : g_slots) {
    std::uint64_t o = s.owner.load(std::memory_order_acquire);
    const auto t = static_cast<pid_t>(o & kTidMask);
    if (t != 0 && t != me && ::syscall(SYS_tgkill, pid, t, 0) != 0 && errno == ESRCH) {
      s.owner.compare_exchange_strong(o, 0, std::memory_order_acq_rel);  // the next claimer resets the rest
    }
  }
  errno = saved_errno;
}

// The claim runs with every signal blocked: a handler nesting into it (SIGTRAP's handler is
// SA_NODEFER, the fix-up handler lets the program's signals in) would claim a second slot,
// and the thread would answer fix-ups in one slot while move_pcs looks in the other.
ThreadSlot* self_slot() noexcept {
  if (ThreadSlot* s = t_slot) return s;
  AllSignalsBlocked blocked;
  return t_slot ? t_slot : claim_slot();  // a handler that ran before the block may have claimed
}

void slots_after_fork_in_child() noexcept {
  ThreadSlot* mine = t_slot;
  for (ThreadSlot& s : g_slots) {
    if (&s == mine) continue;
    s.depth.store(0, std::memory_order_relaxed);
    s.owner.store(0, std::memory_order_relaxed);
  }
  if (mine) mine->owner.store(owner_word(common::current_tid()), std::memory_order_release);
}

std::uint32_t prune_dead_frames(ThreadSlot* s, std::uintptr_t sp, const stack_t* alt_in) noexcept {
  std::uint32_t d = s->depth.load(std::memory_order_relaxed);
  if (d == 0) return 0;
  stack_t alt{};
  if (alt_in) {
    alt = *alt_in;
  } else if (::syscall(SYS_sigaltstack, nullptr, &alt) != 0) {
    alt.ss_flags = SS_DISABLE;
  }
  const bool have_alt = !(alt.ss_flags & SS_DISABLE) && alt.ss_size != 0;
  while (d > 0) {
    const std::uintptr_t f = s->frames[d - 1].load(std::memory_order_relaxed);
    if (!frame_is_dead(f & ~kFrameTags, sp, alt, have_alt) && own_frame_live(s, d - 1, f)) break;
    --d;
  }
  // Unrecorded frames lie deeper than frames[kMaxNest - 1]: if that one is dead, so are they.
  if (d < kMaxNest) s->overflow.store(false, std::memory_order_relaxed);
  s->depth.store(d, std::memory_order_release);
  return d;
}

std::uintptr_t current_sp() noexcept { return reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0)); }

// Handlers of the router (wrapper, trap, fix-up) running now: eject waits for none (common/eject.h).
std::atomic<int> g_handlers_in_flight{0};
int handlers_in_flight() noexcept { return g_handlers_in_flight.load(std::memory_order_acquire); }

FrameGuard::FrameGuard(ucontext_t* uc, bool trap) noexcept : slot_(self_slot()) {
  g_handlers_in_flight.fetch_add(1, std::memory_order_acq_rel);
  if (!slot_) return;
  const std::uint32_t d = prune_dead_frames(slot_, arch::context_sp(uc), &uc->uc_stack);
  if (d >= kMaxNest) {
    slot_->overflow.store(true, std::memory_order_relaxed);
    return;
  }
  slot_->frames[d].store(reinterpret_cast<std::uintptr_t>(uc) | (trap ? kTrapFrameTag : 0), std::memory_order_relaxed);
  slot_->frame_sp[d].store(arch::context_sp(uc), std::memory_order_relaxed);
  slot_->seq.fetch_add(1, std::memory_order_acq_rel);
  slot_->depth.store(d + 1, std::memory_order_release);
  index_ = static_cast<int>(d);
}

void FrameGuard::untrap() noexcept {
  if (index_ < 0) return;
  const auto i = static_cast<std::uint32_t>(index_);
  slot_->frames[i].store(slot_->frames[i].load(std::memory_order_relaxed) & ~kTrapFrameTag, std::memory_order_relaxed);
  slot_->seq.fetch_add(1, std::memory_order_acq_rel);  // an observer reading the frames meanwhile looks again
}

FrameGuard::~FrameGuard() {
  struct Leave {
    ~Leave() { g_handlers_in_flight.fetch_sub(1, std::memory_order_acq_rel); }
  } leave;  // last: eject waits for this count to be 0
  if (index_ < 0) return;
  sigset_t all;
  sigfillset(&all);
  raw_sigprocmask(SIG_BLOCK, &all, nullptr);  // until sigreturn, which restores the mask
  const auto i = static_cast<std::uint32_t>(index_);
  // Frames above ours belong to handlers that jumped out into ours: gone.
  slot_->depth.store(i + 1, std::memory_order_release);
  slot_->frames[i].store(slot_->frames[i].load(std::memory_order_relaxed) | kExitingTag, std::memory_order_release);
}

bool own_frame_live(const ThreadSlot* s, std::uint32_t i, std::uintptr_t f) noexcept {
  return !(f & kExitingTag) && arch::context_sp(frame_context(f)) == s->frame_sp[i].load(std::memory_order_relaxed);
}

bool in_ranges(std::uintptr_t pc, std::span<const PcRange> ranges) noexcept {
  // The last range that begins at or before pc.
  std::size_t lo = 0, hi = ranges.size();
  while (lo < hi) {
    const std::size_t mid = lo + (hi - lo) / 2;
    if (ranges[mid].begin <= pc) lo = mid + 1; else hi = mid;
  }
  return lo > 0 && pc < ranges[lo - 1].end;
}

OutsideProof prove_outside(pid_t tid, std::span<const PcRange> ranges, TrapFrames trap_frames) {
  OutsideProof out;
  const common::TaskProbe before = common::probe_task(tid, common::Probe::pc_only);
  if (before.gone) {
    out.proven = true;
    return out;
  }
  if (before.running) {
    out.running = true;
    return out;
  }
  if (in_ranges(before.pc, ranges)) {
    out.inside = before.pc;
    return out;
  }
  ThreadSlot* s = find_slot(tid);
  if (!s) {
    out.proven = !g_slots_exhausted.load(std::memory_order_relaxed);  // it never ran a handler
    return out;
  }
  if (s->overflow.load(std::memory_order_relaxed)) return out;
  const std::uint32_t seq = s->seq.load(std::memory_order_acquire);
  const std::uint32_t depth = s->depth.load(std::memory_order_acquire);
  for (std::uint32_t i = 0; i < depth && i < kMaxNest; ++i) {
    const std::uintptr_t f = s->frames[i].load(std::memory_order_relaxed);
    const bool trap = f & kTrapFrameTag;
    if (trap && trap_frames == TrapFrames::skip) continue;
    // REG_RSP and REG_RIP are adjacent: one read gives both.
    static_assert(REG_RIP == REG_RSP + 1);
    std::uintptr_t sp_pc[2];
    if (!read_words(reinterpret_cast<std::uintptr_t>(&frame_context(f)->uc_mcontext.gregs[REG_RSP]), sp_pc, 2)) return out;
    if (sp_pc[0] != s->frame_sp[i].load(std::memory_order_relaxed)) {
      if (f & kExitingTag) continue;  // returned through sigreturn, and overwritten since: dead
      return out;                      // a live frame changed under us (or a handler rewrote it)
    }
    // A trap frame's PC is behind the int3 being emulated, or already where the emulation
    // (or a trap probe) sends it: both count.
    const std::uintptr_t pc = sp_pc[1];
    if (in_ranges(pc, ranges) || (trap && in_ranges(pc - 1, ranges))) {
      out.inside = trap && !in_ranges(pc, ranges) ? pc - 1 : pc;
      return out;
    }
  }
  if (s->seq.load(std::memory_order_acquire) != seq || s->tid() != tid) return out;
  const common::TaskProbe after = common::probe_task(tid, common::Probe::pc_only);
  out.proven = after.gone || (!after.running && after.pc == before.pc && after.sp == before.sp);
  out.running = !after.gone && after.running;
  return out;
}

}  // namespace tramway::text::detail
