// Detours (sites/hooks/detour.h): a relocated function's block is shaped like a patchable entry
// (literal slot, a 5-byte nop site the hook machinery recognises, the relocated run, the jmp
// back), runs as the function when entered at its site, and maps every instruction boundary of
// the run into the copy and back. Installing the jmp over the run is the batch's part.
#include <gtest/gtest.h>

#include "arch/x86_64/insn.h"
#include "relocate_fixtures.h"
#include "sites/hooks/detour.h"
#include "sites/hooks/discovery.h"

namespace {

using tramway::sites::hooks::Detour;

Detour detour_of(const rl::Fixture& f) {
  auto d = tramway::sites::hooks::build_detour(rl::plan_of(f));
  EXPECT_TRUE(d.ok()) << d.status().message();
  return d.ok() ? *d : Detour{};
}

TEST(Detour, IsShapedLikeAPatchableEntryAndRunsAsTheFunction) {
  rl_value = 0x1122334455667788;
  for (const rl::Fixture& f : {RL_FIXTURE(rl_plain), RL_FIXTURE(rl_endbr), RL_FIXTURE(rl_rip_load),
                               RL_FIXTURE(rl_jcc_out), RL_FIXTURE(rl_jcc_in), RL_FIXTURE(rl_call_last)}) {
    const Detour d = detour_of(f);
    ASSERT_NE(d.entry, 0u);
    EXPECT_EQ(d.entry % 16, 8u) << "the literal slot before the site is 16-byte aligned";
    EXPECT_EQ(*reinterpret_cast<const std::uint64_t*>(d.entry - 8), 0u);
    EXPECT_EQ(tramway::sites::hooks::form_at(d.entry), tramway::sites::hooks::EntryForm::nop5);
    EXPECT_EQ(d.copy, d.entry + tramway::arch::kRel32InsnSize);
    const auto as_function = reinterpret_cast<rl::Fn>(d.entry);
    for (long a : {0L, 1L, -3L, 1000L}) EXPECT_EQ(as_function(a, 2, 3, 4), f.fn(a, 2, 3, 4)) << f.address;
    tramway::text::free_code(d.block);
  }
}

TEST(Detour, TheJmpReachesTheSiteAndEveryBoundaryMapsIntoTheCopyAndBack) {
  const Detour d = detour_of(RL_FIXTURE(rl_jcc_in));
  ASSERT_NE(d.entry, 0u);
  ASSERT_GE(d.boundaries.size(), 2u);
  const rl::Insn jmp = rl::decode_at(d.jmp, 0, d.plan.run_start);
  EXPECT_EQ(jmp.insn.mnemonic, ZYDIS_MNEMONIC_JMP);
  EXPECT_EQ(jmp.target, d.entry);
  // The run's first byte is the jmp's (and the int3's): a thread there is not moved.
  EXPECT_FALSE(d.continuation(d.plan.run_start));
  EXPECT_FALSE(d.continuation(d.plan.run_end()));
  for (std::size_t i = 1; i < d.boundaries.size(); ++i) {
    const std::uintptr_t pc = d.plan.run_start + d.boundaries[i].run_offset;
    ASSERT_TRUE(d.continuation(pc)) << i;
    EXPECT_EQ(*d.continuation(pc), d.copy + d.boundaries[i].copy_offset);
    EXPECT_EQ(d.original(*d.continuation(pc)), pc);
    // Inside an instruction is no boundary.
    if (d.boundaries[i].run_offset > d.boundaries[i - 1].run_offset + 1) {
      EXPECT_FALSE(d.continuation(pc - 1));
    }
  }
  EXPECT_EQ(d.original(d.copy), d.plan.run_start);
  tramway::text::free_code(d.block);
}

}  // namespace
