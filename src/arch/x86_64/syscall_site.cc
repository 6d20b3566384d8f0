#include "arch/x86_64/syscall_site.h"

#include <Zydis/Zydis.h>
#include <sys/syscall.h>

#include <cstring>
#include <initializer_list>

namespace tramway::arch {
namespace {

constexpr int kGprs = 16;
constexpr std::uintptr_t kMaxFunction = 64 * 1024;  // a wrapper is far smaller; bounds the handler's work

// The index of the 64-bit register enclosing `r` (rax = 0 … r15 = 15), or -1.
int gpr_index(ZydisRegister r) noexcept {
  const ZydisRegister full = ZydisRegisterGetLargestEnclosing(ZYDIS_MACHINE_MODE_LONG_64, r);
  if (full < ZYDIS_REGISTER_RAX || full > ZYDIS_REGISTER_R15) return -1;
  return static_cast<int>(full - ZYDIS_REGISTER_RAX);
}

struct Decoded {
  ZydisDecodedInstruction insn;
  ZydisDecodedOperand ops[ZYDIS_MAX_OPERAND_COUNT];
};

bool decode_at(const ZydisDecoder& d, std::uintptr_t a, std::uintptr_t end, Decoded& out) noexcept {
  const std::uintptr_t room = end - a < ZYDIS_MAX_INSTRUCTION_LENGTH ? end - a : ZYDIS_MAX_INSTRUCTION_LENGTH;
  return ZYAN_SUCCESS(ZydisDecoderDecodeFull(&d, reinterpret_cast<const void*>(a), room, &out.insn, out.ops));
}

bool is_branch(const ZydisDecodedInstruction& i) noexcept {
  const auto c = i.meta.category;
  return c == ZYDIS_CATEGORY_COND_BR || c == ZYDIS_CATEGORY_UNCOND_BR || c == ZYDIS_CATEGORY_CALL;
}

// Execution never falls through to the next instruction.
bool ends_path(const ZydisDecodedInstruction& i) noexcept {
  return i.meta.category == ZYDIS_CATEGORY_UNCOND_BR || i.meta.category == ZYDIS_CATEGORY_RET ||
         i.mnemonic == ZYDIS_MNEMONIC_UD2 || i.mnemonic == ZYDIS_MNEMONIC_HLT;
}

// Pass 1: may control enter (since, site] other than by falling through? Any relative branch
// of the function that targets it does; a computed jump (a jump table) may, so it counts too.
// A jump through a rip-relative slot is a tail call through the GOT: it leaves the function.
bool path_entered(const ZydisDecoder& d, std::uintptr_t begin, std::uintptr_t end, std::uintptr_t since,
                  std::uintptr_t site) noexcept {
  Decoded x;
  for (std::uintptr_t a = begin; a < end; a += x.insn.length) {
    if (!decode_at(d, a, end, x)) return true;
    if (!is_branch(x.insn)) continue;
    const ZydisDecodedOperand& op = x.ops[0];
    if (op.type == ZYDIS_OPERAND_TYPE_IMMEDIATE && op.imm.is_relative) {
      ZyanU64 target = 0;
      if (!ZYAN_SUCCESS(ZydisCalcAbsoluteAddress(&x.insn, &op, a, &target))) return true;
      if (target > since && target <= site) return true;
    } else if (x.insn.meta.category == ZYDIS_CATEGORY_UNCOND_BR) {
      const bool got_slot = op.type == ZYDIS_OPERAND_TYPE_MEMORY && op.mem.base == ZYDIS_REGISTER_RIP;
      if (!got_slot) return true;
    }
  }
  return false;
}

struct Known {
  bool valid[kGprs] = {};
  std::uint64_t value[kGprs] = {};
  std::uintptr_t since[kGprs] = {};  // where the chain that gave the value began

  void forget_all() noexcept { std::memset(valid, 0, sizeof valid); }
  void forget(int r) noexcept {
    if (r >= 0) valid[r] = false;
  }
  void set(int r, std::uint64_t v, std::uintptr_t from) noexcept {
    valid[r] = true;
    value[r] = v;
    since[r] = from;
  }
};

// The effect of one instruction at `a` on what is known of the registers.
void step(const Decoded& x, std::uintptr_t a, Known& k) noexcept {
  const ZydisDecodedInstruction& i = x.insn;
  const ZydisDecodedOperand* ops = x.ops;
  const bool reg0 = i.operand_count_visible >= 1 && ops[0].type == ZYDIS_OPERAND_TYPE_REGISTER;
  const int dst = reg0 ? gpr_index(ops[0].reg.value) : -1;
  const bool full_width = reg0 && (ops[0].size == 32 || ops[0].size == 64);
  const std::uint64_t width_mask = reg0 && ops[0].size == 32 ? 0xffffffffull : ~0ull;
  if (i.mnemonic == ZYDIS_MNEMONIC_MOV && dst >= 0 && full_width && i.operand_count_visible == 2) {
    if (ops[1].type == ZYDIS_OPERAND_TYPE_IMMEDIATE) {
      k.set(dst, ops[1].imm.value.u & width_mask, a);  // 32-bit writes zero-extend
      return;
    }
    if (ops[1].type == ZYDIS_OPERAND_TYPE_REGISTER && ops[1].size == ops[0].size) {
      const int src = gpr_index(ops[1].reg.value);
      if (src >= 0 && k.valid[src]) {
        k.set(dst, k.value[src] & width_mask, k.since[src]);
        return;
      }
    }
  }
  if ((i.mnemonic == ZYDIS_MNEMONIC_XOR || i.mnemonic == ZYDIS_MNEMONIC_SUB) && dst >= 0 && full_width &&
      i.operand_count_visible == 2 && ops[1].type == ZYDIS_OPERAND_TYPE_REGISTER && ops[1].reg.value == ops[0].reg.value) {
    k.set(dst, 0, a);
    return;
  }
  for (int o = 0; o < i.operand_count; ++o) {  // hidden operands too: implicit writes
    if (ops[o].type == ZYDIS_OPERAND_TYPE_REGISTER && (ops[o].actions & ZYDIS_OPERAND_ACTION_MASK_WRITE)) {
      k.forget(gpr_index(ops[o].reg.value));
    }
  }
  if (i.meta.category == ZYDIS_CATEGORY_CALL) {  // the callee may clobber every caller-saved register
    for (ZydisRegister r : {ZYDIS_REGISTER_RAX, ZYDIS_REGISTER_RCX, ZYDIS_REGISTER_RDX, ZYDIS_REGISTER_RSI,
                            ZYDIS_REGISTER_RDI, ZYDIS_REGISTER_R8, ZYDIS_REGISTER_R9, ZYDIS_REGISTER_R10,
                            ZYDIS_REGISTER_R11}) {
      k.forget(gpr_index(r));
    }
  }
  if (i.mnemonic == ZYDIS_MNEMONIC_SYSCALL) {
    k.forget(gpr_index(ZYDIS_REGISTER_RAX));
    k.forget(gpr_index(ZYDIS_REGISTER_RCX));
    k.forget(gpr_index(ZYDIS_REGISTER_R11));
  }
}

}  // namespace

long syscall_number_at(std::uintptr_t fn_begin, std::uintptr_t fn_end, std::uintptr_t site) noexcept {
  if (site < fn_begin || site + kSyscallInsnSize > fn_end) return -1;
  if (fn_end - fn_begin > kMaxFunction) fn_end = fn_begin + kMaxFunction;
  if (site + kSyscallInsnSize > fn_end) return -1;
  ZydisDecoder d;
  if (!ZYAN_SUCCESS(ZydisDecoderInit(&d, ZYDIS_MACHINE_MODE_LONG_64, ZYDIS_STACK_WIDTH_64))) return -1;

  // Pass 2 first: follow the straight line into the site, then check nothing enters it.
  Known k;
  Decoded x;
  std::uintptr_t a = fn_begin;
  for (; a < site; a += x.insn.length) {
    if (!decode_at(d, a, fn_end, x)) return -1;
    step(x, a, k);
    if (ends_path(x.insn)) k.forget_all();  // what follows is reached only by a branch
  }
  if (a != site) return -1;  // the site is not on an instruction boundary of this sweep
  if (!decode_at(d, site, fn_end, x) || x.insn.mnemonic != ZYDIS_MNEMONIC_SYSCALL) return -1;
  const int rax = gpr_index(ZYDIS_REGISTER_RAX);
  if (!k.valid[rax]) return -1;
  if (path_entered(d, fn_begin, fn_end, k.since[rax], site)) return -1;
  return static_cast<long>(k.value[rax]);
}

bool restartable_after_eintr(long nr) noexcept {
  switch (nr) {
    case SYS_read: case SYS_readv: case SYS_recvfrom: case SYS_recvmsg: case SYS_recvmmsg:
    case SYS_accept: case SYS_accept4:
    case SYS_wait4: case SYS_waitid:
    case SYS_poll: case SYS_ppoll: case SYS_select: case SYS_pselect6:
    case SYS_epoll_wait: case SYS_epoll_pwait: case SYS_epoll_pwait2:
    case SYS_pause: case SYS_nanosleep: case SYS_clock_nanosleep:
    case SYS_rt_sigsuspend: case SYS_rt_sigtimedwait:
    case SYS_futex:
    case SYS_io_getevents: case SYS_io_pgetevents:
    case SYS_msgrcv: case SYS_msgsnd: case SYS_semop: case SYS_semtimedop:
    case SYS_mq_timedreceive: case SYS_mq_timedsend:
    case SYS_flock:
      return true;
    default:
      return false;
  }
}

}  // namespace tramway::arch
