// bench_xray — LLVM XRay on bench_hooks' workload. Built by clang++-14 with -fxray-instrument
// -fxray-instruction-threshold=1 and linked with the XRay runtime (bench/CMakeLists.txt); run by
// bench_hooks once per repetition, which prints these figures and their ratios to tramway's.
// Figures:
//   xray/unpatched, xray/patched_handler      ns a call (CPU time): sleds as compiled, then
//                                             patched with an empty handler (XRay calls it on
//                                             entry and on exit)
//   xray/patch/10000                          ms: __xray_patch() of every sled
//   xray/patch_function/one_of_10000          us: __xray_patch_function() of one function
// The 10,000 functions are linked into this executable, not a shared library as bench_hooks'
// are: XRay in LLVM 14 reads only the main executable's sleds (DSO support came in LLVM 19).
#include <xray/xray_interface.h>

#include <chrono>
#include <cstdint>
#include <iostream>

#include "report.h"

// The function bench_hooks measures (same body), instrumented.
std::uint64_t bench_sink;
[[clang::xray_always_instrument]] __attribute__((noinline)) void xray_target(std::uint64_t x) { bench_sink += x; }

constexpr std::size_t kFunctions = BENCH_FUNCTIONS;
extern "C" void (*const bench_fns[kFunctions])();

namespace {

using benchmark::State;

void fail(State& state, const std::string& what) { state.SkipWithError(what.c_str()); }

[[clang::xray_never_instrument]] void empty_handler(std::int32_t, XRayEntryType) {}

// As in bench_hooks.cc. Not instrumented: patched, its own sleds would run on every iteration.
[[clang::xray_never_instrument]] __attribute__((noinline)) void call_loop(State& state) {
  std::uint64_t i = 0;
  for (auto _ : state) xray_target(++i);
}

// As in bench_hooks.cc: the clock read around `op` alone, `undo` not timed.
template <class Op, class Undo>
void timed_loop(State& state, double scale, Op op, Undo undo) {
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const XRayPatchingStatus s = op();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s != XRayPatchingStatus::SUCCESS || undo() != XRayPatchingStatus::SUCCESS)
      return fail(state, "XRay patching failed (status " + std::to_string(s) + ")");
  }
  state.counters["time"] = benchmark::Counter(seconds * scale, benchmark::Counter::kAvgIterations);
}

// An unpatched sled starts with a short jmp over itself (eb 09); a patched one does not.
bool patched(const void* function) { return *static_cast<const std::uint8_t*>(function) != 0xeb; }

void bm_unpatched(State& state) {
  if (patched(reinterpret_cast<const void*>(&xray_target))) return fail(state, "xray_target is patched");
  call_loop(state);
}

void bm_patched_handler(State& state) {
  __xray_set_handler(empty_handler);
  if (__xray_patch() != XRayPatchingStatus::SUCCESS || !patched(reinterpret_cast<const void*>(&xray_target)))
    fail(state, "__xray_patch failed");
  else
    call_loop(state);
  __xray_unpatch();
  __xray_remove_handler();
}

void bm_patch_all(State& state) {
  timed_loop(state, 1e3, [] { return __xray_patch(); }, [] { return __xray_unpatch(); });
}

void bm_patch_one(State& state) {
  // XRay names functions by id; this is the same function bench_hooks attaches to.
  const auto target = reinterpret_cast<std::uintptr_t>(bench_fns[kFunctions / 2]);
  std::int32_t id = 0;
  for (std::size_t i = 1; i <= __xray_max_function_id() && !id; ++i)
    if (__xray_function_address(static_cast<std::int32_t>(i)) == target) id = static_cast<std::int32_t>(i);
  if (!id) return fail(state, "no XRay function id for bench_fn_" + std::to_string(kFunctions / 2));
  timed_loop(state, 1e6, [id] { return __xray_patch_function(id); }, [id] { return __xray_unpatch_function(id); });
}

}  // namespace

int main(int argc, char** argv) {
  using tramway_bench::add;
  using tramway_bench::counter_figure;
  using tramway_bench::Figure;
  using tramway_bench::time_figure;
  std::cerr << "XRay: " << __xray_max_function_id() << " instrumented functions\n";
  add("xray/unpatched", bm_unpatched, {time_figure("xray/unpatched", Figure::kCpuTime, "ns")});
  add("xray/patched_handler", bm_patched_handler, {time_figure("xray/patched_handler", Figure::kCpuTime, "ns")});
  add("xray/patch/10000", bm_patch_all, {counter_figure("xray/patch/10000", "time", "ms")})
      ->Unit(benchmark::kMillisecond);
  add("xray/patch_function/one_of_10000", bm_patch_one,
      {counter_figure("xray/patch_function/one_of_10000", "time", "us")})
      ->Unit(benchmark::kMicrosecond);
  return tramway_bench::run(argc, argv);
}
