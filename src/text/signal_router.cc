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
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "arch/x86_64/emulate.h"
#include "common/format.h"
#include "common/proc.h"
#include "text/internal.h"
#include "text/all_blocked.h"
#include "text/thread_slots.h"
#include "common/eject.h"
#include "text/got_redirect.h"
#include "text/eintr_undo.h"
#include "common/unload_freed.h"

extern "C" int __sigaction(int, const struct sigaction*, struct sigaction*) noexcept;

namespace tramway::text {
namespace {

using detail::FrameGuard;
using detail::kMaxNest;
using detail::kTrapFrameTag;
using detail::ThreadSlot;
using detail::find_slot;
using detail::frame_context;
using detail::prune_dead_frames;
using detail::raw_sigprocmask;
using detail::t_slot;

// glibc's internal signals (SIGCANCEL, SIGSETXID): never touched, as glibc itself does.
constexpr int kGlibcInternalFirst = 32, kGlibcInternalLast = 33;

// Signals the router never wraps, adopts or gives back: those no handler can catch, and glibc's.
constexpr bool never_routed(int sig) noexcept {
  return sig == SIGKILL || sig == SIGSTOP || (sig >= kGlibcInternalFirst && sig <= kGlibcInternalLast);
}

// ---- the program's handlers -------------------------------------------------------------------
struct UserAction {
  std::atomic<std::uintptr_t> handler{0};  // what the wrapper calls (SIG_DFL = 0, SIG_IGN = 1)
  std::atomic<int> flags{0};
  struct sigaction full {};                // what sigaction(sig, NULL, &old) reports
};
UserAction g_user[NSIG];
// Lock rank text, after g_move_mutex (common/lock_order.h).
std::atomic_flag g_user_lock = ATOMIC_FLAG_INIT;

// Updates of g_user run with every signal blocked, so a handler on the same thread cannot
// deadlock on the spin lock.
class UserLock {
 public:
  UserLock() noexcept {
    while (g_user_lock.test_and_set(std::memory_order_acquire)) sched_yield();
  }
  ~UserLock() { g_user_lock.clear(std::memory_order_release); }

 private:
  detail::AllSignalsBlocked blocked_;  // constructed first, destroyed last
};

std::atomic<int> g_fixup_signal{0};
// 0 not installed, 1 installing, 2 ready, 3 failed, 4 given back (eject: installed again only
// by take_signals_again)
std::atomic<int> g_router_state{0};

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

// The kernel runs the wrapper without SA_NODEFER even when the program asked for it: the
// wrapper unblocks the signal itself once its frame is recorded, with the fix-up signal (one
// system call). Otherwise a storm of the signal nests frames on the wrapper's entry faster
// than the program's handler would ever have seen them, and overflows a small alternate stack
// (issue 11, defect 12).
int wrapper_flags(int program_flags) noexcept { return (program_flags | SA_SIGINFO) & ~SA_NODEFER; }

// A storm of an SA_NODEFER signal on an alternate stack nests one frame per signal that lands
// while a handler runs; tramway's handlers are slower than the program's alone (a trap frame per
// hooked call during a batch), so an unbounded storm that the program alone just survives would
// overflow the stack. Below this much room the wrapper leaves the signal blocked until its
// handler returns: it is delivered at sigreturn instead of nesting, as if it had come a moment
// later (a standard signal that comes meanwhile merges with it, as any pending one does).
// Room for a few kernel frames (AT_MINSIGSTKSZ each, at least 2 KiB), capped at half the stack.
// The frame size is read at install: a function-local static's first use would take a guard
// lock inside the signal handler.
std::size_t g_kernel_frame = 2048;

bool room_to_nest(const ucontext_t* uc) noexcept {
  const std::size_t frame = g_kernel_frame;
  const stack_t& alt = uc->uc_stack;  // the alternate stack as it was at delivery
  if ((alt.ss_flags & SS_DISABLE) || alt.ss_size == 0) return true;
  const auto base = reinterpret_cast<std::uintptr_t>(alt.ss_sp);
  const std::uintptr_t sp = detail::current_sp();
  if (sp < base || sp >= base + alt.ss_size) return true;  // on the thread's own stack
  return sp - base >= std::min(4 * frame, alt.ss_size / 2);
}

void wrapper(int sig, siginfo_t* si, void* uc) {
  FrameGuard frame(static_cast<ucontext_t*>(uc), false);
  const std::uintptr_t h = g_user[sig].handler.load(std::memory_order_acquire);
  const int flags = g_user[sig].flags.load(std::memory_order_relaxed);
  if (flags & SA_NODEFER) {
    sigset_t both = g_fixup_set;
    if (room_to_nest(static_cast<ucontext_t*>(uc))) sigaddset(&both, sig);
    raw_sigprocmask(SIG_UNBLOCK, &both, nullptr);  // the frame is recorded: see wrapper_flags
  } else {
    unblock_fixup();  // the frame is recorded: fix-ups may now move its PC
  }
  reset_if_oneshot(sig, flags);
  detail::note_program_handler(frame.slot(), static_cast<ucontext_t*>(uc));
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
    // The mask the program's handler would have had: the router's trap handler blocks every
    // asynchronous signal (see install), the program's need not.
    sigset_t m = uc->uc_sigmask, user = g_user[SIGTRAP].full.sa_mask;
    sigorset(&m, &m, &user);
    strip_protected(&m);
    raw_sigprocmask(SIG_SETMASK, &m, nullptr);
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

// Only a frame whose int3 may be one of ours is a trap frame (its PC is about to be emulated
// from). A trap that is not ours (the program's int3, a single step, int1) is chained as a
// plain frame: the program's handler may stay in it, and its PC, where it resumes, must be
// moved and observed like any other.
void trap_handler(int sig, siginfo_t* si, void* ucv) {
  auto* uc = static_cast<ucontext_t*>(ucv);
  const bool int3 = si->si_code == SI_KERNEL;
  FrameGuard frame(uc, int3);
  if (int3 && detail::handle_int3(uc)) return;
  if (int3) frame.untrap();
  chain_trap(sig, si, uc);
}

// ---- PC fix-up ---------------------------------------------------------------------------------
// A request's moves live in a MoveTable owned by the router, not in the caller's array:
// move_pcs may return while a handler still holds the table (a thread stopped inside the
// handler after reading it, then proven outside through /proc or given up on at the
// timeout). Tables are therefore retired when their request closes and freed only once no
// handler is counted in `readers` (the trap table's scheme in patch.cc).
struct MoveTable {
  std::vector<PcMove> moves;  // sorted by begin, disjoint
  std::atomic<int> moved{0};
};

struct FixupRequest {
  std::atomic<std::uint64_t> generation{0};  // odd while a request is active
  std::atomic<MoveTable*> table{nullptr};    // the active request's moves, null between requests
  std::atomic<int> anonymous_acks{0};        // answers from threads without a slot
  std::atomic<int> readers{0};               // handlers that may be reading a table
};
FixupRequest g_request;

// The move for `pc`, or nullptr: binary search for the last range that begins at or before it.
const PcMove* find_move(std::uintptr_t pc, const PcMove* moves, std::size_t n) noexcept {
  std::size_t lo = 0, hi = n;
  while (lo < hi) {
    const std::size_t mid = lo + (hi - lo) / 2;
    if (moves[mid].begin <= pc) lo = mid + 1; else hi = mid;
  }
  return lo > 0 && pc < moves[lo - 1].end ? &moves[lo - 1] : nullptr;
}

// Moves the PCs of this thread's frames that lie in one of the ranges. Trap frames are
// skipped: their PC (site + 1) belongs to an int3 the router is about to emulate from that
// very PC.
int move_own_frames(ThreadSlot* s, const PcMove* moves, std::size_t n) noexcept {
  int moved = 0;
  const std::uint32_t depth = s->depth.load(std::memory_order_acquire);
  for (std::uint32_t i = 0; i < depth && i < kMaxNest; ++i) {
    const std::uintptr_t f = s->frames[i].load(std::memory_order_relaxed);
    if ((f & kTrapFrameTag) || !detail::own_frame_live(s, i, f)) continue;
    ucontext_t* uc = frame_context(f);
    if (const PcMove* m = find_move(arch::context_pc(uc), moves, n)) {
      arch::set_context_pc(uc, m->destination);
      ++moved;
    }
  }
  return moved;
}

void answer_move_request(const FrameGuard& frame, ucontext_t* uc) noexcept {
  // Counted before the generation is read: a table retired after this point is not freed
  // until we leave, and one retired before it is never loaded (its request is closed).
  g_request.readers.fetch_add(1, std::memory_order_seq_cst);
  const std::uint64_t gen = g_request.generation.load(std::memory_order_seq_cst);
  MoveTable* t = (gen & 1) ? g_request.table.load(std::memory_order_seq_cst) : nullptr;
  // Even generation: a late signal from a request that is over. A changed one: the table
  // loaded may belong to a newer request than `gen`; that request signals us again.
  if (t && g_request.generation.load(std::memory_order_seq_cst) == gen) {
    const PcMove* moves = t->moves.data();
    const std::size_t n = t->moves.size();
    if (ThreadSlot* s = frame.slot()) {
      t->moved.fetch_add(move_own_frames(s, moves, n), std::memory_order_relaxed);
      s->acked.store(gen, std::memory_order_release);
    } else {
      if (const PcMove* m = find_move(arch::context_pc(uc), moves, n)) {
        arch::set_context_pc(uc, m->destination);
        t->moved.fetch_add(1, std::memory_order_relaxed);
      }
      g_request.anonymous_acks.fetch_add(1, std::memory_order_release);
    }
  }
  g_request.readers.fetch_sub(1, std::memory_order_seq_cst);
}

// One signal serves both users: a move_pcs request in progress, and a RangeWatch (sampled
// after the move, so it sees where the thread will resume).
void fixup_handler(int, siginfo_t*, void* ucv) {
  auto* uc = static_cast<ucontext_t*>(ucv);
  FrameGuard frame(uc, false);
  detail::undo_own_eintr(frame.slot(), uc);  // first: the others must see where it resumes
  answer_move_request(frame, uc);
  detail::sample_for_watch(frame.slot(), uc);
}

// ---- installation ---------------------------------------------------------------------------
int choose_fixup_signal() {
  if (const char* env = std::getenv("TRAMWAY_FIXUP_SIGNAL")) {
    const auto s = static_cast<int>(common::parse_decimal(env));
    if (s >= SIGRTMIN && s <= SIGRTMAX) return s;
    std::fprintf(stderr, "tramway: TRAMWAY_FIXUP_SIGNAL=%s is not a real-time signal (%d..%d); using the default\n",
                 env, SIGRTMIN, SIGRTMAX);
  }
  // A signal the program already uses is not taken: one with a handler, one blocked in the
  // loading thread (read with sigwait or a signalfd), one a signalfd of ours waits for.
  sigset_t blocked;
  raw_sigprocmask(SIG_BLOCK, nullptr, &blocked);
  const std::uint64_t in_signalfds = detail::signalfd_signals();
  for (int s = SIGRTMAX - 1; s > SIGRTMIN; --s) {
    struct sigaction cur {};
    if (__sigaction(s, nullptr, &cur) == 0 && !is_function(reinterpret_cast<std::uintptr_t>(cur.sa_handler)) &&
        !sigismember(&blocked, s) && !((in_signalfds >> (s - 1)) & 1))
      return s;
  }
  return SIGRTMAX - 1;
}

void trap_mask(sigset_t* set) noexcept {
  sigfillset(set);
  for (int sig : {SIGTRAP, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS, kGlibcInternalFirst, kGlibcInternalLast})
    sigdelset(set, sig);
}

bool is_ours(std::uintptr_t h) {
  return h == reinterpret_cast<std::uintptr_t>(&wrapper) || h == reinterpret_cast<std::uintptr_t>(&trap_handler) ||
         h == reinterpret_cast<std::uintptr_t>(&fixup_handler);
}

struct sigaction g_fixup_original {};  // the fix-up signal's disposition before install

Status install() {
  if (const unsigned long m = getauxval(AT_MINSIGSTKSZ); m > g_kernel_frame) g_kernel_frame = static_cast<std::size_t>(m);
  g_fixup_signal.store(choose_fixup_signal(), std::memory_order_relaxed);
  sigemptyset(&g_fixup_set);
  sigaddset(&g_fixup_set, g_fixup_signal.load());
  // Put the wrapper in front of every handler installed before us, and record what the
  // program sees.
  for (int sig = 1; sig < NSIG; ++sig) {
    if (never_routed(sig)) continue;
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
      k.sa_flags = wrapper_flags(k.sa_flags);
      kernel_mask(&k.sa_mask);
      __sigaction(sig, &k, nullptr);
    }
  }
  // SA_NODEFER: a site may be hit inside a handler that interrupted our SIGTRAP handler; a
  // blocked SIGTRAP at an int3 would kill the process. Every asynchronous signal waits until
  // the emulation is over: a signal storm on a small alternate stack (SA_ONSTACK|SA_NODEFER)
  // then nests one trap frame at most on top of the program's own frames, not one per level
  // (issue 11, defect 12). The synchronous ones (a fault) cannot wait.
  struct sigaction trap {};
  trap.sa_sigaction = trap_handler;
  trap.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
  trap_mask(&trap.sa_mask);
  if (__sigaction(SIGTRAP, &trap, nullptr) != 0) {
    return Status::error(std::string("installing the SIGTRAP router failed: ") + std::strerror(errno), errno);
  }
  __sigaction(g_fixup_signal.load(), nullptr, &g_fixup_original);
  detail::eintr_undo_init();
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

// Lock rank text, after the patch lock (common/lock_order.h).
pthread_mutex_t g_move_mutex = PTHREAD_MUTEX_INITIALIZER;

}  // namespace

// fork() takes the fix-up and handler-table locks after the patch lock (patch.cc, text_before_fork).
void detail::router_before_fork() noexcept {
  pthread_mutex_lock(&g_move_mutex);
  detail::AllSignalsBlocked::enter();
  while (g_user_lock.test_and_set(std::memory_order_acquire)) sched_yield();
}
void detail::router_after_fork_in_parent() noexcept {
  g_user_lock.clear(std::memory_order_release);
  detail::AllSignalsBlocked::leave();
  pthread_mutex_unlock(&g_move_mutex);
}
void detail::router_after_fork_in_child() noexcept {
  g_user_lock.clear(std::memory_order_release);
  detail::all_blocked_after_fork_in_child();
  detail::AllSignalsBlocked::leave();
  // No request is in flight in the child.
  const std::uint64_t gen = g_request.generation.load(std::memory_order_relaxed);
  g_request.generation.store(gen + (gen & 1), std::memory_order_relaxed);
  g_request.readers.store(0, std::memory_order_relaxed);  // counted by threads that are gone
  pthread_mutex_unlock(&g_move_mutex);
  // Only the forking thread survives; its slot keeps its frames under its new tid.
  detail::slots_after_fork_in_child();
  detail::watch_after_fork_in_child();
}

namespace {

__attribute__((constructor(101))) void install_at_load() {
  if (Status s = detail::ensure_router(); !s.ok()) std::fprintf(stderr, "tramway: %s\n", s.message().c_str());
}

}  // namespace

bool detail::waiting_for_cpu(char state, const common::SignalSets& sets, int fixup_signal) noexcept {
  if (state != 'R' || !sets.known || fixup_signal <= 0) return false;
  const std::uint64_t bit = std::uint64_t{1} << (fixup_signal - 1);
  const bool pending = (sets.pending & bit) != 0, blocked = (sets.blocked & bit) != 0;
  // Pending and deliverable: it takes the signal when it runs. Delivered and blocked: it is in
  // the handler (the program cannot block the signal: the router strips it from its masks, and
  // one it blocks by a raw system call stays pending) and answers when it runs.
  return pending != blocked;
}

namespace {

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
  if (detail::g_slots_exhausted.load() && *anonymous_budget > 0) {
    --*anonymous_budget;
    return true;
  }
  return false;
}

}  // namespace

namespace detail {
void strip_router_signals(sigset_t* set) noexcept {
  strip_protected(set);
  sigdelset(set, kGlibcInternalFirst);
  sigdelset(set, kGlibcInternalLast);
}
int installed_fixup_signal() noexcept { return g_fixup_signal.load(std::memory_order_relaxed); }
std::uintptr_t router_handler_for(int sig) noexcept {
  if (sig == SIGTRAP) return reinterpret_cast<std::uintptr_t>(&trap_handler);
  if (sig == g_fixup_signal.load(std::memory_order_relaxed)) return reinterpret_cast<std::uintptr_t>(&fixup_handler);
  return 0;
}

Status ensure_router() noexcept {
  int state = g_router_state.load(std::memory_order_acquire);
  if (state == 2 || state == 4) return {};
  if (state == 0 && g_router_state.compare_exchange_strong(state, 1)) {
    Status s = install();
    g_router_state.store(s.ok() ? 2 : 3, std::memory_order_release);
    return s;
  }
  while ((state = g_router_state.load(std::memory_order_acquire)) == 1) sched_yield();
  if (state == 2 || state == 4) return {};  // 4: the fix-up handler serves eject's last watch
  return Status::error("the signal router could not be installed (see the first error printed by tramway)");
}
}  // namespace detail

Status install_signal_router() { return detail::ensure_router(); }

std::atomic<bool> g_loaded_late{false};

std::vector<int> detail::wrapped_signals() {
  std::vector<int> out;
  for (int sig = 1; sig < NSIG; ++sig) {
    struct sigaction cur {};
    if (__sigaction(sig, nullptr, &cur) == 0 && reinterpret_cast<std::uintptr_t>(cur.sa_sigaction) ==
                                                    reinterpret_cast<std::uintptr_t>(&wrapper)) {
      out.push_back(sig);
    }
  }
  return out;
}

void detail::bring_interposers_in_front() noexcept {
  g_loaded_late.store(true, std::memory_order_release);
  redirect_signal_calls();
}
bool detail::interposers_brought_in_front() noexcept { return g_loaded_late.load(std::memory_order_acquire); }

Status detail::give_back_signals() {
  // The program's objects call libc's functions again from now on.
  if (g_loaded_late.exchange(false)) restore_signal_calls();
  int expected = 2;
  if (!g_router_state.compare_exchange_strong(expected, 4)) return {};
  const int fixup = g_fixup_signal.load(std::memory_order_relaxed);
  std::string failed;
  UserLock lock;
  for (int sig = 1; sig < NSIG; ++sig) {
    if (never_routed(sig) || sig == fixup) continue;
    struct sigaction cur {};
    if (__sigaction(sig, nullptr, &cur) != 0 || !is_ours(reinterpret_cast<std::uintptr_t>(cur.sa_handler))) continue;
    if (__sigaction(sig, &g_user[sig].full, nullptr) != 0) failed += (failed.empty() ? "" : ", ") + std::to_string(sig);
  }
  if (!failed.empty()) return Status::error("could not give back the handlers of signals " + failed);
  return {};
}

Status detail::release_fixup_signal() {
  const int fixup = g_fixup_signal.load(std::memory_order_relaxed);
  // Ignored first: that discards a fix-up signal still pending for some thread, which the
  // original disposition (the default: terminate) would act on.
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  if (__sigaction(fixup, &ignore, nullptr) != 0 || __sigaction(fixup, &g_fixup_original, nullptr) != 0) {
    return Status::error(std::string("could not give back signal ") + std::to_string(fixup) + ": " + std::strerror(errno), errno);
  }
  return {};
}

Status detail::take_signals_again() {
  int expected = 4;
  if (g_router_state.compare_exchange_strong(expected, 0)) g_fixup_signal.store(0, std::memory_order_relaxed);
  return ensure_router();
}

int fixup_signal() noexcept {
  (void)detail::ensure_router();
  return g_fixup_signal.load(std::memory_order_relaxed);
}

std::size_t interrupted_pcs(std::uintptr_t* out, std::size_t capacity) noexcept {
  ThreadSlot* s = t_slot;
  if (!s) return 0;
  // Our own frame address, not a callee's: dead frames may overlap this function's frame.
  const std::uint32_t depth = prune_dead_frames(s, reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0)));
  std::size_t n = 0;
  for (std::uint32_t i = 0; i < depth && i < kMaxNest && n < capacity; ++i) {
    const std::uintptr_t f = s->frames[i].load(std::memory_order_relaxed);
    if (detail::own_frame_live(s, i, f)) out[n++] = arch::context_pc(frame_context(f));
  }
  return n;
}

namespace {

// Guarded by g_move_mutex. Tables of closed requests, freed once no handler reads them; the
// last one freed is kept for the next request, so a batch does not allocate every time.
MoveTable* g_spare_move_table = nullptr;
struct RetiredMoveTables {
  std::vector<MoveTable*> tables;
  ~RetiredMoveTables() {  // at unload after an eject: no handler reads any of them
    for (MoveTable* t : tables) delete t;
    delete g_spare_move_table;
    g_spare_move_table = nullptr;
  }
};
common::UnloadFreed<RetiredMoveTables> g_retired_move_tables;
std::vector<MoveTable*>& retired_move_tables() { return g_retired_move_tables.get().tables; }

void free_retired_move_tables_if_unread() {
  auto& retired = retired_move_tables();
  if (retired.empty() || g_request.readers.load(std::memory_order_seq_cst) != 0) return;
  for (MoveTable* t : retired) {
    delete g_spare_move_table;
    g_spare_move_table = t;
  }
  retired.clear();
}

MoveTable* take_move_table(std::span<const PcMove> moves) {
  MoveTable* t = g_spare_move_table ? g_spare_move_table : new MoveTable;
  g_spare_move_table = nullptr;
  t->moves.assign(moves.begin(), moves.end());
  t->moved.store(0, std::memory_order_relaxed);
  return t;
}

std::string range_text(const PcMove& m) { return common::range_text(m.begin, m.end); }

// "[b, e)" for one range, "3 ranges ([b, e), [b, e), [b, e))" for a few, the first 4 for more.
std::string ranges_text(std::span<const PcMove> moves) {
  if (moves.size() == 1) return range_text(moves[0]);
  std::string s = std::to_string(moves.size()) + " ranges (";
  for (std::size_t i = 0; i < moves.size() && i < 4; ++i) s += (i ? ", " : "") + range_text(moves[i]);
  return s + (moves.size() > 4 ? ", ...)" : ")");
}

// `entry_frame`: the frame address of the public entry point. The caller's recorded frames
// below it are dead (a live handler frame lies above the code it runs), and their memory may
// now be part of our own frames: they must be pruned with this address, not with the deeper
// stack pointer of some callee of ours.
Result<MoveReport> move_pcs_from(std::span<const PcMove> moves, std::chrono::milliseconds timeout,
                                 std::uintptr_t entry_frame);

}  // namespace

Result<MoveReport> move_pcs(std::uintptr_t begin, std::uintptr_t end, std::uintptr_t destination,
                            std::chrono::milliseconds timeout) {
  const PcMove one{begin, end, destination};
  return move_pcs_from(std::span(&one, 1), timeout, reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0)));
}

Result<MoveReport> move_pcs(std::span<const PcMove> moves, std::chrono::milliseconds timeout) {
  return move_pcs_from(moves, timeout, reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0)));
}

namespace {

Result<MoveReport> move_pcs_from(std::span<const PcMove> moves, std::chrono::milliseconds timeout,
                                 std::uintptr_t entry_frame) {
  if (Status s = detail::ensure_router(); !s.ok()) return s;
  for (std::size_t i = 0; i < moves.size(); ++i) {
    if (moves[i].begin >= moves[i].end) return Status::error("move_pcs: empty range " + range_text(moves[i]));
    if (i > 0 && moves[i].begin < moves[i - 1].end) {
      return Status::error("move_pcs: ranges must be sorted and disjoint, got " + range_text(moves[i - 1]) +
                           " before " + range_text(moves[i]));
    }
  }
  if (moves.empty()) return MoveReport{};
  pthread_mutex_lock(&g_move_mutex);
  struct Unlock { ~Unlock() { pthread_mutex_unlock(&g_move_mutex); } } unlock;

  free_retired_move_tables_if_unread();
  MoveTable* table = take_move_table(moves);
  const PcMove* own = table->moves.data();
  const std::size_t n = table->moves.size();
  const std::uint64_t gen = g_request.generation.load(std::memory_order_relaxed) + 1;  // odd
  g_request.anonymous_acks.store(0, std::memory_order_relaxed);
  g_request.table.store(table, std::memory_order_seq_cst);
  g_request.generation.store(gen, std::memory_order_seq_cst);
  // Closing: a handler that reads the generation from now on does nothing; one that loaded
  // the table before keeps it alive through `readers`.
  struct Close {
    std::uint64_t g;
    MoveTable* t;
    ~Close() {
      g_request.generation.store(g + 1, std::memory_order_seq_cst);
      g_request.table.store(nullptr, std::memory_order_seq_cst);
      retired_move_tables().push_back(t);
      free_retired_move_tables_if_unread();
    }
  } close{gen, table};

  std::vector<PcRange> ranges(n);
  for (std::size_t i = 0; i < n; ++i) ranges[i] = {own[i].begin, own[i].end};
  auto outside = [&](pid_t tid) {
    return detail::prove_outside(tid, ranges, detail::TrapFrames::skip).proven;
  };
  MoveReport report;
  const pid_t me = common::current_tid();
  const pid_t pid = ::getpid();
  if (ThreadSlot* s = t_slot) {
    prune_dead_frames(s, entry_frame);
    report.pcs_moved += move_own_frames(s, own, n);
  }

  detail::reclaim_dead_slots(me);

  std::vector<pid_t> waiting;
  for (pid_t tid : common::list_threads()) {
    if (tid == me) continue;
    ++report.threads_seen;
    if (outside(tid)) {
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
    const std::int64_t waited_ns = common::monotonic_ns() - start_ns;
    if (waited_ns >= static_cast<std::int64_t>(timeout.count()) * 1'000'000) {
      // Last chance: a thread that cannot run our handler (stopped, traced, signal blocked
      // by a raw system call) may still be provably outside, or exiting (it runs no more code).
      std::erase_if(waiting, [&](pid_t tid) { return outside(tid) || common::probe_task(tid).gone; });
      if (waiting.empty()) break;
      const int sig = g_fixup_signal.load(std::memory_order_relaxed);
      const bool only_starved = waited_ns < detail::kFixupRunnableLimitNs &&
                                std::all_of(waiting.begin(), waiting.end(), [&](pid_t tid) {
                                  return detail::waiting_for_cpu(common::probe_task(tid).state, common::signal_sets(tid), sig);
                                });
      if (only_starved) {  // they will answer once they get a CPU
        const timespec pause{0, 1'000'000};
        nanosleep(&pause, nullptr);
        continue;
      }
      std::string who;
      for (pid_t tid : waiting) who += (who.empty() ? "" : "; ") + describe_holdout(tid, gen);
      return Status::error("PC fix-up for " + ranges_text(moves) + ": no answer within " +
                           std::to_string(timeout.count()) + " ms from " + who +
                           ". A stopped or traced thread cannot run the fix-up handler; resume it (SIGCONT, "
                           "or detach the debugger) and retry" + detail::debugger_note());
    }
    if (round < 64) {
      sched_yield();
    } else {
      pause_ns = pause_ns ? std::min(pause_ns * 2, 1'000'000L) : 20'000L;
      const timespec pause{0, pause_ns};
      nanosleep(&pause, nullptr);
    }
  }
  report.pcs_moved += table->moved.load(std::memory_order_acquire);
  return report;
}

}  // namespace

}  // namespace tramway::text

// ---- interposition ------------------------------------------------------------------------------
using tramway::text::g_fixup_signal;
using tramway::text::g_user;
using tramway::text::UserLock;

extern "C" {

__attribute__((visibility("default"))) int sigaction(int sig, const struct sigaction* act,
                                                     struct sigaction* old) noexcept {
  using namespace tramway::text;
  if (sig <= 0 || sig >= NSIG || never_routed(sig) || !detail::ensure_router().ok()) {
    return __sigaction(sig, act, old);
  }
  const auto h = act ? reinterpret_cast<std::uintptr_t>(act->sa_handler) : 0;
  if (sig == g_fixup_signal.load(std::memory_order_relaxed) && act && is_function(h)) {
    detail::report_fixup_signal_use("sigaction");
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
        k.sa_flags = wrapper_flags(k.sa_flags);
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
    // Blocking the fix-up signal by name (not with every signal) means the program wants to
    // read it: later batches look for a thread or a signalfd waiting for it (batch_precheck.cc).
    // Not SIG_SETMASK: restoring a mask saved inside one of the router's handlers names it too.
    if (how == SIG_BLOCK && tramway::text::detail::names_fixup_signal(&copy)) tramway::text::detail::note_fixup_use();
    tramway::text::detail::strip_router_signals(&copy);
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

namespace tramway::text::detail {

std::uintptr_t interposer_address(const char* name) noexcept {
  struct Entry {
    const char* name;
    std::uintptr_t address;
  };
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // sigset: interposed, not used
  static const Entry entries[] = {
      {"sigaction", reinterpret_cast<std::uintptr_t>(&::sigaction)},
      {"signal", reinterpret_cast<std::uintptr_t>(&::signal)},
      {"sigprocmask", reinterpret_cast<std::uintptr_t>(&::sigprocmask)},
      {"pthread_sigmask", reinterpret_cast<std::uintptr_t>(&::pthread_sigmask)},
      {"sigset", reinterpret_cast<std::uintptr_t>(&::sigset)},
      {"bsd_signal", reinterpret_cast<std::uintptr_t>(&::bsd_signal)},
      {"sysv_signal", reinterpret_cast<std::uintptr_t>(&::sysv_signal)},
      {"__sysv_signal", reinterpret_cast<std::uintptr_t>(&::__sysv_signal)},
  };
#pragma GCC diagnostic pop
  for (const Entry& e : entries) {
    if (std::strcmp(e.name, name) == 0) return e.address;
  }
  return 0;
}

}  // namespace tramway::text::detail
