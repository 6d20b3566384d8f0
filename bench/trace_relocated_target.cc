// The function bench_trace traces through a relocated prologue (bench_trace.cc): the body of
// trace_target.cc's, built without a patchable entry (CMakeLists.txt), so that trace::attach
// hooks it through a detour.
#include <cstdint>

#include "noinline.h"

extern "C" {
std::uint64_t bench_trace_relocated_sink;
BENCH_NOINLINE void bench_trace_relocated_target(std::uint64_t x) { bench_trace_relocated_sink += x; }
}
