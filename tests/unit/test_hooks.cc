// Function hooks: callbacks see the function's arguments, the function still gets them
// (integer, floating point, varargs), several ops share a site, recursion is counted, errors
// say what to do, detach is synchronous under load; direct mode calls a slot of its own and
// switches with the common entry as ops come and go; extended state is kept when asked; leaf
// callbacks on general-purpose registers run without the vector saves, and a scan that let
// a vector-touching or EntryRegs-reading leaf through would break the function's arguments.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <atomic>
#include <bit>
#include <cstdarg>
#include <cstddef>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

#include "arch/x86_64/callback_scan.h"
#include "tramway/grace.h"
#include "tramway/hooks.h"

namespace hooks = tramway::hooks;

// Leaf callbacks in assembly, so that what the scan sees does not depend on the build's
// optimisation or sanitizers. Each counts its calls at *(uint64_t*)ops.data.
//   lean_count:      nothing else — provably leaves vector registers and EntryRegs alone;
//   leaf_clobber:    zeroes xmm0-7 — a leaf, but the stubs must save them around it;
//   leaf_reads_regs: copies the low 8 bytes of regs.xmm[0] to ((uint64_t*)ops.data)[1] with
//                    integer moves — the stubs must have stored the xmm registers for it.
static_assert(offsetof(hooks::Ops, data) == 8 && offsetof(hooks::EntryRegs, xmm) == 64);
extern "C" void lean_count(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&);
extern "C" void leaf_clobber(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&);
extern "C" void leaf_reads_regs(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&);
asm(R"(
	.text
	.globl	lean_count
	.type	lean_count, @function
lean_count:
	movq	8(%rdi), %rax
	lock incq (%rax)
	ret
	.size	lean_count, . - lean_count
	.globl	leaf_clobber
	.type	leaf_clobber, @function
leaf_clobber:
	movq	8(%rdi), %rax
	lock incq (%rax)
	xorps	%xmm0, %xmm0
	xorps	%xmm1, %xmm1
	xorps	%xmm2, %xmm2
	xorps	%xmm3, %xmm3
	xorps	%xmm4, %xmm4
	xorps	%xmm5, %xmm5
	xorps	%xmm6, %xmm6
	xorps	%xmm7, %xmm7
	ret
	.size	leaf_clobber, . - leaf_clobber
	.globl	leaf_reads_regs
	.type	leaf_reads_regs, @function
leaf_reads_regs:
	movq	8(%rdi), %rax
	lock incq (%rax)
	movq	64(%rcx), %rdx
	movq	%rdx, 8(%rax)
	ret
	.size	leaf_reads_regs, . - leaf_reads_regs
)");

#define PATCHABLE __attribute__((noinline, patchable_function_entry(13, 8)))

extern "C" {
PATCHABLE int hook_add(int a, int b) {
  asm volatile("");
  return a + b;
}
PATCHABLE double hook_fma(double a, double b, double c) {
  asm volatile("");
  return a * b + c;
}
PATCHABLE long hook_sum(int n, ...) {
  va_list ap;
  va_start(ap, n);
  long s = 0;
  for (int i = 0; i < n; ++i) s += va_arg(ap, long);
  double d = va_arg(ap, double);
  va_end(ap);
  return s + static_cast<long>(d);
}
PATCHABLE int hook_other(int x) {
  asm volatile("");
  return x * 3;
}
PATCHABLE void hook_leaf() { asm volatile(""); }
}

// Calls through volatile pointers, so the compiler cannot inline or fold them.
int (*volatile p_add)(int, int) = hook_add;
double (*volatile p_fma)(double, double, double) = hook_fma;
long (*volatile p_sum)(int, ...) = hook_sum;
int (*volatile p_other)(int) = hook_other;
void (*volatile p_leaf)() = hook_leaf;

namespace {

struct Seen {
  std::atomic<int> calls{0};
  std::uintptr_t function = 0, caller = 0;
  std::uint64_t rdi = 0, rsi = 0;
};

void record(const hooks::Ops& ops, std::uintptr_t fn, std::uintptr_t caller, hooks::EntryRegs& r) {
  auto* seen = static_cast<Seen*>(ops.data);
  seen->function = fn;
  seen->caller = caller;
  seen->rdi = r.rdi;
  seen->rsi = r.rsi;
  seen->calls.fetch_add(1);
}

// Clobbers every vector argument register the way real callbacks (printf, math) do.
void clobber_vectors(const hooks::Ops& ops, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  static_cast<Seen*>(ops.data)->calls.fetch_add(1);
  asm volatile("xorps %%xmm0, %%xmm0; xorps %%xmm1, %%xmm1; xorps %%xmm2, %%xmm2; xorps %%xmm7, %%xmm7; xor %%eax, %%eax"
               ::: "xmm0", "xmm1", "xmm2", "xmm7", "rax");
}

hooks::Ops make_ops(hooks::EntryCallback cb, Seen* seen) {
  hooks::Ops ops;
  ops.entry = cb;
  ops.data = seen;
  return ops;
}

}  // namespace

TEST(Hooks, CallbackSeesTheCallAndTheFunctionItsArguments) {
  Seen seen;
  hooks::Ops ops = make_ops(record, &seen);
  ASSERT_EQ(p_add(2, 3), 5);
  const auto st = hooks::attach(ops, hooks::Filter::names({"hook_add"}));
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(p_add(20, 22), 42);
  EXPECT_EQ(seen.calls.load(), 1);
  EXPECT_EQ(seen.function, reinterpret_cast<std::uintptr_t>(&hook_add));
  EXPECT_EQ(seen.rdi, 20u);
  EXPECT_EQ(seen.rsi, 22u);
  EXPECT_NE(seen.caller, 0u);
  EXPECT_EQ(hooks::counters(ops).hits, 1u);
  EXPECT_EQ(hooks::counters(ops).functions, 1u);
  ASSERT_TRUE(hooks::detach(ops).ok());
  EXPECT_EQ(p_add(1, 1), 2);
  EXPECT_EQ(seen.calls.load(), 1) << "a callback ran after detach returned";
}

TEST(Hooks, VectorAndVarargsArgumentsReachTheFunction) {
  Seen seen;
  hooks::Ops ops = make_ops(clobber_vectors, &seen);
  const auto st = hooks::attach(ops, hooks::Filter::names({"hook_fma", "hook_sum"}));
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_DOUBLE_EQ(p_fma(1.5, 2.0, 0.25), 3.25);
  EXPECT_EQ(p_sum(3, 1L, 2L, 3L, 4.0), 10);
  EXPECT_EQ(seen.calls.load(), 2);
  ASSERT_TRUE(hooks::detach(ops).ok());
}

// The three leaves on hook_fma, in both modes: the function gets its doubles back each time,
// every call is counted, and the EntryRegs-reading leaf sees the first argument's bits.
TEST(Hooks, LeafCallbacksSkipVectorSavesOnlyWhenProvenSafe) {
  using tramway::arch::scan_callback;
  const auto lean = scan_callback(reinterpret_cast<std::uintptr_t>(&lean_count));
  EXPECT_TRUE(lean.vector_free && !lean.reads_regs) << lean.reason;
  EXPECT_FALSE(scan_callback(reinterpret_cast<std::uintptr_t>(&leaf_clobber)).vector_free);
  EXPECT_TRUE(scan_callback(reinterpret_cast<std::uintptr_t>(&leaf_reads_regs)).reads_regs);
  for (const bool direct : {false, true}) {
    for (const hooks::EntryCallback cb : {lean_count, leaf_clobber, leaf_reads_regs}) {
      std::uint64_t data[2] = {0, 0};
      hooks::Ops ops;
      ops.entry = cb;
      ops.data = data;
      ops.direct = direct;
      ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_fma"})).ok());
      constexpr int kCalls = 1000;
      for (int i = 0; i < kCalls; ++i) {
        const double a = 1.5 + i;
        ASSERT_DOUBLE_EQ(p_fma(a, 2.0, 0.25), a * 2.0 + 0.25) << "direct " << direct << ", call " << i;
        if (cb == leaf_reads_regs) {
          ASSERT_EQ(data[1], std::bit_cast<std::uint64_t>(a)) << "call " << i;
        }
      }
      EXPECT_EQ(data[0], static_cast<std::uint64_t>(kCalls));
      EXPECT_EQ(hooks::counters(ops).hits, static_cast<std::uint64_t>(kCalls));
      ASSERT_TRUE(hooks::detach(ops).ok());
    }
  }
}

// Ops::promise_vector_free is taken at its word: a callback that breaks it (leaf_clobber zeroes
// xmm0-7) reaches the function's body with its arguments gone, in both modes, once the thread's
// first hooked call (which the dispatcher handles, saving everything) is behind it; with
// save_extended_state the promise is ignored and the arguments arrive.
TEST(Hooks, APromiseOfVectorFreedomSkipsTheSaves) {
  for (const bool direct : {false, true}) {
    for (const bool extended : {false, true}) {
      std::uint64_t data[2] = {0, 0};
      hooks::Ops ops;
      ops.entry = leaf_clobber;
      ops.data = data;
      ops.direct = direct;
      ops.promise_vector_free = true;
      ops.save_extended_state = extended;
      ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_fma"})).ok());
      (void)p_fma(1.0, 1.0, 1.0);  // the thread's first hooked call, if it is
      for (int i = 0; i < 100; ++i) {
        const double a = 1.5 + i;
        ASSERT_DOUBLE_EQ(p_fma(a, 2.0, 0.25), extended ? a * 2.0 + 0.25 : 0.0)
            << "direct " << direct << ", extended " << extended << ", call " << i;
      }
      EXPECT_EQ(data[0], 101u);
      ASSERT_TRUE(hooks::detach(ops).ok());
    }
  }
}

TEST(Hooks, SeveralOpsShareASite) {
  Seen a, b;
  hooks::Ops oa = make_ops(record, &a), ob = make_ops(record, &b);
  ASSERT_TRUE(hooks::attach(oa, hooks::Filter::names({"hook_other"})).ok());
  ASSERT_TRUE(hooks::attach(ob, hooks::Filter::addresses({reinterpret_cast<std::uintptr_t>(&hook_other)})).ok());
  EXPECT_EQ(p_other(5), 15);
  EXPECT_EQ(a.calls.load(), 1);
  EXPECT_EQ(b.calls.load(), 1);
  ASSERT_TRUE(hooks::detach(oa).ok());
  EXPECT_EQ(p_other(1), 3);
  EXPECT_EQ(a.calls.load(), 1);
  EXPECT_EQ(b.calls.load(), 2);
  ASSERT_TRUE(hooks::disable(ob).ok());
  EXPECT_EQ(p_other(1), 3);
  EXPECT_EQ(b.calls.load(), 2) << "a disabled ops ran";
  ASSERT_TRUE(hooks::enable(ob).ok());
  EXPECT_EQ(p_other(1), 3);
  EXPECT_EQ(b.calls.load(), 3);
  ASSERT_TRUE(hooks::detach(ob).ok());
}

TEST(Hooks, GlobSelectsByNameAndErrorsSayWhatToDo) {
  Seen seen;
  hooks::Ops ops = make_ops(record, &seen);
  auto st = hooks::attach(ops, hooks::Filter::glob("no_such_function_*"));
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("matches no function that can be hooked"), std::string::npos) << st.message();
  // libc's sigprocmask has no patchable entry and is one tramway's handlers call: refused.
  st = hooks::attach(ops, hooks::Filter::names({"sigprocmask"}));
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("-fpatchable-function-entry=13,8"), std::string::npos) << st.message();
  // A filter that names nothing selects nothing: said so, not taken for an unloaded object.
  for (const hooks::Filter& empty : {hooks::Filter::names({}), hooks::Filter::addresses({})}) {
    st = hooks::attach(ops, empty);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("selects no function"), std::string::npos) << st.message();
    EXPECT_EQ(st.message().find("unloaded"), std::string::npos) << st.message();
  }
  st = hooks::detach(ops);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("not attached"), std::string::npos) << st.message();

  st = hooks::attach(ops, hooks::Filter::glob("hook_[ao]*"));
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(hooks::counters(ops).functions, 2u);  // hook_add, hook_other
  st = hooks::attach(ops, hooks::Filter::glob("hook_*"));
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("attached already"), std::string::npos) << st.message();
  p_add(1, 2);
  p_other(2);
  p_fma(1, 1, 1);
  EXPECT_EQ(seen.calls.load(), 2);

  auto functions = hooks::patchable_functions();
  ASSERT_TRUE(functions.ok()) << functions.status().message();
  int hooked = 0, listed = 0;
  for (const auto& f : *functions) {
    if (f.name.rfind("hook_", 0) != 0) continue;
    ++listed;
    if (f.ops > 0) ++hooked;
  }
  EXPECT_EQ(listed, 5);
  EXPECT_EQ(hooked, 2);
  ASSERT_TRUE(hooks::detach(ops).ok());
}

namespace {
std::atomic<int> g_inner_result{0};
tramway::Status g_attach_inside;
void calls_hooked(const hooks::Ops& ops, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  static_cast<Seen*>(ops.data)->calls.fetch_add(1);
  g_inner_result = p_add(4, 5);  // hooked itself: must not re-enter callbacks
  hooks::Ops other;
  other.entry = calls_hooked;
  g_attach_inside = hooks::attach(other, hooks::Filter::names({"hook_other"}));
}
}  // namespace

TEST(Hooks, RecursionIsCountedAndAttachInsideACallbackFails) {
  Seen seen;
  hooks::Ops ops = make_ops(calls_hooked, &seen);
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_add"})).ok());
  EXPECT_EQ(p_add(1, 1), 2);
  EXPECT_EQ(seen.calls.load(), 1);
  EXPECT_EQ(g_inner_result.load(), 9);
  EXPECT_EQ(hooks::counters(ops).recursion_skipped, 1u);
  ASSERT_FALSE(g_attach_inside.ok());
  EXPECT_NE(g_attach_inside.message().find("inside a hook callback"), std::string::npos);
  ASSERT_TRUE(hooks::detach(ops).ok());
}

// Threads call the hooked function all along while ops are attached and detached: no
// callback runs after its detach returned, and each ops counted exactly the callbacks it ran.
TEST(Hooks, DetachIsSynchronousWhileThreadsCallTheFunction) {
  std::atomic<bool> stop{false};
  std::vector<std::thread> callers;
  std::atomic<std::uint64_t> calls{0};
  for (int i = 0; i < 4; ++i) {
    callers.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        if (p_add(1, 2) != 3) std::abort();
        calls.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  struct Late {
    std::atomic<bool> detached{false};
    std::atomic<std::uint64_t> ran{0}, late{0};
  };
  int cycles = 0;
  std::uint64_t total_ran = 0;
  for (; cycles < 100; ++cycles) {
    Late late;
    hooks::Ops ops;
    ops.data = &late;
    ops.entry = [](const hooks::Ops& o, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
      auto* l = static_cast<Late*>(o.data);
      if (l->detached.load()) l->late.fetch_add(1);
      for (int k = 0; k < 50; ++k) asm volatile("pause");  // widen the window
      l->ran.fetch_add(1);
    };
    ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_add"})).ok());
    std::this_thread::yield();
    const std::uint64_t hits = hooks::counters(ops).hits;
    ASSERT_TRUE(hooks::detach(ops).ok());
    late.detached = true;
    EXPECT_GE(late.ran.load(), hits);
    std::this_thread::yield();
    EXPECT_EQ(late.late.load(), 0u) << "a callback ran after detach returned (cycle " << cycles << ")";
    total_ran += late.ran.load();
  }
  stop = true;
  for (auto& t : callers) t.join();
  EXPECT_GT(total_ran, 0u) << "the callers never ran while an ops was attached";
  EXPECT_GT(calls.load(), 0u);
}

// A hooked library unloaded and loaded again: its sites left the tables with it, so the
// second load (likely at the same address) is hooked from scratch.
TEST(Hooks, AnUnloadedLibrarysSitesLeaveWithItAndAReloadStartsClean) {
  for (int round = 0; round < 2; ++round) {
    void* lib = dlopen(HOOK_FX_GCC, RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(lib, nullptr) << dlerror();
    auto* c_function = reinterpret_cast<int (*)(int)>(dlsym(lib, "c_function"));
    ASSERT_NE(c_function, nullptr);
    Seen seen;
    hooks::Ops ops = make_ops(record, &seen);
    const auto st = hooks::attach(ops, hooks::Filter::names({"c_function"}));
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(c_function(1), (1 ^ 0x55) + 1);
    EXPECT_EQ(seen.calls.load(), 1);
    EXPECT_EQ(hooks::counters(ops).functions, 1u);
    ASSERT_EQ(dlclose(lib), 0);
    EXPECT_EQ(hooks::counters(ops).functions, 0u) << "the unloaded function is still attached";
    ASSERT_TRUE(hooks::detach(ops).ok());
  }
}

TEST(Hooks, DetachAsyncRunsDoneOnceNoCallbackCanRun) {
  Seen seen;
  hooks::Ops ops = make_ops(record, &seen);
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_add"})).ok());
  EXPECT_EQ(p_add(1, 2), 3);
  std::atomic<bool> done{false};
  std::atomic<int> calls_at_done{-1};
  ASSERT_TRUE(hooks::detach_async(ops, [&] {
    calls_at_done = seen.calls.load();
    done = true;
  }).ok());
  // Refused while the grace period runs (or, if done ran already, because it is detached).
  EXPECT_FALSE(hooks::detach_async(ops, nullptr).ok()) << "a second detach of the same ops was accepted";
  ASSERT_TRUE(tramway::grace::barrier().ok());
  ASSERT_TRUE(done.load());

  // With a reader holding the grace period, done cannot run: the ops stays "being detached".
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_add"})).ok());
  std::atomic<bool> holding{false}, release{false};
  std::thread reader([&] {
    tramway::grace::ReadGuard g;
    holding = true;
    while (!release) std::this_thread::yield();
  });
  while (!holding) std::this_thread::yield();
  done = false;
  ASSERT_TRUE(hooks::detach_async(ops, [&] { done = true; }).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(done.load()) << "done ran while a reader held the grace period";
  const auto again = hooks::attach(ops, hooks::Filter::names({"hook_add"}));
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.message().find("being detached"), std::string::npos) << again.message();
  release = true;
  reader.join();
  calls_at_done = seen.calls.load();
  ASSERT_TRUE(tramway::grace::barrier().ok());
  ASSERT_TRUE(done.load());
  EXPECT_EQ(p_add(2, 2), 4);
  EXPECT_EQ(seen.calls.load(), calls_at_done.load()) << "a callback ran after done";
  // Reusable once done ran.
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_add"})).ok());
  EXPECT_EQ(p_add(3, 3), 6);
  EXPECT_EQ(seen.calls.load(), calls_at_done.load() + 1);
  ASSERT_TRUE(hooks::detach(ops).ok());
}

namespace {

// What the site at `fn`'s entry calls: 0 when it is a nop.
std::uintptr_t site_callee(const void* fn) {
  const auto* p = static_cast<const std::uint8_t*>(fn);
  if (p[0] != 0xe8) return 0;
  std::int32_t rel;
  std::memcpy(&rel, p + 1, 4);
  return reinterpret_cast<std::uintptr_t>(p) + 5 + static_cast<std::intptr_t>(rel);
}
bool is_direct_slot(std::uintptr_t code) {  // lea disp(%rip), %r11
  const auto* p = reinterpret_cast<const std::uint8_t*>(code);
  return p[0] == 0x4c && p[1] == 0x8d && p[2] == 0x1d;
}
bool is_thunk(std::uintptr_t code) {  // jmp *disp(%rip)
  const auto* p = reinterpret_cast<const std::uint8_t*>(code);
  return p[0] == 0xff && p[1] == 0x25;
}

}  // namespace

TEST(Hooks, DirectOpsCallsASlotOfItsOwnAndSharesTheSiteThroughTheCommonEntry) {
  Seen a, b;
  hooks::Ops oa = make_ops(record, &a), ob = make_ops(clobber_vectors, &b);
  oa.direct = true;
  ASSERT_TRUE(hooks::attach(oa, hooks::Filter::names({"hook_other", "hook_fma"})).ok());
  const std::uintptr_t slot = site_callee(reinterpret_cast<const void*>(&hook_other));
  ASSERT_NE(slot, 0u);
  EXPECT_TRUE(is_direct_slot(slot)) << "a site whose only ops is direct does not call a slot";
  EXPECT_NE(site_callee(reinterpret_cast<const void*>(&hook_fma)), slot) << "two sites share one slot";
  EXPECT_EQ(p_other(7), 21);
  EXPECT_EQ(a.calls.load(), 1);
  EXPECT_EQ(a.function, reinterpret_cast<std::uintptr_t>(&hook_other));
  EXPECT_EQ(a.rdi, 7u);

  // A second ops on the site: the common entry, each ops once per call.
  ASSERT_TRUE(hooks::attach(ob, hooks::Filter::names({"hook_other", "hook_fma"})).ok());
  EXPECT_TRUE(is_thunk(site_callee(reinterpret_cast<const void*>(&hook_other))));
  EXPECT_EQ(p_other(2), 6);
  EXPECT_DOUBLE_EQ(p_fma(1.5, 2.0, 0.25), 3.25);  // the vector clobber reaches no argument
  EXPECT_EQ(a.calls.load(), 3);
  EXPECT_EQ(b.calls.load(), 2);

  // Back to its own slot when the direct ops is alone again (the slot kept naming it: a
  // thread preempted in it meanwhile still ran it), and to a nop after.
  ASSERT_TRUE(hooks::detach(ob).ok());
  EXPECT_EQ(site_callee(reinterpret_cast<const void*>(&hook_other)), slot);
  EXPECT_EQ(p_other(1), 3);
  EXPECT_EQ(a.calls.load(), 4);
  EXPECT_EQ(hooks::counters(oa).hits, 4u);
  ASSERT_TRUE(hooks::detach(oa).ok());
  EXPECT_EQ(site_callee(reinterpret_cast<const void*>(&hook_other)), 0u);
  EXPECT_EQ(p_other(1), 3);
  EXPECT_EQ(a.calls.load(), 4) << "a callback ran after detach returned";
}

namespace {
// Calls `slot` the way a site does from inside a function: the stack one word below a
// function's entry alignment, with the return address into here (not the owner's body).
void call_slot_as_a_site(std::uintptr_t slot) {
  asm volatile(
      "mov %%rsp, %%rbx\n\t"
      "lea -128(%%rsp), %%rsp\n\t"  // past the red zone
      "and $-16, %%rsp\n\t"
      "sub $8, %%rsp\n\t"  // as if the function's caller had pushed its return address
      "call *%[slot]\n\t"
      "mov %%rbx, %%rsp"
      :
      : [slot] "r"(slot)
      : "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4",
        "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
}
}  // namespace

// The tag check: a thread reaching a slot on behalf of another site than its owner — a thread
// preempted in a slot that was retired and reused meanwhile — returns untraced. Calling the
// slot from here is such a thread: its return address is not the owner's body.
TEST(Hooks, DirectSlotTurnsAwayAThreadThatIsNotItsOwnersCaller) {
  Seen a;
  hooks::Ops oa = make_ops(record, &a);
  oa.direct = true;
  ASSERT_TRUE(hooks::attach(oa, hooks::Filter::names({"hook_leaf"})).ok());
  const std::uintptr_t slot = site_callee(reinterpret_cast<const void*>(&hook_leaf));
  ASSERT_TRUE(slot != 0 && is_direct_slot(slot));
  call_slot_as_a_site(slot);
  EXPECT_EQ(a.calls.load(), 0) << "a slot ran its ops for a call that did not come from its site";
  reinterpret_cast<void (*)()>(&hook_leaf)();
  EXPECT_EQ(a.calls.load(), 1);
  ASSERT_TRUE(hooks::detach(oa).ok());
  std::uint8_t code[16];
  std::memcpy(code, reinterpret_cast<const void*>(slot), sizeof code);
  call_slot_as_a_site(slot);  // retired: tag cleared, code still there (type-stable)
  EXPECT_EQ(a.calls.load(), 1);
  // Slots are reused once their grace period passed, their code never rewritten.
  std::set<std::uintptr_t> slots;
  for (int i = 0; i < 300; ++i) {
    ASSERT_TRUE(tramway::grace::barrier().ok());
    ASSERT_TRUE(hooks::attach(oa, hooks::Filter::names({"hook_leaf"})).ok());
    slots.insert(site_callee(reinterpret_cast<const void*>(&hook_leaf)));
    ASSERT_TRUE(hooks::detach(oa).ok());
  }
  EXPECT_LT(slots.size(), 20u) << "retired slots are not reused";
  EXPECT_EQ(std::memcmp(code, reinterpret_cast<const void*>(slot), sizeof code), 0) << "a slot's code changed";
}

namespace {
// Clears the upper halves of every ymm register, as any AVX code ending in vzeroupper does.
void clobber_upper_halves(const hooks::Ops& ops, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  static_cast<Seen*>(ops.data)->calls.fetch_add(1);
  asm volatile("vzeroupper" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7");
}

// Calls hook_leaf with ymm0 = `in` and returns what ymm0 holds when it returns.
__attribute__((target("avx"))) void call_leaf_with_ymm0(const std::uint64_t (&in)[4], std::uint64_t (&out)[4]) {
  void (*fn)() = hook_leaf;
  asm volatile(
      "mov %%rsp, %%rbx\n\t"
      "lea -128(%%rsp), %%rsp\n\t"  // past the red zone
      "and $-16, %%rsp\n\t"
      "vmovdqu (%[in]), %%ymm0\n\t"
      "call *%[fn]\n\t"
      "vmovdqu %%ymm0, (%[out])\n\t"
      "mov %%rbx, %%rsp\n\t"
      "vzeroupper"
      :
      : [in] "r"(in), [out] "r"(out), [fn] "r"(fn)
      : "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4",
        "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
}
}  // namespace

TEST(Hooks, ExtendedStateIsKeptForTheFunctionWhenTheOpsAsks) {
  ASSERT_TRUE(__builtin_cpu_supports("avx")) << "this test needs AVX";
  const std::uint64_t in[4] = {1, 2, 3, 4};
  for (const bool save : {false, true}) {
    for (const bool direct : {false, true}) {
      Seen seen;
      hooks::Ops ops = make_ops(clobber_upper_halves, &seen);
      ops.save_extended_state = save;
      ops.direct = direct;
      ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_leaf"})).ok());
      std::uint64_t out[4] = {};
      call_leaf_with_ymm0(in, out);
      ASSERT_TRUE(hooks::detach(ops).ok());
      EXPECT_EQ(seen.calls.load(), 1);
      EXPECT_EQ(out[0], 1u);  // xmm0: always kept
      EXPECT_EQ(out[1], 2u);
      if (save) {
        EXPECT_EQ(out[2], 3u) << "ymm0's upper half was lost with save_extended_state (direct " << direct << ")";
        EXPECT_EQ(out[3], 4u);
      } else {
        EXPECT_EQ(out[2], 0u) << "without save_extended_state the callback's vzeroupper should show";
      }
    }
  }
}

namespace {
std::uint64_t function_hits(const char* name) {
  auto functions = hooks::patchable_functions();
  if (!functions.ok()) return ~std::uint64_t{0};
  for (const auto& f : *functions) {
    if (f.name == name) return f.hits;
  }
  return ~std::uint64_t{0};
}
}  // namespace

TEST(Hooks, PerFunctionHitsCountEachInterceptedCallOnce) {
  Seen a, b;
  hooks::Ops oa = make_ops(record, &a), ob = make_ops(record, &b);
  ob.direct = true;
  ASSERT_TRUE(hooks::attach(oa, hooks::Filter::names({"hook_other"})).ok());
  const std::uint64_t other0 = function_hits("hook_other");
  ASSERT_NE(other0, ~std::uint64_t{0});
  for (int i = 0; i < 3; ++i) p_other(i);
  EXPECT_EQ(function_hits("hook_other"), other0 + 3);
  ASSERT_TRUE(hooks::attach(ob, hooks::Filter::names({"hook_other", "hook_leaf"})).ok());
  const std::uint64_t leaf0 = function_hits("hook_leaf");
  for (int i = 0; i < 4; ++i) p_other(i);  // two ops: still once a call
  for (int i = 0; i < 5; ++i) p_leaf();  // through its direct slot
  EXPECT_EQ(function_hits("hook_other"), other0 + 7);
  EXPECT_EQ(function_hits("hook_leaf"), leaf0 + 5);
  EXPECT_EQ(a.calls.load(), 7);
  EXPECT_EQ(b.calls.load(), 9);
  ASSERT_TRUE(hooks::detach(oa).ok());
  ASSERT_TRUE(hooks::detach(ob).ok());
  p_other(1);  // not hooked: not counted, and the count stays
  EXPECT_EQ(function_hits("hook_other"), other0 + 7);
}

// The stubs run the usual case inline (one ops, enabled, this thread's counter block there)
// and leave the rest to the C++ dispatchers: both must call and count alike, in both modes.
TEST(Hooks, InlineAndDispatcherPathsCallAndCountAlike) {
  for (const bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct" : "common entry");
    Seen seen;
    hooks::Ops ops = make_ops(record, &seen);
    ops.direct = direct;
    ASSERT_TRUE(hooks::attach(ops, hooks::Filter::names({"hook_add"})).ok());
    const std::uint64_t fn0 = function_hits("hook_add");
    // A new thread's first hooked call has no counter block yet (the dispatcher claims it);
    // its next ones go inline.
    std::thread([] {
      for (int i = 0; i < 3; ++i) EXPECT_EQ(p_add(i, 1), i + 1);
    }).join();
    EXPECT_EQ(seen.calls.load(), 3);
    EXPECT_EQ(seen.function, reinterpret_cast<std::uintptr_t>(&hook_add));
    EXPECT_EQ(seen.rdi, 2u);
    EXPECT_EQ(seen.rsi, 1u);
    EXPECT_NE(seen.caller, 0u);
    EXPECT_EQ(p_add(40, 2), 42);
    EXPECT_EQ(seen.rdi, 40u);
    EXPECT_EQ(hooks::counters(ops).hits, 4u);
    EXPECT_EQ(function_hits("hook_add"), fn0 + 4);
    // Disabled: the dispatcher's case; the function's calls still count, the ops' do not.
    ASSERT_TRUE(hooks::disable(ops).ok());
    EXPECT_EQ(p_add(1, 1), 2);
    EXPECT_EQ(seen.calls.load(), 4) << "a disabled ops ran";
    EXPECT_EQ(hooks::counters(ops).hits, 4u);
    EXPECT_EQ(function_hits("hook_add"), fn0 + 5);
    ASSERT_TRUE(hooks::enable(ops).ok());
    EXPECT_EQ(p_add(1, 1), 2);
    EXPECT_EQ(seen.calls.load(), 5);
    EXPECT_EQ(hooks::counters(ops).hits, 5u);
    EXPECT_EQ(function_hits("hook_add"), fn0 + 6);
    ASSERT_TRUE(hooks::detach(ops).ok());
  }
}
