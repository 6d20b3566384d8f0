// text/signal_router.h (DESIGN invariants 2 and 4): the program keeps seeing its own signal
// handlers and dispositions while tramway owns SIGTRAP and a fix-up signal; every handler's
// interrupted context is recorded, so move_pcs() moves threads out of a range wherever they
// were interrupted, without disturbing threads it can prove are outside.
#include "bounded_child.h"
#include "tramway/text/signal_router.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "arch/x86_64/emulate.h"
#include "common/proc.h"
#include "text/internal.h"
#include "tramway/text/code_memory.h"

namespace {

using namespace std::chrono_literals;

// What the kernel really has installed (bypassing the interposed sigaction).
struct KernelSigaction {
  void* handler;
  unsigned long flags;
  void* restorer;
  std::uint64_t mask;
};
void* kernel_handler(int sig) {
  KernelSigaction k{};
  EXPECT_EQ(syscall(SYS_rt_sigaction, sig, nullptr, &k, 8), 0);
  return k.handler;
}
std::uint64_t kernel_mask() {
  std::uint64_t m = 0;
  EXPECT_EQ(syscall(SYS_rt_sigprocmask, SIG_BLOCK, nullptr, &m, 8), 0);
  return m;
}
bool in_mask(std::uint64_t m, int sig) { return (m >> (sig - 1)) & 1; }

struct sigaction make_action(void (*h)(int, siginfo_t*, void*), int flags = 0) {
  struct sigaction a {};
  a.sa_sigaction = h;
  a.sa_flags = SA_SIGINFO | flags;
  sigemptyset(&a.sa_mask);
  return a;
}

// Restores a signal's disposition (as the program sees it) when the test ends.
class SavedAction {
 public:
  explicit SavedAction(int sig) : sig_(sig) { EXPECT_EQ(sigaction(sig, nullptr, &old_), 0); }
  ~SavedAction() { sigaction(sig_, &old_, nullptr); }

 private:
  int sig_;
  struct sigaction old_ {};
};

using bounded::in_child;

bool wait_until(const std::function<bool()>& cond, std::chrono::milliseconds limit = 5000ms) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(100us);
  }
  return true;
}

// ---- the program's own SIGTRAP ---------------------------------------------------------------

std::atomic<int> g_traps{0};
std::atomic<int> g_trap_code{0};
std::atomic<std::uintptr_t> g_trap_pc{0};
std::atomic<std::size_t> g_trap_depth{0};
void on_trap(int sig, siginfo_t* si, void* uc) {
  if (sig != SIGTRAP) return;
  g_trap_code = si->si_code;
  g_trap_pc = tramway::arch::context_pc(static_cast<ucontext_t*>(uc));
  std::uintptr_t pcs[8];
  g_trap_depth = tramway::text::interrupted_pcs(pcs, 8);
  g_traps.fetch_add(1);
}

TEST(SignalRouter, ProgramSigtrapHandlerSeesRaiseAndInt3) {
  SavedAction saved(SIGTRAP);
  struct sigaction act = make_action(on_trap);
  ASSERT_EQ(sigaction(SIGTRAP, &act, nullptr), 0);

  g_traps = 0;
  ASSERT_EQ(raise(SIGTRAP), 0);
  EXPECT_EQ(g_traps.load(), 1);
  EXPECT_EQ(g_trap_code.load(), SI_TKILL);
  EXPECT_EQ(g_trap_depth.load(), 1u);

  // A real int3 that is not tramway's: chained to the program's handler, which sees the PC
  // just after it, and execution continues there.
  std::uintptr_t after;
  __asm__ volatile("int3\n\tlea 0(%%rip), %0" : "=r"(after));
  EXPECT_EQ(g_traps.load(), 2);
  EXPECT_EQ(g_trap_code.load(), SI_KERNEL);
  EXPECT_EQ(g_trap_pc.load(), after - 7);  // the lea is 7 bytes
  EXPECT_EQ(reinterpret_cast<const std::uint8_t*>(g_trap_pc.load())[-1], 0xcc);

  // The two-byte form `int $3` too.
  __asm__ volatile(".byte 0xcd, 0x03");
  EXPECT_EQ(g_traps.load(), 3);
  EXPECT_EQ(g_trap_code.load(), SI_KERNEL);
}

TEST(SignalRouter, QueryReportsTheProgramsHandlerNotTramways) {
  SavedAction saved(SIGTRAP);
  struct sigaction act = make_action(on_trap, SA_RESTART);
  sigaddset(&act.sa_mask, SIGUSR2);
  ASSERT_EQ(sigaction(SIGTRAP, &act, nullptr), 0);
  struct sigaction old {};
  ASSERT_EQ(sigaction(SIGTRAP, nullptr, &old), 0);
  EXPECT_EQ(old.sa_sigaction, &on_trap);
  EXPECT_TRUE(old.sa_flags & SA_SIGINFO);
  EXPECT_TRUE(old.sa_flags & SA_RESTART);
  EXPECT_TRUE(sigismember(&old.sa_mask, SIGUSR2));
  // ...while the kernel still runs tramway's router for SIGTRAP.
  EXPECT_NE(kernel_handler(SIGTRAP), reinterpret_cast<void*>(&on_trap));
  EXPECT_NE(kernel_handler(SIGTRAP), reinterpret_cast<void*>(SIG_DFL));

  // And a handler for an ordinary signal runs behind tramway's wrapper, invisibly.
  SavedAction saved_usr1(SIGUSR1);
  ASSERT_EQ(sigaction(SIGUSR1, &act, nullptr), 0);
  ASSERT_EQ(sigaction(SIGUSR1, nullptr, &old), 0);
  EXPECT_EQ(old.sa_sigaction, &on_trap);
  EXPECT_NE(kernel_handler(SIGUSR1), reinterpret_cast<void*>(&on_trap));
}

std::atomic<int> g_h1{0}, g_h2{0};
void h1(int) { g_h1.fetch_add(1); }
void h2(int) { g_h2.fetch_add(1); }

TEST(SignalRouter, SignalReturnsThePreviousHandler) {
  SavedAction saved(SIGUSR1);
  EXPECT_EQ(signal(SIGUSR1, h1), SIG_DFL);
  EXPECT_EQ(signal(SIGUSR1, h2), &h1);
  EXPECT_EQ(signal(SIGUSR1, SIG_IGN), &h2);
  g_h2 = 0;
  ASSERT_EQ(raise(SIGUSR1), 0);  // ignored
  EXPECT_EQ(g_h2.load(), 0);
  EXPECT_EQ(signal(SIGUSR1, SIG_DFL), SIG_IGN);

  SavedAction saved_trap(SIGTRAP);
  EXPECT_EQ(signal(SIGTRAP, h1), SIG_DFL);
  EXPECT_EQ(signal(SIGTRAP, h2), &h1);
  struct sigaction q {};
  ASSERT_EQ(sigaction(SIGTRAP, nullptr, &q), 0);
  EXPECT_EQ(q.sa_handler, &h2);
  EXPECT_FALSE(q.sa_flags & SA_SIGINFO);
  EXPECT_EQ(signal(SIGTRAP, SIG_DFL), &h2);
  EXPECT_EQ(signal(SIGRTMIN, SIG_ERR), SIG_ERR);
}

// A plain one-argument handler (no SA_SIGINFO), installed by signal() or sigaction(), runs.
TEST(SignalRouter, PlainOneArgumentHandlerRuns) {
  SavedAction saved(SIGUSR1), saved_trap(SIGTRAP);
  ASSERT_NE(signal(SIGUSR1, h1), SIG_ERR);
  ASSERT_NE(signal(SIGTRAP, h2), SIG_ERR);
  g_h1 = g_h2 = 0;
  ASSERT_EQ(raise(SIGUSR1), 0);
  EXPECT_EQ(g_h1.load(), 1);
  ASSERT_EQ(raise(SIGTRAP), 0);
  EXPECT_EQ(g_h2.load(), 1);
  __asm__ volatile("int3");
  EXPECT_EQ(g_h2.load(), 2);
}

std::atomic<int> g_oneshot{0};
void oneshot(int, siginfo_t*, void*) { g_oneshot.fetch_add(1); }

TEST(SignalRouter, ResetHandRunsOnceThenReportsDefault) {
  SavedAction saved(SIGUSR1);
  struct sigaction act = make_action(oneshot, SA_RESETHAND);
  ASSERT_EQ(sigaction(SIGUSR1, &act, nullptr), 0);
  g_oneshot = 0;
  ASSERT_EQ(raise(SIGUSR1), 0);
  EXPECT_EQ(g_oneshot.load(), 1);
  struct sigaction now {};
  ASSERT_EQ(sigaction(SIGUSR1, nullptr, &now), 0);
  EXPECT_EQ(now.sa_handler, SIG_DFL);
  EXPECT_EQ(kernel_handler(SIGUSR1), reinterpret_cast<void*>(SIG_DFL));

  // SIGTRAP too, although the kernel's SIGTRAP handler stays tramway's: a second one is fatal.
  const int status = in_child([] {
    struct sigaction t = make_action(oneshot, SA_RESETHAND);
    if (sigaction(SIGTRAP, &t, nullptr) != 0) _exit(2);
    g_oneshot = 0;
    raise(SIGTRAP);
    if (g_oneshot.load() != 1) _exit(3);
    struct sigaction q {};
    if (sigaction(SIGTRAP, nullptr, &q) != 0 || q.sa_handler != SIG_DFL) _exit(4);
    raise(SIGTRAP);  // default action now
    _exit(5);
  });
  EXPECT_TRUE(WIFSIGNALED(status)) << "exit " << WEXITSTATUS(status);
  if (WIFSIGNALED(status)) {
    EXPECT_EQ(WTERMSIG(status), SIGTRAP);
  }
}

// ---- handlers see their siginfo, their context, and the interrupted PCs -----------------------

struct Seen {
  std::atomic<int> signo{0}, code{0}, value{0};
  std::atomic<bool> have_context{false};
  std::atomic<std::uintptr_t> context_pc{0};
  std::atomic<std::size_t> depth{0};
  std::uintptr_t pcs[4] = {};
  std::atomic<std::size_t> depth_after_nested{0};
  std::atomic<std::uint64_t> mask{0};
};
Seen g_usr1, g_usr2;

void record(Seen& s, int sig, siginfo_t* si, void* uc) {
  s.signo = si->si_signo;
  s.code = si->si_code;
  s.value = si->si_value.sival_int;
  s.have_context = uc != nullptr;
  s.context_pc = uc ? tramway::arch::context_pc(static_cast<ucontext_t*>(uc)) : 0;
  s.depth = tramway::text::interrupted_pcs(s.pcs, 4);
  (void)sig;
  std::uint64_t m = 0;
  syscall(SYS_rt_sigprocmask, SIG_BLOCK, nullptr, &m, 8);
  s.mask = m;
}
void on_usr2(int sig, siginfo_t* si, void* uc) { record(g_usr2, sig, si, uc); }
std::atomic<bool> g_usr1_nests{false};
void on_usr1(int sig, siginfo_t* si, void* uc) {
  record(g_usr1, sig, si, uc);
  if (g_usr1_nests) {
    raise(SIGUSR2);
    std::uintptr_t pcs[4];
    g_usr1.depth_after_nested = tramway::text::interrupted_pcs(pcs, 4);
  }
}

TEST(SignalRouter, HandlerGetsSiginfoContextAndOneInterruptedPc) {
  SavedAction saved(SIGUSR1);
  struct sigaction act = make_action(on_usr1);
  ASSERT_EQ(sigaction(SIGUSR1, &act, nullptr), 0);
  g_usr1_nests = false;
  sigval v{};
  v.sival_int = 4242;
  ASSERT_EQ(pthread_sigqueue(pthread_self(), SIGUSR1, v), 0);
  EXPECT_EQ(g_usr1.signo.load(), SIGUSR1);
  EXPECT_EQ(g_usr1.code.load(), SI_QUEUE);
  EXPECT_EQ(g_usr1.value.load(), 4242);
  EXPECT_TRUE(g_usr1.have_context.load());
  ASSERT_EQ(g_usr1.depth.load(), 1u);
  EXPECT_EQ(g_usr1.pcs[0], g_usr1.context_pc.load());
  EXPECT_NE(g_usr1.pcs[0], 0u);
  // Outside any handler: none.
  std::uintptr_t pcs[4];
  EXPECT_EQ(tramway::text::interrupted_pcs(pcs, 4), 0u);
}

TEST(SignalRouter, NestedHandlerSeesBothInterruptedPcs) {
  SavedAction saved1(SIGUSR1), saved2(SIGUSR2);
  struct sigaction a1 = make_action(on_usr1), a2 = make_action(on_usr2);
  ASSERT_EQ(sigaction(SIGUSR1, &a1, nullptr), 0);
  ASSERT_EQ(sigaction(SIGUSR2, &a2, nullptr), 0);
  g_usr1_nests = true;
  // Sent by another path than raise(), so the two interrupted PCs differ.
  ASSERT_EQ(pthread_sigqueue(pthread_self(), SIGUSR1, sigval{}), 0);
  g_usr1_nests = false;
  EXPECT_EQ(g_usr1.depth.load(), 1u);
  ASSERT_EQ(g_usr2.depth.load(), 2u);
  EXPECT_EQ(g_usr2.pcs[0], g_usr1.context_pc.load());  // outermost first
  EXPECT_EQ(g_usr2.pcs[1], g_usr2.context_pc.load());  // the PC inside the SIGUSR1 handler
  EXPECT_NE(g_usr2.pcs[0], g_usr2.pcs[1]);
  EXPECT_EQ(g_usr1.depth_after_nested.load(), 1u);     // popped when SIGUSR2's handler returned
  std::uintptr_t pcs[4];
  EXPECT_EQ(tramway::text::interrupted_pcs(pcs, 4), 0u);
  // Capacity is honoured.
  EXPECT_LE(tramway::text::interrupted_pcs(pcs, 0), 0u);
}

// The handler's frame lies below the stack pointer the thread had when the signal came; once
// the handler returned, a call deeper than that frame reuses its memory. The record must not
// take it for a live frame then (the fix-up handler would write into that memory).
__attribute__((noinline)) std::size_t interrupted_pcs_from_deep_in_the_stack() {
  volatile char deep[64 * 1024];
  for (std::size_t i = 0; i < sizeof deep; i += 512) deep[i] = static_cast<char>(i);
  std::uintptr_t pcs[4];
  const std::size_t n = tramway::text::interrupted_pcs(pcs, 4);
  return n + static_cast<std::size_t>(deep[0]);
}

TEST(SignalRouter, AReturnedHandlersFrameIsDeadEvenWhenTheStackGrowsPastIt) {
  SavedAction saved(SIGUSR1);
  struct sigaction act = make_action(on_usr1);
  ASSERT_EQ(sigaction(SIGUSR1, &act, nullptr), 0);
  g_usr1_nests = false;
  ASSERT_EQ(pthread_sigqueue(pthread_self(), SIGUSR1, sigval{}), 0);
  ASSERT_EQ(g_usr1.depth.load(), 1u);
  EXPECT_EQ(interrupted_pcs_from_deep_in_the_stack(), 0u);
}

// ---- the fix-up signal and masks -------------------------------------------------------------

TEST(SignalRouter, FixupSignalIsReserved) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  const int fix = tramway::text::fixup_signal();
  EXPECT_GE(fix, SIGRTMIN);
  EXPECT_LE(fix, SIGRTMAX);
  struct sigaction act = make_action(on_usr1);
  errno = 0;
  EXPECT_EQ(sigaction(fix, &act, nullptr), -1);
  EXPECT_EQ(errno, EINVAL);
  errno = 0;
  EXPECT_EQ(signal(fix, h1), SIG_ERR);
  EXPECT_EQ(errno, EINVAL);
  struct sigaction q {};
  EXPECT_EQ(sigaction(fix, nullptr, &q), 0);
  EXPECT_NE(kernel_handler(fix), reinterpret_cast<void*>(&on_usr1));
  EXPECT_NE(kernel_handler(fix), reinterpret_cast<void*>(SIG_DFL));
}

TEST(SignalRouter, BlockingEverythingLeavesTrapAndFixupDeliverable) {
  const int fix = tramway::text::fixup_signal();
  sigset_t all, old, cur;
  sigfillset(&all);
  ASSERT_EQ(pthread_sigmask(SIG_BLOCK, &all, &old), 0);
  ASSERT_EQ(pthread_sigmask(SIG_SETMASK, nullptr, &cur), 0);
  EXPECT_FALSE(sigismember(&cur, SIGTRAP));
  EXPECT_FALSE(sigismember(&cur, fix));
  EXPECT_TRUE(sigismember(&cur, SIGUSR1));
  EXPECT_TRUE(sigismember(&cur, SIGTERM));
  const std::uint64_t k = kernel_mask();
  EXPECT_FALSE(in_mask(k, SIGTRAP));
  EXPECT_FALSE(in_mask(k, fix));
  EXPECT_TRUE(in_mask(k, SIGUSR1));
  ASSERT_EQ(pthread_sigmask(SIG_SETMASK, &old, nullptr), 0);

  ASSERT_EQ(sigprocmask(SIG_SETMASK, &all, &old), 0);
  EXPECT_FALSE(in_mask(kernel_mask(), SIGTRAP));
  EXPECT_FALSE(in_mask(kernel_mask(), fix));
  EXPECT_TRUE(in_mask(kernel_mask(), SIGINT));
  ASSERT_EQ(sigprocmask(SIG_SETMASK, &old, nullptr), 0);
  EXPECT_FALSE(in_mask(kernel_mask(), SIGUSR1));
}

TEST(SignalRouter, HandlerMaskLeavesTrapAndFixupDeliverable) {
  SavedAction saved(SIGUSR1);
  struct sigaction act = make_action(on_usr1);
  sigfillset(&act.sa_mask);
  ASSERT_EQ(sigaction(SIGUSR1, &act, nullptr), 0);
  g_usr1_nests = false;
  ASSERT_EQ(raise(SIGUSR1), 0);
  const std::uint64_t m = g_usr1.mask.load();  // the mask while the handler ran
  EXPECT_TRUE(in_mask(m, SIGUSR2));
  EXPECT_TRUE(in_mask(m, SIGUSR1));
  EXPECT_FALSE(in_mask(m, SIGTRAP));
  EXPECT_FALSE(in_mask(m, tramway::text::fixup_signal()));
}

// ---- default actions ------------------------------------------------------------------------------

TEST(SignalRouter, Int3WithoutAHandlerKillsWithSigtrap) {
  int status = in_child([] {
    signal(SIGTRAP, SIG_DFL);
    __asm__ volatile("int3");
    _exit(1);  // survived
  });
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGTRAP);

  status = in_child([] {
    signal(SIGTRAP, SIG_DFL);
    __asm__ volatile(".byte 0xcd, 0x03");  // int $3
    _exit(1);
  });
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGTRAP);

  status = in_child([] {
    signal(SIGTRAP, SIG_DFL);
    raise(SIGTRAP);
    _exit(1);
  });
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGTRAP);
}

TEST(SignalRouter, IgnoredSigtrapIgnoresRaiseButNotInt3) {
  // As the kernel does: an ignored SIGTRAP sent by kill is discarded, an int3 still kills.
  const int status = in_child([] {
    if (signal(SIGTRAP, SIG_IGN) == SIG_ERR) _exit(2);
    raise(SIGTRAP);
    __asm__ volatile("int3");
    _exit(1);
  });
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGTRAP);
}

// ---- move_pcs ---------------------------------------------------------------------------------------

// Generated code a thread spins in until its PC is moved to `exit`:
//   spin: incq (%rdi); pause; jmp spin
//   exit: ret
struct Spin {
  tramway::text::CodeBlock block;
  std::uintptr_t begin() const { return reinterpret_cast<std::uintptr_t>(block.rx); }
  std::uintptr_t end() const { return begin() + 7; }
  std::uintptr_t exit() const { return begin() + 7; }
  void run(std::uint64_t* counter) const { reinterpret_cast<void (*)(std::uint64_t*)>(block.rx)(counter); }
};
Spin make_spin() {
  auto b = tramway::text::allocate_code(16);
  EXPECT_TRUE(b.ok()) << b.status().message();
  const std::uint8_t code[] = {0x48, 0xff, 0x07, 0xf3, 0x90, 0xeb, 0xf9, 0xc3};
  std::memcpy(b->rw, code, sizeof code);
  return {*b};
}
std::uint64_t load(const std::uint64_t& v) { return __atomic_load_n(&v, __ATOMIC_RELAXED); }

TEST(MovePcs, RejectsAnEmptyRange) {
  auto r = tramway::text::move_pcs(0x2000, 0x1000, 0x3000);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("empty range"), std::string::npos) << r.status().message();
}

TEST(MovePcs, NoOtherThreads) {
  auto r = tramway::text::move_pcs(0x1000, 0x2000, 0x3000);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->threads_seen, static_cast<int>(tramway::common::list_threads().size()) - 1);
  EXPECT_EQ(r->pcs_moved, 0);
}

TEST(MovePcs, MovesASpinningThreadOut) {
  const Spin s = make_spin();
  alignas(8) std::uint64_t counter = 0;
  std::atomic<bool> returned{false};
  std::thread t([&] {
    s.run(&counter);
    returned = true;
  });
  ASSERT_TRUE(wait_until([&] { return load(counter) > 0; }));  // it is inside the region
  auto r = tramway::text::move_pcs(s.begin(), s.end(), s.exit());
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_GE(r->threads_seen, 1);
  EXPECT_GE(r->threads_signalled, 1);
  EXPECT_GE(r->pcs_moved, 1);
  if (!wait_until([&] { return returned.load(); })) {
    t.detach();
    FAIL() << "the thread is still spinning in the region";
  }
  t.join();
}

std::atomic<bool> g_spin_handler_started{false}, g_spin_handler_release{false};
void spin_in_handler(int, siginfo_t*, void*) {
  g_spin_handler_started = true;
  while (!g_spin_handler_release.load()) {
  }
}

TEST(MovePcs, MovesTheNestedFrameOfAThreadInsideASignalHandler) {
  SavedAction saved(SIGUSR1);
  struct sigaction act = make_action(spin_in_handler);
  ASSERT_EQ(sigaction(SIGUSR1, &act, nullptr), 0);
  const Spin s = make_spin();
  alignas(8) std::uint64_t counter = 0;
  std::atomic<bool> returned{false};
  std::thread t([&] {
    s.run(&counter);
    returned = true;
  });
  ASSERT_TRUE(wait_until([&] { return load(counter) > 0; }));
  ASSERT_EQ(pthread_kill(t.native_handle(), SIGUSR1), 0);
  ASSERT_TRUE(wait_until([] { return g_spin_handler_started.load(); }));
  // The thread's live PC is in the handler, outside the range; its interrupted PC (the
  // nested frame) is inside.
  auto r = tramway::text::move_pcs(s.begin(), s.end(), s.exit());
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_GE(r->pcs_moved, 1);
  const std::uint64_t frozen = load(counter);
  g_spin_handler_release = true;
  if (!wait_until([&] { return returned.load(); })) {
    t.detach();
    FAIL() << "the thread went back into the region after its handler";
  }
  t.join();
  EXPECT_EQ(load(counter), frozen);  // it never ran the loop again
}

int g_handler_pipe = -1;
std::atomic<bool> g_blocked_handler_started{false};
std::atomic<long> g_blocked_handler_read{0};
void block_in_handler(int, siginfo_t*, void*) {
  g_blocked_handler_started = true;
  char c;
  g_blocked_handler_read = read(g_handler_pipe, &c, 1);  // SA_RESTART: not cut short by tramway
}

TEST(MovePcs, BlockedThreadWithANestedFrameInsideIsStillMoved) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  g_handler_pipe = fds[0];
  SavedAction saved(SIGUSR1);
  struct sigaction act = make_action(block_in_handler, SA_RESTART);
  ASSERT_EQ(sigaction(SIGUSR1, &act, nullptr), 0);
  const Spin s = make_spin();
  alignas(8) std::uint64_t counter = 0;
  std::atomic<bool> returned{false};
  std::atomic<pid_t> tid{0};
  std::thread t([&] {
    tid = tramway::common::current_tid();
    s.run(&counter);
    returned = true;
  });
  ASSERT_TRUE(wait_until([&] { return load(counter) > 0; }));
  ASSERT_EQ(pthread_kill(t.native_handle(), SIGUSR1), 0);
  ASSERT_TRUE(wait_until([&] {
    const auto p = tramway::common::probe_task(tid);
    return g_blocked_handler_started.load() && !p.running && p.syscall == SYS_read;
  }));
  // Its live PC (in read) is outside the range, but not its interrupted one.
  auto r = tramway::text::move_pcs(s.begin(), s.end(), s.exit());
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_GE(r->pcs_moved, 1);
  EXPECT_GE(r->threads_signalled, 1);
  ASSERT_EQ(write(fds[1], "x", 1), 1);
  if (!wait_until([&] { return returned.load(); })) {
    t.detach();
    FAIL() << "the thread went back into the region after its handler";
  }
  t.join();
  EXPECT_EQ(g_blocked_handler_read.load(), 1);  // the read was restarted, not failed with EINTR
  close(fds[0]);
  close(fds[1]);
}

TEST(MovePcs, ThreadBlockedInPollIsObservedNotDisturbed) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  std::atomic<pid_t> tid{0};
  std::atomic<bool> done{false};
  int rc = 0, err = 0;
  short revents = 0;
  std::thread t([&] {
    tid = tramway::common::current_tid();
    pollfd p{fds[0], POLLIN, 0};
    rc = poll(&p, 1, -1);  // no timeout; a signal would end it with EINTR
    err = errno;
    revents = p.revents;
    done = true;
  });
  ASSERT_TRUE(wait_until([&] {
    if (tid == 0) return false;
    const auto p = tramway::common::probe_task(tid);
    return !p.running && (p.syscall == SYS_poll || p.syscall == SYS_ppoll);
  }));
  auto unrelated = tramway::text::allocate_code(64);
  ASSERT_TRUE(unrelated.ok());
  const auto b = reinterpret_cast<std::uintptr_t>(unrelated->rx);
  auto r = tramway::text::move_pcs(b, b + 64, b);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_GE(r->threads_observed, 1);
  EXPECT_EQ(r->threads_signalled, 0);
  EXPECT_EQ(r->pcs_moved, 0);
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(done.load()) << "poll returned early: rc " << rc << " errno " << err;
  ASSERT_EQ(write(fds[1], "x", 1), 1);
  t.join();
  EXPECT_EQ(rc, 1) << "errno " << err;
  EXPECT_TRUE(revents & POLLIN);
  close(fds[0]);
  close(fds[1]);
}

TEST(MovePcs, ThreadThatCannotAnswerIsNamedInTheError) {
  // The spinning thread can never leave, so the scenario runs in a child process.
  const int status = in_child([] {
    const Spin s = make_spin();
    alignas(8) static std::uint64_t counter = 0;
    static std::atomic<pid_t> tid{0};
    const int fix = tramway::text::fixup_signal();
    std::thread t([&s, fix] {
      std::uint64_t set = std::uint64_t{1} << (fix - 1);  // behind tramway's back
      syscall(SYS_rt_sigprocmask, SIG_BLOCK, &set, nullptr, 8);
      tid = tramway::common::current_tid();
      s.run(&counter);
    });
    t.detach();
    if (!wait_until([] { return load(counter) > 0; })) _exit(2);
    const auto start = std::chrono::steady_clock::now();
    auto r = tramway::text::move_pcs(s.begin(), s.end(), s.exit(), 200ms);
    const auto took = std::chrono::steady_clock::now() - start;
    if (r.ok()) _exit(3);
    const std::string msg = r.status().message();
    if (msg.find("thread " + std::to_string(tid.load())) == std::string::npos) {
      std::fprintf(stderr, "message: %s\n", msg.c_str());
      _exit(4);
    }
    if (took < 199ms || took > 3000ms) {
      std::fprintf(stderr, "move_pcs took %lld us\n",
                   static_cast<long long>(std::chrono::duration_cast<std::chrono::microseconds>(took).count()));
      _exit(5);
    }
    _exit(0);
  });
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// ---- batched move_pcs ---------------------------------------------------------------------------

using tramway::text::PcMove;

TEST(MovePcsBatch, RangesMustBeSortedDisjointAndNonEmpty) {
  const PcMove unsorted[] = {{0x3000, 0x4000, 0x5000}, {0x1000, 0x2000, 0x5000}};
  auto r = tramway::text::move_pcs(unsorted);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("sorted and disjoint"), std::string::npos) << r.status().message();
  const PcMove overlapping[] = {{0x1000, 0x3000, 0x5000}, {0x2000, 0x4000, 0x5000}};
  r = tramway::text::move_pcs(overlapping);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("sorted and disjoint"), std::string::npos) << r.status().message();
  const PcMove empty_one[] = {{0x1000, 0x2000, 0x5000}, {0x3000, 0x3000, 0x5000}};
  r = tramway::text::move_pcs(empty_one);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("empty range"), std::string::npos) << r.status().message();
  const PcMove adjacent[] = {{0x1000, 0x2000, 0x5000}, {0x2000, 0x3000, 0x5000}};
  r = tramway::text::move_pcs(adjacent);
  EXPECT_TRUE(r.ok()) << r.status().message();
  // Nothing to move: nobody is signalled.
  r = tramway::text::move_pcs(std::span<const PcMove>{});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->threads_signalled, 0);
  EXPECT_EQ(r->pcs_moved, 0);
}

std::atomic<bool> g_batch_handler_started{false}, g_batch_handler_release{false};
void spin_in_batch_handler(int, siginfo_t*, void*) {
  g_batch_handler_started = true;
  while (!g_batch_handler_release.load()) {
    const timespec t{0, 100'000};
    nanosleep(&t, nullptr);
  }
}

// Four threads, each spinning in its own generated loop; the last one's loop PC is saved in
// the frame of a SIGUSR1 handler that sleeps. One call with the four ranges gets them all
// out, each to its own range's exit.
TEST(MovePcsBatch, ManyRangesInOneCallIncludingANestedFrame) {
  SavedAction saved(SIGUSR1);
  struct sigaction act = make_action(spin_in_batch_handler);
  ASSERT_EQ(sigaction(SIGUSR1, &act, nullptr), 0);
  constexpr int kSpins = 4;
  Spin spins[kSpins];
  for (auto& s : spins) s = make_spin();
  alignas(8) std::uint64_t counters[kSpins] = {};
  std::atomic<bool> returned[kSpins] = {};
  std::vector<std::thread> threads;
  for (int i = 0; i < kSpins; ++i) {
    threads.emplace_back([&, i] {
      spins[i].run(&counters[i]);
      returned[i] = true;
    });
  }
  for (int i = 0; i < kSpins; ++i) ASSERT_TRUE(wait_until([&] { return load(counters[i]) > 0; }));
  ASSERT_EQ(pthread_kill(threads[kSpins - 1].native_handle(), SIGUSR1), 0);
  ASSERT_TRUE(wait_until([] { return g_batch_handler_started.load(); }));

  std::vector<PcMove> moves;
  for (const Spin& s : spins) moves.push_back({s.begin(), s.end(), s.exit()});
  std::sort(moves.begin(), moves.end(), [](const PcMove& a, const PcMove& b) { return a.begin < b.begin; });
  auto r = tramway::text::move_pcs(moves);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_GE(r->threads_signalled, kSpins);
  EXPECT_GE(r->pcs_moved, kSpins);
  std::printf("%d threads seen, %d signalled, %d observed, %d PCs moved\n", r->threads_seen, r->threads_signalled,
              r->threads_observed, r->pcs_moved);
  const std::uint64_t frozen = load(counters[kSpins - 1]);
  g_batch_handler_release = true;
  bool all = true;
  for (int i = 0; i < kSpins; ++i) {
    if (!wait_until([&] { return returned[i].load(); })) {
      ADD_FAILURE() << "thread " << i << " is still spinning in its range";
      all = false;
    }
  }
  if (!all) {
    for (auto& t : threads) t.detach();
    return;
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(load(counters[kSpins - 1]), frozen);  // its nested frame did not go back into the loop
}

TEST(MovePcsBatch, ThreadThatCannotAnswerIsNamedInTheError) {
  const int status = in_child([] {
    const Spin s = make_spin(), other = make_spin();
    alignas(8) static std::uint64_t counter = 0;
    static std::atomic<pid_t> tid{0};
    const int fix = tramway::text::fixup_signal();
    std::thread t([&s, fix] {
      std::uint64_t set = std::uint64_t{1} << (fix - 1);  // behind tramway's back
      syscall(SYS_rt_sigprocmask, SIG_BLOCK, &set, nullptr, 8);
      tid = tramway::common::current_tid();
      s.run(&counter);
    });
    t.detach();
    if (!wait_until([] { return load(counter) > 0; })) _exit(2);
    PcMove moves[] = {{s.begin(), s.end(), s.exit()}, {other.begin(), other.end(), other.exit()}};
    if (moves[1].begin < moves[0].begin) std::swap(moves[0], moves[1]);
    auto r = tramway::text::move_pcs(moves, 200ms);
    if (r.ok()) _exit(3);
    const std::string msg = r.status().message();
    if (msg.find("thread " + std::to_string(tid.load())) == std::string::npos || msg.find("2 ranges") == std::string::npos) {
      std::fprintf(stderr, "message: %s\n", msg.c_str());
      _exit(4);
    }
    _exit(0);
  });
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace

// move_pcs waits past its timeout only for threads that are merely waiting for a CPU: runnable,
// and the fix-up signal pending and not blocked, or delivered and blocked (inside the handler).
// Stopped, sleeping, masking threads, or ones that ran the handler without answering, fail the
// batch at the timeout as before.
TEST(SignalRouter, AFixUpWaitsOnOnlyForThreadsThatAreWaitingForACpu) {
  using tramway::common::SignalSets;
  using tramway::text::detail::waiting_for_cpu;
  constexpr int kSig = 40;
  const std::uint64_t bit = std::uint64_t{1} << (kSig - 1);
  const SignalSets pending{true, bit, 0, 0};
  EXPECT_TRUE(waiting_for_cpu('R', pending, kSig));
  EXPECT_FALSE(waiting_for_cpu('t', pending, kSig));  // stopped by a tracer
  EXPECT_FALSE(waiting_for_cpu('T', pending, kSig));  // stopped
  EXPECT_FALSE(waiting_for_cpu('S', pending, kSig));  // asleep: it would have been woken
  EXPECT_FALSE(waiting_for_cpu('R', SignalSets{true, bit, 0, bit}, kSig));  // it blocks the signal
  EXPECT_TRUE(waiting_for_cpu('R', SignalSets{true, 0, 0, bit}, kSig));     // delivered: inside the handler
  EXPECT_FALSE(waiting_for_cpu('S', SignalSets{true, 0, 0, bit}, kSig));    // ... asleep in it
  EXPECT_FALSE(waiting_for_cpu('R', SignalSets{true, 0, 0, 0}, kSig));      // ran the handler, no answer
  EXPECT_FALSE(waiting_for_cpu('R', SignalSets{true, bit << 1, 0, 0}, kSig));  // another signal
  EXPECT_FALSE(waiting_for_cpu('R', SignalSets{false, bit, 0, 0}, kSig));      // sets unreadable
  EXPECT_FALSE(waiting_for_cpu('R', pending, 0));
}
