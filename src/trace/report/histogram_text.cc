// `tramway report --histogram GLOB`: bpftrace-style log-scale latency histograms.
#include <fnmatch.h>

#include <algorithm>
#include <map>

#include "trace/report/internal.h"

namespace tramway::trace::report {
namespace {

constexpr std::size_t kBarWidth = 52;

// Appended piecewise: GCC 12 -O3 warns (-Wrestrict, wrongly) on "literal" + string.
std::string bounds_text(std::uint64_t lower) {
  std::string s = "[";
  s += format_duration(lower);
  s += ", ";
  s += format_duration(lower * 2);
  s += ')';
  return s;
}

void append_histogram(std::string& out, const std::string& name, const DurationHistogram& d) {
  out += detail::valid_utf8(name);
  out += ": ";
  out += std::to_string(d.count());
  out += d.count() == 1 ? " call" : " calls";
  for (const auto& [label, ns] : {std::pair{", min ", d.min()}, std::pair{", p50 ", d.percentile(50)},
                                  std::pair{", p99 ", d.percentile(99)}, std::pair{", max ", d.max()}}) {
    out += label;
    out += format_duration(ns);
  }
  out += '\n';
  const auto buckets = d.log2_buckets();
  std::uint64_t most = 1;
  std::size_t label_width = 0, count_width = 0;
  for (const auto& b : buckets) {
    most = std::max(most, b.calls);
    label_width = std::max(label_width, detail::display_width(bounds_text(b.lower)));
    count_width = std::max(count_width, std::to_string(b.calls).size());
  }
  for (const auto& b : buckets) {
    const std::string label = bounds_text(b.lower), calls = std::to_string(b.calls);
    // A non-empty bucket shows at least one mark, as bpftrace's do.
    std::size_t marks = static_cast<std::size_t>(b.calls * kBarWidth / most);
    if (b.calls > 0 && marks == 0) marks = 1;
    out += label + std::string(label_width - detail::display_width(label) + 1, ' ');
    out += std::string(count_width - calls.size(), ' ') + calls + " |";
    out += std::string(marks, '@') + std::string(kBarWidth - marks, ' ') + "|\n";
  }
}

}  // namespace

std::string format_histograms(const Profile& profile, const std::vector<std::string>& globs) {
  std::map<std::string, DurationHistogram> by_name;
  for (const ThreadProfile& t : profile.threads)
    for (const auto& [function, stats] : t.functions) by_name[profile.functions[function].name].merge(stats.durations);
  std::string out;
  for (const std::string& glob : globs) {
    bool matched = false;
    for (const auto& [name, d] : by_name) {
      if (d.count() == 0 || ::fnmatch(glob.c_str(), name.c_str(), 0) != 0) continue;
      if (!out.empty()) out += '\n';
      append_histogram(out, name, d);
      matched = true;
    }
    if (!matched) {
      if (!out.empty()) out += '\n';
      out += "--histogram '";
      out += glob;
      out += "': no function with completed calls matches it (the table lists them)\n";
    }
  }
  return out;
}

}  // namespace tramway::trace::report
