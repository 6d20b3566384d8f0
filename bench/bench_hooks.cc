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
// No difference figure (report.h has ratios only): the DESIGN targets compare hook/disabled
// with call/plain (<= 0.3 ns) and hook/common/empty with hook/disabled (<= 4 ns).
//
// XRay needs Clang and uftrace its own process, so both run as children: bench_xray (xray_bench.cc,
// built by clang++-14, see CMakeLists.txt) and bench_uftrace_child (uftrace_child.cc) print
// report.h's JSON lines, and a benchmark here runs the child once per repetition and turns its
// lines into counters. So their repetitions interleave with tramway's (a noisy spell on the
// shared cores hits both), and report.h's ratio figures divide medians of one run.
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "child.h"
#include "noinline.h"
#include "report.h"
#include "tramway/hooks.h"


// ---- the measured function, twice ---------------------------------------------------------
// Identical bodies; the attribute is -fpatchable-function-entry=13,8 for one function, so that
// both are compiled in this one unit with the same flags otherwise. xray_bench.cc and
// uftrace_child.cc measure the same body.
std::uint64_t bench_sink;
BENCH_NOINLINE void plain_target(std::uint64_t x) { bench_sink += x; }
BENCH_NOINLINE __attribute__((patchable_function_entry(13, 8))) void patchable_target(std::uint64_t x) {
  bench_sink += x;
}

// ---- the 10,000 patchable functions (generated; libbench_hooks_functions.so) ------------------
constexpr std::size_t kFunctions = BENCH_FUNCTIONS;
extern "C" void (*const bench_fns[kFunctions])();

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

hooks::Filter first_functions(std::size_t n) {
  std::vector<std::uintptr_t> entries;
  for (std::size_t i = 0; i < n; ++i) entries.push_back(address(bench_fns[i]));
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

// patchable_target hooked with `callback`, while `others` more ops are attached to one other
// function each (bench_fns[0..others)). `direct`: the ops is direct (its own slot).
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
  if (Status s = hooks::attach(ops, hooks::Filter::addresses({address(patchable_target)})); !s.ok()) {
    detach_all();
    return fail(state, "attach: " + s.message());
  }
  call_loop<patchable_target>(state);
  // The callback must have run on every call.
  if (hooks::counters(ops).hits != static_cast<std::uint64_t>(state.iterations()))
    fail(state, "the hook did not run on every call");
  if (Status s = hooks::detach(ops); !s.ok()) fail(state, "detach: " + s.message());
  detach_all();
}

// ---- attach and detach ------------------------------------------------------------------------
// Times `op` and not `undo`, by reading the clock around `op` alone: PauseTiming/ResumeTiming
// would add their own clock reads (a thread-CPU-clock syscall each) to a figure of a few us.
// The figure is the counter "time", `scale` per second (1e3: ms, 1e6: us), a mean per iteration.
template <class Op, class Undo>
void timed_loop(State& state, double scale, Op op, Undo undo) {
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    Status s = op();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s.ok()) s = undo();
    if (!s.ok()) return fail(state, s.message());
  }
  state.counters["time"] = benchmark::Counter(seconds * scale, benchmark::Counter::kAvgIterations);
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

void bm_detach(State& state, const hooks::Filter& filter) {
  if (Status s = warm_up(filter); !s.ok()) return fail(state, "warm-up: " + s.message());
  hooks::Ops ops;
  ops.entry = empty_callback;
  // The same loop with the roles swapped: attach is the untimed `undo` of the previous detach.
  if (Status s = hooks::attach(ops, filter); !s.ok()) return fail(state, "attach: " + s.message());
  timed_loop(state, 1e3, [&] { return hooks::detach(ops); }, [&] { return hooks::attach(ops, filter); });
  if (ops.state) (void)hooks::detach(ops);
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
