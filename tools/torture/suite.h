// Torture suites: each hammers one capability with many threads, a signal storm and a
// controller changing things as fast as it can, then checks what it observed.
#pragma once

#include <cstdint>
#include <string>

namespace tramway::torture {

struct Options {
  double seconds = 30;
  int threads = 8;           // worker threads (more than cores, so they are preempted in sites)
  int signal_interval_us = 20;  // per-thread SIGPROF period; 0 disables the storm
  std::uint64_t seed = 1;
  std::uint64_t cycles = 0;  // hooks: stop after this many attach/detach cycles (0: --seconds only)
  double hang_seconds = 60;  // lifecycle: an actor without progress this long is a hang
};

// Runs the suite; prints progress to stderr and one summary line to stdout. Returns the
// process exit status: 0 when nothing was violated.
int run_static(const Options& options);
int run_grace(const Options& options);
int run_hooks(const Options& options);
int run_trace(const Options& options);
int run_lifecycle(const Options& options);

}  // namespace tramway::torture
