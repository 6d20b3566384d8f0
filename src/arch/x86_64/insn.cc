#include "arch/x86_64/insn.h"

#include <Zydis/Zydis.h>

#include <cstring>
#include <string>

#include "common/format.h"

namespace tramway::arch {
namespace {

bool decode(std::uintptr_t, std::span<const std::uint8_t> bytes, ZydisDecodedInstruction& insn,
            ZydisDecodedOperand (&ops)[ZYDIS_MAX_OPERAND_COUNT]) {
  ZydisDecoder decoder;
  ZydisDecoderInit(&decoder, ZYDIS_MACHINE_MODE_LONG_64, ZYDIS_STACK_WIDTH_64);
  return ZYAN_SUCCESS(ZydisDecoderDecodeFull(&decoder, bytes.data(), bytes.size(), &insn, ops));
}

std::string hex(std::span<const std::uint8_t> bytes) {
  std::string s;
  char buf[4];
  for (std::size_t i = 0; i < bytes.size() && i < 16; ++i) {
    std::snprintf(buf, sizeof buf, "%s%02x", i ? " " : "", bytes[i]);
    s += buf;
  }
  return s;
}

// The forms tramway writes itself are recognised without Zydis: batches of 10,000 static-key
// branches decode every site twice, and Zydis' full decode dominated that.
bool is_nop5(std::span<const std::uint8_t> b) {
  return b.size() >= 5 && std::memcmp(b.data(), kNop5.data(), 5) == 0;
}
std::int32_t rel32_at(std::span<const std::uint8_t> b) {
  std::int32_t rel;
  std::memcpy(&rel, b.data() + 1, 4);
  return rel;
}

}  // namespace

bool rel32_reaches(std::uintptr_t from, std::uintptr_t to) noexcept {
  const auto delta = static_cast<std::int64_t>(to - (from + kRel32InsnSize));
  return delta >= INT32_MIN && delta <= INT32_MAX;
}

static std::optional<Insn5> encode_rel32(std::uint8_t opcode, std::uintptr_t from, std::uintptr_t to) {
  if (!rel32_reaches(from, to)) return std::nullopt;
  const auto rel = static_cast<std::int32_t>(to - (from + kRel32InsnSize));
  Insn5 out{opcode};
  std::memcpy(&out[1], &rel, 4);
  return out;
}

std::optional<Insn5> encode_jmp(std::uintptr_t from, std::uintptr_t to) noexcept {
  return encode_rel32(kJmpRel32, from, to);
}
std::optional<Insn5> encode_call(std::uintptr_t from, std::uintptr_t to) noexcept {
  return encode_rel32(kCallRel32, from, to);
}

std::string disassemble(std::uintptr_t address, std::span<const std::uint8_t> bytes) {
  ZydisDecodedInstruction insn;
  ZydisDecodedOperand ops[ZYDIS_MAX_OPERAND_COUNT];
  if (!decode(address, bytes, insn, ops)) return "(undecodable: " + hex(bytes) + ")";
  ZydisFormatter formatter;
  ZydisFormatterInit(&formatter, ZYDIS_FORMATTER_STYLE_ATT);
  char text[128];
  if (!ZYAN_SUCCESS(ZydisFormatterFormatInstruction(&formatter, &insn, ops, insn.operand_count_visible,
                                                    text, sizeof text, address, nullptr))) {
    return hex(bytes);
  }
  return text;
}

Result<FirstInsn> first_instruction(std::uintptr_t address, std::span<const std::uint8_t> bytes) {
  if (is_nop5(bytes)) return FirstInsn{5, true};
  if (bytes.size() >= 5 && (bytes[0] == kJmpRel32 || bytes[0] == kCallRel32)) {
    return FirstInsn{5, bytes[0] == kCallRel32};
  }
  if (!bytes.empty() && (bytes[0] == kRet || bytes[0] == kInt3)) return FirstInsn{1, false};
  ZydisDecodedInstruction insn;
  ZydisDecodedOperand ops[ZYDIS_MAX_OPERAND_COUNT];
  if (!decode(address, bytes, insn, ops)) {
    return Status::error("bytes at " + common::hex_address(address) + " do not decode: " + hex(bytes));
  }
  bool falls_through = true;
  switch (insn.mnemonic) {
    case ZYDIS_MNEMONIC_RET:
    case ZYDIS_MNEMONIC_JMP:
    case ZYDIS_MNEMONIC_INT3:
    case ZYDIS_MNEMONIC_UD2:
    case ZYDIS_MNEMONIC_HLT:
      falls_through = false;
      break;
    default:
      break;
  }
  return FirstInsn{insn.length, falls_through};
}

Result<Emulation> emulation_for(std::uintptr_t address, std::span<const std::uint8_t> bytes) {
  if (is_nop5(bytes)) return Emulation{Emulation::kNop, 5, 0};
  if (bytes.size() >= 5 && (bytes[0] == kJmpRel32 || bytes[0] == kCallRel32)) {
    return Emulation{bytes[0] == kJmpRel32 ? Emulation::kJmp : Emulation::kCall, 5,
                     address + 5 + static_cast<std::uintptr_t>(static_cast<std::intptr_t>(rel32_at(bytes)))};
  }
  if (!bytes.empty() && bytes[0] == kRet) return Emulation{Emulation::kRet, 1, 0};
  ZydisDecodedInstruction insn;
  ZydisDecodedOperand ops[ZYDIS_MAX_OPERAND_COUNT];
  if (!decode(address, bytes, insn, ops)) {
    return Status::error("new instruction does not decode: " + hex(bytes));
  }
  Emulation e;
  e.length = insn.length;
  const bool relative_imm = insn.operand_count_visible == 1 && ops[0].type == ZYDIS_OPERAND_TYPE_IMMEDIATE &&
                            ops[0].imm.is_relative;
  switch (insn.mnemonic) {
    case ZYDIS_MNEMONIC_NOP:
      e.kind = Emulation::kNop;
      return e;
    case ZYDIS_MNEMONIC_JMP:
    case ZYDIS_MNEMONIC_CALL:
      if (!relative_imm) break;
      e.kind = insn.mnemonic == ZYDIS_MNEMONIC_JMP ? Emulation::kJmp : Emulation::kCall;
      e.target = address + insn.length + static_cast<std::uintptr_t>(ops[0].imm.value.s);
      return e;
    case ZYDIS_MNEMONIC_RET:
      if (insn.operand_count_visible != 0) break;
      e.kind = Emulation::kRet;
      return e;
    case ZYDIS_MNEMONIC_XOR:
      // Only `xor eax,eax; ret`, the return-zero body of static calls.
      if (bytes.size() >= 3 && bytes[0] == 0x31 && bytes[1] == 0xc0 && bytes[2] == kRet) {
        e.kind = Emulation::kRetZero;
        return e;
      }
      break;
    default:
      break;
  }
  return Status::error("cannot emulate `" + disassemble(address, bytes) +
                       "` during a patch: a new instruction must be a nop, jmp, call rel32, ret or "
                       "`xor eax,eax; ret`");
}

}  // namespace tramway::arch
