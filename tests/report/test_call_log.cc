// `report --calls` (the call log) and `report --diff` on synthetic traces.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "trace/report/report.h"
#include "trace_writer.h"

namespace {

using namespace tramway::trace::report;
using report_test::enter;
using report_test::leave;
using report_test::TraceWriter;
using report_test::unwind;

constexpr std::uint64_t kMain = 0x401000, kParse = 0x401100, kPush = 0x401200;

std::string call_log(const std::string& trace, const CallFilter& filter = {}) {
  BuildOptions build;
  build.filter = filter;
  auto p = load_profile(trace, ReadOptions{false, nullptr}, build);
  EXPECT_TRUE(p.ok()) << p.status().message();
  if (!p.ok()) return {};
  std::FILE* f = std::tmpfile();
  EXPECT_TRUE(write_call_log(*p, f).ok());
  std::string out(static_cast<std::size_t>(std::ftell(f)), '\0');
  std::rewind(f);
  EXPECT_EQ(std::fread(out.data(), 1, out.size(), f), out.size());
  std::fclose(f);
  return out;
}

// main (1): main_loop [0, 1500] calls parse [10, 30] and push_back [40, 1040], which calls parse
// [50, 60]; then parse [1100, -] is left by unwinding main_loop at 1500. worker (2): 4 events
// lost, then push_back [5, -], still running at the end (its thread's last event, 9).
TEST(CallLog, IndentsCallsWithTheirDurationsThreadByThread) {
  TraceWriter w;
  w.functions({{kMain, "main_loop"}, {kParse, "parse"}, {kPush, "push_back"}});
  w.thread(1, "main");
  w.thread(2, "worker");
  w.events(1, {enter(0, kMain), enter(10, kParse), leave(30, kParse), enter(40, kPush), enter(50, kParse),
               leave(60, kParse), leave(1040, kPush)});
  w.lost(2, 4);
  w.events(2, {enter(5, kPush), enter(7, kParse), leave(9, kParse)});
  w.events(1, {enter(1100, kParse), unwind(1500, kMain)});
  w.end();
  const std::string log = call_log(w.save("t.trace"));
  EXPECT_EQ(log,
            "# thread 1 (main)\n"
            "  DURATION  FUNCTION\n"
            "            main_loop {\n"
            "     20 ns    parse\n"
            "              push_back {\n"
            "     10 ns      parse\n"
            "   1.00 µs    } push_back\n"
            "\n"
            "# thread 2 (worker)\n"
            "  DURATION  FUNCTION\n"
            "            [4 events lost here]\n"
            "            push_back {\n"
            "      2 ns    parse\n"
            "\n"
            "# thread 1 (main)\n"
            "  DURATION  FUNCTION\n"
            "    400 ns    parse (unwound)\n"
            "   1.50 µs  } main_loop (unwound)\n"
            "\n"
            "# thread 2 (worker)\n"
            "  DURATION  FUNCTION\n"
            "      4 ns  } push_back (still running when the trace ended)\n")
      << log;

  CallFilter only_main;
  only_main.tids = {1};
  only_main.min_duration_ns = 15;
  const std::string filtered = call_log(w.save("t.trace"), only_main);
  EXPECT_EQ(filtered.find("worker"), std::string::npos) << filtered;
  EXPECT_EQ(filtered.find("10 ns"), std::string::npos) << filtered;  // shorter than 15 ns
  EXPECT_NE(filtered.find("     20 ns    parse\n"), std::string::npos) << filtered;
}

TEST(Diff, ShowsEachFunctionsChangeLargestFirst) {
  TraceWriter a;
  a.functions({{kMain, "main_loop"}, {kParse, "parse"}});
  a.events(1, {enter(0, kMain), enter(10, kParse), leave(20, kParse), leave(100, kMain)});
  a.end();
  TraceWriter b;
  b.functions({{kMain, "main_loop"}, {kParse, "parse"}, {kPush, "push_back"}});
  b.events(1, {enter(0, kMain), enter(10, kParse), leave(20, kParse), enter(30, kParse), leave(50, kParse),
               enter(60, kPush), leave(70, kPush), leave(1000, kMain)});
  b.end();
  auto before = load_profile(a.save("a.trace"), ReadOptions{false, nullptr});
  auto after = load_profile(b.save("b.trace"), ReadOptions{false, nullptr});
  ASSERT_TRUE(before.ok() && after.ok());
  const std::string d = format_diff(*before, *after, 0);
  const auto line_of = [&](const std::string& name) {
    const std::size_t end = d.find("  " + name + "\n");
    EXPECT_NE(end, std::string::npos) << name << " not in:\n" << d;
    return end == std::string::npos ? std::string() : d.substr(d.rfind('\n', end) + 1, end - d.rfind('\n', end) - 1);
  };
  EXPECT_NE(line_of("main_loop").find("+900 ns  +900.0%"), std::string::npos) << d;
  EXPECT_NE(line_of("parse").find("2      +1"), std::string::npos) << d;
  EXPECT_NE(line_of("push_back").find("new"), std::string::npos) << d;
  EXPECT_LT(d.find("main_loop"), d.find("  parse"));  // the largest change of total first
  EXPECT_NE(format_diff(*before, *after, 1).find("(1 of 3 functions shown"), std::string::npos);
}

}  // namespace
