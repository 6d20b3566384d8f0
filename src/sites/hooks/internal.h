// Internals shared by the function-hook files (tramway/hooks.h). Not installed.
//
// A hooked site owns a SiteCell in tramway's memory and, from its first enable on, its literal
// slot [entry - 8, entry) holds the cell's address; the slot is written once, while the site
// is still a nop (no thread reads it before the site calls the stub), so it never tears.
// Afterwards the ops a site runs change by one atomic store into its cell: the ops' State when
// there is one (it holds what the stubs' fast path reads), else a per-site immutable OpsList
// (tagged with bit 0). Lists and ops states are read only inside the stub's marker region, so
// they are freed after a trace-flavor grace period. Enabling and disabling sites is one patch
// batch: the 5-byte nop at the entry becomes `call thunk` (a generated `jmp
// *tramway_hook_entry` within rel32 reach) and back.
//
// A function without a patchable entry has its site in its entry pad (detour.h), the same
// machinery behind it; one hooked by a trap probe has none: the SIGTRAP handler reads its cell
// (trap_probes.h), and it is never direct.
//
// A site whose only ops is direct calls a slot of the direct pool instead (direct_slots.cc);
// the slot's data names the ops. The cell is kept up to date in every mode, so a thread that
// entered through either path finds the ops it should run.
//
// Objects that are unloaded: a batch writes only into objects it pinned, and the tables drop
// objects that are gone before they are used (sites/hooks/unload.h).
//
// The files, one concept each:
//   hooks.cc            the hook tables' lock (g_mu) and the API: attach, detach, detach_async,
//                       enable, disable, counters
//   sites.cc            the site table and its state machine: cells, ops lists, thunks, modes
//                       (off, common, direct) and the one batch that changes them
//   direct_slots.cc     the pool of direct trampoline slots near sites
//   counters.cc         hit counters: per-thread blocks, and their ops and site indices
//   extended_state.cc   the xsave layout, and the callback run between xsave and xrstor
//   dispatch.cc         the C++ dispatchers the stubs (arch/x86_64/hook_entry.S) call
//   discovery.cc        reading an object's patchable entries and functions (discovery.h)
//   hook_kind.cc        how a function without a patchable entry can be hooked, and what is
//                       refused whatever its bytes (hook_kind.h)
//   detour.cc           entry pads and relocated copies of functions without patchable entries
//   trap_probes.cc      trap probes: the probe table, the SIGTRAP handler's part (trap_probes.h)
//   discovery_cache.cc  the functions loaded now, read once an object, the filters'
//                       selection from them, patchable_functions(), functions()
//   unload.cc           object pins, the dlclose interposer, and the tables forgetting objects
//                       that are gone (unload.h)
//
// Everything here is hidden: private to the library, as the stubs' symbols are.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "arch/x86_64/hook_layout.h"
#include "sites/hooks/detour.h"
#include "sites/hooks/discovery.h"
#include "sites/hooks/trap_probes.h"
#include "sites/hooks/unload.h"
#include "tramway/grace.h"
#include "tramway/hooks.h"

#pragma GCC visibility push(hidden)

namespace tramway::hooks {

namespace detail {
struct Site;
}

// Ops::State is a member of a public class, so of default visibility, and names the hidden
// Site. Nothing outside the library sees inside it (an Ops holds only a pointer), so the
// mismatch GCC warns about cannot matter.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wattributes"
// A cell or a direct slot with one ops names its State, not the Ops, so that the stubs' fast
// path finds everything it reads (its first 24 bytes) in one line, one load away from the cell.
struct Ops::State {
  std::atomic<std::uint8_t> fast{0};  // how the stubs run it inline: fast_mode() (hooks.cc)
  std::atomic<bool> enabled{true};
  bool direct = false;    // Ops::direct at attach
  bool extended = false;  // Ops::save_extended_state at attach
  std::uint32_t id = 0;   // index of its hit counters in every thread's block
  EntryCallback entry = nullptr;  // Ops::entry at attach: the code the scan proved
  Ops* ops = nullptr;
  bool vector_free = false;  // the callback touches no vector register nor its EntryRegs
  bool detaching = false;    // unpublished: detach_async began, or a detach failed (under g_mu)
  bool detach_failed = false;  // that detach's grace period failed: detach again finishes it
  std::uint64_t hits_baseline = 0;  // what the blocks held for `id` when it was attached
  std::atomic<std::uint64_t> recursion_skipped{0};
  // The sites of the functions attached to: g_sites' nodes, which stay put until their object is
  // forgotten (which takes them out of here). Pointers, not entries: 10,000 lookups in a table
  // of every site ever hooked were most of a detach's CPU time (under g_mu).
  std::vector<detail::Site*> sites;
  // Their objects (key, path), which a detach pins: found once here rather than by looking up
  // every entry's site again (under g_mu).
  std::vector<std::pair<sites::hooks::ObjectKey, std::string>> objects;
};
#pragma GCC diagnostic pop

// The fast path's view of these structures (arch/x86_64/hook_layout.h).
#pragma GCC diagnostic push
// Ops::State is not standard-layout (it holds a vector); GCC and Clang lay it out alike.
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
static_assert(offsetof(Ops::State, fast) == TRAMWAY_STATE_FAST && offsetof(Ops::State, id) == TRAMWAY_STATE_ID &&
              offsetof(Ops::State, entry) == TRAMWAY_STATE_ENTRY && offsetof(Ops::State, ops) == TRAMWAY_STATE_OPS &&
              sizeof(Ops::State::fast) == 1 && sizeof(Ops::State::id) == 4);
#pragma GCC diagnostic pop

}  // namespace tramway::hooks

namespace tramway::hooks::detail {

using sites::hooks::EntryForm;
using sites::hooks::ObjectKey;

// --- hooks.cc: the lock ----------------------------------------------------------------------
// g_mu, the hook tables: every table below is under it (lock rank and order: hooks.cc).
extern std::mutex g_mu;

// --- counters.cc: hit counters ---------------------------------------------------------------
// Read by the stubs' fast path (arch/x86_64/hook_entry.S) under their assembler names. The
// thread-locals' definitions repeat the TLS model: GCC takes it from the definition, and
// without it the file defining one would reach it through __tls_get_addr.
constexpr std::uint32_t kMaxOps = TRAMWAY_MAX_OPS, kMaxSites = TRAMWAY_MAX_SITES;
struct CounterBlock {  // hit counters of one thread (counters.cc)
  std::atomic<pid_t> owner;
  CounterBlock* next;
  std::uint64_t hits[kMaxOps];
  std::uint64_t site_hits[kMaxSites + 1];  // the last one for every site past kMaxSites: never read
};
static_assert(offsetof(CounterBlock, hits) == TRAMWAY_BLOCK_HITS &&
              offsetof(CounterBlock, site_hits) == TRAMWAY_BLOCK_SITE_HITS);
extern thread_local constinit CounterBlock* t_block __asm__("tramway_hook_counter_block")
    __attribute__((tls_model("initial-exec")));

// The calling thread's block, claimed (async-signal-safe) on its first call; null when out of
// memory.
CounterBlock* claim_block() noexcept;
inline CounterBlock* my_block() noexcept { return t_block ? t_block : claim_block(); }

inline void bump(std::uint64_t& counter) noexcept {  // only this thread writes it
  std::atomic_ref<std::uint64_t> c(counter);
  c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

std::uint64_t sum_hits(std::uint32_t id);
std::uint64_t sum_site_hits(std::uint32_t index);

extern std::uint32_t g_next_site_index;  // under g_mu
extern std::vector<std::uint32_t> g_free_ids;  // under g_mu
extern std::uint32_t g_next_id;

// --- dispatch.cc: the dispatchers ------------------------------------------------------------
struct SiteCell;
// Runs the callbacks `cell` names now (the recursion guard, counters), with the marker raised.
void run_cell_callbacks(const SiteCell& cell, std::uintptr_t caller, EntryRegs& regs);
// Set while this thread runs callbacks: the recursion guard (DESIGN invariant 7).
extern thread_local constinit bool t_in_callback __asm__("tramway_hook_in_callback")
    __attribute__((tls_model("initial-exec")));

// --- extended_state.cc: Ops::save_extended_state ---------------------------------------------
struct XsaveLayout {
  bool usable = false;
  std::uint32_t size = 0;
  std::uint64_t mask = 0;
};
// What xsave must save (CPUID and XCR0, read once); `usable` false without XSAVE.
const XsaveLayout& xsave_layout();
// Runs `o`'s callback between xsave and xrstor of every state component the OS enabled.
__attribute__((target("xsave"), noinline)) void call_saving_extended_state(Ops& o, std::uintptr_t entry,
                                                                          std::uintptr_t caller, EntryRegs& regs);

// --- direct_slots.cc: direct trampoline slots ------------------------------------------------
struct SlotData {
  std::atomic<std::uintptr_t> tag;  // the owner's body, or 0
  std::atomic<Ops::State*> state;
  std::atomic<std::uint32_t> index;  // the owner site's hit counter
  std::uint32_t unused;
  std::atomic<std::uintptr_t> function;  // the owner's function (written before the tag)
};
static_assert(offsetof(SlotData, tag) == TRAMWAY_SLOT_TAG && offsetof(SlotData, state) == TRAMWAY_SLOT_STATE &&
              offsetof(SlotData, index) == TRAMWAY_SLOT_INDEX &&
              offsetof(SlotData, function) == TRAMWAY_OWNER_FUNCTION && sizeof(SlotData) == 32);

struct DirectSlot {
  std::uintptr_t code = 0;  // what the site calls (RX)
  SlotData* data = nullptr;  // through the RW view
  explicit operator bool() const noexcept { return code != 0; }
};

// A free slot within rel32 reach of `entry`, its tag 0 (under g_mu).
Result<DirectSlot> take_slot_near(std::uintptr_t entry);
void give_back_slot(const DirectSlot& slot);  // after its grace period; under g_mu

// --- sites.cc: sites and their modes ---------------------------------------------------------
constexpr std::uintptr_t kListTag = 1;

struct OpsList {
  std::size_t count;
  Ops* ops[1];  // `count` of them
};

struct alignas(64) SiteCell {
  std::atomic<std::uintptr_t> target{0};  // Ops::State*, OpsList* | kListTag, or 0
  std::uint32_t index = 0;                // of the site's hit counter
  std::uintptr_t unused = 0;
  std::uintptr_t function = 0;            // the function's entry: the site's, or the one its detour serves
};
static_assert(offsetof(SiteCell, target) == TRAMWAY_CELL_TARGET && offsetof(SiteCell, index) == TRAMWAY_CELL_INDEX &&
              offsetof(SiteCell, function) == TRAMWAY_OWNER_FUNCTION);

enum class Mode : std::uint8_t { off, common, direct };

struct Site {
  std::uintptr_t function = 0;  // the table's key: the function's entry, what callbacks are told
  // The 5-byte site: the function's patchable entry, or for a relocated function the site of
  // its entry pad (sites/hooks/detour.h), taken on its first hook and kept.
  std::uintptr_t entry = 0;
  bool relocated = false;       // no patchable entry: hooked through a detour while not off
  bool trap = false;            // hooked by a trap probe while not off (never direct: no site to call a slot)
  std::unique_ptr<TrapProbe> probe;  // trap, while not off
  std::size_t size = 0;         // relocated: the symbol's size, the bytes the relocator decodes
  std::unique_ptr<sites::hooks::Detour> detour;  // relocated, while not off: the copy of its run
  // relocated: the relocator's plan of its original bytes, reused by every hook for as long as
  // the run still holds them (sites.cc: read_functions_to_plan).
  std::shared_ptr<const arch::RelocationPlan> plan;
  std::string name, object;
  ObjectKey object_key;
  SiteCell* cell = nullptr;  // freed only by an eject's unload: the literal slot points at it
  bool literal_written = false;
  // What the site holds: a nop, a call of the thunk or of `slot` (a relocated function's pad
  // site in mode off keeps its last call: detour.h).
  Mode mode = Mode::off;
  DirectSlot slot;           // called in mode direct; kept in the others while slot_ops is attached
  Ops* slot_ops = nullptr;   // the ops `slot` names; 0 once its tag is cleared
  std::vector<Ops*> ops;
  bool enabled() const noexcept { return mode != Mode::off; }
};

extern std::map<std::uintptr_t, Site> g_sites;  // every site ever hooked, by function (under g_mu)

// What a site with these ops should be (a trap probe's is never direct).
Mode mode_for(const Site& s, const std::vector<Ops*>& ops);
bool site_is(const Site& s, Mode m, const std::vector<Ops*>& ops);

// What may be read by threads still inside a stub: reused or freed after a grace period. The
// copies of detours no function jumps to any more need a tasks-flavor one, whose ranges were
// passed to grace::retire when they were unpublished (a tasks grace period is a trace one too).
struct Retired {
  std::vector<std::uintptr_t> targets;  // cell targets replaced (lists are freed)
  std::vector<DirectSlot> slots;        // tags cleared, given back to the pool
  std::vector<text::CodeBlock> copies;  // detours' and trap probes' copies, retired
  std::vector<void*> probe_tables;      // trap probe tables replaced (trap_probes.cc)
  bool empty() const noexcept { return targets.empty() && slots.empty() && copies.empty() && probe_tables.empty(); }
  grace::Flavor flavor() const noexcept { return copies.empty() ? grace::Flavor::trace : grace::Flavor::tasks; }
};
// Unpublishes a detour's copy: retired for the next tasks grace period, freed after it.
void retire_copy(Site& s, Retired& retired);

// The cell target for these ops: 0, the one ops's State, or a new list.
std::uintptr_t target_for(const std::vector<Ops*>& ops);
void release(const Retired& r);  // after a grace period; takes g_mu
void release_after_grace_period(Retired r);

// A slot whose tag was cleared, once its site no longer calls it, is retired.
void retire_dead_slot(Site& s, Retired& retired);

struct ModeChange {
  Site* site;
  Mode mode;
  Ops* direct_ops;  // mode direct: the ops its slot is to name
};
// Puts each site in its new mode, all in one batch; on failure no site changed mode.
Status apply_modes(const std::vector<ModeChange>& changes, Retired& retired);

// --- discovery_cache.cc: the patchable functions loaded now ----------------------------------
struct Candidate {
  std::uintptr_t entry;       // the function's
  HookKind kind;              // patchable, relocatable, or trap
  const std::string* name;    // in the discovery cache, valid under g_mu
  const std::string* object;
  const ObjectKey* key;
  EntryForm form;
  std::size_t size;  // the symbol's; 0 when none
  std::shared_ptr<const arch::RelocationPlan> plan;  // relocatable: its classification's (HookKindOf::plan)
};

extern std::uint64_t g_all_version;  // rebuilds of the candidate list: candidates taken from it stay valid meanwhile

// Every patchable function loaded now, sorted by entry (under g_mu).
const std::vector<Candidate>& all_candidates();
// The functions the filter selects, or an error naming what did not match (under g_mu); trap
// probes only with `allow_trap`.
Result<std::vector<Candidate>> select(const Filter& filter, bool allow_trap);
// Drops an object from the cache, remembering it as unloaded: a reload is read afresh.
void uncache_object(const ObjectKey& key);

// --- unload.cc: objects that are gone --------------------------------------------------------
// Forgets every object of the tables that is gone (sites/hooks/unload.h). Under g_mu, before
// the tables are used: no batch runs meanwhile, so an object alive when looked at keeps what
// was written in it.
void forget_dead_objects();

}  // namespace tramway::hooks::detail

#pragma GCC visibility pop
