// fork() is safe (DESIGN invariant 9): a child never inherits a half-patched site, and it
// can patch its own code (membarrier re-registered, /proc/self/mem reopened for its own mm)
// without touching the parent's. fork() takes every lock of common/lock_order.h in one order:
// a child of a parent whose threads attach, detach, flip keys and wait for grace periods at
// the moment of fork can use every API, and neither side deadlocks.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "bounded_child.h"
#include "tramway/grace.h"
#include "tramway/hooks.h"
#include "tramway/static_key.h"
#include "tramway/text/patch.h"

#if defined(__clang__)
#define TEST_NOINLINE __attribute__((noinline))
#else
#define TEST_NOINLINE __attribute__((noinline, noclone))
#endif

TRAMWAY_STATIC_KEY_FALSE(fork_flipped_key);
TRAMWAY_STATIC_KEY_FALSE(fork_quiet_key);

TEST_NOINLINE int flipped_unlikely() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(fork_flipped_key) ? 1 : 0; }
TEST_NOINLINE int flipped_likely() { return TRAMWAY_STATIC_BRANCH_LIKELY(fork_flipped_key) ? 1 : 0; }
static inline __attribute__((always_inline)) bool flipped_inline() {
  return TRAMWAY_STATIC_BRANCH_UNLIKELY(fork_flipped_key);
}
TEST_NOINLINE int flipped_inline_1() { return flipped_inline() ? 1 : 0; }
TEST_NOINLINE int flipped_inline_2() { return flipped_inline() ? 1 : 0; }
TEST_NOINLINE int quiet_branch() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(fork_quiet_key) ? 1 : 0; }

#define PATCHABLE __attribute__((noinline, patchable_function_entry(13, 8)))
extern "C" {
PATCHABLE int fork_fx_work(int x) {
  asm volatile("");
  return x + 1;
}
PATCHABLE int fork_fx_other(int x) {
  asm volatile("");
  return x * 2;
}
}

namespace {

using tramway::detail::JumpEntry;

// Child exit codes, so the parent can say what went wrong.
enum ChildFailure {
  kOk = 0,
  kSiteHalfPatched = 10,  // a site holds neither the nop nor the jmp its key calls for
  kBranchDisagrees = 11,  // a branch's value differs from key.enabled()
  kEnableFailed = 12,
  kEnableIneffective = 13,
  kDisableFailed = 14,
  kDisableIneffective = 15,
  kWrongCost = 16,
};

// Every site of `key` in this executable holds exactly what `key.enabled()` calls for.
bool sites_consistent(const tramway::StaticKey& key) {
  for (const JumpEntry* e = __start___tramway_jump_table; e != __stop___tramway_jump_table; ++e) {
    if ((e->key & ~std::uintptr_t{1}) != reinterpret_cast<std::uintptr_t>(&key)) continue;
    const bool jump = key.enabled() != bool(e->key & 1);
    std::uint8_t want[5] = {0x0f, 0x1f, 0x44, 0x00, 0x00};
    if (jump) {
      const auto rel = static_cast<std::int32_t>(static_cast<std::intptr_t>(e->target - (e->code + 5)));
      want[0] = 0xe9;
      std::memcpy(&want[1], &rel, 4);
    }
    if (std::memcmp(reinterpret_cast<const void*>(e->code), want, 5) != 0) return false;
  }
  return true;
}

int flipped_branches_agree(bool value) {
  const int v = value ? 1 : 0;
  return flipped_unlikely() == v && flipped_likely() == v && flipped_inline_1() == v && flipped_inline_2() == v;
}

int child_checks() {
  if (!sites_consistent(fork_flipped_key)) return kSiteHalfPatched;
  if (!flipped_branches_agree(fork_flipped_key.enabled())) return kBranchDisagrees;
  // The child patches its own code: one batch, 3 serialisations (membarrier registered again
  // for the child's mm), written through a /proc/self/mem of its own.
  const bool was = fork_flipped_key.enabled();
  const auto before = tramway::text::stats();
  if (!tramway::set(fork_flipped_key, !was).ok()) return kEnableFailed;
  if (tramway::text::stats().serialisations - before.serialisations != 3) return kWrongCost;
  if (!flipped_branches_agree(!was) || !sites_consistent(fork_flipped_key)) return kEnableIneffective;
  if (!tramway::set(fork_flipped_key, was).ok()) return kDisableFailed;
  if (!flipped_branches_agree(was) || !sites_consistent(fork_flipped_key)) return kDisableIneffective;
  return kOk;
}

TEST(Fork, ChildrenNeverInheritAHalfPatchedSite) {
  std::atomic<bool> stop{false};
  std::atomic<long> flips{0};
  std::thread flipper([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      if (!tramway::toggle(fork_flipped_key).ok()) return;
      flips.fetch_add(1, std::memory_order_relaxed);
    }
  });
  while (flips.load() < 10) std::this_thread::yield();
  std::vector<int> codes;
  for (int i = 0; i < 50; ++i) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) _exit(child_checks());
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    codes.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : 1000 + WTERMSIG(status));
  }
  stop = true;
  flipper.join();
  for (std::size_t i = 0; i < codes.size(); ++i) EXPECT_EQ(codes[i], kOk) << "child " << i;
  EXPECT_GT(flips.load(), 10);
  std::printf("%ld flips during 50 forks\n", flips.load());
  // The parent's sites are consistent too once the flipper has stopped.
  EXPECT_TRUE(sites_consistent(fork_flipped_key));
  EXPECT_TRUE(flipped_branches_agree(fork_flipped_key.enabled()));
}

TEST(Fork, ChildPatchesOnlyItsOwnCode) {
  // Patch once in the parent first, so /proc/self/mem is open and membarrier registered
  // before the fork: the child must not reuse either.
  ASSERT_TRUE(tramway::enable(fork_quiet_key).ok());
  ASSERT_TRUE(tramway::disable(fork_quiet_key).ok());
  int to_parent[2], to_child[2];
  ASSERT_EQ(pipe(to_parent), 0);
  ASSERT_EQ(pipe(to_child), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int code = 0;
    if (!tramway::enable(fork_quiet_key).ok()) code = 2;
    else if (quiet_branch() != 1) code = 3;
    char c = 'e';
    if (write(to_parent[1], &c, 1) != 1) _exit(4);
    if (read(to_child[0], &c, 1) != 1) _exit(5);  // the parent has enabled and disabled meanwhile
    if (quiet_branch() != 1 || !fork_quiet_key.enabled()) code = 6;
    _exit(code);
  }
  char c;
  ASSERT_EQ(read(to_parent[0], &c, 1), 1);
  EXPECT_EQ(quiet_branch(), 0) << "the child's patch reached the parent's text";
  EXPECT_FALSE(fork_quiet_key.enabled());
  ASSERT_TRUE(tramway::enable(fork_quiet_key).ok());
  ASSERT_TRUE(tramway::disable(fork_quiet_key).ok());
  EXPECT_EQ(quiet_branch(), 0);
  ASSERT_EQ(write(to_child[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  for (int fd : {to_parent[0], to_parent[1], to_child[0], to_child[1]}) close(fd);
}

// ---- every API in the child, whatever the parent's threads were doing -----------------------

namespace hooks = tramway::hooks;
namespace grace = tramway::grace;

void count_hit(const hooks::Ops& o, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  static_cast<std::atomic<long>*>(o.data)->fetch_add(1, std::memory_order_relaxed);
}

enum ChildApiFailure {
  kAttachFailed = 20,
  kCallbackMissing = 21,
  kDetachFailed = 22,
  kCallbackAfterDetach = 23,
  kKeyFlipFailed = 24,
  kSynchronizeFailed = 25,
  kDetachAsyncFailed = 26,
  kDoneNeverRan = 27,
};

// What a child of a busy parent must be able to do: attach, detach (both ways), flip a key,
// wait for a grace period.
int child_uses_every_api() {
  std::atomic<long> hits{0};
  hooks::Ops ops;
  ops.entry = count_hit;
  ops.data = &hits;
  if (!hooks::attach(ops, hooks::Filter::names({"fork_fx_work"})).ok()) return kAttachFailed;
  if (fork_fx_work(1) != 2 || hits.load() != 1) return kCallbackMissing;
  if (!hooks::detach(ops).ok()) return kDetachFailed;
  if (fork_fx_work(1) != 2 || hits.load() != 1) return kCallbackAfterDetach;
  if (!tramway::toggle(fork_quiet_key).ok() || !tramway::toggle(fork_quiet_key).ok()) return kKeyFlipFailed;
  if (!grace::synchronize().ok()) return kSynchronizeFailed;
  std::atomic<bool> done{false};
  if (!hooks::attach(ops, hooks::Filter::names({"fork_fx_other"})).ok()) return kAttachFailed;
  if (!hooks::detach_async(ops, [&] { done = true; }).ok()) return kDetachAsyncFailed;
  if (!grace::barrier().ok() || !done.load()) return kDoneNeverRan;
  return kOk;
}

// Defect 2 of issue 11, placed: a thread holds the hook tables' lock, inside attach, when the
// fork happens. The patch lock is held first, so that the forking thread queues on it before
// the attaching thread does: without a fork hook for the hook tables, the child inherits their
// lock held by a thread it does not have, and its first attach hangs.
int fork_while_an_attach_holds_the_hook_tables() {
  std::atomic<long> hits{0};
  hooks::Ops ops;
  ops.entry = count_hit;
  ops.data = &hits;
  std::atomic<pid_t> forker_tid{0}, attacher_tid{0};
  std::atomic<int> child_code{-100};
  auto patch_lock = std::make_unique<tramway::text::PatchLock>();
  std::thread forker([&] {
    forker_tid = bounded::gettid_();
    const pid_t pid = fork();
    if (pid == 0) _exit(child_uses_every_api());
    child_code = bounded::wait_bounded(pid, 3000);
  });
  while (!forker_tid.load()) bounded::nap();
  if (!bounded::wait_blocked_in_futex(forker_tid)) return 30;  // fork's prepare waits for the patch lock
  std::thread attacher([&] {
    attacher_tid = bounded::gettid_();
    (void)hooks::attach(ops, hooks::Filter::names({"fork_fx_work"}));
  });
  while (!attacher_tid.load()) bounded::nap();
  if (!bounded::wait_blocked_in_futex(attacher_tid)) return 31;
  patch_lock.reset();
  forker.join();
  attacher.join();
  (void)hooks::detach(ops);
  return child_code.load();
}

TEST(Fork, AChildOfAForkThatRacedAnAttachCanAttach) {
  const int code = bounded::run_in_child(fork_while_an_attach_holds_the_hook_tables, 8000);
  EXPECT_EQ(code, kOk) << bounded::describe(code)
                       << " (30/31: a thread was not where the test puts it)";
}

// The grace-period lock comes before the hook tables' (common/lock_order.h): a fork that waits
// for a grace period holds no lock that the callback that grace period waits for may take.
// Placed: a callback is inside its region, a grace period waits for it, fork() waits for the
// grace period; then the callback calls hooks::disable (the hook tables' lock).
struct BlockingCallback {
  std::atomic<bool> inside{false}, go{false}, disabled{false};
  hooks::Ops ops;
};
void block_then_disable(const hooks::Ops& o, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  auto* b = static_cast<BlockingCallback*>(o.data);
  if (b->inside.exchange(true)) return;  // only the first call blocks
  while (!b->go.load()) bounded::nap();
  b->disabled = hooks::disable(b->ops).ok();
}

int callback_takes_the_hook_tables_lock_while_a_fork_waits() {
  static BlockingCallback b;
  b.ops.entry = block_then_disable;
  b.ops.data = &b;
  if (!hooks::attach(b.ops, hooks::Filter::names({"fork_fx_other"})).ok()) return 40;
  std::thread caller([] { fork_fx_other(1); });
  while (!b.inside.load()) bounded::nap();
  std::thread synchronizer([] { (void)grace::synchronize(); });
  const std::int64_t deadline = bounded::now_ms() + 3000;
  while (grace::holdouts().empty()) {
    if (bounded::now_ms() > deadline) return 41;
    bounded::nap();
  }
  std::atomic<pid_t> forker_tid{0};
  std::atomic<int> child_code{-100};
  std::thread forker([&] {
    forker_tid = bounded::gettid_();
    const pid_t pid = fork();
    if (pid == 0) _exit(child_uses_every_api());
    child_code = bounded::wait_bounded(pid, 3000);
  });
  while (!forker_tid.load()) bounded::nap();
  if (!bounded::wait_blocked_in_futex(forker_tid)) return 42;  // waiting for the grace period
  b.go = true;
  caller.join();
  synchronizer.join();
  forker.join();
  if (!b.disabled.load()) return 43;
  (void)hooks::detach(b.ops);
  return child_code.load();
}

TEST(Fork, ACallbackMayTakeTheHookTablesLockWhileAForkWaitsForAGracePeriod) {
  const int code = bounded::run_in_child(callback_takes_the_hook_tables_lock_while_a_fork_waits, 8000);
  EXPECT_EQ(code, kOk) << bounded::describe(code) << " (4x: a step failed or a thread was not where the test puts it)";
}

// Threads of the parent attach, detach (both ways), flip a key, call hooked functions and wait
// for grace periods of both flavors, without pause, while the main thread forks; every child
// uses every API and exits. Returns the first failure, or 0.
int fork_storm() {
  // The grace-period callback thread starts on first use: start it now, not during a fork.
  if (!grace::call([] {}).ok() || !grace::barrier().ok()) return 203;
  std::atomic<bool> stop{false};
  std::atomic<long> rounds{0};
  std::atomic<int> started{0};  // fork only once every thread runs: a thread starting up may hold
                                // allocator locks that fork() does not take (ASan's)
  std::vector<std::thread> threads;
  threads.emplace_back([&] {  // attach and detach
    started.fetch_add(1);
    std::atomic<long> hits{0};
    hooks::Ops ops;
    ops.entry = count_hit;
    ops.data = &hits;
    while (!stop.load()) {
      if (hooks::attach(ops, hooks::Filter::names({"fork_fx_work"})).ok()) (void)hooks::detach(ops);
      rounds.fetch_add(1);
    }
  });
  threads.emplace_back([&] {  // detach_async
    started.fetch_add(1);
    std::atomic<long> hits{0};
    hooks::Ops ops;
    ops.entry = count_hit;
    ops.data = &hits;
    while (!stop.load()) {
      std::atomic<bool> done{false};
      if (!hooks::attach(ops, hooks::Filter::names({"fork_fx_other"})).ok()) continue;
      if (!hooks::detach_async(ops, [&] { done = true; }).ok()) continue;
      while (!done.load()) bounded::nap();
    }
  });
  threads.emplace_back([&] {
    started.fetch_add(1);
    while (!stop.load()) (void)tramway::toggle(fork_flipped_key);
  });
  threads.emplace_back([&] {
    started.fetch_add(1);
    while (!stop.load()) {
      (void)grace::synchronize();
      (void)grace::synchronize(grace::Flavor::tasks);
    }
  });
  threads.emplace_back([&] {
    started.fetch_add(1);
    while (!stop.load()) {
      fork_fx_work(1);
      fork_fx_other(2);
      grace::ReadGuard g;
    }
  });
  while (rounds.load() < 3 || started.load() < static_cast<int>(threads.size())) bounded::nap();
  int failure = 0;
  const std::int64_t end = bounded::now_ms() + 2500;
  for (int i = 0; i < 60 && bounded::now_ms() < end && failure == 0; ++i) {
    const pid_t pid = fork();
    if (pid == 0) _exit(child_uses_every_api());
    if (pid < 0) return 202;
    failure = bounded::wait_bounded(pid, 3000);
  }
  stop = true;
  for (std::thread& t : threads) t.join();
  return failure;
}

TEST(Fork, ChildrenOfABusyParentUseEveryApi) {
  const int code = bounded::run_in_child(fork_storm, 10000);
  EXPECT_EQ(code, kOk) << bounded::describe(code);
}

}  // namespace
