// Issue 11, defect 12: the trap path's use of a small alternate stack. Every SIGTRAP delivery
// costs a kernel signal frame (about 3.4 KiB with this machine's xsave state) plus about
// 600 bytes of the router's own; it must not also let a storm of the program's signals nest
// inside it, nor nest them on the wrapper's entry, while the program's handlers keep the masks
// they asked for.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <pthread.h>
#include <sys/wait.h>
#include <time.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

#include "bounded_child.h"
#include "tramway/hooks.h"
#include "tramway/text/signal_router.h"

#define PATCHABLE __attribute__((noinline, patchable_function_entry(13, 8)))
extern "C" PATCHABLE int stacks_fx_work(int x) {
  asm volatile("");
  return x + 1;
}

namespace {

struct KernelAction {
  std::uintptr_t handler;
  unsigned long flags;
  std::uintptr_t restorer;
  std::uint64_t mask;
};
KernelAction kernel_action(int sig) {
  KernelAction k{};
  EXPECT_EQ(syscall(SYS_rt_sigaction, sig, nullptr, &k, 8), 0);
  return k;
}
std::uint64_t kernel_mask() {
  std::uint64_t m = 0;
  EXPECT_EQ(syscall(SYS_rt_sigprocmask, SIG_BLOCK, nullptr, &m, 8), 0);
  return m;
}
bool in_mask(std::uint64_t m, int sig) { return (m >> (sig - 1)) & 1; }

TEST(SignalStacks, TheTrapHandlerDefersAsynchronousSignalsButNotFaults) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  const KernelAction k = kernel_action(SIGTRAP);
  for (int sig : {SIGUSR1, SIGUSR2, SIGALRM, SIGPROF, SIGCHLD, SIGRTMIN + 1}) EXPECT_TRUE(in_mask(k.mask, sig)) << sig;
  for (int sig : {SIGTRAP, SIGSEGV, SIGBUS, SIGILL, SIGFPE}) EXPECT_FALSE(in_mask(k.mask, sig)) << sig;
  EXPECT_TRUE(k.flags & SA_NODEFER);
}

std::atomic<int> g_depth{0}, g_max_depth{0};
std::atomic<bool> g_blocked_inside{true};
void nodefer_handler(int) {
  const int d = g_depth.fetch_add(1) + 1;
  if (d > g_max_depth.load()) g_max_depth.store(d);
  g_blocked_inside.store(in_mask(kernel_mask(), SIGUSR1));
  if (d == 1) raise(SIGUSR1);  // SA_NODEFER: runs nested, right here
  g_depth.fetch_sub(1);
}

// The kernel runs the wrapper with the signal blocked (no nesting on its entry); the wrapper
// unblocks it for the program's SA_NODEFER handler, which still nests.
TEST(SignalStacks, ANodeferHandlerNestsInsideItselfButNotOnTheWrappersEntry) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  struct sigaction a {};
  a.sa_handler = nodefer_handler;
  a.sa_flags = SA_NODEFER | SA_ONSTACK;
  sigemptyset(&a.sa_mask);
  ASSERT_EQ(sigaction(SIGUSR1, &a, nullptr), 0);
  EXPECT_FALSE(kernel_action(SIGUSR1).flags & SA_NODEFER);
  struct sigaction seen {};
  ASSERT_EQ(sigaction(SIGUSR1, nullptr, &seen), 0);
  EXPECT_TRUE(seen.sa_flags & SA_NODEFER);  // what the program set
  ASSERT_EQ(raise(SIGUSR1), 0);
  EXPECT_EQ(g_max_depth.load(), 2);
  EXPECT_FALSE(g_blocked_inside.load());
}

std::atomic<std::uint64_t> g_trap_mask{0};
void program_trap(int) { g_trap_mask.store(kernel_mask()); }

// A foreign int3 chained to the program's SIGTRAP handler: it runs with its own mask, not the
// router's (which defers everything).
TEST(SignalStacks, TheProgramsSigtrapHandlerRunsWithItsOwnMask) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  struct sigaction a {};
  a.sa_handler = program_trap;
  sigemptyset(&a.sa_mask);
  sigaddset(&a.sa_mask, SIGUSR2);
  ASSERT_EQ(sigaction(SIGTRAP, &a, nullptr), 0);
  __asm__ volatile("int3");
  const std::uint64_t m = g_trap_mask.load();
  EXPECT_TRUE(in_mask(m, SIGUSR2));
  EXPECT_FALSE(in_mask(m, SIGUSR1));
  EXPECT_FALSE(in_mask(m, SIGALRM));
  EXPECT_FALSE(in_mask(m, SIGTRAP));
}

// A program's SA_NODEFER handler that raises its own signal again and again on a 64 KiB
// alternate stack: the plain program nests one kernel frame per raise, and tramway's bigger
// frames would overflow sooner. Near the stack's end the wrapper leaves the signal blocked, so
// the raise is delivered when the handler returns instead of nesting: every raise is handled,
// and the stack keeps room for a trap frame. Before, the 100 nested frames ran off the stack.
constexpr std::size_t kAltSize = 64 * 1024;
alignas(16) char g_alt[kAltSize];
std::atomic<int> g_raised{0}, g_handled{0};
std::atomic<std::uintptr_t> g_lowest_sp{~std::uintptr_t{0}};
void raising_handler(int) {
  const auto sp = reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0));
  if (sp < g_lowest_sp.load()) g_lowest_sp.store(sp);
  g_handled.fetch_add(1);
  if (g_raised.fetch_add(1) < 100) raise(SIGUSR2);
}

TEST(SignalStacks, ANodeferHandlerThatRaisesItselfDoesNotRunOffASmallAlternateStack) {
  const int status = bounded::in_child([] {
    if (!tramway::text::install_signal_router().ok()) _exit(3);
    stack_t ss{};
    ss.ss_sp = g_alt;
    ss.ss_size = kAltSize;
    if (sigaltstack(&ss, nullptr) != 0) _exit(4);
    struct sigaction a {};
    a.sa_handler = raising_handler;
    a.sa_flags = SA_NODEFER | SA_ONSTACK;
    sigemptyset(&a.sa_mask);
    if (sigaction(SIGUSR2, &a, nullptr) != 0) _exit(5);
    raise(SIGUSR2);
    if (g_handled.load() != 101) _exit(6);
    // At least a kernel frame's worth of room left at the deepest handler.
    const auto base = reinterpret_cast<std::uintptr_t>(g_alt);
    if (g_lowest_sp.load() < base + 4096) _exit(7);
  });
  ASSERT_TRUE(WIFEXITED(status)) << "died of signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// The program: two threads on 64 KiB alternate stacks, an SA_ONSTACK|SA_NODEFER
// SIGUSR1 storm sent as fast as pthread_kill goes, a handler that calls a hooked function, and
// hooks attached and detached meanwhile (each hooked call during a batch is a trap frame). It
// died of SIGSEGV in every run before; it must run to the end.
std::atomic<bool> g_stop{false};
std::atomic<long> g_storm_handled{0}, g_wrong{0};
void storm_handler(int) {
  if (stacks_fx_work(1) != 2) g_wrong.fetch_add(1);
  g_storm_handled.fetch_add(1);
}
void noop_callback(const tramway::hooks::Ops&, std::uintptr_t, std::uintptr_t, tramway::hooks::EntryRegs&) {}

TEST(SignalStacks, AnUnpacedNodeferStormOnSmallAlternateStacksSurvivesAttachAndDetach) {
  const int status = bounded::in_child([] {
    struct sigaction a {};
    a.sa_handler = storm_handler;
    a.sa_flags = SA_NODEFER | SA_ONSTACK;
    sigemptyset(&a.sa_mask);
    if (sigaction(SIGUSR1, &a, nullptr) != 0) _exit(5);
    std::vector<std::thread> workers;
    for (int i = 0; i < 2; ++i) {
      workers.emplace_back([] {
        std::vector<char> alt(kAltSize);
        stack_t ss{};
        ss.ss_sp = alt.data();
        ss.ss_size = alt.size();
        sigaltstack(&ss, nullptr);
        while (!g_stop.load(std::memory_order_relaxed))
          if (stacks_fx_work(5) != 6) g_wrong.fetch_add(1);
        ss.ss_flags = SS_DISABLE;
        sigaltstack(&ss, nullptr);
      });
    }
    std::thread sender([&] {
      while (!g_stop.load(std::memory_order_relaxed))
        for (auto& w : workers) pthread_kill(w.native_handle(), SIGUSR1);
    });
    int cycles = 0;
    const auto until = bounded::now_ms() + 1500;
    while (bounded::now_ms() < until) {
      tramway::hooks::Ops ops;
      ops.entry = noop_callback;
      if (!tramway::hooks::attach(ops, tramway::hooks::Filter::names({"stacks_fx_work"})).ok()) _exit(8);
      if (!tramway::hooks::detach(ops).ok()) _exit(9);
      ++cycles;
    }
    g_stop.store(true);
    sender.join();
    for (auto& w : workers) w.join();
    if (g_wrong.load() != 0) _exit(10);
    if (cycles < 10 || g_storm_handled.load() == 0) _exit(11);
  });
  ASSERT_TRUE(WIFEXITED(status)) << "died of signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
