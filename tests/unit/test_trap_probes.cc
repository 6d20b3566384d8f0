// Trap probes (sites/hooks/trap_probes.h): a function whose prologue cannot be relocated — the
// fixture's 4-byte `f` (lea eax,[rdi-1]; ret) — is hooked by an int3 only for ops that accept a
// signal a call (Ops::allow_trap). Its callbacks see the function, its arguments and the slot of
// its return address, as a hook through the stub would; detach puts the byte back; threads
// calling it throughout compute what it computes.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "arch/x86_64/insn.h"
#include "tramway/hooks.h"
#include "tramway/text/patch.h"

namespace {

namespace hooks = tramway::hooks;

using Fn = int (*)(int);

struct Seen {
  std::atomic<int> calls{0};
  std::atomic<std::uintptr_t> entry{0}, caller{0}, slot_value{0};
  std::atomic<std::uint64_t> rdi{0};
};
Seen g_seen;

void on_entry(const hooks::Ops&, std::uintptr_t entry, std::uintptr_t caller, hooks::EntryRegs& regs) {
  g_seen.entry.store(entry);
  g_seen.caller.store(caller);
  g_seen.rdi.store(regs.rdi);
  g_seen.slot_value.store(*hooks::caller_return_slot(regs));
  g_seen.calls.fetch_add(1);
}

Fn open_f() {
  void* h = dlopen(HOOK_FX_NOFLAG, RTLD_NOW | RTLD_LOCAL);
  EXPECT_NE(h, nullptr) << dlerror();
  return h ? reinterpret_cast<Fn>(dlsym(h, "f")) : nullptr;
}

std::uint8_t first_byte(Fn f) { return *reinterpret_cast<const volatile std::uint8_t*>(f); }

TEST(TrapProbes, OnlyOpsThatAllowTrapsSelectAFunctionOnlyAProbeCanHook) {
  const Fn f = open_f();
  ASSERT_NE(f, nullptr);
  const auto it = [&] {
    auto all = hooks::functions("f");
    EXPECT_TRUE(all.ok());
    for (const hooks::Function& fn : *all)
      if (fn.entry == reinterpret_cast<std::uintptr_t>(f)) return fn.kind;
    return hooks::HookKind::refused;
  }();
  ASSERT_EQ(it, hooks::HookKind::trap) << "the fixture's f is too short to relocate";
  hooks::Ops ops;
  ops.entry = on_entry;
  tramway::Status st = hooks::attach(ops, hooks::Filter::addresses({reinterpret_cast<std::uintptr_t>(f)}));
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("set Ops::allow_trap"), std::string::npos) << st.message();
  EXPECT_EQ(first_byte(f), 0x8du) << "lea: nothing was written";
}

TEST(TrapProbes, ACallbackSeesTheFunctionItsArgumentsAndItsReturnSlotThenDetachPutsTheByteBack) {
  const Fn f = open_f();
  ASSERT_NE(f, nullptr);
  const std::uint8_t original = first_byte(f);
  hooks::Ops ops;
  ops.entry = on_entry;
  ops.allow_trap = true;
  const auto before = tramway::text::stats();
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::addresses({reinterpret_cast<std::uintptr_t>(f)})).ok());
  EXPECT_EQ(first_byte(f), tramway::arch::kInt3);
  g_seen.calls = 0;
  EXPECT_EQ(f(42), 41);
  EXPECT_EQ(g_seen.calls.load(), 1);
  EXPECT_EQ(g_seen.entry.load(), reinterpret_cast<std::uintptr_t>(f));
  EXPECT_EQ(g_seen.rdi.load(), 42u);
  EXPECT_EQ(g_seen.slot_value.load(), g_seen.caller.load()) << "caller_return_slot names the return address";
  EXPECT_EQ(hooks::counters(ops).hits, 1u);
  EXPECT_EQ(tramway::text::stats().batches, before.batches) << "a probe is one byte, not a batch";
  ASSERT_TRUE(hooks::detach(ops).ok());
  EXPECT_EQ(first_byte(f), original);
  EXPECT_EQ(f(7), 6);
  EXPECT_EQ(g_seen.calls.load(), 1) << "a call after detach ran the callback";
}

// The tracer's way back: a callback that replaces the return slot regains control when the
// probed function returns (here a function that counts and goes on to the real caller).
std::atomic<std::uintptr_t> g_real_return{0};
std::atomic<int> g_returns{0};
extern "C" std::uintptr_t trap_probe_return_hook() {
  g_returns.fetch_add(1);
  return g_real_return.load();
}
// Entered by `ret` from the probed function, with its return value in eax: calls the C hook
// (saving eax), then jumps to the real caller.
asm(R"(
  .text
  .globl trap_probe_return_stub
  .type trap_probe_return_stub, @function
trap_probe_return_stub:
  .cfi_startproc
  .cfi_undefined rip
  pushq %rax
  call trap_probe_return_hook
  movq %rax, %r11
  popq %rax
  jmp *%r11
  .cfi_endproc
  .size trap_probe_return_stub, . - trap_probe_return_stub
)");
extern "C" void trap_probe_return_stub();

void replace_return(const hooks::Ops&, std::uintptr_t, std::uintptr_t caller, hooks::EntryRegs& regs) {
  g_real_return.store(caller);
  *hooks::caller_return_slot(regs) = reinterpret_cast<std::uintptr_t>(&trap_probe_return_stub);
}

TEST(TrapProbes, ACallbackMayReplaceTheReturnSlotAsExitHooksDo) {
  const Fn f = open_f();
  ASSERT_NE(f, nullptr);
  hooks::Ops ops;
  ops.entry = replace_return;
  ops.allow_trap = true;
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::addresses({reinterpret_cast<std::uintptr_t>(f)})).ok());
  g_returns = 0;
  volatile int x = 10;
  EXPECT_EQ(f(x), 9);
  EXPECT_EQ(g_returns.load(), 1);
  ASSERT_TRUE(hooks::detach(ops).ok());
}

// Threads call f throughout attach/detach cycles: every result is right, and the callbacks
// never outnumber the calls.
TEST(TrapProbes, ThreadsCallingTheFunctionThroughAttachAndDetachComputeWhatItComputes) {
  const Fn f = open_f();
  ASSERT_NE(f, nullptr);
  const std::uint8_t original = first_byte(f);
  std::atomic<bool> stop{false};
  std::atomic<long> wrong{0}, calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; !stop.load(std::memory_order_relaxed); ++i) {
        if (f(i + t) != i + t - 1) wrong.fetch_add(1);
        calls.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  std::uint64_t hits = 0;
  for (int cycle = 0; cycle < 200; ++cycle) {
    hooks::Ops ops;
    ops.entry = on_entry;
    ops.allow_trap = true;
    ASSERT_TRUE(hooks::attach(ops, hooks::Filter::addresses({reinterpret_cast<std::uintptr_t>(f)})).ok()) << cycle;
    EXPECT_EQ(f(1), 0);  // at least one hit a cycle, on this thread
    hits += hooks::counters(ops).hits;
    ASSERT_TRUE(hooks::detach(ops).ok()) << cycle;
  }
  stop = true;
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GE(hits, 200u);
  EXPECT_LE(hits, static_cast<std::uint64_t>(calls.load()) + 200u);
  EXPECT_EQ(first_byte(f), original);
}

}  // namespace
