// tramway/hooks.h — ftrace-style function hooks on any function.
//
// Any function of a loaded object can be hooked while the program runs: attach an Ops to a
// set of functions and its entry callback runs at the start of each of them, on whatever
// thread calls it, until it is detached. A function compiled with
// -fpatchable-function-entry=13,8 (GCC >= 8, Clang >= 10) is hooked at its patchable entry;
// any other (a distribution's libraries, a plain -O2 build) through its relocated prologue
// (HookKind::relocatable, DESIGN "Hooks on any function"): the shortest run of whole
// instructions of at least 5 bytes at its entry becomes a jmp to an entry pad shaped like a
// patchable entry, whose site calls the same stub and then runs a copy of the run. Everything
// below holds for both kinds alike; the copy is freed only after a tasks-flavor grace period
// (a thread may be preempted inside it), so detach waits for one. A function only a trap probe
// can hook (HookKind::trap) is selected by ops with Ops::allow_trap alone.
//
//   tramway::hooks::Ops ops;
//   ops.entry = [](const Ops& o, std::uintptr_t fn, std::uintptr_t caller, tramway::hooks::EntryRegs& r) { ... };
//   tramway::hooks::attach(ops, tramway::hooks::Filter::glob("my_ns::*"));
//   ...
//   tramway::hooks::detach(ops);   // when it returns, no callback of ops runs or will run
//
// Guarantees: an enabled site is `call` to a permanent stub (the common entry, DESIGN.md)
// that raises the thread's grace-period marker, reads the site's cell (one 8-byte word:
// the ops, or a per-site list), runs the callbacks, lowers the marker and returns into the
// function with every argument register (rdi, rsi, rdx, rcx, r8, r9, rax for varargs, r10,
// xmm0-7) and the stack as the caller left them. Not preserved for the function: the upper
// halves of ymm/zmm registers and x87 state, should a callback change them. Changing which
// ops a site runs is a data store, not a code patch; enabling or disabling a site is one
// patch batch for any number of sites. A callback that calls a hooked function does not
// re-enter callbacks on that thread (the call is counted in `recursion_skipped`).
// attach/detach are not async-signal-safe and fail when called from inside a callback.
// Refused, with the reason: patchable entries that do not hold the compiler's nops (Clang's
// -fsanitize=function puts its signature first); prologues the relocator cannot move (a call
// or syscall inside the run, a branch into it, a function shorter than it); tramway's own
// code and the C library entries it calls while it patches or handles signals.
//
// Direct mode (Ops::direct): a site whose only ops is direct calls a trampoline slot of its
// own, generated near it, instead of the common entry's thunk, and the slot names the ops:
// no thunk, no literal slot, no list to walk. A site with several ops uses the common entry
// whatever their modes, and switches back when one direct ops is left. Slots are type-stable
// (identical code, reused only as slots, never unmapped), so a thread preempted in one before
// it raised its marker finds another owner there and returns into the function untraced.
// Extended state (Ops::save_extended_state): the callback runs between xsave and xrstor of
// every state component the OS enabled (ymm/zmm, x87, ...), for callbacks that use them.
// Lean callbacks: attach reads the callback's machine code, and when it proves that every path
// is leaf code on general-purpose registers that never reads `regs` (a counter, a flag), the
// stubs skip saving xmm0-7 around it (about 1.5 ns a call). So `entry` is read at attach, like
// the flags, and the code it points to must not change while the ops is attached.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tramway/status.h"

namespace tramway::hooks {

// The registers a function received, as saved at its entry. A callback may read them;
// changes are not written back.
struct EntryRegs {
  std::uint64_t rdi, rsi, rdx, rcx, r8, r9;  // integer arguments, in order
  std::uint64_t rax;                          // varargs: upper bound of vector registers used
  std::uint64_t r10;                          // static chain
  alignas(16) std::uint8_t xmm[8][16];        // xmm0-7: floating-point arguments
};

// The stack slot that holds the return address into the function's caller (the `caller`
// argument of the entry callback). An entry callback may replace it, to regain control when
// the function returns (the tracer's exit hooks do); whoever does must put the original back
// before anything unwinds through that frame.
std::uintptr_t* caller_return_slot(EntryRegs& regs) noexcept;

struct Ops;
// `function` is the hooked function's entry, `caller` the return address into its caller.
using EntryCallback = void (*)(const Ops& ops, std::uintptr_t function, std::uintptr_t caller, EntryRegs& regs);

struct Ops {
  EntryCallback entry = nullptr;     // read at attach
  void* data = nullptr;  // for the callback
  bool direct = false;               // direct trampolines (above); read at attach
  bool save_extended_state = false;  // xsave/xrstor around the callback; read at attach
  // Also select functions only a trap probe can hook (HookKind::trap): an int3 at the entry,
  // the callback run in the SIGTRAP handler — so it must be async-signal-safe — and the
  // displaced instruction executed out of line. Every hit costs a signal (microseconds).
  // Read at attach.
  bool allow_trap = false;
  // The callback promises to leave the vector, x87 and MMX registers alone on every path,
  // what it calls included (code built with -mno-sse -mno-mmx that calls nothing else), and
  // never to read EntryRegs::xmm: the stubs then skip saving xmm0-7 around it, as for a
  // callback attach proves lean (about 1.5 ns a call); EntryRegs::xmm is left unset. A broken
  // promise silently corrupts the hooked functions' floating-point arguments. Read at attach;
  // ignored with save_extended_state.
  bool promise_vector_free = false;

  // Managed by tramway; read with the functions below.
  struct State;
  State* state = nullptr;
};

// Which functions to attach to.
class Filter {
 public:
  // Shell glob (fnmatch) on demangled names, e.g. "app::*", "parse_*".
  static Filter glob(std::string pattern);
  static Filter names(std::vector<std::string> names);  // exact demangled (or symbol) names
  static Filter addresses(std::vector<std::uintptr_t> entries);

  enum class Kind { glob, names, addresses };
  Kind kind() const noexcept { return kind_; }
  const std::vector<std::string>& patterns() const noexcept { return patterns_; }
  const std::vector<std::uintptr_t>& entries() const noexcept { return entries_; }

 private:
  Kind kind_ = Kind::names;
  std::vector<std::string> patterns_;
  std::vector<std::uintptr_t> entries_;
};

// Attaches `ops` to every function the filter selects that it can hook (can_hook: a glob
// passes over the others). Fails (attaching nothing) when the filter selects nothing, names
// a function it cannot hook (saying why: HookKind, Function::reason), `ops` is
// attached already, or 4,096 ops are attached, and with "object unloaded" when a library of
// the selected functions was unloaded before the attach could keep it loaded. The libraries
// it writes into stay loaded until it returns: a dlclose meanwhile unloads them afterwards.
// A failure after the code batch began returns once a grace period has passed (a thread may
// have been let into a callback), so `ops` may be freed when attach fails; only if no grace
// period can run is it left unpublished but not freed, as a failed detach leaves it (the
// message says so; detach finishes it).
Status attach(Ops& ops, const Filter& filter);

// Detaches `ops` from every function. When it returns, no callback of `ops` runs or will
// run on any thread (a grace period has passed); `ops` may then be attached again or freed.
// When grace periods cannot run (membarrier refused, e.g. by a seccomp filter) it fails and
// says why: the ops is still attached if that was known before (disable() then stops its
// callbacks), else it is unpublished — no callback of it starts any more, but it is not freed
// — and a later detach (or detach_async) finishes it once grace periods work again.
Status detach(Ops& ops);

// Detaches `ops` without waiting for the grace period: `done` runs on tramway's callback
// thread once no callback of `ops` runs or can run any more (the thread retries a grace period
// that fails). Until then `ops` must stay alive and cannot be attached again; from then on it
// may be reused or freed. Fails, changing nothing and never running `done`, when grace periods
// are known not to work.
Status detach_async(Ops& ops, std::function<void()> done);

// Stops and resumes callbacks of an attached ops without detaching it (no code patch).
Status disable(Ops& ops);
Status enable(Ops& ops);

// Exact: each thread counts in its own block (no locked instruction on the call path), and
// this sums the blocks. Per function counts: Function::hits of patchable_functions().
struct OpsCounters {
  std::uint64_t hits = 0;               // callbacks run
  std::uint64_t recursion_skipped = 0;  // calls from inside a callback on the same thread
  std::size_t functions = 0;            // functions attached to
};
OpsCounters counters(const Ops& ops);

// How a function can be hooked: attach takes patchable and relocatable functions, and trap
// ones for ops with Ops::allow_trap (can_hook); refused ones never.
enum class HookKind {
  patchable,    // it has a patchable entry (-fpatchable-function-entry=13,8): attach hooks it,
                // whatever its other properties (a patchable entry is always preferred)
  relocatable,  // no patchable entry, but the relocator (arch/x86_64/relocate.h) accepts its
                // current bytes within its symbol's bounds: attach hooks its relocated prologue
  trap,         // the relocator refuses it (Function::reason says why: e.g. shorter than the
                // 5-byte jmp, a call early in the prologue) but its first instruction can run
                // out of line: a trap probe hooks it, for ops with Ops::allow_trap
  refused,      // neither, or tramway refuses it whatever its bytes (its own machinery calls
                // it, or it is a compiler's cold fragment): Function::reason says why
};
// "patchable", "relocatable", "trap", "refused".
const char* hook_kind_name(HookKind kind) noexcept;
// Whether attach selects a function of this kind for ops whose Ops::allow_trap is `allow_trap`.
inline bool can_hook(HookKind kind, bool allow_trap = false) noexcept {
  return kind == HookKind::patchable || kind == HookKind::relocatable || (allow_trap && kind == HookKind::trap);
}

// A function of the process: a sized STT_FUNC symbol (of .symtab, else .dynsym) or a
// patchable entry, one per address (aliases are listed once, under the exported name with the
// fewest leading underscores). STT_GNU_IFUNC symbols are not listed: they name resolvers.
struct Function {
  std::uintptr_t entry = 0;
  std::string name;    // demangled; empty for a stripped local function (patchable ones only)
  std::string object;  // the executable or shared library it lives in
  std::size_t ops = 0; // ops attached to it
  std::uint64_t hits = 0;  // its calls tramway intercepted since it was first hooked (once a
                           // call, whatever the number of ops; not those the recursion guard
                           // skipped); exact, like OpsCounters::hits
  HookKind kind = HookKind::patchable;
  std::size_t size = 0;  // the symbol's size in bytes; 0 for a patchable entry without a symbol
  std::string reason;    // trap and refused: why the prologue cannot be relocated
};
// Every patchable function of the objects loaded now (no decoding: cheap), sorted by entry.
Result<std::vector<Function>> patchable_functions();
// Every function of the objects loaded now, of every kind, sorted by entry. The first call
// for an object reads its symbols and decodes all its functions (libc: ~18 ms of CPU); the
// kinds are cached with the object until it is unloaded. Holds the hooks' lock meanwhile.
Result<std::vector<Function>> functions();
// The same for the functions whose name `glob` matches (fnmatch): only those are decoded.
Result<std::vector<Function>> functions(const std::string& glob);

}  // namespace tramway::hooks
