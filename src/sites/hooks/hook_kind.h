// How a function without a patchable entry can be hooked (hooks::HookKind): decided from its
// current bytes within its symbol's bounds, read through process_vm_readv so that a symbol
// whose bytes are not mapped (a wrong size, a file replaced on disk) is refused, not a fault.
// Pure and unlocked; the discovery cache calls it lazily, once per function, and keeps the
// answer with the object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "arch/x86_64/relocate.h"
#include "tramway/hooks.h"

namespace tramway::sites::hooks {

struct HookKindOf {
  tramway::hooks::HookKind kind = tramway::hooks::HookKind::refused;
  std::string reason;  // trap, refused: why not relocatable (the relocator's message)
  // relocatable: the relocator's plan from these bytes, which the function's first hook uses
  // (its bytes checked again then) rather than decode the whole function a second time.
  std::shared_ptr<const arch::RelocationPlan> plan;
};

HookKindOf classify_function(std::uintptr_t address, std::size_t size);
// The same from the function's `size` bytes read already (empty: they could not be read).
HookKindOf classify_code(std::uintptr_t address, std::size_t size, std::span<const std::uint8_t> code);

// Why a function must not be hooked whatever its bytes, or nullopt: it is a compiler's cold
// fragment of another function (entered by a jump: no return address to hook), or tramway's own code
// or code tramway runs while it patches or handles signals (the dynamic loader, the vDSO, the
// decoder, and the C library's signal, memory and system-call entries its handlers and batches
// call), where a hook would recurse into the machinery changing it, or an int3 would land
// where SIGTRAP is blocked. The kernel's kprobes keep such a list too (NOKPROBE_SYMBOL).
std::optional<std::string> refusal_by_identity(const std::string& object_path, const std::string& symbol);

}  // namespace tramway::sites::hooks
