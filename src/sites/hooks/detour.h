// Detours of hooks on any function (DESIGN.md "Hooks on any function"): where a function
// without a patchable entry is sent once a jmp overwrites the run of instructions at its entry.
// Two pieces, so that no return address ever points into code that is freed:
//
//   entry pad (permanent, one per function ever hooked this way, 32 bytes near it)
//     pad + 0    8-byte literal slot: the site's cell       (as a patchable entry's)
//     pad + 8    5-byte site: nop, or call thunk/slot         (`site`: what the run's jmp goes to)
//     pad + 13   jmp to the copy while hooked; jmp back to the run's start once unhooked
//   copy (a Detour: retired through the tasks flavor)
//     the run, relocated (arch::emit_relocated at this very address), then a jmp behind it
//
// Why the split: a thread inside the hook stub (preempted before it raised its grace-period
// marker, or after it lowered it) holds a return address to the instruction behind the site,
// which is neither a PC the tasks flavor sees nor inside a marker region the trace flavor
// waits for. That return address lies in the pad, which is never freed; when the function is
// unhooked the pad's jmp is turned back to the run's start, whose original bytes are back by
// then, so such a thread runs the original instructions. The copy is entered only through the
// pad's jmp, calls nothing (a final call of the run is a push and a jmp) and is left by its jmp
// back: a thread is inside it exactly while its PC is, which is what a tasks grace period
// observes.
//
// Installing: one batch writes the site, the pad's jmp to the copy and the jmp over the run
// (int3 first; PCs inside the run moved to `continuation`); removing, the pad's jmp home and
// the run's original bytes. The pad's site keeps its call once unhooked: only a thread that
// was already inside the pad can still reach it, and it is turned away as after any detach
// (the cell names no ops; a direct slot's cleared or foreign tag returns untraced), then the
// pad's jmp takes it home. The next hook writes the site anew, or finds it in place.
// Internal; the pads are under the hook tables' lock.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "arch/x86_64/insn.h"
#include "arch/x86_64/relocate.h"
#include "tramway/status.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/signal_router.h"

namespace tramway::sites::hooks {

inline constexpr std::size_t kPadSize = 32;
inline constexpr std::size_t kPadSiteOffset = 8;  // behind the literal slot
inline constexpr std::size_t kPadJmpOffset = kPadSiteOffset + arch::kRel32InsnSize;

// A fresh entry pad within rel32 reach of `function`: its literal slot holds `cell`, its site
// a 5-byte nop and its jmp goes home, to `run_start` (nobody can reach it before a batch
// writes the function's jmp). Returns the site's address. Pads are never freed. Under the hook
// tables' lock.
Result<std::uintptr_t> take_entry_pad(std::uintptr_t function, const void* cell, std::uintptr_t run_start);

struct Detour {
  text::CodeBlock block;     // the copy
  std::shared_ptr<const arch::RelocationPlan> plan;  // the site's (hooks' Site::plan), shared
  std::uintptr_t copy = 0;   // block.rx: the relocated run
  std::vector<arch::Boundary> boundaries;  // copy offsets are from `copy`
  arch::Insn5 jmp{};         // what the batch writes at plan.run_start: jmp rel32 to the pad's site
  arch::Insn5 pad_jmp{};     // what the pad's jmp is while hooked: jmp rel32 to `copy`

  // Where a thread whose PC is `pc` continues once the jmp is in: for a PC at an instruction
  // boundary of the run, the matching instruction of the copy; nullopt for any other PC (the
  // run's first byte included: a thread there takes the jmp, or the int3 in front of it).
  std::optional<std::uintptr_t> continuation(std::uintptr_t pc) const noexcept;
  // The reverse: a PC inside the copy at an instruction boundary maps back to the run's
  // instruction; nullopt elsewhere.
  std::optional<std::uintptr_t> original(std::uintptr_t pc) const noexcept;
  // continuation() as the batch's PC moves: one range per instruction behind the run's first.
  std::vector<text::PcMove> moves() const;
};

// Allocates the copy within rel32 reach of the run, of the data its rip-relative operands name
// and of the pad whose site is `pad_site`, and fills it. Fails with the allocator's or the
// relocator's message.
Result<Detour> build_detour(std::shared_ptr<const arch::RelocationPlan> plan, std::uintptr_t pad_site);

// What the pad's jmp is once the function is unhooked: back to the run's start.
std::optional<arch::Insn5> pad_jmp_home(std::uintptr_t pad_site, std::uintptr_t run_start);

// Frees a copy whose tasks grace period has passed (or hands it to the test hook below).
void free_detour(const text::CodeBlock& copy);

namespace testing {
// Called with each copy whose grace period has passed instead of freeing it, when set: the
// torture poisons it (ud2) and keeps it out of reuse. It owns the block from then on.
void set_detour_freed_hook(void (*hook)(const text::CodeBlock& copy));
}  // namespace testing

}  // namespace tramway::sites::hooks
