// Poisoned detours for suite "hooks": each relocated-prologue copy whose tasks grace period
// has passed is filled with faulting code instead of being freed, and kept out of reuse for a
// while, so that a thread still running in it (or sent to it) faults loudly instead of
// running whatever the allocator puts there next.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tramway::torture {

// Installs the detour-freed hook (sites::hooks::testing) and a SIGILL/SIGSEGV/SIGBUS handler
// that reports, async-signal-safely, whether the faulting PC lies in a poisoned copy, then
// ends the process with status 3. False with `*error` if a handler cannot be installed.
bool install_detour_poison(std::string* error);

struct PoisonTotals {
  std::uint64_t poisoned = 0;    // copies filled with poison
  std::uint64_t given_back = 0;  // of which left the quarantine (text::free_code)
  std::uint64_t bytes = 0;       // bytes poisoned
};
PoisonTotals detour_poison_totals();

}  // namespace tramway::torture
