// Issue 11, defect 12: the trap path's use of a small alternate stack. Every SIGTRAP delivery
// costs a kernel signal frame (about 3.4 KiB with this machine's xsave state) plus about
// 600 bytes of the router's own; it must not also let a storm of the program's signals nest
// inside it, nor nest them on the wrapper's entry, while the program's handlers keep the masks
// they asked for.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

#include "tramway/text/signal_router.h"

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

}  // namespace
