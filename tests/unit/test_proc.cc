// common/proc.h: threads read through /proc without disturbing them (what move_pcs and the
// tasks flavor rely on to prove a blocked thread outside a range).
#include <gtest/gtest.h>
#include <poll.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "common/proc.h"

namespace {

using namespace std::chrono_literals;

TEST(Proc, CurrentTidIsGettid) {
  EXPECT_EQ(tramway::common::current_tid(), static_cast<pid_t>(syscall(SYS_gettid)));
  EXPECT_EQ(tramway::common::current_tid(), getpid());  // the main thread
}

TEST(Proc, ListThreadsSeesEveryThread) {
  std::atomic<pid_t> tid{0};
  std::atomic<bool> stop{false};
  std::thread t([&] {
    tid = tramway::common::current_tid();
    while (!stop) std::this_thread::sleep_for(1ms);
  });
  while (tid == 0) std::this_thread::yield();
  const auto threads = tramway::common::list_threads();
  EXPECT_NE(std::find(threads.begin(), threads.end(), getpid()), threads.end());
  EXPECT_NE(std::find(threads.begin(), threads.end(), tid.load()), threads.end());
  stop = true;
  t.join();
}

TEST(Proc, ProbeShowsABlockedThreadsSystemCallAndPc) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  std::atomic<pid_t> tid{0};
  std::thread t([&] {
    pthread_setname_np(pthread_self(), "probe-me");
    tid = tramway::common::current_tid();
    char c;
    (void)!read(fds[0], &c, 1);
  });
  while (tid == 0) std::this_thread::yield();
  tramway::common::TaskProbe p;
  for (int i = 0; i < 2000; ++i) {  // until it has entered read()
    p = tramway::common::probe_task(tid);
    if (!p.running && p.syscall == SYS_read) break;
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_FALSE(p.gone);
  EXPECT_FALSE(p.running);
  EXPECT_EQ(p.state, 'S');
  EXPECT_EQ(p.syscall, SYS_read);
  EXPECT_NE(p.pc, 0u);
  EXPECT_NE(p.sp, 0u);
  // The PC is the instruction after the `syscall` (0f 05) in libc.
  EXPECT_EQ(reinterpret_cast<const unsigned char*>(p.pc)[-2], 0x0f);
  EXPECT_EQ(reinterpret_cast<const unsigned char*>(p.pc)[-1], 0x05);
  EXPECT_EQ(tramway::common::thread_name(tid), "probe-me");
  // Observing did not disturb it: it is still blocked in the same call.
  EXPECT_EQ(tramway::common::probe_task(tid).pc, p.pc);
  ASSERT_EQ(write(fds[1], "x", 1), 1);
  t.join();
  close(fds[0]);
  close(fds[1]);
}

TEST(Proc, ProbeOfASpinningThreadSaysRunning) {
  std::atomic<pid_t> tid{0};
  std::atomic<bool> stop{false};
  std::thread t([&] {
    tid = tramway::common::current_tid();
    while (!stop.load(std::memory_order_relaxed)) {
    }
  });
  while (tid == 0) std::this_thread::yield();
  // On a CPU or runnable, never blocked: /proc cannot show its user PC.
  bool saw_running = false;
  for (int i = 0; i < 100 && !saw_running; ++i) {
    const auto p = tramway::common::probe_task(tid);
    EXPECT_FALSE(p.gone);
    EXPECT_NE(p.state, 'S');
    saw_running = p.running;
  }
  EXPECT_TRUE(saw_running);
  stop = true;
  t.join();
}

TEST(Proc, ProbeOfAnExitedThreadSaysGone) {
  pid_t tid = 0;
  std::thread([&] { tid = tramway::common::current_tid(); }).join();
  // join returns once the kernel clears the thread's tid word, which may be before it is reaped:
  // the probe must already say gone (the thread is exiting), whether or not /proc still lists it.
  EXPECT_TRUE(tramway::common::probe_task(tid).gone);
  EXPECT_TRUE(tramway::common::probe_task(tid, tramway::common::Probe::with_state).gone);
  // Once reaped, its /proc entry goes too, and with it the name.
  const std::string dir = "/proc/self/task/" + std::to_string(tid);
  for (int i = 0; i < 10'000 && ::access(dir.c_str(), F_OK) == 0; ++i) ::usleep(1000);
  ASSERT_NE(::access(dir.c_str(), F_OK), 0) << dir << " still listed 10 s after the join";
  EXPECT_TRUE(tramway::common::probe_task(tid).gone);
  EXPECT_EQ(tramway::common::thread_name(tid), "?");
}

}  // namespace
