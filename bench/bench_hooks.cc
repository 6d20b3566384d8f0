// Function hooks (DESIGN.md, "Performance targets"), side by side with LLVM XRay and uftrace.
// Figures:
//   call/plain, hook/disabled, hook/common/empty, hook/direct/empty,
//   hook/common/1_plus_100, hook/common/reads_regs                           ns a call (CPU time)
//   hook/common/1_plus_100_ratio            1_plus_100 over empty (per-site lists: ~1)
//   The empty callback is a leaf the stubs prove leaves vector registers alone, so they skip
//   saving xmm0-7 (hook_entry.S); reads_regs reads its EntryRegs, so they save them: what a
//   callback that calls out (printf, a tracer) pays.
//   attach/1000, attach/10000, detach/10000                                  ms (real time)
//   attach/one_of_10000                     us, with 10,000 patchable functions loaded
//   xray/unpatched, xray/patched_handler                                     ns a call (CPU time)
//   xray/patch/10000 (ms), xray/patch_function/one_of_10000 (us)             real time
//   hook/common/empty_ratio_to_xray_patched, hook/direct/empty_ratio_to_xray_patched,
//   attach/10000_ratio_to_xray_patch,
//   attach/one_of_10000_ratio_to_xray       tramway over XRay, both from this run (XRay's
//                                           handler runs at entry and exit, tramway's at entry)
//   uftrace/dynamic                         ns a call under `uftrace record -P` (thread CPU time)
// Hooks on any function (relocated prologues, DESIGN.md "Hooks on any function"):
//   hook/relocated/empty, hook/relocated/direct/empty     ns a call of plain_target hooked
//                                           through a relocated prologue: the same body as
//                                           patchable_target, without a patchable entry (CPU time);
//                                           "direct" is an ops that asks for direct mode, which
//                                           a relocated function never takes (its callers may
//                                           keep %r11 across the call: sites.cc, mode_for)
//   hook/relocated/empty_minus_common       ns over hook/common/empty (target <= 1.0)
//   hook/relocated/empty_ratio_to_common    the same as a ratio
//   hook/trap/empty                         ns a call through a trap probe (not implemented yet:
//                                           skipped with a message while attach refuses it)
//   uprobe/bpftrace                         ns a call of plain_target while `bpftrace -e
//                                           'uprobe:BIN:FN { @ = count(); }'` probes it (CPU time of
//                                           the calling thread, which runs the uprobe in the kernel)
//   hook/relocated/empty_ratio_to_uprobe    below 0.02: >= 50x cheaper (the target)
//   attach/relocated/{1,1000,10000}, detach/relocated/{1,1000,10000}    ms (real time) on
//                                           libbench_hooks_relocatable_functions.so (bench_rfn_*);
//                                           a detach includes its tasks grace period, run while
//                                           16 threads spin in code not hooked
//   .../cpu                                 ms of the calling thread's CPU time in those
//   detach/relocated/10000/idle             ms, the same without the busy threads
//   grace/tasks/busy/16                     ms, one tasks grace period alone with the 16 threads
//                                           (over a range nobody runs): the floor of those detaches
//   signal_round/busy/16                    ms, one signal round trip to the 16 threads (move_pcs):
//                                           the floor under that grace period (DESIGN: <= 2x)
//   grace/tasks/busy/16_ratio_to_signal_round, detach/relocated/10000_ratio_to_signal_round
// No difference figure (report.h has ratios only): the DESIGN targets compare hook/disabled
// with call/plain (<= 0.3 ns) and hook/common/empty with hook/disabled (<= 4 ns).
//
// XRay needs Clang and uftrace its own process, so both run as children: bench_xray (xray_bench.cc,
// built by clang++-14, see CMakeLists.txt) and bench_uftrace_child (uftrace_child.cc) print
// report.h's JSON lines, and a benchmark here runs the child once per repetition and turns its
// lines into counters. So their repetitions interleave with tramway's (a noisy spell on the
// shared cores hits both), and report.h's ratio figures divide medians of one run.
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <array>
#include <atomic>
#include <optional>
#include <thread>

#include "child.h"
#include "noinline.h"
#include "report.h"
#include "tramway/grace.h"
#include "tramway/hooks.h"
#include "tramway/text/signal_router.h"


// ---- the measured function, twice ---------------------------------------------------------
// Identical bodies; the attribute is -fpatchable-function-entry=13,8 for one function, so that
// both are compiled in this one unit with the same flags otherwise. xray_bench.cc and
// uftrace_child.cc measure the same body.
std::uint64_t bench_sink;
BENCH_NOINLINE void plain_target(std::uint64_t x) { bench_sink += x; }
BENCH_NOINLINE __attribute__((patchable_function_entry(13, 8))) void patchable_target(std::uint64_t x) {
  bench_sink += x;
}

// A function the relocator refuses (mov and ret, 4 bytes: shorter than the jmp), for the trap probes.
BENCH_NOINLINE std::uint64_t trap_target(std::uint64_t x) { return x; }

// ---- the 10,000 patchable functions (generated; libbench_hooks_functions.so) ------------------
constexpr std::size_t kFunctions = BENCH_FUNCTIONS;
extern "C" void (*const bench_fns[kFunctions])();
// The same functions without patchable entries (libbench_hooks_relocatable_functions.so).
extern "C" void (*const bench_rfns[kFunctions])();

namespace {

using benchmark::State;
using tramway::Status;
using tramway_bench::ChildFigure;
using tramway_bench::run_child;
using tramway_bench::sibling;
using tramway_bench::take_child_figures;
namespace hooks = tramway::hooks;

void fail(State& state, const std::string& what) { state.SkipWithError(what.c_str()); }

void empty_callback(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {}
void reads_regs_callback(const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs& regs) {
  bench_sink += regs.rdi;
}

std::uintptr_t address(void (*f)()) { return reinterpret_cast<std::uintptr_t>(f); }
std::uintptr_t address(void (*f)(std::uint64_t)) { return reinterpret_cast<std::uintptr_t>(f); }
std::uintptr_t address(std::uint64_t (*f)(std::uint64_t)) { return reinterpret_cast<std::uintptr_t>(f); }

hooks::Filter first_functions(std::size_t n, void (*const* table)() = bench_fns) {
  std::vector<std::uintptr_t> entries;
  for (std::size_t i = 0; i < n; ++i) entries.push_back(address(table[i]));
  return hooks::Filter::addresses(std::move(entries));
}

// ---- calls ----------------------------------------------------------------------------------
// One loop template for every call figure: compared loops are the same code but for the call.
template <void (*F)(std::uint64_t)>
BENCH_NOINLINE void call_loop(State& state) {
  std::uint64_t i = 0;
  for (auto _ : state) F(++i);
}

void bm_plain(State& state) { call_loop<plain_target>(state); }
void bm_disabled(State& state) { call_loop<patchable_target>(state); }

// F (patchable_target unless said) hooked with `callback`, while `others` more ops are attached
// to one other function each (bench_fns[0..others)). `direct`: the ops is direct (its own slot).
template <void (*F)(std::uint64_t) = patchable_target>
void bm_hooked(State& state, std::size_t others, bool direct = false, hooks::EntryCallback callback = empty_callback) {
  std::vector<hooks::Ops> other(others);
  auto detach_all = [&] {
    for (hooks::Ops& o : other)
      if (o.state) (void)hooks::detach(o);
  };
  for (std::size_t i = 0; i < others; ++i) {
    other[i].entry = empty_callback;
    if (Status s = hooks::attach(other[i], hooks::Filter::addresses({address(bench_fns[i])})); !s.ok()) {
      detach_all();
      return fail(state, "attach (others): " + s.message());
    }
  }
  hooks::Ops ops;
  ops.entry = callback;
  ops.direct = direct;
  if (Status s = hooks::attach(ops, hooks::Filter::addresses({address(F)})); !s.ok()) {
    detach_all();
    return fail(state, "attach: " + s.message());
  }
  call_loop<F>(state);
  // The callback must have run on every call.
  if (hooks::counters(ops).hits != static_cast<std::uint64_t>(state.iterations()))
    fail(state, "the hook did not run on every call");
  if (Status s = hooks::detach(ops); !s.ok()) fail(state, "detach: " + s.message());
  detach_all();
}

// ---- attach and detach ------------------------------------------------------------------------
// Times `op` and not `undo`, by reading the clock around `op` alone: PauseTiming/ResumeTiming
// would add their own clock reads (a thread-CPU-clock syscall each) to a figure of a few us.
// The figure is the counter "time", `scale` per second (1e3: ms, 1e6: us), a mean per iteration;
// "cpu" is the calling thread's CPU time in `op` alike (read outside the real-time window): on
// the shared cores the real time also holds the other processes' turns.
double thread_cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
}

template <class Op, class Undo>
void timed_loop(State& state, double scale, Op op, Undo undo) {
  double seconds = 0, cpu = 0;
  for (auto _ : state) {
    const double c0 = thread_cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    Status s = op();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cpu += thread_cpu_seconds() - c0;
    if (s.ok()) s = undo();
    if (!s.ok()) return fail(state, s.message());
  }
  state.counters["time"] = benchmark::Counter(seconds * scale, benchmark::Counter::kAvgIterations);
  state.counters["cpu"] = benchmark::Counter(cpu * scale, benchmark::Counter::kAvgIterations);
}

// Not measured: the first attach to a site writes its literal slot and normalises GCC's nops
// (a copy-on-write fault per page of text): a one-time cost per site.
Status warm_up(const hooks::Filter& filter) {
  hooks::Ops ops;
  ops.entry = empty_callback;
  Status s = hooks::attach(ops, filter);
  return s.ok() ? hooks::detach(ops) : s;
}

void bm_attach(State& state, const hooks::Filter& filter, double scale) {
  if (Status s = warm_up(filter); !s.ok()) return fail(state, "warm-up: " + s.message());
  hooks::Ops ops;
  ops.entry = empty_callback;
  timed_loop(state, scale, [&] { return hooks::attach(ops, filter); }, [&] { return hooks::detach(ops); });
}

// Threads that spin in code no hook touches for as long as this lives: a tasks grace period
// finds each one running, so it signals it and waits until it has run (16 of them on 2 cores).
class BusyThreads {
 public:
  explicit BusyThreads(std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      threads_.emplace_back([this] {
        std::uint64_t steps = 0;
        started_.fetch_add(1, std::memory_order_relaxed);
        while (!stop_.load(std::memory_order_relaxed)) busy_step(steps);
      });
    }
    while (started_.load(std::memory_order_relaxed) < n) std::this_thread::yield();
  }
  ~BusyThreads() {
    stop_.store(true, std::memory_order_relaxed);
    for (std::thread& t : threads_) t.join();
  }
  BusyThreads(const BusyThreads&) = delete;
  BusyThreads& operator=(const BusyThreads&) = delete;

 private:
  BENCH_NOINLINE static void busy_step(std::uint64_t& steps) { ++steps; }
  std::atomic<bool> stop_{false};
  std::atomic<std::size_t> started_{0};
  std::vector<std::thread> threads_;
};

// `busy`: that many BusyThreads run meanwhile (during the untimed attaches too).
void bm_detach(State& state, const hooks::Filter& filter, std::size_t busy = 0) {
  if (Status s = warm_up(filter); !s.ok()) return fail(state, "warm-up: " + s.message());
  std::optional<BusyThreads> spinners;
  if (busy) spinners.emplace(busy);
  hooks::Ops ops;
  ops.entry = empty_callback;
  // The same loop with the roles swapped: attach is the untimed `undo` of the previous detach.
  if (Status s = hooks::attach(ops, filter); !s.ok()) return fail(state, "attach: " + s.message());
  timed_loop(state, 1e3, [&] { return hooks::detach(ops); }, [&] { return hooks::attach(ops, filter); });
  if (ops.state) (void)hooks::detach(ops);
}

// What a detach of relocated functions waits for at least: one tasks grace period while the
// busy threads run, over a range nobody executes (with no range retired it is a trace one).
alignas(64) const std::uint8_t g_never_run[64] = {};
void bm_tasks_gp(State& state, std::size_t busy) {
  BusyThreads spinners(busy);
  timed_loop(state, 1e3, [] {
    Status s = tramway::grace::retire(g_never_run, g_never_run + sizeof g_never_run);
    return s.ok() ? tramway::grace::synchronize(tramway::grace::Flavor::tasks) : s;
  }, [] { return Status(); });
}

// The floor under both: one signal round trip to the busy threads (each must be scheduled to
// answer), a move_pcs() over a range no thread is in, as bench_grace's signal_round/busy/N.
void bm_signal_round(State& state, std::size_t busy) {
  BusyThreads spinners(busy);
  timed_loop(state, 1e3, [] {
    auto r = tramway::text::move_pcs(1, 2, 1);  // [1, 2): no thread is ever there
    return r.ok() ? Status() : r.status();
  }, [] { return Status(); });
}

// ---- trap probes --------------------------------------------------------------------------------
// Empty when a trap probe hooks trap_target (HookKind::trap: Ops::allow_trap); else attach's
// refusal, which says why, and hook/trap/empty is skipped with it.
std::string trap_probes_unavailable() {
  hooks::Ops ops;
  ops.entry = empty_callback;
  ops.allow_trap = true;
  if (Status s = hooks::attach(ops, hooks::Filter::addresses({address(trap_target)})); !s.ok()) return s.message();
  Status s = hooks::detach(ops);
  return s.ok() ? std::string() : "detach: " + s.message();
}

void bm_trap(State& state) {
  hooks::Ops ops;
  ops.entry = empty_callback;
  ops.allow_trap = true;
  if (Status s = hooks::attach(ops, hooks::Filter::addresses({address(trap_target)})); !s.ok())
    return fail(state, "attach: " + s.message());
  std::uint64_t i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(i = trap_target(i + 1));
  if (hooks::counters(ops).hits != static_cast<std::uint64_t>(state.iterations()))
    fail(state, "the trap probe did not run on every call");
  if (Status s = hooks::detach(ops); !s.ok()) fail(state, "detach: " + s.message());
}

// ---- a bpftrace uprobe on plain_target ---------------------------------------------------------
// bpftrace (Debian: bpftrace) runs beside this program, once a repetition: the loop is timed
// once its uprobe is in (the int3 it puts at the function's entry is seen here), and the probe
// must have counted every call. Calls while probed: a few us each, so a fixed count.
constexpr benchmark::IterationCount kUprobeCalls = 200'000;
constexpr char kPlainSymbol[] = "_Z12plain_targetm";  // plain_target(std::uint64_t)

std::uint8_t first_byte(std::uintptr_t f) { return *reinterpret_cast<const volatile std::uint8_t*>(f); }

// Empty when bpftrace can put a uprobe on this program; else why not.
std::string uprobe_unavailable() {
  if (geteuid() != 0) return "bpftrace needs root (CAP_BPF and CAP_PERFMON)";
  std::error_code ec;
  if (!std::filesystem::exists("/sys/bus/event_source/devices/uprobe", ec))
    return "this kernel has no uprobe event source (/sys/bus/event_source/devices/uprobe: CONFIG_UPROBE_EVENTS)";
  std::string version;
  if (std::string e = run_child({"bpftrace", "--version"}, version); !e.empty())
    return e + " (Debian: apt-get install bpftrace)";
  return {};
}

void bm_uprobe(State& state) {
  const std::uintptr_t fn = address(plain_target);
  const std::uint8_t original = first_byte(fn);
  const std::string program =
      "uprobe:" + std::filesystem::read_symlink("/proc/self/exe").string() + ":" + kPlainSymbol + " { @ = count(); }";
  tramway_bench::RunningChild bpftrace;
  if (std::string e = tramway_bench::start_child({"bpftrace", "-e", program}, bpftrace); !e.empty())
    return fail(state, e);
  std::string out;
  // It prints "Attaching 1 probe..." before it attaches: the int3 is the sign it did.
  std::array<char, 256> buf;
  while (out.find("Attaching") == std::string::npos) {
    const ssize_t n = read(bpftrace.out, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf.data(), static_cast<std::size_t>(n));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (out.find("Attaching") != std::string::npos && first_byte(fn) != 0xcc &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const bool probed = first_byte(fn) == 0xcc;
  if (probed) call_loop<plain_target>(state);
  kill(bpftrace.pid, SIGINT);  // it prints its map and removes the probe as it exits
  const std::string e = tramway_bench::finish_child(bpftrace, out, "bpftrace");
  if (!probed) return fail(state, "bpftrace did not attach its uprobe to plain_target within 30 s; it printed: " + out);
  if (!e.empty()) return fail(state, e + "; it printed: " + out);
  if (first_byte(fn) != original) return fail(state, "plain_target's entry still holds the uprobe after bpftrace exited");
  // Its map, printed at exit: "@: N".
  const auto at = out.find("@: ");
  const std::uint64_t counted = at == std::string::npos ? 0 : std::strtoull(out.c_str() + at + 3, nullptr, 10);
  if (counted < static_cast<std::uint64_t>(state.iterations()))
    fail(state, "bpftrace counted " + std::to_string(counted) + " calls of " + std::to_string(state.iterations()) +
                    "; it printed: " + out);
}

// ---- the functions relocated prologues hook -----------------------------------------------------
// Every function the relocated figures attach to must be relocatable (a patchable entry would
// be hooked as such and measure something else): checked once, with hooks::functions().
std::string check_kinds() {
  auto fns = hooks::functions();
  if (!fns.ok()) return "hooks::functions(): " + fns.status().message();
  std::map<std::uintptr_t, const hooks::Function*> by_entry;
  for (const hooks::Function& f : *fns) by_entry[f.entry] = &f;
  const auto expect = [&](std::uintptr_t entry, const char* what, hooks::HookKind kind) -> std::string {
    auto it = by_entry.find(entry);
    if (it == by_entry.end()) return std::string(what) + " is not listed by hooks::functions()";
    if (it->second->kind == kind) return {};
    return std::string(what) + " (" + it->second->name + ") is " + hooks::hook_kind_name(it->second->kind) +
           ", expected " + hooks::hook_kind_name(kind) + (it->second->reason.empty() ? "" : ": " + it->second->reason);
  };
  using hooks::HookKind;
  for (auto [entry, what, kind] : {std::tuple{address(plain_target), "plain_target", HookKind::relocatable},
                                   std::tuple{address(patchable_target), "patchable_target", HookKind::patchable},
                                   std::tuple{address(trap_target), "trap_target", HookKind::trap}}) {
    if (std::string e = expect(entry, what, kind); !e.empty()) return e;
  }
  std::size_t wrong = 0;
  std::string first;
  for (std::size_t i = 0; i < kFunctions; ++i) {
    std::string e = expect(address(bench_rfns[i]), "bench_rfns[i]", HookKind::relocatable);
    if (e.empty()) continue;
    if (wrong++ == 0) first = e;
  }
  if (wrong) return std::to_string(wrong) + " of the " + std::to_string(kFunctions) + " bench_rfn functions are not relocatable; first: " + first;
  return {};
}

// ---- peers, as child processes (bench/child.h) --------------------------------------------------
// One run of the child a repetition (Iterations(1)): each of its figures becomes the counter
// of the same name here, checked for its unit.
void bm_child(State& state, const std::vector<std::string>& argv, const std::vector<ChildFigure>& figures) {
  std::string out;
  for (auto _ : state) {
    if (std::string e = run_child(argv, out); !e.empty()) return fail(state, e);
  }
  if (std::string e = take_child_figures(out, figures, state, argv[0]); !e.empty()) fail(state, e);
}

const std::vector<ChildFigure> kXrayFigures = {{"xray/unpatched", "ns"},
                                               {"xray/patched_handler", "ns"},
                                               {"xray/patch/10000", "ms"},
                                               {"xray/patch_function/one_of_10000", "us"}};

void bm_xray(State& state) {
  // One repetition a run: the repetitions are this program's.
  bm_child(state, {sibling("bench_xray"), "--benchmark_repetitions=1"}, kXrayFigures);
}

// uftrace 0.13 patches the address __patchable_function_entries lists, which with 13,8 is the
// prefix before the entry (it never runs), so its child is built with -fpatchable-function-entry=5,
// the layout uftrace documents; --no-libcall keeps it from also hooking the PLT. It records
// into a scratch directory, removed afterwards.
void bm_uftrace(State& state) {
  char dir[] = "/tmp/bench_hooks_uftrace.XXXXXX";
  if (!mkdtemp(dir)) return fail(state, "mkdtemp failed");
  bm_child(state,
           {"uftrace", "record", "--no-libcall", "-d", std::string(dir) + "/data", "-P", "^bench_uftrace_target$",
            sibling("bench_uftrace_child"), "200000", "uftrace/dynamic"},
           {{"uftrace/dynamic", "ns"}});
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

}  // namespace

int main(int argc, char** argv) {
  using tramway_bench::add;
  using tramway_bench::counter_figure;
  using tramway_bench::Figure;
  using tramway_bench::ratio_figure;
  using tramway_bench::time_figure;
  auto cpu_ns = [](const char* name) { return time_figure(name, Figure::kCpuTime, "ns"); };
  auto timed = [](const char* name, const char* unit) { return counter_figure(name, "time", unit); };
  const hooks::Filter all = first_functions(kFunctions);
  const hooks::Filter thousand = first_functions(1000);
  const hooks::Filter one = hooks::Filter::addresses({address(bench_fns[kFunctions / 2])});

  // hook/disabled runs the nops of a site not hooked now, the same ones in every repetition:
  // GCC's five 1-byte nops become one 5-byte nop at a site's first hook (DESIGN, "Normalisation
  // of GCC's entries"), so that happens here, before any repetition. (Both forms measured alike.)
  if (Status s = warm_up(hooks::Filter::addresses({address(patchable_target)})); !s.ok()) {
    std::fprintf(stderr, "%s: hooking patchable_target: %s\n", argv[0], s.message().c_str());
    return 1;
  }
  if (std::string e = check_kinds(); !e.empty()) {
    std::fprintf(stderr, "%s: the relocated figures need their functions relocatable: %s\n", argv[0], e.c_str());
    return 1;
  }
  // plain_target's first relocated hook takes its entry pad (permanent): before any repetition.
  if (Status s = warm_up(hooks::Filter::addresses({address(plain_target)})); !s.ok()) {
    std::fprintf(stderr, "%s: hooking plain_target through a relocated prologue: %s\n", argv[0], s.message().c_str());
    return 1;
  }
  // Calls: CPU time, so that a preemption on the two shared cores is not charged to a call.
  add("call/plain", bm_plain, {cpu_ns("call/plain")});
  add("hook/disabled", bm_disabled, {cpu_ns("hook/disabled")});
  add("hook/common/empty", [](State& s) { bm_hooked(s, 0); }, {cpu_ns("hook/common/empty")});
  add("hook/direct/empty", [](State& s) { bm_hooked(s, 0, true); }, {cpu_ns("hook/direct/empty")});
  add("hook/common/1_plus_100", [](State& s) { bm_hooked(s, 100); },
      {cpu_ns("hook/common/1_plus_100"),
       ratio_figure("hook/common/1_plus_100_ratio", "hook/common/1_plus_100", "hook/common/empty")});
  add("hook/common/reads_regs", [](State& s) { bm_hooked(s, 0, false, reads_regs_callback); },
      {cpu_ns("hook/common/reads_regs")});
  // attach/detach: real time (counter "time"), which includes patch batches and grace periods.
  add("attach/1000", [&](State& s) { bm_attach(s, thousand, 1e3); }, {timed("attach/1000", "ms")})
      ->Unit(benchmark::kMillisecond);
  add("attach/10000", [&](State& s) { bm_attach(s, all, 1e3); }, {timed("attach/10000", "ms")})
      ->Unit(benchmark::kMillisecond);
  add("detach/10000", [&](State& s) { bm_detach(s, all); }, {timed("detach/10000", "ms")})
      ->Unit(benchmark::kMillisecond);
  add("attach/one_of_10000", [&](State& s) { bm_attach(s, one, 1e6); }, {timed("attach/one_of_10000", "us")})
      ->Unit(benchmark::kMicrosecond);

  // Hooks on any function. plain_target is patchable_target's body without a patchable entry,
  // compiled in the same unit: a relocated prologue on it against the patchable entry.
  using tramway_bench::difference_figure;
  add("hook/relocated/empty", [](State& s) { bm_hooked<plain_target>(s, 0); },
      {cpu_ns("hook/relocated/empty"),
       difference_figure("hook/relocated/empty_minus_common", "hook/relocated/empty", "hook/common/empty", "ns"),
       ratio_figure("hook/relocated/empty_ratio_to_common", "hook/relocated/empty", "hook/common/empty")});
  add("hook/relocated/direct/empty", [](State& s) { bm_hooked<plain_target>(s, 0, true); },
      {cpu_ns("hook/relocated/direct/empty"),
       difference_figure("hook/relocated/direct/empty_minus_direct", "hook/relocated/direct/empty",
                         "hook/direct/empty", "ns")});
  if (std::string why = trap_probes_unavailable(); !why.empty()) {
    std::fprintf(stderr, "hook/trap/empty: skipped: %s\n", why.c_str());
  } else {
    add("hook/trap/empty", bm_trap, {cpu_ns("hook/trap/empty")});
  }
  if (std::string why = uprobe_unavailable(); !why.empty()) {
    std::fprintf(stderr, "uprobe/bpftrace: skipped: %s\n", why.c_str());
  } else {
    add("uprobe/bpftrace", bm_uprobe,
        {cpu_ns("uprobe/bpftrace"),
         ratio_figure("hook/relocated/empty_ratio_to_uprobe", "hook/relocated/empty", "uprobe/bpftrace")})
        ->Iterations(kUprobeCalls);
  }
  const hooks::Filter relocated_all = first_functions(kFunctions, bench_rfns);
  const hooks::Filter relocated_thousand = first_functions(1000, bench_rfns);
  const hooks::Filter relocated_one = hooks::Filter::addresses({address(bench_rfns[kFunctions / 2])});
  constexpr std::size_t kBusy = 16;
  for (const auto& named : {std::pair{"1", &relocated_one}, std::pair{"1000", &relocated_thousand},
                             std::pair{"10000", &relocated_all}}) {
    const hooks::Filter* filter = named.second;  // a variable: Clang 14 cannot capture a structured binding
    const std::string a = std::string("attach/relocated/") + named.first;
    const std::string d = std::string("detach/relocated/") + named.first;
    add(a, [filter](State& s) { bm_attach(s, *filter, 1e3); },
        {timed(a.c_str(), "ms"), counter_figure(a + "/cpu", "cpu", "ms")})
        ->Unit(benchmark::kMillisecond);
    add(d, [filter](State& s) { bm_detach(s, *filter, kBusy); },
        {timed(d.c_str(), "ms"), counter_figure(d + "/cpu", "cpu", "ms")})
        ->Unit(benchmark::kMillisecond);
  }
  // The detach's parts: without the busy threads, and the tasks grace period alone with them.
  add("detach/relocated/10000/idle", [&](State& s) { bm_detach(s, relocated_all); },
      {timed("detach/relocated/10000/idle", "ms"), counter_figure("detach/relocated/10000/idle/cpu", "cpu", "ms")})
      ->Unit(benchmark::kMillisecond);
  add("grace/tasks/busy/16", [](State& s) { bm_tasks_gp(s, kBusy); }, {timed("grace/tasks/busy/16", "ms")})
      ->Unit(benchmark::kMillisecond);
  add("signal_round/busy/16", [](State& s) { bm_signal_round(s, kBusy); },
      {timed("signal_round/busy/16", "ms"),
       ratio_figure("grace/tasks/busy/16_ratio_to_signal_round", "grace/tasks/busy/16", "signal_round/busy/16"),
       ratio_figure("detach/relocated/10000_ratio_to_signal_round", "detach/relocated/10000", "signal_round/busy/16")})
      ->Unit(benchmark::kMillisecond);

  std::vector<tramway_bench::Figure> xray;
  for (const ChildFigure& f : kXrayFigures) xray.push_back(counter_figure(f.name, f.name, f.unit));
  xray.push_back(ratio_figure("hook/common/empty_ratio_to_xray_patched", "hook/common/empty", "xray/patched_handler"));
  xray.push_back(ratio_figure("hook/direct/empty_ratio_to_xray_patched", "hook/direct/empty", "xray/patched_handler"));
  xray.push_back(ratio_figure("attach/10000_ratio_to_xray_patch", "attach/10000", "xray/patch/10000"));
  xray.push_back(ratio_figure("attach/one_of_10000_ratio_to_xray", "attach/one_of_10000",
                              "xray/patch_function/one_of_10000"));
  add("xray", bm_xray, std::move(xray))->Iterations(1);
  add("uftrace", bm_uftrace, {counter_figure("uftrace/dynamic", "uftrace/dynamic", "ns")})->Iterations(1);
  return tramway_bench::run(argc, argv);
}
