// Detours (sites/hooks/detour.h): a relocated function's entry pad is shaped like a patchable
// entry (literal slot, a 5-byte nop site the hook machinery recognises) followed by a jmp that
// goes home to the run until it is sent to the copy; pad and copy run as the function when
// entered at the site, and every instruction boundary of the run maps into the copy and back.
// Installing the jmp over the run is the batch's part (test_detour_install.cc).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>

#include "arch/x86_64/insn.h"
#include "relocate_fixtures.h"
#include "sites/hooks/detour.h"
#include "sites/hooks/discovery.h"

namespace {

using tramway::sites::hooks::Detour;
namespace sh = tramway::sites::hooks;

const int kCell = 0;  // stands for a site's cell: only its address is written

// A pad for the fixture and a copy whose jmp the pad takes (written by hand: nobody runs it).
struct PadAndCopy {
  std::uintptr_t site = 0;
  Detour d;
};
PadAndCopy detour_of(const rl::Fixture& f) {
  const auto plan = rl::plan_of(f);
  auto site = sh::take_entry_pad(plan.function, &kCell, plan.run_start);
  EXPECT_TRUE(site.ok()) << site.status().message();
  if (!site.ok()) return {};
  auto d = sh::build_detour(std::make_shared<const tramway::arch::RelocationPlan>(plan), *site);
  EXPECT_TRUE(d.ok()) << d.status().message();
  if (!d.ok()) return {};
  return {*site, *d};
}

TEST(Detour, ThePadIsShapedLikeAPatchableEntryAndWithTheCopyRunsAsTheFunction) {
  rl_value = 0x1122334455667788;
  for (const rl::Fixture& f : {RL_FIXTURE(rl_plain), RL_FIXTURE(rl_endbr), RL_FIXTURE(rl_rip_load),
                               RL_FIXTURE(rl_jcc_out), RL_FIXTURE(rl_jcc_in), RL_FIXTURE(rl_call_last)}) {
    const auto [site, d] = detour_of(f);
    ASSERT_NE(site, 0u);
    EXPECT_EQ(site % 16, 8u) << "the literal slot before the site is 16-byte aligned";
    EXPECT_EQ(*reinterpret_cast<const void* const*>(site - 8), &kCell);
    EXPECT_EQ(sh::form_at(site), sh::EntryForm::nop5);
    // The pad's jmp goes home: entered at the site, the pad runs the original function.
    const rl::Insn home = rl::decode_at({reinterpret_cast<const std::uint8_t*>(site + 5), 5}, 0, site + 5);
    EXPECT_EQ(home.insn.mnemonic, ZYDIS_MNEMONIC_JMP);
    EXPECT_EQ(home.target, d.plan->run_start);
    const auto as_function = reinterpret_cast<rl::Fn>(site);
    for (long a : {0L, 1L, -3L, 1000L}) EXPECT_EQ(as_function(a, 2, 3, 4), f.fn(a, 2, 3, 4)) << f.address;
    // Sent to the copy (the batch does this while the function is being hooked), likewise.
    std::uint8_t* rw = tramway::text::writable_alias(reinterpret_cast<const void*>(site + 5));
    ASSERT_NE(rw, nullptr);
    std::memcpy(rw, d.pad_jmp.data(), d.pad_jmp.size());
    for (long a : {0L, 1L, -3L, 1000L}) EXPECT_EQ(as_function(a, 2, 3, 4), f.fn(a, 2, 3, 4)) << f.address;
    tramway::text::free_code(d.block);
  }
}

TEST(Detour, TheJmpReachesTheSiteAndEveryBoundaryMapsIntoTheCopyAndBack) {
  const auto [site, d] = detour_of(RL_FIXTURE(rl_jcc_in));
  ASSERT_NE(site, 0u);
  ASSERT_GE(d.boundaries.size(), 2u);
  const rl::Insn jmp = rl::decode_at(d.jmp, 0, d.plan->run_start);
  EXPECT_EQ(jmp.insn.mnemonic, ZYDIS_MNEMONIC_JMP);
  EXPECT_EQ(jmp.target, site);
  const rl::Insn pad_jmp = rl::decode_at(d.pad_jmp, 0, site + 5);
  EXPECT_EQ(pad_jmp.target, d.copy);
  // The run's first byte is the jmp's (and the int3's): a thread there is not moved.
  EXPECT_FALSE(d.continuation(d.plan->run_start));
  EXPECT_FALSE(d.continuation(d.plan->run_end()));
  for (std::size_t i = 1; i < d.boundaries.size(); ++i) {
    const std::uintptr_t pc = d.plan->run_start + d.boundaries[i].run_offset;
    ASSERT_TRUE(d.continuation(pc)) << i;
    EXPECT_EQ(*d.continuation(pc), d.copy + d.boundaries[i].copy_offset);
    EXPECT_EQ(d.original(*d.continuation(pc)), pc);
    // Inside an instruction is no boundary.
    if (d.boundaries[i].run_offset > d.boundaries[i - 1].run_offset + 1) {
      EXPECT_FALSE(d.continuation(pc - 1));
    }
  }
  EXPECT_EQ(d.original(d.copy), d.plan->run_start);
  // The batch's moves are the continuations, one range per instruction behind the first.
  const auto moves = d.moves();
  ASSERT_EQ(moves.size(), d.boundaries.size() - 1);
  for (const auto& m : moves) {
    EXPECT_EQ(d.continuation(m.begin), m.destination);
    EXPECT_GT(m.end, m.begin);
  }
  EXPECT_EQ(moves.back().end, d.plan->run_end());
  tramway::text::free_code(d.block);
}

}  // namespace
