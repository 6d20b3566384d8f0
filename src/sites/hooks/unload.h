// Function hooks and objects that are unloaded: pins that keep an object mapped while its
// code is read and written, and the dlclose interposer that takes unloaded objects out of
// the hook tables.
//
// The loader gives no way to learn, before a dlclose, whether it will unmap anything (the
// reference counts are private; dlclose of one object may unload its dependencies; libc
// unloads NSS and iconv modules without calling dlclose). So hooks never rely on seeing an
// unload coming. Instead:
//  - a batch only writes into objects it has pinned (dlopen RTLD_NOLOAD of each, taken after
//    selecting the sites and released after the batch): however the program unloads them,
//    they stay mapped until the pin is released, and the unmap then happens in the pin's
//    dlclose, after the batch; an object already gone when it is pinned fails the attach
//    with "object unloaded", before anything was written;
//  - an object whose unload or reload the tables have not caught up with is recognised under
//    the hooks lock before the tables are used (unload.cc, forget_dead_objects): the loader
//    no longer lists it, or its code no longer holds what tramway wrote there. Its sites are
//    abandoned (nobody executes unmapped code, and a fresh load holds the compiler's nops),
//    and what threads inside the stubs may still read goes after a grace period;
//  - the dlclose interposer runs that cleanup right after any dlclose that unloaded
//    something, so the tables do not hold unloaded objects for long.
//
// A detach does not write into an object it could not pin: its cells and slots turn calls
// away, and the sites leave the tables with the object. Limits: objects of another link-map
// namespace (dlmopen) cannot be pinned by name, so attaching to them fails saying so; and a
// thread inside a real dlclose (its destructors calling hooks) pins nothing, as it holds the
// loader lock — which holds for the interposed dlclose only, not for libc's own unloads.
//
// Lock order: the loader gate (common/loader_gate.h: held by pins, by the interposed dlopen and
// dlclose and by the hooks API; fork takes it) -> the loader lock (held by dlopen and dlclose
// while they run constructors and destructors, which may call hooks) -> the hooks lock (g_mu)
// -> dl_iterate_phdr's lock (the loader's write lock, held only while it edits its list, never
// while user code runs) and the text layer's patch lock. Pins are taken and released with no
// tramway lock but the gate held, and no tramway lock but the gate is held across the real
// dlclose.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tramway/status.h"

namespace tramway::sites::hooks {

// A loaded object as the loader lists it: load bias and name ("" for the executable).
using ObjectKey = std::pair<std::uintptr_t, std::string>;

// Bytes tramway wrote into an object's code, which no fresh load of the object holds.
struct Witness {
  std::uintptr_t address = 0;  // 0: nothing written there yet
  std::uint8_t bytes[8] = {};
  std::size_t size = 0;
};

// How many objects the loader has unloaded so far (dl_phdr_info::dlpi_subs), if it says. An
// object that tramway saw loaded and that is gone or loaded again since moved it.
std::optional<unsigned long long> unloads_so_far();

// The objects the loader lists at construction.
class LoadedObjects {
 public:
  LoadedObjects();
  // Whether the object tramway wrote `w` into is gone: the loader no longer lists it, or its
  // code no longer holds `w` (loaded again at the same address, or something else is mapped
  // there). nullopt when it is listed and `w` is empty. Reads through /proc/self/mem.
  std::optional<bool> gone(const ObjectKey& key, const Witness& w) const;

 private:
  std::set<ObjectKey> listed_;
};

// Keeps objects mapped: one dlopen(RTLD_NOLOAD) reference each. Released by the destructor,
// through the interposer (it may be the object's last reference), so it must not run under a
// tramway lock.
class ObjectPins {
 public:
  ObjectPins() = default;
  ObjectPins(const ObjectPins&) = delete;
  ObjectPins& operator=(const ObjectPins&) = delete;
  ~ObjectPins();

  // Pins the object the loader lists under `loader_name` ("" for the executable) with load
  // bias `base`. Fails, naming `path`, if it is no longer loaded there: "object unloaded".
  Status pin(std::uintptr_t base, const std::string& loader_name, const std::string& path);
  // True if `pin` succeeded for it (or it cannot be unloaded while this thread runs).
  bool holds(std::uintptr_t base, const std::string& loader_name) const;

 private:
  struct Pin {
    std::uintptr_t base;
    std::string loader_name;
    void* handle;  // null: nothing to release (the executable, or pinned by the loader lock)
  };
  std::vector<Pin> pins_;
};

// The interposed dlclose: the real one, then, if it unloaded anything, the tables forget
// what it unloaded.
int close_object(void* handle);

// Takes out of the hook tables every object that is gone (see above; unload.cc). Takes the
// hooks lock.
void forget_unloaded_objects();

namespace testing {
// Where attach calls the hook, with no lock held: after selecting the sites (before pinning
// their objects), and once they are pinned (before the batch).
enum class AttachPoint { selected, pinned };
void set_attach_hook(void (*hook)(AttachPoint));
void call_attach_hook(AttachPoint point);
}  // namespace testing

}  // namespace tramway::sites::hooks
