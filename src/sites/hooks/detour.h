// Detours of hooks on any function (DESIGN.md "Hooks on any function"): the block of generated
// code a function without a patchable entry is sent to, shaped like a patchable entry so that
// cells, modes, direct slots, counters and exit hooks work on it unchanged:
//
//   block + 0   8-byte literal slot   (16-byte aligned, as a patchable entry's)
//   block + 8   5-byte nop: the site  (`entry`: what the jmp at the function's run goes to)
//   block + 13  the run, relocated    (arch::emit_relocated at this very address)
//               jmp back behind the run, then the copy's literals
//
// Building writes only the block: the function is untouched until a batch writes `jmp` over
// its run (int3 first, PCs inside the run moved to `continuation`). A thread may be anywhere in
// a detour — preempted, or interrupted by a signal — with no marker raised, so a detour is
// freed only after a tasks-flavor grace period over its block (grace::retire). Internal.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "arch/x86_64/insn.h"
#include "arch/x86_64/relocate.h"
#include "tramway/status.h"
#include "tramway/text/code_memory.h"

namespace tramway::sites::hooks {

inline constexpr std::size_t kDetourSiteOffset = 8;  // the literal slot comes first
inline constexpr std::size_t kDetourCopyOffset = kDetourSiteOffset + arch::kRel32InsnSize;

struct Detour {
  text::CodeBlock block;
  arch::RelocationPlan plan;
  std::uintptr_t entry = 0;  // the site, block + 8: a patchable entry holding a 5-byte nop
  std::uintptr_t copy = 0;   // the relocated run, block + 13
  std::vector<arch::Boundary> boundaries;  // copy offsets are from `copy`
  arch::Insn5 jmp{};         // what the batch writes at plan.run_start: jmp rel32 to `entry`

  // Where a thread whose PC is `pc` continues once the jmp is in: for a PC at an instruction
  // boundary of the run, the matching instruction of the copy; nullopt for any other PC (the
  // run's first byte included: a thread there takes the jmp, or the int3 in front of it).
  std::optional<std::uintptr_t> continuation(std::uintptr_t pc) const noexcept;
  // The reverse, for removal: a PC inside the copy at an instruction boundary maps back to the
  // run's instruction (the original bytes are back by then); nullopt elsewhere.
  std::optional<std::uintptr_t> original(std::uintptr_t pc) const noexcept;
};

// Allocates a block within rel32 reach of the run (and of the data the run's rip-relative
// operands name) and fills it. Fails with the allocator's or the relocator's message.
Result<Detour> build_detour(arch::RelocationPlan plan);

}  // namespace tramway::sites::hooks
