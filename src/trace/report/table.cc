// The text report: a header line about the recording, one table per request (all threads or
// each thread), and footnotes for everything that makes the numbers less than exact.
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <map>

#include "trace/report/internal.h"

namespace tramway::trace::report {
namespace {

struct Aggregate {
  std::uint64_t calls = 0, total_ns = 0, self_ns = 0;
  DurationHistogram durations;
};

void add(std::map<std::string, Aggregate>& by_name, const Profile& profile, const ThreadProfile& thread) {
  for (const auto& [function, stats] : thread.functions) {
    Aggregate& a = by_name[profile.functions[function].name];
    a.calls += stats.calls;
    a.total_ns += stats.total_ns;
    a.self_ns += stats.self_ns;
    a.durations.merge(stats.durations);
  }
}

std::uint64_t key_of(const Row& r, SortKey sort) {
  switch (sort) {
    case SortKey::calls: return r.calls;
    case SortKey::total: return r.total_ns;
    case SortKey::self: return r.self_ns;
    case SortKey::mean: return r.mean_ns;
    case SortKey::p50: return r.p50_ns;
    case SortKey::p90: return r.p90_ns;
    case SortKey::p99: return r.p99_ns;
    case SortKey::max: return r.max_ns;
    case SortKey::name: return 0;
  }
  return 0;
}

std::string plural(std::uint64_t n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

std::string lost_text(std::uint64_t lost) {
  return lost == 0 ? "no events lost" : plural(lost, "event", "events") + " lost (rings full)";
}

std::string recorded_at(std::uint64_t realtime_ns) {
  if (realtime_ns == 0) return {};
  const time_t seconds = static_cast<time_t>(realtime_ns / 1'000'000'000);
  tm local{};
  char buf[64];
  if (!localtime_r(&seconds, &local) || strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &local) == 0) return {};
  return buf;
}

void append_table(std::string& out, const Profile& profile, const ThreadProfile* thread, const Options& options) {
  const std::vector<Row> all = table_rows(profile, thread, options.sort, 0);
  if (all.empty()) {
    out += "(no completed calls)\n";
    return;
  }
  const std::size_t shown = options.limit == 0 ? all.size() : std::min(options.limit, all.size());
  out += format_table(std::vector<Row>(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(shown)));
  out += detail::shown_note(shown, all.size());
}

}  // namespace

std::vector<Row> table_rows(const Profile& profile, const ThreadProfile* thread, SortKey sort, std::size_t limit) {
  std::map<std::string, Aggregate> by_name;
  if (thread) {
    add(by_name, profile, *thread);
  } else {
    for (const ThreadProfile& t : profile.threads) add(by_name, profile, t);
  }
  std::vector<Row> rows;
  rows.reserve(by_name.size());
  for (auto& [name, a] : by_name) {
    if (a.calls == 0) continue;
    const DurationHistogram& d = a.durations;
    rows.push_back({name, a.calls, a.total_ns, a.self_ns, d.min(), a.total_ns / a.calls, d.percentile(50),
                    d.percentile(90), d.percentile(99), d.max(), static_cast<std::uint64_t>(std::llround(d.stddev()))});
  }
  // by_name is ordered by name, so a stable sort keeps ties in name order.
  if (sort != SortKey::name)
    std::stable_sort(rows.begin(), rows.end(),
                     [sort](const Row& a, const Row& b) { return key_of(a, sort) > key_of(b, sort); });
  if (limit != 0 && rows.size() > limit) rows.resize(limit);
  return rows;
}

std::string format_duration(std::uint64_t ns) {
  if (ns < 1000) return std::to_string(ns) + " ns";
  static constexpr struct { double scale; const char* unit; } kUnits[] = {
      {1e3, "µs"}, {1e6, "ms"}, {1e9, "s"}};
  char buf[32];
  for (std::size_t i = 0; i < std::size(kUnits); ++i) {
    const double v = static_cast<double>(ns) / kUnits[i].scale;
    const bool last = i + 1 == std::size(kUnits);
    // Three significant digits; "999.7 µs" rounds to "1.00 ms", not "1000 µs".
    if (v < 9.995) std::snprintf(buf, sizeof buf, "%.2f %s", v, kUnits[i].unit);
    else if (v < 99.95) std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[i].unit);
    else if (v < 999.5 || last) std::snprintf(buf, sizeof buf, "%.0f %s", v, kUnits[i].unit);
    else continue;
    return buf;
  }
  return buf;  // not reached: the last unit always prints
}

std::string format_table(const std::vector<Row>& rows) {
  std::vector<std::vector<std::string>> cells;
  std::vector<std::string> names;
  for (const Row& r : rows) {
    cells.push_back({std::to_string(r.calls), format_duration(r.total_ns), format_duration(r.self_ns),
                     format_duration(r.min_ns), format_duration(r.mean_ns), format_duration(r.p50_ns),
                     format_duration(r.p90_ns), format_duration(r.p99_ns), format_duration(r.max_ns),
                     format_duration(r.stddev_ns)});
    names.push_back(r.name);
  }
  return detail::aligned_table({"calls", "total", "self", "min", "mean", "p50", "p90", "p99", "max", "stddev"}, cells,
                               names);
}

std::string format_report(const Profile& profile, const Options& options) {
  const ReadSummary& src = profile.source;
  std::string out = src.path.empty() ? std::string("trace") : src.path;
  out += ": pid " + std::to_string(src.header.pid);
  if (const std::string at = recorded_at(src.header.start_realtime_ns); !at.empty()) out += ", recorded " + at;
  out += ", " + plural(profile.threads.size(), "thread", "threads");
  out += ", " + plural(profile.events, "event", "events") + " over " + format_duration(profile.duration_ns());
  out += ", " + lost_text(profile.lost) + "\n";
  if (const CallFilter& f = profile.filter; f.active()) {
    std::string what = "only calls";
    if (f.since_ns != 0 || f.until_ns != ~std::uint64_t{0}) {
      what += " starting from " + format_duration(f.since_ns) + " to " +
              (f.until_ns == ~std::uint64_t{0} ? std::string("the end") : format_duration(f.until_ns));
    }
    if (f.min_duration_ns != 0) what += " lasting at least " + format_duration(f.min_duration_ns);
    if (!f.tids.empty()) {
      what += f.tids.size() == 1 ? " of thread" : " of threads";
      for (std::size_t i = 0; i < f.tids.size(); ++i) what += (i ? ", " : " ") + std::to_string(f.tids[i]);
    }
    out += "filtered: " + what + "\n";
  }

  if (options.per_thread) {
    for (const ThreadProfile& t : profile.threads) {
      out += "\nthread " + detail::thread_label(t) + ": " + plural(t.events, "event", "events") + " over " +
             format_duration(t.last_ns - t.first_ns) + ", " + lost_text(t.lost) + "\n";
      append_table(out, profile, &t, options);
    }
  } else {
    out += "\n";
    append_table(out, profile, nullptr, options);
  }

  // Footnotes: whatever makes the numbers above less than exact.
  std::uint64_t open = 0, unmatched = 0, unwound = 0, truncated = 0;
  std::string lossy_tids;
  std::size_t lossy_threads = 0;
  for (const ThreadProfile& t : profile.threads) {
    open += t.open_at_end;
    unmatched += t.unmatched_exits;
    unwound += t.unwound;
    truncated += t.truncated;
    if (t.lost == 0) continue;
    lossy_tids += (lossy_threads++ == 0 ? "" : ", ") + std::to_string(t.tid);
  }
  std::string notes;
  if (src.truncated)
    notes += "note: the trace was cut short; this report covers the " + plural(profile.events, "event", "events") +
             " before byte " + std::to_string(src.complete_bytes) + " of " + std::to_string(src.file_bytes) + ".\n";
  if (profile.lost > 0)
    notes += "note: " + lost_text(profile.lost) +
             (lossy_threads == 0 ? "" : (lossy_threads == 1 ? " in thread " : " in threads ") + lossy_tids) +
             ": calls around the gaps are missing or mismatched; record fewer functions or with bigger rings.\n";
  if (open > 0)
    notes += "note: " + plural(open, "frame was", "frames were") +
             " still open when the trace ended; they are closed at their thread's last timestamp.\n";
  if (unmatched > 0)
    notes += "note: " + plural(unmatched, "exit had", "exits had") +
             " no matching entry (tracing began while the function was running, or its entry was lost); ignored.\n";
  if (unwound > 0)
    notes += "note: " + plural(unwound, "frame was", "frames were") +
             " left by unwinding (exception, longjmp or thread exit) rather than by returning.\n";
  if (truncated > 0)
    notes += "note: " + plural(truncated, "frame was", "frames were") + " deeper than " +
             std::to_string(options.max_depth) +
             ": the folded stacks and the flame graph show them as one '[truncated]' frame (--max-depth sets the "
             "depth).\n";
  if (profile.unknown_kind_events > 0)
    notes += "note: " +
             plural(profile.unknown_kind_events, "event of an unknown kind was", "events of an unknown kind were") +
             " ignored (written by a newer tramway?).\n";
  if (!notes.empty()) out += "\n" + notes;
  return out;
}

}  // namespace tramway::trace::report
