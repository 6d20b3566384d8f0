// The C++ dispatchers the stubs (arch/x86_64/hook_entry.S) call, with the thread's marker
// raised, for every case their fast path leaves: lists of ops, disabled ops, extended state,
// recursion, the thread's first hook; and the trap probes' SIGTRAP handler calls
// (trap_probes.cc). And the stubs' frame, as caller_return_slot reads it.
#include <cxxabi.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>

#include "sites/hooks/internal.h"

namespace tramway::hooks::detail {

thread_local constinit bool t_in_callback __attribute__((tls_model("initial-exec"))) = false;

namespace {

// The callbacks of a site, with the recursion guard (DESIGN invariant 7). The stubs do the
// same inline for the usual case — one ops, enabled, no extended state, not recursing, the
// thread's counter block there (hook_entry.S, HOOK_CALL_ONE) — and call the dispatchers
// below for every other.
inline void run_callbacks(Ops* const* ops, std::size_t count, std::uint32_t site_index, std::uintptr_t entry,
                          std::uintptr_t caller, EntryRegs& regs) {
  if (t_in_callback) {  // a callback called a hooked function
    for (std::size_t i = 0; i < count; ++i) ops[i]->state->recursion_skipped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  CounterBlock* const block = my_block();  // null when out of memory: nothing counted
  if (block) bump(block->site_hits[site_index]);
  t_in_callback = true;
  // What may leave a callback: nothing but the forced unwind of pthread_exit or of a
  // cancellation, which ends the thread. It passes on through the dispatcher and the stub
  // (whose CFI describes its frame) into the hooked function and its callers, running their
  // cleanups; the marker stays raised and t_in_callback set until the thread has exited, as
  // when it leaves the stubs' inline path (an exited thread holds up no grace period). Any
  // other exception ends the program.
  try {
    for (std::size_t i = 0; i < count; ++i) {
      Ops& o = *ops[i];
      if (!o.state->enabled.load(std::memory_order_relaxed)) continue;
      if (block) bump(block->hits[o.state->id]);
      if (o.state->extended) {
        call_saving_extended_state(o, entry, caller, regs);
      } else {
        o.state->entry(o, entry, caller, regs);
      }
    }
  } catch (abi::__forced_unwind&) {
    throw;
  } catch (...) {
    std::terminate();
  }
  t_in_callback = false;
}

}  // namespace

void run_cell_callbacks(const SiteCell& cell, std::uintptr_t caller, EntryRegs& regs) {
  const std::uintptr_t target = cell.target.load(std::memory_order_acquire);
  if (target == 0) return;  // detached meanwhile
  if (target & kListTag) {
    const auto* list = reinterpret_cast<const OpsList*>(target & ~kListTag);
    run_callbacks(list->ops, list->count, cell.index, cell.function, caller, regs);
  } else {
    Ops* single = reinterpret_cast<const Ops::State*>(target)->ops;
    run_callbacks(&single, 1, cell.index, cell.function, caller, regs);
  }
}

}  // namespace tramway::hooks::detail

namespace tramway::hooks {

// hook_entry.S's frame: EntryRegs at %rsp, a copy of %rbp at 200(%rsp), and above the saved
// %rbp the function's body (8(%rbp)) and the return address into its caller (16(%rbp)).
std::uintptr_t* caller_return_slot(EntryRegs& regs) noexcept {
  const auto rbp = *reinterpret_cast<const std::uintptr_t*>(reinterpret_cast<const char*>(&regs) + 200);
  return reinterpret_cast<std::uintptr_t*>(rbp + 16);
}

}  // namespace tramway::hooks

// Called by tramway_hook_entry with the marker raised, for what its fast path leaves.
extern "C" __attribute__((visibility("hidden"))) void tramway_hook_dispatch(tramway::hooks::EntryRegs* regs,
                                                                            std::uintptr_t body,
                                                                            std::uintptr_t caller) {
  using namespace tramway::hooks;
  using namespace tramway::hooks::detail;
  run_cell_callbacks(**reinterpret_cast<SiteCell* const*>(body - 5 - 8), caller, *regs);  // the site's literal slot
}

// Called by tramway_hook_direct with the marker raised, for what its fast path leaves; `slot`
// through the RX view.
extern "C" __attribute__((visibility("hidden"))) void tramway_hook_direct_dispatch(tramway::hooks::EntryRegs* regs,
                                                                                   std::uintptr_t body,
                                                                                   std::uintptr_t caller,
                                                                                   const tramway::hooks::detail::SlotData* slot) {
  using namespace tramway::hooks;
  using namespace tramway::hooks::detail;
  // Another owner (or none): the slot was retired, and maybe reused, between this thread's
  // call into it and its marker. The call goes on untraced.
  if (slot->tag.load(std::memory_order_acquire) != body) return;
  Ops* ops = slot->state.load(std::memory_order_relaxed)->ops;  // written before the tag
  run_callbacks(&ops, 1, slot->index.load(std::memory_order_relaxed), slot->function.load(std::memory_order_relaxed),
                caller, *regs);
}
