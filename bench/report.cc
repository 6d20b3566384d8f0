#include "report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <regex>
#include <set>
#include <string_view>

namespace tramway_bench {
namespace {

struct Entry {
  std::string name;
  std::vector<Figure> figures;
};
std::vector<Entry>& registry() {
  static std::vector<Entry> r;
  return r;
}

double seconds_to(double seconds, const std::string& unit) {
  if (unit == "ns") return seconds * 1e9;
  if (unit == "us") return seconds * 1e6;
  if (unit == "ms") return seconds * 1e3;
  return seconds;
}

bool derived(const Figure& f) { return f.source == Figure::kRatio || f.source == Figure::kDifference; }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Four significant digits, without an exponent for values a reader compares by eye.
std::string number(double v) {
  char buf[64];
  if (v == 0 || (std::abs(v) >= 1e-3 && std::abs(v) < 1e4)) {
    std::snprintf(buf, sizeof buf, "%.4g", v);
    if (std::strchr(buf, 'e')) std::snprintf(buf, sizeof buf, "%.0f", v);
  } else if (std::abs(v) >= 1e4 && std::abs(v) < 1e15) {
    std::snprintf(buf, sizeof buf, "%.0f", v);
  } else {
    std::snprintf(buf, sizeof buf, "%.4g", v);
  }
  return buf;
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// Collects every repetition's value of every selected figure; prints medians at the end, in
// registration order. Aggregate runs (Google Benchmark's own mean/median/stddev) are ignored:
// the medians are computed here from the repetitions, the same way for times and counters.
class FigureReporter : public benchmark::BenchmarkReporter {
 public:
  explicit FigureReporter(const std::regex& select) : select_(select) {}

  bool ReportContext(const Context& context) override {
    PrintBasicContext(&std::cerr, context);
    return true;
  }

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration) continue;
      const std::string& name = run.run_name.function_name;
      if (run.error_occurred) {
        std::cerr << name << ": ERROR: " << run.error_message << "\n";
        failed_ = true;
        continue;
      }
      const Entry* entry = find(name);
      if (!entry) continue;
      for (const Figure& f : entry->figures) {
        if (derived(f)) continue;  // computed from medians in Finalize()
        double value;
        if (f.source == Figure::kCounter) {
          auto it = run.counters.find(f.counter);
          if (it == run.counters.end()) {
            std::cerr << name << ": no counter '" << f.counter << "' for figure " << f.name << "\n";
            failed_ = true;
            continue;
          }
          value = it->second.value;
        } else {
          const double total = f.source == Figure::kRealTime ? run.real_accumulated_time : run.cpu_accumulated_time;
          value = seconds_to(total / static_cast<double>(run.iterations), f.unit);
        }
        values_[f.name].push_back(value);
        std::cerr << f.name << " #" << run.repetition_index << ": " << number(value) << " " << f.unit << " ("
                  << run.iterations << " iterations)\n";
      }
    }
  }

  void Finalize() override {
    for (const Entry& e : registry()) {
      for (const Figure& f : e.figures) {
        if (!std::regex_search(f.name, select_)) continue;
        double value;
        if (derived(f)) {
          auto num = values_.find(f.counter), den = values_.find(f.denominator);
          if (num == values_.end() || den == values_.end()) {
            std::cerr << f.name << ": no value for " << (num == values_.end() ? f.counter : f.denominator) << "\n";
            failed_ = true;
            continue;
          }
          const double a = median(num->second), b = median(den->second);
          value = f.source == Figure::kRatio ? a / b : a - b;
        } else {
          auto it = values_.find(f.name);
          if (it == values_.end()) continue;
          value = median(it->second);
        }
        std::printf("{\"name\": %s, \"value\": %s, \"unit\": %s}\n", json_string(f.name).c_str(),
                    number(value).c_str(), json_string(f.unit).c_str());
      }
    }
    std::fflush(stdout);
  }

  bool failed() const { return failed_; }

 private:
  static const Entry* find(const std::string& name) {
    for (const Entry& e : registry())
      if (e.name == name) return &e;
    return nullptr;
  }

  std::regex select_;
  std::map<std::string, std::vector<double>> values_;
  bool failed_ = false;
};

}  // namespace

benchmark::internal::Benchmark* add(const std::string& name, std::function<void(benchmark::State&)> fn,
                                    std::vector<Figure> figures) {
  const bool real_time = std::any_of(figures.begin(), figures.end(),
                                     [](const Figure& f) { return f.source == Figure::kRealTime; });
  registry().push_back({name, std::move(figures)});
  auto* b = benchmark::RegisterBenchmark(name.c_str(), std::move(fn));
  if (real_time) b->UseRealTime();
  return b;
}

int run(int argc, char** argv) {
  // Our flag first, then the defaults, then the caller's flags (later flags win).
  std::string figures = ".";
  std::vector<char*> args{argv[0]};
  // Repetitions interleaved at random: a noisy spell on the shared cores then lands on all
  // the benchmarks compared with each other, not on one of them.
  std::string repetitions = "--benchmark_repetitions=5";
  std::string interleave = "--benchmark_enable_random_interleaving=true";
  args.push_back(repetitions.data());
  args.push_back(interleave.data());
  for (int i = 1; i < argc; ++i) {
    constexpr std::string_view kFlag = "--figures=";
    if (std::string_view(argv[i]).starts_with(kFlag)) {
      figures = argv[i] + kFlag.size();
    } else {
      args.push_back(argv[i]);
    }
  }
  std::regex select;
  try {
    select = std::regex(figures);
  } catch (const std::regex_error& e) {
    std::cerr << argv[0] << ": bad --figures regex '" << figures << "': " << e.what() << "\n";
    return 2;
  }
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  if (n > 1) {
    std::cerr << argv[0] << ": unknown flag " << args[1] << "\n";
    return 2;
  }

  // Run only the benchmarks with at least one selected figure, or a figure a selected ratio
  // is computed from.
  std::set<std::string> needed;
  for (const Entry& e : registry()) {
    for (const Figure& f : e.figures) {
      if (!std::regex_search(f.name, select)) continue;
      needed.insert(f.name);
      if (derived(f)) needed.insert({f.counter, f.denominator});
    }
  }
  std::string spec;
  for (const Entry& e : registry()) {
    if (std::none_of(e.figures.begin(), e.figures.end(), [&](const Figure& f) { return needed.count(f.name); }))
      continue;
    spec += (spec.empty() ? "" : "|") + e.name;
  }
  if (spec.empty()) return 0;

  FigureReporter reporter(select);
  // Benchmark names are matched with their suffixes ("/real_time", ...).
  benchmark::RunSpecifiedBenchmarks(&reporter, "^(" + spec + ")(/|$)");
  benchmark::Shutdown();
  return reporter.failed() ? 1 : 0;
}

}  // namespace tramway_bench
