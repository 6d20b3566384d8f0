// The function bench_trace traces (bench_trace.cc). It is alone in this object so that it is
// the only code compiled with -fpatchable-function-entry=13,8 (CMakeLists.txt); the body is the
// one bench_hooks measures, and the uftrace child's (uftrace_child.cc).
#include <cstdint>

#include "noinline.h"

extern "C" {
std::uint64_t bench_trace_sink;
BENCH_NOINLINE void bench_trace_target(std::uint64_t x) { bench_trace_sink += x; }
}
