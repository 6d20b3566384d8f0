// tramway/static_call.h: trampolines retargeted by patching their first instruction.
#include "tramway/static_call.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "arch/x86_64/insn.h"
#include "tramway/text/patch.h"

int add_one(int x) { return x + 1; }
int add_two(int x) { return x + 2; }
int negate(int x) { return -x; }
void store_one(int* p) { *p = 1; }
void store_two(int* p) { *p = 2; }
long long_plus_100(long x) { return x + 100; }

TRAMWAY_DEFINE_STATIC_CALL(sc_add, add_one);  // also used by static_call_other_tu.cc
TRAMWAY_DEFINE_STATIC_CALL(sc_store, store_one);
TRAMWAY_DEFINE_STATIC_CALL_NULL(sc_null, void(int*));
TRAMWAY_DEFINE_STATIC_CALL_RET0(sc_ret0, long(long));
TRAMWAY_DEFINE_STATIC_CALL(sc_libc, labs);  // the target is in libc, beyond rel32 reach
TRAMWAY_DEFINE_STATIC_CALL(sc_race, add_one);

int other_tu_call_sc_add(int x);
void* other_tu_sc_add_trampoline();
void* other_tu_sc_add_object_trampoline();
bool other_tu_update_sc_add_to_times_ten();

namespace {

using Bytes = std::vector<std::uint8_t>;

template <class F>
std::uintptr_t addr(F* f) {
  return reinterpret_cast<std::uintptr_t>(f);
}
Bytes head(std::uintptr_t t, std::size_t n = 5) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(t);
  return Bytes(p, p + n);
}
Bytes jmp_bytes(std::uintptr_t from, std::uintptr_t to) {
  const auto j = tramway::arch::encode_jmp(from, to);
  EXPECT_TRUE(j.has_value());
  return j ? Bytes(j->begin(), j->end()) : Bytes{};
}

// The trampoline's fixed layout: fallback `jmp *literal(%rip)` at +8, `xor eax,eax; ret` at
// +16.
void expect_layout(std::uintptr_t t) {
  EXPECT_EQ(t % 16, 0u) << "trampoline not 16-byte aligned";
  EXPECT_EQ(head(t + 8, 2), (Bytes{0xff, 0x25}));
  EXPECT_EQ(head(t + 16, 3), (Bytes{0x31, 0xc0, 0xc3}));
}

TEST(StaticCall, CallsTheInitialTargetAndUpdates) {
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(1), 2);
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_two).ok());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(1), 3);
  ASSERT_TRUE(sc_add.update(&negate).ok());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(7), -7);
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_one).ok());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(1), 2);
}

TEST(StaticCall, TrampolineIsAlignedAndItsSymbol) {
  EXPECT_EQ(addr(sc_add.trampoline()), addr(&tramway_sc_call_sc_add));
  for (std::uintptr_t t : {addr(sc_add.trampoline()), addr(sc_store.trampoline()), addr(sc_null.trampoline()),
                           addr(sc_ret0.trampoline()), addr(sc_libc.trampoline())}) {
    expect_layout(t);
  }
}

TEST(StaticCall, UpdateWritesADirectJmpWhenInReach) {
  const auto t = addr(sc_add.trampoline());
  ASSERT_TRUE(tramway::arch::rel32_reaches(t, addr(&add_two)));
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_two).ok());
  const Bytes h = head(t);
  EXPECT_EQ(h[0], 0xe9);
  std::int32_t rel;
  std::memcpy(&rel, &h[1], 4);
  EXPECT_EQ(t + 5 + static_cast<std::uintptr_t>(static_cast<std::intptr_t>(rel)), addr(&add_two));
  EXPECT_EQ(head(t + 5, 3), (Bytes{0xcc, 0xcc, 0xcc}));  // padding untouched
  expect_layout(t);
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_one).ok());
  EXPECT_EQ(head(t), jmp_bytes(t, addr(&add_one)));
}

TEST(StaticCall, OneUpdateIsOneBatch) {
  const auto before = tramway::text::stats();
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_two).ok());
  const auto after = tramway::text::stats();
  EXPECT_EQ(after.batches - before.batches, 1u);
  EXPECT_EQ(after.serialisations - before.serialisations, 3u);
  // The same target again: bytes already in place.
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_two).ok());
  EXPECT_EQ(tramway::text::stats().serialisations, after.serialisations);
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_one).ok());
}

TEST(StaticCall, VoidCallUpdatedToNullDoesNothing) {
  int v = 0;
  TRAMWAY_STATIC_CALL(sc_store)(&v);
  EXPECT_EQ(v, 1);
  ASSERT_TRUE(tramway::static_call_update(sc_store, nullptr).ok());
  EXPECT_EQ(head(addr(sc_store.trampoline())), Bytes(tramway::arch::kRetPadded.begin(), tramway::arch::kRetPadded.end()));
  v = 0;
  TRAMWAY_STATIC_CALL(sc_store)(&v);
  EXPECT_EQ(v, 0);
  ASSERT_TRUE(tramway::static_call_update(sc_store, &store_two).ok());
  TRAMWAY_STATIC_CALL(sc_store)(&v);
  EXPECT_EQ(v, 2);
}

TEST(StaticCall, IntCallUpdatedToNullReturnsZero) {
  ASSERT_TRUE(tramway::static_call_update(sc_add, nullptr).ok());
  const auto t = addr(sc_add.trampoline());
  EXPECT_EQ(head(t), jmp_bytes(t, t + 16));  // to the permanent `xor eax,eax; ret`
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(41), 0);
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_one).ok());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(41), 42);
}

TEST(StaticCall, NullVariant) {
  int v = 0;
  EXPECT_EQ(head(addr(sc_null.trampoline()), 1), Bytes{0xc3});
  TRAMWAY_STATIC_CALL(sc_null)(&v);
  EXPECT_EQ(v, 0);
  ASSERT_TRUE(tramway::static_call_update(sc_null, &store_two).ok());
  TRAMWAY_STATIC_CALL(sc_null)(&v);
  EXPECT_EQ(v, 2);
  ASSERT_TRUE(tramway::static_call_update(sc_null, nullptr).ok());
  v = 0;
  TRAMWAY_STATIC_CALL(sc_null)(&v);
  EXPECT_EQ(v, 0);
}

TEST(StaticCall, Ret0Variant) {
  // A full 64-bit zero: `xor eax,eax` zero-extends into rax.
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_ret0)(5), 0);
  ASSERT_TRUE(tramway::static_call_update(sc_ret0, &long_plus_100).ok());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_ret0)(5), 105);
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_ret0)(-(1L << 40)), -(1L << 40) + 100);
  ASSERT_TRUE(tramway::static_call_update(sc_ret0, nullptr).ok());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_ret0)(5), 0);
}

TEST(StaticCall, FarTargetInLibcGoesThroughTheFallback) {
  const auto t = addr(sc_libc.trampoline());
  const auto libc_labs = addr(&::labs);
  // Before any update the trampoline goes through the fallback to the initial target.
  EXPECT_EQ(head(t), jmp_bytes(t, t + 8));
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_libc)(-5), 5);

  ASSERT_TRUE(tramway::static_call_update(sc_libc, &long_plus_100).ok());  // near: direct
  EXPECT_EQ(head(t), jmp_bytes(t, addr(&long_plus_100)));
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_libc)(-5), 95);

  ASSERT_TRUE(tramway::static_call_update(sc_libc, &::labs).ok());
  if (tramway::arch::rel32_reaches(t, libc_labs)) {
    EXPECT_EQ(head(t), jmp_bytes(t, libc_labs));
  } else {
    EXPECT_EQ(head(t), jmp_bytes(t, t + 8));  // the fallback, whose literal holds labs
  }
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_libc)(-5), 5);
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_libc)(5), 5);

  // sc_add, defined with a near target, moved to a far one and back.
  ASSERT_TRUE(tramway::static_call_update(sc_add, &::abs).ok());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(-9), 9);
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_one).ok());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(-9), -8);
}

TEST(StaticCall, DeclaredInAnotherTranslationUnit) {
  EXPECT_EQ(other_tu_sc_add_trampoline(), reinterpret_cast<void*>(sc_add.trampoline()));
  EXPECT_EQ(other_tu_sc_add_object_trampoline(), reinterpret_cast<void*>(sc_add.trampoline()));
  EXPECT_EQ(other_tu_call_sc_add(4), 5);
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_two).ok());
  EXPECT_EQ(other_tu_call_sc_add(4), 6);
  ASSERT_TRUE(other_tu_update_sc_add_to_times_ten());
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_add)(4), 40);
  EXPECT_EQ(other_tu_call_sc_add(4), 40);
  ASSERT_TRUE(tramway::static_call_update(sc_add, &add_one).ok());
}

// Threads call through the trampoline while it is retargeted among a near function, a far
// one (fallback), and nullptr (return zero): every call returns one of the three answers.
TEST(StaticCall, RetargetedWhileTwoThreadsCallIt) {
  std::atomic<bool> stop{false};
  std::atomic<long> calls{0}, bad{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&] {
      long n = 0, b = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        const int v = TRAMWAY_STATIC_CALL(sc_race)(-10);  // add_one: -9, abs: 10, nullptr: 0
        b += v != -9 && v != 10 && v != 0;
        ++n;
      }
      calls += n;
      bad += b;
    });
  }
  const auto before = tramway::text::stats();
  for (int i = 0; i < 3000; ++i) {
    tramway::Status s = i % 3 == 0   ? tramway::static_call_update(sc_race, &::abs)
                        : i % 3 == 1 ? tramway::static_call_update(sc_race, nullptr)
                                     : tramway::static_call_update(sc_race, &add_one);
    if (!s.ok()) {
      ADD_FAILURE() << s.message();
      break;
    }
  }
  stop = true;
  for (auto& t : threads) t.join();
  const auto after = tramway::text::stats();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(calls.load(), 0);
  std::printf("static call race: %ld calls, %llu traps emulated, %llu restarted\n", calls.load(),
              static_cast<unsigned long long>(after.traps_emulated - before.traps_emulated),
              static_cast<unsigned long long>(after.traps_restarted - before.traps_restarted));
  EXPECT_EQ(TRAMWAY_STATIC_CALL(sc_race)(-10), -9);
}

}  // namespace
