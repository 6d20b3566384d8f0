// bench/report.h — the main every tramway benchmark program shares.
//
// A program registers its benchmarks with add(), each with the figures its runs yield, and
// calls run(). run() executes Google Benchmark with repetitions and prints to stdout one
// JSON line per figure, the median over the repetitions:
//   {"name": "static_key/disabled", "value": 0.61, "unit": "ns"}
// Ratio and difference figures are computed from the medians of two figures of the same run.
// Everything else (context, per-repetition values, errors) goes to stderr, so that stdout
// can be concatenated across programs by bench/run.
//
// Flags: --figures=REGEX (ECMAScript, searched in the figure name) keeps only the figures
// that match and runs only the benchmarks that yield one. Other flags go to Google
// Benchmark (defaults: --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true);
// they may override the defaults.
#pragma once

#include <benchmark/benchmark.h>

#include <functional>
#include <string>
#include <vector>

namespace tramway_bench {

struct Figure {
  // kRatio: no value of its own; the median of figure `counter` over the median of figure
  // `denominator` (both of this run, registered with any benchmark). Selecting a ratio runs
  // the benchmarks of both its figures.
  // kDifference: the median of figure `counter` minus the median of figure `denominator`, in
  // their unit (both must have it), for targets stated as "within N ns of".
  enum Source { kRealTime, kCpuTime, kCounter, kRatio, kDifference };
  std::string name;     // as printed, e.g. "batch/10000/time"
  Source source;
  std::string unit;     // times: "ns", "us", "ms" or "s" (converted); counters: printed as is
  std::string counter;  // kCounter: the key in state.counters; kRatio, kDifference: the numerator/minuend
  std::string denominator = {};  // kRatio: the denominator figure; kDifference: the subtrahend
};

// A figure that is the benchmark's time per iteration.
inline Figure time_figure(std::string name, Figure::Source source, std::string unit) {
  return {std::move(name), source, std::move(unit), {}, {}};
}
inline Figure counter_figure(std::string name, std::string counter, std::string unit) {
  return {std::move(name), Figure::kCounter, std::move(unit), std::move(counter), {}};
}
// A figure that is one figure's median over another's, e.g. a time relative to a peer's.
inline Figure ratio_figure(std::string name, std::string numerator, std::string denominator) {
  return {std::move(name), Figure::kRatio, "ratio", std::move(numerator), std::move(denominator)};
}

// A figure that is one figure's median minus another's (same unit), e.g. an added cost.
inline Figure difference_figure(std::string name, std::string minuend, std::string subtrahend, std::string unit) {
  return {std::move(name), Figure::kDifference, std::move(unit), std::move(minuend), std::move(subtrahend)};
}

// Registers benchmark `name` (which must contain no regex metacharacters other than '/').
// A real-time figure makes the benchmark use real time for its iteration count too.
benchmark::internal::Benchmark* add(const std::string& name, std::function<void(benchmark::State&)> fn,
                                    std::vector<Figure> figures);

// Parses flags, runs the selected benchmarks, prints the figures. Returns the exit status:
// non-zero on bad flags or if any benchmark reported an error.
int run(int argc, char** argv);

}  // namespace tramway_bench
