// tramway/static_key.h: branches follow their keys; changes are batched; branches of
// objects loaded and unloaded with dlopen/dlclose join and leave.
#include "tramway/static_key.h"

#include <dlfcn.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "tramway/text/patch.h"

#if defined(__clang__)
#define TEST_NOINLINE __attribute__((noinline))
#else
#define TEST_NOINLINE __attribute__((noinline, noclone))  // a clone would duplicate the site
#endif

TRAMWAY_STATIC_KEY_FALSE(key_false);
TRAMWAY_STATIC_KEY_TRUE(key_true);
TRAMWAY_STATIC_KEY_FALSE(key_batch_a);
TRAMWAY_STATIC_KEY_TRUE(key_batch_b);
TRAMWAY_STATIC_KEY_FALSE(key_batch_c);
TRAMWAY_STATIC_KEY_FALSE(key_multi);
TRAMWAY_STATIC_KEY_FALSE(key_unused);  // no branch anywhere
TRAMWAY_STATIC_KEY_FALSE(key_race);
TRAMWAY_STATIC_KEY_FALSE(exe_key_for_plugin);  // exported (ENABLE_EXPORTS), used by the plugin

// One function per branch form; each returns 1 when the branch says "enabled".
TEST_NOINLINE int f_unlikely() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(key_false) ? 1 : 0; }
TEST_NOINLINE int f_likely() { return TRAMWAY_STATIC_BRANCH_LIKELY(key_false) ? 1 : 0; }
TEST_NOINLINE int t_unlikely() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(key_true) ? 1 : 0; }
TEST_NOINLINE int t_likely() { return TRAMWAY_STATIC_BRANCH_LIKELY(key_true) ? 1 : 0; }
TEST_NOINLINE int batch_a() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(key_batch_a) ? 1 : 0; }
TEST_NOINLINE int batch_b() { return TRAMWAY_STATIC_BRANCH_LIKELY(key_batch_b) ? 1 : 0; }
TEST_NOINLINE int batch_c() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(key_batch_c) ? 1 : 0; }
TEST_NOINLINE int race_branch() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(key_race) ? 1 : 0; }
TEST_NOINLINE int exe_reads_plugin_key() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(exe_key_for_plugin) ? 1 : 0; }

// One branch in a helper inlined into three functions: three sites.
static inline __attribute__((always_inline)) bool multi_on() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(key_multi); }
TEST_NOINLINE int multi_1() { return multi_on() ? 11 : 1; }
TEST_NOINLINE int multi_2() { return multi_on() ? 12 : 2; }
TEST_NOINLINE int multi_3() { return multi_on() ? 13 : 3; }
// The same through a macro: exactly three sites whatever the optimisation level (at -O0
// Clang also emits an out-of-line copy of multi_on, a fourth site of key_multi).
TRAMWAY_STATIC_KEY_FALSE(key_macro);
#define MACRO_ON() TRAMWAY_STATIC_BRANCH_UNLIKELY(key_macro)
TEST_NOINLINE int macro_1() { return MACRO_ON() ? 21 : 1; }
TEST_NOINLINE int macro_2() { return MACRO_ON() ? 22 : 2; }
TEST_NOINLINE int macro_3() { return MACRO_ON() ? 23 : 3; }

namespace {

using tramway::StaticKey;
using tramway::detail::JumpEntry;
using Bytes = std::vector<std::uint8_t>;

std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// This executable's jump-table entries of `key`.
std::vector<const JumpEntry*> entries_of(const StaticKey& key) {
  std::vector<const JumpEntry*> out;
  for (const JumpEntry* e = __start___tramway_jump_table; e != __stop___tramway_jump_table; ++e)
    if ((e->key & ~std::uintptr_t{1}) == addr(&key)) out.push_back(e);
  return out;
}

// Every site of `key` holds exactly the instruction its state calls for: a 5-byte nop, or a
// jmp rel32 to its label (jump = enabled XOR likely).
void expect_sites_follow(const StaticKey& key) {
  const auto entries = entries_of(key);
  EXPECT_FALSE(entries.empty());
  for (const JumpEntry* e : entries) {
    const bool jump = key.enabled() != bool(e->key & 1);
    Bytes want = {0x0f, 0x1f, 0x44, 0x00, 0x00};
    if (jump) {
      const auto rel = static_cast<std::int32_t>(static_cast<std::intptr_t>(e->target - (e->code + 5)));
      want = {0xe9, 0, 0, 0, 0};
      std::memcpy(&want[1], &rel, 4);
    }
    const auto* p = reinterpret_cast<const std::uint8_t*>(e->code);
    EXPECT_EQ(Bytes(p, p + 5), want) << "site at " << reinterpret_cast<const void*>(p);
  }
}

Bytes snapshot(const StaticKey& key) {
  Bytes out;
  for (const JumpEntry* e : entries_of(key)) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(e->code);
    out.insert(out.end(), p, p + 5);
  }
  return out;
}

struct Delta {
  tramway::text::PatchStats before = tramway::text::stats();
  std::uint64_t batches() const { return tramway::text::stats().batches - before.batches; }
  std::uint64_t serialisations() const { return tramway::text::stats().serialisations - before.serialisations; }
};

TEST(StaticKey, FalseKeyWithBothBranchForms) {
  EXPECT_FALSE(key_false.initial());
  EXPECT_FALSE(key_false.enabled());
  EXPECT_EQ(f_unlikely(), 0);
  EXPECT_EQ(f_likely(), 0);
  expect_sites_follow(key_false);

  ASSERT_TRUE(tramway::enable(key_false).ok());
  EXPECT_TRUE(key_false.enabled());
  EXPECT_FALSE(key_false.initial());
  EXPECT_EQ(f_unlikely(), 1);
  EXPECT_EQ(f_likely(), 1);
  expect_sites_follow(key_false);

  ASSERT_TRUE(tramway::disable(key_false).ok());
  EXPECT_EQ(f_unlikely(), 0);
  EXPECT_EQ(f_likely(), 0);
  expect_sites_follow(key_false);

  ASSERT_TRUE(tramway::set(key_false, true).ok());
  EXPECT_EQ(f_unlikely(), 1);
  ASSERT_TRUE(tramway::set(key_false, false).ok());
  EXPECT_EQ(f_unlikely(), 0);
  ASSERT_TRUE(tramway::toggle(key_false).ok());
  EXPECT_TRUE(key_false.enabled());
  EXPECT_EQ(f_unlikely(), 1);
  EXPECT_EQ(f_likely(), 1);
  ASSERT_TRUE(tramway::toggle(key_false).ok());
  EXPECT_FALSE(key_false.enabled());
  EXPECT_EQ(f_unlikely(), 0);
  EXPECT_EQ(f_likely(), 0);
}

TEST(StaticKey, TrueKeyWithBothBranchForms) {
  EXPECT_TRUE(key_true.initial());
  EXPECT_TRUE(key_true.enabled());
  EXPECT_EQ(t_unlikely(), 1);
  EXPECT_EQ(t_likely(), 1);
  expect_sites_follow(key_true);

  ASSERT_TRUE(tramway::disable(key_true).ok());
  EXPECT_FALSE(key_true.enabled());
  EXPECT_EQ(t_unlikely(), 0);
  EXPECT_EQ(t_likely(), 0);
  expect_sites_follow(key_true);

  ASSERT_TRUE(tramway::enable(key_true).ok());
  EXPECT_EQ(t_unlikely(), 1);
  EXPECT_EQ(t_likely(), 1);
  expect_sites_follow(key_true);
}

TEST(StaticKey, OneChangeIsOneBatchOfThreeSerialisations) {
  Delta d;
  ASSERT_TRUE(tramway::enable(key_false).ok());  // two sites
  EXPECT_EQ(d.batches(), 1u);
  EXPECT_EQ(d.serialisations(), 3u);
  Delta again;
  ASSERT_TRUE(tramway::enable(key_false).ok());  // already enabled: nothing to do
  EXPECT_EQ(again.batches(), 0u);
  EXPECT_EQ(again.serialisations(), 0u);
  ASSERT_TRUE(tramway::disable(key_false).ok());
}

TEST(StaticKey, ToggleTwiceRestoresTheBytes) {
  const Bytes f0 = snapshot(key_false), t0 = snapshot(key_true);
  ASSERT_EQ(f0.size(), 10u);
  ASSERT_TRUE(tramway::toggle(key_false).ok());
  ASSERT_TRUE(tramway::toggle(key_true).ok());
  EXPECT_NE(snapshot(key_false), f0);
  EXPECT_NE(snapshot(key_true), t0);
  ASSERT_TRUE(tramway::toggle(key_false).ok());
  ASSERT_TRUE(tramway::toggle(key_true).ok());
  EXPECT_EQ(snapshot(key_false), f0);
  EXPECT_EQ(snapshot(key_true), t0);
  EXPECT_FALSE(key_false.enabled());
  EXPECT_TRUE(key_true.enabled());
}

TEST(KeyBatch, SeveralKeysAreOneBatch) {
  Delta d;
  ASSERT_TRUE(tramway::KeyBatch().set(key_batch_a, true).set(key_batch_b, false).toggle(key_batch_c).commit().ok());
  EXPECT_EQ(d.batches(), 1u);
  EXPECT_EQ(d.serialisations(), 3u);
  EXPECT_TRUE(key_batch_a.enabled());
  EXPECT_FALSE(key_batch_b.enabled());
  EXPECT_TRUE(key_batch_c.enabled());
  EXPECT_EQ(batch_a(), 1);
  EXPECT_EQ(batch_b(), 0);
  EXPECT_EQ(batch_c(), 1);
  expect_sites_follow(key_batch_a);
  expect_sites_follow(key_batch_b);
  expect_sites_follow(key_batch_c);

  Delta back;
  tramway::KeyBatch restore;
  restore.toggle(key_batch_a).toggle(key_batch_b).set(key_batch_c, false);
  ASSERT_TRUE(restore.commit().ok());
  EXPECT_EQ(back.batches(), 1u);
  EXPECT_EQ(back.serialisations(), 3u);
  EXPECT_EQ(batch_a(), 0);
  EXPECT_EQ(batch_b(), 1);
  EXPECT_EQ(batch_c(), 0);
  // A committed batch is emptied: committing it again changes nothing.
  Delta none;
  ASSERT_TRUE(restore.commit().ok());
  EXPECT_EQ(none.batches(), 0u);
  EXPECT_EQ(batch_a(), 0);
}

TEST(KeyBatch, LastChangeWins) {
  Delta d;
  ASSERT_TRUE(tramway::KeyBatch().set(key_batch_a, true).set(key_batch_a, false).commit().ok());
  EXPECT_FALSE(key_batch_a.enabled());
  EXPECT_EQ(batch_a(), 0);
  EXPECT_EQ(d.batches(), 0u);  // net change: none
  EXPECT_EQ(d.serialisations(), 0u);

  // A toggle flips the value the key has at that point of the batch.
  ASSERT_TRUE(tramway::KeyBatch().set(key_batch_a, false).toggle(key_batch_a).toggle(key_batch_a)
                  .toggle(key_batch_a).commit().ok());
  EXPECT_TRUE(key_batch_a.enabled());
  EXPECT_EQ(batch_a(), 1);
  ASSERT_TRUE(tramway::KeyBatch().toggle(key_batch_a).set(key_batch_a, true).toggle(key_batch_a).commit().ok());
  EXPECT_FALSE(key_batch_a.enabled());
  EXPECT_EQ(batch_a(), 0);
  expect_sites_follow(key_batch_a);
}

TEST(StaticKey, BranchCountCountsSites) {
  EXPECT_EQ(tramway::branch_count(key_false), 2u);
  EXPECT_EQ(tramway::branch_count(key_true), 2u);
  EXPECT_EQ(tramway::branch_count(key_macro), 3u);
  // One branch inlined into three functions: at least three sites, and every one counted.
  EXPECT_GE(tramway::branch_count(key_multi), 3u);
  EXPECT_EQ(tramway::branch_count(key_multi), entries_of(key_multi).size());
  EXPECT_EQ(tramway::branch_count(key_unused), 0u);
  EXPECT_EQ(tramway::branch_count(key_race), 1u);
}

TEST(StaticKey, BranchInlinedInSeveralFunctions) {
  EXPECT_EQ(multi_1() + multi_2() + multi_3(), 1 + 2 + 3);
  ASSERT_TRUE(tramway::enable(key_multi).ok());
  EXPECT_EQ(multi_1(), 11);
  EXPECT_EQ(multi_2(), 12);
  EXPECT_EQ(multi_3(), 13);
  expect_sites_follow(key_multi);
  ASSERT_TRUE(tramway::disable(key_multi).ok());
  EXPECT_EQ(multi_1() + multi_2() + multi_3(), 1 + 2 + 3);

  Delta d;
  ASSERT_TRUE(tramway::enable(key_macro).ok());
  EXPECT_EQ(d.serialisations(), 3u);
  EXPECT_EQ(macro_1() + macro_2() + macro_3(), 21 + 22 + 23);
  expect_sites_follow(key_macro);
  ASSERT_TRUE(tramway::disable(key_macro).ok());
  EXPECT_EQ(macro_1() + macro_2() + macro_3(), 1 + 2 + 3);
}

TEST(StaticKey, KeyWithoutBranchesStillChangesValue) {
  Delta d;
  ASSERT_TRUE(tramway::enable(key_unused).ok());
  EXPECT_TRUE(key_unused.enabled());
  EXPECT_EQ(d.serialisations(), 0u);  // nothing to patch
  ASSERT_TRUE(tramway::disable(key_unused).ok());
  EXPECT_FALSE(key_unused.enabled());
}

// "When enable() returns, every thread that reaches a branch afterwards takes the new path."
// The main thread publishes an even epoch after each change returned; a reader that saw the
// same even epoch before and after evaluating the branch must have seen that epoch's value.
TEST(StaticKey, AfterAChangeReturnsEveryThreadTakesTheNewPath) {
  constexpr long kChanges = 2000;
  std::atomic<long> epoch{0};  // odd: changing; 2k: key == (k is odd)
  std::atomic<bool> stop{false};
  std::atomic<long> checked{0}, wrong{0}, odd_values{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < 2; ++i) {
    readers.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        const long e1 = epoch.load(std::memory_order_seq_cst);
        const int v = race_branch();
        std::atomic_thread_fence(std::memory_order_seq_cst);
        const long e2 = epoch.load(std::memory_order_seq_cst);
        if (v != 0 && v != 1) odd_values.fetch_add(1);
        if (e1 != e2 || e1 % 2) continue;
        checked.fetch_add(1, std::memory_order_relaxed);
        if (v != (e1 / 2) % 2) wrong.fetch_add(1);
      }
    });
  }
  for (long k = 1; k <= kChanges; ++k) {
    epoch.store(2 * k - 1, std::memory_order_seq_cst);
    ASSERT_TRUE(tramway::set(key_race, k % 2 == 1).ok());
    epoch.store(2 * k, std::memory_order_seq_cst);
    if (k % 64 == 0) std::this_thread::yield();  // let readers sample stable epochs too
  }
  stop = true;
  for (auto& t : readers) t.join();
  EXPECT_EQ(wrong.load(), 0) << "a thread took the old path after the change had returned";
  EXPECT_EQ(odd_values.load(), 0);
  EXPECT_GT(checked.load(), 0);
  EXPECT_FALSE(key_race.enabled());
  EXPECT_EQ(race_branch(), 0);
}

// ---- dlopen / dlclose --------------------------------------------------------------------------

struct Plugin {
  void* handle = nullptr;
  int (*reads_exe_key)() = nullptr;
  int (*reads_exe_key_likely)() = nullptr;
  int (*reads_own_key)() = nullptr;
  StaticKey* (*own_key)() = nullptr;

  bool open() {
    handle = dlopen(TRAMWAY_TEST_PLUGIN_PATH, RTLD_NOW | RTLD_LOCAL);
    if (!handle) return false;
    reads_exe_key = reinterpret_cast<int (*)()>(dlsym(handle, "plugin_reads_exe_key"));
    reads_exe_key_likely = reinterpret_cast<int (*)()>(dlsym(handle, "plugin_reads_exe_key_likely"));
    reads_own_key = reinterpret_cast<int (*)()>(dlsym(handle, "plugin_reads_own_key"));
    own_key = reinterpret_cast<StaticKey* (*)()>(dlsym(handle, "plugin_own_key_address"));
    return reads_exe_key && reads_exe_key_likely && reads_own_key && own_key;
  }
  void close() {
    dlclose(handle);
    handle = nullptr;
  }
};

TEST(StaticKeyDlopen, BranchesJoinOnLoadAndLeaveOnUnload) {
  ASSERT_FALSE(exe_key_for_plugin.enabled());
  const std::size_t exe_branches = tramway::branch_count(exe_key_for_plugin);
  ASSERT_EQ(exe_branches, entries_of(exe_key_for_plugin).size());
  ASSERT_EQ(exe_branches, 1u);

  // Enabled before the plugin exists: its branches must be brought in line as it loads.
  ASSERT_TRUE(tramway::enable(exe_key_for_plugin).ok());
  Plugin p;
  ASSERT_TRUE(p.open()) << dlerror();
  EXPECT_EQ(p.reads_exe_key(), 1);
  EXPECT_EQ(p.reads_exe_key_likely(), 1);
  EXPECT_EQ(tramway::branch_count(exe_key_for_plugin), exe_branches + 2);

  StaticKey& own = *p.own_key();
  EXPECT_FALSE(own.enabled());
  EXPECT_EQ(tramway::branch_count(own), 1u);
  EXPECT_EQ(p.reads_own_key(), 0);
  ASSERT_TRUE(tramway::enable(own).ok());
  EXPECT_EQ(p.reads_own_key(), 1);

  // The executable's key switches the plugin's branches and its own together.
  ASSERT_TRUE(tramway::disable(exe_key_for_plugin).ok());
  EXPECT_EQ(p.reads_exe_key(), 0);
  EXPECT_EQ(p.reads_exe_key_likely(), 0);
  EXPECT_EQ(exe_reads_plugin_key(), 0);
  Delta d;
  ASSERT_TRUE(tramway::KeyBatch().set(exe_key_for_plugin, true).set(own, false).commit().ok());
  EXPECT_EQ(d.batches(), 1u);
  EXPECT_EQ(d.serialisations(), 3u);
  EXPECT_EQ(p.reads_exe_key(), 1);
  EXPECT_EQ(p.reads_own_key(), 0);
  EXPECT_EQ(exe_reads_plugin_key(), 1);

  p.close();
  ASSERT_EQ(dlopen(TRAMWAY_TEST_PLUGIN_PATH, RTLD_NOW | RTLD_NOLOAD), nullptr) << "plugin was not unloaded";
  EXPECT_EQ(tramway::branch_count(exe_key_for_plugin), exe_branches);

  // The unloaded branches are gone from the registry: patching them would write unmapped
  // memory (an error) or someone else's code.
  ASSERT_TRUE(tramway::toggle(exe_key_for_plugin).ok());
  EXPECT_EQ(exe_reads_plugin_key(), 0);
  ASSERT_TRUE(tramway::toggle(exe_key_for_plugin).ok());
  EXPECT_EQ(exe_reads_plugin_key(), 1);
  expect_sites_follow(exe_key_for_plugin);

  // Loaded again while the key is on: in line again; the plugin's own key starts afresh.
  ASSERT_TRUE(p.open()) << dlerror();
  EXPECT_EQ(p.reads_exe_key(), 1);
  EXPECT_EQ(p.reads_exe_key_likely(), 1);
  EXPECT_FALSE(p.own_key()->enabled());
  EXPECT_EQ(p.reads_own_key(), 0);
  EXPECT_EQ(tramway::branch_count(exe_key_for_plugin), exe_branches + 2);
  ASSERT_TRUE(tramway::disable(exe_key_for_plugin).ok());
  EXPECT_EQ(p.reads_exe_key(), 0);
  p.close();
  EXPECT_EQ(tramway::branch_count(exe_key_for_plugin), exe_branches);
  ASSERT_TRUE(tramway::enable(exe_key_for_plugin).ok());
  ASSERT_TRUE(tramway::disable(exe_key_for_plugin).ok());
}

}  // namespace
