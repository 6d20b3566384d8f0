// Issue 11, defects 4, 5 and 11: SIGTRAP and the fix-up signal stay deliverable whatever glibc
// API the program sets its masks and dispositions with; what goes around the interposers (raw
// system calls) makes the next batch refuse with an error naming the thread and the signal,
// instead of an int3 killing the program; a program that asks for the fix-up signal is told.
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>

#include "bounded_child.h"
#include "text/all_blocked.h"
#include "tramway/text/patch.h"
#include "tramway/text/signal_router.h"

extern "C" {
int masks_flip_fn();  // entry `jmp masks_flip_a` (1) or `jmp masks_flip_b` (2)
extern const std::uint8_t masks_flip_site[], masks_flip_a[], masks_flip_b[];
}
__asm__(R"(
  .text
  .p2align 4
  .globl masks_flip_fn
  .globl masks_flip_site
  .globl masks_flip_a
  .globl masks_flip_b
  .type masks_flip_fn, @function
masks_flip_fn:
masks_flip_site:
  .byte 0xe9
  .long masks_flip_a - masks_flip_site - 5
masks_flip_a:
  movl $1, %eax
  ret
masks_flip_b:
  movl $2, %eax
  ret
  .size masks_flip_fn, . - masks_flip_fn
)");

namespace {

using tramway::Status;

// One batch: the site jumps to the other target.
Status flip() {
  const std::uint8_t* to = masks_flip_fn() == 1 ? masks_flip_b : masks_flip_a;
  std::uint8_t b[5] = {0xe9};
  const auto rel = static_cast<std::int32_t>(to - (masks_flip_site + 5));
  std::memcpy(b + 1, &rel, 4);
  tramway::text::PatchBatch batch;
  if (Status s = batch.add(const_cast<std::uint8_t*>(masks_flip_site), b); !s.ok()) return s;
  return tramway::text::apply(batch);
}

std::uint64_t kernel_mask() {
  std::uint64_t m = 0;
  EXPECT_EQ(syscall(SYS_rt_sigprocmask, SIG_BLOCK, nullptr, &m, 8), 0);
  return m;
}
bool in_mask(std::uint64_t m, int sig) { return (m >> (sig - 1)) & 1; }
void raw_block(int sig, int how = SIG_BLOCK) {
  const std::uint64_t m = std::uint64_t{1} << (sig - 1);
  ASSERT_EQ(syscall(SYS_rt_sigprocmask, how, &m, nullptr, 8), 0);
}
sigset_t only(int sig) {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, sig);
  return s;
}

using bounded::in_child;

// A thread named `name` that runs `setup`, then waits until released. Deterministic: the test
// applies batches only while the thread sits at the barrier with its mask set.
class Parked {
 public:
  Parked(const char* name, std::function<void()> setup) {
    thread_ = std::thread([this, name, setup] {
      pthread_setname_np(pthread_self(), name);
      setup();
      tid_ = static_cast<pid_t>(syscall(SYS_gettid));
      ready_.store(true);
      while (!release_.load()) std::this_thread::yield();
      if (after_) after_();
      done_.store(true);
      while (!finish_.load()) std::this_thread::yield();
    });
    while (!ready_.load()) std::this_thread::yield();
  }
  // Runs `f` in the thread and waits until it has.
  void run(std::function<void()> f) {
    after_ = std::move(f);
    release_.store(true);
    while (!done_.load()) std::this_thread::yield();
  }
  ~Parked() {
    release_.store(true);
    finish_.store(true);
    thread_.join();
  }
  pid_t tid() const { return tid_; }

 private:
  std::thread thread_;
  std::function<void()> after_;
  std::atomic<bool> ready_{false}, release_{false}, done_{false}, finish_{false};
  pid_t tid_ = 0;
};

// ---- defect 4: the glibc APIs that do not call sigprocmask -------------------------------------

TEST(SignalMasks, SigblockSigsetmaskSigholdLeaveSigtrapUnblocked) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  const int fix = tramway::text::fixup_signal();
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  sigblock(1 << (SIGTRAP - 1) | 1 << (SIGUSR1 - 1));
  EXPECT_FALSE(in_mask(kernel_mask(), SIGTRAP));
  EXPECT_TRUE(in_mask(kernel_mask(), SIGUSR1));
  const int old = sigsetmask(1 << (SIGTRAP - 1) | 1 << (SIGUSR2 - 1));
  EXPECT_TRUE(old & (1 << (SIGUSR1 - 1)));
  EXPECT_FALSE(in_mask(kernel_mask(), SIGTRAP));
  EXPECT_TRUE(in_mask(kernel_mask(), SIGUSR2));
  EXPECT_FALSE(in_mask(kernel_mask(), SIGUSR1));
  EXPECT_EQ(sighold(SIGTRAP), 0);
  EXPECT_EQ(sighold(fix), 0);
  EXPECT_EQ(sighold(SIGUSR1), 0);
#pragma GCC diagnostic pop
  EXPECT_FALSE(in_mask(kernel_mask(), SIGTRAP));
  EXPECT_FALSE(in_mask(kernel_mask(), fix));
  EXPECT_TRUE(in_mask(kernel_mask(), SIGUSR1));
  raw_block(SIGUSR1, SIG_UNBLOCK);
  raw_block(SIGUSR2, SIG_UNBLOCK);
}

// getcontext, then setcontext back to it with SIGTRAP and SIGUSR1 added to the saved mask; true
// once back. In a function of its own without AddressSanitizer: ASan takes the second return
// of getcontext into scopes it saw end for a use after scope.
__attribute__((noinline, no_sanitize_address)) bool setcontext_with_saved_mask() {
  static ucontext_t target;
  static std::atomic<int> passes{0};
  if (getcontext(&target) != 0) return false;
  if (passes.fetch_add(1) == 0) {
    sigaddset(&target.uc_sigmask, SIGTRAP);
    sigaddset(&target.uc_sigmask, SIGUSR1);
    setcontext(&target);
    return false;  // setcontext returned
  }
  return true;
}

TEST(SignalMasks, SetcontextAndSwapcontextWithASavedMaskLeaveSigtrapUnblocked) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  static ucontext_t back, target;
  ASSERT_TRUE(setcontext_with_saved_mask());
  EXPECT_FALSE(in_mask(kernel_mask(), SIGTRAP));
  EXPECT_TRUE(in_mask(kernel_mask(), SIGUSR1));
  raw_block(SIGUSR1, SIG_UNBLOCK);

  // swapcontext into a makecontext'd function, whose context's mask blocks SIGTRAP.
  static char stack[64 * 1024];
  static std::uint64_t seen = 0;
  ASSERT_EQ(getcontext(&target), 0);
  target.uc_stack.ss_sp = stack;
  target.uc_stack.ss_size = sizeof stack;
  target.uc_link = &back;
  sigaddset(&target.uc_sigmask, SIGTRAP);
  makecontext(&target, [] { syscall(SYS_rt_sigprocmask, SIG_BLOCK, nullptr, &seen, 8); }, 0);
  ASSERT_EQ(swapcontext(&back, &target), 0);
  EXPECT_FALSE(in_mask(seen, SIGTRAP));
}

TEST(SignalMasks, ThreadAttributeMaskLeavesSigtrapUnblocked) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  sigset_t s = only(SIGTRAP);
  sigaddset(&s, SIGUSR1);
  ASSERT_EQ(pthread_attr_setsigmask_np(&attr, &s), 0);
  static std::uint64_t seen = 0;
  pthread_t t;
  ASSERT_EQ(pthread_create(
                &t, &attr,
                [](void*) -> void* {
                  syscall(SYS_rt_sigprocmask, SIG_BLOCK, nullptr, &seen, 8);
                  return nullptr;
                },
                nullptr),
            0);
  pthread_join(t, nullptr);
  pthread_attr_destroy(&attr);
  EXPECT_FALSE(in_mask(seen, SIGTRAP));
  EXPECT_TRUE(in_mask(seen, SIGUSR1));
}

// What no interposer sees: a raw rt_sigprocmask in one thread. The batch is refused, naming
// the thread; unblocked again, the batch goes through.
TEST(SignalMasks, RawSigtrapBlockInAThreadRefusesTheBatchNamingTheThread) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  Parked t("trapblocker", [] { raw_block(SIGTRAP); });
  const int before = masks_flip_fn();
  const Status s = flip();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("thread " + std::to_string(t.tid()) + " (trapblocker)"), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("blocks SIGTRAP"), std::string::npos) << s.message();
  EXPECT_EQ(masks_flip_fn(), before);  // nothing was written
  t.run([] { raw_block(SIGTRAP, SIG_UNBLOCK); });
  EXPECT_TRUE(flip().ok());
  EXPECT_NE(masks_flip_fn(), before);
}

// tramway's own windows that block every signal (its handler-table lock, a slot claim, fork)
// are marked with the mask they restore. A thread that sits in one, running, is judged by that
// mask: before, the precheck timed the window and refused once the thread had run 50 ms of CPU
// under it, which a preempted lock holder's waiter does on a loaded machine (torture.static in
// CI). The thread spins in its window for as long as the batch takes.
TEST(SignalMasks, AThreadInsideTramwaysOwnBlockEverythingWindowIsJudgedByTheMaskItRestores) {
  using tramway::text::detail::AllSignalsBlocked;
  using tramway::text::detail::look_at_window;
  using tramway::text::detail::WindowLook;
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  std::uint64_t before = 0;
  Parked t("ownwindow", [&] {
    before = kernel_mask();
    AllSignalsBlocked::enter();
  });
  const WindowLook w = look_at_window(t.tid());
  EXPECT_EQ(w.state, WindowLook::inside);
  EXPECT_EQ(w.saved, before);
  EXPECT_FALSE(in_mask(before, SIGTRAP));
  const int flips = masks_flip_fn();
  const Status s = flip();
  EXPECT_TRUE(s.ok()) << s.message();
  EXPECT_NE(masks_flip_fn(), flips);
  std::uint64_t after = 0;
  t.run([&] {
    AllSignalsBlocked::leave();
    after = kernel_mask();
  });
  EXPECT_EQ(after, before);
  EXPECT_EQ(look_at_window(t.tid()).state, WindowLook::none);
}

// The mark does not hide the program's own block: a thread that blocked SIGTRAP with a raw
// system call and then entered one of tramway's windows restores that block, and is refused.
TEST(SignalMasks, ARawSigtrapBlockUnderTramwaysOwnWindowIsStillRefused) {
  using tramway::text::detail::AllSignalsBlocked;
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  Parked t("blockedwindow", [] {
    raw_block(SIGTRAP);
    AllSignalsBlocked::enter();
  });
  const int flips = masks_flip_fn();
  const Status s = flip();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("thread " + std::to_string(t.tid()) + " (blockedwindow) blocks SIGTRAP"),
            std::string::npos) << s.message();
  EXPECT_EQ(masks_flip_fn(), flips);
  t.run([] {
    AllSignalsBlocked::leave();
    raw_block(SIGTRAP, SIG_UNBLOCK);
  });
  EXPECT_TRUE(flip().ok());
}

// The scenario of the issue: a thread that blocks SIGTRAP (raw) runs the site while batches
// flip it. Before, the process died of SIGTRAP; now every batch is refused and it lives.
TEST(SignalMasks, AThreadRunningTheSiteWithSigtrapBlockedIsNotKilled) {
  const int status = in_child([] {
    if (!tramway::text::install_signal_router().ok()) _exit(3);
    std::atomic<bool> stop{false}, blocked{false};
    std::thread caller([&] {
      const std::uint64_t m = std::uint64_t{1} << (SIGTRAP - 1);
      syscall(SYS_rt_sigprocmask, SIG_BLOCK, &m, nullptr, 8);
      blocked.store(true);
      while (!stop.load()) (void)masks_flip_fn();
    });
    while (!blocked.load()) std::this_thread::yield();
    int refused = 0;
    for (int i = 0; i < 20; ++i) refused += !flip().ok();
    stop.store(true);
    caller.join();
    _exit(refused == 20 ? 0 : 4);
  });
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// ---- defect 11: a raw rt_sigaction(SIGTRAP) ------------------------------------------------------

void foreign_trap(int) {}

TEST(SignalMasks, RawSigactionOfSigtrapRefusesTheBatch) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  struct KernelAction {
    void (*handler)(int);
    unsigned long flags;
    void* restorer;
    std::uint64_t mask;
  } mine{foreign_trap, 0, nullptr, 0}, router{};
  ASSERT_EQ(syscall(SYS_rt_sigaction, SIGTRAP, &mine, &router, 8), 0);
  const int before = masks_flip_fn();
  const Status s = flip();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("SIGTRAP disposition"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("rt_sigaction"), std::string::npos) << s.message();
  EXPECT_EQ(masks_flip_fn(), before);
  ASSERT_EQ(syscall(SYS_rt_sigaction, SIGTRAP, &router, nullptr, 8), 0);
  EXPECT_TRUE(flip().ok());
}

// The same for the fix-up signal (SIG_IGN set by a raw system call).
TEST(SignalMasks, RawSigactionOfTheFixupSignalRefusesTheBatch) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  const int fix = tramway::text::fixup_signal();
  struct KernelAction {
    std::uintptr_t handler;
    unsigned long flags;
    void* restorer;
    std::uint64_t mask;
  } ign{reinterpret_cast<std::uintptr_t>(SIG_IGN), 0, nullptr, 0}, router{};
  ASSERT_EQ(syscall(SYS_rt_sigaction, fix, &ign, &router, 8), 0);
  const Status s = flip();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("SIG_IGN"), std::string::npos) << s.message();
  ASSERT_EQ(syscall(SYS_rt_sigaction, fix, &router, nullptr, 8), 0);
  EXPECT_TRUE(flip().ok());
}

// ---- defect 5: the program's use of the fix-up signal --------------------------------------------

// signalfd of the fix-up signal would never see it (the router's handler takes it): the call
// fails and says why, instead of the program waiting forever. A full set is not that.
TEST(SignalMasks, SignalfdOfTheFixupSignalFailsInsteadOfNeverSeeingIt) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  const int fix = tramway::text::fixup_signal();
  sigset_t s = only(fix);
  testing::internal::CaptureStderr();
  errno = 0;
  const int fd = signalfd(-1, &s, SFD_NONBLOCK | SFD_CLOEXEC);
  const int e = errno;
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(fd, -1);
  EXPECT_EQ(e, EINVAL);
  EXPECT_NE(err.find("TRAMWAY_FIXUP_SIGNAL"), std::string::npos) << err;
  int sig = 0;
  EXPECT_EQ(sigwait(&s, &sig), EINVAL);
  sigset_t all;
  sigfillset(&all);
  const int fd_all = signalfd(-1, &all, SFD_NONBLOCK | SFD_CLOEXEC);
  EXPECT_GE(fd_all, 0);
  close(fd_all);
}

// A raw signalfd of the fix-up signal (blocked by name through sigprocmask, which strips it):
// the next batch refuses, naming TRAMWAY_FIXUP_SIGNAL.
TEST(SignalMasks, RawSignalfdOfTheFixupSignalRefusesTheBatch) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  const int fix = tramway::text::fixup_signal();
  const sigset_t s = only(fix);
  ASSERT_EQ(sigprocmask(SIG_BLOCK, &s, nullptr), 0);
  const int fd = static_cast<int>(syscall(SYS_signalfd4, -1, &s, 8, SFD_NONBLOCK | SFD_CLOEXEC));
  ASSERT_GE(fd, 0);
  const Status st = flip();
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("signalfd"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("TRAMWAY_FIXUP_SIGNAL"), std::string::npos) << st.message();
  close(fd);
  EXPECT_TRUE(flip().ok());
}

TEST(SignalMasks, RawBlockOfTheFixupSignalRefusesTheBatchNamingTheThread) {
  ASSERT_TRUE(tramway::text::install_signal_router().ok());
  const int fix = tramway::text::fixup_signal();
  // The program names the signal (blocking it through sigprocmask, which strips it), then
  // blocks it for real with a raw system call.
  Parked t("fixblocker", [fix] {
    const sigset_t s = only(fix);
    sigprocmask(SIG_BLOCK, &s, nullptr);
    raw_block(fix);
  });
  const Status s = flip();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("thread " + std::to_string(t.tid()) + " (fixblocker)"), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("TRAMWAY_FIXUP_SIGNAL"), std::string::npos) << s.message();
  t.run([fix] { raw_block(fix, SIG_UNBLOCK); });
  EXPECT_TRUE(flip().ok());
}

// A program started with SIGRTMAX-1 blocked (inherited across exec, as from a parent that
// reads it with a signalfd) keeps it: tramway picks another signal when it loads.
TEST(SignalMasks, ASignalBlockedAtLoadIsNotTakenAsTheFixupSignal) {
  if (std::getenv("TRAMWAY_TEST_FIXUP_AT_LOAD")) {  // the exec'd child
    EXPECT_NE(tramway::text::fixup_signal(), SIGRTMAX - 1);
    return;
  }
  const pid_t pid = fork();
  if (pid == 0) {
    const std::uint64_t m = std::uint64_t{1} << (SIGRTMAX - 1 - 1);
    syscall(SYS_rt_sigprocmask, SIG_BLOCK, &m, nullptr, 8);
    setenv("TRAMWAY_TEST_FIXUP_AT_LOAD", "1", 1);
    unsetenv("TRAMWAY_FIXUP_SIGNAL");
    const std::string self = "/proc/self/exe";
    execl(self.c_str(), self.c_str(), "--gtest_filter=SignalMasks.ASignalBlockedAtLoadIsNotTakenAsTheFixupSignal",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  int status = -1;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
