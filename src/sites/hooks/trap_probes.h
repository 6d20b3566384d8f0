// Trap probes (DESIGN "Hooks on any function"; the kernel's kprobes): hooks on functions whose
// prologue cannot be relocated but whose first instruction can be executed out of line. The
// probe is an int3 over that instruction's first byte; the SIGTRAP router asks the probe table
// first, and for a probe the handler runs the site's callbacks (in signal context: they must be
// async-signal-safe, Ops::allow_trap says so) and resumes the thread in the probe's copy of the
// instruction, which jumps back behind it. Every hit costs a signal, so only ops with
// Ops::allow_trap select such functions.
//
// The table is published before an int3 is written and unpublished after the byte it replaced
// is back; the handler reads it inside a grace-period marker region and sets the thread's PC to
// the copy before leaving it, so a tasks grace period started after the unpublish covers both
// the table and every copy it named: its trace part waits for every handler that may have read
// the old table, and its observation then finds such a thread by its trap frame, whose PC (the
// copy, once the handler set it) it counts as well as the int3's address behind it.
// Internal; under the hook tables' lock.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "arch/x86_64/relocate.h"
#include "tramway/status.h"
#include "tramway/text/code_memory.h"

#pragma GCC visibility push(hidden)  // as sites/hooks/internal.h, which defines the types named here

namespace tramway::hooks::detail {

struct SiteCell;
struct Retired;

struct TrapProbe {
  std::uintptr_t address = 0;  // the int3: the first instruction, behind an endbr64
  std::uint8_t original = 0;   // the byte it replaces
  text::CodeBlock copy;        // the instruction relocated, then a jmp behind it
  const SiteCell* cell = nullptr;
};

// Plans the first instruction of the function of `size` bytes at `function` and writes its
// copy; the probe is not installed. Fails with the relocator's or the allocator's message.
Result<std::unique_ptr<TrapProbe>> build_trap_probe(std::uintptr_t function, std::size_t size, const SiteCell* cell);

// Installs `on` (their int3s written once the table names them) and removes `off` (their bytes
// put back, then unpublished; their copies and the old table go to `retired`, which needs a
// tasks grace period), with one serialisation each way. On failure nothing changed.
Status change_trap_probes(const std::vector<TrapProbe*>& on, const std::vector<TrapProbe*>& off, Retired& retired);

// Frees tables retired by the two above, once no SIGTRAP handler can be looking at them (after
// their grace period; takes its own leaf lock).
void free_probe_tables(const std::vector<void*>& tables);

// Unpublishes probes whose code is gone (an unloaded object): nothing is written.
void forget_trap_probes(const std::vector<TrapProbe*>& gone, Retired& retired);

}  // namespace tramway::hooks::detail

#pragma GCC visibility pop
