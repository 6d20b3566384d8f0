// Grace periods, flavor tasks: a thread inside retired code — live, preempted, interrupted by
// a signal handler that blocks, or stopped by a debugger — holds the grace period until it
// leaves; threads that are blocked elsewhere are observed through /proc, never signalled.
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "tramway/grace.h"
#include "tramway/text/code_memory.h"

namespace grace = tramway::grace;
namespace text = tramway::text;
using namespace std::chrono_literals;

namespace {

// Generated code that raises the byte at %rsi (from inside: the thread is in the range once it
// is set), then spins until the byte at %rdi is non-zero:
//   movb $1, (%rsi) ; loop: pause ; cmpb $0, (%rdi) ; je loop ; ret
struct SpinCode {
  static constexpr std::size_t kSize = 11;
  text::CodeBlock block;
  SpinCode() {
    auto b = text::allocate_code(16);
    EXPECT_TRUE(b.ok()) << b.status().message();
    block = *b;
    const std::uint8_t code[kSize] = {0xc6, 0x06, 0x01, 0xf3, 0x90, 0x80, 0x3f, 0x00, 0x74, 0xf9, 0xc3};
    std::memcpy(block.rw, code, sizeof code);
  }
  void run(const std::atomic<std::uint8_t>* release, std::atomic<std::uint8_t>* entered) const {
    reinterpret_cast<void (*)(const void*, void*)>(block.rx)(release, entered);
  }
  const void* begin() const { return block.rx; }
  const void* end() const { return block.rx + kSize; }
  bool holds(std::uintptr_t pc) const {
    return pc >= reinterpret_cast<std::uintptr_t>(begin()) && pc < reinterpret_cast<std::uintptr_t>(end());
  }
};

// A thread that runs the spin code once; constructed, it is inside it.
struct Spinner {
  std::atomic<std::uint8_t> release{0}, entered{0};
  std::atomic<pid_t> tid{0};
  std::atomic<bool> done{false};
  std::thread thread;
  explicit Spinner(const SpinCode& code, const char* name = "tasks-spinner") {
    thread = std::thread([this, &code, name] {
      pthread_setname_np(pthread_self(), name);
      tid = gettid();
      code.run(&release, &entered);
      done = true;
    });
    while (tid == 0 || entered.load() == 0) std::this_thread::yield();
  }
  ~Spinner() {
    release = 1;
    thread.join();
  }
};

std::future<tramway::Status> start_tasks_gp() {
  return std::async(std::launch::async, [] { return grace::synchronize(grace::Flavor::tasks); });
}

bool finishes_within(std::future<tramway::Status>& gp, std::chrono::milliseconds t) {
  return gp.wait_for(t) == std::future_status::ready;
}

// The holdouts of the grace period in progress, once it has found some (it scans, then signals
// running threads and waits for their answers: on a loaded machine that takes a while).
std::vector<grace::Holdout> holdouts_once_found() {
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  std::vector<grace::Holdout> held = grace::holdouts();
  while (held.empty() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
    held = grace::holdouts();
  }
  return held;
}

}  // namespace

TEST(GraceTasks, RetireRejectsAnEmptyRange) {
  static const char x = 0;
  const auto s = grace::retire(&x, &x);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("empty range"), std::string::npos) << s.message();
}

// In the tests below the grace period's future is declared before the spinner: a failed
// assertion destroys the spinner (releasing it) first, and the future's wait then ends.
TEST(GraceTasks, WaitsForAThreadRunningInsideARetiredRange) {
  SpinCode code;
  std::future<tramway::Status> gp;
  Spinner spinner(code);
  const auto before = grace::stats();
  ASSERT_TRUE(grace::retire(code.begin(), code.end()).ok());
  gp = start_tasks_gp();
  EXPECT_FALSE(finishes_within(gp, 200ms)) << "the grace period ended while a thread ran in the retired code";
  const auto held = holdouts_once_found();
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].tid, spinner.tid.load());
  EXPECT_EQ(held[0].name, "tasks-spinner");
  EXPECT_FALSE(held[0].range.empty()) << held[0].where;
  spinner.release = 1;
  ASSERT_TRUE(finishes_within(gp, 5s));
  EXPECT_TRUE(gp.get().ok());
  EXPECT_TRUE(spinner.done.load());
  const auto after = grace::stats();
  EXPECT_GE(after.tasks_grace_periods, before.tasks_grace_periods + 1);
  EXPECT_GT(after.threads_signalled, before.threads_signalled) << "a running thread is asked by a signal";
  EXPECT_GT(after.grace_periods, before.grace_periods) << "a tasks grace period includes a trace one";
}

TEST(GraceTasks, CodeOutsideTheRetiredRangesDoesNotHoldIt) {
  SpinCode retired, live;
  Spinner spinner(live);  // always inside live code: must not stall the grace period
  ASSERT_TRUE(grace::retire(retired.begin(), retired.end()).ok());
  auto gp = start_tasks_gp();
  ASSERT_TRUE(finishes_within(gp, 5s));
  EXPECT_TRUE(gp.get().ok());
  EXPECT_FALSE(spinner.done.load());
}

TEST(GraceTasks, BlockedThreadsAreObservedWithoutASignal) {
  std::mutex mu;
  std::condition_variable cv;
  bool go = false;
  std::vector<std::thread> sleepers;
  for (int i = 0; i < 8; ++i) {
    sleepers.emplace_back([&] {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return go; });
    });
  }
  std::this_thread::sleep_for(50ms);  // all asleep on the condition variable
  SpinCode code;
  const auto before = grace::stats();
  ASSERT_TRUE(grace::retire(code.begin(), code.end()).ok());
  ASSERT_TRUE(grace::synchronize(grace::Flavor::tasks).ok());
  const auto after = grace::stats();
  EXPECT_EQ(after.threads_signalled, before.threads_signalled) << "blocked threads were disturbed";
  EXPECT_GE(after.threads_observed - before.threads_observed, 8u);
  {
    std::lock_guard lock(mu);
    go = true;
  }
  cv.notify_all();
  for (auto& t : sleepers) t.join();
}

// SIGUSR1's handler blocks while the thread's interrupted PC lies in the retired code: the
// thread is asleep outside the range, but its nested frame is inside.
std::atomic<bool> g_in_handler{false}, g_handler_release{false};
void blocking_handler(int) {
  g_in_handler = true;
  while (!g_handler_release) usleep(1000);
}

TEST(GraceTasks, ANestedSignalFrameInsideTheRangeHoldsIt) {
  struct sigaction sa {};
  sa.sa_handler = blocking_handler;
  sigemptyset(&sa.sa_mask);
  ASSERT_EQ(sigaction(SIGUSR1, &sa, nullptr), 0);
  SpinCode code;
  std::future<tramway::Status> gp;
  Spinner spinner(code);
  struct ReleaseHandler {
    ~ReleaseHandler() { g_handler_release = true; }
  } release_handler;  // on a failed assertion too, before the spinner is joined
  pthread_kill(spinner.thread.native_handle(), SIGUSR1);
  while (!g_in_handler) std::this_thread::yield();
  ASSERT_TRUE(grace::retire(code.begin(), code.end()).ok());
  gp = start_tasks_gp();
  EXPECT_FALSE(finishes_within(gp, 200ms)) << "a frame interrupted inside the range was not seen";
  const auto held = holdouts_once_found();
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].tid, spinner.tid.load());
  EXPECT_FALSE(held[0].range.empty()) << held[0].where;
  g_handler_release = true;  // back into the loop: still inside
  EXPECT_FALSE(finishes_within(gp, 100ms));
  spinner.release = 1;
  ASSERT_TRUE(finishes_within(gp, 5s));
  EXPECT_TRUE(gp.get().ok());
}

TEST(GraceTasks, CallbacksOfTheTasksFlavorRunAfterTheThreadLeft) {
  SpinCode code;
  Spinner spinner(code);
  ASSERT_TRUE(grace::retire(code.begin(), code.end()).ok());
  std::atomic<bool> ran{false}, left_first{false};
  ASSERT_TRUE(grace::call(grace::Flavor::tasks, [&] {
    left_first = spinner.done.load();
    ran = true;
  }).ok());
  std::this_thread::sleep_for(200ms);
  EXPECT_FALSE(ran.load());
  spinner.release = 1;
  ASSERT_TRUE(grace::barrier().ok());
  EXPECT_TRUE(ran.load());
  EXPECT_TRUE(left_first.load());
}

// A debugger stops one thread inside the retired code (ptrace stops only that thread, unlike
// a process-wide SIGSTOP): the grace period reports it once past the threshold, keeps
// waiting, and finishes once the thread is let go.
TEST(GraceTasks, AThreadStoppedInsideIsReportedAndFinishesWhenResumed) {
  setenv("TRAMWAY_GRACE_STALL_SECONDS", "0.2", 1);
  SpinCode code;
  std::future<tramway::Status> gp;
  Spinner spinner(code, "stopped-inside");
  const pid_t tid = spinner.tid;
  int ready[2], go[2];
  ASSERT_EQ(pipe(ready), 0);
  ASSERT_EQ(pipe(go), 0);
  const pid_t tracer = fork();
  ASSERT_GE(tracer, 0);
  if (tracer == 0) {
    char c = 0;
    if (ptrace(PTRACE_SEIZE, tid, nullptr, nullptr) != 0) c = 'S';
    if (!c && ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) != 0) c = 'I';
    int status;
    if (!c && waitpid(tid, &status, __WALL) != tid) c = 'W';
    if (write(ready[1], c ? &c : "k", 1) != 1) _exit(1);
    if (read(go[0], &c, 1) != 1) _exit(1);
    ptrace(PTRACE_DETACH, tid, nullptr, nullptr);
    _exit(0);
  }
  char answer = 0;
  ASSERT_EQ(read(ready[0], &answer, 1), 1);
  if (answer != 'k') {
    kill(tracer, SIGKILL);
    waitpid(tracer, nullptr, 0);
    GTEST_SKIP() << "ptrace is not permitted here (step " << answer << "); the stall path is covered by torture";
  }
  ASSERT_TRUE(grace::retire(code.begin(), code.end()).ok());
  testing::internal::CaptureStderr();
  gp = start_tasks_gp();
  EXPECT_FALSE(finishes_within(gp, 600ms));
  const auto held = holdouts_once_found();
  spinner.release = 1;  // seen only once it runs again
  EXPECT_FALSE(finishes_within(gp, 100ms)) << "a stopped thread inside the range was not waited for";
  if (write(go[1], "g", 1) != 1) ADD_FAILURE() << "could not resume the stopped thread";
  waitpid(tracer, nullptr, 0);
  ASSERT_TRUE(finishes_within(gp, 5s));
  EXPECT_TRUE(gp.get().ok());
  const std::string err = testing::internal::GetCapturedStderr();
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].tid, tid);
  EXPECT_EQ(held[0].where.find("running"), std::string::npos) << held[0].where;
  EXPECT_FALSE(held[0].range.empty());
  EXPECT_NE(err.find("tasks grace period stalled"), std::string::npos) << err;
  EXPECT_NE(err.find("thread " + std::to_string(tid) + " (stopped-inside)"), std::string::npos) << err;
  EXPECT_NE(err.find("in retired range"), std::string::npos) << err;
  EXPECT_EQ(err.find("stalled"), err.rfind("stalled")) << "reported more than once:\n" << err;
}

TEST(GraceTasks, WorksInAForkedChild) {
  SpinCode code;
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Only this thread exists here: a thread spinning inside retired code, then a tasks
    // grace period that must wait for it.
    SpinCode inner;
    Spinner spinner(inner);
    if (!grace::retire(inner.begin(), inner.end()).ok()) _exit(2);
    auto gp = start_tasks_gp();
    if (finishes_within(gp, 100ms)) _exit(3);
    spinner.release = 1;
    if (!finishes_within(gp, 5s) || !gp.get().ok()) _exit(4);
    std::atomic<bool> ran{false};
    if (!grace::retire(code.begin(), code.end()).ok()) _exit(5);
    if (!grace::call(grace::Flavor::tasks, [&] { ran = true; }).ok() || !grace::barrier().ok() || !ran) _exit(6);
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}
