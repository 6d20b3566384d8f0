// The functions loaded now, and which of them a filter selects: the discovery cache (each
// object's sites and functions, read once by discovery.cc), the Filter kinds,
// patchable_functions() and functions().
//
// Reading an object's symbols with libelf costs milliseconds, so each loaded object is read
// once, keyed by load bias and name; objects unloaded since are dropped. Its functions without
// patchable entries are read only when asked for (functions(), a glob, a name or address no
// patchable function answers), and the kind of each (hook_kind.h: a decode of the whole
// function, libc's all ~18 ms of CPU) only when it is listed or selected; both are kept with
// the object. Under g_mu.
#include <fnmatch.h>
#include <link.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/format.h"
#include "sites/hooks/hook_kind.h"
#include "sites/hooks/internal.h"

namespace tramway::hooks::detail {

std::uint64_t g_all_version = 0;  // rebuilds of g_all: candidates taken from it stay valid meanwhile

namespace {

Status not_patchable(const std::string& what) {
  return Status::error(what + " is not a patchable function: compile it with -fpatchable-function-entry=13,8 "
                              "(GCC >= 8, Clang >= 10)");
}

using sites::hooks::HookKindOf;

// A function without a patchable entry that cannot be relocated was selected: say why.
Status not_hookable(const std::string& what, const HookKindOf& k) {
  const std::string advice = "; nothing was attached (compiled with -fpatchable-function-entry=13,8, GCC >= 8 or "
                             "Clang >= 10, it can be hooked whatever its prologue)";
  if (k.kind == HookKind::trap) {
    return Status::error(what + " can only be hooked by a trap probe, as its prologue cannot be relocated (" + k.reason +
                         "): set Ops::allow_trap (tramway record --trap) to accept a signal a call" + advice);
  }
  return Status::error(what + " cannot be hooked: " + k.reason + advice);
}

struct CachedObject {
  sites::hooks::ObjectSites sites;
  std::vector<std::optional<HookKindOf>> kinds;  // of sites.functions, decided lazily
  bool functions_read = false;  // sites.functions (read lazily: read_all_functions)
  bool seen = false;  // still loaded at the last refresh

  // Decided once: a function hooked since holds our jmp, which is not its prologue.
  const HookKindOf& kind_of(std::size_t i) {
    if (!kinds[i] && !decide_without_code(i)) {
      const sites::hooks::FunctionSymbol& f = sites.functions[i];
      kinds[i] = sites::hooks::classify_function(f.address, f.size);
    }
    return *kinds[i];
  }

  // kind_of for many functions, their bytes read in a few system calls (IOV_MAX functions a
  // process_vm_readv) rather than one each: 10,000 functions of a glob took 10,000 calls.
  void decide_kinds(const std::vector<std::size_t>& which) {
    std::vector<std::size_t> todo;
    for (std::size_t i : which) {
      if (!kinds[i] && !decide_without_code(i)) todo.push_back(i);
    }
    std::vector<std::vector<std::uint8_t>> code(todo.size());
    std::vector<arch::OwnMemoryRead> reads;
    reads.reserve(todo.size());
    for (std::size_t k = 0; k < todo.size(); ++k) {
      const sites::hooks::FunctionSymbol& f = sites.functions[todo[k]];
      code[k].resize(f.size);
      reads.push_back({f.address, code[k]});
    }
    const std::vector<bool> ok = arch::read_own_memory_many(reads);
    for (std::size_t k = 0; k < todo.size(); ++k) {
      const sites::hooks::FunctionSymbol& f = sites.functions[todo[k]];
      if (!ok[k]) code[k].clear();
      kinds[todo[k]] = sites::hooks::classify_code(f.address, f.size, code[k]);
    }
  }

 private:
  // Decides function `i` when its bytes do not matter; false when they do.
  bool decide_without_code(std::size_t i) {
    const sites::hooks::FunctionSymbol& f = sites.functions[i];
    if (auto why = sites::hooks::refusal_by_identity(sites.path, f.symbol)) {
      kinds[i] = HookKindOf{HookKind::refused, *why, nullptr};
    } else if (auto it = g_sites.find(f.address); it != g_sites.end() && (it->second.relocated || it->second.trap)) {
      kinds[i] = HookKindOf{it->second.relocated ? HookKind::relocatable : HookKind::trap, {}, nullptr};
    } else if (f.size == 0) {
      kinds[i] = sites::hooks::classify_code(f.address, 0, {});
    } else {
      return false;
    }
    return true;
  }
};
std::map<ObjectKey, CachedObject> g_objects;
std::vector<Candidate> g_all;  // every cached site, sorted by entry; rebuilt when g_objects changes
bool g_all_stale = true;

// The objects dropped from the cache lately, so that an address selected while its object was
// loaded (patchable_functions, then attach) is reported as unloaded, not as not patchable.
struct Unloaded {
  std::string path;
  std::uintptr_t first, last;  // entries
};
std::vector<Unloaded> g_unloaded;  // the last few, oldest first

void drop_cached(std::map<ObjectKey, CachedObject>::iterator it) {
  const auto& sites = it->second.sites.sites;
  if (!sites.empty()) {
    if (g_unloaded.size() == 16) g_unloaded.erase(g_unloaded.begin());
    g_unloaded.push_back({it->second.sites.path, sites.front().entry, sites.back().entry});
  }
  g_objects.erase(it);
  g_all_stale = true;
}

const Unloaded* unloaded_at(std::uintptr_t entry) {
  for (auto u = g_unloaded.rbegin(); u != g_unloaded.rend(); ++u) {
    if (entry >= u->first && entry <= u->last) return &*u;
  }
  return nullptr;
}

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
  for (auto it = g_objects.begin(); it != g_objects.end();) {
    auto next = std::next(it);
    if (!it->second.seen) drop_cached(it);
    it = next;
  }
}

using sites::hooks::FunctionSymbol;

// Reads the functions without patchable entries of the cached objects that have not had them
// read (after refresh_objects). The sites stay as they are: candidates point into them.
void read_all_functions() {
  if (std::all_of(g_objects.begin(), g_objects.end(), [](const auto& o) { return o.second.functions_read; })) return;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void*) {
        auto it = g_objects.find({info->dlpi_addr, info->dlpi_name ? info->dlpi_name : ""});
        if (it == g_objects.end() || it->second.functions_read) return 0;
        CachedObject& o = it->second;
        o.functions_read = true;  // unreadable: no functions
        auto all = sites::hooks::discover_object(*info, sites::hooks::Scope::all_functions);
        if (all.ok()) o.sites.functions = std::move(all->functions);
        o.kinds.assign(o.sites.functions.size(), std::nullopt);
        return 0;
      },
      nullptr);
}

std::string describe(const std::pair<CachedObject*, std::size_t>& f) {
  const FunctionSymbol& s = f.first->sites.functions[f.second];
  return "'" + s.name + "' (" + common::hex_address(s.address) + " in " + f.first->sites.path + ")";
}

}  // namespace

// Every patchable function loaded now, sorted by entry.
const std::vector<Candidate>& all_candidates() {
  refresh_objects();
  if (!g_all_stale) return g_all;
  g_all.clear();
  for (const auto& [key, o] : g_objects) {
    for (const auto& s : o.sites.sites) {
      g_all.push_back(
          {s.entry, HookKind::patchable, s.name.empty() ? &s.symbol : &s.name, &o.sites.path, &key, s.form, s.size,
           nullptr});
    }
  }
  std::sort(g_all.begin(), g_all.end(), [](const Candidate& a, const Candidate& b) { return a.entry < b.entry; });
  g_all_stale = false;
  ++g_all_version;
  return g_all;
}

namespace {

using Refused = std::optional<std::pair<CachedObject*, std::size_t>>;

// Adds function `i` of `o` to `out` when it can be hooked; else notes it in `refused` (the first
// one, for the error when none can). Returns whether it was added.
bool add_if_hookable(std::vector<Candidate>& out, const ObjectKey& key, CachedObject& o, std::size_t i,
                     bool allow_trap, Refused& refused) {
  const FunctionSymbol& f = o.sites.functions[i];
  const HookKindOf& kind = o.kind_of(i);
  if (can_hook(kind.kind, allow_trap)) {
    out.push_back({f.address, kind.kind, &f.name, &o.sites.path, &key, EntryForm::other, f.size, kind.plan});
    return true;
  }
  if (!refused) refused = std::pair{&o, i};
  return false;
}

// Adds the functions without patchable entries that `match` accepts and that can be hooked
// (relocated, or probed with `allow_trap`); returns the first that cannot.
template <typename Match>
Refused add_hookable(std::vector<Candidate>& out, const Match& match, bool allow_trap, std::size_t* refused = nullptr) {
  Refused first_refused;
  std::vector<std::size_t> matched;
  for (auto& [key, o] : g_objects) {
    matched.clear();
    for (std::size_t i = 0; i < o.sites.functions.size(); ++i) {
      if (match(o.sites.functions[i])) matched.push_back(i);
    }
    o.decide_kinds(matched);
    for (std::size_t i : matched) {
      if (!add_if_hookable(out, key, o, i, allow_trap, first_refused) && refused) ++*refused;
    }
  }
  return first_refused;
}

// add_hookable for the function at `e`: each object's functions are sorted by address, so a
// binary search per object (a scan per address made an attach to 10,000 addresses quadratic:
// ~0.4 s with the 40,000 functions of a benchmark's objects).
Refused add_hookable_at(std::vector<Candidate>& out, std::uintptr_t e, bool allow_trap) {
  Refused first_refused;
  for (auto& [key, o] : g_objects) {
    const auto& fns = o.sites.functions;
    auto it = std::lower_bound(fns.begin(), fns.end(), e, [](const FunctionSymbol& f, std::uintptr_t v) { return f.address < v; });
    if (it == fns.end() || it->address != e) continue;
    if (add_if_hookable(out, key, o, static_cast<std::size_t>(it - fns.begin()), allow_trap, first_refused)) return std::nullopt;
  }
  return first_refused;
}

}  // namespace

// The functions the filter selects, or an error naming what did not match. A function without
// a patchable entry is selected when it can be relocated; names and addresses look at those
// only when no patchable function answers (reading every object's symbols costs milliseconds),
// a glob always does.
Result<std::vector<Candidate>> select(const Filter& filter, bool allow_trap) {
  const std::vector<Candidate>& all = all_candidates();
  std::vector<Candidate> out;
  switch (filter.kind()) {
    case Filter::Kind::addresses:
      for (std::uintptr_t e : filter.entries()) {
        auto it = std::lower_bound(all.begin(), all.end(), e, [](const Candidate& c, std::uintptr_t v) { return c.entry < v; });
        if (it != all.end() && it->entry == e) {
          out.push_back(*it);
          continue;
        }
        if (const Unloaded* u = unloaded_at(e)) {
          return Status::error("the function at " + common::hex_address(e) + " was in " + u->path +
                               ", which was unloaded (object unloaded); nothing was attached");
        }
        read_all_functions();
        const std::size_t before = out.size();
        auto refused = add_hookable_at(out, e, allow_trap);
        if (out.size() != before) continue;
        if (refused) return not_hookable(describe(*refused), refused->first->kind_of(refused->second));
        return not_patchable("the function at " + common::hex_address(e));
      }
      break;
    case Filter::Kind::names:
      for (const std::string& n : filter.patterns()) {
        const std::size_t before = out.size();
        for (const Candidate& c : all) {
          if (*c.name == n) out.push_back(c);
        }
        if (out.size() != before) continue;
        read_all_functions();
        auto refused =
            add_hookable(out, [&](const FunctionSymbol& f) { return f.name == n || f.symbol == n; }, allow_trap);
        if (out.size() != before) continue;
        if (refused) return not_hookable(describe(*refused), refused->first->kind_of(refused->second));
        return not_patchable("'" + n + "' (no function has that name)");
      }
      break;
    case Filter::Kind::glob: {
      const char* pattern = filter.patterns()[0].c_str();
      for (const Candidate& c : all) {
        if (fnmatch(pattern, c.name->c_str(), 0) == 0) out.push_back(c);
      }
      read_all_functions();
      std::size_t refused = 0;
      (void)add_hookable(out, [&](const FunctionSymbol& f) { return fnmatch(pattern, f.name.c_str(), 0) == 0; },
                         allow_trap, &refused);
      if (out.empty()) {
        return Status::error("the filter '" + filter.patterns()[0] + "' matches no function that can be hooked" +
                             (refused ? " (it matches " + std::to_string(refused) +
                                            " that cannot: 'tramway list --all' says why)"
                                      : std::string()));
      }
      break;
    }
  }
  std::sort(out.begin(), out.end(), [](const Candidate& a, const Candidate& b) { return a.entry < b.entry; });
  out.erase(std::unique(out.begin(), out.end(), [](const Candidate& a, const Candidate& b) { return a.entry == b.entry; }),
            out.end());
  return out;
}

void uncache_object(const ObjectKey& key) {
  if (auto it = g_objects.find(key); it != g_objects.end()) drop_cached(it);
}

}  // namespace tramway::hooks::detail

namespace tramway::hooks {

using namespace detail;

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

namespace {

// Under g_mu, the cache refreshed.
void append_patchable(std::vector<Function>& out) {
  for (const Candidate& c : all_candidates()) {
    Function f{c.entry, *c.name, *c.object, 0, 0, HookKind::patchable, c.size, {}};
    if (auto it = g_sites.find(c.entry); it != g_sites.end()) {
      f.ops = it->second.ops.size();
      if (it->second.cell->index < kMaxSites) f.hits = sum_site_hits(it->second.cell->index);
    }
    out.push_back(std::move(f));
  }
}

}  // namespace

Result<std::vector<Function>> patchable_functions() {
  std::vector<Function> out;
  std::lock_guard lock(g_mu);
  forget_dead_objects();
  append_patchable(out);
  return out;
}

Result<std::vector<Function>> functions() { return functions("*"); }

Result<std::vector<Function>> functions(const std::string& glob) {
  const auto matches = [&](const std::string& name) { return glob == "*" || fnmatch(glob.c_str(), name.c_str(), 0) == 0; };
  std::vector<Function> out;
  std::lock_guard lock(g_mu);
  forget_dead_objects();
  append_patchable(out);  // refreshes the cache
  std::erase_if(out, [&](const Function& f) { return !matches(f.name); });
  read_all_functions();
  for (auto& [key, o] : g_objects) {
    for (std::size_t i = 0; i < o.sites.functions.size(); ++i) {
      const sites::hooks::FunctionSymbol& s = o.sites.functions[i];
      if (!matches(s.name)) continue;
      const sites::hooks::HookKindOf& k = o.kind_of(i);
      Function f{s.address, s.name, o.sites.path, 0, 0, k.kind, s.size, k.reason};
      if (auto it = g_sites.find(s.address); it != g_sites.end()) {
        f.ops = it->second.ops.size();
        if (it->second.cell->index < kMaxSites) f.hits = sum_site_hits(it->second.cell->index);
      }
      out.push_back(std::move(f));
    }
  }
  std::sort(out.begin(), out.end(), [](const Function& a, const Function& b) { return a.entry < b.entry; });
  return out;
}

}  // namespace tramway::hooks
