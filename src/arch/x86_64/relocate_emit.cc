// The run's copy at its detour: each instruction re-encoded by Zydis' encoder where its
// meaning depends on its address (branches, a final call), copied byte for byte where it does
// not, and copied with a new disp32 where only a rip-relative operand depends on it.
//
// Layout: the instructions, a jmp to run_end, then (8-byte aligned) the literals that targets
// out of rel32 reach go through. Every rip-relative displacement is 32 bits whatever its value,
// and whether a target is in reach depends only on the address of the instruction that needs
// it, so the copy is emitted twice with the same lengths: once to learn where the literals and
// the copies of the run's instructions land, once with those addresses. A first pass that
// needed neither (the common case: no literal, no branch to the inside of the run) is final.
#include <Zydis/Zydis.h>

#include <cstring>
#include <string>

#include "arch/x86_64/insn.h"
#include "arch/x86_64/relocate.h"
#include "common/format.h"

namespace tramway::arch {
namespace {

ZydisEncoderRequest request(ZydisMnemonic mnemonic) {
  ZydisEncoderRequest r;
  std::memset(&r, 0, sizeof r);
  r.machine_mode = ZYDIS_MACHINE_MODE_LONG_64;
  r.mnemonic = mnemonic;
  return r;
}

ZydisEncoderRequest near_branch(ZydisEncoderRequest r, std::uintptr_t target, ZydisBranchWidth width) {
  r.branch_type = width == ZYDIS_BRANCH_WIDTH_8 ? ZYDIS_BRANCH_TYPE_SHORT : ZYDIS_BRANCH_TYPE_NEAR;
  r.branch_width = width;
  r.operand_count = 1;
  r.operands[0].type = ZYDIS_OPERAND_TYPE_IMMEDIATE;
  r.operands[0].imm.u = target;
  return r;
}

ZydisEncoderRequest rip_operand(ZydisMnemonic mnemonic, std::uintptr_t address) {
  ZydisEncoderRequest r = request(mnemonic);
  r.operand_count = 1;
  r.operands[0].type = ZYDIS_OPERAND_TYPE_MEMORY;
  r.operands[0].mem.base = ZYDIS_REGISTER_RIP;
  r.operands[0].mem.displacement = static_cast<ZyanI64>(address);
  r.operands[0].mem.size = 8;  // bytes
  return r;
}

// push imm32 sign-extends its immediate to 64 bits.
bool fits_push_imm32(std::uint64_t v) {
  return v <= 0x7fff'ffffu || v >= 0xffff'ffff'8000'0000u;
}

class Emitter {
 public:
  Emitter(const RelocationPlan& plan, std::uintptr_t base) : plan_(plan), base_(base), pool_(base) {
    ZydisDecoderInit(&decoder_, ZYDIS_MACHINE_MODE_LONG_64, ZYDIS_STACK_WIDTH_64);
  }

  // One pass; `previous` (the first pass) gives the literals' and the copies' addresses.
  Result<RelocatedCode> emit(const RelocatedCode* previous);
  // After the first pass: whether a second one is needed (a literal or a copy's offset was guessed).
  bool provisional() const noexcept { return provisional_; }

 private:
  std::uintptr_t here() const { return base_ + out_.size(); }
  std::uintptr_t literal(std::uint64_t value) {
    provisional_ = true;  // where the pool lies is known only after the first pass
    literals_.push_back(value);
    return pool_ + 8 * (literals_.size() - 1);
  }
  // `offset` is the run instruction's, or the run's length for the jmp back.
  Status refuse(std::size_t offset, const std::string& why) const {
    const std::uintptr_t at = plan_.run_start + offset;
    // Appended, not `"`" + std::string&&`: GCC 12 at -O3 reports a bogus -Wrestrict overlap there.
    std::string what = "the jmp back behind the run";
    if (offset < plan_.run_length()) {
      what = "`";
      what += disassemble(at, std::span(plan_.run_bytes).subspan(offset));
      what += "`";
    }
    return Status::error("cannot relocate " + what + " at " + common::hex_address(plan_.function) + "+" +
                         std::to_string(at - plan_.function) + " to the detour at " + common::hex_address(base_) +
                         ": " + why);
  }
  bool decode(std::span<const std::uint8_t> bytes, ZydisDecodedInstruction& insn,
              ZydisDecodedOperand (&ops)[ZYDIS_MAX_OPERAND_COUNT]) const {
    return ZYAN_SUCCESS(ZydisDecoderDecodeFull(&decoder_, bytes.data(), bytes.size(), &insn, ops));
  }
  // Encodes `r` (absolute targets and rip-relative addresses) at here(); false if Zydis cannot.
  bool encode(ZydisEncoderRequest r) {
    std::uint8_t buf[ZYDIS_MAX_INSTRUCTION_LENGTH];
    ZyanUSize n = sizeof buf;
    if (!ZYAN_SUCCESS(ZydisEncoderEncodeInstructionAbsolute(&r, buf, &n, here()))) return false;
    out_.insert(out_.end(), buf, buf + n);
    return true;
  }
  Status encode_or_fail(const ZydisEncoderRequest& r, std::size_t offset, const char* what) {
    if (encode(r)) return {};
    return refuse(offset, std::string("Zydis' encoder cannot encode ") + what);
  }
  std::size_t jmp_length(std::uintptr_t from, std::uintptr_t target) const {
    return rel32_reaches(from, target) ? 5 : 6;
  }
  Status jmp_to(std::uintptr_t target, std::size_t offset);
  Status jcc_to(const ZydisEncoderRequest& decoded, std::uintptr_t target, std::size_t offset);
  Status loop_to(const ZydisEncoderRequest& decoded, std::size_t length, std::uintptr_t target, std::size_t offset);
  Status final_call(const ZydisDecodedInstruction& insn, const ZydisDecodedOperand* ops, std::size_t offset);
  Status rip_relative(const ZydisDecodedInstruction& insn, const ZydisDecodedOperand* ops, std::size_t offset,
                      std::size_t mem_index);

  const RelocationPlan& plan_;
  const std::uintptr_t base_;
  std::uintptr_t pool_;
  const RelocatedCode* previous_ = nullptr;
  ZydisDecoder decoder_;
  std::vector<std::uint8_t> out_;
  std::vector<std::uint64_t> literals_;
  bool provisional_ = false;  // an address this pass used is the first pass' guess
};

Status Emitter::jmp_to(std::uintptr_t target, std::size_t offset) {
  // Written by hand (insn.h), as the sites' jmps are: Zydis' encoder was a visible share of an
  // attach's CPU time for this one instruction every detour ends with.
  if (const auto jmp = encode_jmp(here(), target)) {
    out_.insert(out_.end(), jmp->begin(), jmp->end());
    return {};
  }
  return encode_or_fail(rip_operand(ZYDIS_MNEMONIC_JMP, literal(target)), offset, "jmp [rip+literal]");
}

// jcc rel32, or where the target is out of reach: jcc L1 (rel8); jmp L2 (rel8); L1: jmp [rip+lit]; L2:
Status Emitter::jcc_to(const ZydisEncoderRequest& decoded, std::uintptr_t target, std::size_t offset) {
  if (rel32_reaches(here() + 1, target)) {  // jcc rel32 is 6 bytes long, rel32_reaches counts 5
    return encode_or_fail(near_branch(decoded, target, ZYDIS_BRANCH_WIDTH_32), offset, "the jcc rel32");
  }
  const std::uintptr_t l1 = here() + 4;
  if (Status s = encode_or_fail(near_branch(decoded, l1, ZYDIS_BRANCH_WIDTH_8), offset, "the jcc rel8"); !s.ok()) return s;
  const ZydisEncoderRequest skip = near_branch(request(ZYDIS_MNEMONIC_JMP), l1 + 6, ZYDIS_BRANCH_WIDTH_8);
  if (Status s = encode_or_fail(skip, offset, "a jmp rel8"); !s.ok()) return s;
  return jmp_to(target, offset);
}

// loop, loope, loopne, jrcxz and jecxz exist only with rel8: loop L1; jmp L2 (rel8); L1: jmp target; L2:
Status Emitter::loop_to(const ZydisEncoderRequest& decoded, std::size_t length, std::uintptr_t target,
                        std::size_t offset) {
  const std::uintptr_t l1 = here() + length + 2;
  if (Status s = encode_or_fail(near_branch(decoded, l1, ZYDIS_BRANCH_WIDTH_8), offset, "the rel8 form"); !s.ok()) {
    return s;
  }
  const ZydisEncoderRequest skip =
      near_branch(request(ZYDIS_MNEMONIC_JMP), l1 + jmp_length(l1, target), ZYDIS_BRANCH_WIDTH_8);
  if (Status s = encode_or_fail(skip, offset, "a jmp rel8"); !s.ok()) return s;
  return jmp_to(target, offset);
}

// call X becomes push run_end; jmp X. The callee's return address is then behind the run, as
// it is for the original call, and no return address ever points into the detour.
Status Emitter::final_call(const ZydisDecodedInstruction& insn, const ZydisDecodedOperand* ops, std::size_t offset) {
  const std::uintptr_t ret = plan_.run_end();
  ZydisEncoderRequest push = request(ZYDIS_MNEMONIC_PUSH);
  if (fits_push_imm32(ret)) {
    push.operand_count = 1;
    push.operand_size_hint = ZYDIS_OPERAND_SIZE_HINT_64;
    push.operands[0].type = ZYDIS_OPERAND_TYPE_IMMEDIATE;
    push.operands[0].imm.u = ret;
  } else {
    push = rip_operand(ZYDIS_MNEMONIC_PUSH, literal(ret));  // a PIE's addresses are above 2 GiB
  }
  if (Status s = encode_or_fail(push, offset, "the push of the return address"); !s.ok()) return s;

  const ZydisDecodedOperand& op = ops[0];
  if (op.type == ZYDIS_OPERAND_TYPE_IMMEDIATE) {
    ZyanU64 target = 0;
    ZydisCalcAbsoluteAddress(&insn, &op, plan_.run_start + offset, &target);
    return jmp_to(target, offset);
  }
  // call *reg or call *mem: the same operand, read after the push.
  ZydisEncoderRequest jmp;
  if (!ZYAN_SUCCESS(ZydisEncoderDecodedInstructionToEncoderRequest(&insn, ops, insn.operand_count_visible, &jmp))) {
    return refuse(offset, "Zydis cannot convert it to an encoder request");
  }
  jmp.mnemonic = ZYDIS_MNEMONIC_JMP;
  ZydisEncoderOperand& target = jmp.operands[0];
  if (op.type == ZYDIS_OPERAND_TYPE_REGISTER && op.reg.value == ZYDIS_REGISTER_RSP) {
    return refuse(offset, "calls through rsp, which the push of the return address changes");
  }
  if (op.type == ZYDIS_OPERAND_TYPE_MEMORY) {
    if (op.mem.index == ZYDIS_REGISTER_RSP) return refuse(offset, "indexes with rsp");
    if (op.mem.base == ZYDIS_REGISTER_RSP) target.mem.displacement += 8;  // the push moved rsp
    if (op.mem.base == ZYDIS_REGISTER_RIP) {
      ZyanU64 address = 0;
      ZydisCalcAbsoluteAddress(&insn, &op, plan_.run_start + offset, &address);
      target.mem.displacement = static_cast<ZyanI64>(address);
    }
  }
  if (encode(jmp)) return {};
  return refuse(offset, op.type == ZYDIS_OPERAND_TYPE_MEMORY && op.mem.base == ZYDIS_REGISTER_RIP
                            ? "the function pointer it reads is out of rel32 reach of the detour"
                            : "Zydis' encoder cannot encode the jmp through its operand");
}

// An instruction with a rip-relative operand, moved to here() with the same absolute address.
// Where the new displacement fits, the instruction keeps its encoding and only its disp32
// changes, at the offset the decoder found it (rip-relative addressing always has a 32-bit
// one): nothing is re-encoded, so no encoder can choose another form, prefix or length.
Status Emitter::rip_relative(const ZydisDecodedInstruction& insn, const ZydisDecodedOperand* ops, std::size_t offset,
                             std::size_t mem_index) {
  ZyanU64 address = 0;
  ZydisCalcAbsoluteAddress(&insn, &ops[mem_index], plan_.run_start + offset, &address);
  if (insn.raw.disp.size != 32) return refuse(offset, "has a rip-relative operand without a 32-bit displacement");
  const std::int64_t disp = static_cast<std::int64_t>(address - (here() + insn.length));
  if (disp >= INT32_MIN && disp <= INT32_MAX) {
    const auto bytes = std::span(plan_.run_bytes).subspan(offset, insn.length);
    const std::size_t from = out_.size();
    out_.insert(out_.end(), bytes.begin(), bytes.end());
    const auto disp32 = static_cast<std::int32_t>(disp);
    std::memcpy(out_.data() + from + insn.raw.disp.offset, &disp32, sizeof disp32);
    return {};
  }
  if (insn.mnemonic == ZYDIS_MNEMONIC_LEA && ops[0].type == ZYDIS_OPERAND_TYPE_REGISTER) {
    // lea reg, [rip+x] only computes the address: mov reg, imm gives the same register.
    ZydisEncoderRequest mov = request(ZYDIS_MNEMONIC_MOV);
    mov.operand_count = 2;
    mov.operands[0].type = ZYDIS_OPERAND_TYPE_REGISTER;
    mov.operands[0].reg.value = ops[0].reg.value;
    mov.operands[1].type = ZYDIS_OPERAND_TYPE_IMMEDIATE;
    mov.operands[1].imm.u = ops[0].size == 64 ? address : address & ((std::uint64_t{1} << ops[0].size) - 1);
    return encode_or_fail(mov, offset, "the mov of the address it computes");
  }
  return refuse(offset, "its operand at " + common::hex_address(address) + " is out of rel32 reach of the detour");
}

Result<RelocatedCode> Emitter::emit(const RelocatedCode* previous) {
  previous_ = previous;
  if (previous) pool_ = base_ + ((previous->code_length + 7) & ~std::size_t{7});
  RelocatedCode code;
  for (const RunInstruction& ri : plan_.instructions) {
    code.boundaries.push_back({ri.offset, static_cast<std::uint32_t>(out_.size())});
    const auto bytes = std::span(plan_.run_bytes).subspan(ri.offset, ri.length);
    const std::uintptr_t at = plan_.run_start + ri.offset;
    ZydisDecodedInstruction insn;
    ZydisDecodedOperand ops[ZYDIS_MAX_OPERAND_COUNT];
    if (!decode(bytes, insn, ops)) return refuse(ri.offset, "does not decode");
    Status s;
    if (insn.mnemonic == ZYDIS_MNEMONIC_CALL) {
      if (&ri != &plan_.instructions.back()) return refuse(ri.offset, "is a call before the run's end");
      s = final_call(insn, ops, ri.offset);
    } else if (ops[0].type == ZYDIS_OPERAND_TYPE_IMMEDIATE && ops[0].imm.is_relative) {
      ZyanU64 target = 0;
      ZydisCalcAbsoluteAddress(&insn, &ops[0], at, &target);
      // A branch behind the run's first byte lands on the copy's instruction (the planner
      // refused any other target there); one to the first byte re-enters the function, and
      // through the detour's jmp, the hook, as any other branch to the entry does.
      if (target > plan_.run_start && target < plan_.run_end()) {
        const auto copy = previous_ ? previous_->copy_offset(static_cast<std::uint32_t>(target - plan_.run_start))
                                    : std::optional<std::uint32_t>(0);
        if (!previous_) provisional_ = true;
        if (!copy) return refuse(ri.offset, "branches to the middle of an instruction of the run");
        target = base_ + *copy;
      }
      ZydisEncoderRequest r;
      if (!ZYAN_SUCCESS(ZydisEncoderDecodedInstructionToEncoderRequest(&insn, ops, insn.operand_count_visible, &r))) {
        return refuse(ri.offset, "Zydis cannot convert it to an encoder request");
      }
      switch (insn.mnemonic) {
        case ZYDIS_MNEMONIC_JMP:
          s = jmp_to(target, ri.offset);
          break;
        case ZYDIS_MNEMONIC_LOOP:
        case ZYDIS_MNEMONIC_LOOPE:
        case ZYDIS_MNEMONIC_LOOPNE:
        case ZYDIS_MNEMONIC_JRCXZ:
        case ZYDIS_MNEMONIC_JECXZ:
          s = loop_to(r, insn.length, target, ri.offset);
          break;
        default:
          if (insn.meta.category != ZYDIS_CATEGORY_COND_BR) return refuse(ri.offset, "has a relative target");
          s = jcc_to(r, target, ri.offset);
          break;
      }
    } else {
      std::size_t mem = insn.operand_count_visible;
      for (std::size_t i = 0; i < insn.operand_count_visible; ++i) {
        if (ops[i].type == ZYDIS_OPERAND_TYPE_MEMORY && ops[i].mem.base == ZYDIS_REGISTER_RIP) mem = i;
      }
      if (mem < insn.operand_count_visible) {
        s = rip_relative(insn, ops, ri.offset, mem);
      } else {
        out_.insert(out_.end(), bytes.begin(), bytes.end());  // independent of its address
      }
    }
    if (!s.ok()) return s;
  }
  if (Status s = jmp_to(plan_.run_end(), plan_.run_length()); !s.ok()) return s;
  code.code_length = out_.size();
  if (!literals_.empty()) {
    out_.resize((out_.size() + 7) & ~std::size_t{7}, kInt3);
    for (std::uint64_t v : literals_) {
      const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
      out_.insert(out_.end(), p, p + 8);
    }
  }
  if (previous && (previous->code_length != code.code_length || previous->bytes.size() != out_.size())) {
    return Status::error("relocating the prologue of the function at " + common::hex_address(plan_.function) +
                         ": the copy's layout changed between passes (a tramway bug)");
  }
  code.bytes = std::move(out_);
  return code;
}

}  // namespace

std::optional<std::uint32_t> RelocatedCode::copy_offset(std::uint32_t run_offset) const noexcept {
  for (const Boundary& b : boundaries) {
    if (b.run_offset == run_offset) return b.copy_offset;
  }
  return std::nullopt;
}

std::size_t max_relocated_size(const RelocationPlan& plan) noexcept {
  // Worst cases: a final call through a literal (push [rip] + jmp [rip] + two literals, 28),
  // a far loop (3 + 2 + 6 + 8), the jmp back through a literal (6 + 8) and the alignment (7).
  return plan.instructions.size() * 32 + 24;
}

Result<RelocatedCode> emit_relocated(const RelocationPlan& plan, std::uintptr_t detour_address) {
  Emitter first_pass(plan, detour_address);
  Result<RelocatedCode> first = first_pass.emit(nullptr);
  if (!first.ok() || !first_pass.provisional()) return first;
  return Emitter(plan, detour_address).emit(&*first);
}

}  // namespace tramway::arch
