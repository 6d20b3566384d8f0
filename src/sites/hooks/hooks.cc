// Function hooks through the common entry (tramway/hooks.h).
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
// A site whose only ops is direct calls a slot of the direct pool instead (see "direct
// trampoline slots"); the slot's data names the ops. The cell is kept up to date in every
// mode, so a thread that entered through either path finds the ops it should run.
//
// Objects that are unloaded: a batch writes only into objects it pinned, and the tables drop
// objects that are gone before they are used (sites/hooks/unload.h).
//
// Lock order (common/lock_order.h): g_mu, the hook tables, rank hooks_tables: after the
// recorder's and the grace period's, before the text layer's; fork() takes it. Never held
// across a grace period (callbacks may take it: hooks::disable, counters). The loader lock
// comes before it and dl_iterate_phdr's after it (unload.h says why).
#include "tramway/hooks.h"

#include <cpuid.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <fnmatch.h>
#include <immintrin.h>
#include <link.h>
#include <pthread.h>

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <utility>

#include "arch/x86_64/callback_scan.h"
#include "arch/x86_64/hook_layout.h"
#include "arch/x86_64/insn.h"
#include "common/fork_hooks.h"
#include "common/format.h"
#include "common/loader_gate.h"
#include "grace/internal.h"
#include "sites/hooks/discovery.h"
#include "sites/hooks/unload.h"
#include "tramway/grace.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/patch.h"

extern "C" void tramway_hook_entry();   // hook_entry.S
extern "C" void tramway_hook_direct();  // hook_entry.S

namespace tramway::hooks {

// A cell or a direct slot with one ops names its State, not the Ops, so that the stubs' fast
// path finds everything it reads (its first 24 bytes) in one line, one load away from the cell.
struct Ops::State {
  std::atomic<std::uint8_t> fast{0};  // how the stubs run it inline: fast_mode()
  std::atomic<bool> enabled{true};
  bool direct = false;    // Ops::direct at attach
  bool extended = false;  // Ops::save_extended_state at attach
  std::uint32_t id = 0;   // index of its hit counters in every thread's block
  EntryCallback entry = nullptr;  // Ops::entry at attach: the code the scan below proved
  Ops* ops = nullptr;
  bool vector_free = false;  // the callback touches no vector register nor its EntryRegs
  bool detaching = false;    // unpublished: detach_async began, or a detach failed (under g_mu)
  bool detach_failed = false;  // that detach's grace period failed: detach again finishes it
  std::uint64_t hits_baseline = 0;  // what the blocks held for `id` when it was attached
  std::atomic<std::uint64_t> recursion_skipped{0};
  std::vector<std::uintptr_t> entries;  // functions attached to (under g_mu)
  // Their objects (key, path), which a detach pins: found once here rather than by looking up
  // every entry's site again (under g_mu).
  std::vector<std::pair<sites::hooks::ObjectKey, std::string>> objects;
};

// Read by the stubs' fast path (arch/x86_64/hook_entry.S) under their assembler names, so
// outside the anonymous namespace; hidden, so still private to the library.
namespace detail {
constexpr std::uint32_t kMaxOps = TRAMWAY_MAX_OPS, kMaxSites = TRAMWAY_MAX_SITES;
struct CounterBlock {  // hit counters of one thread (see "hit counters" below)
  std::atomic<pid_t> owner;
  CounterBlock* next;
  std::uint64_t hits[kMaxOps];
  std::uint64_t site_hits[kMaxSites + 1];  // the last one for every site past kMaxSites: never read
};
__attribute__((visibility("hidden"))) thread_local constinit CounterBlock* t_block
    __asm__("tramway_hook_counter_block") __attribute__((tls_model("initial-exec"))) = nullptr;
// Set while this thread runs callbacks: the recursion guard (DESIGN invariant 7).
__attribute__((visibility("hidden"))) thread_local constinit bool t_in_callback
    __asm__("tramway_hook_in_callback") __attribute__((tls_model("initial-exec"))) = false;
}  // namespace detail
using detail::CounterBlock, detail::kMaxOps, detail::kMaxSites, detail::t_block, detail::t_in_callback;

// The fast path's view of these structures (arch/x86_64/hook_layout.h).
static_assert(offsetof(CounterBlock, hits) == TRAMWAY_BLOCK_HITS &&
              offsetof(CounterBlock, site_hits) == TRAMWAY_BLOCK_SITE_HITS);
#pragma GCC diagnostic push
// Ops::State is not standard-layout (it holds a vector); GCC and Clang lay it out alike.
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
static_assert(offsetof(Ops::State, fast) == TRAMWAY_STATE_FAST && offsetof(Ops::State, id) == TRAMWAY_STATE_ID &&
              offsetof(Ops::State, entry) == TRAMWAY_STATE_ENTRY && offsetof(Ops::State, ops) == TRAMWAY_STATE_OPS &&
              sizeof(Ops::State::fast) == 1 && sizeof(Ops::State::id) == 4);
#pragma GCC diagnostic pop

namespace {

using sites::hooks::EntryForm;

// What the stubs may do inline for an ops (hook_entry.S): nothing while it is disabled or
// saves extended state (the dispatcher does that), else call it — skipping the xmm0-7 saves
// when the callback was proven to leave vector registers and its EntryRegs alone.
std::uint8_t fast_mode(const Ops::State& st) {
  if (!st.enabled.load(std::memory_order_relaxed) || st.extended) return TRAMWAY_FAST_NONE;
  return st.vector_free ? TRAMWAY_FAST_LEAN : TRAMWAY_FAST_SAVING;
}
void set_enabled(Ops::State& st, bool on) {  // under g_mu
  st.enabled.store(on, std::memory_order_relaxed);
  st.fast.store(fast_mode(st), std::memory_order_relaxed);
}

constexpr std::uintptr_t kListTag = 1;

struct OpsList {
  std::size_t count;
  Ops* ops[1];  // `count` of them
};

struct alignas(64) SiteCell {
  std::atomic<std::uintptr_t> target{0};  // Ops::State*, OpsList* | kListTag, or 0
  std::uint32_t index = 0;                // of the site's hit counter
};
static_assert(offsetof(SiteCell, target) == TRAMWAY_CELL_TARGET && offsetof(SiteCell, index) == TRAMWAY_CELL_INDEX);

// ---- hit counters ----------------------------------------------------------------------------
// A locked increment per call costs about 5 ns, more than the rest of the call path, so each
// thread counts in its own block, which only it writes; counters() sums the blocks. Blocks
// are mmapped (async-signal-safe: callbacks may run in signal handlers), chained in a list
// that only grows, and a block whose thread has exited is taken over by the next new thread
// (its counts stay: only sums are read). An ops id is reused once its ops is detached; the
// new ops starts from the sum the blocks hold then. Sites count too, by an index given when a
// site is first hooked and never reused (a site past kMaxSites goes uncounted); the block is
// mapped without reserve, so only the pages of sites a thread ran take memory.
std::atomic<CounterBlock*> g_blocks{nullptr};

CounterBlock* claim_block() noexcept {
  const pid_t me = static_cast<pid_t>(::syscall(SYS_gettid));
  for (CounterBlock* b = g_blocks.load(std::memory_order_acquire); b; b = b->next) {
    pid_t owner = b->owner.load(std::memory_order_relaxed);
    if (::syscall(SYS_tgkill, ::getpid(), owner, 0) != 0 && errno == ESRCH &&
        b->owner.compare_exchange_strong(owner, me)) {
      return t_block = b;
    }
  }
  void* mem = ::mmap(nullptr, sizeof(CounterBlock), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
  if (mem == MAP_FAILED) return nullptr;
  auto* b = static_cast<CounterBlock*>(mem);  // zero-filled
  b->owner.store(me, std::memory_order_relaxed);
  b->next = g_blocks.load(std::memory_order_relaxed);
  while (!g_blocks.compare_exchange_weak(b->next, b, std::memory_order_acq_rel)) {
  }
  return t_block = b;
}

inline void bump(std::uint64_t& counter) noexcept {  // only this thread writes it
  std::atomic_ref<std::uint64_t> c(counter);
  c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

inline CounterBlock* my_block() noexcept { return t_block ? t_block : claim_block(); }

std::uint64_t sum_hits(std::uint32_t id) {
  std::uint64_t sum = 0;
  for (CounterBlock* b = g_blocks.load(std::memory_order_acquire); b; b = b->next) {
    sum += std::atomic_ref<std::uint64_t>(b->hits[id]).load(std::memory_order_relaxed);
  }
  return sum;
}

std::uint64_t sum_site_hits(std::uint32_t index) {
  std::uint64_t sum = 0;
  for (CounterBlock* b = g_blocks.load(std::memory_order_acquire); b; b = b->next) {
    sum += std::atomic_ref<std::uint64_t>(b->site_hits[index]).load(std::memory_order_relaxed);
  }
  return sum;
}

std::uint32_t g_next_site_index = 0;  // under g_mu

std::vector<std::uint32_t> g_free_ids;  // under g_mu
std::uint32_t g_next_id = 0;

// ---- extended state -------------------------------------------------------------------------
// What xsave must save for Ops::save_extended_state: the components the OS enabled (XCR0) and
// the size of the standard-format area for them (CPUID leaf 0xD).
struct XsaveLayout {
  bool usable = false;
  std::uint32_t size = 0;
  std::uint64_t mask = 0;
};
const XsaveLayout& xsave_layout() {
  static const XsaveLayout layout = [] {
    XsaveLayout l;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_XSAVE) || !(c & bit_OSXSAVE)) return l;
    std::uint32_t lo, hi;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    l.mask = (std::uint64_t{hi} << 32) | lo;
    __cpuid_count(0xd, 0, a, b, c, d);
    l.size = b;  // for the components enabled in XCR0
    l.usable = l.size >= 576;
    return l;
  }();
  return layout;
}

// ---- direct trampoline slots -----------------------------------------------------------------
// A chunk is one page of generated code near some sites: kSlotsPerChunk slots of 16 bytes,
//   lea data_i(%rip), %r11             ; this slot's SlotData
//   jmp *stub(%rip)                    ; tramway_hook_direct, its address at kDataOffset - 8
//   int3 x 3
// then, from kDataOffset on (cache lines no code shares, so writing them never disturbs a
// line being executed), each slot's SlotData. Code is written once, when the chunk is made,
// and chunks are never unmapped: slots are type-stable. A slot gets an owner (a site and a
// direct ops) by its data: the ops' State first, then the tag (the site's body, entry + 5)
// with release.
// The data then stays as it is for as long as that ops is attached to that site, even while
// the site goes through the common entry because other ops joined it: a thread that called
// the slot earlier and was preempted before its marker still runs the ops, so no call is
// lost, and the site takes the same slot again when the ops is alone there once more.
// Retiring a slot (its ops detached, or the object unloaded): the tag is cleared, the site
// stops calling it (batch), a trace-flavor grace period passes, and only then may another
// owner have it. A thread that called it before and raised its marker after the clear reads
// a tag that is 0 or another site's, and returns into the function untraced.
struct SlotData {
  std::atomic<std::uintptr_t> tag;  // the owner's body, or 0
  std::atomic<Ops::State*> state;
  std::atomic<std::uint32_t> index;  // the owner site's hit counter
  std::uint32_t unused[3];
};
static_assert(offsetof(SlotData, tag) == TRAMWAY_SLOT_TAG && offsetof(SlotData, state) == TRAMWAY_SLOT_STATE &&
              offsetof(SlotData, index) == TRAMWAY_SLOT_INDEX);
constexpr std::size_t kChunkSize = 4096, kSlotCodeSize = 16, kDataOffset = 2048;
constexpr std::size_t kSlotsPerChunk = (kChunkSize - kDataOffset) / sizeof(SlotData);
static_assert(kSlotsPerChunk * kSlotCodeSize + 8 <= kDataOffset);

struct DirectSlot {
  std::uintptr_t code = 0;  // what the site calls (RX)
  SlotData* data = nullptr;  // through the RW view
  explicit operator bool() const noexcept { return code != 0; }
};
struct Chunk {
  text::CodeBlock block;
  std::vector<std::uint16_t> free;  // slot indices
};
std::vector<Chunk> g_chunks;  // under g_mu; permanent

DirectSlot slot_of(const Chunk& c, std::size_t i) {
  return {reinterpret_cast<std::uintptr_t>(c.block.rx) + i * kSlotCodeSize,
          reinterpret_cast<SlotData*>(c.block.rw + kDataOffset) + i};
}

Result<DirectSlot> take_slot_near(std::uintptr_t entry) {
  for (Chunk& c : g_chunks) {
    if (c.free.empty() || !arch::encode_call(entry, reinterpret_cast<std::uintptr_t>(c.block.rx)) ||
        !arch::encode_call(entry, reinterpret_cast<std::uintptr_t>(c.block.rx) + kDataOffset)) {
      continue;
    }
    const std::size_t i = c.free.back();
    c.free.pop_back();
    return slot_of(c, i);
  }
  auto block = text::allocate_code_near(reinterpret_cast<const void*>(entry), kChunkSize);
  if (!block.ok()) return block.status();
  Chunk c{*block, {}};
  std::memset(c.block.rw, arch::kInt3, kDataOffset);
  for (std::size_t i = 0; i < kSlotsPerChunk; ++i) {
    std::uint8_t* code = c.block.rw + i * kSlotCodeSize;
    const auto lea = static_cast<std::int32_t>(kDataOffset + i * sizeof(SlotData)) -
                     static_cast<std::int32_t>(i * kSlotCodeSize + 7);
    const auto jmp = static_cast<std::int32_t>(kDataOffset - 8) - static_cast<std::int32_t>(i * kSlotCodeSize + 13);
    const std::uint8_t lea_r11[3] = {0x4c, 0x8d, 0x1d}, jmp_mem[2] = {0xff, 0x25};
    std::memcpy(code, lea_r11, 3);
    std::memcpy(code + 3, &lea, 4);
    std::memcpy(code + 7, jmp_mem, 2);
    std::memcpy(code + 9, &jmp, 4);
  }
  const auto stub = reinterpret_cast<std::uintptr_t>(&tramway_hook_direct);
  std::memcpy(c.block.rw + kDataOffset - 8, &stub, sizeof stub);
  std::memset(c.block.rw + kDataOffset, 0, kChunkSize - kDataOffset);  // every tag 0
  for (std::size_t i = kSlotsPerChunk; i-- > 1;) c.free.push_back(static_cast<std::uint16_t>(i));
  g_chunks.push_back(std::move(c));
  return slot_of(g_chunks.back(), 0);
}

void give_back_slot(const DirectSlot& slot) {  // after its grace period; under g_mu
  for (Chunk& c : g_chunks) {
    const auto rx = reinterpret_cast<std::uintptr_t>(c.block.rx);
    if (slot.code >= rx && slot.code < rx + kDataOffset) {
      c.free.push_back(static_cast<std::uint16_t>((slot.code - rx) / kSlotCodeSize));
      return;
    }
  }
}

enum class Mode : std::uint8_t { off, common, direct };

using sites::hooks::ObjectKey;

struct Site {
  std::uintptr_t entry = 0;
  std::string name, object;
  ObjectKey object_key;
  SiteCell* cell = nullptr;  // never freed: the literal slot points at it
  bool literal_written = false;
  Mode mode = Mode::off;     // what the entry holds: a nop, a call of the thunk or of `slot`
  DirectSlot slot;           // called in mode direct; kept in the others while slot_ops is attached
  Ops* slot_ops = nullptr;   // the ops `slot` names; 0 once its tag is cleared
  std::vector<Ops*> ops;
  bool enabled() const noexcept { return mode != Mode::off; }
};

// What a site with these ops should be.
Mode mode_for(const std::vector<Ops*>& ops) {
  if (ops.empty()) return Mode::off;
  return ops.size() == 1 && ops[0]->state->direct ? Mode::direct : Mode::common;
}
bool site_is(const Site& s, Mode m, const std::vector<Ops*>& ops) {
  if (s.mode != m) return false;
  return m != Mode::direct || s.slot_ops == ops[0];
}

// What may be read by threads still inside a stub: reused or freed after a grace period.
struct Retired {
  std::vector<std::uintptr_t> targets;  // cell targets replaced (lists are freed)
  std::vector<DirectSlot> slots;        // tags cleared, given back to the pool
  bool empty() const noexcept { return targets.empty() && slots.empty(); }
};

std::mutex g_mu;  // lock rank hooks_tables (common/lock_order.h)
std::map<std::uintptr_t, Site> g_sites;  // every site ever hooked, by entry
std::vector<text::CodeBlock> g_thunks;   // permanent

// fork(): the child gets the tables whole (no attach or detach half done) and g_mu free. The
// forking thread's counter block names its parent-side tid, which is no thread of the child:
// it is renamed, or the child's next new thread would take it over while it is still in use.
void hooks_before_fork() { g_mu.lock(); }
void hooks_after_fork_in_parent() { g_mu.unlock(); }
void hooks_after_fork_in_child() {
  if (t_block) t_block->owner.store(static_cast<pid_t>(::syscall(SYS_gettid)), std::memory_order_relaxed);
  g_mu.unlock();
}
__attribute__((constructor)) void register_hooks_fork_hook() {
  common::register_fork_hook(
      {common::LockRank::hooks_tables, hooks_before_fork, hooks_after_fork_in_parent, hooks_after_fork_in_child});
}

std::uintptr_t target_for(const std::vector<Ops*>& ops) {
  if (ops.empty()) return 0;
  if (ops.size() == 1) return reinterpret_cast<std::uintptr_t>(ops[0]->state);
  auto* list = static_cast<OpsList*>(::operator new(sizeof(OpsList) + (ops.size() - 1) * sizeof(Ops*)));
  list->count = ops.size();
  std::copy(ops.begin(), ops.end(), list->ops);
  return reinterpret_cast<std::uintptr_t>(list) | kListTag;
}

void free_target(std::uintptr_t t) {
  if (t & kListTag) ::operator delete(reinterpret_cast<void*>(t & ~kListTag));
}

void release(const Retired& r) {  // after a grace period; takes g_mu
  for (std::uintptr_t t : r.targets) free_target(t);
  if (r.slots.empty()) return;
  std::lock_guard lock(g_mu);
  for (const DirectSlot& slot : r.slots) give_back_slot(slot);
}

void release_after_grace_period(Retired r) {
  std::erase_if(r.targets, [](std::uintptr_t t) { return !(t & kListTag); });
  if (r.empty()) return;
  (void)grace::call([r = std::move(r)] { release(r); });
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

Status not_patchable(const std::string& what) {
  return Status::error(what + " is not a patchable function: compile it with -fpatchable-function-entry=13,8 "
                              "(GCC >= 8, Clang >= 10)");
}

struct Candidate {
  std::uintptr_t entry;
  const std::string* name;    // in the discovery cache, valid under g_mu
  const std::string* object;
  const ObjectKey* key;
  EntryForm form;
};

// ---- discovery cache -----------------------------------------------------------------------------
// Reading an object's symbols with libelf costs milliseconds, so each loaded object is read
// once, keyed by load bias and name; objects unloaded since are dropped. Under g_mu.
struct CachedObject {
  sites::hooks::ObjectSites sites;
  bool seen = false;  // still loaded at the last refresh
};
std::map<ObjectKey, CachedObject> g_objects;
std::vector<Candidate> g_all;  // every cached site, sorted by entry; rebuilt when g_objects changes
bool g_all_stale = true;
std::uint64_t g_all_version = 0;  // rebuilds of g_all: candidates taken from it stay valid meanwhile

// The objects dropped from the cache lately, so that an address selected while its object was
// loaded (patchable_functions, then attach) is reported as unloaded, not as not patchable.
struct Unloaded {
  std::string path;
  std::uintptr_t first, last;  // entries
};
std::vector<Unloaded> g_unloaded;  // the last few, oldest first

void drop_cached(std::map<ObjectKey, CachedObject>::iterator it) {
  const auto& sites = it->second.sites.sites;
  if (!sites.empty()) {
    if (g_unloaded.size() == 16) g_unloaded.erase(g_unloaded.begin());
    g_unloaded.push_back({it->second.sites.path, sites.front().entry, sites.back().entry});
  }
  g_objects.erase(it);
  g_all_stale = true;
}

const Unloaded* unloaded_at(std::uintptr_t entry) {
  for (auto u = g_unloaded.rbegin(); u != g_unloaded.rend(); ++u) {
    if (entry >= u->first && entry <= u->last) return &*u;
  }
  return nullptr;
}

void refresh_objects() {
  for (auto& [key, o] : g_objects) o.seen = false;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void*) {
        auto [it, fresh] = g_objects.try_emplace({info->dlpi_addr, info->dlpi_name ? info->dlpi_name : ""});
        it->second.seen = true;
        if (fresh) {
          g_all_stale = true;
          auto sites = sites::hooks::discover_object(*info);
          if (sites.ok()) it->second.sites = std::move(*sites);  // unreadable: no sites
        }
        return 0;
      },
      nullptr);
  for (auto it = g_objects.begin(); it != g_objects.end();) {
    auto next = std::next(it);
    if (!it->second.seen) drop_cached(it);
    it = next;
  }
}

// Every patchable function loaded now, sorted by entry.
const std::vector<Candidate>& all_candidates() {
  refresh_objects();
  if (!g_all_stale) return g_all;
  g_all.clear();
  for (const auto& [key, o] : g_objects) {
    for (const auto& s : o.sites.sites) {
      g_all.push_back({s.entry, s.name.empty() ? &s.symbol : &s.name, &o.sites.path, &key, s.form});
    }
  }
  std::sort(g_all.begin(), g_all.end(), [](const Candidate& a, const Candidate& b) { return a.entry < b.entry; });
  g_all_stale = false;
  ++g_all_version;
  return g_all;
}

// The sites the filter selects, or an error naming what did not match.
Result<std::vector<Candidate>> select(const Filter& filter) {
  const std::vector<Candidate>& all = all_candidates();
  std::vector<Candidate> out;
  switch (filter.kind()) {
    case Filter::Kind::addresses:
      for (std::uintptr_t e : filter.entries()) {
        auto it = std::lower_bound(all.begin(), all.end(), e, [](const Candidate& c, std::uintptr_t v) { return c.entry < v; });
        if (it != all.end() && it->entry == e) {
          out.push_back(*it);
          continue;
        }
        if (const Unloaded* u = unloaded_at(e)) {
          return Status::error("the function at " + common::hex_address(e) + " was in " + u->path +
                               ", which was unloaded (object unloaded); nothing was attached");
        }
        return not_patchable("the function at " + common::hex_address(e));
      }
      break;
    case Filter::Kind::names:
      for (const std::string& n : filter.patterns()) {
        const std::size_t before = out.size();
        for (const Candidate& c : all) {
          if (*c.name == n) out.push_back(c);
        }
        if (out.size() == before) return not_patchable("'" + n + "' (no patchable function has that name)");
      }
      break;
    case Filter::Kind::glob:
      for (const Candidate& c : all) {
        if (fnmatch(filter.patterns()[0].c_str(), c.name->c_str(), 0) == 0) out.push_back(c);
      }
      if (out.empty()) {
        return Status::error("the filter '" + filter.patterns()[0] + "' matches no patchable function (" +
                             std::to_string(all.size()) + " are loaded)");
      }
      break;
  }
  std::sort(out.begin(), out.end(), [](const Candidate& a, const Candidate& b) { return a.entry < b.entry; });
  out.erase(std::unique(out.begin(), out.end(), [](const Candidate& a, const Candidate& b) { return a.entry == b.entry; }),
            out.end());
  return out;
}

// A slot whose tag was cleared, once its site no longer calls it, is retired.
void retire_dead_slot(Site& s, Retired& retired) {
  if (!s.slot || s.slot_ops || s.mode == Mode::direct) return;
  retired.slots.push_back(s.slot);
  s.slot = {};
}

struct ModeChange {
  Site* site;
  Mode mode;
  Ops* direct_ops;  // mode direct: the ops its slot is to name
};

// Puts each site in its new mode, all in one batch. Literal slots of sites entering common
// mode are written first, once, in one write per page (no thread reads one before its site
// calls the stub, and the batch's serialisations order these writes before that); slots of
// sites entering direct mode are filled before the batch too (no thread reaches a slot before
// its site calls it). After the batch, the slots sites left get their tag cleared and go to
// `retired`. On failure no site changed mode (the slots taken go to `retired`).
Status apply_modes(const std::vector<ModeChange>& changes, Retired& retired) {
  std::vector<text::UnexecutedWrite> literals;
  for (const ModeChange& c : changes) {
    Site& s = *c.site;
    if (c.mode != Mode::common || s.literal_written) continue;
    literals.push_back({reinterpret_cast<void*>(s.entry - 8),
                        {reinterpret_cast<const std::uint8_t*>(&s.cell), sizeof s.cell}});
  }
  if (Status st = text::write_unexecuted(literals); !st.ok()) return st;
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
    return st;
  };
  text::PatchBatch batch;
  batch.reserve(changes.size());
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
    const bool gcc_entry = s.mode == Mode::off && sites::hooks::form_at(s.entry) == EntryForm::nop1x5;
    Status st = gcc_entry ? batch.add_over_nops(reinterpret_cast<void*>(s.entry), insn)
                          : batch.add(reinterpret_cast<void*>(s.entry), insn);
    if (!st.ok()) return give_up(st);
  }
  if (Status st = text::apply(batch); !st.ok()) return give_up(st);
  for (std::size_t i = 0; i < changes.size(); ++i) {
    Site& s = *changes[i].site;
    s.mode = changes[i].mode;
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

// An object gone (unloaded, maybe loaded again since): it and its sites leave every table, so
// that a later load at the same address starts clean (its literal slots unwritten, its
// entries nops). Its code is not touched: nobody executes it, or it is a fresh copy. Under g_mu.
void forget_object(const ObjectKey& key) {
  if (auto it = g_objects.find(key); it != g_objects.end()) drop_cached(it);  // a reload here is read afresh
  Retired retired;
  std::vector<SiteCell*> cells;  // may still be read by a thread that was inside the stub
  for (auto it = g_sites.begin(); it != g_sites.end();) {
    Site& s = it->second;
    if (s.object_key != key) {
      ++it;
      continue;
    }
    for (Ops* o : s.ops) std::erase(o->state->entries, s.entry);
    retired.targets.push_back(s.cell->target.exchange(0, std::memory_order_acq_rel));
    if (s.slot) {
      s.slot.data->tag.store(0, std::memory_order_release);
      retired.slots.push_back(s.slot);
    }
    cells.push_back(s.cell);
    it = g_sites.erase(it);
  }
  if (cells.empty()) return;
  (void)grace::call([retired = std::move(retired), cells] {
    release(retired);
    for (SiteCell* c : cells) delete c;
  });
}

// What tramway wrote into a site's code that no fresh load of its object holds: the cell's
// address in its literal slot, or the call of its direct slot.
sites::hooks::Witness witness_of(const Site& s) {
  sites::hooks::Witness w;
  if (s.literal_written) {
    w.address = s.entry - 8;
    w.size = sizeof s.cell;
    std::memcpy(w.bytes, &s.cell, sizeof s.cell);
  } else if (s.mode == Mode::direct) {
    if (const auto call = arch::encode_call(s.entry, s.slot.code)) {
      w.address = s.entry;
      w.size = call->size();
      std::memcpy(w.bytes, call->data(), call->size());
    }
  }
  return w;
}

// Forgets every object of the tables that is gone (sites/hooks/unload.h). Under g_mu, before
// the tables are used: no batch runs meanwhile, so an object alive when looked at keeps what
// was written in it.
// The loader's unload count when forget_dead_objects last looked (under g_mu). While it has not
// moved, no object died since (every object in the tables was alive then, or pinned when it
// entered them), and the look — a pass over every site, a read of code per object — is skipped.
std::optional<unsigned long long> g_unloads_checked;

void forget_dead_objects() {
  if (g_sites.empty()) return;
  const std::optional<unsigned long long> unloads = sites::hooks::unloads_so_far();
  if (unloads && unloads == g_unloads_checked) return;
  g_unloads_checked = unloads;  // read before looking: an unload meanwhile is seen next time
  const sites::hooks::LoadedObjects loaded;
  std::map<ObjectKey, std::optional<bool>> gone;  // nullopt: undecided (nothing written to check yet)
  for (const auto& [entry, s] : g_sites) {
    std::optional<bool>& g = gone[s.object_key];
    if (!g) g = loaded.gone(s.object_key, witness_of(s));
  }
  for (const auto& [key, g] : gone) {
    if (g == true) forget_object(key);
  }
}

}  // namespace

Filter Filter::glob(std::string pattern) {
  Filter f;
  f.kind_ = Kind::glob;
  f.patterns_.push_back(std::move(pattern));
  return f;
}
Filter Filter::names(std::vector<std::string> names) {
  Filter f;
  f.kind_ = Kind::names;
  f.patterns_ = std::move(names);
  return f;
}
Filter Filter::addresses(std::vector<std::uintptr_t> entries) {
  Filter f;
  f.kind_ = Kind::addresses;
  f.entries_ = std::move(entries);
  return f;
}

namespace {

Status attached_already(const Ops& ops) {
  if (ops.state->detach_failed) {
    return Status::error("hooks::attach: this ops's detach failed (its grace period did not complete); call "
                         "hooks::detach again to finish it");
  }
  return Status::error(ops.state->detaching ? "hooks::attach: this ops is still being detached (wait for detach_async's done)"
                                            : "hooks::attach: this ops is attached already (detach it first)");
}

// Selects the filter's sites and pins their objects, so that none of them can be unmapped
// until `pins` is destroyed (sites/hooks/unload.h). Pinning takes the loader lock, so it is
// done without g_mu: a constructor or destructor calling hooks holds the loader lock and waits
// for g_mu. The caller selects again under g_mu.
// `first` is that selection, and the version of the candidate list it was taken from: while
// the list has not been rebuilt since, it is what selecting again would give.
struct Selection {
  std::vector<Candidate> candidates;
  std::uint64_t version = 0;
};
Status pin_selected_objects(const Ops& ops, const Filter& filter, sites::hooks::ObjectPins& pins, Selection& first) {
  struct Wanted {
    ObjectKey key;
    std::string path;
  };
  std::vector<Wanted> wanted;
  {
    std::lock_guard lock(g_mu);
    if (ops.state) return attached_already(ops);
    auto selected = select(filter);
    if (!selected.ok()) return selected.status();
    first.version = g_all_version;
    const ObjectKey* last_key = nullptr;
    for (const Candidate& c : *selected) {
      if (c.key == last_key) continue;  // the candidates of one object are adjacent
      last_key = c.key;
      if (std::none_of(wanted.begin(), wanted.end(), [&](const Wanted& w) { return w.key == *c.key; }))
        wanted.push_back({*c.key, *c.object});
    }
    first.candidates = std::move(*selected);
  }
  sites::hooks::testing::call_attach_hook(sites::hooks::testing::AttachPoint::selected);
  for (const Wanted& w : wanted) {
    if (Status st = pins.pin(w.key.first, w.key.second, w.path); !st.ok())
      return Status::error("hooks::attach: " + st.message() + "; nothing was attached", st.sys_errno());
  }
  sites::hooks::testing::call_attach_hook(sites::hooks::testing::AttachPoint::pinned);
  return {};
}

// Detaches whose grace period failed: what they unpublished, kept until a later detach of the
// same ops passes one (under g_mu).
std::map<const Ops::State*, Retired> g_failed_detaches;

// ...but a batch that fails after its int3s went in may have carried threads into the new
// calls (a thread at an int3 is carried on as the new instruction would), and so into a direct slot and a
// callback of `ops`, which the caller frees when attach fails. So the failure returns only once
// a grace period has passed, after which the state is freed. Without grace periods the ops is
// left as a failed detach leaves it (unpublished, not freed; detach finishes it).
Status abandon_attach(Ops& ops, std::unique_ptr<Ops::State> state, Retired retired, const Status& why) {
  if (Status g = grace::synchronize(); !g.ok()) {
    std::lock_guard lock(g_mu);
    state->detach_failed = true;
    g_failed_detaches[state.get()] = std::move(retired);
    (void)state.release();  // ops.state names it
    return Status::error(why.message() + "; callbacks may have begun on threads the failed batch let through, and " +
                             "no grace period could wait for them (" + g.message() +
                             "), so the ops is not freed: call hooks::detach to finish before freeing it",
                         why.sys_errno());
  }
  release(retired);
  std::lock_guard lock(g_mu);
  g_free_ids.push_back(state->id);
  ops.state = nullptr;
  return why;
}

}  // namespace

Status attach(Ops& ops, const Filter& filter) {
  if (t_in_callback) return Status::error("hooks::attach called from inside a hook callback");
  common::LoaderUse loader_use;  // outermost: pins dlopen and dlclose (common/loader_gate.h)
  if (!ops.entry) return Status::error("hooks::attach: the ops has no entry callback");
  // The scan reads code (a system call a page): outside the lock. The stubs leave
  // EntryRegs::xmm unset for a lean callback, so it must not read them either.
  bool vector_free = false;
  if (!ops.save_extended_state) {
    const arch::CallbackScan scan = arch::scan_callback(reinterpret_cast<std::uintptr_t>(ops.entry));
    vector_free = scan.vector_free && !scan.reads_regs;
  }
  // Declared before the lock, so released after it: releasing a pin may unload the object.
  sites::hooks::ObjectPins pins;
  Selection first;
  if (Status st = pin_selected_objects(ops, filter, pins, first); !st.ok()) return st;
  std::unique_lock lock(g_mu);
  if (ops.state) return attached_already(ops);
  forget_dead_objects();
  (void)all_candidates();  // rebuilt if an object came or went since the first selection
  const bool unchanged = g_all_version == first.version;
  auto selected = unchanged ? Result<std::vector<Candidate>>(std::move(first.candidates)) : select(filter);
  if (!selected.ok()) return selected.status();
  // Objects loaded since the pins were taken are left out, as if loaded after the attach (the
  // first selection's objects are all pinned).
  if (!unchanged)
    std::erase_if(*selected, [&](const Candidate& c) { return !pins.holds(c.key->first, c.key->second); });
  if (selected->empty()) {
    return Status::error("hooks::attach: the objects of every function the filter selected were unloaded meanwhile "
                         "(object unloaded); nothing was attached");
  }
  for (Candidate& c : *selected) c.form = sites::hooks::form_at(c.entry);  // the cache's may be stale

  for (const Candidate& c : *selected) {
    const auto known = g_sites.find(c.entry);
    if (c.form == EntryForm::other && (known == g_sites.end() || !known->second.enabled())) {
      return Status::error("the entry of " + (c.name->empty() ? common::hex_address(c.entry) : *c.name) +
                           " does not hold the nops -fpatchable-function-entry put there: another tool patched it, "
                           "or a sanitizer prologue comes first (Clang's -fsanitize=function; build with "
                           "-fno-sanitize=function)");
    }
  }
  if (g_free_ids.empty() && g_next_id == kMaxOps) {
    return Status::error("hooks::attach: " + std::to_string(kMaxOps) + " ops are attached already; detach some first");
  }
  if (ops.save_extended_state && !xsave_layout().usable) {
    return Status::error("hooks::attach: save_extended_state needs XSAVE, which this CPU or kernel does not offer");
  }
  // The state first: a direct slot names the ops, and the dispatcher reads its state.
  auto state = std::make_unique<Ops::State>();
  state->direct = ops.direct;
  state->extended = ops.save_extended_state;
  state->entry = ops.entry;
  state->ops = &ops;
  state->vector_free = vector_free;
  set_enabled(*state, true);
  if (g_free_ids.empty()) {
    state->id = g_next_id++;
  } else {
    state->id = g_free_ids.back();
    g_free_ids.pop_back();
  }
  state->hits_baseline = sum_hits(state->id);
  ops.state = state.get();
  std::vector<ModeChange> changes;
  for (const Candidate& c : *selected) {
    Site& s = g_sites[c.entry];
    if (!s.cell) {
      s.entry = c.entry;
      s.name = *c.name;
      s.object = *c.object;
      s.object_key = *c.key;
      s.cell = new SiteCell;
      s.cell->index = g_next_site_index < kMaxSites ? g_next_site_index++ : kMaxSites;
    }
    std::vector<Ops*> after = s.ops;
    after.push_back(&ops);
    const Mode m = mode_for(after);
    if (!site_is(s, m, after)) changes.push_back({&s, m, m == Mode::direct ? &ops : nullptr});
  }
  // Code first: a site that calls the stub before its cell names the ops just returns, and
  // a direct slot names the ops before its site calls it. So a failed batch leaves nothing
  // to undo but literal slots and slots given back (their tags cleared)...
  Retired retired;
  if (Status st = apply_modes(changes, retired); !st.ok()) {
    state->detaching = true;  // nobody else frees it meanwhile
    lock.unlock();
    return abandon_attach(ops, std::move(state), std::move(retired), st);
  }
  state.release();
  const ObjectKey* last_key = nullptr;
  for (const Candidate& c : *selected) {
    Site& s = g_sites[c.entry];
    s.ops.push_back(&ops);
    retired.targets.push_back(s.cell->target.exchange(target_for(s.ops), std::memory_order_acq_rel));
    ops.state->entries.push_back(c.entry);
    if (c.key == last_key) continue;  // the candidates of one object are adjacent
    last_key = c.key;
    auto& objects = ops.state->objects;
    if (std::none_of(objects.begin(), objects.end(), [&](const auto& o) { return o.first == *c.key; }))
      objects.emplace_back(*c.key, *c.object);
  }
  // Lists replaced in cells and slots sites left may still be read by threads in the stubs.
  release_after_grace_period(std::move(retired));
  return {};
}

namespace {


// Whether `ops` can be detached now: attached, and not being detached (unless its detach
// failed, which a new detach finishes).
Status check_detachable(const Ops& ops, const char* who) {
  if (!ops.state) return Status::error(std::string(who) + ": this ops is not attached");
  if (ops.state->detaching && !ops.state->detach_failed)
    return Status::error(std::string(who) + ": this ops is being detached already");
  return {};
}

// Takes `ops` out of every site's cell and puts each site in the mode its remaining ops ask
// for (off, common, or direct with another slot). Returns what threads inside the stubs may
// still read until a grace period passes. For an ops whose earlier detach failed, returns what
// that one unpublished. Refuses, changing nothing, when grace periods cannot run.
Result<Retired> unpublish(Ops& ops, const char* who) {
  // As in attach: the sites' objects are pinned without g_mu, and released after it.
  sites::hooks::ObjectPins pins;
  std::vector<std::pair<ObjectKey, std::string>> wanted;
  {
    std::lock_guard lock(g_mu);
    if (Status st = check_detachable(ops, who); !st.ok()) return st;
    wanted = ops.state->objects;  // objects forgotten since are not pinned: they are gone
  }
  // An object that cannot be pinned is gone (forgotten below), or cannot be held (dlmopen).
  for (const auto& [key, path] : wanted) (void)pins.pin(key.first, key.second, path);
  Retired retired;
  std::lock_guard lock(g_mu);
  if (Status st = check_detachable(ops, who); !st.ok()) return st;
  if (ops.state->detach_failed) {
    if (Status s = grace::detail::grace_periods_usable(); !s.ok()) {
      return Status::error(std::string(who) + ": " + s.message() +
                               "; the ops is still unpublished since its failed detach: call hooks::detach again once "
                               "grace periods work",
                           s.sys_errno());
    }
    auto it = g_failed_detaches.find(ops.state);
    retired = std::move(it->second);
    g_failed_detaches.erase(it);
    ops.state->detach_failed = false;
    return retired;
  }
  if (Status s = grace::detail::grace_periods_usable(); !s.ok()) {
    return Status::error(std::string(who) + ": " + s.message() +
                             "; the ops is still attached (hooks::disable stops its callbacks without a grace period)",
                         s.sys_errno());
  }
  ops.state->detaching = true;
  forget_dead_objects();
  std::vector<ModeChange> changes;
  for (std::uintptr_t e : ops.state->entries) {
    Site& s = g_sites[e];
    std::erase(s.ops, &ops);
    retired.targets.push_back(s.cell->target.exchange(target_for(s.ops), std::memory_order_acq_rel));
    if (s.slot_ops == &ops) {  // from now on its slot turns every call away untraced
      s.slot.data->tag.store(0, std::memory_order_release);
      s.slot_ops = nullptr;
    }
    // Code that is not pinned is not written: the site keeps calling the stub or its slot,
    // which turn calls away now (as after a failed batch, below).
    if (!pins.holds(s.object_key.first, s.object_key.second)) continue;
    const Mode m = mode_for(s.ops);
    if (!site_is(s, m, s.ops)) changes.push_back({&s, m, m == Mode::direct ? s.ops[0] : nullptr});
  }
  // On failure the sites keep their code: a common-mode site calls the stub with a cell that
  // no longer names `ops` (correct, only slower); a direct-mode site of `ops` keeps calling its
  // slot, whose cleared tag turns calls away, until a later change fixes the site.
  (void)apply_modes(changes, retired);
  for (std::uintptr_t e : ops.state->entries) retire_dead_slot(g_sites[e], retired);
  ops.state->entries.clear();  // attached to nothing now
  ops.state->objects.clear();
  return retired;
}

// A detach whose grace period failed: the ops stays unpublished (no callback of it starts any
// more) but is not freed, since callbacks begun before may still run; detach or detach_async
// again finishes it.
Status keep_failed_detach(Ops& ops, Retired retired, const char* who, const Status& why) {
  {
    std::lock_guard lock(g_mu);
    ops.state->detach_failed = true;
    g_failed_detaches[ops.state] = std::move(retired);
  }
  return Status::error(std::string(who) + ": " + why.message() +
                           "; the ops is unpublished (no callback of it starts any more) but callbacks begun before "
                           "may still run, so it is not freed: call hooks::detach again to finish",
                       why.sys_errno());
}

// After a grace period: nothing reads the retired targets and slots or runs the ops any more.
void free_all(const Retired& retired, Ops& ops) {
  release(retired);
  std::lock_guard lock(g_mu);
  g_free_ids.push_back(ops.state->id);
  delete ops.state;
  ops.state = nullptr;
}

}  // namespace

Status detach(Ops& ops) {
  if (t_in_callback) return Status::error("hooks::detach called from inside a hook callback");
  common::LoaderUse loader_use;  // outermost: pins dlopen and dlclose (common/loader_gate.h)
  auto retired = unpublish(ops, "hooks::detach");
  if (!retired.ok()) return retired.status();
  // Every thread that may still run a callback of `ops` is inside the stub's marker region.
  if (Status st = grace::synchronize(); !st.ok()) return keep_failed_detach(ops, std::move(*retired), "hooks::detach", st);
  free_all(*retired, ops);
  return {};
}

Status detach_async(Ops& ops, std::function<void()> done) {
  if (t_in_callback) return Status::error("hooks::detach_async called from inside a hook callback");
  common::LoaderUse loader_use;  // outermost: pins dlopen and dlclose (common/loader_gate.h)
  auto retired = unpublish(ops, "hooks::detach_async");
  if (!retired.ok()) return retired.status();
  // The callback thread retries a grace period that fails, so `done` runs once one succeeds.
  auto shared = std::make_shared<Retired>(std::move(*retired));
  Status st = grace::call([shared, &ops, done = std::move(done)] {
    free_all(*shared, ops);
    if (done) done();
  });
  if (!st.ok()) return keep_failed_detach(ops, std::move(*shared), "hooks::detach_async", st);
  return {};
}

Status disable(Ops& ops) {
  std::lock_guard lock(g_mu);
  if (!ops.state) return Status::error("hooks::disable: this ops is not attached");
  set_enabled(*ops.state, false);
  return {};
}

Status enable(Ops& ops) {
  std::lock_guard lock(g_mu);
  if (!ops.state) return Status::error("hooks::enable: this ops is not attached");
  set_enabled(*ops.state, true);
  return {};
}

OpsCounters counters(const Ops& ops) {
  std::lock_guard lock(g_mu);
  OpsCounters c;
  if (!ops.state) return c;
  c.hits = sum_hits(ops.state->id) - ops.state->hits_baseline;
  c.recursion_skipped = ops.state->recursion_skipped.load(std::memory_order_relaxed);
  c.functions = ops.state->entries.size();
  return c;
}

// hook_entry.S's frame: EntryRegs at %rsp, a copy of %rbp at 200(%rsp), and above the saved
// %rbp the function's body (8(%rbp)) and the return address into its caller (16(%rbp)).
std::uintptr_t* caller_return_slot(EntryRegs& regs) noexcept {
  const auto rbp = *reinterpret_cast<const std::uintptr_t*>(reinterpret_cast<const char*>(&regs) + 200);
  return reinterpret_cast<std::uintptr_t*>(rbp + 16);
}

Result<std::vector<Function>> patchable_functions() {
  std::vector<Function> out;
  std::lock_guard lock(g_mu);
  forget_dead_objects();
  for (const Candidate& c : all_candidates()) {
    Function f{c.entry, *c.name, *c.object, 0, 0};
    if (auto it = g_sites.find(c.entry); it != g_sites.end()) {
      f.ops = it->second.ops.size();
      if (it->second.cell->index < kMaxSites) f.hits = sum_site_hits(it->second.cell->index);
    }
    out.push_back(std::move(f));
  }
  return out;
}

}  // namespace tramway::hooks

namespace tramway::hooks {
namespace {

// Runs `o`'s callback between xsave and xrstor of every state component the OS enabled. No
// library call may come before the xsave: glibc's string functions use AVX and end with
// vzeroupper, which would clear the very upper halves this is meant to keep.
__attribute__((target("xsave"), noinline)) void call_saving_extended_state(Ops& o, std::uintptr_t entry,
                                                                          std::uintptr_t caller, EntryRegs& regs) {
  const XsaveLayout& layout = xsave_layout();
  auto* raw = static_cast<unsigned char*>(__builtin_alloca(layout.size + 64));
  auto* area = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(raw) + 63) & ~std::uintptr_t{63});
  // xrstor faults on a header it did not write: xsave writes only XSTATE_BV, so zero the rest.
  for (std::size_t i = 512; i < 576; i += 8) *reinterpret_cast<volatile std::uint64_t*>(area + i) = 0;
  _xsave64(area, layout.mask);
  o.state->entry(o, entry, caller, regs);
  _xrstor64(area, layout.mask);
}

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
}  // namespace tramway::hooks

// Called by tramway_hook_entry with the marker raised, for what its fast path leaves.
extern "C" __attribute__((visibility("hidden"))) void tramway_hook_dispatch(tramway::hooks::EntryRegs* regs,
                                                                            std::uintptr_t body,
                                                                            std::uintptr_t caller) {
  using namespace tramway::hooks;
  const std::uintptr_t entry = body - 5;
  const auto* cell = *reinterpret_cast<SiteCell* const*>(entry - 8);
  const std::uintptr_t target = cell->target.load(std::memory_order_acquire);
  if (target == 0) return;  // detached meanwhile
  if (target & kListTag) {
    const auto* list = reinterpret_cast<const OpsList*>(target & ~kListTag);
    run_callbacks(list->ops, list->count, cell->index, entry, caller, *regs);
  } else {
    Ops* single = reinterpret_cast<const Ops::State*>(target)->ops;
    run_callbacks(&single, 1, cell->index, entry, caller, *regs);
  }
}

// Called by tramway_hook_direct with the marker raised, for what its fast path leaves; `slot`
// through the RX view.
extern "C" __attribute__((visibility("hidden"))) void tramway_hook_direct_dispatch(tramway::hooks::EntryRegs* regs,
                                                                                   std::uintptr_t body,
                                                                                   std::uintptr_t caller,
                                                                                   const tramway::hooks::SlotData* slot) {
  using namespace tramway::hooks;
  // Another owner (or none): the slot was retired, and maybe reused, between this thread's
  // call into it and its marker. The call goes on untraced.
  if (slot->tag.load(std::memory_order_acquire) != body) return;
  Ops* ops = slot->state.load(std::memory_order_relaxed)->ops;  // written before the tag
  run_callbacks(&ops, 1, slot->index.load(std::memory_order_relaxed), body - 5, caller, *regs);
}

namespace tramway::sites::hooks {
void forget_unloaded_objects() {
  std::lock_guard lock(tramway::hooks::g_mu);
  tramway::hooks::forget_dead_objects();
}
}  // namespace tramway::sites::hooks
