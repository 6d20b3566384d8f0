// bench/child.h — running peers' programs (bench_xray, uftrace) as children of a benchmark
// and taking their figures. A child prints figures as JSON lines, like bench/run does.
#pragma once

#include <benchmark/benchmark.h>
#include <sys/types.h>

#include <string>
#include <vector>

namespace tramway_bench {

// Runs `argv` (argv[0]: a path, or a name looked up in PATH) with stdout into `out`; stderr
// stays ours. The child starts with default signal handling and nothing blocked, whatever
// tramway's signal router left on this thread. Returns an error message, empty on success.
std::string run_child(const std::vector<std::string>& argv, std::string& out);

// A child started by start_child, running: its stdout is the read end `out`.
struct RunningChild {
  pid_t pid = -1;
  int out = -1;
};
// Starts `argv` as run_child does but returns at once, leaving its output to be read.
std::string start_child(const std::vector<std::string>& argv, RunningChild& child);
// Reads the rest of the child's output into `out` and waits for it to exit (status 0 expected).
std::string finish_child(RunningChild& child, std::string& out, const std::string& name);

// A sibling program of this one, in the same build directory.
std::string sibling(const char* name);

struct ChildFigure {
  const char* name;
  const char* unit;
};

// Copies each of `figures` from the child's output `out` into state.counters under the same
// name, checking its unit. Returns an error message (naming `child`), empty on success.
std::string take_child_figures(const std::string& out, const std::vector<ChildFigure>& figures,
                               benchmark::State& state, const std::string& child);

}  // namespace tramway_bench
