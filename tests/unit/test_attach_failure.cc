// An attach whose code batch fails after its int3s went in: a thread that reached a site then
// was carried on as the new call, into a direct slot and the ops's callback. attach must not
// return (letting the caller free the ops, as the recorder does) while that callback runs;
// without grace periods it must leave the ops for detach to finish instead of freeing it.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "grace/internal.h"
#include "text/internal.h"
#include "tramway/hooks.h"

namespace hooks = tramway::hooks;
using tramway::Status;

#define PATCHABLE __attribute__((noinline, patchable_function_entry(13, 8)))
extern "C" PATCHABLE int attach_fx_work(int x) {
  asm volatile("");
  return x + 1;
}

namespace {

std::atomic<bool> g_go{false}, g_entered{false}, g_release{false}, g_left{false};

void held_callback(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  g_entered.store(true);
  while (!g_release.load()) std::this_thread::yield();
  g_left.store(true);
}

// Lets the caller thread into the site (its int3 is in), waits until it is inside the
// callback, then fails the batch.
Status let_one_in_then_fail() {
  g_go.store(true);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!g_entered.load() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  return Status::error(g_entered.load() ? "injected batch failure" : "injected batch failure (nobody came in)");
}

struct Scenario {
  hooks::Ops ops;
  std::thread caller;
  Scenario() {
    g_go = g_entered = g_release = g_left = false;
    ops.entry = held_callback;
    ops.direct = true;  // the recorder's kind: a slot names the ops before the site calls it
    caller = std::thread([] {
      while (!g_go.load()) std::this_thread::yield();
      attach_fx_work(1);
    });
  }
  ~Scenario() {
    g_release.store(true);
    caller.join();
    tramway::text::detail::testing::set_after_int3s_hook(nullptr);
  }
};

TEST(AttachFailure, AnAttachWhoseBatchFailedReturnsOnlyOnceTheCallbacksItLetInAreOver) {
  Scenario s;
  tramway::text::detail::testing::set_after_int3s_hook(let_one_in_then_fail);
  std::atomic<bool> returned{false};
  bool left_at_return = false;
  Status st;
  std::thread attacher([&] {
    st = hooks::attach(s.ops, hooks::Filter::names({"attach_fx_work"}));
    left_at_return = g_left.load();
    returned.store(true);
  });
  while (!g_entered.load()) std::this_thread::yield();
  // The callback holds its thread in the stub: attach waits for a grace period, so it cannot
  // have returned, however long this takes.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(returned.load()) << "attach returned while a callback it let in was running";
  g_release.store(true);
  attacher.join();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("injected batch failure"), std::string::npos) << st.message();
  EXPECT_TRUE(left_at_return);
  EXPECT_EQ(s.ops.state, nullptr);  // freed: the ops may be freed or attached again
  tramway::text::detail::testing::set_after_int3s_hook(nullptr);
  ASSERT_TRUE(hooks::attach(s.ops, hooks::Filter::names({"attach_fx_work"})).ok());
  ASSERT_TRUE(hooks::detach(s.ops).ok());
}

TEST(AttachFailure, WithoutAGracePeriodAFailedAttachLeavesTheOpsForDetachToFinish) {
  Scenario s;
  tramway::text::detail::testing::set_after_int3s_hook(let_one_in_then_fail);
  tramway::grace::detail::inject_grace_period_failures(1);
  Status st;
  std::thread attacher([&] { st = hooks::attach(s.ops, hooks::Filter::names({"attach_fx_work"})); });
  while (!g_entered.load()) std::this_thread::yield();
  attacher.join();  // the grace period fails at once: nothing waits for the callback
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("call hooks::detach to finish"), std::string::npos) << st.message();
  EXPECT_NE(s.ops.state, nullptr) << "not freed: the callback still runs";
  const Status again = hooks::attach(s.ops, hooks::Filter::names({"attach_fx_work"}));
  EXPECT_FALSE(again.ok());
  g_release.store(true);
  tramway::text::detail::testing::set_after_int3s_hook(nullptr);
  ASSERT_TRUE(hooks::detach(s.ops).ok()) << "detach finishes it";
  EXPECT_EQ(s.ops.state, nullptr);
  ASSERT_TRUE(hooks::attach(s.ops, hooks::Filter::names({"attach_fx_work"})).ok());
  attach_fx_work(1);
  ASSERT_TRUE(hooks::detach(s.ops).ok());
}

}  // namespace
