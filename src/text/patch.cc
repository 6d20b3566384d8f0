// The batch poker: the kernel's text_poke_bp_batch in user space (DESIGN invariant 1).
//
// For a batch of sites, with the batch's trap table published first:
//   1. write int3 on every head; serialize.  Other threads see old or int3 at each head; a
//      thread that hits int3 is carried past the site as if it ran the new instruction.
//   1b. only if the batch replaces runs of 1-byte nops (add_over_nops) or relocated runs
//      (add_displacing): move every PC inside a nop run (live or nested) to the run's end,
//      and every PC inside a relocated run to its instruction in the copy, one move_pcs round
//      for all of them. Not a serialisation: it changes PCs, not code.
//   2. write every tail; serialize.          Tails are only reachable through the head,
//      which is int3, so a half-written tail is never executed.
//   3. write every head; serialize.          Threads see int3 or the new instruction; after
//      this serialisation they see only the new one.
// Then the table is unpublished, and freed by a later batch once no trap handler can still be
// reading it. A thread whose int3 trap is delivered only after the unpublish finds the int3
// gone and re-executes the site.
#include "tramway/text/patch.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "arch/x86_64/emulate.h"
#include "arch/x86_64/insn.h"
#include "common/fork_hooks.h"
#include "common/format.h"
#include "text/internal.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/signal_router.h"
#include "common/eject.h"
#include "common/unload_freed.h"

// Odd while a batch may have int3s in code (its trap table is published), bumped at every
// publish and unpublish. Read by the gdb script (share/tramway/tramway.gdb) to tell tramway's
// traps from the program's own: an int3 seen between two equal even readings is not ours.
extern "C" {
__attribute__((visibility("default"))) volatile unsigned long tramway_batch_generation = 0;
}

namespace tramway::text {
namespace detail {

Counters& counters() noexcept {
  static Counters c;
  return c;
}

namespace {

struct TrapEntry {
  std::uintptr_t address;
  arch::Emulation emulation;
};
struct TrapTable {
  std::size_t count;
  TrapEntry entries[1];  // sorted by address; allocated with `count` entries
};

std::atomic<TrapTable*> g_table{nullptr};
// Bumped after every publish and unpublish of g_table. A handler that read the same value
// before its table lookup and after its look at the int3 knows no batch began meanwhile, so
// an int3 missing from the table it searched is not ours. Comparing table pointers instead
// is not enough: between two batches the table is null, and a whole batch (publish, int3,
// unpublish) can run while a preempted handler looks at the byte.
std::atomic<std::uint64_t> g_table_generation{0};
// Trap handlers announce themselves here before they load g_table and leave after their
// last use of it. A handler that starts after a table was unpublished can only load a newer
// table (or none), so a retired table is free once this count has been seen at zero.
std::atomic<long> g_readers{0};
// Tables unpublished but maybe still read by a handler (a thread preempted inside one).
// Guarded by the patch lock. Freed by a later batch; the poker never waits for a reader.
struct RetiredTables {
  std::vector<TrapTable*> tables;
  ~RetiredTables() {  // at unload after an eject: no handler reads any of them
    for (TrapTable* t : tables) ::operator delete(t);
  }
};
common::UnloadFreed<RetiredTables> g_retired_tables;
std::vector<TrapTable*>& retired_tables() { return g_retired_tables.get().tables; }

TrapTable* make_table(std::size_t n) {
  const std::size_t bytes = sizeof(TrapTable) + (n ? n - 1 : 0) * sizeof(TrapEntry);
  auto* t = static_cast<TrapTable*>(::operator new(bytes));
  t->count = n;
  return t;
}

const TrapEntry* find(const TrapTable* t, std::uintptr_t address) noexcept {
  std::size_t lo = 0, hi = t->count;
  while (lo < hi) {
    const std::size_t mid = lo + (hi - lo) / 2;
    const std::uintptr_t a = t->entries[mid].address;
    if (a == address) return &t->entries[mid];
    if (a < address) lo = mid + 1; else hi = mid;
  }
  return nullptr;
}

// The largest freed table is kept for the next batch: fresh memory would fault its pages in
// again every batch (about 1 us each here).
TrapTable* g_spare_table = nullptr;
std::size_t g_spare_capacity = 0;

void free_retired_tables_if_unread() {
  auto& retired = retired_tables();
  if (retired.empty() || g_readers.load(std::memory_order_seq_cst) != 0) return;
  for (TrapTable* t : retired) {
    if (t->count >= g_spare_capacity) {
      ::operator delete(g_spare_table);
      g_spare_table = t;
      g_spare_capacity = t->count;
    } else {
      ::operator delete(t);
    }
  }
  retired.clear();
}

// Unloaded after an eject: no batch runs and no handler reads a table any more.
__attribute__((destructor)) void free_spare_table_at_unload() {
  if (!common::ejecting()) return;
  ::operator delete(g_spare_table);
  g_spare_table = nullptr;
  g_spare_capacity = 0;
}

TrapTable* take_table(std::size_t n) {
  if (g_spare_table && g_spare_capacity >= n) {
    TrapTable* t = g_spare_table;
    g_spare_table = nullptr;
    g_spare_capacity = 0;
    t->count = n;
    return t;
  }
  return make_table(n);
}

void retire_table() {
  if (TrapTable* old = g_table.exchange(nullptr, std::memory_order_seq_cst)) retired_tables().push_back(old);
  tramway_batch_generation = tramway_batch_generation + 1;  // even: no table
  g_table_generation.fetch_add(1, std::memory_order_seq_cst);
  free_retired_tables_if_unread();
}

}  // namespace

namespace {
std::atomic<ProbeHandler> g_probe_handler{nullptr};
}  // namespace

void set_probe_handler(ProbeHandler handler) noexcept { g_probe_handler.store(handler, std::memory_order_release); }

bool handle_int3(ucontext_t* uc) noexcept {
  // A trap probe's int3 stays in the code between batches: its owner knows it.
  if (ProbeHandler probe = g_probe_handler.load(std::memory_order_acquire); probe && probe(uc)) return true;
  const std::uintptr_t site = arch::context_pc(uc) - 1;
  g_readers.fetch_add(1, std::memory_order_seq_cst);
  bool ours = true;
  const std::uint64_t generation = g_table_generation.load(std::memory_order_seq_cst);
  const TrapTable* t = g_table.load(std::memory_order_seq_cst);
  if (const TrapEntry* e = t ? find(t, site) : nullptr) {
    arch::emulate(e->emulation, site, uc);
    counters().traps_emulated.fetch_add(1, std::memory_order_relaxed);
  } else {
    const auto* p = reinterpret_cast<const volatile std::uint8_t*>(site);
    if (p[0] == arch::kInt3) {
      if (g_table_generation.load(std::memory_order_seq_cst) != generation) {
        // A batch published or unpublished a table since our lookup: the int3 may be that
        // batch's (its table is published before its int3s are written). Execute the site
        // again; if the int3 is still there, the next trap decides afresh.
        arch::set_context_pc(uc, site);
        counters().traps_restarted.fetch_add(1, std::memory_order_relaxed);
      } else {
        ours = false;  // no batch ran meanwhile: the program's int3, or a debugger's
      }
    } else if ((site & 0xfff) != 0 && p[-1] == 0xcd && p[0] == 0x03) {
      // `int $3` (cd 03), which traps after 2 bytes: never ours (no site's instruction starts
      // with 03). Its first byte is in the same page unless the trap address starts one.
      ours = false;
    } else {
      // The int3 we trapped on has been replaced since: run whatever is there now.
      arch::set_context_pc(uc, site);
      counters().traps_restarted.fetch_add(1, std::memory_order_relaxed);
    }
  }
  g_readers.fetch_sub(1, std::memory_order_seq_cst);
  return ours;
}

}  // namespace detail

// ------------------------------------------------------------------------------------------
namespace {

// Lock rank text (common/lock_order.h): the patch lock, then the router's locks, then code
// memory, all taken by one fork hook.
pthread_mutex_t g_patch_mutex = PTHREAD_MUTEX_INITIALIZER;

void text_before_fork() {
  pthread_mutex_lock(&g_patch_mutex);
  detail::router_before_fork();
  detail::code_memory_before_fork();
}
void text_after_fork_in_parent() {
  detail::code_memory_after_fork_in_parent();
  detail::router_after_fork_in_parent();
  pthread_mutex_unlock(&g_patch_mutex);
}
void text_after_fork_in_child() {
  // The child has one thread and every lock (taken in prepare), so no batch is half-applied
  // here. Per-mm state must be rebuilt.
  detail::code_memory_after_fork_in_child();
  detail::router_after_fork_in_child();
  detail::writer_after_fork_in_child();
  detail::serialize_after_fork_in_child();
  pthread_mutex_unlock(&g_patch_mutex);
}
__attribute__((constructor)) void register_text_fork_hook() {
  common::register_fork_hook({common::LockRank::text, text_before_fork, text_after_fork_in_parent,
                              text_after_fork_in_child});
}

struct Site {
  std::uintptr_t address;
  std::uint8_t length;
  std::uint8_t old_bytes[kMaxPatchBytes];
  std::uint8_t new_bytes[kMaxPatchBytes];
  arch::Emulation emulation;
  bool over_nops;  // old bytes are a run of 1-byte nops a thread may be inside
  bool displacing;  // add_displacing: a relocated run, emptied by the batch's moves of it
  std::uint32_t first_move, move_count;
};

bool all_one_byte_nops(const std::uint8_t* bytes, std::size_t n) {
  return std::all_of(bytes, bytes + n, [](std::uint8_t b) { return b == 0x90; });
}

// How a thread that traps on the head is carried past it. A nop shorter than the range would
// resume the thread inside the range, whose tail may be old, new or half-written: allowed
// only when the rest of new_bytes is nops too, and then all of them are skipped at once.
Result<arch::Emulation> emulation_of(std::uintptr_t address, std::span<const std::uint8_t> bytes) {
  auto e = arch::emulation_for(address, bytes);
  if (!e.ok() || e->kind != arch::Emulation::kNop || e->length >= bytes.size()) return e;
  for (std::size_t at = e->length; at < bytes.size();) {
    auto next = arch::emulation_for(address + at, bytes.subspan(at));
    if (!next.ok() || next->kind != arch::Emulation::kNop || next->length == 0) {
      return Status::error("the new first instruction is a " + std::to_string(e->length) + "-byte nop followed by `" +
                           arch::disassemble(address + at, bytes.subspan(at)) +
                           "`: a thread trapped at the head would resume inside the range being written");
    }
    at += next->length;
  }
  e->length = static_cast<std::uint8_t>(bytes.size());
  return e;
}

// The range must only ever be entered at its head (otherwise a thread could be inside it
// while we rewrite it): the current first instruction covers it, or does not fall through.
Status check_entered_only_at_head(const Site& s) {
  auto first = arch::first_instruction(s.address, {s.old_bytes, s.length});
  if (!first.ok()) return first.status();
  if (first->length == s.length || (first->length < s.length && !first->falls_through)) return {};
  return Status::error("cannot patch " + std::to_string(s.length) + " bytes at " + common::hex_address(s.address) +
                       ": the current instruction there (`" +
                       arch::disassemble(s.address, {s.old_bytes, s.length}) + "`, " +
                       std::to_string(first->length) +
                       " bytes) does not cover the range, so a thread could be executing inside it");
}

Status write_phase(detail::PageWriter& w, bool serialize) {
  if (w.empty()) return {};
  if (Status s = w.flush(); !s.ok()) return s;
  return serialize ? detail::serialize_all_cores() : Status();
}

// Puts the old bytes back after a failure in phase 2 or 3 (int3 still or again on the heads).
Status roll_back(const std::vector<Site>& sites) {
  detail::PageWriter w;
  for (const Site& s : sites) w.set(s.address, arch::kInt3);
  if (Status st = write_phase(w, true); !st.ok()) return st;
  for (const Site& s : sites)
    for (std::size_t i = 1; i < s.length; ++i) w.set(s.address + i, s.old_bytes[i]);
  if (Status st = write_phase(w, true); !st.ok()) return st;
  for (const Site& s : sites) w.set(s.address, s.old_bytes[0]);
  return write_phase(w, true);
}

}  // namespace

Status PatchBatch::queue(void* address, std::span<const std::uint8_t> new_bytes, bool over_nops) {
  const auto a = reinterpret_cast<std::uintptr_t>(address);
  if (new_bytes.empty() || new_bytes.size() > kMaxPatchBytes) {
    return Status::error("a patch must have 1 to " + std::to_string(kMaxPatchBytes) + " bytes, got " +
                         std::to_string(new_bytes.size()));
  }
  auto e = emulation_of(a, new_bytes);
  if (!e.ok()) return Status::error("patch at " + common::hex_address(a) + ": " + e.status().message());
  Patch p{a, static_cast<std::uint8_t>(new_bytes.size()), {}, over_nops};
  std::memcpy(p.bytes, new_bytes.data(), new_bytes.size());
  p.head_kind = e->kind;
  p.head_length = e->length;
  p.head_target = e->target;
  patches_.push_back(p);
  return {};
}

Status PatchBatch::add(void* address, std::span<const std::uint8_t> new_bytes) {
  return queue(address, new_bytes, false);
}

Status PatchBatch::add_displacing(void* address, std::span<const std::uint8_t> new_bytes,
                                  std::span<const PcMove> moves) {
  const auto a = reinterpret_cast<std::uintptr_t>(address);
  auto e = arch::emulation_for(a, new_bytes);
  if (e.ok() && e->kind != arch::Emulation::kJmp && e->kind != arch::Emulation::kCall) {
    return Status::error("patch at " + common::hex_address(a) + ": a displacing patch must begin with a jmp or call");
  }
  for (std::size_t i = 0; i < moves.size(); ++i) {
    const PcMove& m = moves[i];
    if (m.begin <= a || m.begin > a + kMaxPatchBytes || m.begin >= m.end || (i > 0 && m.begin < moves[i - 1].end)) {
      return Status::error("patch at " + common::hex_address(a) + ": its moves must be sorted, disjoint and begin "
                           "behind its head, within " + std::to_string(kMaxPatchBytes) + " bytes");
    }
  }
  if (Status st = queue(address, new_bytes, false); !st.ok()) return st;
  Patch& p = patches_.back();
  p.displacing = true;
  p.first_move = static_cast<std::uint32_t>(moves_.size());
  p.move_count = static_cast<std::uint32_t>(moves.size());
  moves_.insert(moves_.end(), moves.begin(), moves.end());
  return {};
}

Status PatchBatch::add_resuming(void* address, std::span<const std::uint8_t> new_bytes, std::uintptr_t resume_at) {
  const auto a = reinterpret_cast<std::uintptr_t>(address);
  if (new_bytes.empty() || new_bytes.size() > kMaxPatchBytes) {
    return Status::error("a patch must have 1 to " + std::to_string(kMaxPatchBytes) + " bytes, got " +
                         std::to_string(new_bytes.size()));
  }
  if (resume_at == 0) return Status::error("patch at " + common::hex_address(a) + ": no address to resume at");
  Patch p{a, static_cast<std::uint8_t>(new_bytes.size()), {}, false};
  std::memcpy(p.bytes, new_bytes.data(), new_bytes.size());
  p.resume_at = resume_at;
  patches_.push_back(p);
  return {};
}

Status PatchBatch::add_over_nops(void* address, std::span<const std::uint8_t> new_bytes) {
  const auto* current = static_cast<const std::uint8_t*>(address);
  if (!new_bytes.empty() && new_bytes.size() <= kMaxPatchBytes && !all_one_byte_nops(current, new_bytes.size())) {
    const auto a = reinterpret_cast<std::uintptr_t>(address);
    return Status::error("cannot replace a nop run of " + std::to_string(new_bytes.size()) + " bytes at " +
                         common::hex_address(a) + ": the bytes there are not all 1-byte nops (0x90), `" +
                         arch::disassemble(a, {current, new_bytes.size()}) + "` comes first");
  }
  return queue(address, new_bytes, true);
}

PatchLock::PatchLock() { pthread_mutex_lock(&g_patch_mutex); }
PatchLock::~PatchLock() { pthread_mutex_unlock(&g_patch_mutex); }

namespace {
std::atomic<Status (*)()> g_after_int3s_hook{nullptr};
}  // namespace

void detail::testing::set_after_int3s_hook(Status (*hook)()) { g_after_int3s_hook.store(hook, std::memory_order_release); }

Status apply(const PatchBatch& batch) {
  PatchLock lock;
  return apply(batch, lock);
}

// Scratch space reused by every batch (guarded by the patch lock), for the same reason as the
// spare trap table.
common::UnloadFreed<std::vector<Site>> g_scratch_sites;
common::UnloadFreed<std::vector<std::pair<std::uintptr_t, std::uint32_t>>> g_scratch_order;
common::UnloadFreed<detail::PageWriter> g_scratch_writer;
std::vector<Site>& scratch_sites() { return g_scratch_sites.get(); }
std::vector<std::pair<std::uintptr_t, std::uint32_t>>& scratch_order() { return g_scratch_order.get(); }
detail::PageWriter& scratch_writer() { return g_scratch_writer.get(); }

namespace {

// Batches come as a few ascending groups (the hooks queue their sites, then their pads' jmps):
// those are merged in linear time; anything else is sorted.
void sort_by_address(std::vector<std::pair<std::uintptr_t, std::uint32_t>>& order) {
  constexpr std::size_t kMaxGroups = 8;
  std::size_t bounds[kMaxGroups + 1] = {0};
  std::size_t groups = 1;
  for (std::size_t i = 1; i < order.size(); ++i) {
    if (order[i] < order[i - 1]) {
      if (groups == kMaxGroups) {
        std::sort(order.begin(), order.end());
        return;
      }
      bounds[groups++] = i;
    }
  }
  bounds[groups] = order.size();
  for (std::size_t g = 1; g < groups; ++g) {
    std::inplace_merge(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(bounds[g]),
                       order.begin() + static_cast<std::ptrdiff_t>(bounds[g + 1]));
  }
}

}  // namespace

Status apply(const PatchBatch& batch, const PatchLock&) {
  if (batch.empty()) return {};
  std::vector<Site>& sites = scratch_sites();
  sites.clear();
  sites.reserve(batch.size());
  std::size_t nop_runs = 0, displaced = 0;
  // The patches in address order, sorted as (address, index) pairs rather than as 60-byte
  // sites: sorting the sites of a 20,000-patch batch was the largest share of its CPU time.
  auto& order = scratch_order();
  order.clear();
  order.reserve(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i)
    order.emplace_back(batch.patches()[i].address, static_cast<std::uint32_t>(i));
  sort_by_address(order);
  for (const auto& by_address : order) {
    const auto& p = batch.patches()[by_address.second];
    Site s{p.address, p.length, {}, {}, {}, false, p.displacing, p.first_move, p.move_count};
    std::memcpy(s.old_bytes, reinterpret_cast<const void*>(p.address), p.length);
    std::memcpy(s.new_bytes, p.bytes, p.length);
    if (std::memcmp(s.old_bytes, s.new_bytes, s.length) == 0) continue;  // already there
    // A 1-byte run is one instruction: add's rule covers it, nobody can be inside.
    s.over_nops = p.over_nops && s.length > 1 && all_one_byte_nops(s.old_bytes, s.length);
    // A displacing patch's moves empty the run; any other range must be entered at its head.
    if (!s.over_nops && !s.displacing) {
      if (Status st = check_entered_only_at_head(s); !st.ok()) return st;
    }
    nop_runs += s.over_nops;
    displaced += s.displacing;
    if (p.resume_at) {
      s.emulation = {arch::Emulation::kJmp, s.length, p.resume_at};
    } else {
      s.emulation = {static_cast<arch::Emulation::Kind>(p.head_kind), p.head_length, p.head_target};
    }
    sites.push_back(s);
  }
  if (sites.empty()) return {};
  for (std::size_t i = 1; i < sites.size(); ++i) {
    if (sites[i - 1].address + sites[i - 1].length > sites[i].address) {
      return Status::error("patches at " + common::hex_address(sites[i - 1].address) + " and " +
                           common::hex_address(sites[i].address) + " overlap");
    }
  }
  if (Status st = detail::ensure_router(); !st.ok()) return st;
  if (Status st = detail::precheck_batch(); !st.ok()) return st;  // would an int3 kill a thread?
  if (Status st = detail::prepare_serialization(); !st.ok()) return st;  // before any int3 exists
  detail::free_retired_tables_if_unread();

  detail::TrapTable* table = detail::take_table(sites.size());
  for (std::size_t i = 0; i < sites.size(); ++i) table->entries[i] = {sites[i].address, sites[i].emulation};
  // Published before the first int3 is written: a thread that sees our int3 finds the table.
  detail::g_table.store(table, std::memory_order_seq_cst);
  tramway_batch_generation = tramway_batch_generation + 1;  // odd: before any int3 is written
  detail::g_table_generation.fetch_add(1, std::memory_order_seq_cst);  // before any int3 is written

  detail::PageWriter& w = scratch_writer();
  // Puts every old head back while phase 2 has not begun (no tail written yet).
  auto undo_heads = [&](Status why) {
    for (const Site& s : sites) w.set(s.address, s.old_bytes[0]);
    (void)write_phase(w, true);
    detail::retire_table();
    return why;
  };
  for (const Site& s : sites) w.set(s.address, arch::kInt3);
  if (Status st = write_phase(w, true); !st.ok()) return undo_heads(st);  // some int3s may be in

  if (nop_runs > 0 || displaced > 0) {
    // Phase 1b. A thread may have been at address+1..+len-1 of a nop run, between two nops,
    // when the int3 went in (live, preempted, or in a signal frame it will return to). Had
    // we written the tails now it would resume in the middle of the new instruction. Now
    // that every core has seen the int3, nobody can enter a run except through its head,
    // where it traps and is carried past the whole site; so moving every PC inside a run to
    // its end (running the remaining nops does nothing) empties the runs for good. Meanwhile
    // other threads see int3 at every head and the old bytes behind it, nothing else. All
    // runs are moved in one signal round; a thread that cannot answer (stopped inside a run)
    // fails the batch before any tail is written, so putting the old heads back undoes it.
    // A relocated run is the same with a map instead of its end: a thread at one of its
    // instructions goes to that instruction's copy, which computes what the rest of the run
    // would have (the detour jumps back behind it); no branch enters the run but at its head.
    std::vector<PcMove> moves;
    moves.reserve(nop_runs + batch.moves().size());
    std::uintptr_t first = 0;
    for (const Site& s : sites) {
      if (!first && (s.over_nops || s.displacing)) first = s.address;
      if (s.over_nops) moves.push_back({s.address + 1, s.address + s.length, s.address + s.length});
      for (std::uint32_t i = 0; i < s.move_count; ++i) moves.push_back(batch.moves()[s.first_move + i]);
    }
    auto moved = move_pcs(moves, batch.fixup_timeout());
    if (!moved.ok()) {
      const std::string what = nop_runs ? std::to_string(nop_runs) + " nop run(s)" : std::string();
      const std::string also = displaced ? std::to_string(displaced) + " relocated run(s)" : std::string();
      return undo_heads(Status::error("replacing " + what + (what.empty() || also.empty() ? "" : " and ") + also +
                                      " (first at " + common::hex_address(first) +
                                      "): " + moved.status().message() + "; the batch was rolled back",
                                      moved.status().sys_errno()));
    }
    detail::counters().pcs_moved.fetch_add(static_cast<std::uint64_t>(moved->pcs_moved), std::memory_order_relaxed);
  }
  if (auto* hook = g_after_int3s_hook.load(std::memory_order_acquire)) {
    if (Status st = hook(); !st.ok()) return undo_heads(st);
  }
  for (const Site& s : sites)
    for (std::size_t i = 1; i < s.length; ++i)
      if (s.new_bytes[i] != s.old_bytes[i]) w.set(s.address + i, s.new_bytes[i]);
  Status st = write_phase(w, true);
  if (st.ok()) {
    for (const Site& s : sites) w.set(s.address, s.new_bytes[0]);
    st = write_phase(w, true);
  }
  if (!st.ok()) {
    if (Status rb = roll_back(sites); !rb.ok()) {
      // The table stays published forever so that the int3s left behind keep being emulated.
      return Status::error(st.message() + "; rolling back also failed (" + rb.message() +
                           "); the sites keep trapping and being emulated");
    }
    detail::retire_table();
    return st;
  }
  detail::retire_table();
  detail::counters().batches.fetch_add(1, std::memory_order_relaxed);
  detail::counters().nop_runs_replaced.fetch_add(nop_runs, std::memory_order_relaxed);
  detail::counters().runs_displaced.fetch_add(displaced, std::memory_order_relaxed);
  return {};
}

Status write_unexecuted(void* address, std::span<const std::uint8_t> bytes) {
  const UnexecutedWrite one{address, bytes};
  return write_unexecuted(std::span(&one, 1));
}

Status write_unexecuted(std::span<const UnexecutedWrite> writes) {
  PatchLock lock;
  detail::PageWriter w;
  for (const UnexecutedWrite& u : writes) {
    const auto a = reinterpret_cast<std::uintptr_t>(u.address);
    for (std::size_t i = 0; i < u.bytes.size(); ++i) w.set(a + i, u.bytes[i]);
  }
  return w.flush();
}

Status write_instruction_bytes(std::span<const ByteWrite> writes) {
  if (writes.empty()) return {};
  if (Status st = detail::ensure_router(); !st.ok()) return st;
  PatchLock lock;
  if (Status st = detail::precheck_batch(); !st.ok()) return st;  // would an int3 kill a thread?
  if (Status st = detail::prepare_serialization(); !st.ok()) return st;
  detail::PageWriter w;
  for (const ByteWrite& b : writes) w.set(reinterpret_cast<std::uintptr_t>(b.address), b.byte);
  if (Status st = w.flush(); !st.ok()) return st;
  return detail::serialize_all_cores();
}

PatchStats stats() noexcept {
  auto& c = detail::counters();
  PatchStats s;
  s.batches = c.batches.load(std::memory_order_relaxed);
  s.serialisations = c.serialisations.load(std::memory_order_relaxed);
  s.page_writes = c.page_writes.load(std::memory_order_relaxed);
  s.traps_emulated = c.traps_emulated.load(std::memory_order_relaxed);
  s.traps_restarted = c.traps_restarted.load(std::memory_order_relaxed);
  s.nop_runs_replaced = c.nop_runs_replaced.load(std::memory_order_relaxed);
  s.runs_displaced = c.runs_displaced.load(std::memory_order_relaxed);
  s.pcs_moved = c.pcs_moved.load(std::memory_order_relaxed);
  return s;
}

}  // namespace tramway::text
