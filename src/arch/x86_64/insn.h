// x86-64 encodings tramway writes, and the analysis of the instructions it replaces.
// Decoding goes through Zydis; nothing here runs in a signal handler.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

#include "tramway/status.h"

namespace tramway::arch {

inline constexpr std::uint8_t kInt3 = 0xcc;
inline constexpr std::uint8_t kRet = 0xc3;
inline constexpr std::uint8_t kJmpRel32 = 0xe9;
inline constexpr std::uint8_t kCallRel32 = 0xe8;
inline constexpr std::size_t kRel32InsnSize = 5;

using Insn5 = std::array<std::uint8_t, 5>;

// The 5-byte nop both compilers and the kernel use: nopl 0x0(%rax,%rax,1).
inline constexpr Insn5 kNop5 = {0x0f, 0x1f, 0x44, 0x00, 0x00};
// `ret` padded with int3 (the bytes after it are never executed).
inline constexpr Insn5 kRetPadded = {0xc3, 0xcc, 0xcc, 0xcc, 0xcc};
// `xor eax,eax; ret` padded: a call that returns 0 (zero-extends to rax).
inline constexpr Insn5 kRet0Padded = {0x31, 0xc0, 0xc3, 0xcc, 0xcc};

// True when a rel32 instruction at `from` (5 bytes long) can reach `to`.
bool rel32_reaches(std::uintptr_t from, std::uintptr_t to) noexcept;
// jmp/call rel32 at `from` to `to`; nullopt when out of reach.
std::optional<Insn5> encode_jmp(std::uintptr_t from, std::uintptr_t to) noexcept;
std::optional<Insn5> encode_call(std::uintptr_t from, std::uintptr_t to) noexcept;

// How a thread that trapped on the int3 at a site's head is carried past it.
struct Emulation {
  enum Kind : std::uint8_t { kNop, kJmp, kCall, kRet, kRetZero };
  Kind kind = kNop;
  std::uint8_t length = 0;      // bytes of the emulated instruction (nop: next PC = site+length)
  std::uintptr_t target = 0;    // jmp/call destination
};

// Decodes the first instruction of `bytes`, placed at `address`, into an Emulation. Fails
// (with the instruction's text) for anything but nop, jmp rel8/rel32, call rel32, ret and
// `xor eax,eax; ret`.
Result<Emulation> emulation_for(std::uintptr_t address, std::span<const std::uint8_t> bytes);

// The length of the first instruction of `bytes`, and whether execution can fall through
// it to the next byte; fails if the bytes do not decode.
struct FirstInsn {
  std::size_t length;
  bool falls_through;
};
Result<FirstInsn> first_instruction(std::uintptr_t address, std::span<const std::uint8_t> bytes);

// Zydis' text for the first instruction (for messages and tests).
std::string disassemble(std::uintptr_t address, std::span<const std::uint8_t> bytes);

}  // namespace tramway::arch
