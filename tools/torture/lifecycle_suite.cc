// Suite "lifecycle": what a program's life does to tramway while it patches — fork storms,
// plugins loaded and unloaded, threads created and ended — under a SIGPROF storm whose
// handler calls hooked functions.
//   callers    short-lived threads (a spawner keeps --threads of them) calling tw_fn_0..499
//              (libtw_hooks_gcc.so, loaded for good) and checking every result;
//   loaders    two threads dlopen libtw_hooks_clang.so (tw_fn_500..999), call some of its
//              functions, check the results and dlclose it, so it is really unmapped often;
//   forker     fork()s; each child attaches its own ops, checks that exactly its calls ran
//              its callback, detaches, flips a static key, waits for grace periods, records
//              a short trace and exits; a child that hangs (20 s) or fails is a violation;
//   controller attaches and detaches globs that cover both libraries (sync and async),
//              flips a static key the callers branch on, runs grace periods of both flavors,
//              and starts and stops recordings that trace some of the same functions.
// A watchdog turns an actor that makes no progress for --hang-seconds into a violation (a
// deadlock would otherwise be the ctest timeout). Violations: a wrong result, a failed or hung
// child, an attach that fails other than "object unloaded", a detach, flip, grace period or
// recording call that fails, a crash (the process dies).
#include <dlfcn.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "storm.h"
#include "suite.h"
#include "tramway/grace.h"
#include "tramway/hooks.h"
#include "tramway/static_key.h"
#include "tramway/trace.h"

TRAMWAY_STATIC_KEY_FALSE(lifecycle_key);

namespace tramway::torture {
namespace {

using Fn = int (*)(int);
using Clock = std::chrono::steady_clock;
constexpr int kPerLibrary = 500;

Fn g_fns[kPerLibrary];  // tw_fn_0..499, loaded for good
std::atomic<bool> g_stop{false};
std::atomic<std::uint64_t> g_violations{0};

void violation(const char* what, const std::string& detail = {}) {
  g_violations.fetch_add(1, std::memory_order_relaxed);
  std::fprintf(stderr, "lifecycle: VIOLATION: %s%s%s\n", what, detail.empty() ? "" : ": ", detail.c_str());
}

// Progress of each actor, for the watchdog and the summary.
enum Actor { kCallers, kLoaders, kForker, kController, kActors };
const char* const kActorNames[kActors] = {"callers", "loaders", "forker", "controller"};
struct alignas(64) Progress {
  std::atomic<std::uint64_t> count{0};
};
Progress g_progress[kActors];
void progressed(Actor a, std::uint64_t n = 1) { g_progress[a].count.fetch_add(n, std::memory_order_relaxed); }

std::atomic<std::uint64_t> g_callbacks{0}, g_handler_calls{0}, g_threads_started{0}, g_key_taken{0};
std::atomic<std::uint64_t> g_loads{0}, g_plugin_calls{0}, g_forks{0}, g_attaches{0}, g_attach_unloaded{0};
std::atomic<std::uint64_t> g_detaches{0}, g_flips{0}, g_grace_periods{0}, g_recordings{0};

void count_callback(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  g_callbacks.fetch_add(1, std::memory_order_relaxed);
}

std::uint64_t xorshift(std::uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

thread_local std::uint64_t t_rng = 0x9e3779b97f4a7c15ull;

bool call_checked(int i, int x) {
  if (g_fns[i](x) == x + i) return true;
  violation("wrong result", "tw_fn_" + std::to_string(i));
  return false;
}

void on_sigprof(int, siginfo_t*, void*) {
  const std::uint64_t r = xorshift(t_rng);
  (void)call_checked(static_cast<int>(r % kPerLibrary), static_cast<int>((r >> 32) & 0xffff));
  g_handler_calls.fetch_add(1, std::memory_order_relaxed);
}

// ---- callers: short-lived threads ------------------------------------------------------------
void caller_life(const Options& o, std::uint64_t seed) {
  t_rng = seed | 1;
  { grace::ReadGuard first; }  // register before the storm can enter a hook stub from a handler
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);  // leave the controller CPU
  StormTimer storm(o.signal_interval_us);
  const int calls = 50 + static_cast<int>(xorshift(t_rng) % 2000);
  for (int c = 0; c < calls && !g_stop.load(std::memory_order_relaxed); ++c) {
    const std::uint64_t r = xorshift(t_rng);
    (void)call_checked(static_cast<int>(r % kPerLibrary), static_cast<int>((r >> 32) & 0xffff));
    if (TRAMWAY_STATIC_BRANCH_UNLIKELY(lifecycle_key)) g_key_taken.fetch_add(1, std::memory_order_relaxed);
  }
  progressed(kCallers);
}

void spawner(const Options& o) {
  std::vector<std::thread> live(static_cast<std::size_t>(o.threads));
  std::uint64_t n = 0;
  while (!g_stop.load(std::memory_order_relaxed)) {
    for (auto& t : live) {  // replace each ended thread; join blocks only briefly
      if (t.joinable()) t.join();
      if (g_stop.load(std::memory_order_relaxed)) break;
      t = std::thread(caller_life, std::cref(o), o.seed * 1000003 + ++n);
      g_threads_started.fetch_add(1, std::memory_order_relaxed);
    }
  }
  for (auto& t : live)
    if (t.joinable()) t.join();
}

// ---- loaders: a plugin dlopened and dlclosed -------------------------------------------------
void loader(std::uint64_t seed) {
  std::uint64_t rng = seed | 1;
  while (!g_stop.load(std::memory_order_relaxed)) {
    void* h = dlopen(TRAMWAY_TORTURE_HOOKS_CLANG, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      violation("dlopen", dlerror());
      return;
    }
    g_loads.fetch_add(1, std::memory_order_relaxed);
    const auto* table = static_cast<Fn const*>(dlsym(h, "tw_fns_clang"));
    if (!table) {
      violation("dlsym tw_fns_clang", dlerror());
      dlclose(h);
      return;
    }
    for (int c = 0; c < 20; ++c) {
      const int j = static_cast<int>(xorshift(rng) % kPerLibrary), x = c * 7;
      if (table[j](x) != x + kPerLibrary + j) violation("wrong result", "tw_fn_" + std::to_string(kPerLibrary + j));
      g_plugin_calls.fetch_add(1, std::memory_order_relaxed);
    }
    if (dlclose(h) != 0) violation("dlclose", dlerror());
    progressed(kLoaders);
  }
}

// ---- forker: children use every API -------------------------------------------------------------
// Exit codes of a child, for the parent's message.
const char* child_failure(int code) {
  switch (code) {
    case 10: return "attach failed";
    case 11: return "its callback ran a wrong number of times";
    case 12: return "detach failed";
    case 13: return "a callback ran after detach";
    case 14: return "key flip failed";
    case 15: return "grace period failed";
    case 16: return "recording failed";
    case 17: return "wrong result";
    default: return "unknown failure";
  }
}

std::atomic<std::uint64_t> g_child_hits{0};
void count_child_callback(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  g_child_hits.fetch_add(1, std::memory_order_relaxed);
}

[[noreturn]] void child_main(int round) {
  // Only this thread exists here; the parent's other threads were mid-whatever at the fork.
  hooks::Ops ops;
  ops.entry = count_child_callback;
  ops.direct = round % 2 == 1;
  const std::vector<std::string> names = {"tw_fn_" + std::to_string(round % 100 + 100),
                                          "tw_fn_" + std::to_string(round % 100 + 200)};
  if (!hooks::attach(ops, hooks::Filter::names(names)).ok()) _exit(10);
  const int a = round % 100 + 100, b = round % 100 + 200;
  for (int c = 0; c < 10; ++c) {
    if (g_fns[a](c) != c + a || g_fns[b](c) != c + b) _exit(17);
  }
  if (g_child_hits.load() != 20) _exit(11);
  if (!hooks::detach(ops).ok()) _exit(12);
  if (g_fns[a](1) != 1 + a || g_child_hits.load() != 20) _exit(13);
  if (!tramway::toggle(lifecycle_key).ok()) _exit(14);
  if (!grace::synchronize().ok() || !grace::synchronize(grace::Flavor::tasks).ok()) _exit(15);
  if (round % 4 == 0) {
    (void)trace::stop();  // a recording the parent had running is the parent's: leave it closed here
    trace::RecordOptions ro;
    ro.output = "/dev/null";
    if (!trace::start(ro).ok() || !trace::attach("tw_fn_3*").ok()) _exit(16);
    for (int c = 0; c < 10; ++c) (void)g_fns[30 + c](c);
    if (!trace::stop().ok()) _exit(16);
  }
  _exit(0);
}

std::string read_first_line(const std::string& path) {
  std::string line;
  if (FILE* f = std::fopen(path.c_str(), "re")) {
    char buf[256];
    if (std::fgets(buf, sizeof buf, f)) line = buf;
    std::fclose(f);
  }
  while (!line.empty() && line.back() == '\n') line.pop_back();
  return line;
}

void forker(const Options& o) {
  for (int round = 0; !g_stop.load(std::memory_order_relaxed); ++round) {
    const pid_t pid = fork();
    if (pid < 0) {
      violation("fork", std::strerror(errno));
      return;
    }
    if (pid == 0) child_main(round);
    g_forks.fetch_add(1, std::memory_order_relaxed);
    int status = 0;
    const auto deadline = Clock::now() + std::chrono::seconds(20);
    pid_t got = 0;
    while ((got = waitpid(pid, &status, WNOHANG)) == 0 && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (got == 0) {
      const std::string where = read_first_line("/proc/" + std::to_string(pid) + "/wchan") + ", syscall " +
                                read_first_line("/proc/" + std::to_string(pid) + "/syscall");
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      violation("a fork child hung (killed after 20 s)", "round " + std::to_string(round) + ", in " + where);
    } else if (!WIFEXITED(status)) {
      violation("a fork child died", "signal " + std::to_string(WTERMSIG(status)));
    } else if (WEXITSTATUS(status) != 0) {
      violation("a fork child failed", child_failure(WEXITSTATUS(status)));
    }
    progressed(kForker);
    (void)o;
  }
}

// ---- controller -----------------------------------------------------------------------------------
// Static, not on the controller's stack: a fork child keeps them attached (and finishes their
// async detaches), while glibc gives the stacks of threads the child lacks to its new threads.
hooks::Ops g_controller_ops[2];
std::atomic<int> g_async_pending{0};

void controller(const Options& o) {
  std::mt19937_64 rng(o.seed);
  const char* const globs[] = {"tw_fn_5*", "tw_fn_6*", "tw_fn_1*", "tw_fn_*9"};
  std::atomic<int>& async_pending = g_async_pending;
  hooks::Ops* const ops = g_controller_ops;
  bool recording = false;
  for (std::uint64_t cycle = 0; !g_stop.load(std::memory_order_relaxed); ++cycle) {
    hooks::Ops& op = ops[cycle % 2];
    if (async_pending.load() > 0 && op.state) {  // an async detach of this one is in flight
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    op.entry = count_callback;
    op.direct = rng() % 2 == 0;
    const char* glob = globs[rng() % 4];
    if (Status st = hooks::attach(op, hooks::Filter::glob(glob)); !st.ok()) {
      if (st.message().find("unloaded") != std::string::npos) {
        g_attach_unloaded.fetch_add(1, std::memory_order_relaxed);
      } else {
        violation("attach", std::string(glob) + ": " + st.message());
      }
    } else {
      g_attaches.fetch_add(1, std::memory_order_relaxed);
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
      if (rng() % 2 == 0) {
        if (Status d = hooks::detach(op); !d.ok()) violation("detach", d.message());
      } else {
        async_pending.fetch_add(1);
        if (Status d = hooks::detach_async(op, [] { g_async_pending.fetch_sub(1); }); !d.ok()) {
          async_pending.fetch_sub(1);
          violation("detach_async", d.message());
        }
      }
      g_detaches.fetch_add(1, std::memory_order_relaxed);
    }
    if (rng() % 4 == 0) {
      if (Status st = tramway::toggle(lifecycle_key); !st.ok()) violation("key flip", st.message());
      g_flips.fetch_add(1, std::memory_order_relaxed);
    }
    if (rng() % 4 == 0) {
      const grace::Flavor f = rng() % 2 ? grace::Flavor::tasks : grace::Flavor::trace;
      if (Status st = grace::synchronize(f); !st.ok()) violation("synchronize", st.message());
      g_grace_periods.fetch_add(1, std::memory_order_relaxed);
    }
    if (rng() % 16 == 0) {
      if (!recording) {
        trace::RecordOptions ro;
        ro.output = "/dev/null";
        ro.ring_events = 1u << 12;
        if (Status st = trace::start(ro); !st.ok()) violation("trace::start", st.message());
        auto n = trace::attach(globs[rng() % 4]);
        if (!n.ok() && n.status().message().find("unloaded") == std::string::npos) {
          violation("trace::attach", n.status().message());
        }
        g_recordings.fetch_add(1, std::memory_order_relaxed);
        recording = true;
      } else {
        if (Status st = trace::stop(); !st.ok()) violation("trace::stop", st.message());
        recording = false;
      }
    }
    progressed(kController);
  }
  while (async_pending.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  for (hooks::Ops& op : g_controller_ops) {
    if (op.state) (void)hooks::detach(op);
  }
  if (recording) (void)trace::stop();
}

bool load_functions() {
  void* h = dlopen(TRAMWAY_TORTURE_HOOKS_GCC, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    std::fprintf(stderr, "lifecycle: dlopen: %s\n", dlerror());
    return false;
  }
  const auto* table = static_cast<Fn const*>(dlsym(h, "tw_fns_gcc"));
  if (!table) {
    std::fprintf(stderr, "lifecycle: %s lacks tw_fns_gcc\n", TRAMWAY_TORTURE_HOOKS_GCC);
    return false;
  }
  for (int i = 0; i < kPerLibrary; ++i) g_fns[i] = table[i];
  return true;
}

}  // namespace

int run_lifecycle(const Options& o) {
  if (!load_functions()) return 2;
  if (!install_storm_handler("lifecycle", on_sigprof)) return 2;
  const auto start = Clock::now();
  std::vector<std::thread> actors;
  actors.emplace_back(spawner, std::cref(o));
  actors.emplace_back(loader, o.seed + 11);
  actors.emplace_back(loader, o.seed + 13);
  actors.emplace_back(forker, std::cref(o));
  actors.emplace_back(controller, std::cref(o));

  std::uint64_t last[kActors] = {};
  Clock::time_point moved[kActors];
  for (auto& m : moved) m = start;
  auto next_report = start + std::chrono::seconds(5);
  bool hung = false;
  while (Clock::now() - start < std::chrono::duration<double>(o.seconds) && !hung) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto now = Clock::now();
    for (int a = 0; a < kActors; ++a) {
      const std::uint64_t v = g_progress[a].count.load(std::memory_order_relaxed);
      if (v != last[a]) {
        last[a] = v;
        moved[a] = now;
      } else if (now - moved[a] > std::chrono::duration<double>(o.hang_seconds)) {
        violation("hang", std::string(kActorNames[a]) + " made no progress for " +
                              std::to_string(static_cast<int>(o.hang_seconds)) + " s");
        hung = true;
      }
    }
    if (now >= next_report) {
      next_report += std::chrono::seconds(5);
      std::fprintf(stderr, "lifecycle: %.0f s: %llu threads, %llu loads, %llu forks, %llu attaches, %llu violations\n",
                   std::chrono::duration<double>(now - start).count(),
                   static_cast<unsigned long long>(g_threads_started.load()),
                   static_cast<unsigned long long>(g_loads.load()), static_cast<unsigned long long>(g_forks.load()),
                   static_cast<unsigned long long>(g_attaches.load()),
                   static_cast<unsigned long long>(g_violations.load()));
    }
  }
  if (hung) {
    // A deadlock would hang the joins below: say where every thread is and leave.
    std::fprintf(stderr, "lifecycle: threads at the hang:\n");
    std::fflush(stderr);
    std::system(("for t in /proc/" + std::to_string(getpid()) +
                 "/task/*; do echo \"  $(cat $t/comm) $(cat $t/wchan) $(cut -d' ' -f1,9 $t/syscall)\"; done >&2")
                    .c_str());
    std::printf("lifecycle: FAIL (hang) after %.1f s\n", std::chrono::duration<double>(Clock::now() - start).count());
    std::fflush(stdout);
    _exit(1);
  }
  g_stop = true;
  for (auto& t : actors) t.join();
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  const std::uint64_t v = g_violations.load();
  std::printf(
      "lifecycle: %s %.1f s: %llu threads created, %llu plugin loads (%llu calls), %llu forks, %llu attaches "
      "(%llu refused: object unloaded), %llu detaches, %llu key flips (%llu branches taken), %llu grace periods, "
      "%llu recordings, %llu callbacks, %llu calls in SIGPROF handlers, %llu violations\n",
      v == 0 ? "PASS" : "FAIL", secs, static_cast<unsigned long long>(g_threads_started.load()),
      static_cast<unsigned long long>(g_loads.load()), static_cast<unsigned long long>(g_plugin_calls.load()),
      static_cast<unsigned long long>(g_forks.load()), static_cast<unsigned long long>(g_attaches.load()),
      static_cast<unsigned long long>(g_attach_unloaded.load()), static_cast<unsigned long long>(g_detaches.load()),
      static_cast<unsigned long long>(g_flips.load()), static_cast<unsigned long long>(g_key_taken.load()),
      static_cast<unsigned long long>(g_grace_periods.load()), static_cast<unsigned long long>(g_recordings.load()),
      static_cast<unsigned long long>(g_callbacks.load()), static_cast<unsigned long long>(g_handler_calls.load()),
      static_cast<unsigned long long>(v));
  return v == 0 ? 0 : 1;
}

}  // namespace tramway::torture
