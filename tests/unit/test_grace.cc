// Grace periods, flavor trace: synchronize waits for every region running when it was
// called and for nothing else; callbacks run after a grace period, in order; threads register
// and exit freely; fork leaves a working engine in the child.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "bounded_child.h"
#include "tramway/grace.h"

namespace grace = tramway::grace;
using namespace std::chrono_literals;

TEST(Grace, MarkerNestsAndReportsTheSection) {
  EXPECT_FALSE(grace::in_read_section());
  grace::read_lock();
  grace::read_lock();
  EXPECT_TRUE(grace::in_read_section());
  grace::read_unlock();
  EXPECT_TRUE(grace::in_read_section());
  grace::read_unlock();
  EXPECT_FALSE(grace::in_read_section());
}

TEST(Grace, SynchronizeWaitsForARegionThatWasRunning) {
  std::atomic<bool> inside{false}, release{false}, done{false};
  std::thread reader([&] {
    grace::ReadGuard g;
    inside = true;
    while (!release) std::this_thread::sleep_for(1ms);
  });
  while (!inside) std::this_thread::yield();
  std::thread writer([&] {
    ASSERT_TRUE(grace::synchronize().ok());
    done = true;
  });
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(done) << "the grace period ended while a region that began before it was running";
  release = true;
  writer.join();
  reader.join();
  EXPECT_TRUE(done);
}

TEST(Grace, RegionsBegunLaterDoNotStallIt) {
  // Readers enter and leave regions back to back, never all outside at once.
  std::atomic<bool> stop{false};
  std::vector<std::thread> readers;
  for (int i = 0; i < 4; ++i) {
    readers.emplace_back([&] {
      while (!stop) {
        grace::ReadGuard g;
        for (int k = 0; k < 100; ++k) __builtin_ia32_pause();
      }
    });
  }
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(grace::synchronize().ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 20s);
  stop = true;
  for (auto& t : readers) t.join();
}

TEST(Grace, NoReaderEverSeesFreedData) {
  // The rcutorture pattern in miniature: readers follow a pointer inside a region; the writer
  // swaps it, waits, poisons the old object and frees it.
  struct Obj {
    std::atomic<std::uint64_t> magic{0x7ab1e};
  };
  std::atomic<Obj*> current{new Obj};
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> bad{0}, reads{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < 3; ++i) {
    readers.emplace_back([&] {
      while (!stop) {
        grace::ReadGuard g;
        Obj* o = current.load(std::memory_order_acquire);
        for (int k = 0; k < 20; ++k) {
          if (o->magic.load(std::memory_order_relaxed) != 0x7ab1e) bad.fetch_add(1);
        }
        reads.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  while (reads.load() < 1000) std::this_thread::yield();  // every swap races running readers
  const auto until = std::chrono::steady_clock::now() + 500ms;
  for (int i = 0; i < 300 || std::chrono::steady_clock::now() < until; ++i) {
    Obj* old = current.exchange(new Obj, std::memory_order_acq_rel);
    ASSERT_TRUE(grace::synchronize().ok());
    old->magic = 0xdead;  // a reader still holding it would see this
    delete old;
  }
  stop = true;
  for (auto& t : readers) t.join();
  delete current.load();
  EXPECT_EQ(bad.load(), 0u);
}

TEST(Grace, SynchronizeInsideARegionFailsInsteadOfDeadlocking) {
  grace::ReadGuard g;
  const tramway::Status s = grace::synchronize();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("read-side region"), std::string::npos) << s.message();
  EXPECT_FALSE(grace::barrier().ok());
}

TEST(Grace, ConcurrentCallersShareGracePeriods) {
  const auto before = grace::stats();
  std::vector<std::thread> callers;
  for (int i = 0; i < 8; ++i) {
    callers.emplace_back([] {
      for (int k = 0; k < 50; ++k) ASSERT_TRUE(grace::synchronize().ok());
    });
  }
  for (auto& t : callers) t.join();
  const auto after = grace::stats();
  EXPECT_EQ(after.synchronize_calls - before.synchronize_calls, 400u);
  EXPECT_LE(after.grace_periods - before.grace_periods, 400u);
  EXPECT_GE(after.grace_periods - before.grace_periods, 50u);  // each caller needs its own 50 at least
}

TEST(Grace, CallbacksRunAfterAGracePeriodInOrder) {
  std::atomic<bool> inside{false}, release{false};
  std::thread reader([&] {
    grace::ReadGuard g;
    inside = true;
    while (!release) std::this_thread::sleep_for(1ms);
  });
  while (!inside) std::this_thread::yield();
  std::vector<int> order;
  std::atomic<int> ran{0};
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(grace::call([&, i] {
      order.push_back(i);  // only the callback thread writes it
      ran.fetch_add(1);
    }).ok());
  }
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(ran.load(), 0) << "a callback ran while a region older than it was still running";
  release = true;
  reader.join();
  ASSERT_TRUE(grace::barrier().ok());
  ASSERT_EQ(ran.load(), 1000);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(order[static_cast<std::size_t>(i)], i);
  EXPECT_FALSE(grace::call(nullptr).ok());
}

TEST(Grace, ThreadsRegisterAndExitWhileGracePeriodsScan) {
  // The race the registry must survive: threads appear (first region) and exit, some of them
  // inside a region, while grace periods scan the markers.
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop) ASSERT_TRUE(grace::synchronize().ok());
  });
  for (int round = 0; round < 200; ++round) {
    std::thread t([round] {
      grace::read_lock();
      if (round % 2) grace::read_unlock();  // every other thread exits inside its region
    });
    t.join();
  }
  stop = true;
  writer.join();
  ASSERT_TRUE(grace::synchronize().ok());  // exited threads are not waited for
  EXPECT_LE(grace::stats().threads_registered, 3u);
}

// Issue 11, defect 10: a raw SYS_exit runs no TLS destructor, so the thread's marker stays
// registered and raised. An exited thread is quiescent: grace periods must not wait for it.
// In a child of the test, so that the old behaviour (waiting forever) fails the test instead of
// hanging it.
TEST(Grace, AThreadThatExitsInsideARegionIsNotWaitedFor) {
  const int code = bounded::run_in_child(
      [] {
        static std::atomic<bool> inside{false};
        pthread_t t;
        if (pthread_create(
                &t, nullptr,
                [](void*) -> void* {
                  grace::read_lock();
                  inside = true;
                  ::syscall(SYS_exit, 0);  // no unlock, no unregistering
                  return nullptr;
                },
                nullptr) != 0) {
          return 2;
        }
        while (!inside.load()) std::this_thread::yield();
        if (!grace::synchronize().ok()) return 3;  // whether or not the thread is gone yet
        if (!grace::synchronize().ok() || !grace::holdouts().empty()) return 4;
        return grace::stats().threads_registered == 0 ? 0 : 5;  // its marker was dropped
      },
      5000);
  EXPECT_EQ(code, 0) << bounded::describe(code);
}

// The callback thread is not in a fork()ed child: the callbacks it had not run yet must still
// run there (barrier() starts a thread for them), and the one it was running when the parent
// forked must not keep barrier() waiting for ever.
TEST(Grace, ABarrierInAForkedChildRunsTheCallbacksItInherited) {
  static std::atomic<bool> first_running{false}, release_first{false}, second_ran{false};
  ASSERT_TRUE(grace::call([] {
                first_running = true;
                while (!release_first.load()) std::this_thread::sleep_for(1ms);
              }).ok());
  while (!first_running.load()) std::this_thread::sleep_for(1ms);
  ASSERT_TRUE(grace::call([] { second_ran = true; }).ok());
  const int code = bounded::run_in_child(
      [] {
        if (!grace::barrier().ok()) return 2;
        return second_ran.load() ? 0 : 3;
      },
      5000);
  release_first = true;
  ASSERT_TRUE(grace::barrier().ok());
  EXPECT_TRUE(second_ran.load());
  EXPECT_EQ(code, 0) << bounded::describe(code);
}

TEST(Grace, WorksInAForkedChild) {
  { grace::ReadGuard g; }
  std::atomic<bool> stop{false}, looping{false};
  std::thread reader([&] {
    while (!stop) {
      grace::ReadGuard g;
      looping.store(true, std::memory_order_relaxed);
    }
  });
  // Fork while the reader goes in and out of regions, not while it is still starting: under
  // ASan (LLVM 14), a thread start-up holds allocator locks that fork() does not take, and a
  // child inheriting one hangs in its first allocation.
  while (!looping) std::this_thread::yield();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Only this thread exists here: one registered marker, and everything works.
    std::atomic<int> ran{0};
    bool ok = grace::stats().threads_registered == 1 && grace::synchronize().ok() &&
              grace::call([&] { ran = 1; }).ok() && grace::barrier().ok() && ran == 1;
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  stop = true;
  reader.join();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(Grace, StallReportNamesTheHoldoutOnce) {
  setenv("TRAMWAY_GRACE_STALL_SECONDS", "0.2", 1);
  std::atomic<pid_t> tid{0};
  std::atomic<bool> release{false};
  std::thread reader([&] {
    pthread_setname_np(pthread_self(), "holdout-reader");
    grace::ReadGuard g;
    tid = static_cast<pid_t>(gettid());
    while (!release) std::this_thread::sleep_for(1ms);
  });
  while (tid == 0) std::this_thread::yield();
  EXPECT_TRUE(grace::holdouts().empty()) << "no grace period is running yet";
  const auto reports_before = grace::stats().stall_reports;
  testing::internal::CaptureStderr();
  std::thread writer([] { ASSERT_TRUE(grace::synchronize().ok()); });
  std::vector<grace::Holdout> seen;
  for (int i = 0; i < 200 && seen.empty(); ++i) {
    std::this_thread::sleep_for(5ms);
    seen = grace::holdouts();
  }
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].tid, tid.load());
  EXPECT_EQ(seen[0].name, "holdout-reader");
  EXPECT_EQ(seen[0].depth, 1u);
  std::this_thread::sleep_for(600ms);  // three thresholds: still one report
  release = true;
  writer.join();
  reader.join();
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("grace period stalled"), std::string::npos) << err;
  EXPECT_NE(err.find("thread " + std::to_string(tid.load()) + " (holdout-reader)"), std::string::npos) << err;
  EXPECT_EQ(err.find("grace period stalled"), err.rfind("grace period stalled")) << "reported more than once:\n" << err;
  EXPECT_EQ(grace::stats().stall_reports - reports_before, 1u);
  EXPECT_TRUE(grace::holdouts().empty());
}

extern "C" void tramway_test_asm_region(void (*fn)(void*), void* arg);

TEST(Grace, AssemblyMacrosRaiseAndLowerTheSameMarker) {
  // On a fresh thread, so the assembly path registers it.
  std::thread([] {
    bool inside = false;
    tramway_test_asm_region([](void* p) { *static_cast<bool*>(p) = grace::in_read_section(); }, &inside);
    EXPECT_TRUE(inside);
    EXPECT_FALSE(grace::in_read_section());
    // Nested inside a C++ region: depth 2 inside, 1 after.
    grace::ReadGuard outer;
    std::uint64_t depth = 0;
    tramway_test_asm_region(
        [](void* p) {
          *static_cast<std::uint64_t*>(p) = grace::detail::t_marker->value.load() & grace::detail::kNestMask;
        },
        &depth);
    EXPECT_EQ(depth, 2u);
    EXPECT_TRUE(grace::in_read_section());
  }).join();
}

TEST(Grace, AnAssemblyRegionHoldsTheGracePeriod) {
  struct Shared {
    std::atomic<bool> inside{false}, release{false};
  } sh;
  std::thread reader([&] {
    tramway_test_asm_region(
        [](void* p) {
          auto* s = static_cast<Shared*>(p);
          s->inside = true;
          while (!s->release) std::this_thread::sleep_for(1ms);
        },
        &sh);
  });
  while (!sh.inside) std::this_thread::yield();
  std::atomic<bool> done{false};
  std::thread writer([&] {
    ASSERT_TRUE(grace::synchronize().ok());
    done = true;
  });
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(done) << "the grace period ignored a region raised from assembly";
  sh.release = true;  // its lower must also wake the sleeping grace period
  writer.join();
  reader.join();
  EXPECT_TRUE(done);
}
