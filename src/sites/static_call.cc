// Static calls: retargeting a trampoline is one 5-byte patch of its first instruction.
#include <cstring>
#include <string>

#include "arch/x86_64/insn.h"
#include "common/format.h"
#include "tramway/static_call.h"
#include "tramway/text/patch.h"

namespace tramway::detail {
namespace {

constexpr std::uintptr_t kFallbackOffset = 8;  // jmp *literal(%rip)
constexpr std::uintptr_t kReturnZeroOffset = 16;  // xor eax,eax; ret

bool has_bytes(std::uintptr_t at, std::initializer_list<std::uint8_t> bytes) {
  return std::memcmp(reinterpret_cast<const void*>(at), std::data(bytes), bytes.size()) == 0;
}

}  // namespace

Status update_static_call(void* trampoline, void* literal, void* target, EmptyCall when_null) {
  const auto t = reinterpret_cast<std::uintptr_t>(trampoline);
  if (!has_bytes(t + kFallbackOffset, {0xff, 0x25}) || !has_bytes(t + kReturnZeroOffset, {0x31, 0xc0, 0xc3})) {
    return Status::error("static call trampoline at " + common::hex_address(t) +
                         " does not have the layout of TRAMWAY_DEFINE_STATIC_CALL");
  }
  text::PatchLock lock;
  arch::Insn5 insn;
  if (!target) {
    switch (when_null) {
      case EmptyCall::kReturn:
        insn = arch::kRetPadded;
        break;
      case EmptyCall::kReturnZero:
        insn = *arch::encode_jmp(t, t + kReturnZeroOffset);
        break;
      case EmptyCall::kNone:
        return Status::error("a static call returning a class type cannot be updated to nullptr");
    }
  } else {
    // The literal always holds the target, so the fallback agrees with the direct jmp.
    // seq_cst: visible to every thread before the trampoline can point at the fallback.
    __atomic_store_n(static_cast<void**>(literal), target, __ATOMIC_SEQ_CST);
    const auto to = reinterpret_cast<std::uintptr_t>(target);
    const auto direct = arch::encode_jmp(t, to);
    insn = direct ? *direct : *arch::encode_jmp(t, t + kFallbackOffset);
  }
  text::PatchBatch batch;
  if (Status s = batch.add(trampoline, insn); !s.ok()) return s;
  return text::apply(batch, lock);
}

}  // namespace tramway::detail
