// The signal router (DESIGN invariants 2 and 4).
//
// Every handler the program installs runs behind `wrapper`, which pushes the interrupted
// context onto the thread's frame record (frames die when the stack unwinds past them, see
// frame_is_dead). The record lives in a
// process-wide slot array (claimed lock-free on a thread's first signal), so that
//  * the fix-up handler can move the PC of every nested frame of its own thread, and
//  * move_pcs() can prove a blocked thread outside a range without signalling it, by reading
//    its live PC from /proc and its nested PCs from its record.
// Everything that runs in signal context here is async-signal-safe: atomics, initial-exec
// TLS and raw system calls only.
#include "tramway/text/signal_router.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "arch/x86_64/emulate.h"
#include "common/format.h"
#include "common/proc.h"
#include "text/internal.h"

extern "C" int __sigaction(int, const struct sigaction*, struct sigaction*) noexcept;

namespace tramway::text {
namespace {

constexpr int kMaxNest = 32;
constexpr int kMaxSlots = 4096;
constexpr std::uintptr_t kTrapFrameTag = 1;  // low bit of a frame: pushed by the SIGTRAP router
// glibc's internal signals (SIGCANCEL, SIGSETXID): never touched, as glibc itself does.
constexpr int kGlibcInternalFirst = 32, kGlibcInternalLast = 33;

// ---- per-thread frame records --------------------------------------------------------------
// A slot's owner word is (claim number << 32 | tid), 0 when free. The claim number makes a
// reclaimer's compare-and-swap fail when the slot was freed and claimed again (by a thread that
// reused the tid) between its liveness check and the swap.
constexpr std::uint64_t kTidMask = 0xffff'ffffu;
std::atomic<std::uint32_t> g_claims{0};

struct ThreadSlot {
  std::atomic<std::uint64_t> owner{0};
  std::atomic<std::uint32_t> seq{0};    // changes on every push and pop
  std::atomic<std::uint32_t> depth{0};  // frames[0, depth) are live, outermost first
  std::atomic<bool> overflow{false};    // nesting deeper than kMaxNest was seen
  std::atomic<std::uint64_t> acked{0};  // last fix-up generation this thread answered
  std::atomic<std::uintptr_t> frames[kMaxNest] = {};  // ucontext_t* | kTrapFrameTag

  pid_t tid() const noexcept { return static_cast<pid_t>(owner.load(std::memory_order_acquire) & kTidMask); }
};
ThreadSlot g_slots[kMaxSlots];
std::atomic<bool> g_slots_exhausted{false};
__thread ThreadSlot* t_slot __attribute__((tls_model("initial-exec")));

std::uint64_t owner_word(pid_t tid) noexcept {
  return (std::uint64_t{g_claims.fetch_add(1, std::memory_order_relaxed) + 1} << 32) | static_cast<std::uint32_t>(tid);
}

long raw_sigprocmask(int how, const sigset_t* set, sigset_t* old) noexcept {
  return ::syscall(SYS_rt_sigprocmask, how, set, old, _NSIG / 8);
}

ThreadSlot* find_slot(pid_t tid) noexcept {
  for (ThreadSlot& s : g_slots)
    if (s.tid() == tid) return &s;
  return nullptr;
}

// Frees the slots of threads that no longer exist. Async-signal-safe (tgkill with signal 0).
void reclaim_dead_slots(pid_t me) noexcept {
  const int saved_errno = errno;
  const pid_t pid = static_cast<pid_t>(::syscall(SYS_getpid));
  for (ThreadSlot& s : g_slots) {
    std::uint64_t o = s.owner.load(std::memory_order_acquire);
    const auto t = static_cast<pid_t>(o & kTidMask);
    if (t != 0 && t != me && ::syscall(SYS_tgkill, pid, t, 0) != 0 && errno == ESRCH) {
      s.owner.compare_exchange_strong(o, 0, std::memory_order_acq_rel);  // the claimer resets the rest
    }
  }
  errno = saved_errno;
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
        s.acked.store(0, std::memory_order_relaxed);  // a previous owner's answer is not ours
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

// The claim runs with every signal blocked: a handler nesting into it (SIGTRAP's handler is
// SA_NODEFER, the fix-up handler lets the program's signals in) would claim a second slot,
// and the thread would answer fix-ups in one slot while move_pcs looks in the other.
ThreadSlot* self_slot() noexcept {
  if (ThreadSlot* s = t_slot) return s;
  sigset_t all, saved;
  sigfillset(&all);
  raw_sigprocmask(SIG_BLOCK, &all, &saved);
  ThreadSlot* s = t_slot ? t_slot : claim_slot();  // a handler that ran before the block may have claimed
  raw_sigprocmask(SIG_SETMASK, &saved, nullptr);
  return s;
}

ucontext_t* frame_context(std::uintptr_t f) noexcept { return reinterpret_cast<ucontext_t*>(f & ~kTrapFrameTag); }

// Frames are never popped when a handler returns: between the pop and sigreturn the
// handler's frame would still be on the stack, unrecorded. A frame is dead instead once the
// thread's stack pointer is back above it on the same stack, or it lies on the alternate
// signal stack and the thread no longer runs there. Dead frames are pruned (from the top)
// before the record is used, by the thread itself.
bool frame_is_dead(std::uintptr_t frame, std::uintptr_t sp, const stack_t& alt, bool have_alt) noexcept {
  auto on_alt = [&](std::uintptr_t p) {
    const auto b = reinterpret_cast<std::uintptr_t>(alt.ss_sp);
    return have_alt && p >= b && p < b + alt.ss_size;
  };
  const bool f_alt = on_alt(frame), sp_alt = on_alt(sp);
  return (f_alt && !sp_alt) || (f_alt == sp_alt && sp > frame);
}

// `alt` is the thread's alternate signal stack; in a handler the kernel saved it in the new
// frame's uc_stack, elsewhere (alt == nullptr) it is asked for.
std::uint32_t prune_dead_frames(ThreadSlot* s, std::uintptr_t sp, const stack_t* alt_in = nullptr) noexcept {
  std::uint32_t d = s->depth.load(std::memory_order_relaxed);
  if (d == 0) return 0;
  stack_t alt{};
  if (alt_in) {
    alt = *alt_in;
  } else if (::syscall(SYS_sigaltstack, nullptr, &alt) != 0) {
    alt.ss_flags = SS_DISABLE;
  }
  const bool have_alt = !(alt.ss_flags & SS_DISABLE) && alt.ss_size != 0;
  while (d > 0 && frame_is_dead(s->frames[d - 1].load(std::memory_order_relaxed) & ~kTrapFrameTag, sp, alt, have_alt)) {
    --d;
  }
  s->depth.store(d, std::memory_order_release);
  return d;
}

// Records the frame of the handler being entered. The kernel blocked the fix-up signal when
// it delivered this one (it is in every sa_mask we register), so no fix-up can run before the
// frame is recorded; the wrapper unblocks it right after.
class FrameGuard {
 public:
  FrameGuard(ucontext_t* uc, bool trap) noexcept : slot_(self_slot()) {
    if (!slot_) return;
    const std::uint32_t d = prune_dead_frames(slot_, arch::context_sp(uc), &uc->uc_stack);
    if (d >= kMaxNest) {
      slot_->overflow.store(true, std::memory_order_relaxed);
      return;
    }
    slot_->frames[d].store(reinterpret_cast<std::uintptr_t>(uc) | (trap ? kTrapFrameTag : 0),
                           std::memory_order_relaxed);
    slot_->seq.fetch_add(1, std::memory_order_acq_rel);
    slot_->depth.store(d + 1, std::memory_order_release);
  }
  ThreadSlot* slot() const noexcept { return slot_; }

 private:
  ThreadSlot* slot_;
};

std::uintptr_t current_sp() noexcept { return reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0)); }

// ---- the program's handlers -------------------------------------------------------------------
struct UserAction {
  std::atomic<std::uintptr_t> handler{0};  // what the wrapper calls (SIG_DFL = 0, SIG_IGN = 1)
  std::atomic<int> flags{0};
  struct sigaction full {};                // what sigaction(sig, NULL, &old) reports
};
UserAction g_user[NSIG];
std::atomic_flag g_user_lock = ATOMIC_FLAG_INIT;

// Updates of g_user run with every signal blocked, so a handler on the same thread cannot
// deadlock on the spin lock.
class UserLock {
 public:
  UserLock() noexcept {
    sigset_t all;
    sigfillset(&all);
    raw_sigprocmask(SIG_BLOCK, &all, &saved_);
    while (g_user_lock.test_and_set(std::memory_order_acquire)) sched_yield();
  }
  ~UserLock() {
    g_user_lock.clear(std::memory_order_release);
    raw_sigprocmask(SIG_SETMASK, &saved_, nullptr);
  }

 private:
  sigset_t saved_;
};

std::atomic<int> g_fixup_signal{0};
std::atomic<int> g_router_state{0};  // 0 not installed, 1 installing, 2 ready, 3 failed

bool is_function(std::uintptr_t h) noexcept {
  return h != reinterpret_cast<std::uintptr_t>(SIG_DFL) && h != reinterpret_cast<std::uintptr_t>(SIG_IGN) &&
         h != reinterpret_cast<std::uintptr_t>(SIG_ERR);
}

bool is_protected(int sig) noexcept {
  return sig == SIGTRAP || sig == g_fixup_signal.load(std::memory_order_relaxed);
}

void strip_protected(sigset_t* set) noexcept {
  sigdelset(set, SIGTRAP);
  if (const int f = g_fixup_signal.load(std::memory_order_relaxed)) sigdelset(set, f);
}

// The mask a wrapped handler is registered with: the program's, minus SIGTRAP, plus the
// fix-up signal (see FrameGuard).
void kernel_mask(sigset_t* set) noexcept {
  strip_protected(set);
  if (const int f = g_fixup_signal.load(std::memory_order_relaxed)) sigaddset(set, f);
}

// Calls the program's handler through its own type: sa_sigaction with SA_SIGINFO, sa_handler
// without (a mismatch would be harmless in the SysV ABI, but UBSan's -fsanitize=function
// rightly rejects it).
void call_user(std::uintptr_t h, int flags, int sig, siginfo_t* si, void* uc) noexcept {
  if (flags & SA_SIGINFO) {
    reinterpret_cast<void (*)(int, siginfo_t*, void*)>(h)(sig, si, uc);
  } else {
    reinterpret_cast<void (*)(int)>(h)(sig);
  }
}

void reset_if_oneshot(int sig, int flags) noexcept {
  if (!(flags & SA_RESETHAND)) return;
  UserLock lock;
  g_user[sig].handler.store(0, std::memory_order_release);
  g_user[sig].full = {};
  g_user[sig].full.sa_handler = SIG_DFL;
}

sigset_t g_fixup_set;  // {fixup signal}, filled at install

void unblock_fixup() noexcept { raw_sigprocmask(SIG_UNBLOCK, &g_fixup_set, nullptr); }

void wrapper(int sig, siginfo_t* si, void* uc) {
  FrameGuard frame(static_cast<ucontext_t*>(uc), false);
  unblock_fixup();  // the frame is recorded: fix-ups may now move its PC
  const std::uintptr_t h = g_user[sig].handler.load(std::memory_order_acquire);
  const int flags = g_user[sig].flags.load(std::memory_order_relaxed);
  reset_if_oneshot(sig, flags);
  if (is_function(h)) call_user(h, flags, sig, si, uc);
}

// A SIGTRAP that is not ours: the program's handler, or the default action (terminate with a
// core dump) taken at the faulting int3 itself.
void chain_trap(int sig, siginfo_t* si, ucontext_t* uc) noexcept {
  const std::uintptr_t h = g_user[SIGTRAP].handler.load(std::memory_order_acquire);
  const int flags = g_user[SIGTRAP].flags.load(std::memory_order_relaxed);
  const bool from_int3 = si->si_code == SI_KERNEL;
  if (is_function(h)) {
    reset_if_oneshot(SIGTRAP, flags);
    unblock_fixup();
    call_user(h, flags, sig, si, uc);
    return;
  }
  if (h == reinterpret_cast<std::uintptr_t>(SIG_IGN) && !from_int3) return;
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  __sigaction(SIGTRAP, &dfl, nullptr);
  if (from_int3) {
    const std::uintptr_t pc = arch::context_pc(uc);
    const auto* p = reinterpret_cast<const std::uint8_t*>(pc);
    const bool two_byte = ((pc - 1) & 0xfff) != 0 && p[-2] == 0xcd && p[-1] == 0x03;
    arch::set_context_pc(uc, two_byte ? pc - 2 : pc - 1);  // trap again, for real
    return;
  }
  ::syscall(SYS_tgkill, ::getpid(), common::current_tid(), SIGTRAP);
}

void trap_handler(int sig, siginfo_t* si, void* ucv) {
  auto* uc = static_cast<ucontext_t*>(ucv);
  FrameGuard frame(uc, true);
  if (si->si_code == SI_KERNEL && detail::handle_int3(uc)) return;
  chain_trap(sig, si, uc);
}

// ---- PC fix-up ---------------------------------------------------------------------------------
struct FixupRequest {
  std::atomic<std::uint64_t> generation{0};  // odd while a request is active
  std::atomic<std::uintptr_t> begin{0}, end{0}, destination{0};
  std::atomic<int> moved{0};
  std::atomic<int> anonymous_acks{0};  // answers from threads without a slot
};
FixupRequest g_request;

// Moves the PCs of this thread's frames that lie in [b, e). Trap frames are skipped: their
// PC (site + 1) belongs to an int3 the router is about to emulate from that very PC.
int move_own_frames(ThreadSlot* s, std::uintptr_t b, std::uintptr_t e, std::uintptr_t dest) noexcept {
  int moved = 0;
  const std::uint32_t depth = s->depth.load(std::memory_order_acquire);
  for (std::uint32_t i = 0; i < depth && i < kMaxNest; ++i) {
    const std::uintptr_t f = s->frames[i].load(std::memory_order_relaxed);
    if (f & kTrapFrameTag) continue;
    ucontext_t* uc = frame_context(f);
    const std::uintptr_t pc = arch::context_pc(uc);
    if (pc >= b && pc < e) {
      arch::set_context_pc(uc, dest);
      ++moved;
    }
  }
  return moved;
}

void fixup_handler(int, siginfo_t*, void* ucv) {
  auto* uc = static_cast<ucontext_t*>(ucv);
  FrameGuard frame(uc, false);
  const std::uint64_t gen = g_request.generation.load(std::memory_order_acquire);
  if (!(gen & 1)) return;  // a late signal from a request that is over
  const std::uintptr_t b = g_request.begin.load(std::memory_order_relaxed);
  const std::uintptr_t e = g_request.end.load(std::memory_order_relaxed);
  const std::uintptr_t dest = g_request.destination.load(std::memory_order_relaxed);
  if (g_request.generation.load(std::memory_order_acquire) != gen) return;
  int moved = 0;
  if (ThreadSlot* s = frame.slot()) {
    moved = move_own_frames(s, b, e, dest);
    g_request.moved.fetch_add(moved, std::memory_order_relaxed);
    s->acked.store(gen, std::memory_order_release);
  } else {
    const std::uintptr_t pc = arch::context_pc(uc);
    if (pc >= b && pc < e) {
      arch::set_context_pc(uc, dest);
      g_request.moved.fetch_add(1, std::memory_order_relaxed);
    }
    g_request.anonymous_acks.fetch_add(1, std::memory_order_release);
  }
}

// ---- installation ---------------------------------------------------------------------------
int choose_fixup_signal() {
  if (const char* env = std::getenv("TRAMWAY_FIXUP_SIGNAL")) {
    const int s = std::atoi(env);
    if (s >= SIGRTMIN && s <= SIGRTMAX) return s;
    std::fprintf(stderr, "tramway: TRAMWAY_FIXUP_SIGNAL=%s is not a real-time signal (%d..%d); using the default\n",
                 env, SIGRTMIN, SIGRTMAX);
  }
  for (int s = SIGRTMAX - 1; s > SIGRTMIN; --s) {
    struct sigaction cur {};
    if (__sigaction(s, nullptr, &cur) == 0 && !is_function(reinterpret_cast<std::uintptr_t>(cur.sa_handler)))
      return s;
  }
  return SIGRTMAX - 1;
}

bool is_ours(std::uintptr_t h) {
  return h == reinterpret_cast<std::uintptr_t>(&wrapper) || h == reinterpret_cast<std::uintptr_t>(&trap_handler) ||
         h == reinterpret_cast<std::uintptr_t>(&fixup_handler);
}

Status install() {
  g_fixup_signal.store(choose_fixup_signal(), std::memory_order_relaxed);
  sigemptyset(&g_fixup_set);
  sigaddset(&g_fixup_set, g_fixup_signal.load());
  // Put the wrapper in front of every handler installed before us, and record what the
  // program sees.
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig == SIGKILL || sig == SIGSTOP || (sig >= kGlibcInternalFirst && sig <= kGlibcInternalLast)) continue;
    struct sigaction cur {};
    if (__sigaction(sig, nullptr, &cur) != 0) continue;
    const auto h = reinterpret_cast<std::uintptr_t>(cur.sa_handler);
    if (is_ours(h)) continue;
    UserLock lock;
    g_user[sig].full = cur;
    g_user[sig].flags.store(cur.sa_flags, std::memory_order_relaxed);
    g_user[sig].handler.store(h, std::memory_order_release);
    if (is_function(h) && !is_protected(sig)) {
      struct sigaction k = cur;
      k.sa_sigaction = wrapper;
      k.sa_flags |= SA_SIGINFO;
      kernel_mask(&k.sa_mask);
      __sigaction(sig, &k, nullptr);
    }
  }
  // SA_NODEFER: a site may be hit inside a handler that interrupted our SIGTRAP handler; a
  // blocked SIGTRAP at an int3 would kill the process.
  struct sigaction trap {};
  trap.sa_sigaction = trap_handler;
  trap.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
  trap.sa_mask = g_fixup_set;
  if (__sigaction(SIGTRAP, &trap, nullptr) != 0) {
    return Status::error(std::string("installing the SIGTRAP router failed: ") + std::strerror(errno), errno);
  }
  struct sigaction fix {};
  fix.sa_sigaction = fixup_handler;
  fix.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&fix.sa_mask);
  if (__sigaction(g_fixup_signal.load(), &fix, nullptr) != 0) {
    return Status::error(std::string("installing the fix-up signal handler failed: ") + std::strerror(errno), errno);
  }
  // Unblock both in the installing thread; other threads' masks are filtered as they change.
  sigset_t both;
  sigemptyset(&both);
  sigaddset(&both, SIGTRAP);
  sigaddset(&both, g_fixup_signal.load());
  raw_sigprocmask(SIG_UNBLOCK, &both, nullptr);
  return {};
}

pthread_mutex_t g_move_mutex = PTHREAD_MUTEX_INITIALIZER;
thread_local sigset_t t_mask_before_fork;

}  // namespace

// fork() takes the fix-up and handler-table locks (see register_fork_handlers).
void detail::router_before_fork() noexcept {
  pthread_mutex_lock(&g_move_mutex);
  sigset_t all;
  sigfillset(&all);
  raw_sigprocmask(SIG_BLOCK, &all, &t_mask_before_fork);
  while (g_user_lock.test_and_set(std::memory_order_acquire)) sched_yield();
}
void detail::router_after_fork_in_parent() noexcept {
  g_user_lock.clear(std::memory_order_release);
  raw_sigprocmask(SIG_SETMASK, &t_mask_before_fork, nullptr);
  pthread_mutex_unlock(&g_move_mutex);
}
void detail::router_after_fork_in_child() noexcept {
  g_user_lock.clear(std::memory_order_release);
  raw_sigprocmask(SIG_SETMASK, &t_mask_before_fork, nullptr);
  // No request is in flight in the child.
  const std::uint64_t gen = g_request.generation.load(std::memory_order_relaxed);
  g_request.generation.store(gen + (gen & 1), std::memory_order_relaxed);
  pthread_mutex_unlock(&g_move_mutex);
  // Only the forking thread survives; its slot keeps its frames under its new tid.
  ThreadSlot* mine = t_slot;
  for (ThreadSlot& s : g_slots) {
    if (&s == mine) continue;
    s.depth.store(0, std::memory_order_relaxed);
    s.owner.store(0, std::memory_order_relaxed);
  }
  if (mine) mine->owner.store(owner_word(common::current_tid()), std::memory_order_release);
}

namespace {

__attribute__((constructor(101))) void install_at_load() {
  if (Status s = detail::ensure_router(); !s.ok()) std::fprintf(stderr, "tramway: %s\n", s.message().c_str());
}

// Reads a word of this process without faulting if it has been unmapped meanwhile.
bool read_word(std::uintptr_t address, std::uintptr_t* out) {
  iovec local{out, sizeof *out};
  iovec remote{reinterpret_cast<void*>(address), sizeof *out};
  return ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) == sizeof *out;
}

// True when the thread is proven to have no PC in [b, e): it is not running, its live PC
// (from /proc) is outside, and so is every nested frame it recorded, with nothing changing
// while we looked.
bool proven_outside(pid_t tid, std::uintptr_t b, std::uintptr_t e) {
  const common::TaskProbe before = common::probe_task(tid);
  if (before.gone) return true;
  if (before.running || (before.pc >= b && before.pc < e)) return false;
  ThreadSlot* s = find_slot(tid);
  if (!s) return !g_slots_exhausted.load(std::memory_order_relaxed);  // never ran a handler
  if (s->overflow.load(std::memory_order_relaxed)) return false;
  const std::uint32_t seq = s->seq.load(std::memory_order_acquire);
  const std::uint32_t depth = s->depth.load(std::memory_order_acquire);
  for (std::uint32_t i = 0; i < depth && i < kMaxNest; ++i) {
    const std::uintptr_t f = s->frames[i].load(std::memory_order_relaxed);
    if (f & kTrapFrameTag) continue;
    std::uintptr_t pc;
    const auto rip = reinterpret_cast<std::uintptr_t>(&frame_context(f)->uc_mcontext.gregs[REG_RIP]);
    if (!read_word(rip, &pc) || (pc >= b && pc < e)) return false;
  }
  if (s->seq.load(std::memory_order_acquire) != seq || s->tid() != tid) return false;
  const common::TaskProbe after = common::probe_task(tid);
  return after.gone || (!after.running && after.pc == before.pc && after.sp == before.sp);
}

// "thread 42 (worker, state R, running, fix-up signal pending and blocked)": enough to tell a
// stopped thread from one that masks the signal or one that ran the handler without answering.
std::string describe_holdout(pid_t tid, std::uint64_t gen) {
  const common::TaskProbe p = common::probe_task(tid);
  std::string d = "thread " + std::to_string(tid) + " (" + common::thread_name(tid) + ", state " + p.state +
                  (p.running ? ", running" : ", pc " + common::hex_address(p.pc));
  const common::SignalSets sets = common::signal_sets(tid);
  const std::uint64_t bit = std::uint64_t{1} << (g_fixup_signal.load(std::memory_order_relaxed) - 1);
  if (sets.known) {
    d += (sets.pending & bit) ? ", fix-up signal pending" : ", fix-up signal not pending";
    if (sets.blocked & bit) d += " and blocked";
  }
  if (const ThreadSlot* s = find_slot(tid)) {
    const std::uint64_t acked = s->acked.load(std::memory_order_acquire);
    if (acked != 0) d += ", last answered request " + std::to_string((gen - acked) / 2) + " before this one";
  }
  return d + ")";
}

bool answered(pid_t tid, std::uint64_t gen, int* anonymous_budget) {
  if (ThreadSlot* s = find_slot(tid)) return s->acked.load(std::memory_order_acquire) >= gen;
  if (g_slots_exhausted.load() && *anonymous_budget > 0) {
    --*anonymous_budget;
    return true;
  }
  return false;
}

}  // namespace

namespace detail {
Status ensure_router() noexcept {
  int state = g_router_state.load(std::memory_order_acquire);
  if (state == 2) return {};
  if (state == 0 && g_router_state.compare_exchange_strong(state, 1)) {
    Status s = install();
    if (s.ok()) register_fork_handlers();
    g_router_state.store(s.ok() ? 2 : 3, std::memory_order_release);
    return s;
  }
  while ((state = g_router_state.load(std::memory_order_acquire)) == 1) sched_yield();
  if (state == 2) return {};
  return Status::error("the signal router could not be installed (see the first error printed by tramway)");
}
}  // namespace detail

Status install_signal_router() { return detail::ensure_router(); }

int fixup_signal() noexcept {
  (void)detail::ensure_router();
  return g_fixup_signal.load(std::memory_order_relaxed);
}

std::size_t interrupted_pcs(std::uintptr_t* out, std::size_t capacity) noexcept {
  ThreadSlot* s = t_slot;
  if (!s) return 0;
  const std::uint32_t depth = prune_dead_frames(s, current_sp());
  std::size_t n = 0;
  for (std::uint32_t i = 0; i < depth && i < kMaxNest && n < capacity; ++i) {
    out[n++] = arch::context_pc(frame_context(s->frames[i].load(std::memory_order_relaxed)));
  }
  return n;
}

Result<MoveReport> move_pcs(std::uintptr_t begin, std::uintptr_t end, std::uintptr_t destination,
                            std::chrono::milliseconds timeout) {
  if (Status s = detail::ensure_router(); !s.ok()) return s;
  if (begin >= end) return Status::error("move_pcs: empty range [" + common::hex_address(begin) + ", " + common::hex_address(end) + ")");
  pthread_mutex_lock(&g_move_mutex);
  struct Unlock { ~Unlock() { pthread_mutex_unlock(&g_move_mutex); } } unlock;

  const std::uint64_t gen = g_request.generation.load(std::memory_order_relaxed) + 1;  // odd
  g_request.begin.store(begin, std::memory_order_relaxed);
  g_request.end.store(end, std::memory_order_relaxed);
  g_request.destination.store(destination, std::memory_order_relaxed);
  g_request.moved.store(0, std::memory_order_relaxed);
  g_request.anonymous_acks.store(0, std::memory_order_relaxed);
  g_request.generation.store(gen, std::memory_order_release);
  struct Close { std::uint64_t g; ~Close() { g_request.generation.store(g + 1, std::memory_order_release); } } close{gen};

  MoveReport report;
  const pid_t me = common::current_tid();
  const pid_t pid = ::getpid();
  if (ThreadSlot* s = t_slot) {
    prune_dead_frames(s, current_sp());  // their memory may now be our own live stack
    report.pcs_moved += move_own_frames(s, begin, end, destination);
  }

  reclaim_dead_slots(me);

  std::vector<pid_t> waiting;
  for (pid_t tid : common::list_threads()) {
    if (tid == me) continue;
    ++report.threads_seen;
    if (proven_outside(tid, begin, end)) {
      ++report.threads_observed;
      continue;
    }
    if (::syscall(SYS_tgkill, pid, tid, g_fixup_signal.load()) != 0) {
      if (errno == ESRCH) continue;  // exited meanwhile
      return Status::error("signalling thread " + std::to_string(tid) + " failed: " + std::strerror(errno), errno);
    }
    ++report.threads_signalled;
    waiting.push_back(tid);
  }

  const std::int64_t start_ns = common::monotonic_ns();
  long pause_ns = 0;
  for (int round = 0; !waiting.empty(); ++round) {
    int anonymous = g_request.anonymous_acks.load(std::memory_order_acquire);
    std::erase_if(waiting, [&](pid_t tid) {
      return answered(tid, gen, &anonymous) || ::syscall(SYS_tgkill, pid, tid, 0) != 0;
    });
    if (waiting.empty()) break;
    if (common::monotonic_ns() - start_ns >= static_cast<std::int64_t>(timeout.count()) * 1'000'000) {
      // Last chance: a thread that cannot run our handler (stopped, traced, signal blocked
      // by a raw system call) may still be provably outside.
      std::erase_if(waiting, [&](pid_t tid) { return proven_outside(tid, begin, end); });
      if (waiting.empty()) break;
      std::string who;
      for (pid_t tid : waiting) who += (who.empty() ? "" : "; ") + describe_holdout(tid, gen);
      return Status::error("PC fix-up for [" + common::hex_address(begin) + ", " + common::hex_address(end) + "): no answer within " +
                           std::to_string(timeout.count()) + " ms from " + who +
                           ". A stopped or traced thread cannot run the fix-up handler; resume it (SIGCONT, "
                           "or detach the debugger) and retry");
    }
    if (round < 64) {
      sched_yield();
    } else {
      pause_ns = pause_ns ? std::min(pause_ns * 2, 1'000'000L) : 20'000L;
      const timespec pause{0, pause_ns};
      nanosleep(&pause, nullptr);
    }
  }
  report.pcs_moved += g_request.moved.load(std::memory_order_acquire);
  return report;
}

}  // namespace tramway::text

// ---- interposition ------------------------------------------------------------------------------
using tramway::text::g_fixup_signal;
using tramway::text::g_user;
using tramway::text::UserLock;

extern "C" {

__attribute__((visibility("default"))) int sigaction(int sig, const struct sigaction* act,
                                                     struct sigaction* old) noexcept {
  using namespace tramway::text;
  if (sig <= 0 || sig >= NSIG || sig == SIGKILL || sig == SIGSTOP ||
      (sig >= kGlibcInternalFirst && sig <= kGlibcInternalLast) || !detail::ensure_router().ok()) {
    return __sigaction(sig, act, old);
  }
  const auto h = act ? reinterpret_cast<std::uintptr_t>(act->sa_handler) : 0;
  if (sig == g_fixup_signal.load(std::memory_order_relaxed) && act && is_function(h)) {
    errno = EINVAL;  // reserved: see TRAMWAY_FIXUP_SIGNAL
    return -1;
  }
  UserLock lock;
  UserAction& u = g_user[sig];
  const struct sigaction previous = u.full;
  if (act) {
    if (sig != SIGTRAP && sig != g_fixup_signal.load()) {
      struct sigaction k = *act;
      if (is_function(h)) {
        k.sa_sigaction = wrapper;
        k.sa_flags |= SA_SIGINFO;
        kernel_mask(&k.sa_mask);
      } else {
        strip_protected(&k.sa_mask);
      }
      // Record first: the wrapper may run as soon as the kernel has it.
      u.flags.store(act->sa_flags, std::memory_order_relaxed);
      u.handler.store(h, std::memory_order_release);
      if (__sigaction(sig, &k, nullptr) != 0) {
        const int e = errno;
        u.flags.store(previous.sa_flags, std::memory_order_relaxed);
        u.handler.store(reinterpret_cast<std::uintptr_t>(previous.sa_handler), std::memory_order_release);
        errno = e;
        return -1;
      }
    } else {
      // SIGTRAP stays with the router, which chains to this handler for foreign traps.
      u.flags.store(act->sa_flags, std::memory_order_relaxed);
      u.handler.store(h, std::memory_order_release);
    }
    u.full = *act;
  }
  if (old) *old = previous;
  return 0;
}

static sighandler_t install_simple(int sig, sighandler_t handler, int flags, bool mask_self) {
  if (handler == SIG_ERR || sig <= 0 || sig >= NSIG) {
    errno = EINVAL;
    return SIG_ERR;
  }
  struct sigaction act {}, old {};
  act.sa_handler = handler;
  sigemptyset(&act.sa_mask);
  if (mask_self) sigaddset(&act.sa_mask, sig);
  act.sa_flags = flags;
  if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
  return old.sa_handler;
}

// glibc's signal() has BSD semantics: handler stays installed, the signal is blocked while
// it runs, interrupted system calls restart.
__attribute__((visibility("default"))) sighandler_t signal(int sig, sighandler_t handler) noexcept {
  return install_simple(sig, handler, SA_RESTART, true);
}
__attribute__((visibility("default"))) sighandler_t bsd_signal(int sig, sighandler_t handler) noexcept {
  return install_simple(sig, handler, SA_RESTART, true);
}
__attribute__((visibility("default"))) sighandler_t sysv_signal(int sig, sighandler_t handler) noexcept {
  return install_simple(sig, handler, SA_RESETHAND | SA_NODEFER, false);
}
__attribute__((visibility("default"))) sighandler_t __sysv_signal(int sig, sighandler_t handler) noexcept {
  return install_simple(sig, handler, SA_RESETHAND | SA_NODEFER, false);
}

static int filtered_mask(int how, const sigset_t* set, sigset_t* old) noexcept {
  sigset_t copy;
  if (set && (how == SIG_BLOCK || how == SIG_SETMASK)) {
    copy = *set;
    tramway::text::strip_protected(&copy);
    sigdelset(&copy, tramway::text::kGlibcInternalFirst);
    sigdelset(&copy, tramway::text::kGlibcInternalLast);
    set = &copy;
  }
  return static_cast<int>(tramway::text::raw_sigprocmask(how, set, old));
}

__attribute__((visibility("default"))) int sigprocmask(int how, const sigset_t* set, sigset_t* old) noexcept {
  return filtered_mask(how, set, old) == 0 ? 0 : -1;
}
__attribute__((visibility("default"))) int pthread_sigmask(int how, const sigset_t* set, sigset_t* old) noexcept {
  const int saved = errno;
  if (filtered_mask(how, set, old) == 0) return 0;
  const int e = errno;
  errno = saved;
  return e;
}

__attribute__((visibility("default"))) sighandler_t sigset(int sig, sighandler_t disp) noexcept {
  if (sig <= 0 || sig >= NSIG || disp == SIG_ERR) {
    errno = EINVAL;
    return SIG_ERR;
  }
  sigset_t one, old_mask;
  sigemptyset(&one);
  sigaddset(&one, sig);
  struct sigaction old {};
  if (disp == SIG_HOLD) {
    if (sigaction(sig, nullptr, &old) != 0 || filtered_mask(SIG_BLOCK, &one, &old_mask) != 0) return SIG_ERR;
    return sigismember(&old_mask, sig) ? SIG_HOLD : old.sa_handler;
  }
  struct sigaction act {};
  act.sa_handler = disp;
  sigemptyset(&act.sa_mask);
  if (sigaction(sig, &act, &old) != 0 || filtered_mask(SIG_UNBLOCK, &one, &old_mask) != 0) return SIG_ERR;
  return sigismember(&old_mask, sig) ? SIG_HOLD : old.sa_handler;
}

}  // extern "C"
