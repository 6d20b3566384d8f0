// tramway-torture SUITE --seconds N: runs one torture suite and exits non-zero on any
// violation. Suites: static (static keys and static calls under a SIGPROF storm, with PC
// fix-ups of a thread spinning in generated code); grace (readers, writers retiring and
// poisoning, pipe histograms: the trace and tasks flavors of grace periods); hooks (2,000
// functions built by GCC and Clang, half without patchable entries (relocated prologues, their
// freed copies poisoned), ops attached and detached in cycles while callers and a
// SIGPROF storm call them: every call inside an attach window ran each callback exactly once,
// none ran late, the counts agree); trace (the tracer's exit hooks: nested, tail, recursive,
// throwing and longjmp-ing traced calls under a SIGPROF storm whose handler calls traced code,
// globs attached and detached, recordings restarted and read back balanced); lifecycle (fork storms, plugins dlopened and
// dlclosed, threads created and ended, against attach/detach, key flips, recordings and grace
// periods; a hang is a violation).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <map>
#include <string>

#include "suite.h"

int main(int argc, char** argv) {
  using namespace tramway::torture;
  const std::map<std::string, int (*)(const Options&)> suites = {
      {"static", run_static}, {"grace", run_grace}, {"hooks", run_hooks}, {"trace", run_trace}, {"lifecycle", run_lifecycle}};

  CLI::App app{"tramway-torture: many threads, a signal storm and a controller patching as fast as it can"};
  std::string suite;
  Options o;
  std::string names;
  for (const auto& [name, fn] : suites) names += (names.empty() ? "" : ", ") + name;
  app.add_option("suite", suite, "Suite to run (" + names + ")")->required();
  app.add_option("--seconds", o.seconds, "How long to run")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--threads", o.threads, "Worker threads")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--signal-us", o.signal_interval_us, "SIGPROF period per thread in microseconds (0: no storm)")
      ->check(CLI::Range(0, 1'000'000))
      ->capture_default_str();
  app.add_option("--seed", o.seed, "Random seed")->capture_default_str();
  app.add_option("--cycles", o.cycles, "hooks: stop after this many attach/detach cycles, or --seconds (0: no limit)")
      ->capture_default_str();
  app.add_option("--hang-seconds", o.hang_seconds, "lifecycle: an actor without progress this long is a hang")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto it = suites.find(suite);
  if (it == suites.end()) {
    std::fprintf(stderr, "tramway-torture: unknown suite '%s' (known: %s)\n", suite.c_str(), names.c_str());
    return 2;
  }
  return it->second(o);
}
