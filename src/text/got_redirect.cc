#include "text/got_redirect.h"

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "common/tramway_mapping.h"
#include "text/internal.h"
#include "common/unload_freed.h"

namespace tramway::text::detail {
namespace {

constexpr const char* kNames[] = {"sigaction", "signal",      "sigprocmask",   "pthread_sigmask",
                                  "sigset",    "bsd_signal",  "sysv_signal",   "__sysv_signal"};
constexpr std::size_t kCount = sizeof kNames / sizeof kNames[0];

struct Slot {
  std::uintptr_t* where;
  std::uintptr_t original;
  std::uintptr_t relro_begin, relro_end;  // the object's RELRO range, made writable for stores
  std::uintptr_t object_base;  // the object it belongs to (dlpi_addr), to skip it once unloaded
  std::string object;
};

std::mutex g_mu;  // lock rank text (common/lock_order.h): taken with no other tramway lock
common::UnloadFreed<std::vector<Slot>> g_slots;  // used until unload
std::vector<Slot>& slots() { return g_slots.get(); }
std::atomic<std::size_t> g_redirected{0};

bool skipped(const std::string& name) {
  const std::string base = name.substr(name.rfind('/') + 1);
  return base.rfind("libc.so", 0) == 0 || base.rfind("ld-linux", 0) == 0 || base.rfind("linux-vdso", 0) == 0 ||
         common::is_tramway_mapping(name);
}

// Writes `value` to a GOT slot, making a RELRO page writable for the store.
void store(std::uintptr_t* where, std::uintptr_t value, std::uintptr_t relro_begin, std::uintptr_t relro_end) {
  const auto a = reinterpret_cast<std::uintptr_t>(where);
  const bool relro = a >= relro_begin && a < relro_end;
  const std::uintptr_t page = a & ~std::uintptr_t{static_cast<std::uintptr_t>(getpagesize()) - 1};
  if (relro) mprotect(reinterpret_cast<void*>(page), static_cast<std::size_t>(getpagesize()), PROT_READ | PROT_WRITE);
  __atomic_store_n(where, value, __ATOMIC_RELEASE);
  if (relro) mprotect(reinterpret_cast<void*>(page), static_cast<std::size_t>(getpagesize()), PROT_READ);
}

struct Scan {
  std::uintptr_t libc[kCount] = {};
  std::uintptr_t ours[kCount] = {};
  std::size_t rewritten = 0;
};

int scan_object(dl_phdr_info* info, std::size_t, void* arg) {
  auto* scan = static_cast<Scan*>(arg);
  const std::string name = info->dlpi_name ? info->dlpi_name : "";
  if (skipped(name)) return 0;
  const std::uintptr_t base = info->dlpi_addr;
  const ElfW(Dyn)* dyn = nullptr;
  std::uintptr_t relro_begin = 0, relro_end = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& p = info->dlpi_phdr[i];
    if (p.p_type == PT_DYNAMIC) dyn = reinterpret_cast<const ElfW(Dyn)*>(base + p.p_vaddr);
    if (p.p_type == PT_GNU_RELRO) {
      relro_begin = base + p.p_vaddr;
      relro_end = relro_begin + p.p_memsz;
    }
  }
  if (!dyn) return 0;
  // The loader relocates the dynamic section's pointers in place on x86-64, but not for every
  // object (the vDSO): an address below the load base is still an offset.
  auto ptr = [&](std::uintptr_t v) { return v < base ? v + base : v; };
  const ElfW(Sym)* symtab = nullptr;
  const char* strtab = nullptr;
  const ElfW(Rela)* tables[2] = {nullptr, nullptr};
  std::size_t sizes[2] = {0, 0};
  for (const ElfW(Dyn)* d = dyn; d->d_tag != DT_NULL; ++d) {
    switch (d->d_tag) {
      case DT_SYMTAB: symtab = reinterpret_cast<const ElfW(Sym)*>(ptr(d->d_un.d_ptr)); break;
      case DT_STRTAB: strtab = reinterpret_cast<const char*>(ptr(d->d_un.d_ptr)); break;
      case DT_JMPREL: tables[0] = reinterpret_cast<const ElfW(Rela)*>(ptr(d->d_un.d_ptr)); break;
      case DT_PLTRELSZ: sizes[0] = d->d_un.d_val; break;
      case DT_RELA: tables[1] = reinterpret_cast<const ElfW(Rela)*>(ptr(d->d_un.d_ptr)); break;
      case DT_RELASZ: sizes[1] = d->d_un.d_val; break;
      default: break;
    }
  }
  if (!symtab || !strtab) return 0;
  for (int t = 0; t < 2; ++t) {
    if (!tables[t]) continue;
    for (std::size_t i = 0; i < sizes[t] / sizeof(ElfW(Rela)); ++i) {
      const ElfW(Rela)& r = tables[t][i];
      const auto type = ELF64_R_TYPE(r.r_info);
      if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT) continue;
      const char* sym = strtab + symtab[ELF64_R_SYM(r.r_info)].st_name;
      for (std::size_t k = 0; k < kCount; ++k) {
        if (std::strcmp(sym, kNames[k]) != 0) continue;
        auto* where = reinterpret_cast<std::uintptr_t*>(base + r.r_offset);
        // Bound to libc, or (lazy binding) not bound yet: either way the next call would reach
        // libc. A slot bound elsewhere (the program's own wrapper library) is left alone.
        const std::uintptr_t now = __atomic_load_n(where, __ATOMIC_ACQUIRE);
        if (now == scan->ours[k] || (type == R_X86_64_GLOB_DAT && now != scan->libc[k])) break;
        Dl_info di{};
        const bool to_libc = now == scan->libc[k] ||
                             (dladdr(reinterpret_cast<void*>(now), &di) && di.dli_fname && !skipped(di.dli_fname) &&
                              reinterpret_cast<std::uintptr_t>(di.dli_fbase) == base);  // its own PLT stub
        if (!to_libc) break;
        slots().push_back({where, scan->libc[k], relro_begin, relro_end, base, name});
        store(where, scan->ours[k], relro_begin, relro_end);
        ++scan->rewritten;
        break;
      }
    }
  }
  return 0;
}

bool fill(Scan& s) {
  void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
  if (!libc) return false;
  for (std::size_t k = 0; k < kCount; ++k) {
    s.libc[k] = reinterpret_cast<std::uintptr_t>(dlsym(libc, kNames[k]));
    s.ours[k] = interposer_address(kNames[k]);
  }
  dlclose(libc);
  return true;
}

int still_loaded(dl_phdr_info* info, std::size_t, void* arg) {
  auto* loaded = static_cast<std::vector<std::pair<std::uintptr_t, std::string>>*>(arg);
  loaded->emplace_back(info->dlpi_addr, info->dlpi_name ? info->dlpi_name : "");
  return 0;
}

}  // namespace

std::size_t redirect_signal_calls() noexcept {
  try {
    std::lock_guard lock(g_mu);
    Scan s;
    if (!fill(s)) return 0;
    dl_iterate_phdr(scan_object, &s);
    g_redirected.fetch_add(s.rewritten, std::memory_order_relaxed);
    return s.rewritten;
  } catch (...) {
    return 0;
  }
}

std::size_t restore_signal_calls() noexcept {
  try {
    std::lock_guard lock(g_mu);
    std::vector<std::pair<std::uintptr_t, std::string>> loaded;
    dl_iterate_phdr(still_loaded, &loaded);
    std::size_t restored = 0;
    for (const Slot& s : slots()) {
      bool present = false;
      for (const auto& [b, n] : loaded) present = present || (b == s.object_base && n == s.object);
      if (!present) continue;  // unloaded meanwhile: its slot is gone with it
      if (__atomic_load_n(s.where, __ATOMIC_ACQUIRE) == s.original) continue;
      store(s.where, s.original, s.relro_begin, s.relro_end);
      ++restored;
    }
    slots().clear();
    g_redirected.store(0, std::memory_order_relaxed);
    return restored;
  } catch (...) {
    return 0;
  }
}

std::size_t redirected_signal_calls() noexcept { return g_redirected.load(std::memory_order_relaxed); }

}  // namespace tramway::text::detail
