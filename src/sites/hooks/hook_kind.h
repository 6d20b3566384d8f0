// How a function without a patchable entry can be hooked (hooks::HookKind): decided from its
// current bytes within its symbol's bounds, read through process_vm_readv so that a symbol
// whose bytes are not mapped (a wrong size, a file replaced on disk) is refused, not a fault.
// Pure and unlocked; the discovery cache calls it lazily, once per function, and keeps the
// answer with the object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "tramway/hooks.h"

namespace tramway::sites::hooks {

struct HookKindOf {
  tramway::hooks::HookKind kind = tramway::hooks::HookKind::refused;
  std::string reason;  // trap, refused: why not relocatable (the relocator's message)
};

HookKindOf classify_function(std::uintptr_t address, std::size_t size);

}  // namespace tramway::sites::hooks
