// Functions without patchable entries (sites/hooks/discovery.h, hook_kind.h, and
// hooks::functions()): every sized STT_FUNC symbol of .symtab, else .dynsym, listed once per
// address with the kind of hook that could reach it, checked against Debian's own libz.so.1 and
// libc.so.6 (what `nm` says of them) and the hook fixtures; attach through relocated prologues,
// and its refusals.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <atomic>
#include <link.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "sites/hooks/discovery.h"
#include "sites/hooks/hook_kind.h"
#include "tramway/hooks.h"

namespace {

namespace sh = tramway::sites::hooks;
using tramway::hooks::Function;
using tramway::hooks::HookKind;

// The path the loader gave the object of `handle` (a soname resolves to a full path).
std::string path_of(void* handle) {
  link_map* map = nullptr;
  if (!handle || dlinfo(handle, RTLD_DI_LINKMAP, &map) != 0 || !map) return {};
  return map->l_name;
}

void* open_or_skip(const char* name) {
  void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  return h;
}

std::optional<tramway::Result<sh::ObjectSites>> discover_path(const std::string& path) {
  struct Find {
    const std::string& path;
    std::optional<tramway::Result<sh::ObjectSites>> found;
  } find{path, std::nullopt};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        auto& f = *static_cast<Find*>(data);
        if (!info->dlpi_name || f.path != info->dlpi_name) return 0;
        f.found = sh::discover_object(*info, sh::Scope::all_functions);
        return 1;
      },
      &find);
  return find.found;
}

std::string shell(const std::string& command) {
  std::string out;
  if (FILE* p = popen(command.c_str(), "r")) {
    char buf[4096];
    for (std::size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    pclose(p);
  }
  return out;
}

// What nm says of the object's dynamic symbols: link-time address -> size, for the defined
// functions with a size (T/t/W/w; not `i`, the ifunc resolvers).
std::map<std::uint64_t, std::uint64_t> nm_dynamic_functions(const std::string& path) {
  std::map<std::uint64_t, std::uint64_t> out;
  std::istringstream in(shell("nm -D --defined-only -S '" + path + "'"));
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string addr, size, type;
    if (!(f >> addr >> size >> type) || type.size() != 1 || std::string("TtWw").find(type) == std::string::npos)
      continue;
    const std::uint64_t s = std::stoull(size, nullptr, 16);
    if (s) out[std::stoull(addr, nullptr, 16)] = std::max(out[std::stoull(addr, nullptr, 16)], s);
  }
  return out;
}

std::vector<Function> functions_of(const std::string& object) {
  auto all = tramway::hooks::functions();
  EXPECT_TRUE(all.ok()) << all.status().message();
  std::vector<Function> out;
  if (all.ok()) {
    for (Function& f : *all)
      if (f.object == object) out.push_back(std::move(f));
  }
  return out;
}

const Function* named(const std::vector<Function>& fns, const std::string& name) {
  auto it = std::find_if(fns.begin(), fns.end(), [&](const Function& f) { return f.name == name; });
  return it == fns.end() ? nullptr : &*it;
}

TEST(FunctionDiscovery, LibzIsListedFromItsDynsymOnceAFunction) {
  void* h = open_or_skip("libz.so.1");
  if (!h) GTEST_SKIP() << "libz.so.1 is not installed";
  const std::string path = path_of(h);
  ASSERT_FALSE(path.empty());
  // The premise: Debian strips it, so only .dynsym names its functions.
  ASSERT_EQ(shell("readelf -S -W '" + path + "' | grep -c ' .symtab '"), "0\n") << path << " has a .symtab";
  const auto expected = nm_dynamic_functions(path);
  ASSERT_GT(expected.size(), 50u) << "nm lists too few functions of " << path;

  auto found = discover_path(path);
  ASSERT_TRUE(found && found->ok()) << (found ? found->status().message() : "not loaded");
  const sh::ObjectSites& o = **found;
  EXPECT_TRUE(o.sites.empty()) << "Debian's libz has no patchable entries";
  std::map<std::uint64_t, std::uint64_t> listed;
  for (const sh::FunctionSymbol& f : o.functions) {
    EXPECT_TRUE(listed.emplace(f.address - o.base, f.size).second) << f.name << " listed twice";
    EXPECT_FALSE(f.name.empty());
  }
  EXPECT_EQ(listed, expected) << "every sized function nm lists, at its address with its size, once";
  EXPECT_TRUE(std::is_sorted(o.functions.begin(), o.functions.end(),
                             [](auto& a, auto& b) { return a.address < b.address; }));

  // hooks::functions() gives each its kind; every one of libz's prologues relocates (today's
  // relocator and Debian 12's libz 1.2.13: a fact of this build, checked by bench_coverage too).
  const std::vector<Function> fns = functions_of(path);
  ASSERT_EQ(fns.size(), expected.size());
  std::map<HookKind, std::size_t> kinds;
  for (const Function& f : fns) {
    ++kinds[f.kind];
    EXPECT_NE(f.kind, HookKind::patchable) << f.name;
    EXPECT_EQ(f.reason.empty(), f.kind == HookKind::relocatable) << f.name << ": " << f.reason;
    EXPECT_EQ(f.kind, sh::classify_function(f.entry, f.size).kind) << f.name << " classified alike twice";
  }
  const Function* crc32 = named(fns, "crc32");
  ASSERT_NE(crc32, nullptr);
  EXPECT_EQ(crc32->entry, reinterpret_cast<std::uintptr_t>(dlsym(h, "crc32")));
  EXPECT_EQ(crc32->kind, HookKind::relocatable) << crc32->reason;
  EXPECT_EQ(crc32->size, expected.at(crc32->entry - o.base));
  EXPECT_EQ(kinds[HookKind::relocatable], fns.size());
}

// libc (always loaded): aliases are one function named by the rule (exported, fewest leading
// underscores); a 1-byte function is a trap probe's, too short for the jmp.
TEST(FunctionDiscovery, LibcAliasesAreListedOnceAndTinyFunctionsAreTrapOnly) {
  void* h = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(h, nullptr);
  const std::string path = path_of(h);
  const std::vector<Function> fns = functions_of(path);
  ASSERT_GT(fns.size(), 1000u);
  std::set<std::uintptr_t> entries;
  for (const Function& f : fns) EXPECT_TRUE(entries.insert(f.entry).second) << f.name << " shares its address";
  // One per address nm lists (libc is stripped too: its .dynsym), its ifunc resolvers left out.
  link_map* map = nullptr;
  ASSERT_EQ(dlinfo(h, RTLD_DI_LINKMAP, &map), 0);
  std::set<std::uintptr_t> expected;
  for (const auto& [address, size] : nm_dynamic_functions(path)) expected.insert(map->l_addr + address);
  EXPECT_EQ(entries, expected);
  ASSERT_EQ(shell("nm -D --defined-only '" + path + "' | grep -c ' i strlen@@'"), "1\n") << "strlen is an ifunc";
  ASSERT_EQ(shell("nm -D --defined-only '" + path + "' | grep -c ' [TtWw] strlen@'"), "0\n") << "and only one";
  EXPECT_EQ(named(fns, "strlen"), nullptr) << "an ifunc symbol names its resolver, not strlen";

  // write is weak, __write global: the name callers use wins.
  const auto write = reinterpret_cast<std::uintptr_t>(dlsym(h, "write"));
  if (write == reinterpret_cast<std::uintptr_t>(dlsym(h, "__write"))) {
    const Function* w = named(fns, "write");
    ASSERT_NE(w, nullptr);
    EXPECT_EQ(w->entry, write);
    EXPECT_EQ(named(fns, "__write"), nullptr);
  }
  // __cyg_profile_func_enter and _exit are one `ret` (Debian 12's glibc 2.36).
  const auto enter = reinterpret_cast<std::uintptr_t>(dlsym(h, "__cyg_profile_func_enter"));
  if (!enter || enter != reinterpret_cast<std::uintptr_t>(dlsym(h, "__cyg_profile_func_exit")))
    GTEST_SKIP() << "this libc's __cyg_profile_func_enter/_exit are not aliases";
  const auto at = std::find_if(fns.begin(), fns.end(), [&](const Function& f) { return f.entry == enter; });
  ASSERT_NE(at, fns.end());
  // Both global, as many underscores: the first in .dynsym wins (Debian 12's order).
  EXPECT_EQ(at->name, "__cyg_profile_func_exit");
  EXPECT_EQ(at->size, 1u);
  EXPECT_EQ(at->kind, HookKind::trap);
  EXPECT_NE(at->reason.find("it is 1 bytes long, too short for the 5-byte jmp"), std::string::npos) << at->reason;
}

// A patchable function is listed as patchable, once; the same source built without the flag
// has the functions of other kinds, named from its .symtab (the static one included).
TEST(FunctionDiscovery, PatchableEntriesArePreferredAndSymtabIsRead) {
  void* patchable = dlopen(HOOK_FX_GCC, RTLD_NOW | RTLD_LOCAL);
  void* plain = dlopen(HOOK_FX_NOFLAG, RTLD_NOW | RTLD_LOCAL);
  ASSERT_TRUE(patchable && plain) << dlerror();
  const std::vector<Function> p = functions_of(path_of(patchable)), n = functions_of(path_of(plain));
  for (const char* name : {"hook_fx::add(int, int)", "f", "hidden(int)", "c_function"}) {
    const auto count = std::count_if(p.begin(), p.end(), [&](const Function& f) { return f.name == name; });
    EXPECT_EQ(count, 1) << name;
    const Function* f = named(p, name);
    ASSERT_NE(f, nullptr) << name;
    EXPECT_EQ(f->kind, HookKind::patchable) << name;
    EXPECT_GT(f->size, 0u) << name << ": the symbol's size";
    EXPECT_TRUE(f->reason.empty());
    const Function* g = named(n, name);
    ASSERT_NE(g, nullptr) << name << " (a local function too: .symtab is read)";
    EXPECT_NE(g->kind, HookKind::patchable) << name;
  }
  auto entries = tramway::hooks::patchable_functions();
  ASSERT_TRUE(entries.ok());
  for (const Function& f : *entries) EXPECT_EQ(f.kind, HookKind::patchable) << f.name;
  EXPECT_FALSE(std::any_of(entries->begin(), entries->end(), [&](const Function& f) { return f.object == path_of(plain); }))
      << "patchable_functions() lists patchable functions only";
  // f is `lea eax, [rdi-1]; ret`: 4 bytes.
  const Function* f = named(n, "f");
  EXPECT_EQ(f->size, 4u);
  EXPECT_EQ(f->kind, HookKind::trap);
  EXPECT_NE(f->reason.find("4 bytes long, too short"), std::string::npos) << f->reason;
}

TEST(FunctionDiscovery, UnreadableBytesAreRefused) {
  const sh::HookKindOf k = sh::classify_function(8, 16);  // the zero page is never mapped
  EXPECT_EQ(k.kind, HookKind::refused);
  EXPECT_NE(k.reason.find("cannot be read"), std::string::npos) << k.reason;
}

// A function without a patchable entry is hooked through its relocated prologue, by name,
// address or glob; one that cannot be relocated is refused with the reason.
TEST(FunctionDiscovery, AttachHooksRelocatableFunctionsAndRefusesTheOthersSayingWhy) {
  void* z = open_or_skip("libz.so.1");
  void* plain = dlopen(HOOK_FX_NOFLAG, RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(plain, nullptr) << dlerror();
  static std::atomic<std::uintptr_t> g_seen{0};
  static std::atomic<int> g_calls{0};
  tramway::hooks::Ops ops;
  ops.entry = [](const tramway::hooks::Ops&, std::uintptr_t entry, std::uintptr_t, tramway::hooks::EntryRegs&) {
    g_seen.store(entry);
    g_calls.fetch_add(1);
  };
  if (z) {
    using Crc32 = unsigned long (*)(unsigned long, const unsigned char*, unsigned);
    const auto crc32 = reinterpret_cast<Crc32>(dlsym(z, "crc32"));
    ASSERT_NE(crc32, nullptr);
    const unsigned char text[] = "tramway";
    const unsigned long want = crc32(0, text, 7);
    for (const tramway::hooks::Filter& filter :
         {tramway::hooks::Filter::names({"crc32"}),
          tramway::hooks::Filter::addresses({reinterpret_cast<std::uintptr_t>(crc32)})}) {
      g_calls = 0;
      tramway::Status s = tramway::hooks::attach(ops, filter);
      ASSERT_TRUE(s.ok()) << s.message();
      EXPECT_EQ(crc32(0, text, 7), want);
      EXPECT_EQ(g_calls.load(), 1);
      EXPECT_EQ(g_seen.load(), reinterpret_cast<std::uintptr_t>(crc32)) << "callbacks are told the function";
      ASSERT_TRUE(tramway::hooks::detach(ops).ok());
      EXPECT_EQ(crc32(0, text, 7), want);
      EXPECT_EQ(g_calls.load(), 1) << "a call after detach ran the callback";
    }
    // A glob matches every kind; libz has no patchable entry.
    tramway::Status s = tramway::hooks::attach(ops, tramway::hooks::Filter::glob("crc32*"));
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_GE(tramway::hooks::counters(ops).functions, 2u);
    ASSERT_TRUE(tramway::hooks::detach(ops).ok());
  }
  const auto f = reinterpret_cast<std::uintptr_t>(dlsym(plain, "f"));
  tramway::Status s = tramway::hooks::attach(ops, tramway::hooks::Filter::addresses({f}));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("can only be hooked by a trap probe"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("set Ops::allow_trap"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("too short"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("nothing was attached"), std::string::npos) << s.message();
  // tramway's own machinery calls this one while it patches: refused whatever its bytes.
  s = tramway::hooks::attach(ops, tramway::hooks::Filter::names({"pthread_sigmask"}));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("tramway calls it while it patches code or handles signals"), std::string::npos)
      << s.message();
  EXPECT_EQ(tramway::hooks::counters(ops).functions, 0u);
}

}  // namespace
