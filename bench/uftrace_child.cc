// bench_uftrace_child CALLS FIGURE — run by bench_hooks (FIGURE uftrace/dynamic) and bench_trace
// (uftrace/record) under `uftrace record -P bench_uftrace_target`, uftrace's dynamic tracing of a
// -fpatchable-function-entry=5 build recording entry and exit into its data directory: times
// CALLS calls of the function those benchmarks measure (same body), with this thread's CPU time
// as their call figures, and prints {"name": FIGURE, "value": NS_A_CALL, "unit": "ns"}.
// Built twice: bench_uftrace_child with -fpatchable-function-entry=5, and with BENCH_UFTRACE_FULL
// bench_uftrace_plain_child without instrumentation flags, for uftrace's full dynamic patching
// (bench_trace's uftrace/dynamic_full).
#include <time.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "noinline.h"

extern "C" {
std::uint64_t bench_sink;
BENCH_NOINLINE void bench_uftrace_target(std::uint64_t x) { bench_sink += x; }
}

static double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CALLS FIGURE (run by bench_hooks and bench_trace under uftrace record)\n", argv[0]);
    return 2;
  }
  const long calls = std::atol(argv[1]);
  // uftrace turns the entry's 5-byte nop into a call before main (full dynamic patching: the
  // prologue's first instructions into a jmp or call; the body's first byte, the REX prefix of
  // its add, is neither); without it (not run under uftrace, or uftrace did not patch the
  // function) the figure would be a plain call's.
  const unsigned char head = *reinterpret_cast<const unsigned char*>(&bench_uftrace_target);
#ifdef BENCH_UFTRACE_FULL
  const bool patched = head == 0xe8 || head == 0xe9;
#else
  const bool patched = head == 0xe8;
#endif
  if (!patched) {
    std::fprintf(stderr, "%s: bench_uftrace_target is not patched: run it under uftrace record -P\n", argv[0]);
    return 1;
  }
  const double t0 = thread_seconds();
  for (long i = 0; i < calls; ++i) bench_uftrace_target(static_cast<std::uint64_t>(i));
  const double t1 = thread_seconds();
  std::printf("{\"name\": \"%s\", \"value\": %.4g, \"unit\": \"ns\"}\n", argv[2],
              (t1 - t0) * 1e9 / static_cast<double>(calls));
  return 0;
}
