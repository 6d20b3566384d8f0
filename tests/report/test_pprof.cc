// `tramway report --pprof`: the profile read back by `go tool pprof` (scripts/install-deps
// installs golang-go), which must show every function with the self (flat) and inclusive
// (cum) wall time and the calls the table shows, and every thread as a tag.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <regex>
#include <sstream>
#include <string>

#include "trace/report/report.h"
#include "trace_writer.h"

namespace {

using namespace tramway::trace::report;
using report_test::enter;
using report_test::leave;
using report_test::TraceWriter;

constexpr std::uint64_t kMain = 0x401000, kParse = 0x401100, kPush = 0x401200, kWeird = 0x401300,
                        kNameless = 0x401400;

std::string run(const std::string& command) {
  std::FILE* p = popen((command + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  for (std::size_t n; p && (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  EXPECT_EQ(p ? pclose(p) : -1, 0) << command << ":\n" << out;
  return out;
}

struct Figures {
  double flat = -1, cum = -1;
};
// `pprof -top` lines: flat flat% sum% cum cum% name.
std::map<std::string, Figures> top(const std::string& text) {
  std::map<std::string, Figures> out;
  const std::regex line(R"(^\s*([\d.]+)(?:ns)?\s+[\d.]+%\s+[\d.]+%\s+([\d.]+)(?:ns)?\s+[\d.]+%\s+(.+)$)");
  std::istringstream lines(text);
  for (std::string l; std::getline(lines, l);) {
    std::smatch m;
    if (std::regex_match(l, m, line)) out[m[3]] = {std::stod(m[1]), std::stod(m[2])};
  }
  return out;
}

// main (100): main_loop [0,100] calls parse [10,30] and push_back [40,90], which calls parse
// [50,60]. worker (200): weird [5,35] calls an unnamed function [15,25]; then parse [40,45].
TEST(Pprof, GoToolPprofShowsTheTablesTimesCallsAndThreads) {
  TraceWriter w;
  w.functions({{kMain, "main_loop"}, {kParse, "parse"}, {kPush, "push_back"}, {kWeird, "weird"}});
  w.thread(100, "main");
  w.thread(200, "worker");
  w.events(100, {enter(0, kMain), enter(10, kParse), leave(30, kParse), enter(40, kPush), enter(50, kParse),
                 leave(60, kParse), leave(90, kPush), leave(100, kMain)});
  w.events(200, {enter(5, kWeird), enter(15, kNameless), leave(25, kNameless), leave(35, kWeird), enter(40, kParse),
                 leave(45, kParse)});
  w.end();
  const std::string trace = w.save("t.trace");
  auto profile = load_profile(trace, ReadOptions{false, nullptr});
  ASSERT_TRUE(profile.ok()) << profile.status().message();
  const std::string out = ::testing::TempDir() + "tramway_pprof_" + std::to_string(getpid()) + ".pb.gz";
  std::FILE* f = std::fopen(out.c_str(), "w");
  ASSERT_NE(f, nullptr);
  ASSERT_TRUE(write_pprof(*profile, f).ok());
  ASSERT_EQ(std::fclose(f), 0);

  const std::string pprof = std::string(TRAMWAY_GO) + " tool pprof -nodefraction=0 -nodecount=1000 ";
  const std::string wall = run(pprof + "-top -unit=ns " + out);
  EXPECT_NE(wall.find("Type: wall"), std::string::npos) << wall;  // the default sample type
  const auto t = top(wall);
  const std::map<std::string, Figures> expected_wall = {
      {"main_loop", {30, 100}}, {"parse", {35, 35}}, {"push_back", {40, 50}}, {"weird", {20, 30}}, {"0x401400", {10, 10}}};
  for (const auto& [name, want] : expected_wall) {
    ASSERT_EQ(t.count(name), 1u) << name << " not in:\n" << wall;
    EXPECT_EQ(t.at(name).flat, want.flat) << name << "\n" << wall;
    EXPECT_EQ(t.at(name).cum, want.cum) << name << "\n" << wall;
  }
  const auto calls = top(run(pprof + "-top -sample_index=calls " + out));
  ASSERT_EQ(calls.count("parse"), 1u);
  EXPECT_EQ(calls.at("parse").flat, 3);
  EXPECT_EQ(calls.at("main_loop").flat, 1);
  const std::string tags = run(pprof + "-tags " + out);
  EXPECT_NE(tags.find("100 (main)"), std::string::npos) << tags;
  EXPECT_NE(tags.find("200 (worker)"), std::string::npos) << tags;
  std::remove(trace.c_str());
  std::remove(out.c_str());
}

}  // namespace
