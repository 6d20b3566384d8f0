// Object pins and the dlclose interposer (sites/hooks/unload.h).
#include "sites/hooks/unload.h"

#include <dlfcn.h>
#include <link.h>
#include <sched.h>

#include <atomic>
#include <cstddef>
#include <cstring>
#include <optional>

#include "common/loader_gate.h"
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

}  // namespace tramway::sites::hooks

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
