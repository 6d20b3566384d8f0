// A hook callback may end its thread: pthread_exit (and cancellation, the same forced unwind)
// unwinds through the C++ dispatchers and the stubs (hook_entry.S, whose CFI describes their
// frame) into the hooked function and its callers, running their cleanups, and the program
// goes on: later calls, attaches, detaches and grace periods work. An ordinary exception out
// of a callback still ends the program (callbacks must not throw).
#include <gtest/gtest.h>
#include <pthread.h>

#include <atomic>

#include "tramway/grace.h"
#include "tramway/hooks.h"

namespace hooks = tramway::hooks;

#define PATCHABLE __attribute__((noinline, patchable_function_entry(13, 8)))

extern "C" PATCHABLE int exit_hooked(int x) {
  asm volatile("");
  return x + 1;
}
int (*volatile p_exit_hooked)(int) = exit_hooked;

namespace {

thread_local bool t_exit_in_callback = false;  // the callback ends the thread that set it
std::atomic<int> g_calls{0};

void maybe_exit(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  g_calls.fetch_add(1);
  if (t_exit_in_callback) pthread_exit(reinterpret_cast<void*>(42));
}

// Runs in a thread: `warm_up` calls first (so the stub's inline path, which needs the
// thread's counter block, is the one that ends it), then the call that exits from inside the
// callback, with a cleanup handler in the caller's frame that must run.
struct Run {
  int warm_up = 0;
  bool cleaned_up = false;
  bool returned = false;
};
void* thread_main(void* arg) {
  auto* run = static_cast<Run*>(arg);
  for (int i = 0; i < run->warm_up; ++i) p_exit_hooked(i);
  t_exit_in_callback = true;
  pthread_cleanup_push([](void* r) { static_cast<Run*>(r)->cleaned_up = true; }, run);
  p_exit_hooked(1);
  run->returned = true;
  pthread_cleanup_pop(0);
  return nullptr;
}

void exit_from_callback(int warm_up) {
  Run run;
  run.warm_up = warm_up;
  pthread_t t;
  ASSERT_EQ(pthread_create(&t, nullptr, thread_main, &run), 0);
  void* value = nullptr;
  ASSERT_EQ(pthread_join(t, &value), 0);
  EXPECT_EQ(value, reinterpret_cast<void*>(42));
  EXPECT_TRUE(run.cleaned_up) << "the caller's cleanup handler did not run";
  EXPECT_FALSE(run.returned);
}

class HookThreadExit : public ::testing::TestWithParam<int> {};

TEST_P(HookThreadExit, PthreadExitInACallbackEndsTheThreadAndTheProgramGoesOn) {
  hooks::Ops ops;
  ops.entry = maybe_exit;
  switch (GetParam()) {
    case 0: break;                                // the dispatcher (first call) and the inline path
    case 1: ops.save_extended_state = true; break;  // the dispatcher's xsave path
    case 2: ops.direct = true; break;             // the direct stub
  }
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"exit_hooked"})).ok());
  exit_from_callback(0);  // the thread's first hooked call: no counter block, the dispatcher
  exit_from_callback(3);  // the inline path
  // A second ops on the site: the dispatcher's list path.
  hooks::Ops other;
  other.entry = [](const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {};
  ASSERT_TRUE(hooks::attach(other, hooks::Filter::names({"exit_hooked"})).ok());
  exit_from_callback(3);

  // Everything still works: calls, grace periods, detach, attach again.
  const int before = g_calls.load();
  EXPECT_EQ(p_exit_hooked(1), 2);
  EXPECT_EQ(g_calls.load(), before + 1);
  EXPECT_TRUE(tramway::grace::synchronize().ok());
  ASSERT_TRUE(hooks::detach(other).ok());
  ASSERT_TRUE(hooks::detach(ops).ok());
  EXPECT_EQ(p_exit_hooked(1), 2);
  EXPECT_EQ(g_calls.load(), before + 1);
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"exit_hooked"})).ok());
  exit_from_callback(3);
  ASSERT_TRUE(hooks::detach(ops).ok());
}

INSTANTIATE_TEST_SUITE_P(Paths, HookThreadExit, ::testing::Values(0, 1, 2),
                         [](const auto& info) { return std::string(info.param == 0   ? "Common"
                                                                   : info.param == 1 ? "ExtendedState"
                                                                                     : "Direct"); });

TEST(HookThreadExitDeathTest, AnExceptionOutOfACallbackEndsTheProgram) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        hooks::Ops ops;
        ops.entry = [](const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) { throw 1; };
        if (hooks::attach(ops, hooks::Filter::names({"exit_hooked"})).ok()) p_exit_hooked(1);
      },
      "");
}

}  // namespace
