// text/eintr_undo.h: tramway's fix-up signal never ends a blocking call with EINTR that the
// program did not ask for, while the program's own signals still do; and the pieces it rests
// on: the system call number proven from the code before a `syscall`
// (arch/x86_64/syscall_site.h) and a function's bounds from .eh_frame_hdr.
#include "text/eintr_undo.h"

#include <dlfcn.h>
#include <errno.h>
#include <gtest/gtest.h>
#include <link.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "arch/x86_64/syscall_site.h"
#include "bounded_child.h"
#include "common/eh_frame_hdr.h"
#include "tramway/text/signal_router.h"

namespace {

using tramway::arch::syscall_number_at;
using Bytes = std::vector<std::uint8_t>;

long number_in(const Bytes& code, std::size_t site) {
  const auto base = reinterpret_cast<std::uintptr_t>(code.data());
  return syscall_number_at(base, base + code.size(), base + site);
}

TEST(SyscallSite, AnImmediateMovedIntoEaxRightBefore) {
  EXPECT_EQ(number_in({0xb8, 0xe8, 0, 0, 0, 0x0f, 0x05, 0xc3}, 5), SYS_epoll_wait);
}

TEST(SyscallSite, ThroughARegisterCopyAndPastUnrelatedWrites) {
  // mov $202,%r12d; mov %r12d,%eax; mov 0x8(%rsp),%edi; xor %esi,%esi; syscall
  EXPECT_EQ(number_in({0x41, 0xbc, 0xca, 0, 0, 0, 0x44, 0x89, 0xe0, 0x8b, 0x7c, 0x24, 0x08, 0x31, 0xf6, 0x0f, 0x05}, 15),
            SYS_futex);
  // xor %eax,%eax; syscall: read
  EXPECT_EQ(number_in({0x31, 0xc0, 0x0f, 0x05}, 2), SYS_read);
}

TEST(SyscallSite, NotProvenWhenABranchEntersThePath) {
  // mov $7,%eax; jmp 1f; mov $232,%eax; 1: syscall — the jump arrives with 7, the fall-through with 232
  EXPECT_EQ(number_in({0xb8, 7, 0, 0, 0, 0xeb, 0x05, 0xb8, 0xe8, 0, 0, 0, 0x0f, 0x05, 0xc3}, 12), -1);
  // the same with a backward conditional branch from after the site into it
  EXPECT_EQ(number_in({0xb8, 0xe8, 0, 0, 0, 0x90, 0x0f, 0x05, 0x75, 0xfb, 0xc3}, 6), -1);
}

TEST(SyscallSite, NotProvenWhenRaxIsComputedClobberedOrTheFunctionJumpsThroughARegister) {
  EXPECT_EQ(number_in({0x48, 0x89, 0xf8, 0x0f, 0x05}, 3), -1);                    // mov %rdi,%rax
  EXPECT_EQ(number_in({0xb8, 0xe8, 0, 0, 0, 0x48, 0x83, 0xc0, 0x01, 0x0f, 0x05}, 9), -1);  // add $1,%rax
  EXPECT_EQ(number_in({0xb8, 0xe8, 0, 0, 0, 0xe8, 0, 0, 0, 0, 0x0f, 0x05}, 10), -1);        // a call between
  EXPECT_EQ(number_in({0xb8, 0xe8, 0, 0, 0, 0x0f, 0x05, 0xff, 0xe0}, 5), -1);              // jmp *%rax
  EXPECT_EQ(number_in({0xb0, 0x07, 0x0f, 0x05}, 2), -1);                                    // mov $7,%al: partial
  EXPECT_EQ(number_in({0xb8, 0xe8, 0, 0, 0, 0x0f, 0x05}, 4), -1);                           // not a boundary
}

TEST(SyscallSite, OnlyCallsWithNothingDoneBeforeEintrAreMadeAgain) {
  for (long nr : {SYS_epoll_wait, SYS_poll, SYS_ppoll, SYS_nanosleep, SYS_clock_nanosleep, SYS_rt_sigsuspend,
                  SYS_futex, SYS_read, SYS_accept4}) {
    EXPECT_TRUE(tramway::arch::restartable_after_eintr(nr)) << nr;
  }
  for (long nr : {SYS_close, SYS_connect, SYS_write, SYS_openat, SYS_fcntl, SYS_ioctl}) {
    EXPECT_FALSE(tramway::arch::restartable_after_eintr(nr)) << nr;
  }
}

// libc's .eh_frame_hdr, found as the code under test finds it.
std::uintptr_t libc_eh_frame_hdr() {
  struct Find {
    std::uintptr_t want, hdr = 0;
  } f{reinterpret_cast<std::uintptr_t>(&::epoll_wait)};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        auto* f = static_cast<Find*>(data);
        std::uintptr_t hdr = 0;
        bool holds = false;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const auto& ph = info->dlpi_phdr[i];
          const std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && f->want >= lo && f->want < lo + ph.p_memsz) holds = true;
          if (ph.p_type == PT_GNU_EH_FRAME) hdr = lo;
        }
        if (holds) f->hdr = hdr;
        return holds ? 1 : 0;
      },
      &f);
  return f.hdr;
}

// Every number proven at the `syscall` instructions of libc's function `fn`.
std::vector<long> proven_numbers(void* fn) {
  const auto pc = reinterpret_cast<std::uintptr_t>(fn);
  const auto b = tramway::common::function_containing(libc_eh_frame_hdr(), pc);
  EXPECT_TRUE(b.found());
  EXPECT_EQ(b.begin, pc) << "an exported function begins its FDE";
  std::vector<long> out;
  for (std::uintptr_t a = b.begin; a + 2 <= b.end; ++a) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(a);
    if (p[0] == 0x0f && p[1] == 0x05) {
      if (const long nr = syscall_number_at(b.begin, b.end, a); nr >= 0) out.push_back(nr);
    }
  }
  return out;
}

TEST(SyscallSite, ProvesTheNumbersInDebiansLibcWrappers) {
  ASSERT_NE(libc_eh_frame_hdr(), 0u);
  // libc's own entries: tramway interposes some (sigsuspend filters the mask it is given).
  void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(libc, nullptr);
  const struct {
    const char* name;
    long nr;
  } wrappers[] = {
      // glibc 2.36 makes select(2) with pselect6.
      {"epoll_wait", SYS_epoll_wait}, {"epoll_pwait", SYS_epoll_pwait}, {"poll", SYS_poll},
      {"ppoll", SYS_ppoll},           {"select", SYS_pselect6},         {"pause", SYS_pause},
      {"sigsuspend", SYS_rt_sigsuspend}, {"clock_nanosleep", SYS_clock_nanosleep},
      {"read", SYS_read},             {"accept", SYS_accept},
  };
  for (const auto& w : wrappers) {
    void* fn = dlsym(libc, w.name);
    ASSERT_NE(fn, nullptr) << w.name;
    const std::vector<long> got = proven_numbers(fn);
    ASSERT_FALSE(got.empty()) << "no system call number proven in libc's " << w.name;
    for (long nr : got) EXPECT_EQ(nr, w.nr) << w.name;
  }
  // syscall(3) takes its number from an argument: nothing to prove.
  EXPECT_TRUE(proven_numbers(dlsym(libc, "syscall")).empty());
  dlclose(libc);
}

// ---- end to end: a thread blocked in a call, sent the fix-up signal -------------------------

pid_t gettid_() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

// Runs `call` on a thread; once it blocks in system call `nr`, sends it the fix-up signal
// `times` times, each time waiting until the handler took the EINTR back and the thread is
// blocked again; then runs `wake`. Returns what `call` returned (errno in *err).
long blocked_call_signalled(long nr, int times, const std::function<long()>& call, const std::function<void()>& wake,
                            int* err) {
  std::atomic<pid_t> tid{0};
  long result = 0;
  int saved_errno = 0;
  std::thread t([&] {
    tid.store(gettid_());
    errno = 0;
    result = call();
    saved_errno = errno;
  });
  while (tid.load() == 0) bounded::nap();
  EXPECT_TRUE(bounded::wait_blocked_in(tid.load(), nr));
  const int fix = tramway::text::fixup_signal();
  for (int i = 0; i < times; ++i) {
    const std::uint64_t before = tramway::text::detail::eintr_undone();
    EXPECT_EQ(::syscall(SYS_tgkill, ::getpid(), tid.load(), fix), 0);
    const std::int64_t deadline = bounded::now_ms() + 5000;
    while (tramway::text::detail::eintr_undone() == before && bounded::now_ms() < deadline) bounded::nap();
    EXPECT_EQ(tramway::text::detail::eintr_undone(), before + 1) << "signal " << i << " was not taken back";
    EXPECT_TRUE(bounded::wait_blocked_in(tid.load(), nr)) << "the call did not resume after signal " << i;
  }
  wake();
  t.join();
  *err = saved_errno;
  return result;
}

TEST(EintrUndo, EpollWaitWaitsOnThroughFixupSignals) {
  const int efd = eventfd(0, 0), ep = epoll_create1(0);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ASSERT_EQ(epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev), 0);
  int err = 0;
  const long r = blocked_call_signalled(
      SYS_epoll_wait, 10, [&] { epoll_event out; return long(epoll_wait(ep, &out, 1, -1)); },
      [&] { std::uint64_t one = 1; ASSERT_EQ(write(efd, &one, 8), 8); }, &err);
  EXPECT_EQ(r, 1) << "errno " << err;
  close(ep);
  close(efd);
}

TEST(EintrUndo, PollWaitsOnThroughFixupSignals) {
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  int err = 0;
  const long r = blocked_call_signalled(
      SYS_poll, 5, [&] { pollfd f{p[0], POLLIN, 0}; return long(poll(&f, 1, -1)); },
      [&] { ASSERT_EQ(write(p[1], "x", 1), 1); }, &err);
  EXPECT_EQ(r, 1) << "errno " << err;
  close(p[0]);
  close(p[1]);
}

TEST(EintrUndo, AnAbsoluteSleepEndsAtItsDeadlineNotAtTheSignal) {
  timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += 1;
  int err = 0;
  const long r = blocked_call_signalled(
      SYS_clock_nanosleep, 3,
      [&] { return long(clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, nullptr)); }, [] {}, &err);
  EXPECT_EQ(r, 0);
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  EXPECT_TRUE(now.tv_sec > deadline.tv_sec || (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec));
}

std::atomic<int> g_usr1{0};
void count_usr1(int) { g_usr1.fetch_add(1); }

// sigsuspend returns when a handler of the program's runs, not when tramway's does.
TEST(EintrUndo, SigsuspendReturnsForTheProgramsSignalOnly) {
  g_usr1.store(0);
  struct sigaction a {};
  a.sa_handler = count_usr1;
  ASSERT_EQ(sigaction(SIGUSR1, &a, nullptr), 0);
  std::atomic<pid_t> target{0};
  int err = 0;
  const long r = blocked_call_signalled(
      SYS_rt_sigsuspend, 5,
      [&] {
        target.store(gettid_());
        sigset_t none;
        sigemptyset(&none);
        return long(sigsuspend(&none));
      },
      [&] { ::syscall(SYS_tgkill, ::getpid(), target.load(), SIGUSR1); }, &err);
  EXPECT_EQ(r, -1);
  EXPECT_EQ(err, EINTR);
  EXPECT_EQ(g_usr1.load(), 1);
}

// The program's handler ran on the EINTR return and, as it returned, tramway's signal was
// delivered on that same return: the EINTR belongs to the program and stays.
std::atomic<int> g_fix{0};
void usr1_then_fixup_at_sigreturn(int) {
  sigset_t fix;
  sigemptyset(&fix);
  sigaddset(&fix, g_fix.load());
  ::syscall(SYS_rt_sigprocmask, SIG_BLOCK, &fix, nullptr, _NSIG / 8);  // raw: the router would not let it
  ::syscall(SYS_tgkill, ::getpid(), gettid_(), g_fix.load());          // pending until sigreturn unblocks it
  g_usr1.fetch_add(1);
}

TEST(EintrUndo, TheProgramsOwnEintrIsLeftToIt) {
  g_fix.store(tramway::text::fixup_signal());
  g_usr1.store(0);
  struct sigaction a {};
  a.sa_handler = usr1_then_fixup_at_sigreturn;  // no SA_RESTART: epoll_wait would fail anyway
  ASSERT_EQ(sigaction(SIGUSR1, &a, nullptr), 0);
  const int ep = epoll_create1(0), efd = eventfd(0, 0);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ASSERT_EQ(epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev), 0);
  std::atomic<pid_t> tid{0};
  long r = 0;
  int err = 0;
  std::thread t([&] {
    tid.store(gettid_());
    epoll_event out;
    r = epoll_wait(ep, &out, 1, -1);
    err = errno;
  });
  while (tid.load() == 0) bounded::nap();
  ASSERT_TRUE(bounded::wait_blocked_in(tid.load(), SYS_epoll_wait));
  const std::uint64_t before = tramway::text::detail::eintr_undone();
  ::syscall(SYS_tgkill, ::getpid(), tid.load(), SIGUSR1);
  const std::int64_t deadline = bounded::now_ms() + 5000;
  while (tid.load() != 0 && g_usr1.load() == 0 && bounded::now_ms() < deadline) bounded::nap();
  // If the EINTR were taken back the thread would block forever: wake it after a while so
  // that the failure is an assertion, not a hang.
  if (bounded::wait_blocked_in(tid.load(), SYS_epoll_wait, 300)) {
    std::uint64_t one = 1;
    ASSERT_EQ(write(efd, &one, 8), 8);
  }
  t.join();
  EXPECT_EQ(r, -1);
  EXPECT_EQ(err, EINTR);
  EXPECT_EQ(g_usr1.load(), 1);
  EXPECT_EQ(tramway::text::detail::eintr_undone(), before);
  close(ep);
  close(efd);
}

}  // namespace

namespace {

// Torture: threads that enter and leave short blocking calls all the time (the window where a
// thread seen running blocks just before the signal lands), each with the program's signals
// blocked so that every EINTR would be tramway's, while the fix-up signal lands on them at
// random. Runs TRAMWAY_TORTURE_SECONDS (default 2) and until enough calls were taken back.
TEST(EintrUndo, TortureNoCallEverSeesTheFixupSignalsEintr) {
  const char* env = std::getenv("TRAMWAY_TORTURE_SECONDS");
  const std::int64_t run_ms = (env ? std::atol(env) : 2) * 1000;
  constexpr int kThreads = 4;
  std::atomic<bool> stop{false};
  std::atomic<long> eintrs{0}, calls{0};
  std::atomic<pid_t> tids[kThreads] = {};
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  const int ep = epoll_create1(0);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ASSERT_EQ(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev), 0);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      sigset_t all;
      sigfillset(&all);
      pthread_sigmask(SIG_BLOCK, &all, nullptr);  // the router keeps its own signals deliverable
      tids[i].store(gettid_());
      for (unsigned n = 0; !stop.load(std::memory_order_relaxed); ++n) {
        long r = 0;
        switch ((n + i) % 4) {
          case 0: {
            const timespec t{0, 20'000};
            if (const int e = clock_nanosleep(CLOCK_MONOTONIC, 0, &t, nullptr); e != 0) r = -1, errno = e;
            break;
          }
          case 1: {
            epoll_event out;
            r = epoll_wait(ep, &out, 1, int(n & 1));  // 0 or 1 ms
            break;
          }
          case 2: {
            pollfd f{p[0], POLLIN, 0};
            r = poll(&f, 1, int(n & 1));
            break;
          }
          case 3: {
            const timespec t{0, 10'000};
            r = nanosleep(&t, nullptr);
            break;
          }
        }
        if (r < 0 && errno == EINTR) eintrs.fetch_add(1);
        calls.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  for (auto& t : tids) {
    while (t.load() == 0) bounded::nap();
  }
  const int fix = tramway::text::fixup_signal();
  const std::uint64_t before = tramway::text::detail::eintr_undone();
  const std::int64_t start = bounded::now_ms(), hard_limit = start + run_ms + 30'000;
  std::uint64_t sent = 0, seed = 88172645463325252ull;
  while (bounded::now_ms() < hard_limit &&
         (bounded::now_ms() < start + run_ms || tramway::text::detail::eintr_undone() - before < 100)) {
    seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;  // xorshift: which thread, how long to wait
    ::syscall(SYS_tgkill, ::getpid(), tids[seed % kThreads].load(), fix);
    ++sent;
    // A pause of 0-100 us: often enough to hit threads on their way in and out of calls, not so
    // often that a restarted relative wait never reaches its end.
    if (const long us = long((seed >> 8) % 100); us > 50) {
      const timespec t{0, us * 1000};
      nanosleep(&t, nullptr);
    } else {
      for (long spin = us * 300; spin > 0; --spin) asm volatile("");
    }
  }
  stop.store(true);
  for (auto& t : threads) t.join();
  const std::uint64_t undone = tramway::text::detail::eintr_undone() - before;
  std::fprintf(stderr, "%.1f s: %lu fix-up signals, %ld blocking calls, %lu EINTRs taken back\n",
               double(bounded::now_ms() - start) / 1000, static_cast<unsigned long>(sent), calls.load(),
               static_cast<unsigned long>(undone));
  EXPECT_EQ(eintrs.load(), 0) << "a blocking call returned the fix-up signal's EINTR";
  EXPECT_GE(undone, 100u) << "the race was not exercised";
  close(ep);
  close(p[0]);
  close(p[1]);
}

}  // namespace
