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

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <set>

#include "arch/x86_64/insn.h"
#include "common/format.h"
#include "sites/hooks/discovery.h"
#include "tramway/grace.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/patch.h"

extern "C" void tramway_hook_entry();  // hook_entry.S

namespace tramway::hooks {

struct Ops::State {
  std::atomic<bool> enabled{true};
  bool detaching = false;  // detach_async began (under g_mu)
  std::uint32_t id = 0;    // index of its hit counters in every thread's block
  std::uint64_t hits_baseline = 0;  // what the blocks held for `id` when it was attached
  std::atomic<std::uint64_t> recursion_skipped{0};
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
};

// ---- hit counters ----------------------------------------------------------------------------
// A locked increment per call costs about 5 ns, more than the rest of the call path, so each
// thread counts in its own block, which only it writes; counters() sums the blocks. Blocks
// are mmapped (async-signal-safe: callbacks may run in signal handlers), chained in a list
// that only grows, and a block whose thread has exited is taken over by the next new thread
// (its counts stay: only sums are read). An ops id is reused once its ops is detached; the
// new ops starts from the sum the blocks hold then.
constexpr std::uint32_t kMaxOps = 4096;
struct CounterBlock {
  std::atomic<pid_t> owner;
  CounterBlock* next;
  std::uint64_t hits[kMaxOps];
};
std::atomic<CounterBlock*> g_blocks{nullptr};
thread_local constinit CounterBlock* t_block __attribute__((tls_model("initial-exec"))) = nullptr;

CounterBlock* claim_block() noexcept {
  const pid_t me = static_cast<pid_t>(::syscall(SYS_gettid));
  for (CounterBlock* b = g_blocks.load(std::memory_order_acquire); b; b = b->next) {
    pid_t owner = b->owner.load(std::memory_order_relaxed);
    if (::syscall(SYS_tgkill, ::getpid(), owner, 0) != 0 && errno == ESRCH &&
        b->owner.compare_exchange_strong(owner, me)) {
      return t_block = b;
    }
  }
  void* mem = ::mmap(nullptr, sizeof(CounterBlock), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return nullptr;
  auto* b = static_cast<CounterBlock*>(mem);  // zero-filled
  b->owner.store(me, std::memory_order_relaxed);
  b->next = g_blocks.load(std::memory_order_relaxed);
  while (!g_blocks.compare_exchange_weak(b->next, b, std::memory_order_acq_rel)) {
  }
  return t_block = b;
}

inline void count_hit(std::uint32_t id) noexcept {
  CounterBlock* b = t_block ? t_block : claim_block();
  if (!b) return;  // out of memory: the hit goes uncounted rather than the call failing
  std::atomic_ref<std::uint64_t> c(b->hits[id]);
  c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);  // only this thread writes it
}

std::uint64_t sum_hits(std::uint32_t id) {
  std::uint64_t sum = 0;
  for (CounterBlock* b = g_blocks.load(std::memory_order_acquire); b; b = b->next) {
    sum += std::atomic_ref<std::uint64_t>(b->hits[id]).load(std::memory_order_relaxed);
  }
  return sum;
}

std::vector<std::uint32_t> g_free_ids;  // under g_mu
std::uint32_t g_next_id = 0;

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
  const std::string* name;    // in the discovery cache, valid under g_mu
  const std::string* object;
  EntryForm form;
};

// ---- discovery cache -----------------------------------------------------------------------------
// Reading an object's symbols with libelf costs milliseconds, so each loaded object is read
// once, keyed by load bias and name; objects unloaded since are dropped. Under g_mu.
struct CachedObject {
  sites::hooks::ObjectSites sites;
  bool seen = false;  // still loaded at the last refresh
};
std::map<std::pair<std::uintptr_t, std::string>, CachedObject> g_objects;
std::vector<Candidate> g_all;  // every cached site, sorted by entry; rebuilt when g_objects changes
bool g_all_stale = true;

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
  if (std::erase_if(g_objects, [](const auto& kv) { return !kv.second.seen; }) > 0) g_all_stale = true;
}

// Every patchable function loaded now, sorted by entry.
const std::vector<Candidate>& all_candidates() {
  refresh_objects();
  if (!g_all_stale) return g_all;
  g_all.clear();
  for (const auto& [key, o] : g_objects) {
    for (const auto& s : o.sites.sites) {
      g_all.push_back({s.entry, s.name.empty() ? &s.symbol : &s.name, &o.sites.path, s.form});
    }
  }
  std::sort(g_all.begin(), g_all.end(), [](const Candidate& a, const Candidate& b) { return a.entry < b.entry; });
  g_all_stale = false;
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
        if (it == all.end() || it->entry != e) return not_patchable("the function at " + common::hex_address(e));
        out.push_back(*it);
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
  for (Candidate& c : out) c.form = sites::hooks::form_at(c.entry);  // the cache's may be stale
  return out;
}

// Queues "call the stub" at each site of `enable` and "5-byte nop" at each of `disable`,
// writing literal slots first, and applies them as one batch.
Status switch_sites(const std::vector<Site*>& enable, const std::vector<Site*>& disable,
                    const std::map<std::uintptr_t, EntryForm>& forms) {
  // Literal slots first, all in one write per page: no thread reads a slot before its site
  // calls the stub, and the batch's serialisations order these writes before that.
  std::vector<text::UnexecutedWrite> literals;
  for (Site* s : enable) {
    if (s->literal_written) continue;
    literals.push_back({reinterpret_cast<void*>(s->entry - 8),
                        {reinterpret_cast<const std::uint8_t*>(&s->cell), sizeof s->cell}});
  }
  if (Status st = text::write_unexecuted(literals); !st.ok()) return st;
  for (Site* s : enable) s->literal_written = true;

  text::PatchBatch batch;
  batch.reserve(enable.size() + disable.size());
  for (Site* s : enable) {
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

// After an object was unloaded: it and its sites leave every table, so that an object loaded later
// at the same addresses starts clean (its literal slots unwritten, its entries nops).
void forget_object(const ObjectRange& r) {
  std::lock_guard lock(g_mu);
  if (g_objects.erase({r.base, r.name}) > 0) g_all_stale = true;  // a reload at the same address is read afresh
  const std::uintptr_t begin = r.begin, end = r.end;
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
      return Status::error("the entry of " + (c.name->empty() ? common::hex_address(c.entry) : *c.name) +
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
      s.name = *c.name;
      s.object = *c.object;
      s.cell = new SiteCell;
    }
    forms[c.entry] = c.form;
    if (!s.enabled) enable.push_back(&s);
  }
  // Code first: a site that calls the stub before its cell names the ops just returns. So a
  // failed batch leaves nothing to undo but literal slots no thread reads.
  if (g_free_ids.empty() && g_next_id == kMaxOps) {
    return Status::error("hooks::attach: " + std::to_string(kMaxOps) + " ops are attached already; detach some first");
  }
  if (Status st = switch_sites(enable, {}, forms); !st.ok()) return st;
  for (Site* s : enable) s->enabled = true;
  ops.state = new Ops::State;
  if (g_free_ids.empty()) {
    ops.state->id = g_next_id++;
  } else {
    ops.state->id = g_free_ids.back();
    g_free_ids.pop_back();
  }
  ops.state->hits_baseline = sum_hits(ops.state->id);
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

// After a grace period: nothing reads the targets or runs the ops any more.
void free_all(const std::vector<std::uintptr_t>& retired, Ops& ops) {
  for (std::uintptr_t t : retired) free_target(t);
  std::lock_guard lock(g_mu);
  g_free_ids.push_back(ops.state->id);
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
  c.hits = sum_hits(ops.state->id) - ops.state->hits_baseline;
  c.recursion_skipped = ops.state->recursion_skipped.load(std::memory_order_relaxed);
  c.functions = ops.state->entries.size();
  return c;
}

Result<std::vector<Function>> patchable_functions() {
  std::vector<Function> out;
  std::lock_guard lock(g_mu);
  for (const Candidate& c : all_candidates()) {
    Function f{c.entry, *c.name, *c.object, 0};
    if (auto it = g_sites.find(c.entry); it != g_sites.end()) f.ops = it->second.ops.size();
    out.push_back(std::move(f));
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
  for (std::size_t i = 0; i < count; ++i) {
    Ops& o = *ops[i];
    if (!o.state->enabled.load(std::memory_order_relaxed)) continue;
    count_hit(o.state->id);
    o.entry(o, entry, caller, *regs);
  }
  t_in_callback = false;
}

// dlclose, interposed: when the object is really unloaded (its last reference dropped), its
// hooked sites are forgotten (see forget_object). The program must not be running the
// object's code when it closes it, hooked or not; threads inside tramway's stub on behalf of
// one of its functions are the program's business alike.
extern "C" int dlclose(void* handle) {
  using namespace tramway::hooks;
  static const auto real = reinterpret_cast<int (*)(void*)>(dlsym(RTLD_NEXT, "dlclose"));
  link_map* lm = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &lm) != 0 || !lm) return real(handle);
  const ObjectRange before = find_object(lm->l_addr, lm->l_name ? lm->l_name : "");
  const int rc = real(handle);
  if (before.found && !find_object(before.base, before.name).found) forget_object(before);
  return rc;
}
