// Loads suite "hooks"' generated libraries (tools/torture/CMakeLists.txt) into one table.
#include "hooks_functions.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "tramway/hooks.h"

namespace tramway::torture {
namespace {

struct Library {
  const char* tag;
  int first, size;
  bool patchable;
};
constexpr Library kLibraries[] = {
    {"gcc", 0, 500, true},           {"clang", 500, 500, true},           {"gcc_reloc", 1000, 250, false},
    {"gcc_reloc_cf", 1250, 250, false}, {"clang_reloc", 1500, 250, false}, {"clang_reloc_cf", 1750, 250, false}};

struct Loaded {
  HookFunctions::Fn const* table = nullptr;
  unsigned long long* calls = nullptr;
};

bool open_library(const Library& l, Loaded* out, std::string* error) {
  const std::string path = std::string(TRAMWAY_TORTURE_HOOKS_DIR) + "/libtw_hooks_" + l.tag + ".so";
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    *error = std::string("dlopen: ") + dlerror();
    return false;
  }
  const std::string table = std::string("tw_fns_") + l.tag, calls = std::string("tw_fn_calls_") + l.tag;
  out->table = static_cast<HookFunctions::Fn const*>(dlsym(h, table.c_str()));
  out->calls = static_cast<unsigned long long*>(dlsym(h, calls.c_str()));
  if (!out->table || !out->calls) {
    *error = path + " lacks " + table + " or " + calls;
    return false;
  }
  return true;
}

void add(HookFunctions& t, HookFunctions::Fn fn, int number, unsigned long long* calls) {
  const int i = t.count++;
  t.fns[i] = fn;
  t.entries[i] = reinterpret_cast<std::uintptr_t>(fn);
  t.number[i] = number;
  t.body_calls[i] = calls;
}

}  // namespace

bool load_hook_functions(HookFunctions& t, std::string* refused, std::string* error) {
  Loaded loaded[std::size(kLibraries)];
  for (std::size_t l = 0; l < std::size(kLibraries); ++l) {
    if (!open_library(kLibraries[l], &loaded[l], error)) return false;
  }
  t.count = 0;
  for (std::size_t l = 0; l < std::size(kLibraries); ++l) {
    const Library& lib = kLibraries[l];
    if (!lib.patchable) continue;
    for (int j = 0; j < lib.size; ++j) {
      // GCC: five 1-byte nops; Clang: one 5-byte nop (0f 1f 44 00 xx, any displacement).
      static const std::uint8_t gcc[5] = {0x90, 0x90, 0x90, 0x90, 0x90}, clang[4] = {0x0f, 0x1f, 0x44, 0x00};
      const bool is_gcc = lib.first == 0;
      if (std::memcmp(reinterpret_cast<const void*>(loaded[l].table[j]), is_gcc ? gcc : clang, is_gcc ? 5 : 4) != 0) {
        *error = "tw_fn_" + std::to_string(lib.first + j) + " does not start with " +
                 (is_gcc ? "GCC's five 1-byte nops" : "Clang's 5-byte nop");
        return false;
      }
      add(t, loaded[l].table[j], lib.first + j, &loaded[l].calls[j]);
    }
  }
  t.patchable = t.count;

  // The others: hooked through relocated prologues when the relocator accepts them.
  auto all = hooks::functions();
  if (!all.ok()) {
    *error = "hooks::functions(): " + all.status().message();
    return false;
  }
  std::map<std::uintptr_t, const hooks::Function*> by_entry;
  for (const hooks::Function& f : *all) by_entry[f.entry] = &f;
  t.without_entry = 0;
  for (std::size_t l = 0; l < std::size(kLibraries); ++l) {
    const Library& lib = kLibraries[l];
    if (lib.patchable) continue;
    for (int j = 0; j < lib.size; ++j) {
      ++t.without_entry;
      const std::string name = "tw_fn_" + std::to_string(lib.first + j);
      const auto it = by_entry.find(reinterpret_cast<std::uintptr_t>(loaded[l].table[j]));
      if (it == by_entry.end() || it->second->name != name) {
        *error = "hooks::functions() does not list " + name + " at its entry";
        return false;
      }
      const hooks::Function& f = *it->second;
      if (f.kind == hooks::HookKind::patchable) {
        *error = name + " was built without a patchable entry but is listed as patchable";
        return false;
      }
      if (f.kind != hooks::HookKind::relocatable) {
        *refused += "  " + name + " (" + lib.tag + "): " + hooks::hook_kind_name(f.kind) + ": " + f.reason + "\n";
        continue;
      }
      const int i = t.count;
      add(t, loaded[l].table[j], lib.first + j, &loaded[l].calls[j]);
      t.original_size[i] = std::min(f.size, t.original[i].size());
      std::memcpy(t.original[i].data(), reinterpret_cast<const void*>(t.entries[i]), t.original_size[i]);
    }
  }
  return true;
}

int relocated_bytes_changed(const HookFunctions& t, std::string* first) {
  int changed = 0;
  for (int i = t.patchable; i < t.count; ++i) {
    if (std::memcmp(t.original[i].data(), reinterpret_cast<const void*>(t.entries[i]), t.original_size[i]) == 0) {
      continue;
    }
    if (changed++ == 0) {
      *first = "tw_fn_" + std::to_string(t.number[i]) + "'s first bytes differ from those it had before it was hooked";
    }
  }
  return changed;
}

}  // namespace tramway::torture
