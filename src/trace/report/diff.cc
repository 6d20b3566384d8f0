// `tramway report A --diff B`: per-function deltas between two recordings, by name.
#include <algorithm>
#include <cstdlib>
#include <map>

#include "trace/report/internal.h"

namespace tramway::trace::report {
namespace {

std::string signed_duration(std::int64_t delta) {
  std::string s = delta < 0 ? "-" : delta > 0 ? "+" : "";
  s += format_duration(static_cast<std::uint64_t>(delta < 0 ? -delta : delta));
  return s;
}

std::string signed_count(std::int64_t delta) {
  std::string s = delta > 0 ? "+" : "";  // piecewise: GCC 12 -O3 -Wrestrict (a false positive)
  s += std::to_string(delta);
  return s;
}

std::string percent(std::uint64_t before, std::uint64_t after) {
  if (before == 0) return after == 0 ? "" : "new";
  const double p = (static_cast<double>(after) - static_cast<double>(before)) * 100.0 / static_cast<double>(before);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%+.1f%%", p);
  return buf;
}

}  // namespace

std::string format_diff(const Profile& before, const Profile& after, std::size_t limit) {
  std::map<std::string, std::pair<Row, Row>> by_name;
  for (const Row& r : table_rows(before, nullptr, SortKey::name, 0)) by_name[r.name].first = r;
  for (const Row& r : table_rows(after, nullptr, SortKey::name, 0)) by_name[r.name].second = r;
  struct Line {
    std::string name;
    const Row *a, *b;
    std::int64_t total_delta;
  };
  std::vector<Line> lines;
  for (const auto& [name, rows] : by_name) {
    lines.push_back({name, &rows.first, &rows.second,
                     static_cast<std::int64_t>(rows.second.total_ns) - static_cast<std::int64_t>(rows.first.total_ns)});
  }
  std::stable_sort(lines.begin(), lines.end(), [](const Line& x, const Line& y) {
    return std::abs(x.total_delta) > std::abs(y.total_delta);
  });
  const std::size_t shown = limit == 0 ? lines.size() : std::min(limit, lines.size());

  std::vector<std::vector<std::string>> cells;
  std::vector<std::string> names;
  for (std::size_t i = 0; i < shown; ++i) {
    const Row& a = *lines[i].a;
    const Row& b = *lines[i].b;
    cells.push_back({std::to_string(b.calls),
                     signed_count(static_cast<std::int64_t>(b.calls) - static_cast<std::int64_t>(a.calls)),
                     format_duration(b.total_ns),
                     signed_duration(lines[i].total_delta),
                     percent(a.total_ns, b.total_ns),
                     format_duration(b.self_ns),
                     signed_duration(static_cast<std::int64_t>(b.self_ns) - static_cast<std::int64_t>(a.self_ns)),
                     format_duration(b.p99_ns),
                     signed_duration(static_cast<std::int64_t>(b.p99_ns) - static_cast<std::int64_t>(a.p99_ns))});
    names.push_back(lines[i].name);
  }
  std::string out = "before: ";
  out += before.source.path;
  out += "\nafter:  ";
  out += after.source.path;
  out += "\n(figures of the second, then their change from the first; a function in one only counts 0 in the other)\n\n";
  out += detail::aligned_table({"calls", "Δcalls", "total", "Δtotal", "", "self", "Δself", "p99", "Δp99"}, cells, names);
  out += detail::shown_note(shown, lines.size());
  return out;
}

}  // namespace tramway::trace::report
