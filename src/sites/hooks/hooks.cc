// Function hooks (tramway/hooks.h): attaching and detaching ops, enabling and disabling them,
// their counters; and g_mu, the lock of the hook tables. The rest of the machinery is in the
// files sites/hooks/internal.h lists.
//
// Lock order (common/lock_order.h): g_mu, the hook tables, rank hooks_tables: after the
// recorder's and the grace period's, before the text layer's; fork() takes it. Never held
// across a grace period (callbacks may take it: hooks::disable, counters). The loader lock
// comes before it and dl_iterate_phdr's after it (unload.h says why).
#include "tramway/hooks.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "arch/x86_64/callback_scan.h"
#include "common/fork_hooks.h"
#include "common/format.h"
#include "common/loader_gate.h"
#include "grace/internal.h"
#include "sites/hooks/internal.h"
#include "tramway/grace.h"

namespace tramway::hooks::detail {

std::mutex g_mu;  // lock rank hooks_tables (common/lock_order.h)

namespace {

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

}  // namespace
}  // namespace tramway::hooks::detail

namespace tramway::hooks {

using namespace detail;

namespace {

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
    auto selected = select(filter, ops.allow_trap);
    if (!selected.ok()) return selected.status();
    // Only here is an empty selection the filter's doing; after the pins it means unloaded.
    if (selected->empty()) return Status::error("hooks::attach: the filter selects no function; nothing was attached");
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
  if (Status g = grace::synchronize(retired.flavor()); !g.ok()) {
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
  bool vector_free = ops.promise_vector_free && !ops.save_extended_state;
  if (!ops.save_extended_state && !vector_free) {
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
  auto selected = unchanged ? Result<std::vector<Candidate>>(std::move(first.candidates)) : select(filter, ops.allow_trap);
  if (!selected.ok()) return selected.status();
  // Objects loaded since the pins were taken are left out, as if loaded after the attach (the
  // first selection's objects are all pinned).
  if (!unchanged)
    std::erase_if(*selected, [&](const Candidate& c) { return !pins.holds(c.key->first, c.key->second); });
  if (selected->empty()) {
    return Status::error("hooks::attach: the objects of every function the filter selected were unloaded meanwhile "
                         "(object unloaded); nothing was attached");
  }
  for (Candidate& c : *selected) {
    if (c.kind == HookKind::patchable) c.form = sites::hooks::form_at(c.entry);  // the cache's may be stale
  }

  for (const Candidate& c : *selected) {
    // Relocated ones are planned from their bytes; patchable ones holding their nops are fine.
    if (c.kind != HookKind::patchable || c.form != EntryForm::other) continue;
    const auto known = g_sites.find(c.entry);
    if (known == g_sites.end() || !known->second.enabled()) {
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
  std::vector<Site*> sites;  // of the candidates, in order
  sites.reserve(selected->size());
  // The candidates are sorted by entry: each one's site is found or made next to the last one's.
  auto hint = g_sites.begin();
  for (const Candidate& c : *selected) {
    hint = g_sites.try_emplace(hint, c.entry);
    Site& s = hint->second;
    ++hint;
    sites.push_back(&s);
    if (!s.cell) {
      s.function = c.entry;
      s.relocated = c.kind == HookKind::relocatable;
      s.trap = c.kind == HookKind::trap;
      s.entry = c.kind == HookKind::patchable ? c.entry : 0;  // relocated: its pad's site, taken by its first batch
      s.size = c.size;
      s.plan = c.plan;
      s.name = *c.name;
      s.object = *c.object;
      s.object_key = *c.key;
      s.cell = new SiteCell;
      s.cell->index = g_next_site_index < kMaxSites ? g_next_site_index++ : kMaxSites;
      s.cell->function = c.entry;
    }
    std::vector<Ops*> after = s.ops;
    after.push_back(&ops);
    const Mode m = mode_for(s, after);
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
  ops.state->sites = std::move(sites);
  retired.targets.reserve(ops.state->sites.size());
  for (std::size_t i = 0; i < ops.state->sites.size(); ++i) {
    const Candidate& c = (*selected)[i];
    Site& s = *ops.state->sites[i];
    s.ops.push_back(&ops);
    retired.targets.push_back(s.cell->target.exchange(target_for(s.ops), std::memory_order_acq_rel));
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
  retired.targets.reserve(ops.state->sites.size());
  for (Site* site : ops.state->sites) {
    Site& s = *site;
    std::erase(s.ops, &ops);
    retired.targets.push_back(s.cell->target.exchange(target_for(s.ops), std::memory_order_acq_rel));
    if (s.slot_ops == &ops) {  // from now on its slot turns every call away untraced
      s.slot.data->tag.store(0, std::memory_order_release);
      s.slot_ops = nullptr;
    }
    // Code that is not pinned is not written: the site keeps calling the stub or its slot,
    // which turn calls away now (as after a failed batch, below).
    if (!pins.holds(s.object_key.first, s.object_key.second)) continue;
    const Mode m = mode_for(s, s.ops);
    if (!site_is(s, m, s.ops)) changes.push_back({&s, m, m == Mode::direct ? s.ops[0] : nullptr});
  }
  // On failure the sites keep their code: a common-mode site calls the stub with a cell that
  // no longer names `ops` (correct, only slower); a direct-mode site of `ops` keeps calling its
  // slot, whose cleared tag turns calls away, until a later change fixes the site.
  (void)apply_modes(changes, retired);
  for (Site* s : ops.state->sites) retire_dead_slot(*s, retired);
  ops.state->sites.clear();  // attached to nothing now
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
  // Every thread that may still run a callback of `ops` is inside the stub's marker region;
  // one still in a detour's copy is seen by a tasks grace period.
  if (Status st = grace::synchronize(retired->flavor()); !st.ok())
    return keep_failed_detach(ops, std::move(*retired), "hooks::detach", st);
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
  Status st = grace::call(shared->flavor(), [shared, &ops, done = std::move(done)] {
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
  c.functions = ops.state->sites.size();
  return c;
}

}  // namespace tramway::hooks
