// Function hooks through the common entry (tramway/hooks.h).
//
// A hooked site owns a SiteCell in tramway's memory and, from its first enable on, its literal
// slot [entry - 8, entry) holds the cell's address; the slot is written once, while the site
// is still a nop (no thread reads it before the site calls the stub), so it never tears.
// Afterwards the ops a site runs change by one atomic store into its cell: the Ops itself when
// there is one, else a per-site immutable OpsList (tagged with bit 0). Lists and ops states
// are read only inside the stub's marker region, so they are freed after a trace-flavor grace
// period. Enabling and disabling sites is one patch batch: the 5-byte nop at the entry
// becomes `call thunk` (a generated `jmp *tramway_hook_entry` within rel32 reach) and back.
//
// Lock order: g_mu (hook tables) -> the text layer's patch lock.
#include "tramway/hooks.h"

#include <dlfcn.h>
#include <fnmatch.h>
#include <link.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <set>

#include "arch/x86_64/insn.h"
#include "common/format.h"
#include "sites/hooks/discovery.h"
#include "text/internal.h"
#include "tramway/grace.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/patch.h"

extern "C" void tramway_hook_entry();  // hook_entry.S

namespace tramway::hooks {

struct Ops::State {
  std::atomic<bool> enabled{true};
  bool detaching = false;               // detach_async began (under g_mu)
  std::atomic<std::uint64_t> hits{0}, recursion_skipped{0};
  std::vector<std::uintptr_t> entries;  // functions attached to (under g_mu)
};

namespace {

using sites::hooks::EntryForm;

constexpr std::uintptr_t kListTag = 1;

struct OpsList {
  std::size_t count;
  Ops* ops[1];  // `count` of them
};

struct alignas(64) SiteCell {
  std::atomic<std::uintptr_t> target{0};  // Ops*, OpsList* | kListTag, or 0
  std::atomic<std::uint64_t> hits{0};
};

struct Site {
  std::uintptr_t entry = 0;
  std::string name, object;
  SiteCell* cell = nullptr;  // never freed: the literal slot points at it
  bool literal_written = false;
  bool enabled = false;  // the entry calls the stub
  std::vector<Ops*> ops;
};

std::mutex g_mu;
std::map<std::uintptr_t, Site> g_sites;  // every site ever hooked, by entry
std::vector<text::CodeBlock> g_thunks;   // permanent

thread_local constinit bool t_in_callback __attribute__((tls_model("initial-exec"))) = false;

std::uintptr_t target_for(const std::vector<Ops*>& ops) {
  if (ops.empty()) return 0;
  if (ops.size() == 1) return reinterpret_cast<std::uintptr_t>(ops[0]);
  auto* list = static_cast<OpsList*>(::operator new(sizeof(OpsList) + (ops.size() - 1) * sizeof(Ops*)));
  list->count = ops.size();
  std::copy(ops.begin(), ops.end(), list->ops);
  return reinterpret_cast<std::uintptr_t>(list) | kListTag;
}

void free_target(std::uintptr_t t) {
  if (t & kListTag) ::operator delete(reinterpret_cast<void*>(t & ~kListTag));
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
  std::string name, object;
  EntryForm form;
};

// The sites the filter selects, or an error naming what did not match.
Result<std::vector<Candidate>> select(const Filter& filter) {
  std::vector<Candidate> all;
  for (auto& object : sites::hooks::discover_loaded_objects()) {
    if (!object.ok()) continue;  // an object we cannot read cannot be selected either
    for (const auto& s : object->sites) all.push_back({s.entry, s.name.empty() ? s.symbol : s.name, object->path, s.form});
  }
  std::vector<Candidate> out;
  switch (filter.kind()) {
    case Filter::Kind::addresses:
      for (std::uintptr_t e : filter.entries()) {
        auto it = std::find_if(all.begin(), all.end(), [&](const Candidate& c) { return c.entry == e; });
        if (it == all.end()) return not_patchable("the function at " + common::hex_address(e));
        out.push_back(*it);
      }
      break;
    case Filter::Kind::names:
      for (const std::string& n : filter.patterns()) {
        const std::size_t before = out.size();
        for (const Candidate& c : all) {
          if (c.name == n) out.push_back(c);
        }
        if (out.size() == before) return not_patchable("'" + n + "' (no patchable function has that name)");
      }
      break;
    case Filter::Kind::glob:
      for (const Candidate& c : all) {
        if (fnmatch(filter.patterns()[0].c_str(), c.name.c_str(), 0) == 0) out.push_back(c);
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

// Queues "call the stub" at each site of `enable` and "5-byte nop" at each of `disable`,
// writing literal slots first, and applies them as one batch.
Status switch_sites(const std::vector<Site*>& enable, const std::vector<Site*>& disable,
                    const std::map<std::uintptr_t, EntryForm>& forms) {
  text::PatchBatch batch;
  for (Site* s : enable) {
    if (!s->literal_written) {
      const auto cell = reinterpret_cast<std::uintptr_t>(s->cell);
      if (Status st = text::detail::write_span(s->entry - 8, reinterpret_cast<const std::uint8_t*>(&cell), sizeof cell);
          !st.ok()) {
        return st;
      }
      s->literal_written = true;
    }
    auto thunk = thunk_near(s->entry);
    if (!thunk.ok()) return thunk.status();
    const auto call = arch::encode_call(s->entry, *thunk);
    if (!call) return Status::error("internal: the hook thunk is out of rel32 reach of " + common::hex_address(s->entry));
    // GCC's five 1-byte nops become the call directly: the batch moves threads that are
    // between two of them to the end of the run before it writes the tail (DESIGN,
    // "Normalisation of GCC's entries"), for all such sites in one signal round.
    const auto form = forms.find(s->entry);
    const bool gcc_entry = form != forms.end() && form->second == EntryForm::nop1x5;
    Status st = gcc_entry ? batch.add_over_nops(reinterpret_cast<void*>(s->entry), *call)
                          : batch.add(reinterpret_cast<void*>(s->entry), *call);
    if (!st.ok()) return st;
  }
  for (Site* s : disable) {
    if (Status st = batch.add(reinterpret_cast<void*>(s->entry), arch::kNop5); !st.ok()) return st;
  }
  return text::apply(batch);
}

// The address range of the loaded object whose load bias and name are given, if it is loaded.
struct ObjectRange {
  std::uintptr_t base, begin, end;
  std::string name;
  bool found = false;
};
ObjectRange find_object(std::uintptr_t base, const std::string& name) {
  ObjectRange r{base, ~std::uintptr_t{0}, 0, name};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* arg) {
        auto* r = static_cast<ObjectRange*>(arg);
        if (info->dlpi_addr != r->base || r->name != (info->dlpi_name ? info->dlpi_name : "")) return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type != PT_LOAD) continue;
          r->begin = std::min<std::uintptr_t>(r->begin, info->dlpi_addr + ph.p_vaddr);
          r->end = std::max<std::uintptr_t>(r->end, info->dlpi_addr + ph.p_vaddr + ph.p_memsz);
        }
        r->found = true;
        return 1;
      },
      &r);
  return r;
}

// After an object was unloaded: its sites leave every table, so that an object loaded later
// at the same addresses starts clean (its literal slots unwritten, its entries nops).
void forget_sites_in(std::uintptr_t begin, std::uintptr_t end) {
  std::lock_guard lock(g_mu);
  std::vector<std::uintptr_t> targets;
  std::vector<SiteCell*> cells;  // may still be read by a thread that was inside the stub
  for (auto it = g_sites.lower_bound(begin); it != g_sites.end() && it->first < end;) {
    Site& s = it->second;
    for (Ops* o : s.ops) std::erase(o->state->entries, s.entry);
    targets.push_back(s.cell->target.exchange(0, std::memory_order_acq_rel));
    cells.push_back(s.cell);
    it = g_sites.erase(it);
  }
  if (cells.empty()) return;
  (void)grace::call([targets, cells] {
    for (std::uintptr_t t : targets) free_target(t);
    for (SiteCell* c : cells) delete c;
  });
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

Status attach(Ops& ops, const Filter& filter) {
  if (t_in_callback) return Status::error("hooks::attach called from inside a hook callback");
  if (!ops.entry) return Status::error("hooks::attach: the ops has no entry callback");
  std::lock_guard lock(g_mu);
  if (ops.state) {
    return Status::error(ops.state->detaching ? "hooks::attach: this ops is still being detached (wait for detach_async's done)"
                                              : "hooks::attach: this ops is attached already (detach it first)");
  }
  auto selected = select(filter);
  if (!selected.ok()) return selected.status();

  for (const Candidate& c : *selected) {
    const auto known = g_sites.find(c.entry);
    if (c.form == EntryForm::other && (known == g_sites.end() || !known->second.enabled)) {
      return Status::error("the entry of " + (c.name.empty() ? common::hex_address(c.entry) : c.name) +
                           " does not hold the nops -fpatchable-function-entry put there: another tool patched it, "
                           "or a sanitizer prologue comes first (Clang's -fsanitize=function; build with "
                           "-fno-sanitize=function)");
    }
  }
  std::vector<Site*> enable;
  std::map<std::uintptr_t, EntryForm> forms;
  for (const Candidate& c : *selected) {
    Site& s = g_sites[c.entry];
    if (!s.cell) {
      s.entry = c.entry;
      s.name = c.name;
      s.object = c.object;
      s.cell = new SiteCell;
    }
    forms[c.entry] = c.form;
    if (!s.enabled) enable.push_back(&s);
  }
  // Code first: a site that calls the stub before its cell names the ops just returns. So a
  // failed batch leaves nothing to undo but literal slots no thread reads.
  if (Status st = switch_sites(enable, {}, forms); !st.ok()) return st;
  for (Site* s : enable) s->enabled = true;
  ops.state = new Ops::State;
  std::vector<std::uintptr_t> retired;
  for (const Candidate& c : *selected) {
    Site& s = g_sites[c.entry];
    s.ops.push_back(&ops);
    retired.push_back(s.cell->target.exchange(target_for(s.ops), std::memory_order_acq_rel));
    ops.state->entries.push_back(c.entry);
  }
  // Lists replaced in cells may still be read by threads inside the stub.
  std::erase_if(retired, [](std::uintptr_t t) { return !(t & kListTag); });
  if (!retired.empty()) {
    (void)grace::call([retired] {
      for (std::uintptr_t t : retired) free_target(t);
    });
  }
  return {};
}

namespace {

// Takes `ops` out of every site's cell and disables the sites left without ops. Returns the
// targets it replaced: threads inside the stub may read them until a grace period passes.
Result<std::vector<std::uintptr_t>> unpublish(Ops& ops, const char* who) {
  std::vector<std::uintptr_t> retired;
  std::lock_guard lock(g_mu);
  if (!ops.state) return Status::error(std::string(who) + ": this ops is not attached");
  if (ops.state->detaching) return Status::error(std::string(who) + ": this ops is being detached already");
  ops.state->detaching = true;
  std::vector<Site*> disable;
  for (std::uintptr_t e : ops.state->entries) {
    Site& s = g_sites[e];
    std::erase(s.ops, &ops);
    retired.push_back(s.cell->target.exchange(target_for(s.ops), std::memory_order_acq_rel));
    if (s.ops.empty() && s.enabled) disable.push_back(&s);
  }
  // A failed disable leaves sites calling the stub with an empty cell: correct, only slower.
  if (Status st = switch_sites({}, disable, {}); st.ok()) {
    for (Site* s : disable) s->enabled = false;
  }
  return retired;
}

void free_all(const std::vector<std::uintptr_t>& retired, Ops& ops) {
  for (std::uintptr_t t : retired) free_target(t);
  delete ops.state;
  ops.state = nullptr;
}

}  // namespace

Status detach(Ops& ops) {
  if (t_in_callback) return Status::error("hooks::detach called from inside a hook callback");
  auto retired = unpublish(ops, "hooks::detach");
  if (!retired.ok()) return retired.status();
  // Every thread that may still run a callback of `ops` is inside the stub's marker region.
  if (Status st = grace::synchronize(); !st.ok()) return st;
  free_all(*retired, ops);
  return {};
}

Status detach_async(Ops& ops, std::function<void()> done) {
  if (t_in_callback) return Status::error("hooks::detach_async called from inside a hook callback");
  auto retired = unpublish(ops, "hooks::detach_async");
  if (!retired.ok()) return retired.status();
  return grace::call([retired = std::move(*retired), &ops, done = std::move(done)] {
    free_all(retired, ops);
    if (done) done();
  });
}

Status disable(Ops& ops) {
  std::lock_guard lock(g_mu);
  if (!ops.state) return Status::error("hooks::disable: this ops is not attached");
  ops.state->enabled.store(false, std::memory_order_relaxed);
  return {};
}

Status enable(Ops& ops) {
  std::lock_guard lock(g_mu);
  if (!ops.state) return Status::error("hooks::enable: this ops is not attached");
  ops.state->enabled.store(true, std::memory_order_relaxed);
  return {};
}

OpsCounters counters(const Ops& ops) {
  std::lock_guard lock(g_mu);
  OpsCounters c;
  if (!ops.state) return c;
  c.hits = ops.state->hits.load(std::memory_order_relaxed);
  c.recursion_skipped = ops.state->recursion_skipped.load(std::memory_order_relaxed);
  c.functions = ops.state->entries.size();
  return c;
}

Result<std::vector<Function>> patchable_functions() {
  std::vector<Function> out;
  std::lock_guard lock(g_mu);
  for (auto& object : sites::hooks::discover_loaded_objects()) {
    if (!object.ok()) continue;
    for (const auto& s : object->sites) {
      Function f{s.entry, s.name.empty() ? s.symbol : s.name, object->path, false, 0};
      if (auto it = g_sites.find(s.entry); it != g_sites.end()) {
        f.hooked = !it->second.ops.empty();
        f.hits = it->second.cell->hits.load(std::memory_order_relaxed);
      }
      out.push_back(std::move(f));
    }
  }
  return out;
}

}  // namespace tramway::hooks

// Called by tramway_hook_entry with the marker raised.
extern "C" __attribute__((visibility("hidden"))) void tramway_hook_dispatch(tramway::hooks::EntryRegs* regs,
                                                                            std::uintptr_t body,
                                                                            std::uintptr_t caller) noexcept {
  using namespace tramway::hooks;
  const std::uintptr_t entry = body - 5;
  const auto* cell = *reinterpret_cast<SiteCell* const*>(entry - 8);
  const std::uintptr_t target = cell->target.load(std::memory_order_acquire);
  if (target == 0) return;  // detached meanwhile
  Ops* single = reinterpret_cast<Ops*>(target);
  Ops* const* ops = &single;
  std::size_t count = 1;
  if (target & kListTag) {
    const auto* list = reinterpret_cast<const OpsList*>(target & ~kListTag);
    ops = list->ops;
    count = list->count;
  }
  if (t_in_callback) {  // a callback called a hooked function (DESIGN invariant 7)
    for (std::size_t i = 0; i < count; ++i) ops[i]->state->recursion_skipped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  t_in_callback = true;
  const_cast<SiteCell*>(cell)->hits.fetch_add(1, std::memory_order_relaxed);
  for (std::size_t i = 0; i < count; ++i) {
    Ops& o = *ops[i];
    if (!o.state->enabled.load(std::memory_order_relaxed)) continue;
    o.state->hits.fetch_add(1, std::memory_order_relaxed);
    o.entry(o, entry, caller, *regs);
  }
  t_in_callback = false;
}

// dlclose, interposed: when the object is really unloaded (its last reference dropped), its
// hooked sites are forgotten (see forget_sites_in). The program must not be running the
// object's code when it closes it, hooked or not; threads inside tramway's stub on behalf of
// one of its functions are the program's business alike.
extern "C" int dlclose(void* handle) {
  using namespace tramway::hooks;
  static const auto real = reinterpret_cast<int (*)(void*)>(dlsym(RTLD_NEXT, "dlclose"));
  link_map* lm = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &lm) != 0 || !lm) return real(handle);
  const ObjectRange before = find_object(lm->l_addr, lm->l_name ? lm->l_name : "");
  const int rc = real(handle);
  if (before.found && !find_object(before.base, before.name).found) forget_sites_in(before.begin, before.end);
  return rc;
}
