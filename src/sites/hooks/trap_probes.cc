// Trap probes (see trap_probes.h): the probe table, the SIGTRAP handler's part, installing and
// removing int3s.
#include "sites/hooks/trap_probes.h"

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <new>

#include "arch/x86_64/emulate.h"
#include "arch/x86_64/insn.h"
#include "common/format.h"
#include "sites/hooks/internal.h"
#include "text/internal.h"
#include "tramway/grace.h"
#include "tramway/text/patch.h"

namespace tramway::hooks::detail {
namespace {

struct ProbeEntry {
  std::uintptr_t address;
  std::uintptr_t copy;
  const SiteCell* cell;
};
struct ProbeTable {  // immutable once published
  std::size_t count;
  ProbeEntry entries[1];  // sorted by address; allocated with `count` entries
};
std::atomic<const ProbeTable*> g_table{nullptr};
// Handlers looking at a table without a marker (handle_probe): a table replaced is freed only
// once this was seen at zero after the replacement (free_probe_tables).
std::atomic<int> g_peekers{0};
std::vector<ProbeEntry> g_installed;  // what g_table holds (under g_mu)

const ProbeEntry* find(const ProbeTable* t, std::uintptr_t address) noexcept {
  std::size_t lo = 0, hi = t->count;
  while (lo < hi) {
    const std::size_t mid = lo + (hi - lo) / 2;
    if (t->entries[mid].address == address) return &t->entries[mid];
    if (t->entries[mid].address < address) lo = mid + 1; else hi = mid;
  }
  return nullptr;
}

// The frame caller_return_slot reads (dispatch.cc): EntryRegs, then at 200 a %rbp whose +16 is
// the return address's slot — at a function's first instruction, the top of the stack.
struct ProbeFrame {
  EntryRegs regs;
  std::uint64_t spare;
  std::uint64_t rbp;
};
static_assert(offsetof(ProbeFrame, rbp) == 200);

// The SIGTRAP router's first question (text/internal.h). The marker is raised before the table
// is read and lowered after the PC is set to the copy: a grace period begun after a probe was
// unpublished waits for every handler that may have found it.
bool handle_probe(ucontext_t* uc) noexcept {
  const std::uintptr_t site = arch::context_pc(uc) - 1;
  // A batch's int3 is none of ours, and its thread may be registering for grace periods (a
  // batch over the functions that does): look without a marker first, so that only a probe's
  // hit raises one. The table seen is kept alive by g_peekers meanwhile.
  g_peekers.fetch_add(1, std::memory_order_seq_cst);
  const ProbeTable* seen = g_table.load(std::memory_order_seq_cst);
  const bool probe = seen && find(seen, site);
  g_peekers.fetch_sub(1, std::memory_order_seq_cst);
  if (!probe) return false;
  grace::read_lock();
  const ProbeTable* t = g_table.load(std::memory_order_acquire);
  const ProbeEntry* e = t ? find(t, site) : nullptr;
  if (!e) {
    // Removed since the look (its byte is back): run whatever is there now.
    arch::set_context_pc(uc, site);
    grace::read_unlock();
    return true;
  }
  const greg_t* g = uc->uc_mcontext.gregs;
  ProbeFrame f{};
  f.regs.rdi = static_cast<std::uint64_t>(g[REG_RDI]);
  f.regs.rsi = static_cast<std::uint64_t>(g[REG_RSI]);
  f.regs.rdx = static_cast<std::uint64_t>(g[REG_RDX]);
  f.regs.rcx = static_cast<std::uint64_t>(g[REG_RCX]);
  f.regs.r8 = static_cast<std::uint64_t>(g[REG_R8]);
  f.regs.r9 = static_cast<std::uint64_t>(g[REG_R9]);
  f.regs.rax = static_cast<std::uint64_t>(g[REG_RAX]);
  f.regs.r10 = static_cast<std::uint64_t>(g[REG_R10]);
  if (uc->uc_mcontext.fpregs) std::memcpy(f.regs.xmm, uc->uc_mcontext.fpregs->_xmm, sizeof f.regs.xmm);
  const std::uintptr_t sp = arch::context_sp(uc);
  f.rbp = sp - 16;
  run_cell_callbacks(*e->cell, *reinterpret_cast<const std::uintptr_t*>(sp), f.regs);
  arch::set_context_pc(uc, e->copy);
  grace::read_unlock();
  return true;
}

__attribute__((constructor)) void register_probe_handler() { text::detail::set_probe_handler(handle_probe); }

ProbeTable* make_table(const std::vector<ProbeEntry>& entries) {
  if (entries.empty()) return nullptr;
  auto* t = static_cast<ProbeTable*>(::operator new(sizeof(ProbeTable) + (entries.size() - 1) * sizeof(ProbeEntry)));
  t->count = entries.size();
  std::copy(entries.begin(), entries.end(), t->entries);
  return t;
}

// Publishes `entries` as the table; the old one goes to `retired`.
void publish(std::vector<ProbeEntry> entries, Retired& retired) {
  std::sort(entries.begin(), entries.end(), [](const ProbeEntry& a, const ProbeEntry& b) { return a.address < b.address; });
  const ProbeTable* old = g_table.exchange(make_table(entries), std::memory_order_acq_rel);
  if (old) retired.probe_tables.push_back(const_cast<ProbeTable*>(old));
  g_installed = std::move(entries);
}

void retire_probe_copy(const TrapProbe& p, Retired& retired) {
  (void)grace::retire(p.copy.rx, p.copy.rx + p.copy.size);
  retired.copies.push_back(p.copy);
}

}  // namespace

Result<std::unique_ptr<TrapProbe>> build_trap_probe(std::uintptr_t function, std::size_t size, const SiteCell* cell) {
  std::vector<std::uint8_t> code(size);
  if (size == 0 || !arch::read_own_memory(function, code)) {
    return Status::error("cannot read the " + std::to_string(size) + " bytes of the function at " +
                         common::hex_address(function));
  }
  auto plan = arch::plan_first_instruction(function, code);
  if (!plan.ok()) return plan.status();
  auto block = text::allocate_code_near(reinterpret_cast<const void*>(plan->run_start), arch::max_relocated_size(*plan));
  if (!block.ok()) {
    return Status::error("no room for a trap probe's copy near " + common::hex_address(function) + ": " +
                         block.status().message());
  }
  auto copy = arch::emit_relocated(*plan, reinterpret_cast<std::uintptr_t>(block->rx));
  if (!copy.ok()) {
    text::free_code(*block);  // nothing has run here yet
    return copy.status();
  }
  std::memcpy(block->rw, copy->bytes.data(), copy->bytes.size());
  auto p = std::make_unique<TrapProbe>();
  p->address = plan->run_start;
  p->original = plan->run_bytes[0];
  p->copy = *block;
  p->cell = cell;
  return p;
}

void free_probe_tables(const std::vector<void*>& tables) {
  // A grace period has passed since their replacement, so no marker region reads them; a
  // handler may still be looking without one (a few instructions): those wait for a later call.
  static std::mutex mu;
  static std::vector<void*> waiting;
  std::lock_guard lock(mu);
  waiting.insert(waiting.end(), tables.begin(), tables.end());
  if (g_peekers.load(std::memory_order_seq_cst) != 0) return;
  for (void* t : waiting) ::operator delete(t);
  waiting.clear();
}

Status change_trap_probes(const std::vector<TrapProbe*>& on, const std::vector<TrapProbe*>& off, Retired& retired) {
  if (on.empty() && off.empty()) return {};
  std::vector<ProbeEntry> entries = g_installed;
  if (!on.empty()) {
    // Named first, then the int3s: a thread that meets one finds its probe.
    for (const TrapProbe* p : on) entries.push_back({p->address, reinterpret_cast<std::uintptr_t>(p->copy.rx), p->cell});
    std::vector<text::ByteWrite> writes;
    for (const TrapProbe* p : on) writes.push_back({reinterpret_cast<void*>(p->address), arch::kInt3});
    const std::vector<ProbeEntry> before = g_installed;
    publish(entries, retired);
    if (Status st = text::write_instruction_bytes(writes); !st.ok()) {
      // Some int3s may be in: the old bytes go back before the table forgets them.
      std::vector<text::ByteWrite> undo;
      for (const TrapProbe* p : on) undo.push_back({reinterpret_cast<void*>(p->address), p->original});
      if (!text::write_instruction_bytes(undo).ok()) return st;  // the table keeps naming them
      publish(before, retired);
      for (const TrapProbe* p : on) retire_probe_copy(*p, retired);
      return st;
    }
  }
  if (!off.empty()) {
    std::vector<text::ByteWrite> writes;
    for (const TrapProbe* p : off) writes.push_back({reinterpret_cast<void*>(p->address), p->original});
    if (Status st = text::write_instruction_bytes(writes); !st.ok()) return st;  // still named: still probes
    std::erase_if(entries, [&](const ProbeEntry& e) {
      return std::any_of(off.begin(), off.end(), [&](const TrapProbe* p) { return p->address == e.address; });
    });
    publish(std::move(entries), retired);
    for (const TrapProbe* p : off) retire_probe_copy(*p, retired);
  }
  return {};
}

void forget_trap_probes(const std::vector<TrapProbe*>& gone, Retired& retired) {
  if (gone.empty()) return;
  std::vector<ProbeEntry> entries = g_installed;
  std::erase_if(entries, [&](const ProbeEntry& e) {
    return std::any_of(gone.begin(), gone.end(), [&](const TrapProbe* p) { return p->address == e.address; });
  });
  publish(std::move(entries), retired);
  for (const TrapProbe* p : gone) retire_probe_copy(*p, retired);
}

}  // namespace tramway::hooks::detail
