// The site table and its state machine. A site's mode is what its entry holds: a nop (off),
// a call of a thunk to the common entry (common: its cell names the ops, or a list of them),
// or a call of a direct slot (direct: its one ops is direct). The ops a site runs change by a
// store into its cell; its mode changes in one patch batch for any number of sites
// (apply_modes). What threads inside the stubs may still read is retired, and released after a
// trace-flavor grace period.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <utility>
#include <vector>

#include "arch/x86_64/insn.h"
#include "common/eject.h"
#include "common/format.h"
#include "sites/hooks/internal.h"
#include "tramway/grace.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/patch.h"

extern "C" void tramway_hook_entry();  // hook_entry.S

namespace tramway::hooks::detail {

std::map<std::uintptr_t, Site> g_sites;  // every site ever hooked, by entry

namespace {

std::vector<text::CodeBlock> g_thunks;  // permanent; under g_mu

void free_target(std::uintptr_t t) {
  if (t & kListTag) ::operator delete(reinterpret_cast<void*>(t & ~kListTag));
}

// Unloaded after an eject: every hook is detached and no thread runs in the stubs (the agent
// watched tramway's code), so the cells, and a list one may still name, go with the library.
// A plain destructor: it runs before g_sites' own.
__attribute__((destructor)) void free_cells_at_unload() {
  if (!common::ejecting()) return;
  for (auto& [entry, site] : g_sites) {
    if (!site.cell) continue;
    free_target(site.cell->target.load(std::memory_order_relaxed));
    delete site.cell;
    site.cell = nullptr;
  }
}

// A thunk `jmp *0(%rip); .quad tramway_hook_entry` that a call at `entry` reaches with rel32.
Result<std::uintptr_t> thunk_near(std::uintptr_t entry) {
  for (const text::CodeBlock& t : g_thunks) {
    const auto thunk = reinterpret_cast<std::uintptr_t>(t.rx);
    if (arch::rel32_reaches(entry, thunk)) return thunk;
  }
  auto block = text::allocate_code_near(reinterpret_cast<const void*>(entry), 16);
  if (!block.ok()) return block.status();
  const std::uint8_t jmp[6] = {0xff, 0x25, 0, 0, 0, 0};
  std::memcpy(block->rw, jmp, sizeof jmp);
  const auto stub = reinterpret_cast<std::uintptr_t>(&tramway_hook_entry);
  std::memcpy(block->rw + 6, &stub, sizeof stub);
  g_thunks.push_back(*block);
  return reinterpret_cast<std::uintptr_t>(block->rx);
}

}  // namespace

// A relocated function is never in direct mode: its callers may keep a value in %r11 across
// the call (GCC's -fipa-ra, which patchable entries turn off), and a direct slot passes its
// data in %r11 before the stub can save it (hook_entry.S). The common entry saves it first.
Mode mode_for(const Site& s, const std::vector<Ops*>& ops) {
  if (ops.empty()) return Mode::off;
  return ops.size() == 1 && ops[0]->state->direct && !s.trap && !s.relocated ? Mode::direct : Mode::common;
}
bool site_is(const Site& s, Mode m, const std::vector<Ops*>& ops) {
  if (s.mode != m) return false;
  return m != Mode::direct || s.slot_ops == ops[0];
}

std::uintptr_t target_for(const std::vector<Ops*>& ops) {
  if (ops.empty()) return 0;
  if (ops.size() == 1) return reinterpret_cast<std::uintptr_t>(ops[0]->state);
  auto* list = static_cast<OpsList*>(::operator new(sizeof(OpsList) + (ops.size() - 1) * sizeof(Ops*)));
  list->count = ops.size();
  std::copy(ops.begin(), ops.end(), list->ops);
  return reinterpret_cast<std::uintptr_t>(list) | kListTag;
}

void release(const Retired& r) {  // after a grace period (tasks with copies); takes g_mu
  for (std::uintptr_t t : r.targets) free_target(t);
  for (const text::CodeBlock& b : r.copies) sites::hooks::free_detour(b);
  if (!r.probe_tables.empty()) free_probe_tables(r.probe_tables);
  if (r.slots.empty()) return;
  std::lock_guard lock(g_mu);
  for (const DirectSlot& slot : r.slots) give_back_slot(slot);
}

void release_after_grace_period(Retired r) {
  std::erase_if(r.targets, [](std::uintptr_t t) { return !(t & kListTag); });
  if (r.empty()) return;
  const grace::Flavor flavor = r.flavor();
  (void)grace::call(flavor, [r = std::move(r)] { release(r); });
}

void retire_dead_slot(Site& s, Retired& retired) {
  if (!s.slot || s.slot_ops || s.mode == Mode::direct) return;
  retired.slots.push_back(s.slot);
  s.slot = {};
}

void retire_copy(Site& s, Retired& retired) {
  if (!s.detour) return;
  const text::CodeBlock& b = s.detour->block;
  // Cannot fail on a non-empty range; the copy then waits for the next tasks grace period.
  (void)grace::retire(b.rx, b.rx + b.size);
  retired.copies.push_back(b);
  s.detour.reset();
}

namespace {

// Whether the run still holds the bytes `plan` was made from. Read in place: the function's
// object is pinned for the attach, and its bytes were read whole (process_vm_readv) when the
// plan was made. The rest of the function is not read again: nothing of ours writes there, so
// only another tool's patch could change it, and one in the run is caught here.
bool run_unchanged(const arch::RelocationPlan& plan) {
  return std::memcmp(reinterpret_cast<const void*>(plan.run_start), plan.run_bytes.data(), plan.run_length()) == 0;
}

// The bytes of the relocated functions leaving mode off that need a plan (none yet, or their
// run changed since: that plan is dropped), read now (their original ones: nothing of ours is
// in them while they are off), all in a few system calls. Empty for a function whose bytes
// cannot be read, or that keeps its plan.
std::vector<std::vector<std::uint8_t>> read_functions_to_plan(const std::vector<ModeChange>& changes) {
  std::vector<std::vector<std::uint8_t>> code(changes.size());
  std::vector<arch::OwnMemoryRead> reads;
  std::vector<std::size_t> index;
  for (std::size_t i = 0; i < changes.size(); ++i) {
    Site& s = *changes[i].site;
    if (!s.relocated || s.mode != Mode::off || changes[i].mode == Mode::off || s.size == 0) continue;
    if (s.plan && !run_unchanged(*s.plan)) s.plan.reset();
    if (s.plan) continue;
    code[i].resize(s.size);
    reads.push_back({s.function, code[i]});
    index.push_back(i);
  }
  const std::vector<bool> ok = arch::read_own_memory_many(reads);
  for (std::size_t k = 0; k < index.size(); ++k)
    if (!ok[k]) code[index[k]].clear();
  return code;
}

// The detour of a relocated function leaving mode off, from its plan, made first from `code`
// (its bytes now) when it has none. Its pad is taken on its first hook, its jmp going home (to
// the run), so that the batch changes it like any instruction.
Status prepare_detour(Site& s, std::span<const std::uint8_t> code) {
  const auto what = [&] { return "'" + s.name + "' (" + common::hex_address(s.function) + " in " + s.object + ")"; };
  if (!s.plan) {
    if (code.empty()) return Status::error("cannot read the " + std::to_string(s.size) + " bytes of " + what());
    auto plan = arch::plan_relocation(s.function, code);
    if (!plan.ok()) return Status::error("cannot relocate the prologue of " + what() + ": " + plan.status().message());
    s.plan = std::make_shared<const arch::RelocationPlan>(std::move(*plan));
  }
  if (s.entry == 0) {
    auto pad = sites::hooks::take_entry_pad(s.function, s.cell, s.plan->run_start);
    if (!pad.ok()) return Status::error("cannot hook " + what() + ": " + pad.status().message());
    s.entry = *pad;
    s.literal_written = true;  // the pad's literal slot names the cell from the start
  }
  auto d = sites::hooks::build_detour(s.plan, s.entry);
  if (!d.ok()) return Status::error("cannot hook " + what() + ": " + d.status().message());
  s.detour = std::make_unique<sites::hooks::Detour>(std::move(*d));
  return {};
}

}  // namespace

// Puts each site in its new mode, all in one batch. Literal slots of sites entering common
// mode are written first, once, in one write per page (no thread reads one before its site
// calls the stub, and the batch's serialisations order these writes before that); slots of
// sites entering direct mode are filled before the batch too (no thread reaches a slot before
// its site calls it). After the batch, the slots sites left get their tag cleared and go to
// `retired`. On failure no site changed mode (the slots taken go to `retired`).
//
// A relocated function leaving mode off gets a detour (sites/hooks/detour.h) and the batch
// writes, besides its pad's site, the jmp over its run (every PC inside the run moved to the
// copy) and the pad's jmp to the new copy. Returning to mode off, the batch puts the run's
// original bytes back (a thread trapping at their head meanwhile resumes in the copy) and
// turns the pad's jmp back to the run, leaving the pad's site as it was; the copy is retired.
//
// Trap probes are not the batch's: once it is done their int3s go in, or their bytes back
// (trap_probes.h). Should that fail, the batch's sites have changed mode, the trap sites not.
namespace {
Status apply_batch_modes(const std::vector<ModeChange>& changes, Retired& retired);
Status apply_probe_modes(const std::vector<ModeChange>& changes, Retired& retired);
}  // namespace

Status apply_modes(const std::vector<ModeChange>& all_changes, Retired& retired) {
  std::vector<ModeChange> changes, probe_changes;
  for (const ModeChange& c : all_changes) (c.site->trap ? probe_changes : changes).push_back(c);
  if (Status st = apply_batch_modes(changes, retired); !st.ok()) return st;
  return apply_probe_modes(probe_changes, retired);
}

namespace {

// Trap sites leaving mode off get a probe, those returning to it lose theirs.
Status apply_probe_modes(const std::vector<ModeChange>& changes, Retired& retired) {
  std::vector<TrapProbe*> on, off;
  std::vector<std::unique_ptr<TrapProbe>> built(changes.size());
  for (std::size_t i = 0; i < changes.size(); ++i) {
    Site& s = *changes[i].site;
    if (s.mode == Mode::off && changes[i].mode != Mode::off) {
      auto p = build_trap_probe(s.function, s.size, s.cell);
      if (!p.ok()) {
        for (const auto& b : built)
          if (b) text::free_code(b->copy);  // never published
        return Status::error("cannot probe '" + s.name + "' (" + common::hex_address(s.function) + " in " + s.object +
                             "): " + p.status().message());
      }
      built[i] = std::move(*p);
      on.push_back(built[i].get());
    } else if (s.mode != Mode::off && changes[i].mode == Mode::off) {
      off.push_back(s.probe.get());
    }
  }
  if (Status st = change_trap_probes(on, off, retired); !st.ok()) return st;
  for (std::size_t i = 0; i < changes.size(); ++i) {
    Site& s = *changes[i].site;
    if (built[i]) s.probe = std::move(built[i]);
    if (changes[i].mode == Mode::off) s.probe.reset();
    s.mode = changes[i].mode;
  }
  return {};
}

Status apply_batch_modes(const std::vector<ModeChange>& changes, Retired& retired) {
  std::vector<text::UnexecutedWrite> literals;
  std::vector<bool> built(changes.size());
  // A failure after copies were built: they are retired (a failed batch may have carried a
  // thread into one), and their functions left without.
  const auto drop_built = [&] {
    for (std::size_t i = 0; i < changes.size(); ++i)
      if (built[i]) retire_copy(*changes[i].site, retired);
  };
  const std::vector<std::vector<std::uint8_t>> code = read_functions_to_plan(changes);
  for (std::size_t i = 0; i < changes.size(); ++i) {
    const ModeChange& c = changes[i];
    Site& s = *c.site;
    if (s.relocated && s.mode == Mode::off && c.mode != Mode::off) {
      if (Status st = prepare_detour(s, code[i]); !st.ok()) {
        drop_built();
        return st;
      }
      built[i] = true;
      continue;
    }
    if (c.mode != Mode::common || s.literal_written) continue;
    literals.push_back({reinterpret_cast<void*>(s.entry - 8),
                        {reinterpret_cast<const std::uint8_t*>(&s.cell), sizeof s.cell}});
  }
  if (Status st = text::write_unexecuted(literals); !st.ok()) {
    drop_built();
    return st;
  }
  for (const ModeChange& c : changes) {
    if (c.mode == Mode::common) c.site->literal_written = true;
  }

  std::vector<DirectSlot> taken(changes.size());
  const auto give_up = [&](Status st) {
    for (const DirectSlot& slot : taken) {
      if (!slot) continue;
      slot.data->tag.store(0, std::memory_order_release);
      retired.slots.push_back(slot);
    }
    drop_built();
    return st;
  };
  text::PatchBatch batch;
  batch.reserve(2 * changes.size());
  retired.copies.reserve(retired.copies.size() + changes.size());  // a detach retires one a function
  // The entry pads' jmps, queued after the sites and runs: each group is in address order as
  // the sites are, so text::apply merges two sorted halves instead of sorting them.
  std::vector<std::pair<void*, arch::Insn5>> pad_jmps;
  for (std::size_t i = 0; i < changes.size(); ++i) {
    const ModeChange& c = changes[i];
    const Site& s = *c.site;
    arch::Insn5 insn = arch::kNop5;
    if (c.mode != Mode::off) {
      std::uintptr_t callee = 0;
      if (c.mode == Mode::common) {
        auto thunk = thunk_near(s.entry);
        if (!thunk.ok()) return give_up(thunk.status());
        callee = *thunk;
      } else if (s.slot && s.slot_ops == c.direct_ops) {
        callee = s.slot.code;  // the ops' own slot from before other ops joined the site
      } else {
        auto slot = take_slot_near(s.entry);
        if (!slot.ok()) return give_up(slot.status());
        taken[i] = *slot;
        slot->data->state.store(c.direct_ops->state, std::memory_order_relaxed);
        slot->data->index.store(s.cell->index, std::memory_order_relaxed);
        slot->data->function.store(s.function, std::memory_order_relaxed);
        slot->data->tag.store(s.entry + 5, std::memory_order_release);
        callee = slot->code;
      }
      const auto call = arch::encode_call(s.entry, callee);
      if (!call) return give_up(Status::error("internal: hook code out of rel32 reach of " + common::hex_address(s.entry)));
      insn = *call;
    }
    // GCC's five 1-byte nops (only ever at a site's first enable) become the call directly:
    // the batch moves threads that are between two of them to the end of the run before it
    // writes the tail (DESIGN, "Normalisation of GCC's entries"), all such sites in one
    // signal round.
    const bool gcc_entry =
        !s.relocated && s.mode == Mode::off && sites::hooks::form_at(s.entry) == EntryForm::nop1x5;
    // A relocated function going off keeps its pad's site as it is (detour.h says why that is
    // safe): a third fewer patches for a detach.
    const bool pad_site_kept = s.relocated && c.mode == Mode::off;
    Status st = pad_site_kept ? Status()
                : gcc_entry   ? batch.add_over_nops(reinterpret_cast<void*>(s.entry), insn)
                              : batch.add(reinterpret_cast<void*>(s.entry), insn);
    if (st.ok() && s.relocated && (s.mode == Mode::off) != (c.mode == Mode::off)) {
      const sites::hooks::Detour& d = *s.detour;
      auto* run = reinterpret_cast<void*>(d.plan->run_start);
      auto* pad_jmp = reinterpret_cast<void*>(s.entry + arch::kRel32InsnSize);
      if (c.mode != Mode::off) {
        pad_jmps.emplace_back(pad_jmp, d.pad_jmp);
        st = batch.add_displacing(run, d.jmp, d.moves());
      } else if (const auto home = sites::hooks::pad_jmp_home(s.entry, d.plan->run_start)) {
        st = batch.add_resuming(run, std::span(d.plan->run_bytes).first(arch::kRel32InsnSize), d.copy);
        pad_jmps.emplace_back(pad_jmp, *home);
      } else {
        st = Status::error("internal: the entry pad of " + common::hex_address(s.function) + " is out of rel32 reach");
      }
    }
    if (!st.ok()) return give_up(st);
  }
  for (const auto& [address, jmp] : pad_jmps) {
    if (Status st = batch.add(address, jmp); !st.ok()) return give_up(st);
  }
  if (Status st = text::apply(batch); !st.ok()) return give_up(st);
  for (std::size_t i = 0; i < changes.size(); ++i) {
    Site& s = *changes[i].site;
    const bool leaves_detour = s.relocated && changes[i].mode == Mode::off && s.mode != Mode::off;
    s.mode = changes[i].mode;
    if (leaves_detour) retire_copy(s, retired);
    if (taken[i]) {
      if (s.slot) {  // an earlier owner's, detached since (its tag is cleared)
        s.slot.data->tag.store(0, std::memory_order_release);
        retired.slots.push_back(s.slot);
      }
      s.slot = taken[i];
      s.slot_ops = changes[i].direct_ops;
    }
    retire_dead_slot(s, retired);
  }
  return {};
}

}  // namespace

}  // namespace tramway::hooks::detail
