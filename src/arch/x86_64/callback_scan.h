// Whether a hook's entry callback provably leaves the vector, x87 and MMX registers alone, so
// that the hook stubs may skip saving xmm0-7 (the hooked function's floating-point arguments)
// around it. Decided once, at attach time, by walking the callback's machine code with Zydis.
// Guarantee: vector_free is true only if every path from the first instruction reaches a plain
// `ret` through GPR-only instructions, without a call, an indirect or patchable jump, or a
// byte that could not be read. Any doubt gives false: the cost is 1.5 ns a call, the cost of a
// wrong "yes" is silently corrupted arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace tramway::arch {

// Limits of the proof: past them the answer is "not vector-free" ("too long to prove").
inline constexpr std::size_t kScanMaxInstructions = 512;
inline constexpr std::size_t kScanMaxSpan = 16 * 1024;  // from the lowest to the highest byte reached

struct CallbackScan {
  bool vector_free = false;
  std::string reason;  // when not: the first reason found, e.g. "calls at 0x...: call 0x..."
  // Whether the code may read rcx, its fourth integer argument: a hook callback's EntryRegs&,
  // whose xmm0-7 the stubs leave unset for a lean callback. A read of rcx, ecx, cx, cl or ch
  // counts unless the path to it wrote every byte it reads first (a write of ecx writes all
  // eight); copies start with such a read. Stays true unless the scan completed.
  bool reads_regs = true;
};

// Scans the live code at `fn`. Reads it with process_vm_readv, a page at a time, so an
// unmapped or unreadable address gives "not vector-free" instead of a fault; fn == 0 too.
CallbackScan scan_callback(std::uintptr_t fn);

// Scans `code` as if placed at `address` (the function's entry); a path that leaves `code`
// is not vector-free. For tests and for code already copied.
CallbackScan scan_callback_bytes(std::uintptr_t address, std::span<const std::uint8_t> code);

}  // namespace tramway::arch
