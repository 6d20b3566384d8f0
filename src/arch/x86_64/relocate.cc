// Choosing the run: decode the whole function and refuse what a relocated prologue would break.
//
// Indirect jumps. A direct branch names its target, an indirect one does not. The rule relied
// on: compiled code jumps indirectly only (a) to a function's entry (a tail call through a
// pointer: at most the run's first byte, never behind it), (b) to a label of its own function
// whose address it materialises, which it can only do with a rip-relative lea or an absolute
// immediate (every one is checked against the run), or (c) through a jump table, which holds
// int32 offsets from the table's own address (PIC: the table is what a rip-relative lea in
// the function loads) or absolute 8-byte addresses (non-PIC: the displacement of a
// `[table + index*8]` operand). Where the function has an indirect jmp, every such candidate
// table is read through `read` for as long as its entries land inside the function (a lea
// of anything else reads as a "table" whose first entry leaves the function), and an entry
// behind the run's first byte refuses the function. The case this matters for is real: a
// loop whose header is the run's second instruction (`push rbx; L: call next; ...; jmp
// *table`) with a case threaded straight back to L. A table that cannot be read is taken on
// trust: a loaded object's tables are in its mapped .rodata, so a failed read means the lea
// did not load one.
#include "arch/x86_64/relocate.h"

#include <limits.h>
#include <sys/uio.h>
#include <unistd.h>

#include <Zydis/Zydis.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>

#include "arch/x86_64/insn.h"
#include "common/format.h"

namespace tramway::arch {
namespace {

// How far a candidate jump table is read: a switch of more cases than this is not a prologue's
// concern (its cases are far behind the entry), and reading stops at the first foreign entry.
constexpr std::size_t kMaxTableEntries = 4096;
constexpr std::size_t kTableChunk = 64;

struct Decoded {
  ZydisDecodedInstruction insn;
  ZydisDecodedOperand ops[ZYDIS_MAX_OPERAND_COUNT];
};

class Planner {
 public:
  // `min_run`: kRunMinLength for a detour; 1 for a trap probe's single displaced instruction,
  // where nothing else of the function matters (a branch to the entry meets the int3 again).
  Planner(std::uintptr_t function, std::span<const std::uint8_t> code, const ReadMemory& read,
          std::size_t min_run = kRunMinLength)
      : function_(function), code_(code), read_(read), min_run_(min_run) {
    ZydisDecoderInit(&decoder_, ZYDIS_MACHINE_MODE_LONG_64, ZYDIS_STACK_WIDTH_64);
  }

  Result<RelocationPlan> plan();

 private:
  std::uintptr_t at(std::size_t offset) const { return function_ + offset; }
  std::string where(std::size_t offset) const {
    // Appended, not `"`" + std::string&&`: GCC 12 at -O3 reports a bogus -Wrestrict overlap there.
    std::string s = "`";
    s += disassemble(at(offset), code_.subspan(offset));
    s += "` at " + function_text() + "+" + std::to_string(offset);
    return s;
  }
  std::string function_text() const { return common::hex_address(function_); }
  Status refuse(std::size_t offset, const std::string& why) const {
    return Status::error("cannot relocate the prologue of the function at " + function_text() + ": " +
                         where(offset) + " " + why);
  }
  // Strictly inside the run: behind its first byte, before its end.
  bool inside_run(std::uintptr_t a) const { return a > run_start_ && a < run_end_; }
  bool in_function(std::uintptr_t a) const { return a >= function_ && a < function_ + code_.size(); }

  bool decode(std::size_t offset, Decoded& d) const {
    return ZYAN_SUCCESS(ZydisDecoderDecodeFull(&decoder_, code_.data() + offset, code_.size() - offset,
                                               &d.insn, d.ops));
  }
  Status check_run_instruction(std::size_t offset, const Decoded& d, bool last) const;
  Status check_references(std::size_t offset, const Decoded& d, bool in_run);
  Status check_jump_tables() const;
  Status check_table(std::uintptr_t table, std::size_t entry_size) const;

  std::uintptr_t function_;
  std::span<const std::uint8_t> code_;
  const ReadMemory& read_;
  std::size_t min_run_;
  ZydisDecoder decoder_;
  std::uintptr_t run_start_ = 0, run_end_ = 0;
  std::vector<std::uint8_t> boundary_;  // 1 at each instruction start of the run (by run offset)
  bool indirect_jump_ = false;
  std::vector<std::uintptr_t> relative_tables_, absolute_tables_;
};

// The relative branches the copy rewrites (xbegin's relative abort address is not one of them).
bool relocatable_branch(ZydisMnemonic m) {
  switch (m) {
    case ZYDIS_MNEMONIC_JMP:
    case ZYDIS_MNEMONIC_CALL:
    case ZYDIS_MNEMONIC_LOOP:
    case ZYDIS_MNEMONIC_LOOPE:
    case ZYDIS_MNEMONIC_LOOPNE:
    case ZYDIS_MNEMONIC_JRCXZ:
    case ZYDIS_MNEMONIC_JECXZ:
    case ZYDIS_MNEMONIC_JB:
    case ZYDIS_MNEMONIC_JBE:
    case ZYDIS_MNEMONIC_JL:
    case ZYDIS_MNEMONIC_JLE:
    case ZYDIS_MNEMONIC_JNB:
    case ZYDIS_MNEMONIC_JNBE:
    case ZYDIS_MNEMONIC_JNL:
    case ZYDIS_MNEMONIC_JNLE:
    case ZYDIS_MNEMONIC_JNO:
    case ZYDIS_MNEMONIC_JNP:
    case ZYDIS_MNEMONIC_JNS:
    case ZYDIS_MNEMONIC_JNZ:
    case ZYDIS_MNEMONIC_JO:
    case ZYDIS_MNEMONIC_JP:
    case ZYDIS_MNEMONIC_JS:
    case ZYDIS_MNEMONIC_JZ:
      return true;
    default:
      return false;
  }
}

Status Planner::check_run_instruction(std::size_t offset, const Decoded& d, bool last) const {
  const ZydisDecodedInstruction& insn = d.insn;
  switch (insn.mnemonic) {
    case ZYDIS_MNEMONIC_SYSCALL:
    case ZYDIS_MNEMONIC_SYSENTER:
    case ZYDIS_MNEMONIC_INT:
      // A thread blocked there has its PC behind the instruction, and a restarted system call
      // backs it up onto the instruction: both can lie in the overwritten bytes.
      return refuse(offset, "enters the kernel: a thread blocked or restarted there would resume in the "
                            "overwritten bytes");
    case ZYDIS_MNEMONIC_INT3:
    case ZYDIS_MNEMONIC_INT1:
    case ZYDIS_MNEMONIC_INTO:
      return refuse(offset, "traps: the entry is already patched by a debugger or probe, or is not code");
    case ZYDIS_MNEMONIC_CALL:
      if (!last) {
        return refuse(offset, "is a call before the run's last instruction: a thread in the callee would "
                              "return into the overwritten bytes (a return address is not a PC)");
      }
      break;
    default:
      break;
  }
  for (std::size_t i = 0; i < insn.operand_count; ++i) {
    if (d.ops[i].type == ZYDIS_OPERAND_TYPE_IMMEDIATE && d.ops[i].imm.is_relative &&
        !(i == 0 && relocatable_branch(insn.mnemonic))) {
      return refuse(offset, "has a relative target, and only a jmp, jcc, call, loop or jrcxz can be relocated");
    }
  }
  return {};
}

// Direct branch targets, rip-relative addresses and absolute immediates of any instruction
// that point strictly inside the run. Inside the run, branches to its own instruction starts
// are relocated into the copy.
Status Planner::check_references(std::size_t offset, const Decoded& d, bool in_run) {
  const ZydisDecodedInstruction& insn = d.insn;
  if (insn.meta.category == ZYDIS_CATEGORY_UNCOND_BR && d.ops[0].type != ZYDIS_OPERAND_TYPE_IMMEDIATE) {
    indirect_jump_ = true;
  }
  for (std::size_t i = 0; i < insn.operand_count; ++i) {
    const ZydisDecodedOperand& op = d.ops[i];
    if (op.type == ZYDIS_OPERAND_TYPE_IMMEDIATE && op.imm.is_relative) {
      ZyanU64 target = 0;
      ZydisCalcAbsoluteAddress(&insn, &op, at(offset), &target);
      if (!inside_run(target)) continue;
      if (in_run && boundary_[target - run_start_]) continue;
      return refuse(offset, "branches to " + common::hex_address(target) +
                                (in_run ? ", the middle of an instruction of the overwritten run"
                                        : ", inside the run of bytes the jmp to the detour overwrites"));
    }
    if (op.type == ZYDIS_OPERAND_TYPE_MEMORY && op.mem.base == ZYDIS_REGISTER_RIP) {
      ZyanU64 target = 0;
      ZydisCalcAbsoluteAddress(&insn, &op, at(offset), &target);
      // An access reads or writes the overwritten bytes; a lea may be a label jumped to later.
      const bool access = insn.mnemonic != ZYDIS_MNEMONIC_LEA;
      const std::uintptr_t size = access ? std::max<std::uintptr_t>(op.size / 8, 1) : 1;
      const bool overlaps = access ? target < run_end_ && target + size > run_start_ : inside_run(target);
      if (overlaps) {
        return refuse(offset, "addresses " + common::hex_address(target) +
                                  ", inside the run of bytes the jmp to the detour overwrites");
      }
      if (access || in_function(target)) continue;
      relative_tables_.push_back(target);  // a PIC jump table is loaded this way
    }
    if (op.type == ZYDIS_OPERAND_TYPE_MEMORY && op.mem.base == ZYDIS_REGISTER_NONE &&
        op.mem.index != ZYDIS_REGISTER_NONE && op.mem.scale == 8 && op.mem.disp.has_displacement) {
      absolute_tables_.push_back(static_cast<std::uintptr_t>(op.mem.disp.value));  // non-PIC table
    }
    if (op.type == ZYDIS_OPERAND_TYPE_IMMEDIATE && inside_run(static_cast<std::uintptr_t>(op.imm.value.u))) {
      return refuse(offset, "takes the address " + common::hex_address(op.imm.value.u) +
                                ", inside the run of bytes the jmp to the detour overwrites");
    }
  }
  return {};
}

Status Planner::check_table(std::uintptr_t table, std::size_t entry_size) const {
  std::array<std::uint8_t, kTableChunk * 8> chunk;
  for (std::size_t n = 0; n < kMaxTableEntries;) {
    // A chunk may cross the end of readable memory: then entry by entry, up to that end.
    std::size_t count = kTableChunk;
    auto bytes = std::span(chunk).first(count * entry_size);
    if (!read_ || !read_(table + n * entry_size, bytes)) {
      count = 1;
      bytes = bytes.first(entry_size);
      if (!read_ || !read_(table + n * entry_size, bytes)) return {};  // unreadable: taken on trust
    }
    for (std::size_t i = 0; i < count; ++i) {
      std::uintptr_t target;
      if (entry_size == 4) {
        std::int32_t rel;
        std::memcpy(&rel, bytes.data() + i * 4, 4);
        target = table + static_cast<std::uintptr_t>(static_cast<std::intptr_t>(rel));
      } else {
        std::memcpy(&target, bytes.data() + i * 8, 8);
      }
      if (!in_function(target)) return {};  // past the table's end
      if (inside_run(target)) {
        return Status::error("cannot relocate the prologue of the function at " + function_text() +
                             ": entry " + std::to_string(n + i) + " of the jump table at " +
                             common::hex_address(table) + " targets " + common::hex_address(target) +
                             ", inside the run of bytes the jmp to the detour overwrites");
      }
    }
    n += count;
  }
  return {};
}

Status Planner::check_jump_tables() const {
  if (!indirect_jump_) return {};
  for (std::uintptr_t t : relative_tables_) {
    if (Status s = check_table(t, 4); !s.ok()) return s;
  }
  for (std::uintptr_t t : absolute_tables_) {
    if (Status s = check_table(t, 8); !s.ok()) return s;
  }
  return {};
}

Result<RelocationPlan> Planner::plan() {
  RelocationPlan plan;
  plan.function = function_;
  // Pass 1: the run.
  std::size_t offset = 0;
  Decoded d;
  if (!code_.empty() && decode(0, d) && d.insn.mnemonic == ZYDIS_MNEMONIC_ENDBR64) offset = d.insn.length;
  run_start_ = at(offset);
  plan.run_start = run_start_;
  std::size_t run_offset = offset;
  std::vector<Decoded> run;
  while (offset - run_offset < min_run_) {
    if (offset >= code_.size()) {
      return Status::error("cannot relocate the prologue of the function at " + function_text() + ": it is " +
                           std::to_string(code_.size()) + " bytes long, too short for the " +
                           std::to_string(kRunMinLength) + "-byte jmp to a detour" +
                           (run_offset ? " behind its endbr64" : ""));
    }
    if (!decode(offset, d)) return refuse(offset, "does not decode");
    plan.instructions.push_back({static_cast<std::uint8_t>(offset - run_offset), d.insn.length});
    run.push_back(d);
    offset += d.insn.length;
  }
  run_end_ = at(offset);
  plan.run_bytes.assign(code_.begin() + static_cast<std::ptrdiff_t>(run_offset),
                        code_.begin() + static_cast<std::ptrdiff_t>(offset));
  boundary_.assign(plan.run_bytes.size(), 0);
  for (const RunInstruction& ri : plan.instructions) boundary_[ri.offset] = 1;
  plan.reach_low = plan.reach_high = run_end_;
  for (std::size_t i = 0; i < run.size(); ++i) {
    const std::size_t o = run_offset + plan.instructions[i].offset;
    if (Status s = check_run_instruction(o, run[i], i + 1 == run.size()); !s.ok()) return s;
    if (Status s = check_references(o, run[i], true); !s.ok()) return s;
    for (std::size_t k = 0; k < run[i].insn.operand_count_visible; ++k) {
      const ZydisDecodedOperand& op = run[i].ops[k];
      if (op.type != ZYDIS_OPERAND_TYPE_MEMORY || op.mem.base != ZYDIS_REGISTER_RIP ||
          run[i].insn.mnemonic == ZYDIS_MNEMONIC_LEA) {
        continue;
      }
      ZyanU64 target = 0;
      ZydisCalcAbsoluteAddress(&run[i].insn, &op, at(o), &target);
      plan.reach_low = std::min<std::uintptr_t>(plan.reach_low, target);
      plan.reach_high = std::max<std::uintptr_t>(plan.reach_high, target);
    }
  }
  if (min_run_ < kRunMinLength) return plan;  // one instruction: no branch can land inside it
  // Pass 2: every other instruction of the function, the endbr64 included.
  for (std::size_t o = 0; o < code_.size(); o += d.insn.length) {
    if (o == run_offset) {
      o = offset;
      if (o >= code_.size()) break;
    }
    if (!decode(o, d)) return refuse(o, "does not decode (the whole function must, to find its branches)");
    if (Status s = check_references(o, d, false); !s.ok()) return s;
  }
  if (Status s = check_jump_tables(); !s.ok()) return s;
  return plan;
}

}  // namespace

bool read_own_memory(std::uintptr_t address, std::span<std::uint8_t> out) {
  iovec local{out.data(), out.size()};
  iovec remote{reinterpret_cast<void*>(address), out.size()};
  return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == static_cast<ssize_t>(out.size());
}

std::vector<bool> read_own_memory_many(std::span<const OwnMemoryRead> reads) {
  std::vector<bool> ok(reads.size(), false);
  const pid_t self = getpid();
  std::vector<iovec> local, remote;
  // process_vm_readv never splits a range: it returns the bytes of the ranges read whole, up to
  // the first it could not read, which is skipped before the next call.
  for (std::size_t next = 0; next < reads.size();) {
    const std::size_t n = std::min<std::size_t>(reads.size() - next, IOV_MAX);
    local.clear();
    remote.clear();
    for (std::size_t i = next; i < next + n; ++i) {
      local.push_back({reads[i].out.data(), reads[i].out.size()});
      remote.push_back({reinterpret_cast<void*>(reads[i].address), reads[i].out.size()});
    }
    const ssize_t got = process_vm_readv(self, local.data(), n, remote.data(), n, 0);
    std::size_t covered = got > 0 ? static_cast<std::size_t>(got) : 0;
    std::size_t i = next;
    for (; i < next + n && covered >= reads[i].out.size(); ++i) {
      covered -= reads[i].out.size();
      ok[i] = true;
    }
    next = i < next + n ? i + 1 : i;  // reads[i], if any, failed
  }
  return ok;
}

Result<RelocationPlan> plan_relocation(std::uintptr_t function, std::span<const std::uint8_t> code,
                                       const ReadMemory& read) {
  return Planner(function, code, read).plan();
}

Result<RelocationPlan> plan_first_instruction(std::uintptr_t function, std::span<const std::uint8_t> code) {
  return Planner(function, code, read_own_memory, 1).plan();
}

}  // namespace tramway::arch
