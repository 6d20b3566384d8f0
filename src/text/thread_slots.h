// Per-thread records of interrupted contexts: the signal router's nested frames, read by
// move_pcs (to move PCs), RangeWatch (to observe them) and the fix-up handler. Internal.
//
// Each thread that runs one of the router's handlers claims a slot of a process-wide array
// (lock-free, once). A handler pushes the ucontext of the frame it was delivered on, with the
// stack pointer saved in it. When it returns it blocks every signal and marks its frame
// exiting instead of popping it: until sigreturn the frame is live (a stopped thread may be
// looked at there), and no handler can run on the thread before sigreturn restores its mask.
// So a handler that finds an exiting frame on its own thread knows it is dead. Frames left by
// a handler that jumped out (siglongjmp) die once the thread's stack pointer is back above
// them; a frame whose saved stack pointer changed has been overwritten. Dead frames are pruned
// from the top by the thread itself. Everything here a handler calls is async-signal-safe.
#pragma once

#include <signal.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <span>

#include "tramway/text/signal_router.h"

namespace tramway::text::detail {

inline constexpr int kMaxNest = 32;
inline constexpr int kMaxSlots = 4096;
inline constexpr std::uintptr_t kTrapFrameTag = 1;  // a frame's bit 0: pushed by the SIGTRAP router
inline constexpr std::uintptr_t kExitingTag = 2;    // bit 1: its handler has returned (see above)
inline constexpr std::uintptr_t kFrameTags = kTrapFrameTag | kExitingTag;
inline constexpr std::uint64_t kTidMask = 0xffff'ffffu;

struct ThreadSlot {
  // (claim number << 32 | tid), 0 when free. The claim number makes a reclaimer's
  // compare-and-swap fail when the slot was freed and claimed again (by a thread that reused
  // the tid) between its liveness check and the swap.
  std::atomic<std::uint64_t> owner{0};
  std::atomic<std::uint32_t> seq{0};    // changes on every push (and untrap)
  std::atomic<std::uint32_t> depth{0};  // frames[0, depth) may be live, outermost first
  std::atomic<bool> overflow{false};    // frames deeper than kMaxNest are live but unrecorded
  std::atomic<std::uint64_t> acked{0};  // last fix-up generation this thread answered
  std::atomic<std::uintptr_t> frames[kMaxNest] = {};    // ucontext_t* | tags
  std::atomic<std::uintptr_t> frame_sp[kMaxNest] = {};  // the stack pointer saved in each
  // The last RangeWatch sample (range_watch.cc): its watch's epoch and stage, a PC found in a
  // watched range (0: none), the watch's quiescence probe's answer, and a count bumped after
  // each sample is written.
  std::atomic<std::uint64_t> watch_epoch{0};
  std::atomic<std::uint32_t> watch_stage{0};
  std::atomic<bool> watch_quiet{false};
  std::atomic<std::uintptr_t> watch_pc{0};
  std::atomic<std::uint32_t> watch_samples{0};
  // Where the program's own handler was last entered on a system call's EINTR return (pc,
  // sp): that EINTR is the program's, and eintr_undo.cc must not take it back.
  std::atomic<std::uintptr_t> program_eintr_pc{0};
  std::atomic<std::uintptr_t> program_eintr_sp{0};

  pid_t tid() const noexcept { return static_cast<pid_t>(owner.load(std::memory_order_acquire) & kTidMask); }
};

extern ThreadSlot g_slots[kMaxSlots];
extern std::atomic<bool> g_slots_exhausted;
extern __thread ThreadSlot* t_slot __attribute__((tls_model("initial-exec")));

inline long raw_sigprocmask(int how, const sigset_t* set, sigset_t* old) noexcept {
  return ::syscall(SYS_rt_sigprocmask, how, set, old, _NSIG / 8);
}

ThreadSlot* find_slot(pid_t tid) noexcept;
// Frees the slots of threads that no longer exist, except `me`'s.
void reclaim_dead_slots(pid_t me) noexcept;
// The calling thread's slot, claimed on first use; nullptr when all are taken by live threads.
ThreadSlot* self_slot() noexcept;
// Forgets every slot but the calling thread's (fork child).
void slots_after_fork_in_child() noexcept;

inline ucontext_t* frame_context(std::uintptr_t f) noexcept { return reinterpret_cast<ucontext_t*>(f & ~kFrameTags); }

// For the thread itself (in a handler, or outside any): frames[i] = f is live, as far as the
// record can tell, when it is not exiting and still holds the stack pointer saved at push.
bool own_frame_live(const ThreadSlot* s, std::uint32_t i, std::uintptr_t f) noexcept;

// Drops dead frames from the top and returns the depth left. `alt` is the thread's alternate
// signal stack (a handler has it in its frame's uc_stack); nullptr asks the kernel.
std::uint32_t prune_dead_frames(ThreadSlot* s, std::uintptr_t sp, const stack_t* alt = nullptr) noexcept;
std::uintptr_t current_sp() noexcept;

// Records the frame of the handler being entered. The kernel blocked the fix-up signal when
// it delivered this one (it is in every sa_mask the router registers), so no fix-up can run
// before the frame is recorded; the handler unblocks it after. The destructor blocks every
// signal (sigreturn restores the mask) and marks the frame exiting.
class FrameGuard {
 public:
  FrameGuard(ucontext_t* uc, bool trap) noexcept;
  ~FrameGuard();
  FrameGuard(const FrameGuard&) = delete;
  FrameGuard& operator=(const FrameGuard&) = delete;
  ThreadSlot* slot() const noexcept { return slot_; }
  // The trap frame's int3 was not ours: from now on it is a plain frame. Signals are still
  // blocked (the trap handler's mask), so no handler of this thread reads it meanwhile.
  void untrap() noexcept;

 private:
  ThreadSlot* slot_;
  int index_ = -1;  // where the frame was recorded; -1: not recorded (no slot, or overflow)
};

// True when `pc` lies in one of `ranges` (sorted by begin, disjoint).
bool in_ranges(std::uintptr_t pc, std::span<const PcRange> ranges) noexcept;

// How frames pushed by the SIGTRAP router count: `skip` for move_pcs (their PC belongs to an
// int3 about to be emulated from that very PC), `at_site` for observation (the thread is
// executing the instruction at the int3).
enum class TrapFrames { skip, at_site };

// What /proc and a thread's slot tell about it, without disturbing it.
struct OutsideProof {
  bool proven = false;        // gone, or blocked/stopped with every PC outside, nothing changed while looked at
  bool running = false;       // running or runnable: its live PC cannot be read
  std::uintptr_t inside = 0;  // a PC found inside a range (live or nested), 0 if none
};
OutsideProof prove_outside(pid_t tid, std::span<const PcRange> ranges, TrapFrames trap_frames);

}  // namespace tramway::text::detail
