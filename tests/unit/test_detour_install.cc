// Hooks on functions without patchable entries, installed and removed while a thread is inside
// the relocated run or its copy (DESIGN.md "Hooks on any function"). Threads are placed
// deterministically: one single-steps a fixture of relocate_fixtures.S with the trap flag and
// parks in its SIGTRAP handler (tramway's router chains it the trace traps) when its PC reaches
// the chosen instruction, so that PC is saved in a nested signal frame; or a tracer child
// single-steps it there with ptrace and keeps it stopped, its live PC at the instruction.
//   attach: every PC at a boundary behind the run's first byte goes to the copy (the call
//           computes what it would have, without the callback: it was past the entry), and a
//           thread that cannot answer (ptrace-stopped) fails the attach, rolled back;
//   detach: a thread anywhere in the copy holds the tasks grace period, so detach_async's
//           `done` waits for it, and the copy is freed only then.
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "bounded_child.h"
#include "common/format.h"
#include "common/proc.h"
#include "relocate_fixtures.h"
#include "sites/hooks/detour.h"
#include "tramway/grace.h"
#include "tramway/hooks.h"
#include "tramway/text/patch.h"

namespace {

namespace hooks = tramway::hooks;
namespace text = tramway::text;
using tramway::common::hex_address;
using namespace std::chrono_literals;

constexpr greg_t kTrapFlag = 0x100;

// ---- the stepping thread's SIGTRAP handler --------------------------------------------------
// Orders are set before the stepped call and read after it (or while the thread is parked).
struct StepOrders {
  std::atomic<std::uintptr_t> park_at{0};  // park when the PC reaches it (0: never)
  std::atomic<bool> parked{false}, release{false};
  std::atomic<ucontext_t*> frame{nullptr};  // the parked frame, where it resumes
  // Survey: every PC seen in [record_begin, record_end), in order.
  std::uintptr_t record_begin = 0, record_end = 0;
  static constexpr int kMaxRecorded = 256;
  std::uintptr_t recorded[kMaxRecorded] = {};
  std::atomic<int> recorded_count{0};
};
StepOrders g_step;

void on_trap(int, siginfo_t* si, void* context) {
  if (si->si_code != TRAP_TRACE) return;
  auto& regs = static_cast<ucontext_t*>(context)->uc_mcontext.gregs;
  const auto pc = static_cast<std::uintptr_t>(regs[REG_RIP]);
  if (pc >= g_step.record_begin && pc < g_step.record_end) {
    const int n = g_step.recorded_count.load(std::memory_order_relaxed);
    if (n < StepOrders::kMaxRecorded) g_step.recorded[n] = pc;
    g_step.recorded_count.store(n + 1, std::memory_order_relaxed);
  }
  if (pc == g_step.park_at.load(std::memory_order_relaxed)) {
    regs[REG_EFL] &= ~kTrapFlag;  // this frame resumes at `pc` (or where a batch moved it)
    g_step.frame.store(static_cast<ucontext_t*>(context), std::memory_order_relaxed);
    g_step.parked.store(true, std::memory_order_release);
    while (!g_step.release.load(std::memory_order_acquire)) __builtin_ia32_pause();
  }
  // Otherwise keep stepping: rl_call_stepped clears the flag when the call returns.
}

void reset_orders(std::uintptr_t park_at) {
  g_step.park_at = park_at;
  g_step.parked = false;
  g_step.frame = nullptr;
  g_step.release = false;
  g_step.record_begin = g_step.record_end = 0;
  g_step.recorded_count = 0;
}

// Waits (without a time limit of its own: a test that never gets there is killed by ctest)
// until `cond`; false after 30 s, so that the assertion says which wait hung.
template <class Cond>
bool eventually(Cond cond) {
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

// A thread running `body` (a stepped call that parks); released and joined however the test
// ends, so that a failed assertion does not leave it spinning.
class Stepped {
 public:
  template <class Body>
  explicit Stepped(Body body) : t_([this, body] {
                                  tid = tramway::common::current_tid();
                                  result = body();
                                }) {}
  ~Stepped() { join(); }
  void join() {
    g_step.release = true;
    if (t_.joinable()) t_.join();
  }
  std::atomic<pid_t> tid{0};
  long result = 0;

 private:
  std::thread t_;
};

// ---- fixtures --------------------------------------------------------------------------------
struct Case {
  const char* name;
  rl::Fixture f;
  long a, b, c, d;     // arguments whose path passes every instruction of the run
  std::size_t inside;  // instruction boundaries of the run behind its first byte
  // Instructions of the copy the call passes: the run's, a loop's or jrcxz's jmp over the rel32
  // jmp that stands for its branch, and the jmp back (a final call's copy is a push and a jmp).
  std::size_t copy_passed;
  long call() const { return f.fn(a, b, c, d); }
  long stepped() const { return rl_call_stepped(f.fn, a, b, c, d); }
};
std::vector<Case> cases() {
  return {
      {"rl_plain", RL_FIXTURE(rl_plain), 41, 0, 0, 0, 2, 4},
      {"rl_endbr", RL_FIXTURE(rl_endbr), 40, 0, 0, 0, 2, 4},
      {"rl_rip_load", RL_FIXTURE(rl_rip_load), 0, 0, 0, 0, 0, 2},
      {"rl_fs_canary", RL_FIXTURE(rl_fs_canary), 0, 0, 0, 0, 1, 3},
      {"rl_jcc_out", RL_FIXTURE(rl_jcc_out), 5, 0, 0, 0, 2, 4},     // je not taken: the mov runs
      {"rl_jcc_in", RL_FIXTURE(rl_jcc_in), 10, 3, 0, 0, 2, 4},      // the loop runs 4 times
      {"rl_jrcxz_in", RL_FIXTURE(rl_jrcxz_in), 1, 2, 0, 9, 3, 6},   // rcx != 0: the second xchg runs
      {"rl_loop_out", RL_FIXTURE(rl_loop_out), 10, 0, 0, 1, 3, 6},  // rcx == 1: the loop falls through
      {"rl_call_last", RL_FIXTURE(rl_call_last), 20, 0, 0, 0, 1, 3},
  };
}

std::vector<std::uint8_t> bytes_at(std::uintptr_t a, std::size_t n) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(a);
  return {p, p + n};
}

// An ops that counts its calls and remembers the function it was told.
struct Counted {
  std::atomic<std::uint64_t> calls{0};
  std::atomic<std::uintptr_t> function{0};
  hooks::Ops ops;
  Counted() {
    ops.data = this;
    ops.entry = [](const hooks::Ops& o, std::uintptr_t fn, std::uintptr_t, hooks::EntryRegs&) {
      auto* self = static_cast<Counted*>(o.data);
      self->function.store(fn, std::memory_order_relaxed);
      self->calls.fetch_add(1, std::memory_order_relaxed);
    };
  }
};

// The copy the function's entry leads to while hooked: the run's first bytes are `jmp pad_site`,
// the pad's jmp (pad_site + 5) goes to the copy.
std::uintptr_t copy_of(const rl::RelocationPlan& plan) {
  const rl::Insn jmp = rl::decode_at({reinterpret_cast<const std::uint8_t*>(plan.run_start), 5}, 0, plan.run_start);
  EXPECT_EQ(jmp.insn.mnemonic, ZYDIS_MNEMONIC_JMP) << "the run is not a jmp while hooked";
  if (jmp.insn.mnemonic != ZYDIS_MNEMONIC_JMP) return 0;
  const std::uintptr_t pad_jmp = jmp.target + tramway::sites::hooks::kPadJmpOffset - tramway::sites::hooks::kPadSiteOffset;
  const rl::Insn to_copy = rl::decode_at({reinterpret_cast<const std::uint8_t*>(pad_jmp), 5}, 0, pad_jmp);
  EXPECT_EQ(to_copy.insn.mnemonic, ZYDIS_MNEMONIC_JMP) << "the pad does not jmp to a copy while hooked";
  return to_copy.insn.mnemonic == ZYDIS_MNEMONIC_JMP ? to_copy.target : 0;
}

// Freed copies are poisoned (ud2) and never reused: a thread let back into one dies of SIGILL.
std::mutex g_freed_mu;
std::vector<std::uintptr_t> g_freed;
void quarantine(const text::CodeBlock& copy) {
  for (std::size_t i = 0; i + 1 < copy.size; i += 2) copy.rw[i] = 0x0f, copy.rw[i + 1] = 0x0b;
  std::lock_guard lock(g_freed_mu);
  g_freed.push_back(reinterpret_cast<std::uintptr_t>(copy.rx));
}
bool was_freed(std::uintptr_t copy) {
  std::lock_guard lock(g_freed_mu);
  return std::find(g_freed.begin(), g_freed.end(), copy) != g_freed.end();
}

class DetourInstall : public ::testing::Test {
 protected:
  void SetUp() override {
    struct sigaction sa {};
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ASSERT_EQ(sigaction(SIGTRAP, &sa, nullptr), 0);
    tramway::sites::hooks::testing::set_detour_freed_hook(&quarantine);
    rl_value = 0x1122334455667788;
    auto all = hooks::functions();
    ASSERT_TRUE(all.ok()) << all.status().message();
    for (const Case& c : cases()) {
      const auto it = std::find_if(all->begin(), all->end(), [&](const hooks::Function& fn) { return fn.entry == c.f.address; });
      ASSERT_NE(it, all->end()) << c.name << " is not listed";
      ASSERT_EQ(it->kind, hooks::HookKind::relocatable) << c.name << ": " << it->reason;
    }
  }
};

// ---- attach -----------------------------------------------------------------------------------

TEST_F(DetourInstall, AttachMovesANestedFrameAtEveryBoundaryOfTheRunIntoTheCopy) {
  std::size_t parked_total = 0;
  for (const Case& c : cases()) {
    const rl::RelocationPlan plan = rl::plan_of(c.f);
    ASSERT_EQ(plan.instructions.size(), c.inside + 1) << c.name;
    const long expected = c.call();
    const auto original = bytes_at(c.f.address, c.f.code.size());
    for (std::size_t i = 1; i < plan.instructions.size(); ++i) {
      const std::uintptr_t at = plan.run_start + plan.instructions[i].offset;
      SCOPED_TRACE(std::string(c.name) + " parked at run offset " + std::to_string(plan.instructions[i].offset));
      reset_orders(at);
      Stepped t([&] { return c.stepped(); });
      ASSERT_TRUE(eventually([] { return g_step.parked.load(); }));

      Counted counted;
      const auto before = text::stats();
      const auto st = hooks::attach(counted.ops, hooks::Filter::addresses({c.f.address}));
      const auto after = text::stats();
      ASSERT_TRUE(st.ok()) << st.message();
      // Where the parked frame resumes: the boundary's instruction in the copy.
      const std::uintptr_t copy = copy_of(plan);
      const auto code = tramway::arch::emit_relocated(plan, copy);
      ASSERT_TRUE(code.ok()) << code.status().message();
      const std::uintptr_t continuation = copy + code->boundaries[i].copy_offset;
      greg_t& frame_pc = g_step.frame.load()->uc_mcontext.gregs[REG_RIP];
      if (static_cast<std::uintptr_t>(frame_pc) != continuation) {
        ADD_FAILURE() << "the parked frame resumes at " << hex_address(static_cast<std::uintptr_t>(frame_pc))
                      << ", not in the copy at " << hex_address(continuation);
        frame_pc = static_cast<greg_t>(continuation);  // so that the thread does not run the jmp's bytes
      }
      t.join();
      EXPECT_EQ(after.runs_displaced - before.runs_displaced, 1u);
      EXPECT_EQ(after.pcs_moved - before.pcs_moved, 1u) << "the parked frame's PC was not moved into the copy";
      EXPECT_EQ(t.result, expected);
      EXPECT_EQ(counted.calls.load(), 0u) << "the parked call was past the entry: no callback for it";
      EXPECT_EQ(c.call(), expected);
      EXPECT_EQ(counted.calls.load(), 1u);
      EXPECT_EQ(counted.function.load(), c.f.address) << "callbacks are told the function's address";
      ASSERT_TRUE(hooks::detach(counted.ops).ok());
      EXPECT_EQ(bytes_at(c.f.address, c.f.code.size()), original);
      ++parked_total;
    }
  }
  EXPECT_EQ(parked_total, 16u);
}

// A tracer child single-steps a thread of ours (ptrace) to an instruction boundary of the run and
// keeps it stopped there: its live PC is inside, and it cannot answer the fix-up signal.
class Tracer {
 public:
  // Stops thread `tid`, which spins until `go` and then calls the fixture, at `at`.
  Tracer(pid_t tid, std::atomic<bool>& go, std::uintptr_t at) {
    int ready[2], resume[2];
    if (pipe(ready) != 0 || pipe(resume) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      close(ready[0]);
      close(resume[1]);
      char c = 0;
      int status = 0;
      if (ptrace(PTRACE_SEIZE, tid, nullptr, nullptr) != 0) c = 'S';
      if (!c && ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) != 0) c = 'I';
      if (!c && waitpid(tid, &status, __WALL) != tid) c = 'W';
      if (!c && write(ready[1], "i", 1) != 1) _exit(1);  // stopped: the parent lets it go on
      for (long steps = 0; !c; ++steps) {
        user_regs_struct regs{};
        if (ptrace(PTRACE_GETREGS, tid, nullptr, &regs) != 0) c = 'G';
        if (c || regs.rip == at) break;
        if (steps == 10'000'000) c = 'L';  // never got there: a broken test, not bad luck
        if (!c && ptrace(PTRACE_SINGLESTEP, tid, nullptr, nullptr) != 0) c = 'T';
        if (!c && waitpid(tid, &status, __WALL) != tid) c = 'W';
      }
      if (write(ready[1], c ? &c : "k", 1) != 1) _exit(1);
      if (read(resume[0], &c, 1) != 1) _exit(1);
      ptrace(PTRACE_DETACH, tid, nullptr, nullptr);
      _exit(0);
    }
    close(ready[1]);
    close(resume[0]);
    resume_ = resume[1];
    char c = 0;
    if (pid_ > 0 && read(ready[0], &c, 1) == 1 && c == 'i') {
      go = true;
      if (read(ready[0], &c, 1) != 1) c = 'E';
    }
    answer_ = c;
    close(ready[0]);
  }
  char answer() const { return answer_; }  // 'k': stopped at the boundary
  void resume() {
    if (resume_ >= 0) {
      if (write(resume_, "g", 1) != 1) ADD_FAILURE() << "could not resume the traced thread";
      close(resume_);
      resume_ = -1;
    }
    if (pid_ > 0) {
      const int code = bounded::wait_bounded(pid_, 10'000);
      EXPECT_EQ(code, 0) << bounded::describe(code);
      pid_ = -1;
    }
  }
  ~Tracer() { resume(); }

 private:
  pid_t pid_ = -1;
  int resume_ = -1;
  char answer_ = 0;
};

class DetourInstallTraced : public DetourInstall, public ::testing::WithParamInterface<int> {};

TEST_P(DetourInstallTraced, AThreadStoppedAtABoundaryOfTheRunFailsTheAttachWhichIsRolledBack) {
  const Case c = cases()[static_cast<std::size_t>(GetParam())];
  const rl::RelocationPlan plan = rl::plan_of(c.f);
  const long expected = c.call();
  const auto original = bytes_at(c.f.address, c.f.code.size());
  for (std::size_t i = 1; i < plan.instructions.size(); ++i) {
    const std::uintptr_t at = plan.run_start + plan.instructions[i].offset;
    SCOPED_TRACE(std::string(c.name) + " stopped at run offset " + std::to_string(plan.instructions[i].offset));
    std::atomic<bool> go{false}, done{false};
    std::atomic<pid_t> tid{0};
    long got = 0;
    std::thread t([&] {
      pthread_setname_np(pthread_self(), "at-boundary");
      tid = tramway::common::current_tid();
      while (!go.load()) __builtin_ia32_pause();
      got = c.call();
      done = true;
    });
    struct Join {  // declared before the tracer: it resumes the thread before this joins it
      std::thread& t;
      std::atomic<bool>& go;
      ~Join() {
        go = true;
        t.join();
      }
    } join{t, go};
    while (tid.load() == 0) std::this_thread::yield();
    Tracer tracer(tid.load(), go, at);
    if (tracer.answer() != 'k') {
      tracer.resume();
      if (tracer.answer() == 'S') GTEST_SKIP() << "ptrace is not permitted here";
      FAIL() << "the tracer failed at step " << tracer.answer();
    }
    const auto probe = tramway::common::probe_task(tid.load());
    ASSERT_FALSE(probe.running);
    ASSERT_EQ(probe.pc, at) << hex_address(probe.pc);

    Counted counted;
    const auto before = text::stats();
    const auto st = hooks::attach(counted.ops, hooks::Filter::addresses({c.f.address}));
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("thread " + std::to_string(tid.load()) + " (at-boundary"), std::string::npos)
        << st.message();
    EXPECT_NE(st.message().find("rolled back"), std::string::npos) << st.message();
    EXPECT_EQ(text::stats().runs_displaced, before.runs_displaced);
    EXPECT_EQ(bytes_at(c.f.address, c.f.code.size()), original);
    EXPECT_EQ(c.call(), expected);
    EXPECT_EQ(counted.calls.load(), 0u);

    tracer.resume();
    ASSERT_TRUE(eventually([&] { return done.load(); }));
    EXPECT_EQ(got, expected);
    const auto again = hooks::attach(counted.ops, hooks::Filter::addresses({c.f.address}));
    ASSERT_TRUE(again.ok()) << again.message();
    EXPECT_EQ(c.call(), expected);
    EXPECT_EQ(counted.calls.load(), 1u);
    ASSERT_TRUE(hooks::detach(counted.ops).ok());
    EXPECT_EQ(bytes_at(c.f.address, c.f.code.size()), original);
  }
}

// Only the fixtures with a boundary behind the run's first byte.
INSTANTIATE_TEST_SUITE_P(Fixtures, DetourInstallTraced, ::testing::Values(0, 1, 3, 4, 5, 6, 7, 8),
                         [](const ::testing::TestParamInfo<int>& p) {
                           return std::string(cases()[static_cast<std::size_t>(p.param)].name);
                         });

// ---- detach -----------------------------------------------------------------------------------

// The instruction boundaries of the copy at `copy` that a hooked call passes, found by stepping
// one: each one a PC the handler saw between the copy's start and the end of its code.
std::vector<std::uintptr_t> surveyed_copy_pcs(const Case& c, long expected, std::uintptr_t copy,
                                             const rl::RelocatedCode& code) {
  reset_orders(0);
  g_step.record_begin = copy;
  g_step.record_end = copy + code.code_length;
  EXPECT_EQ(c.stepped(), expected);
  const int n = g_step.recorded_count.load();
  EXPECT_LE(n, StepOrders::kMaxRecorded);
  std::vector<std::uintptr_t> pcs(g_step.recorded, g_step.recorded + std::min(n, StepOrders::kMaxRecorded));
  reset_orders(0);
  return pcs;
}

// One fixture a test: each parks a thread at up to 6 instructions, each a tasks grace period.
class DetourInstallDetach : public DetourInstall, public ::testing::WithParamInterface<int> {};

TEST_P(DetourInstallDetach, DetachWaitsForAThreadParkedAtEveryInstructionOfTheCopy) {
  const Case c = cases()[static_cast<std::size_t>(GetParam())];
  const rl::RelocationPlan plan = rl::plan_of(c.f);
  const long expected = c.call();
  const auto original = bytes_at(c.f.address, c.f.code.size());
  std::size_t parked = 0;

  // Survey: which copy offsets the hooked call runs through. The copy is the relocator's
  // output at its address; every instruction of the run is passed, and the jmp back (but
  // for a final call, whose copy jumps to the callee instead).
  std::set<std::uint32_t> offsets;
  {
    Counted counted;
    ASSERT_TRUE(hooks::attach(counted.ops, hooks::Filter::addresses({c.f.address})).ok()) << c.name;
    const std::uintptr_t copy = copy_of(plan);
    ASSERT_NE(copy, 0u) << c.name;
    const auto code = tramway::arch::emit_relocated(plan, copy);
    ASSERT_TRUE(code.ok()) << code.status().message();
    ASSERT_EQ(bytes_at(copy, code->bytes.size()), code->bytes) << c.name << ": the copy is not the relocator's";
    std::set<std::uint32_t> linear;  // every instruction of the copy's code
    for (std::size_t o = 0, n = 0; o < code->code_length; o += n) {
      n = rl::decode_at(code->bytes, o, copy).insn.length;
      ASSERT_NE(n, 0u) << c.name << ": copy offset " << o;
      linear.insert(static_cast<std::uint32_t>(o));
    }
    for (std::uintptr_t pc : surveyed_copy_pcs(c, expected, copy, *code)) offsets.insert(static_cast<std::uint32_t>(pc - copy));
    EXPECT_EQ(counted.calls.load(), 1u);
    for (std::uint32_t o : offsets) EXPECT_TRUE(linear.count(o)) << c.name << ": copy offset " << o;
    for (const auto& b : code->boundaries) EXPECT_TRUE(offsets.count(b.copy_offset)) << c.name << ": " << b.copy_offset;
    const bool final_call = c.f.address == rl::address_of(&rl_call_last);
    if (!final_call) {
      EXPECT_TRUE(offsets.count(static_cast<std::uint32_t>(code->code_length - 5))) << c.name;
    }
    ASSERT_TRUE(hooks::detach(counted.ops).ok());
    EXPECT_EQ(offsets.size(), c.copy_passed) << c.name;
  }

  for (std::uint32_t offset : offsets) {
    SCOPED_TRACE(std::string(c.name) + " parked at copy offset " + std::to_string(offset));
    // Shared with detach_async's `done`, which may outlive this scope if an assertion fails.
    auto counted = std::make_shared<Counted>();
    auto done = std::make_shared<std::atomic<bool>>(false);
    ASSERT_TRUE(hooks::attach(counted->ops, hooks::Filter::addresses({c.f.address})).ok());
    const std::uintptr_t copy = copy_of(plan);
    ASSERT_NE(copy, 0u);
    reset_orders(copy + offset);
    Stepped t([&] { return c.stepped(); });
    ASSERT_TRUE(eventually([] { return g_step.parked.load(); }));
    EXPECT_EQ(counted->calls.load(), 1u) << "the parked call passed the entry while hooked";

    ASSERT_TRUE(hooks::detach_async(counted->ops, [counted, done] { *done = true; }).ok());
    // The tasks grace period names the parked thread as its holdout, inside the copy.
    std::vector<tramway::grace::Holdout> held;
    const auto names_it = [&] {
      held = tramway::grace::holdouts();
      return std::any_of(held.begin(), held.end(), [&](const auto& h) { return h.tid == t.tid.load() && !h.range.empty(); });
    };
    ASSERT_TRUE(eventually([&] { return done->load() || names_it(); }));
    ASSERT_FALSE(done->load()) << "detach_async's done ran while a thread was parked inside the copy";
    const auto h = std::find_if(held.begin(), held.end(), [&](const auto& x) { return x.tid == t.tid.load() && !x.range.empty(); });
    EXPECT_NE(h->range.find(hex_address(copy)), std::string::npos) << h->range << " " << h->where;
    EXPECT_FALSE(was_freed(copy));
    EXPECT_EQ(bytes_at(c.f.address, c.f.code.size()), original) << "the original bytes are back before the grace period";

    t.join();
    ASSERT_TRUE(eventually([&] { return done->load(); }));
    EXPECT_EQ(t.result, expected);
    EXPECT_TRUE(was_freed(copy));
    EXPECT_EQ(bytes_at(c.f.address, c.f.code.size()), original);
    EXPECT_EQ(c.call(), expected);
    ++parked;
  }
  EXPECT_EQ(parked, c.copy_passed);
}

// ---- the plan kept between hooks -------------------------------------------------------------

// A relocated function keeps its relocation plan from one hook to the next, for as long as its
// run holds the bytes the plan was made from: one changed since (here another tool's int3 on
// the run's first byte) is planned again from what is there now, and refused for that int3;
// with the byte back it is hooked again and runs as it did.
TEST_F(DetourInstall, ARunChangedSinceItsLastHookIsPlannedAgainFromItsBytes) {
  const Case c = cases()[2];  // rl_rip_load
  const rl::RelocationPlan plan = rl::plan_of(c.f);
  const long expected = c.call();
  const auto original = bytes_at(c.f.address, c.f.code.size());
  Counted counted;
  ASSERT_TRUE(hooks::attach(counted.ops, hooks::Filter::addresses({c.f.address})).ok());
  EXPECT_EQ(c.call(), expected);
  EXPECT_EQ(counted.calls.load(), 1u);
  ASSERT_TRUE(hooks::detach(counted.ops).ok());

  auto* run = reinterpret_cast<std::uint8_t*>(plan.run_start);
  const std::uint8_t first = *run;
  const text::ByteWrite trap{run, 0xcc};
  ASSERT_TRUE(text::write_instruction_bytes({&trap, 1}).ok());
  Counted refused;
  const auto st = hooks::attach(refused.ops, hooks::Filter::addresses({c.f.address}));
  const text::ByteWrite back{run, first};
  ASSERT_TRUE(text::write_instruction_bytes({&back, 1}).ok());
  ASSERT_FALSE(st.ok()) << "attached over a run that no longer holds the bytes of its plan";
  EXPECT_NE(st.message().find("int3"), std::string::npos) << st.message();

  ASSERT_TRUE(hooks::attach(counted.ops, hooks::Filter::addresses({c.f.address})).ok());
  EXPECT_EQ(c.call(), expected);
  EXPECT_EQ(counted.calls.load(), 2u);
  ASSERT_TRUE(hooks::detach(counted.ops).ok());
  EXPECT_EQ(bytes_at(c.f.address, c.f.code.size()), original);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DetourInstallDetach, ::testing::Range(0, 9),
                         [](const ::testing::TestParamInfo<int>& p) {
                           return std::string(cases()[static_cast<std::size_t>(p.param)].name);
                         });

}  // namespace
