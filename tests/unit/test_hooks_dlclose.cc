// Function hooks and unloaded objects: a plugin that is loaded and unloaded while ops attach
// to and detach from its functions never has code written into it while it is unmapped, an
// attach that selected it either finishes before the unmap or fails saying "object
// unloaded", and once it is gone no table remembers it — also when it was unloaded behind
// the dlclose interposer's back (libc's own dlclose) and loaded again at the same address.
// The storm test covers every interleaving the loader allows; the others stop a thread at
// each window (in the plugin's destructor, or in attach with the plugin pinned) with the
// test hooks of sites/hooks/unload.h.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <link.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "common/proc.h"
#include "sites/hooks/unload.h"
#include "tramway/hooks.h"

namespace hooks = tramway::hooks;

#define PATCHABLE __attribute__((noinline, patchable_function_entry(13, 8)))

// Every glob of these tests ("dlc_*") selects this function of the executable too, so an
// attach always finds something to select, whether the plugin is loaded or not.
extern "C" PATCHABLE int dlc_anchor(int a) {
  asm volatile("");
  return a + 1;
}
int (*volatile p_anchor)(int) = dlc_anchor;

namespace {

const std::string kPlugin = HOOK_FX_DLCLOSE;

void count(const hooks::Ops& ops, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  static_cast<std::atomic<std::uint64_t>*>(ops.data)->fetch_add(1, std::memory_order_relaxed);
}

hooks::Ops counting_ops(std::atomic<std::uint64_t>* calls) {
  hooks::Ops ops;
  ops.entry = count;
  ops.data = calls;
  return ops;
}

// The loader lists the plugin (it is mapped).
bool plugin_listed() {
  bool found = false;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* arg) {
        if (info->dlpi_name && kPlugin == info->dlpi_name) *static_cast<bool*>(arg) = true;
        return 0;
      },
      &found);
  return found;
}

std::vector<hooks::Function> plugin_functions() {
  auto all = hooks::patchable_functions();
  EXPECT_TRUE(all.ok()) << all.status().message();
  std::vector<hooks::Function> out;
  if (all.ok()) {
    for (auto& f : *all) {
      if (f.object == kPlugin) out.push_back(f);
    }
  }
  return out;
}

// The plugin's functions are back to what the compiler left: no ops, nops at every entry.
void expect_plugin_clean() {
  const auto functions = plugin_functions();
  EXPECT_EQ(functions.size(), 3u);
  for (const hooks::Function& f : functions) {
    EXPECT_EQ(f.ops, 0u) << f.name << " still has ops attached";
    const auto* b = reinterpret_cast<const std::uint8_t*>(f.entry);
    const bool nops = (b[0] == 0x90 && b[4] == 0x90) || (b[0] == 0x0f && b[1] == 0x1f);
    EXPECT_TRUE(nops) << f.name << " does not start with nops";
  }
}

bool says_object_unloaded(const tramway::Status& st) {
  return st.message().find("object unloaded") != std::string::npos &&
         st.message().find(kPlugin) != std::string::npos;
}

int (*plugin_add(void* handle))(int, int) {
  return reinterpret_cast<int (*)(int, int)>(dlsym(handle, "dlc_plugin_add"));
}

void set_on_unload(void* handle, void (*fn)()) {
  auto set = reinterpret_cast<void (*)(void (*)())>(dlsym(handle, "dlc_plugin_on_unload"));
  ASSERT_NE(set, nullptr) << dlerror();
  set(fn);
}

std::uintptr_t base_of(void* handle) {
  link_map* lm = nullptr;
  EXPECT_EQ(dlinfo(handle, RTLD_DI_LINKMAP, &lm), 0);
  return lm ? lm->l_addr : 0;
}

}  // namespace

// Two threads dlopen and dlclose the plugin in a loop, a third calls into it while it holds
// a reference of its own, and the test's thread attaches and detaches a glob matching its
// functions meanwhile. Before the fix: SIGSEGV in the batch (reading or writing code being
// unmapped) or "writing code ... /proc/self/mem failed: Input/output error".
TEST(HooksDlclose, AttachAndDetachWhileThreadsLoadAndUnloadThePlugin) {
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> loads{0}, plugin_calls{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        void* h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) std::abort();
        loads.fetch_add(1, std::memory_order_relaxed);
        if (dlclose(h) != 0) std::abort();
      }
    });
  }
  threads.emplace_back([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      void* h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!h) std::abort();
      auto add = plugin_add(h);
      for (int k = 0; k < 100; ++k) {
        if (add(k, 1) != k + 1) std::abort();
      }
      plugin_calls.fetch_add(100, std::memory_order_relaxed);
      if (dlclose(h) != 0) std::abort();
    }
  });

  int attached = 0, unloaded = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(4);
  for (int cycle = 0; cycle < 2000 && std::chrono::steady_clock::now() < deadline; ++cycle) {
    std::atomic<std::uint64_t> calls{0};
    hooks::Ops ops = counting_ops(&calls);
    const tramway::Status st = hooks::attach(ops, hooks::Filter::glob("dlc_*"));
    if (!st.ok()) {
      ASSERT_TRUE(says_object_unloaded(st)) << "cycle " << cycle << ": " << st.message();
      ++unloaded;
      continue;
    }
    ++attached;
    EXPECT_EQ(p_anchor(1), 2);
    const tramway::Status detached = hooks::detach(ops);
    ASSERT_TRUE(detached.ok()) << "cycle " << cycle << ": " << detached.message();
  }
  stop = true;
  for (auto& t : threads) t.join();
  std::printf("%d attached, %d failed with 'object unloaded'; %llu loads, %llu plugin calls\n", attached, unloaded,
              static_cast<unsigned long long>(loads.load()), static_cast<unsigned long long>(plugin_calls.load()));

  // Nothing is left of the plugin, and a new load of it starts clean and can be hooked.
  EXPECT_FALSE(plugin_listed());
  EXPECT_TRUE(plugin_functions().empty()) << "patchable_functions() lists the unloaded plugin";
  void* h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  expect_plugin_clean();
  std::atomic<std::uint64_t> calls{0};
  hooks::Ops ops = counting_ops(&calls);
  const tramway::Status st = hooks::attach(ops, hooks::Filter::glob("dlc_plugin_*"));
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(hooks::counters(ops).functions, 4u) << "three patchable, and dlc_plugin_on_unload relocated";
  EXPECT_EQ(plugin_add(h)(2, 3), 5);
  EXPECT_EQ(calls.load(), 1u);
  ASSERT_TRUE(hooks::detach(ops).ok());
  expect_plugin_clean();
  EXPECT_EQ(dlclose(h), 0);
}

// The plugin unloaded by libc's own dlclose, which the interposer does not see (as libc's
// internal unloads of NSS or iconv modules are not seen): detach must not write into the
// unmapped code, and the plugin's sites leave the tables at the next hooks call.
TEST(HooksDlclose, DetachAfterAnUnloadTheInterposerDidNotSee) {
  void* libc = dlopen("libc.so.6", RTLD_NOLOAD | RTLD_LAZY);
  ASSERT_NE(libc, nullptr) << dlerror();
  auto libc_dlclose = reinterpret_cast<int (*)(void*)>(dlsym(libc, "dlclose"));
  ASSERT_NE(libc_dlclose, nullptr) << dlerror();

  void* h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  std::atomic<std::uint64_t> calls{0};
  hooks::Ops ops = counting_ops(&calls);
  const tramway::Status st = hooks::attach(ops, hooks::Filter::glob("dlc_*"));
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(plugin_add(h)(1, 1), 2);
  EXPECT_EQ(hooks::counters(ops).functions, 5u);
  ASSERT_EQ(libc_dlclose(h), 0);
  ASSERT_FALSE(plugin_listed());
  const tramway::Status detached = hooks::detach(ops);
  EXPECT_TRUE(detached.ok()) << detached.message();
  EXPECT_TRUE(plugin_functions().empty());
  EXPECT_EQ(p_anchor(1), 2);
  EXPECT_EQ(calls.load(), 1u) << "the anchor was still hooked after detach";
  dlclose(libc);
}

// The same plugin unloaded behind the interposer's back and loaded again (at the same
// address, as the loader usually picks the hole it left): the tables must not take the new
// load for the old one (whose literal slots and entries were written, the new one's are not).
TEST(HooksDlclose, AReloadAfterAnUnloadTheInterposerDidNotSeeIsHookedAfresh) {
  void* libc = dlopen("libc.so.6", RTLD_NOLOAD | RTLD_LAZY);
  ASSERT_NE(libc, nullptr) << dlerror();
  auto libc_dlclose = reinterpret_cast<int (*)(void*)>(dlsym(libc, "dlclose"));
  ASSERT_NE(libc_dlclose, nullptr) << dlerror();

  void* h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  const std::uintptr_t first_base = base_of(h);
  std::atomic<std::uint64_t> old_calls{0}, new_calls{0};
  hooks::Ops old_ops = counting_ops(&old_calls), new_ops = counting_ops(&new_calls);
  ASSERT_TRUE(hooks::attach(old_ops, hooks::Filter::glob("dlc_plugin_*")).ok());
  EXPECT_EQ(plugin_add(h)(1, 1), 2);
  EXPECT_EQ(old_calls.load(), 1u);
  ASSERT_EQ(libc_dlclose(h), 0);

  h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  std::printf("reloaded %s the same address\n", base_of(h) == first_base ? "at" : "NOT at");
  const tramway::Status st = hooks::attach(new_ops, hooks::Filter::glob("dlc_plugin_*"));
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(hooks::counters(old_ops).functions, 0u) << "the unloaded plugin's functions are still attached";
  EXPECT_EQ(hooks::counters(new_ops).functions, 4u);
  for (const hooks::Function& f : plugin_functions()) EXPECT_EQ(f.ops, 1u) << f.name;
  EXPECT_EQ(plugin_add(h)(2, 2), 4);
  EXPECT_EQ(new_calls.load(), 1u) << "the reloaded plugin was not hooked";
  EXPECT_EQ(old_calls.load(), 1u);
  ASSERT_TRUE(hooks::detach(old_ops).ok());
  ASSERT_TRUE(hooks::detach(new_ops).ok());
  expect_plugin_clean();
  EXPECT_EQ(dlclose(h), 0);
  dlclose(libc);
}

// What the tracer does (tramway live attach): list the functions, then attach to their
// addresses. The plugin unloaded in between is reported as such, not as "not patchable".
TEST(HooksDlclose, AnAttachByTheAddressOfAnUnloadedFunctionSaysObjectUnloaded) {
  void* h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  std::vector<std::uintptr_t> entries;
  for (const hooks::Function& f : plugin_functions()) entries.push_back(f.entry);
  ASSERT_EQ(entries.size(), 3u);
  ASSERT_EQ(dlclose(h), 0);
  std::atomic<std::uint64_t> calls{0};
  hooks::Ops ops = counting_ops(&calls);
  const tramway::Status st = hooks::attach(ops, hooks::Filter::addresses(entries));
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(says_object_unloaded(st)) << st.message();
  EXPECT_EQ(ops.state, nullptr);
}

namespace {

const std::string kUser = HOOK_FX_DLCLOSE_USER, kDep = HOOK_FX_DLCLOSE_DEP;

bool listed(const std::string& path) {
  struct Q {
    const std::string* path;
    bool found = false;
  } q{&path};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* arg) {
        auto* q = static_cast<Q*>(arg);
        if (info->dlpi_name && *q->path == info->dlpi_name) q->found = true;
        return 0;
      },
      &q);
  return q.found;
}

}  // namespace

// A library unloaded because the plugin that needed it was: its sites leave the tables too
// (the interposer looked only at the object of the handle it was given).
TEST(HooksDlclose, ADependencyUnloadedWithItsDependentLeavesTheTables) {
  void* h = dlopen(kUser.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  ASSERT_TRUE(listed(kDep));
  auto user_value = reinterpret_cast<int (*)(int)>(dlsym(h, "dlc_user_value"));
  ASSERT_NE(user_value, nullptr);
  std::atomic<std::uint64_t> calls{0};
  hooks::Ops ops = counting_ops(&calls);
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::glob("dlc_dep_*")).ok());
  EXPECT_EQ(user_value(2), 19);
  EXPECT_EQ(calls.load(), 1u);
  ASSERT_EQ(dlclose(h), 0);
  ASSERT_FALSE(listed(kDep));
  EXPECT_EQ(hooks::counters(ops).functions, 0u) << "the unloaded dependency's function is still attached";
  EXPECT_TRUE(hooks::detach(ops).ok());
}

namespace {

// Where the windowed tests stop the threads.
std::counting_semaphore<4> g_reached{0}, g_go{0};
std::atomic<pid_t> g_unloaded_by{0};
tramway::sites::hooks::testing::AttachPoint g_stop_at{};

void stop_attach_at(tramway::sites::hooks::testing::AttachPoint p) {
  if (p != g_stop_at) return;
  g_reached.release();
  g_go.acquire();
}

void note_unload() { g_unloaded_by = tramway::common::current_tid(); }

void stop_in_destructor() {
  g_unloaded_by = tramway::common::current_tid();
  g_reached.release();
  g_go.acquire();
}

}  // namespace

// The dlclose of the program's last reference comes while an attach that selected the plugin
// holds it pinned: dlclose returns without unmapping it, the attach finishes (its batch wrote
// into mapped code), and the plugin is unloaded when the attach lets go of it — by the
// attaching thread, through the interposer, so its sites leave the tables with it.
TEST(HooksDlclose, AnAttachThatPinnedThePluginHoldsOffItsUnmapUntilItsBatchIsDone) {
  namespace unload = tramway::sites::hooks;
  void* h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  set_on_unload(h, note_unload);
  g_unloaded_by = 0;
  g_stop_at = unload::testing::AttachPoint::pinned;
  unload::testing::set_attach_hook(stop_attach_at);

  std::atomic<std::uint64_t> calls{0};
  hooks::Ops ops = counting_ops(&calls);
  tramway::Status st;
  std::atomic<pid_t> attacher{0};
  std::thread t([&] {
    attacher = tramway::common::current_tid();
    st = hooks::attach(ops, hooks::Filter::glob("dlc_*"));
  });
  g_reached.acquire();  // the attach selected the plugin's functions and pinned the plugin
  EXPECT_EQ(dlclose(h), 0);
  EXPECT_TRUE(plugin_listed()) << "dlclose unmapped the plugin while an attach that selected it was running";
  EXPECT_EQ(g_unloaded_by.load(), 0);
  g_go.release();
  t.join();
  unload::testing::set_attach_hook(nullptr);

  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(g_unloaded_by.load(), attacher.load()) << "the attach's unpin did not unload the plugin";
  EXPECT_FALSE(plugin_listed());
  EXPECT_TRUE(plugin_functions().empty());
  EXPECT_EQ(hooks::counters(ops).functions, 1u) << "the unloaded plugin's functions are still attached";
  EXPECT_EQ(p_anchor(1), 2);
  EXPECT_EQ(calls.load(), 1u);
  ASSERT_TRUE(hooks::detach(ops).ok());
}

// The loader decided to unload the plugin and runs its destructor (holding its lock) when an
// attach selects the plugin's functions: the attach cannot pin it, and fails saying so,
// having written nothing; the dlclose then unmaps it.
TEST(HooksDlclose, AnAttachThatSelectedThePluginWhileItIsBeingUnloadedFailsWithObjectUnloaded) {
  namespace unload = tramway::sites::hooks;
  void* h = dlopen(kPlugin.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  set_on_unload(h, stop_in_destructor);
  g_unloaded_by = 0;
  std::thread closer([&] { EXPECT_EQ(dlclose(h), 0); });
  g_reached.acquire();  // in the destructor: the plugin is listed still, its unmap decided

  g_stop_at = unload::testing::AttachPoint::selected;
  unload::testing::set_attach_hook(stop_attach_at);
  std::atomic<std::uint64_t> calls{0};
  hooks::Ops ops = counting_ops(&calls);
  tramway::Status st;
  std::thread attacher([&] { st = hooks::attach(ops, hooks::Filter::glob("dlc_*")); });
  g_reached.acquire();  // the attach selected the plugin's functions, and goes on to pin it
  unload::testing::set_attach_hook(nullptr);
  g_go.release();       // the attach and the destructor both go on
  g_go.release();
  attacher.join();
  closer.join();

  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(says_object_unloaded(st)) << st.message();
  EXPECT_FALSE(plugin_listed());
  EXPECT_TRUE(plugin_functions().empty());
  EXPECT_EQ(ops.state, nullptr);
  // Nothing was attached: the anchor is hooked afresh.
  ASSERT_TRUE(hooks::attach(ops, hooks::Filter::glob("dlc_*")).ok());
  EXPECT_EQ(hooks::counters(ops).functions, 1u);
  ASSERT_TRUE(hooks::detach(ops).ok());
}

// An attach pinned a dependency when its dependent is closed: the dependent goes, the
// dependency stays until the attach is done, then leaves with its sites.
TEST(HooksDlclose, AnAttachThatPinnedADependencyHoldsItWhenItsDependentIsUnloaded) {
  namespace unload = tramway::sites::hooks;
  void* h = dlopen(kUser.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(h, nullptr) << dlerror();
  g_stop_at = unload::testing::AttachPoint::pinned;
  unload::testing::set_attach_hook(stop_attach_at);
  std::atomic<std::uint64_t> calls{0};
  hooks::Ops ops = counting_ops(&calls);
  tramway::Status st;
  std::thread t([&] { st = hooks::attach(ops, hooks::Filter::glob("dlc_dep_*")); });
  g_reached.acquire();
  EXPECT_EQ(dlclose(h), 0);
  EXPECT_FALSE(listed(kUser));
  EXPECT_TRUE(listed(kDep)) << "the pinned dependency was unloaded with its dependent";
  g_go.release();
  t.join();
  unload::testing::set_attach_hook(nullptr);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_FALSE(listed(kDep));
  EXPECT_EQ(hooks::counters(ops).functions, 0u);
  EXPECT_TRUE(hooks::detach(ops).ok());
}
