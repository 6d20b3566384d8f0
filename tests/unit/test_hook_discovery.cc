// sites/hooks/discovery.h: every patchable function entry of the loaded objects is found at
// its real address, with its demangled name, in the form its compiler left; objects without
// entries, stripped objects, the PIE test executable and a non-PIE executable included.
#include "sites/hooks/discovery.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <link.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace hooks = tramway::sites::hooks;
using hooks::EntryForm;
using hooks::EntrySite;
using hooks::ObjectSites;

#if defined(__clang__)
#define TEST_PATCHABLE __attribute__((patchable_function_entry(13, 8), noinline))
constexpr EntryForm kThisCompilersForm = EntryForm::nop5;
#else
#define TEST_PATCHABLE __attribute__((patchable_function_entry(13, 8), noinline, noclone))
constexpr EntryForm kThisCompilersForm = EntryForm::nop1x5;
#endif

}  // namespace

// The test executable's own patchable functions (and its only ones).
namespace hook_test {
TEST_PATCHABLE int traced(int a) { return a * 7 + 1; }
TEST_PATCHABLE int traced(const char* s) { return s[0] + 2; }
}  // namespace hook_test

namespace {

// Every function of hook_fixtures/functions.cc.
struct FixtureFunction {
  const char* symbol;
  const char* name;
  bool exported;  // false: dlsym cannot find it and a stripped copy has no name for it
};
constexpr FixtureFunction kFixture[] = {
    {"_ZN7hook_fx3addEii", "hook_fx::add(int, int)", true},
    {"_Z10overloadedi", "overloaded(int)", true},
    {"_Z10overloadedd", "overloaded(double)", true},
    {"_ZL6hiddeni", "hidden(int)", false},
    {"c_function", "c_function", true},
    {"f", "f", true},  // not "float": C names are not demangled
    {"hidden_address", "hidden_address", true},
};

void* load(const char* path) {
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  EXPECT_NE(h, nullptr) << dlerror();
  return h;
}

// The load bias as the loader's link map has it (not through dl_iterate_phdr).
std::uintptr_t base_of(void* handle) {
  link_map* map = nullptr;
  EXPECT_EQ(dlinfo(handle, RTLD_DI_LINKMAP, &map), 0) << dlerror();
  return map ? map->l_addr : 0;
}

// discover_object() for the loaded object named `path`, called from inside dl_iterate_phdr.
std::optional<tramway::Result<ObjectSites>> discover_path(const std::string& path) {
  struct Find {
    const std::string& path;
    std::optional<tramway::Result<ObjectSites>> found;
  } find{path, std::nullopt};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        auto& f = *static_cast<Find*>(data);
        if (!info->dlpi_name || f.path != info->dlpi_name) return 0;
        f.found = hooks::discover_object(*info);
        return 1;
      },
      &find);
  return find.found;
}

const EntrySite* site_at(const ObjectSites& o, std::uintptr_t entry) {
  auto it = std::find_if(o.sites.begin(), o.sites.end(), [&](const EntrySite& s) { return s.entry == entry; });
  return it == o.sites.end() ? nullptr : &*it;
}

std::string exe_path() { return std::filesystem::canonical("/proc/self/exe").string(); }

// Loads the fixture at `path`, discovers it and checks every function: its site is at the
// function's address, named (unless `stripped` and not exported), in `form`.
void check_fixture(const char* path, EntryForm form, bool stripped, ObjectSites* result = nullptr) {
  void* h = load(path);
  ASSERT_NE(h, nullptr);
  auto found = discover_path(path);
  ASSERT_TRUE(found.has_value()) << path << " is loaded but dl_iterate_phdr does not list it";
  ASSERT_TRUE(found->ok()) << found->status().message();
  const ObjectSites& o = **found;
  if (result) *result = o;
  EXPECT_EQ(o.path, path);
  EXPECT_EQ(o.base, base_of(h));
  EXPECT_EQ(o.sites.size(), std::size(kFixture)) << "exactly the fixture's functions have patchable entries";
  EXPECT_TRUE(std::is_sorted(o.sites.begin(), o.sites.end(), [](auto& a, auto& b) { return a.entry < b.entry; }));

  auto hidden_address = reinterpret_cast<std::uintptr_t (*)()>(dlsym(h, "hidden_address"));
  EXPECT_NE(hidden_address, nullptr);
  for (const auto& f : kFixture) {
    SCOPED_TRACE(f.symbol);
    const std::uintptr_t address =
        f.exported ? reinterpret_cast<std::uintptr_t>(dlsym(h, f.symbol)) : hidden_address ? hidden_address() : 0;
    ASSERT_NE(address, 0u);
    const EntrySite* s = site_at(o, address);
    ASSERT_NE(s, nullptr) << "no site at the function's address";
    EXPECT_EQ(s->form, form);
    EXPECT_EQ((s->entry - 8) % 16, 0u) << "the literal slot before the entry is 16-byte aligned";
    if (stripped && !f.exported) {
      EXPECT_EQ(s->symbol, "");
      EXPECT_EQ(s->name, "");
    } else {
      EXPECT_EQ(s->symbol, f.symbol);
      EXPECT_EQ(s->name, f.name);
    }
  }
}

std::vector<std::uintptr_t> offsets(const ObjectSites& o) {
  std::vector<std::uintptr_t> out;
  for (const auto& s : o.sites) out.push_back(s.entry - o.base);
  return out;
}

// (a) GCC: five 1-byte nops at each entry.
TEST(HookDiscovery, GccLibraryEveryFunctionNamedAtItsAddress) {
  check_fixture(HOOK_FX_GCC, EntryForm::nop1x5, false);
}

// (b) Clang: one 5-byte nop at each entry.
TEST(HookDiscovery, ClangLibraryEveryFunctionNamedAtItsAddress) {
  check_fixture(HOOK_FX_CLANG, EntryForm::nop5, false);
}

// (c) Without .symtab: the same sites; exported functions named from .dynsym, the static one
// found but nameless.
TEST(HookDiscovery, StrippedLibraryKeepsEverySiteAndExportedNames) {
  ObjectSites full, stripped;
  check_fixture(HOOK_FX_GCC, EntryForm::nop1x5, false, &full);
  check_fixture(HOOK_FX_STRIPPED, EntryForm::nop1x5, true, &stripped);
  ASSERT_FALSE(full.sites.empty());
  EXPECT_EQ(offsets(stripped), offsets(full));
  EXPECT_EQ(std::count_if(stripped.sites.begin(), stripped.sites.end(), [](auto& s) { return s.name.empty(); }), 1);
}

// (d) No section: loaded, discovered, no sites, no error.
TEST(HookDiscovery, LibraryWithoutTheFlagHasNoSites) {
  ASSERT_NE(load(HOOK_FX_NOFLAG), nullptr);
  auto found = discover_path(HOOK_FX_NOFLAG);
  ASSERT_TRUE(found.has_value());
  ASSERT_TRUE(found->ok()) << found->status().message();
  EXPECT_EQ((*found)->path, HOOK_FX_NOFLAG);
  EXPECT_TRUE((*found)->sites.empty());
}

// Entries that are 0, point at data or repeat another are not sites.
TEST(HookDiscovery, EntriesOutsideCodeAndDuplicatesAreSkipped) {
  void* h = load(HOOK_FX_BOGUS);
  ASSERT_NE(h, nullptr);
  auto found = discover_path(HOOK_FX_BOGUS);
  ASSERT_TRUE(found.has_value());
  ASSERT_TRUE(found->ok()) << found->status().message();
  ASSERT_EQ((*found)->sites.size(), 1u);
  EXPECT_EQ((*found)->sites[0].entry, reinterpret_cast<std::uintptr_t>(dlsym(h, "real_function")));
  EXPECT_EQ((*found)->sites[0].name, "real_function");
}

// (e) The PIE test executable: its two attributed functions, and nothing else.
TEST(HookDiscovery, TestExecutableFunctionsWithTheAttribute) {
  auto objects = hooks::discover_loaded_objects();
  ASSERT_FALSE(objects.empty());
  ASSERT_TRUE(objects[0].ok()) << objects[0].status().message();
  const ObjectSites& exe = *objects[0];
  EXPECT_EQ(exe.path, exe_path());
  ASSERT_EQ(exe.sites.size(), 2u);
  const std::pair<std::uintptr_t, const char*> functions[] = {
      {reinterpret_cast<std::uintptr_t>(static_cast<int (*)(int)>(&hook_test::traced)), "hook_test::traced(int)"},
      {reinterpret_cast<std::uintptr_t>(static_cast<int (*)(const char*)>(&hook_test::traced)),
       "hook_test::traced(char const*)"},
  };
  for (const auto& [address, name] : functions) {
    const EntrySite* s = site_at(exe, address);
    ASSERT_NE(s, nullptr) << name;
    EXPECT_EQ(s->name, name);
    EXPECT_EQ(s->form, kThisCompilersForm) << name;
  }
}

// (f) A non-PIE executable (base 0, entries not relocated) reports its own functions.
TEST(HookDiscovery, NonPieExecutableInAChildProcess) {
  FILE* pipe = popen("'" HOOK_NOPIE_EXE "'", "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buf[4096];
  while (std::size_t n = fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  ASSERT_EQ(pclose(pipe), 0) << out;

  ObjectSites reported;  // the child's main executable, as it printed it
  std::vector<std::pair<std::uintptr_t, std::string>> functions;
  bool seen_object = false;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream in(line);
    std::string kind, form, rest;
    std::uintptr_t address = 0;
    in >> kind >> std::hex >> address;
    if (kind == "site") in >> form;
    std::getline(in >> std::ws, rest);
    if (kind == "object") {
      seen_object = true;
      reported.base = address;
      reported.path = rest;
    } else if (kind == "site") {
      const EntryForm f = form == "nop5" ? EntryForm::nop5 : form == "nop1x5" ? EntryForm::nop1x5 : EntryForm::other;
      reported.sites.push_back({address, rest, "", f});
    } else if (kind == "function") {
      functions.emplace_back(address, rest);
    }
  }
  ASSERT_TRUE(seen_object) << out;
  EXPECT_EQ(reported.base, 0u) << "a non-PIE executable is loaded at its link-time addresses";
  EXPECT_EQ(reported.path, std::filesystem::canonical(HOOK_NOPIE_EXE).string());
  ASSERT_EQ(functions.size(), 3u) << out;
  for (const auto& [address, name] : functions) {
    const EntrySite* s = site_at(reported, address);
    ASSERT_NE(s, nullptr) << name << "\n" << out;
    EXPECT_EQ(s->name, name);
    EXPECT_EQ(s->form, kThisCompilersForm) << name;
  }
}

// (g) The whole process: every object discovered without error, in dl_iterate_phdr's order,
// the executable first, fixtures at their loader-reported bases.
TEST(HookDiscovery, LoadedObjectsInLoadOrderWithTheirBases) {
  void* gcc = load(HOOK_FX_GCC);
  void* clang = load(HOOK_FX_CLANG);
  ASSERT_TRUE(gcc && clang);
  void* self = dlopen(nullptr, RTLD_NOW);

  std::vector<std::pair<std::string, std::uintptr_t>> loader;  // name, base, in dl_iterate_phdr order
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        static_cast<decltype(loader)*>(data)->emplace_back(info->dlpi_name ? info->dlpi_name : "", info->dlpi_addr);
        return 0;
      },
      &loader);

  const auto objects = hooks::discover_loaded_objects();
  ASSERT_EQ(objects.size(), loader.size());
  for (std::size_t i = 0; i < objects.size(); ++i) {
    ASSERT_TRUE(objects[i].ok()) << loader[i].first << ": " << objects[i].status().message();
    EXPECT_EQ(objects[i]->base, loader[i].second) << loader[i].first;
    if (i > 0) {
      EXPECT_EQ(objects[i]->path, loader[i].first);
    }
  }
  EXPECT_EQ(objects[0]->path, exe_path());
  EXPECT_EQ(objects[0]->base, base_of(self));

  auto index_of = [&](const char* path) {
    auto it = std::find_if(objects.begin(), objects.end(), [&](auto& o) { return o->path == path; });
    return static_cast<std::size_t>(it - objects.begin());
  };
  const std::size_t g = index_of(HOOK_FX_GCC), c = index_of(HOOK_FX_CLANG);
  ASSERT_LT(g, objects.size());
  ASSERT_LT(c, objects.size());
  EXPECT_LT(g, c) << "opened first, listed first";
  EXPECT_EQ(objects[g]->base, base_of(gcc));
  EXPECT_EQ(objects[c]->base, base_of(clang));
  EXPECT_EQ(objects[g]->sites.size(), std::size(kFixture));
  EXPECT_EQ(objects[c]->sites.size(), std::size(kFixture));
}

// A loaded object whose file changed on disk or disappeared is an error naming the file; the
// addresses a different file gives would not be the loaded object's.
TEST(HookDiscovery, ReplacedOrDeletedFileIsAnErrorNamingIt) {
  char dir_template[] = "/tmp/tramway_hook_discovery.XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  // Unloaded and removed however the test ends, so later tests in this process see every
  // loaded object readable and /tmp stays clean.
  struct Cleanup {
    std::filesystem::path dir;
    void* handle = nullptr;
    ~Cleanup() {
      if (handle) dlclose(handle);
      std::filesystem::remove_all(dir);
    }
  } cleanup{dir_template};
  const std::string path = cleanup.dir / "lib.so";
  std::filesystem::copy_file(HOOK_FX_GCC, path);
  cleanup.handle = load(path.c_str());
  ASSERT_NE(cleanup.handle, nullptr);
  ASSERT_TRUE(discover_path(path).value().ok());

  // Replaced: a rename keeps the loaded file's pages intact, as a package upgrade does.
  std::filesystem::copy_file(HOOK_FX_CLANG, cleanup.dir / "new.so");
  std::filesystem::rename(cleanup.dir / "new.so", path);
  auto replaced = discover_path(path).value();
  ASSERT_FALSE(replaced.ok());
  EXPECT_NE(replaced.status().message().find(path), std::string::npos) << replaced.status().message();
  EXPECT_NE(replaced.status().message().find("replaced"), std::string::npos) << replaced.status().message();

  std::filesystem::remove(path);
  auto deleted = discover_path(path).value();
  ASSERT_FALSE(deleted.ok());
  EXPECT_NE(deleted.status().message().find("cannot open " + path), std::string::npos) << deleted.status().message();
  EXPECT_EQ(deleted.status().sys_errno(), ENOENT);
}

}  // namespace
