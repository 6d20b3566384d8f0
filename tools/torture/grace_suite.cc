// Suite "grace", in the manner of the kernel's rcutorture. Flavor trace: reader threads
// follow a shared pointer inside read-side regions of random length (sometimes nested, and
// also from SIGPROF handlers landing at random points), while writer threads replace the
// object, wait for a grace period (synchronize, or call + barrier), then poison and free the
// old one. Flavor tasks runs alongside (tasks_readers.cc): generated code called without a
// marker, retired, waited for and poisoned with ud2.
//
// Every object carries a pipe count: 0 while published, 1 once retired, 2 once a grace
// period has passed since its retirement, just before it is poisoned. A reader records the
// count it sees at the end of its region: the pipe histogram. Anything past 1 means a
// region outlived a full grace period begun after the object was retired: a bug. So does a
// reader touching poison.
#include <signal.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "storm.h"
#include "suite.h"
#include "tasks_readers.h"
#include "tramway/grace.h"

namespace tramway::torture {
namespace {

constexpr std::uint64_t kAlive = 0x600dcafe, kPoison = 0xdeadbeef;
constexpr int kPipeSlots = 4;

struct Object {
  std::atomic<std::uint64_t> magic{kAlive};
  std::atomic<int> pipe{0};
};

std::atomic<Object*> g_current{nullptr};

struct alignas(64) ReaderStats {
  std::array<std::atomic<std::uint64_t>, kPipeSlots> pipe{};  // regions by pipe count seen
  std::atomic<std::uint64_t> passes{0}, poison{0};
};
thread_local ReaderStats* t_stats = nullptr;

// One region: read the object, linger, read its pipe count again.
void read_once(ReaderStats& st, unsigned spin) {
  grace::ReadGuard g;
  Object* o = g_current.load(std::memory_order_acquire);
  for (unsigned i = 0; i < spin; ++i) __builtin_ia32_pause();
  if (spin % 7 == 0) {  // nested region
    grace::ReadGuard inner;
    if (o->magic.load(std::memory_order_relaxed) != kAlive) st.poison.fetch_add(1, std::memory_order_relaxed);
  }
  if (o->magic.load(std::memory_order_relaxed) != kAlive) st.poison.fetch_add(1, std::memory_order_relaxed);
  const int pipe = o->pipe.load(std::memory_order_relaxed);
  st.pipe[static_cast<std::size_t>(pipe < kPipeSlots ? pipe : kPipeSlots - 1)].fetch_add(1, std::memory_order_relaxed);
  st.passes.fetch_add(1, std::memory_order_relaxed);
}

void on_sigprof(int, siginfo_t*, void*) {
  if (t_stats) {
    read_once(*t_stats, 3);
  } else {
    TasksTorture::from_signal_handler();
  }
}

void retire(Object* old) {
  old->pipe.store(1, std::memory_order_relaxed);
}
void poison_and_free(Object* old) {
  old->pipe.store(2, std::memory_order_relaxed);  // a reader still inside would record 2
  for (int i = 0; i < 200; ++i) __builtin_ia32_pause();
  old->magic.store(kPoison, std::memory_order_relaxed);
  delete old;
}

}  // namespace

int run_grace(const Options& o) {
  struct sigaction sa {};
  sa.sa_sigaction = on_sigprof;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGPROF, &sa, nullptr);

  g_current.store(new Object);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> retired{0}, errors{0};
  // Half the readers (at least one of each) run the tasks flavor's generated code.
  const int tasks_readers = std::max(1, o.threads / 2);
  const int trace_readers = std::max(1, o.threads - tasks_readers);
  std::vector<ReaderStats> stats(static_cast<std::size_t>(trace_readers));
  TasksTorture tasks;
  if (std::string e; !tasks.start(o, tasks_readers, &e)) {
    std::fprintf(stderr, "grace: %s\n", e.c_str());
    return 1;
  }
  const auto gp_before = grace::stats();
  const auto start = std::chrono::steady_clock::now();

  std::vector<std::thread> threads;
  for (int i = 0; i < trace_readers; ++i) {
    threads.emplace_back([&, i] {
      t_stats = &stats[static_cast<std::size_t>(i)];
      { grace::ReadGuard first; }  // register before the storm can enter a region from a handler
      StormTimer timer(o.signal_interval_us);
      std::minstd_rand rng(static_cast<unsigned>(o.seed) + static_cast<unsigned>(i));
      while (!stop.load(std::memory_order_relaxed)) read_once(*t_stats, rng() % 2000);
    });
  }
  // Two writers: one waits with synchronize(), one hands the free to call().
  for (int w = 0; w < 2; ++w) {
    threads.emplace_back([&, w] {
      std::minstd_rand rng(static_cast<unsigned>(o.seed) * 31 + static_cast<unsigned>(w));
      while (!stop.load(std::memory_order_relaxed)) {
        Object* old = g_current.exchange(new Object, std::memory_order_acq_rel);
        retire(old);
        retired.fetch_add(1, std::memory_order_relaxed);
        if (w == 0) {
          if (!grace::synchronize().ok()) errors.fetch_add(1);
          poison_and_free(old);
        } else if (!grace::call([old] { poison_and_free(old); }).ok()) {
          errors.fetch_add(1);
        }
        if (w == 1 && rng() % 64 == 0 && !grace::barrier().ok()) errors.fetch_add(1);
      }
    });
  }

  const auto end = start + std::chrono::duration<double>(o.seconds);
  auto next_report = start + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (std::chrono::steady_clock::now() >= next_report) {
      next_report += std::chrono::seconds(10);
      const auto now = grace::stats();
      std::fprintf(stderr, "grace: %.0f/%.0f s, %" PRIu64 " grace periods (%" PRIu64 " tasks)\n",
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), o.seconds,
                   now.grace_periods - gp_before.grace_periods, now.tasks_grace_periods - gp_before.tasks_grace_periods);
    }
  }
  stop = true;
  for (auto& t : threads) t.join();
  const TasksTotals tt = tasks.stop();
  if (!grace::barrier().ok()) errors.fetch_add(1);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::array<std::uint64_t, kPipeSlots> pipe{};
  std::uint64_t passes = 0, poison = 0;
  for (const ReaderStats& st : stats) {
    for (int k = 0; k < kPipeSlots; ++k) pipe[static_cast<std::size_t>(k)] += st.pipe[static_cast<std::size_t>(k)].load();
    passes += st.passes.load();
    poison += st.poison.load();
  }
  const auto gp_after = grace::stats();
  const std::uint64_t violations = pipe[2] + pipe[3] + poison + errors.load() + tt.pipe[2] + tt.pipe[3] + tt.errors;
  std::printf("grace: %s %.1f s, %d+%d readers, signal every %d us\n"
              "  trace: grace_periods=%" PRIu64 ", callbacks=%" PRIu64 ", retired=%" PRIu64 ", reader_passes=%" PRIu64
              ", pipe=[%" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "], poison_touched=%" PRIu64 ", errors=%" PRIu64 "\n"
              "  tasks: grace_periods=%" PRIu64 ", retired=%" PRIu64 ", poisoned=%" PRIu64 ", reader_passes=%" PRIu64
              ", pipe=[%" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "], threads_signalled=%" PRIu64
              ", threads_observed=%" PRIu64 ", errors=%" PRIu64 "\n"
              "  violations=%" PRIu64 "\n",
              violations ? "FAIL" : "PASS", elapsed, trace_readers, tasks_readers, o.signal_interval_us,
              gp_after.grace_periods - gp_before.grace_periods, gp_after.callbacks_run - gp_before.callbacks_run,
              retired.load(), passes, pipe[0], pipe[1], pipe[2], pipe[3], poison, errors.load(),
              gp_after.tasks_grace_periods - gp_before.tasks_grace_periods, tt.retired, tt.poisoned, tt.passes, tt.pipe[0],
              tt.pipe[1], tt.pipe[2], tt.pipe[3], gp_after.threads_signalled - gp_before.threads_signalled,
              gp_after.threads_observed - gp_before.threads_observed, tt.errors, violations);
  if (!tt.first_error.empty()) std::fprintf(stderr, "grace: tasks: %s\n", tt.first_error.c_str());
  return violations ? 1 : 0;
}

}  // namespace tramway::torture
