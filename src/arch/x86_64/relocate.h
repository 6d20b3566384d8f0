// The prologue relocator of hooks on any function (DESIGN.md "Hooks on any function"): which
// whole instructions at a function's entry a 5-byte jmp to a detour may overwrite, and their
// copy, rewritten to run at the detour. Pure: it reads the bytes it is given (and, for jump
// tables, the process' own memory through process_vm_readv) and writes nothing; the detour's
// allocation and installation belong to sites/hooks.
//
// Decoding goes through Zydis, re-encoding through Zydis' encoder; instructions that do not
// depend on their address are copied byte for byte, and a rip-relative operand still in reach
// keeps its instruction's bytes with a new disp32 (where the decoder found the old one).
// Nothing here runs in a signal handler.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "tramway/status.h"

namespace tramway::arch {

// A jmp rel32 overwrites this many bytes: the run is the shortest run of whole instructions
// at least this long.
inline constexpr std::size_t kRunMinLength = 5;

// One instruction of the run; offsets from the run's start.
struct RunInstruction {
  std::uint8_t offset = 0;
  std::uint8_t length = 0;
};

struct RelocationPlan {
  std::uintptr_t function = 0;           // the symbol's address
  std::uintptr_t run_start = 0;          // function, or function + 4 behind an endbr64 (which stays)
  std::vector<std::uint8_t> run_bytes;   // the original bytes of the run, all overwritten by the jmp
  std::vector<RunInstruction> instructions;
  // The lowest and highest address the copy must reach with a rel32 displacement: run_end
  // and the data of the run's rip-relative operands (a lea's address can be moved instead,
  // branches can go through literals). A detour within rel32 reach of both keeps every
  // operand; emit_relocated refuses one that is not.
  std::uintptr_t reach_low = 0, reach_high = 0;

  std::size_t run_length() const noexcept { return run_bytes.size(); }
  std::uintptr_t run_end() const noexcept { return run_start + run_bytes.size(); }  // where the copy jumps back
};

// Copies memory of this process at `address` into `out`; false if any of it cannot be read.
// Used to read jump tables, which lie outside the function's bytes.
using ReadMemory = std::function<bool(std::uintptr_t address, std::span<std::uint8_t> out)>;
// process_vm_readv on the own process: an unmapped address gives false, never a fault.
bool read_own_memory(std::uintptr_t address, std::span<std::uint8_t> out);
// The same for many ranges, in as few system calls as process_vm_readv allows (IOV_MAX ranges
// a call): an attach to thousands of functions reads them all before planning any. Returns,
// for each range, whether it was read whole.
struct OwnMemoryRead {
  std::uintptr_t address = 0;
  std::span<std::uint8_t> out;
};
std::vector<bool> read_own_memory_many(std::span<const OwnMemoryRead> reads);

// Decodes the whole function (`code` holds its bytes, the symbol's bounds, as they are at
// `function`) and chooses the run. Refuses, with the instruction's text, offset and reason:
// undecodable bytes anywhere in the function; a function too short for the run; in the run a
// call that is not its last instruction, a syscall, sysenter, int N, int3 or int1, or a
// relative branch other than jmp, jcc, call, loop*, jrcxz/jecxz; anywhere in the function a
// direct branch, a rip-relative address, an absolute immediate or a jump-table entry that
// `read` finds pointing strictly inside the run (behind its first byte), or a rip-relative
// access overlapping the run. The rule for indirect jumps is in relocate.cc. `code` must be
// the function's original bytes: an entry already patched (a jmp or int3) is not one.
Result<RelocationPlan> plan_relocation(std::uintptr_t function, std::span<const std::uint8_t> code,
                                       const ReadMemory& read = read_own_memory);

// The plan of a trap probe (DESIGN "Hooks on any function"): the run is the function's first
// instruction (behind an endbr64), executed out of line behind an int3; the same refusals of
// that instruction, none for the rest of the function (no branch can land inside one
// instruction, and one to its start meets the int3 again).
Result<RelocationPlan> plan_first_instruction(std::uintptr_t function, std::span<const std::uint8_t> code);

// Where a thread at an instruction of the run continues in the copy.
struct Boundary {
  std::uint32_t run_offset = 0;   // from plan.run_start
  std::uint32_t copy_offset = 0;  // from the detour address given to emit_relocated
};

struct RelocatedCode {
  std::vector<std::uint8_t> bytes;   // to be placed at the detour address, nothing else
  std::vector<Boundary> boundaries;  // one per instruction of the run, in order; [0] is {0, 0}
  std::size_t code_length = 0;       // bytes[0, code_length) are instructions, the rest literals

  // The copy offset of the instruction at `run_offset`; nullopt when no instruction starts there.
  std::optional<std::uint32_t> copy_offset(std::uint32_t run_offset) const noexcept;
};

// An upper bound on emit_relocated's output for this plan, whatever the address: the size
// to allocate for the copy before knowing where it will be.
std::size_t max_relocated_size(const RelocationPlan& plan) noexcept;

// The run's instructions rewritten to execute at `detour_address`, then a jmp to run_end:
// rip-relative operands keep their absolute address; jmp/jcc rel8 become rel32, loop/jrcxz
// (rel8 only) go through a rel32 jmp; a branch to the inside of the run lands on the copy's
// instruction; a final call becomes a push of the return address (run_end) and a jmp, so no
// return address points into the detour. A target out of rel32 reach of the detour is reached
// through an 8-byte literal behind the code (jmp [rip+literal]), and so is a return address
// that push imm32 cannot sign-extend to (push [rip+literal]); a rip-relative lea out of reach
// becomes a mov of the address; any other rip-relative operand out of reach is refused.
Result<RelocatedCode> emit_relocated(const RelocationPlan& plan, std::uintptr_t detour_address);

}  // namespace tramway::arch
