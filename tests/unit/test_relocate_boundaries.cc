// arch/x86_64/relocate.h, the boundary map: a thread stopped at any instruction of the run
// and moved to the matching instruction of the copy (what installing a detour does to a
// thread whose PC is inside the run) computes what the function computes. The thread is
// placed deterministically: it single-steps the original (trap flag) and the SIGTRAP handler
// moves its PC when it reaches the chosen boundary.
#include <gtest/gtest.h>
#include <signal.h>
#include <ucontext.h>

#include <cstdint>
#include <vector>

#include "relocate_fixtures.h"

namespace {

constexpr greg_t kTrapFlag = 0x100;

// The handler's orders and what it saw; set before the stepped call, read after it.
struct Move {
  std::uintptr_t from = 0;  // run_start + run_offset
  std::uintptr_t to = 0;    // detour + copy_offset
  std::uintptr_t function_begin = 0, function_end = 0;
  bool entered = false, moved = false;
};
Move g_move;

void on_trap(int, siginfo_t*, void* context) {
  auto& regs = static_cast<ucontext_t*>(context)->uc_mcontext.gregs;
  const auto pc = static_cast<std::uintptr_t>(regs[REG_RIP]);
  const bool inside = pc >= g_move.function_begin && pc < g_move.function_end;
  if (pc == g_move.from) {
    regs[REG_RIP] = static_cast<greg_t>(g_move.to);
    regs[REG_EFL] &= ~kTrapFlag;
    g_move.moved = true;
  } else if (g_move.entered && !inside) {
    regs[REG_EFL] &= ~kTrapFlag;  // left the function without passing the boundary
  }
  g_move.entered = g_move.entered || inside;
}

class RelocateBoundaries : public ::testing::Test {
 protected:
  void SetUp() override {
    struct sigaction sa {};
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ASSERT_EQ(sigaction(SIGTRAP, &sa, nullptr), 0);
  }

  struct Args {
    long a, b, c, d;
  };
  // For each boundary of the fixture's run and each argument set: the function's result
  // when moved there into the copy equals its result untouched. Returns how many moves
  // happened (a boundary a path skips is not passed).
  int check_every_boundary(const rl::Fixture& f, std::initializer_list<Args> args) {
    const rl::RelocationPlan plan = rl::plan_of(f);
    rl::Buffer buffer = rl::Buffer::near(f, tramway::arch::max_relocated_size(plan));
    const rl::RelocatedCode code = buffer.load(plan);
    int moves = 0;
    for (const tramway::arch::Boundary& b : code.boundaries) {
      for (const Args& x : args) {
        const long expected = f.fn(x.a, x.b, x.c, x.d);
        g_move = Move{plan.run_start + b.run_offset, buffer.address() + b.copy_offset, f.address,
                      f.address + f.code.size()};
        const long got = rl_call_stepped(f.fn, x.a, x.b, x.c, x.d);
        EXPECT_EQ(got, expected) << "moved at run offset " << b.run_offset << " to copy offset " << b.copy_offset;
        moves += g_move.moved;
      }
    }
    return moves;
  }
};

TEST_F(RelocateBoundaries, PlainAndEndbrPrologues) {
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_plain), {{41, 0, 0, 0}}), 3);
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_endbr), {{40, 0, 0, 0}}), 3);
}

TEST_F(RelocateBoundaries, RipRelativeOperands) {
  rl_word = 0x12345;
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_rip_load), {{0, 0, 0, 0}}), 1);
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_rip_cmp), {{0, 0, 0, 0}}), 1);
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_fs_canary), {{0, 0, 0, 0}}), 2);
}

TEST_F(RelocateBoundaries, BranchesTakenAndNot) {
  // test; je; mov: the mov is passed only on the path that does not take je.
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_jcc_out), {{5, 0, 0, 0}, {0, 0, 0, 0}}), 5);
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_jcc_in), {{10, 3, 0, 0}, {1, 3, 0, 0}}), 6);
  // xchg; jrcxz; xchg; add: the second xchg only when rcx != 0.
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_jrcxz_in), {{1, 2, 0, 0}, {1, 2, 0, 9}}), 7);
  // xchg; loop; nop; nop: the nops only when the loop falls through (rcx becomes 0).
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_loop_out), {{10, 0, 0, 1}, {10, 0, 0, 5}}), 6);
  // xchg; jmp; (xchg, never passed); add
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_jmp_in), {{1, 1000, 0, 0}}), 3);
}

TEST_F(RelocateBoundaries, FinalCall) {
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_call_last), {{20, 0, 0, 0}}), 2);
  EXPECT_EQ(check_every_boundary(RL_FIXTURE(rl_call_rsp), {{5, reinterpret_cast<long>(&rl_callee), 0, 0}}), 3);
}

}  // namespace
