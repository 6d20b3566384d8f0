// Report-time filters (call_filter.h): a time window, a minimum duration, threads; and
// parse_duration, which reads the command line's durations.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "trace/report/report.h"
#include "trace_writer.h"

namespace {

using namespace tramway::trace::report;
using report_test::enter;
using report_test::leave;
using report_test::TraceWriter;
using report_test::unwind;

constexpr std::uint64_t kOuter = 0x401000, kShort = 0x401100, kLong = 0x401200, kLate = 0x401300;

// Thread 1: outer [10, 200] calls short [20, 22], long [30, 130] (which calls short [40, 41]),
// short [150, 151]; then late [300, 400] calls long [310, 390] and, unwound with late at 400,
// short [395, -]. Thread 2: long [5, 105].
std::string scenario() {
  TraceWriter w;
  w.functions({{kOuter, "outer"}, {kShort, "short"}, {kLong, "long"}, {kLate, "late"}});
  w.thread(1, "one");
  w.thread(2, "two");
  w.events(1, {enter(10, kOuter), enter(20, kShort), leave(22, kShort), enter(30, kLong), enter(40, kShort),
               leave(41, kShort), leave(130, kLong), enter(150, kShort), leave(151, kShort), leave(200, kOuter)});
  w.events(2, {enter(5, kLong), leave(105, kLong)});
  w.events(1, {enter(300, kLate), enter(310, kLong), leave(390, kLong), enter(395, kShort), unwind(400, kLate)});
  w.end();
  return w.save("t.trace");
}

std::map<std::string, Row> rows(const CallFilter& filter) {
  BuildOptions build;
  build.filter = filter;
  auto p = load_profile(scenario(), ReadOptions{false, nullptr}, build);
  EXPECT_TRUE(p.ok()) << p.status().message();
  std::map<std::string, Row> out;
  if (!p.ok()) return out;
  for (Row& r : table_rows(*p, nullptr, SortKey::name, 0)) out[r.name] = r;
  for (const ThreadProfile& t : p->threads) EXPECT_EQ(t.unmatched_exits, 0u) << "thread " << t.tid;
  return out;
}

TEST(CallFilter, AMinimumDurationKeepsLongCallsAndTheirTimeGoesToTheirCallersSelf) {
  CallFilter f;
  f.min_duration_ns = 50;
  const auto r = rows(f);
  EXPECT_EQ(r.count("short"), 0u);
  ASSERT_EQ(r.count("outer"), 1u);
  EXPECT_EQ(r.at("outer").total_ns, 190u);
  EXPECT_EQ(r.at("outer").self_ns, 90u);  // 190 minus long's 100: the short calls count as outer's own
  ASSERT_EQ(r.count("long"), 1u);
  EXPECT_EQ(r.at("long").calls, 3u);  // [30,130], [310,390] and thread 2's [5,105]
  EXPECT_EQ(r.at("long").self_ns, 280u);
  ASSERT_EQ(r.count("late"), 1u);
  EXPECT_EQ(r.at("late").total_ns, 100u);
}

TEST(CallFilter, AWindowKeepsCallsThatStartInItAndEndsThoseStillRunning) {
  CallFilter f;
  f.since_ns = 25;
  f.until_ns = 320;
  const auto r = rows(f);
  EXPECT_EQ(r.count("outer"), 0u);  // started at 10, before the window
  ASSERT_EQ(r.count("long"), 1u);
  EXPECT_EQ(r.at("long").calls, 2u);  // [30,130] and [310, 320): cut at the window's end
  EXPECT_EQ(r.at("long").total_ns, 100u + 10u);
  ASSERT_EQ(r.count("short"), 1u);
  EXPECT_EQ(r.at("short").calls, 2u);  // [40,41] and [150,151]; [20,22] started before
  ASSERT_EQ(r.count("late"), 1u);
  EXPECT_EQ(r.at("late").total_ns, 20u);  // [300, 320)
  EXPECT_EQ(r.at("late").self_ns, 10u);
}

TEST(CallFilter, ThreadsAndEverythingTogether) {
  CallFilter f;
  f.tids = {2};
  auto r = rows(f);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r.at("long").calls, 1u);
  f.tids = {1};
  f.since_ns = 300;
  f.min_duration_ns = 5;
  r = rows(f);
  EXPECT_EQ(r.count("outer"), 0u);
  EXPECT_EQ(r.at("late").calls, 1u);
  EXPECT_EQ(r.at("long").calls, 1u);
  EXPECT_EQ(r.at("short").calls, 1u);  // [395, 400], unwound with late
}

TEST(CallFilter, ThePerfettoOutputKeepsTheSameCalls) {
  CallFilter f;
  f.min_duration_ns = 50;
  BuildOptions build;
  build.filter = f;
  auto p = load_profile(scenario(), ReadOptions{false, nullptr}, build);
  ASSERT_TRUE(p.ok());
  std::FILE* out = std::tmpfile();
  ASSERT_TRUE(write_perfetto(*p, out).ok());
  const long filtered = std::ftell(out);
  std::fclose(out);
  auto all = load_profile(scenario(), ReadOptions{false, nullptr});
  ASSERT_TRUE(all.ok());
  out = std::tmpfile();
  ASSERT_TRUE(write_perfetto(*all, out).ok());
  const long unfiltered = std::ftell(out);
  std::fclose(out);
  EXPECT_LT(filtered, unfiltered);  // five calls of eleven: the decoding tests check the contents
  const std::string report = format_report(*p, Options{});
  EXPECT_NE(report.find("filtered: only calls lasting at least 50 ns"), std::string::npos) << report;
}

TEST(ParseDuration, UnitsAndErrors) {
  EXPECT_EQ(*parse_duration("250ns"), 250u);
  EXPECT_EQ(*parse_duration("10us"), 10'000u);
  EXPECT_EQ(*parse_duration("10µs"), 10'000u);
  EXPECT_EQ(*parse_duration("1.5ms"), 1'500'000u);
  EXPECT_EQ(*parse_duration("2s"), 2'000'000'000u);
  EXPECT_EQ(*parse_duration("0.25"), 250'000'000u);  // seconds
  for (const char* bad : {"", "ms", "-1s", "10 parsecs", "1e30s", "nan"}) {
    auto r = parse_duration(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find("ns, us, ms or s"), std::string::npos) << r.status().message();
  }
}

}  // namespace
