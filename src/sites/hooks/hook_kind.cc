// The kinds of a function without a patchable entry: relocatable when the relocator plans its
// prologue, else trap when its first instruction decodes, else refused.
#include "sites/hooks/hook_kind.h"

#include <span>
#include <vector>

#include "arch/x86_64/insn.h"
#include "arch/x86_64/relocate.h"

namespace tramway::sites::hooks {

using tramway::hooks::HookKind;

HookKindOf classify_function(std::uintptr_t address, std::size_t size) {
  std::vector<std::uint8_t> code(size);
  if (size == 0 || !arch::read_own_memory(address, code)) {
    return {HookKind::refused, "its " + std::to_string(size) + " bytes cannot be read (the symbol's size does not "
                               "match the mapped code)"};
  }
  Result<arch::RelocationPlan> plan = arch::plan_relocation(address, code);
  if (plan.ok()) return {HookKind::relocatable, {}};
  if (arch::first_instruction(address, code).ok()) return {HookKind::trap, plan.status().message()};
  return {HookKind::refused, plan.status().message()};
}

}  // namespace tramway::sites::hooks

namespace tramway::hooks {

const char* hook_kind_name(HookKind kind) noexcept {
  switch (kind) {
    case HookKind::patchable: return "patchable";
    case HookKind::relocatable: return "relocatable";
    case HookKind::trap: return "trap";
    case HookKind::refused: return "refused";
  }
  return "refused";
}

}  // namespace tramway::hooks
