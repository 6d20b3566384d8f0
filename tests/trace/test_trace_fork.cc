// fork() while recording (issue 11, defects 1 and 2): the recorder's lock comes first in the
// one lock order (common/lock_order.h), so a fork cannot deadlock against trace::detach, which
// holds it across a grace period; and a child of a recording parent can record on its own.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "../unit/bounded_child.h"
#include "fixtures.h"
#include "tramway/grace.h"
#include "tramway/static_key.h"
#include "tramway/trace.h"

TRAMWAY_STATIC_KEY_FALSE(trace_fork_key);

namespace {

namespace grace = tramway::grace;
namespace trace = tramway::trace;

std::string trace_path(const char* what) {
  return "/tmp/tramway-trace-fork-" + std::to_string(getpid()) + "-" + what + ".trace";
}

enum ChildFailure {
  kOk = 0,
  kStartFailed = 20,
  kAttachFailed = 21,
  kNothingRecorded = 22,
  kDetachFailed = 23,
  kStopFailed = 24,
  kKeyFlipFailed = 25,
  kSynchronizeFailed = 26,
};

// A child of a recording parent records on its own: start (the parent's ops, inherited, are
// detached first), attach, traced calls, detach, stop; it flips a key and waits for a grace
// period too.
int child_records() {
  const std::string path = trace_path("child");
  if (!trace::start({path}).ok()) return kStartFailed;
  if (!trace::attach("trace_fx::middle*").ok()) return kAttachFailed;
  for (int i = 0; i < 10; ++i) trace_fx::outer(i);
  if (!trace::flush().ok() || trace::stats().events == 0) return kNothingRecorded;
  if (!trace::detach("trace_fx::middle*").ok()) return kDetachFailed;
  if (!trace::stop().ok()) return kStopFailed;
  ::unlink(path.c_str());
  if (!tramway::toggle(trace_fork_key).ok()) return kKeyFlipFailed;
  if (!grace::synchronize().ok()) return kSynchronizeFailed;
  return kOk;
}

// Defect 1, placed: trace::detach holds the recorder's lock and needs the grace-period lock,
// while fork's prepare step holds the grace-period lock and needs the recorder's (the order the
// old handlers took them in when the recorder registered its handler first). A reader holds a
// grace period (so its lock) while the forking thread, then the detaching one, queue for it.
int fork_while_a_trace_detach_waits_for_a_grace_period() {
  const std::string path = trace_path("parent");
  if (!trace::start({path}).ok()) return 40;
  if (!trace::attach("trace_fx::leaf*").ok()) return 41;
  std::atomic<bool> entered{false}, leave{false};
  std::thread reader([&] {
    grace::ReadGuard g;
    entered = true;
    while (!leave.load()) bounded::nap();
  });
  while (!entered.load()) bounded::nap();
  std::thread synchronizer([] { (void)grace::synchronize(); });
  const std::int64_t deadline = bounded::now_ms() + 3000;
  while (grace::holdouts().empty()) {  // the synchronizer holds the grace period, waiting for the reader
    if (bounded::now_ms() > deadline) return 42;
    bounded::nap();
  }
  std::atomic<pid_t> forker_tid{0}, detacher_tid{0};
  std::atomic<int> child_code{-100};
  std::thread forker([&] {
    forker_tid = bounded::gettid_();
    const pid_t pid = fork();
    if (pid == 0) _exit(child_records());
    child_code = bounded::wait_bounded(pid, 3000);
  });
  while (!forker_tid.load()) bounded::nap();
  if (!bounded::wait_blocked_in_futex(forker_tid)) return 43;
  std::atomic<bool> detached{false};
  std::thread detacher([&] {
    detacher_tid = bounded::gettid_();
    detached = trace::detach("trace_fx::leaf*").ok();
  });
  while (!detacher_tid.load()) bounded::nap();
  if (!bounded::wait_blocked_in_futex(detacher_tid)) return 44;
  leave = true;
  reader.join();
  synchronizer.join();
  forker.join();
  detacher.join();
  if (!detached.load()) return 45;
  if (!trace::stop().ok()) return 46;
  ::unlink(path.c_str());
  return child_code.load();
}

TEST(TraceFork, AForkWhileADetachWaitsForAGracePeriodDoesNotDeadlock) {
  const int code = bounded::run_in_child(fork_while_a_trace_detach_waits_for_a_grace_period, 8000);
  EXPECT_EQ(code, kOk) << bounded::describe(code)
                       << " (4x: a step of the parent failed or a thread was not where the test puts it)";
}

// Threads of a recording parent attach and detach globs, run traced code and wait for grace
// periods while the main thread forks; every child records on its own and exits.
int fork_storm_while_recording() {
  // The grace-period callback thread starts on first use: start it now, not during a fork.
  if (!grace::call([] {}).ok() || !grace::barrier().ok()) return 203;
  const std::string path = trace_path("storm");
  if (!trace::start({path}).ok()) return 40;
  std::atomic<bool> stop{false};
  std::atomic<long> rounds{0};
  std::atomic<int> started{0};  // fork only once every thread runs: a thread starting up may hold
                                // allocator locks that fork() does not take (ASan's)
  std::vector<std::thread> threads;
  threads.emplace_back([&] {
    started.fetch_add(1);
    while (!stop.load()) {
      if (trace::attach("trace_fx::leaf*").ok()) (void)trace::detach("trace_fx::leaf*");
      if (trace::attach("trace_fx::out*").ok()) (void)trace::detach("trace_fx::out*");
      rounds.fetch_add(1);
    }
  });
  threads.emplace_back([&] {
    started.fetch_add(1);
    while (!stop.load()) trace_fx::outer(1);
  });
  threads.emplace_back([&] {
    started.fetch_add(1);
    while (!stop.load()) {
      (void)grace::synchronize();
      (void)tramway::toggle(trace_fork_key);
    }
  });
  while (rounds.load() < 3 || started.load() < static_cast<int>(threads.size())) bounded::nap();
  int failure = 0;
  const std::int64_t end = bounded::now_ms() + 2500;
  for (int i = 0; i < 40 && bounded::now_ms() < end && failure == 0; ++i) {
    const pid_t pid = fork();
    if (pid == 0) _exit(child_records());
    if (pid < 0) return 202;
    failure = bounded::wait_bounded(pid, 3000);
  }
  stop = true;
  for (std::thread& t : threads) t.join();
  if (!trace::stop().ok() && failure == 0) failure = 47;
  ::unlink(path.c_str());
  return failure;
}

TEST(TraceFork, ChildrenOfARecordingParentRecord) {
  const int code = bounded::run_in_child(fork_storm_while_recording, 10000);
  EXPECT_EQ(code, kOk) << bounded::describe(code);
}

}  // namespace
