#include "arch/x86_64/callback_scan.h"

#include <sys/uio.h>
#include <unistd.h>

#include <Zydis/Zydis.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "arch/x86_64/insn.h"
#include "common/format.h"

namespace tramway::arch {
namespace {

// Copies the code at `at` into `out`, as much as can be read; returns how many bytes that was
// (fewer at the end of the code or of readable memory, 0 if `at` itself is not readable).
using FetchCode = std::function<std::size_t(std::uintptr_t at, std::span<std::uint8_t> out)>;

CallbackScan refuse(const std::string& why, std::uintptr_t at, std::span<const std::uint8_t> bytes) {
  return {false, why + " at " + common::hex_address(at) + ": " + disassemble(at, bytes)};
}

// Registers that are neither vector, x87 nor MMX state (the stub saves all GPRs and flags).
bool plain_register(ZydisRegister r) {
  switch (ZydisRegisterGetClass(r)) {
    case ZYDIS_REGCLASS_GPR8:
    case ZYDIS_REGCLASS_GPR16:
    case ZYDIS_REGCLASS_GPR32:
    case ZYDIS_REGCLASS_GPR64:
    case ZYDIS_REGCLASS_FLAGS:
    case ZYDIS_REGCLASS_IP:
    case ZYDIS_REGCLASS_SEGMENT:
      return true;
    default:
      return false;  // x87, MMX, XMM/YMM/ZMM, TMM, mask, bound, and the unclassed (mxcsr, x87status, xcr0)
  }
}

bool address_register(ZydisRegister r) {
  if (r == ZYDIS_REGISTER_NONE) return true;
  const ZydisRegisterClass c = ZydisRegisterGetClass(r);
  return c == ZYDIS_REGCLASS_GPR32 || c == ZYDIS_REGCLASS_GPR64 || c == ZYDIS_REGCLASS_IP;
}

// Extensions whose instructions touch no vector, x87 or MMX state beyond what their operands
// name (the operands are checked too). An instruction such as fxsave or xsave touches vector
// registers it does not list, so extensions are allowed, never merely tolerated.
bool allowed_extension(const ZydisDecodedInstruction& insn) {
  switch (insn.meta.isa_ext) {
    case ZYDIS_ISA_EXT_BASE:      // includes cmov
    case ZYDIS_ISA_EXT_LONGMODE:
    case ZYDIS_ISA_EXT_BMI1:
    case ZYDIS_ISA_EXT_BMI2:
    case ZYDIS_ISA_EXT_LZCNT:
    case ZYDIS_ISA_EXT_RDTSCP:
    case ZYDIS_ISA_EXT_RDPID:
    case ZYDIS_ISA_EXT_CET:
    case ZYDIS_ISA_EXT_PAUSE:
    case ZYDIS_ISA_EXT_CLFLUSHOPT:
    case ZYDIS_ISA_EXT_CLWB:
      return true;
    default:
      break;
  }
  // Filed under SSE/SSE2/SSE4/3DNow! by Zydis, but they touch no register (popcnt: GPRs only).
  switch (insn.mnemonic) {
    case ZYDIS_MNEMONIC_MFENCE:
    case ZYDIS_MNEMONIC_LFENCE:
    case ZYDIS_MNEMONIC_SFENCE:
    case ZYDIS_MNEMONIC_PREFETCHT0:
    case ZYDIS_MNEMONIC_PREFETCHT1:
    case ZYDIS_MNEMONIC_PREFETCHT2:
    case ZYDIS_MNEMONIC_PREFETCHNTA:
    case ZYDIS_MNEMONIC_PREFETCHW:
    case ZYDIS_MNEMONIC_POPCNT:
      return true;
    default:
      return false;
  }
}

// Where execution goes after an instruction, or why the scan cannot follow it.
struct Flow {
  enum Kind : std::uint8_t { kNext, kReturn, kJump, kBranch } kind = kNext;  // kBranch: target and next
  std::uintptr_t target = 0;
  const char* refusal = nullptr;
};

Flow flow_of(const ZydisDecodedInstruction& insn, const ZydisDecodedOperand* ops, std::uintptr_t at) {
  // A 66 prefix makes AMD truncate a near branch's target (and ret's pop) to 16 bits.
  const bool opsize = (insn.attributes & ZYDIS_ATTRIB_HAS_OPERANDSIZE) != 0;
  const bool relative = insn.operand_count_visible >= 1 && ops[0].type == ZYDIS_OPERAND_TYPE_IMMEDIATE &&
                        ops[0].imm.is_relative;
  const bool far = insn.meta.branch_type == ZYDIS_BRANCH_TYPE_FAR;
  Flow f;
  switch (insn.mnemonic) {
    case ZYDIS_MNEMONIC_CALL:
      f.refusal = "calls";
      return f;
    case ZYDIS_MNEMONIC_RET:
      if (far) f.refusal = "returns far";
      else if (insn.operand_count_visible != 0) f.refusal = "returns with an immediate";
      else if (opsize) f.refusal = "returns with an operand-size prefix";
      f.kind = Flow::kReturn;
      return f;
    case ZYDIS_MNEMONIC_JMP:
      if (far || !relative) f.refusal = "jumps indirectly";
      // A static-key site is a jmp rel32 that may become a nop: that path was never checked.
      else if (insn.opcode == 0xe9) f.refusal = "jumps rel32 (may be a patch site)";
      else if (opsize || insn.opcode != 0xeb) f.refusal = "jumps in an unexpected form";
      f.kind = Flow::kJump;
      break;
    case ZYDIS_MNEMONIC_UD0:
    case ZYDIS_MNEMONIC_UD1:
    case ZYDIS_MNEMONIC_UD2:
    case ZYDIS_MNEMONIC_HLT:
      f.refusal = "does not continue";
      return f;
    default:
      // jcc, loop and jrcxz: both ways. xbegin/xend are filed as conditional branches too.
      if (insn.meta.category == ZYDIS_CATEGORY_COND_BR && insn.meta.isa_ext == ZYDIS_ISA_EXT_BASE && relative &&
          !far) {
        if (opsize) f.refusal = "branches with an operand-size prefix";
        f.kind = Flow::kBranch;
        break;
      }
      // Anything else that changes rip (int3, int N, iret, syscall, sysenter, xbegin, xend, ...).
      switch (insn.meta.category) {
        case ZYDIS_CATEGORY_CALL:
        case ZYDIS_CATEGORY_RET:
        case ZYDIS_CATEGORY_COND_BR:
        case ZYDIS_CATEGORY_UNCOND_BR:
        case ZYDIS_CATEGORY_INTERRUPT:
        case ZYDIS_CATEGORY_SYSCALL:
        case ZYDIS_CATEGORY_SYSRET:
          f.refusal = "changes control flow";
          return f;
        default:
          break;
      }
      for (std::size_t i = 0; i < insn.operand_count; ++i) {
        if (ops[i].type == ZYDIS_OPERAND_TYPE_REGISTER && ZydisRegisterGetClass(ops[i].reg.value) == ZYDIS_REGCLASS_IP &&
            (ops[i].actions & ZYDIS_OPERAND_ACTION_MASK_WRITE)) {
          f.refusal = "changes control flow";
          return f;
        }
      }
      if (insn.meta.branch_type != ZYDIS_BRANCH_TYPE_NONE) f.refusal = "changes control flow";
      return f;
  }
  ZyanU64 target = 0;
  if (!f.refusal && !ZYAN_SUCCESS(ZydisCalcAbsoluteAddress(&insn, &ops[0], at, &target))) {
    f.refusal = "branches to an unknown target";
  }
  f.target = static_cast<std::uintptr_t>(target);
  return f;
}

// The first register an instruction uses that is not plain (with its text), or "".
std::string vector_operand(const ZydisDecodedInstruction& insn, const ZydisDecodedOperand* ops) {
  for (std::size_t i = 0; i < insn.operand_count; ++i) {
    const ZydisDecodedOperand& op = ops[i];
    switch (op.type) {
      case ZYDIS_OPERAND_TYPE_REGISTER:
        if (!plain_register(op.reg.value)) return ZydisRegisterGetString(op.reg.value);
        break;
      case ZYDIS_OPERAND_TYPE_MEMORY:
        // Plain memory or lea; VSIB (vector index) and MIB (MPX) are not.
        if (op.mem.type != ZYDIS_MEMOP_TYPE_MEM && op.mem.type != ZYDIS_MEMOP_TYPE_AGEN) return "a vector address";
        if (!address_register(op.mem.base)) return ZydisRegisterGetString(op.mem.base);
        if (!address_register(op.mem.index)) return ZydisRegisterGetString(op.mem.index);
        break;
      case ZYDIS_OPERAND_TYPE_IMMEDIATE:
      case ZYDIS_OPERAND_TYPE_UNUSED:
        break;
      default:
        return "a far pointer";
    }
  }
  return {};
}

// The bytes of rcx a register is (bit i: byte i), 0 for other registers.
std::uint8_t rcx_bytes(ZydisRegister r) {
  switch (r) {
    case ZYDIS_REGISTER_CL: return 0x01;
    case ZYDIS_REGISTER_CH: return 0x02;
    case ZYDIS_REGISTER_CX: return 0x03;
    case ZYDIS_REGISTER_ECX: return 0x0f;
    case ZYDIS_REGISTER_RCX: return 0xff;
    default: return 0;
  }
}

// Whether the instruction reads a byte of rcx that is not in `defined` (bytes every path here
// wrote already): a byte of the EntryRegs argument.
bool reads_rcx(const ZydisDecodedInstruction& insn, const ZydisDecodedOperand* ops, std::uint8_t defined) {
  for (std::size_t i = 0; i < insn.operand_count; ++i) {
    const ZydisDecodedOperand& op = ops[i];
    if (op.type == ZYDIS_OPERAND_TYPE_REGISTER && (op.actions & ZYDIS_OPERAND_ACTION_MASK_READ) &&
        (rcx_bytes(op.reg.value) & ~defined)) {
      return true;
    }
    if (op.type == ZYDIS_OPERAND_TYPE_MEMORY &&
        ((rcx_bytes(op.mem.base) & ~defined) || (rcx_bytes(op.mem.index) & ~defined))) {
      return true;
    }
  }
  return false;
}

// The bytes of rcx the instruction surely writes (a write of ecx zero-extends the rest; a
// conditional write counts for nothing), added to `defined`.
std::uint8_t define_rcx(const ZydisDecodedInstruction& insn, const ZydisDecodedOperand* ops, std::uint8_t defined) {
  for (std::size_t i = 0; i < insn.operand_count; ++i) {
    const ZydisDecodedOperand& op = ops[i];
    if (op.type == ZYDIS_OPERAND_TYPE_REGISTER && (op.actions & ZYDIS_OPERAND_ACTION_WRITE)) {
      defined |= op.reg.value == ZYDIS_REGISTER_ECX ? std::uint8_t{0xff} : rcx_bytes(op.reg.value);
    }
  }
  return defined;
}

bool is_nop5(std::span<const std::uint8_t> insn) {
  return insn.size() == kNop5.size() && std::equal(insn.begin(), insn.end(), kNop5.begin());
}

// The worklist shared by both entry points.
CallbackScan walk(std::uintptr_t fn, const FetchCode& fetch) {
  ZydisDecoder decoder;
  ZydisDecoderInit(&decoder, ZYDIS_MACHINE_MODE_LONG_64, ZYDIS_STACK_WIDTH_64);
  // An instruction start, and the bytes of rcx (the EntryRegs argument) that the path to it
  // has written already: the same start is walked once for each.
  struct Point {
    std::uintptr_t at;
    std::uint8_t rcx_defined;
  };
  std::vector<Point> work{{fn, 0}};
  std::unordered_set<std::uintptr_t> seen;  // (start << 8 | rcx_defined); a jump into the middle of one decodes anew
  std::uintptr_t lo = fn, hi = fn;
  bool rcx_read = false;
  while (!work.empty()) {
    const auto [at, rcx_defined_before] = work.back();
    work.pop_back();
    if (!seen.insert(at << 8 | rcx_defined_before).second) continue;
    if (seen.size() > kScanMaxInstructions) {
      return {false, "too long to prove: more than " + std::to_string(kScanMaxInstructions) +
                         " instructions reachable (at " + common::hex_address(at) + ")"};
    }
    std::array<std::uint8_t, ZYDIS_MAX_INSTRUCTION_LENGTH> buf;
    const std::size_t n = fetch(at, buf);
    ZydisDecodedInstruction insn;
    ZydisDecodedOperand ops[ZYDIS_MAX_OPERAND_COUNT];
    const ZyanStatus st = n == 0 ? ZYDIS_STATUS_NO_MORE_DATA : ZydisDecoderDecodeFull(&decoder, buf.data(), n, &insn, ops);
    if (st == ZYDIS_STATUS_NO_MORE_DATA) {
      return {false, "leaves the readable code at " + common::hex_address(at + n)};
    }
    if (!ZYAN_SUCCESS(st)) return refuse("does not decode", at, std::span(buf.data(), n));
    const std::span<const std::uint8_t> bytes(buf.data(), insn.length);

    lo = std::min(lo, at);
    hi = std::max(hi, at + insn.length);
    if (hi - lo > kScanMaxSpan) {
      return refuse("too long to prove: the code reached spans more than " + std::to_string(kScanMaxSpan / 1024) +
                        " KiB",
                    at, bytes);
    }

    const Flow flow = flow_of(insn, ops, at);
    if (flow.refusal) return refuse(flow.refusal, at, bytes);
    // A 5-byte nop may be a static-key site, whose jmp form leads to code never checked —
    // even at the entry, where a leaf's first branch can sit. (A patchable entry of Clang's
    // is one too, so such callbacks are refused; GCC's five 1-byte nops are not.)
    if (is_nop5(bytes)) {
      return refuse("has a 5-byte nop (may be a patch site)", at, bytes);
    }
    if (!allowed_extension(insn)) {
      return refuse(std::string("uses ") + ZydisISAExtGetString(insn.meta.isa_ext) + " instructions", at, bytes);
    }
    if (const std::string reg = vector_operand(insn, ops); !reg.empty()) return refuse("uses " + reg, at, bytes);
    rcx_read = rcx_read || reads_rcx(insn, ops, rcx_defined_before);
    const std::uint8_t rcx_defined = define_rcx(insn, ops, rcx_defined_before);

    switch (flow.kind) {
      case Flow::kNext:
        work.push_back({at + insn.length, rcx_defined});
        break;
      case Flow::kReturn:
        break;
      case Flow::kJump:
        work.push_back({flow.target, rcx_defined});
        break;
      case Flow::kBranch:
        work.push_back({flow.target, rcx_defined});
        work.push_back({at + insn.length, rcx_defined});
        break;
    }
  }
  return {true, {}, rcx_read};
}

// The live code, read a page at a time through process_vm_readv (which fails with EFAULT
// instead of faulting on an unmapped or unreadable page); each page is read once.
class LiveCode {
 public:
  std::size_t fetch(std::uintptr_t at, std::span<std::uint8_t> out) {
    std::size_t n = 0;
    while (n < out.size()) {
      const std::uintptr_t a = at + n;
      const std::uint8_t* page = page_at(a - a % page_size_);
      if (!page) break;
      const std::size_t k = std::min(out.size() - n, page_size_ - a % page_size_);
      std::memcpy(out.data() + n, page + a % page_size_, k);
      n += k;
    }
    return n;
  }

 private:
  const std::uint8_t* page_at(std::uintptr_t base) {
    auto [it, fresh] = pages_.try_emplace(base);
    std::vector<std::uint8_t>& page = it->second;  // empty: unreadable
    if (fresh) {
      page.resize(page_size_);
      iovec local{page.data(), page_size_};
      iovec remote{reinterpret_cast<void*>(base), page_size_};
      if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != static_cast<ssize_t>(page_size_)) page.clear();
    }
    return page.empty() ? nullptr : page.data();
  }

  const std::size_t page_size_ = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  std::unordered_map<std::uintptr_t, std::vector<std::uint8_t>> pages_;
};

}  // namespace

CallbackScan scan_callback(std::uintptr_t fn) {
  if (fn == 0) return {false, "no function (address 0)"};
  LiveCode code;
  return walk(fn, [&](std::uintptr_t at, std::span<std::uint8_t> out) { return code.fetch(at, out); });
}

CallbackScan scan_callback_bytes(std::uintptr_t address, std::span<const std::uint8_t> code) {
  return walk(address, [&](std::uintptr_t at, std::span<std::uint8_t> out) -> std::size_t {
    if (at < address || at - address >= code.size()) return 0;
    const std::size_t n = std::min(out.size(), code.size() - (at - address));
    std::memcpy(out.data(), code.data() + (at - address), n);
    return n;
  });
}

}  // namespace tramway::arch
