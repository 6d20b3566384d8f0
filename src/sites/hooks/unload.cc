// Object pins, the dlclose interposer, and the hook tables forgetting objects that are gone
// (sites/hooks/unload.h).
#include "sites/hooks/unload.h"

#include <dlfcn.h>
#include <link.h>
#include <sched.h>

#include <atomic>
#include <cstddef>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "arch/x86_64/insn.h"
#include "common/loader_gate.h"
#include "sites/hooks/internal.h"
#include "tramway/grace.h"
#include "tramway/text/patch.h"

namespace tramway::sites::hooks {
namespace {

// Real dlcloses this thread is inside. Meanwhile it holds the loader lock, so no other thread
// can unload anything, and objects are not to be pinned: the ones whose destructors run now
// are still listed, dlopen would find them and raise a count the loader no longer looks at.
thread_local int t_closing = 0;

std::atomic<void (*)(testing::AttachPoint)> g_attach_hook{nullptr};

int real_dlclose(void* handle) {
  static const auto real = reinterpret_cast<int (*)(void*)>(dlsym(RTLD_NEXT, "dlclose"));
  return real(handle);
}

using DlopenFn = void* (*)(const char*, int);
DlopenFn real_dlopen() {
  static const auto real = reinterpret_cast<DlopenFn>(dlsym(RTLD_NEXT, "dlopen"));
  return real;
}

bool listed(std::uintptr_t base, const std::string& loader_name) {
  struct Query {
    std::uintptr_t base;
    const std::string* name;
    bool found = false;
  } q{base, &loader_name};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* arg) {
        auto* q = static_cast<Query*>(arg);
        if (info->dlpi_addr != q->base || *q->name != (info->dlpi_name ? info->dlpi_name : "")) return 0;
        q->found = true;
        return 1;
      },
      &q);
  return q.found;
}

}  // namespace

std::optional<unsigned long long> unloads_so_far() {
  std::optional<unsigned long long> subs;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t size, void* arg) {
        if (size >= offsetof(dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs)
          *static_cast<std::optional<unsigned long long>*>(arg) = info->dlpi_subs;
        return 1;
      },
      &subs);
  return subs;
}

LoadedObjects::LoadedObjects() {
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* arg) {
        static_cast<std::set<ObjectKey>*>(arg)->emplace(info->dlpi_addr, info->dlpi_name ? info->dlpi_name : "");
        return 0;
      },
      &listed_);
}

std::optional<bool> LoadedObjects::gone(const ObjectKey& key, const Witness& w) const {
  if (!listed_.count(key)) return true;
  if (w.size == 0) return std::nullopt;
  std::uint8_t now[sizeof w.bytes];
  if (!text::read_code(reinterpret_cast<const void*>(w.address), {now, w.size}).ok()) return true;
  return std::memcmp(now, w.bytes, w.size) != 0;
}

ObjectPins::~ObjectPins() {
  for (auto it = pins_.rbegin(); it != pins_.rend(); ++it) {
    if (it->handle) close_object(it->handle);
  }
}

bool ObjectPins::holds(std::uintptr_t base, const std::string& loader_name) const {
  for (const Pin& p : pins_) {
    if (p.base == base && p.loader_name == loader_name) return true;
  }
  return false;
}

Status ObjectPins::pin(std::uintptr_t base, const std::string& loader_name, const std::string& path) {
  if (holds(base, loader_name)) return {};
  if (loader_name.empty() || t_closing > 0) {  // the executable is never unloaded
    pins_.push_back({base, loader_name, nullptr});
    return {};
  }
  // dlopen waits for the loader lock: an unload under way completes first, and the object is
  // then either gone or not being unloaded (and from now on cannot be).
  common::LoaderUse use;
  // A program that loads and unloads the object in a loop can unload and reload it between
  // the two looks again and again: look a while before blaming another namespace.
  for (int attempt = 0; attempt < 200; ++attempt) {
    if (attempt > 0) sched_yield();
    if (void* h = real_dlopen()(loader_name.c_str(), RTLD_NOLOAD | RTLD_LAZY)) {
      link_map* lm = nullptr;
      if (dlinfo(h, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_addr == base) {
        pins_.push_back({base, loader_name, h});
        return {};
      }
      close_object(h);  // a later load at another address (this may unload it again)
      return Status::error(path + " was unloaded (object unloaded), and loaded again at another address");
    }
    if (!listed(base, loader_name)) return Status::error(path + " was unloaded meanwhile (object unloaded)");
    // Listed, but not found by name: unloaded and loaded again between the two looks, or in
    // another link-map namespace (dlmopen), which dlopen does not search.
  }
  return Status::error("cannot keep " + path + " loaded while its code is patched: dlopen(RTLD_NOLOAD) does not find it" +
                       " (loaded by dlmopen into another namespace?)");
}

int close_object(void* handle) {
  common::LoaderUse use;
  const auto before = unloads_so_far();
  ++t_closing;
  const int rc = real_dlclose(handle);
  --t_closing;
  if (!before || unloads_so_far() != before) forget_unloaded_objects();
  return rc;
}

namespace testing {
void set_attach_hook(void (*hook)(AttachPoint)) { g_attach_hook.store(hook); }
void call_attach_hook(AttachPoint point) {
  if (auto* hook = g_attach_hook.load(std::memory_order_relaxed)) hook(point);
}
}  // namespace testing

void forget_unloaded_objects() {
  std::lock_guard lock(tramway::hooks::detail::g_mu);
  tramway::hooks::detail::forget_dead_objects();
}

}  // namespace tramway::sites::hooks

// ---- the hook tables forgetting objects that are gone ------------------------------------------
namespace tramway::hooks::detail {
namespace {

// An object gone (unloaded, maybe loaded again since): it and its sites leave every table, so
// that a later load at the same address starts clean (its literal slots unwritten, its
// entries nops). Its code is not touched: nobody executes it, or it is a fresh copy. Under g_mu.
void forget_object(const ObjectKey& key) {
  uncache_object(key);  // a reload here is read afresh
  Retired retired;
  std::vector<SiteCell*> cells;  // may still be read by a thread that was inside the stub
  std::vector<TrapProbe*> probes;
  std::vector<std::unique_ptr<TrapProbe>> owned_probes;  // their copies are retired, the rest freed here
  for (auto it = g_sites.begin(); it != g_sites.end();) {
    Site& s = it->second;
    if (s.object_key != key) {
      ++it;
      continue;
    }
    for (Ops* o : s.ops) std::erase(o->state->sites, &s);
    retired.targets.push_back(s.cell->target.exchange(0, std::memory_order_acq_rel));
    retire_copy(s, retired);  // a thread preempted in it would return into unmapped code anyway
    if (s.probe) probes.push_back(s.probe.get());
    if (s.slot) {
      s.slot.data->tag.store(0, std::memory_order_release);
      retired.slots.push_back(s.slot);
    }
    cells.push_back(s.cell);
    if (s.probe) owned_probes.push_back(std::move(s.probe));
    it = g_sites.erase(it);
  }
  forget_trap_probes(probes, retired);
  if (cells.empty()) return;
  const grace::Flavor flavor = retired.flavor();
  (void)grace::call(flavor, [retired = std::move(retired), cells] {
    release(retired);
    for (SiteCell* c : cells) delete c;
  });
}

// What tramway wrote into a site's code that no fresh load of its object holds: the cell's
// address in its literal slot, or the call of its direct slot; for a relocated function, the
// jmp over its run.
sites::hooks::Witness witness_of(const Site& s) {
  sites::hooks::Witness w;
  if (s.trap) {
    if (s.probe) {
      w.address = s.probe->address;
      w.size = 1;
      w.bytes[0] = arch::kInt3;
    }
  } else if (s.relocated) {  // its pad is tramway's: only the jmp over the run is in the object
    if (s.detour) {
      w.address = s.detour->plan->run_start;
      w.size = s.detour->jmp.size();
      std::memcpy(w.bytes, s.detour->jmp.data(), s.detour->jmp.size());
    }
  } else if (s.literal_written) {
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

// The loader's unload count when forget_dead_objects last looked (under g_mu). While it has not
// moved, no object died since (every object in the tables was alive then, or pinned when it
// entered them), and the look — a pass over every site, a read of code per object — is skipped.
std::optional<unsigned long long> g_unloads_checked;

}  // namespace

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

}  // namespace tramway::hooks::detail

// dlclose, interposed: see close_object.
extern "C" int dlclose(void* handle) { return tramway::sites::hooks::close_object(handle); }

// dlopen, interposed (loader_entry.S): where the stub jumps, the caller's arguments intact.
extern "C" __attribute__((visibility("hidden"))) void* tramway_dlopen_gated(const char* file, int mode) {
  tramway::common::LoaderUse use;
  return tramway::sites::hooks::real_dlopen()(file, mode);
}

// A name with a '/' and no '$' (no dynamic string token) is opened as it is, whoever calls;
// any other is searched for along its caller's paths, so the real dlopen must see the caller.
extern "C" __attribute__((visibility("hidden"))) void* tramway_dlopen_route(const char* file) {
  const bool caller_independent = file && std::strchr(file, '/') && !std::strchr(file, '$');
  return caller_independent ? reinterpret_cast<void*>(&tramway_dlopen_gated)
                            : reinterpret_cast<void*>(tramway::sites::hooks::real_dlopen());
}
