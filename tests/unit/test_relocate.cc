// arch/x86_64/relocate.h, the choice of the run: which prologues are relocated and every
// refusal, on the hand-written fixtures of relocate_fixtures.S (and a few byte strings at
// made-up addresses where an encoding cannot be linked into a PIE). Running the copies is
// test_relocate_run.cc's.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "relocate_fixtures.h"

namespace {

using tramway::arch::plan_relocation;
using tramway::arch::RunInstruction;
using Bytes = std::vector<std::uint8_t>;

std::vector<std::pair<int, int>> instructions(const tramway::arch::RelocationPlan& plan) {
  std::vector<std::pair<int, int>> out;
  for (const RunInstruction& i : plan.instructions) out.emplace_back(i.offset, i.length);
  return out;
}

// The refusal of a fixture; its message must contain each of `needles`.
void expect_refused(const rl::Fixture& f, std::initializer_list<std::string> needles,
                    const tramway::arch::ReadMemory& read = tramway::arch::read_own_memory) {
  auto plan = plan_relocation(f.address, f.code, read);
  ASSERT_FALSE(plan.ok()) << "relocated a run of " << plan->run_length() << " bytes";
  for (const std::string& n : needles) {
    EXPECT_NE(plan.status().message().find(n), std::string::npos) << "'" << n << "' not in: " << plan.status().message();
  }
}

std::string at(const rl::Fixture& f, int offset) {
  return tramway::common::hex_address(f.address) + "+" + std::to_string(offset);
}

TEST(RelocatePlan, PlainPrologueIsTheShortestRunOfFiveBytes) {
  const rl::Fixture f = RL_FIXTURE(rl_plain);
  const auto plan = rl::plan_of(f);
  EXPECT_EQ(plan.function, f.address);
  EXPECT_EQ(plan.run_start, f.address);
  EXPECT_EQ(plan.run_length(), 6u);  // push rbp (1), mov rbp,rsp (3), push r15 (2)
  EXPECT_EQ(plan.run_end(), f.address + 6);
  EXPECT_EQ(instructions(plan), (std::vector<std::pair<int, int>>{{0, 1}, {1, 3}, {4, 2}}));
  EXPECT_EQ(plan.run_bytes, Bytes(f.code.begin(), f.code.begin() + 6));
}

TEST(RelocatePlan, Endbr64StaysAndTheRunStartsBehindIt) {
  const rl::Fixture f = RL_FIXTURE(rl_endbr);
  const auto plan = rl::plan_of(f);
  EXPECT_EQ(plan.run_start, f.address + 4);
  EXPECT_EQ(plan.run_length(), 8u);  // push rbx (1), mov rbx,rdi (3), lea rax,[rbx+2] (4)
  EXPECT_EQ(instructions(plan), (std::vector<std::pair<int, int>>{{0, 1}, {1, 3}, {4, 4}}));
  EXPECT_EQ(plan.run_bytes, Bytes(f.code.begin() + 4, f.code.begin() + 12));
}

// The copy must reach run_end and the run's data with rel32 displacements.
TEST(RelocatePlan, ReachSpansTheJumpBackAndTheRunsData) {
  const auto plain = rl::plan_of(RL_FIXTURE(rl_plain));
  EXPECT_EQ(plain.reach_low, plain.run_end());
  EXPECT_EQ(plain.reach_high, plain.run_end());
  const auto load = rl::plan_of(RL_FIXTURE(rl_rip_load));
  const auto value = reinterpret_cast<std::uintptr_t>(&rl_value);
  EXPECT_EQ(load.reach_low, std::min(value, load.run_end()));
  EXPECT_EQ(load.reach_high, std::max(value, load.run_end()));
  const auto lea = rl::plan_of(RL_FIXTURE(rl_rip_lea));  // a lea can become a mov
  EXPECT_EQ(lea.reach_low, lea.run_end());
  EXPECT_EQ(lea.reach_high, lea.run_end());
}

TEST(RelocatePlan, AcceptsEveryRewrittenClass) {
  struct Case {
    rl::Fixture f;
    std::size_t run_length;
  };
  for (const Case& c : {Case{RL_FIXTURE(rl_rip_load), 7}, Case{RL_FIXTURE(rl_rip_lea), 7},
                        Case{RL_FIXTURE(rl_rip_cmp), 10}, Case{RL_FIXTURE(rl_rip_store), 10},
                        Case{RL_FIXTURE(rl_jcc_out), 9}, Case{RL_FIXTURE(rl_jcc_in), 5},
                        Case{RL_FIXTURE(rl_jrcxz_in), 7}, Case{RL_FIXTURE(rl_loop_out), 5},
                        Case{RL_FIXTURE(rl_jmp_in), 7}, Case{RL_FIXTURE(rl_jmp_out), 6},
                        Case{RL_FIXTURE(rl_call_last), 9}, Case{RL_FIXTURE(rl_call_reg), 6},
                        Case{RL_FIXTURE(rl_call_riprel), 10}, Case{RL_FIXTURE(rl_call_rsp), 6},
                        Case{RL_FIXTURE(rl_switch_ok), 6}, Case{RL_FIXTURE(rl_jcc_entry), 5}}) {
    auto plan = plan_relocation(c.f.address, c.f.code);
    ASSERT_TRUE(plan.ok()) << plan.status().message();
    EXPECT_EQ(plan->run_length(), c.run_length) << tramway::arch::disassemble(c.f.address, c.f.code);
  }
}

// ---- refusals --------------------------------------------------------------------------

TEST(RelocateRefuses, CallBeforeTheRunsLastInstruction) {
  const rl::Fixture f = RL_FIXTURE(rl_call_early);
  expect_refused(f, {"call", at(f, 0), "before the run's last instruction", "return address is not a PC"});
}

TEST(RelocateRefuses, SyscallInTheRun) {
  const rl::Fixture f = RL_FIXTURE(rl_syscall);
  expect_refused(f, {"syscall", at(f, 2), "enters the kernel"});
}

TEST(RelocateRefuses, IntNInTheRun) {
  const rl::Fixture f = RL_FIXTURE(rl_int80);
  expect_refused(f, {"int $0x80", at(f, 2), "enters the kernel"});
}

TEST(RelocateRefuses, Int3AtTheEntry) {
  const rl::Fixture f = RL_FIXTURE(rl_int3);
  expect_refused(f, {"int3", at(f, 0), "already patched"});
}

TEST(RelocateRefuses, BranchBehindTheRunIntoIt) {
  const rl::Fixture f = RL_FIXTURE(rl_branch_in);
  expect_refused(f, {"jnz", at(f, 8), "branches to " + tramway::common::hex_address(f.address + 2),
                     "inside the run"});
}

TEST(RelocateRefuses, BranchInTheRunToTheMiddleOfAnInstruction) {
  const rl::Fixture f = RL_FIXTURE(rl_branch_mid);
  expect_refused(f, {"jmp", at(f, 0), "the middle of an instruction"});
}

TEST(RelocateRefuses, LabelAddressInsideTheRun) {
  const rl::Fixture f = RL_FIXTURE(rl_lea_in);
  expect_refused(f, {"lea", at(f, 6), "addresses " + tramway::common::hex_address(f.address + 2)});
}

TEST(RelocateRefuses, FunctionShorterThanTheRun) {
  expect_refused(RL_FIXTURE(rl_short), {"3 bytes long", "too short"});
  expect_refused(RL_FIXTURE(rl_short_endbr), {"7 bytes long", "too short", "behind its endbr64"});
  expect_refused(rl::Fixture{0x1000, {}, nullptr}, {"0 bytes long"});
}

TEST(RelocateRefuses, UndecodableBytesInTheRun) {
  const rl::Fixture f = RL_FIXTURE(rl_undecodable_run);
  expect_refused(f, {"undecodable", at(f, 0), "does not decode"});
}

TEST(RelocateRefuses, UndecodableBytesBehindTheRun) {
  const rl::Fixture f = RL_FIXTURE(rl_undecodable_later);
  expect_refused(f, {at(f, 6), "does not decode", "the whole function must"});
}

TEST(RelocateRefuses, JumpTableEntryInsideTheRun) {
  const rl::Fixture f = RL_FIXTURE(rl_switch_in);
  expect_refused(f, {"entry 1 of the jump table", "targets " + tramway::common::hex_address(f.address + 1)});
}

TEST(RelocatePlan, UnreadableJumpTableIsTakenOnTrust) {
  const rl::Fixture f = RL_FIXTURE(rl_switch_in);
  int reads = 0;
  auto plan = plan_relocation(f.address, f.code, [&](std::uintptr_t, std::span<std::uint8_t>) {
    ++reads;
    return false;
  });
  EXPECT_TRUE(plan.ok()) << plan.status().message();
  EXPECT_EQ(reads, 2);  // the chunk, then its first entry alone
}

// A table at the end of readable memory: read entry by entry up to there.
TEST(RelocateRefuses, JumpTableReadEntryByEntryAtTheEndOfReadableMemory) {
  const rl::Fixture f = RL_FIXTURE(rl_switch_in);
  int single = 0;
  expect_refused(f, {"entry 1 of the jump table"}, [&](std::uintptr_t a, std::span<std::uint8_t> out) {
    if (out.size() > 4) return false;
    ++single;
    return tramway::arch::read_own_memory(a, out);
  });
  EXPECT_EQ(single, 2);
}

// A non-PIC switch, `jmp [table + rax*8]` with absolute entries (it cannot be linked into
// a PIE: placed at a made-up address, its table read through a fake reader).
TEST(RelocateRefuses, AbsoluteJumpTableEntryInsideTheRun) {
  constexpr std::uintptr_t kFn = 0x401000, kTable = 0x402000;
  const Bytes code = {0x53,                                      // 0: push rbx
                      0x89, 0xfb,                                // 1: mov ebx, edi
                      0x83, 0xfb, 0x01,                          // 3: cmp ebx, 1
                      0x77, 0x07,                                // 6: ja 15
                      0xff, 0x24, 0xdd, 0x00, 0x20, 0x40, 0x00,  // 8: jmp [0x402000 + rbx*8]
                      0x31, 0xc0,                                // 15: xor eax, eax
                      0x5b, 0xc3};                               // 17: pop rbx; ret
  auto table_with = [&](std::uint64_t second) {
    return [=](std::uintptr_t address, std::span<std::uint8_t> out) {
      if (address != kTable) return false;
      std::memset(out.data(), 0, out.size());  // zero entries end the table (outside the function)
      const std::uint64_t entries[2] = {kFn + 15, second};
      std::memcpy(out.data(), entries, sizeof entries);
      return true;
    };
  };
  auto ok = plan_relocation(kFn, code, table_with(kFn + 17));
  EXPECT_TRUE(ok.ok()) << ok.status().message();
  auto refused = plan_relocation(kFn, code, table_with(kFn + 3));
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("entry 1 of the jump table at 0x402000 targets 0x401003"),
            std::string::npos)
      << refused.status().message();
}

// An absolute immediate that is an address inside the run (a non-PIC `mov $label, %eax`).
TEST(RelocateRefuses, AbsoluteLabelAddressInsideTheRun) {
  constexpr std::uintptr_t kFn = 0x401000;
  const Bytes code = {0x31, 0xc0,                          // 0: xor eax, eax
                      0x01, 0xf8,                          // 2: add eax, edi
                      0x01, 0xf0,                          // 4: add eax, esi
                      0xb8, 0x02, 0x10, 0x40, 0x00,        // 6: mov eax, 0x401002
                      0xff, 0xe0};                         // 11: jmp rax
  auto plan = plan_relocation(kFn, code);
  ASSERT_FALSE(plan.ok());
  EXPECT_NE(plan.status().message().find("takes the address 0x401002"), std::string::npos) << plan.status().message();
}

// xbegin's target (the abort handler) is relative, but xbegin is no branch the copy can rewrite.
TEST(RelocateRefuses, RelativeOperandOfAnotherKind) {
  const Bytes code = {0xc7, 0xf8, 0x10, 0x00, 0x00, 0x00,  // xbegin +0x10
                      0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
                      0x90, 0xc3};
  auto plan = plan_relocation(0x401000, code);
  ASSERT_FALSE(plan.ok());
  EXPECT_NE(plan.status().message().find("xbegin"), std::string::npos) << plan.status().message();
}

// A run that is fine as bytes, but whose function also contains a call elsewhere: only calls
// in the run matter (a call behind the run returns behind the run).
TEST(RelocatePlan, CallsBehindTheRunAreFine) {
  const Bytes code = {0x55,                          // push rbp
                      0x48, 0x89, 0xe5,              // mov rbp, rsp
                      0x53,                          // push rbx
                      0xe8, 0x00, 0x00, 0x00, 0x00,  // call next
                      0x5b, 0x5d, 0xc3};
  auto plan = plan_relocation(0x401000, code);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  EXPECT_EQ(plan->run_length(), 5u);
}

}  // namespace

// arch::read_own_memory_many: every range read whole is reported so, and one that cannot be read
// (an unmapped page between two readable ranges) is reported alone, the ranges behind it read.
TEST(ReadOwnMemoryMany, ReportsEachRange) {
  const long page = sysconf(_SC_PAGESIZE);
  auto* map = static_cast<std::uint8_t*>(
      mmap(nullptr, static_cast<std::size_t>(3 * page), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(map, MAP_FAILED);
  ASSERT_EQ(munmap(map + page, static_cast<std::size_t>(page)), 0);  // the middle page is gone
  for (int i = 0; i < 16; ++i) {
    map[i] = static_cast<std::uint8_t>(i + 1);
    map[2 * page + i] = static_cast<std::uint8_t>(i + 101);
  }
  std::array<std::uint8_t, 16> a{}, b{}, c{}, d{};
  const auto addr = [&](long offset) { return reinterpret_cast<std::uintptr_t>(map + offset); };
  const std::vector<tramway::arch::OwnMemoryRead> reads = {
      {addr(0), a}, {addr(page), b}, {addr(2 * page), c}, {addr(page - 8), d}};  // d straddles the hole
  const std::vector<bool> ok = tramway::arch::read_own_memory_many(reads);
  EXPECT_EQ(ok, (std::vector<bool>{true, false, true, false}));
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(a[i], i + 1);
    EXPECT_EQ(c[i], i + 101);
  }
  // More ranges than one system call takes (IOV_MAX): all read.
  std::vector<std::array<std::uint8_t, 1>> bytes(3000);
  std::vector<tramway::arch::OwnMemoryRead> many;
  for (std::size_t i = 0; i < bytes.size(); ++i) many.push_back({addr(static_cast<long>(i % 16)), bytes[i]});
  const std::vector<bool> all = tramway::arch::read_own_memory_many(many);
  EXPECT_EQ(std::count(all.begin(), all.end(), true), 3000);
  for (std::size_t i = 0; i < bytes.size(); ++i) EXPECT_EQ(bytes[i][0], i % 16 + 1);
  munmap(map, static_cast<std::size_t>(page));
  munmap(map + 2 * page, static_cast<std::size_t>(page));
}
