// Tests of the trace reader and `tramway report`'s outputs on synthetic trace files: what the
// table counts, how stacks are rebuilt (nesting, unwinding, frames open at the end, exits
// without entries), damaged files, and that the Chrome JSON, folded stacks and SVG are what
// their consumers accept (JSON and XML checked by python3's own parsers).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <sstream>

#include "trace/report/internal.h"
#include "trace/report/report.h"
#include "trace_writer.h"

namespace {

using namespace tramway::trace::report;
using tramway::Result;
using report_test::enter;
using report_test::leave;
using report_test::TraceWriter;
using report_test::unwind;

constexpr std::uint64_t kMain = 0x401000, kParse = 0x401100, kPush = 0x401200, kWeird = 0x401300,
                        kNameless = 0x401400;
const std::string kWeirdName = "weird<\"name\">;with\\back & 'quotes' \xff";

// Two threads. main: main_loop [0,100] calls parse [10,30] and push_back [40,90], which calls
// parse [50,60]. worker-1: weird [5,35] calls an unnamed function [15,25]; then parse [40,45].
TraceWriter scenario() {
  TraceWriter w;
  w.functions({{kMain, "main_loop"}, {kParse, "parse(std::string const&)"},
               {kPush, "std::vector<int>::push_back(int&&)"}, {kWeird, kWeirdName}});
  w.thread(100, "main");
  w.thread(200, "worker-1");
  w.events(100, {enter(0, kMain), enter(10, kParse), leave(30, kParse), enter(40, kPush)});
  w.events(200, {enter(5, kWeird), enter(15, kNameless), leave(25, kNameless), leave(35, kWeird)});
  w.events(100, {enter(50, kParse), leave(60, kParse), leave(90, kPush), leave(100, kMain)});
  w.events(200, {enter(40, kParse), leave(45, kParse)});
  w.end();
  return w;
}

Profile load(const std::string& path, BuildOptions build = {}, std::string* diagnostics = nullptr) {
  ReadOptions read;
  std::FILE* diag = std::tmpfile();
  read.diagnostics = diag;
  Result<Profile> p = load_profile(path, read, build);
  if (diagnostics) {
    std::rewind(diag);
    char buf[4096];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, diag)) > 0) diagnostics->append(buf, n);
  }
  std::fclose(diag);
  EXPECT_TRUE(p.ok()) << p.status().message();
  return p.ok() ? std::move(*p) : Profile{};
}

std::map<std::string, Row> rows_by_name(const Profile& p, const ThreadProfile* thread = nullptr) {
  std::map<std::string, Row> out;
  for (Row& r : table_rows(p, thread, SortKey::name, 0)) out[r.name] = r;
  return out;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Writes the profile through `write` into a string.
template <class Write>
std::string render(Write write) {
  std::FILE* f = std::tmpfile();
  const tramway::Status st = write(f);
  EXPECT_TRUE(st.ok()) << st.message();
  std::string out;
  std::rewind(f);
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  std::fclose(f);
  return out;
}

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "tramway_report_" +
         ::testing::UnitTest::GetInstance()->current_test_info()->name() + "_" + std::to_string(getpid()) + "_" +
         name;
}

// Runs a python3 script on `file`; returns its stdout, or nullopt-like "<failed>" on failure.
std::string python(const std::string& script, const std::string& file, int* status) {
  const std::string script_path = temp_path("check.py");
  std::ofstream(script_path) << script;
  const std::string command = std::string(TRAMWAY_PYTHON3) + " " + script_path + " " + file + " 2>&1";
  std::FILE* p = popen(command.c_str(), "r");
  std::string out;
  char buf[4096];
  std::size_t n;
  while (p && (n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  *status = p ? pclose(p) : -1;
  return out;
}

bool have_python() { return std::string(TRAMWAY_PYTHON3).size() > 0; }

TEST(Report, CountsCallsPerFunctionName) {
  const Profile p = load(scenario().save("t.trace"));
  EXPECT_EQ(p.events, 14u);
  EXPECT_EQ(p.threads.size(), 2u);
  EXPECT_EQ(p.lost, 0u);
  EXPECT_TRUE(p.source.closed_cleanly);
  EXPECT_FALSE(p.source.truncated);
  EXPECT_TRUE(p.source.warnings.empty());
  auto rows = rows_by_name(p);
  ASSERT_EQ(rows.size(), 5u);
  EXPECT_EQ(rows["main_loop"].calls, 1u);
  EXPECT_EQ(rows["parse(std::string const&)"].calls, 3u);  // across both threads
  EXPECT_EQ(rows["std::vector<int>::push_back(int&&)"].calls, 1u);
  EXPECT_EQ(rows[kWeirdName].calls, 1u);
  EXPECT_EQ(rows["0x401400"].calls, 1u);  // no name in the functions chunk

  const ThreadProfile& worker = p.threads[1];
  EXPECT_EQ(worker.tid, 200u);
  EXPECT_EQ(worker.name, "worker-1");
  auto worker_rows = rows_by_name(p, &worker);
  EXPECT_EQ(worker_rows["parse(std::string const&)"].calls, 1u);
  EXPECT_EQ(worker_rows.count("main_loop"), 0u);
}

TEST(Report, NestedDurationsAddUp) {
  const Profile p = load(scenario().save("t.trace"));
  auto rows = rows_by_name(p);
  const Row& main = rows["main_loop"];
  const Row& parse = rows["parse(std::string const&)"];
  const Row& push = rows["std::vector<int>::push_back(int&&)"];
  EXPECT_EQ(main.total_ns, 100u);
  EXPECT_EQ(main.self_ns, 100u - 20 - 50);
  EXPECT_EQ(push.total_ns, 50u);
  EXPECT_EQ(push.self_ns, 40u);
  EXPECT_EQ(parse.total_ns, 20u + 10 + 5);
  EXPECT_EQ(parse.self_ns, parse.total_ns);
  EXPECT_EQ(rows[kWeirdName].self_ns, 20u);

  // In every thread's tree: parent total >= sum of children, self = total - children.
  std::uint64_t self_sum = 0, root_sum = 0;
  for (const ThreadProfile& t : p.threads) {
    for (std::size_t i = 1; i < t.tree.size(); ++i) {
      const CallNode& n = t.tree[i];
      std::uint64_t children = 0;
      for (std::uint32_t c : n.children) children += t.tree[c].total_ns;
      EXPECT_GE(n.total_ns, children);
      EXPECT_EQ(n.self_ns, n.total_ns - children);
      self_sum += n.self_ns;
    }
    for (std::uint32_t c : t.tree[0].children) root_sum += t.tree[c].total_ns;
  }
  EXPECT_EQ(self_sum, root_sum);
  EXPECT_EQ(root_sum, 100u + 30 + 5);
  EXPECT_EQ(p.duration_ns(), 100u);
}

TEST(Report, TheDistributionOfAKnownSetOfCalls) {
  // 1000 calls lasting 1..1000 ns, shuffled: nearest-rank p50 500, p90 900, p99 990 (within the
  // histogram's stated error), mean 500 (500.5 floored), stddev 289, min and max exact.
  std::vector<std::uint64_t> durations(1000);
  std::iota(durations.begin(), durations.end(), 1);
  std::shuffle(durations.begin(), durations.end(), std::mt19937(7));
  std::vector<tramway::trace::format::Event> events;
  std::uint64_t t = 0;
  for (std::uint64_t d : durations) {
    events.push_back(enter(t, kParse));
    events.push_back(leave(t + d, kParse));
    t += d + 1;
  }
  TraceWriter w;
  w.events(1, events).end();
  const Profile p = load(w.save("t.trace"));
  const auto rows = table_rows(p, nullptr, SortKey::total, 0);
  ASSERT_EQ(rows.size(), 1u);
  const double err = tramway::trace::report::DurationHistogram::kMaxRelativeError;
  EXPECT_EQ(rows[0].calls, 1000u);
  EXPECT_EQ(rows[0].min_ns, 1u);
  EXPECT_NEAR(static_cast<double>(rows[0].p50_ns), 500, 500 * err);
  EXPECT_NEAR(static_cast<double>(rows[0].p90_ns), 900, 900 * err);
  EXPECT_NEAR(static_cast<double>(rows[0].p99_ns), 990, 990 * err);
  EXPECT_EQ(rows[0].max_ns, 1000u);
  EXPECT_EQ(rows[0].mean_ns, 500u);
  EXPECT_EQ(rows[0].stddev_ns, 289u);
  EXPECT_EQ(rows[0].total_ns, 500500u);

  const std::string table = format_table(rows);
  for (const char* head : {"calls", "total", "self", "min", "mean", "p50", "p90", "p99", "max", "stddev", "function"})
    EXPECT_NE(table.substr(0, table.find('\n')).find(head), std::string::npos) << head << " in " << table;
  EXPECT_NE(table.find("1.00 µs"), std::string::npos) << table;  // the max

  // --histogram: 1..1000 ns over [1 ns, 2 ns) .. [512 ns, 1.02 µs), 2^k calls in each but the last
  // (489: 512..1000); the bar of the fullest is the longest.
  const std::string h = format_histograms(p, {"0x4011*", "nothing*"});  // no functions chunk: named by address
  EXPECT_NE(h.find("0x401100: 1000 calls, min 1 ns"), std::string::npos) << h;
  EXPECT_NE(h.find("[1 ns, 2 ns)"), std::string::npos) << h;
  EXPECT_NE(h.find("[256 ns, 512 ns)"), std::string::npos) << h;
  EXPECT_NE(h.find("489 |" + std::string(52, '@') + "|"), std::string::npos) << h;
  EXPECT_NE(h.find("256 |"), std::string::npos) << h;
  EXPECT_NE(h.find("--histogram 'nothing*': no function with completed calls matches it"), std::string::npos) << h;
}

TEST(Report, TruncatedFileReportsTheCompletePartAndWarns) {
  TraceWriter w;
  w.functions({{kMain, "main_loop"}, {kParse, "parse"}});
  w.events(1, {enter(0, kMain), enter(10, kParse), leave(20, kParse)});
  const std::size_t complete = w.bytes().size();
  w.events(1, {enter(30, kParse), leave(40, kParse), leave(50, kMain)});
  w.end();
  // Cut inside the second events chunk: its payload runs past the end of the file.
  const std::size_t cut = complete + 8 + 8 + 16 + 4;
  w.bytes().resize(cut);
  std::string diagnostics;
  const Profile p = load(w.save("t.trace"), {}, &diagnostics);
  EXPECT_TRUE(p.source.truncated);
  EXPECT_FALSE(p.source.closed_cleanly);
  EXPECT_EQ(p.events, 3u);
  EXPECT_EQ(p.source.complete_bytes, complete);
  ASSERT_EQ(p.source.warnings.size(), 1u);
  const std::string& warning = p.source.warnings[0];
  EXPECT_NE(warning.find("is truncated (the recording was cut short)"), std::string::npos) << warning;
  EXPECT_NE(warning.find("reporting the 3 events before byte " + std::to_string(complete)), std::string::npos)
      << warning;
  EXPECT_NE(warning.find("ignoring the last " + std::to_string(cut - complete) + " bytes"), std::string::npos)
      << warning;
  EXPECT_NE(diagnostics.find("warning: " + warning), std::string::npos) << diagnostics;

  // main_loop never returned in the part that was read: closed at the last timestamp.
  auto rows = rows_by_name(p);
  EXPECT_EQ(rows["parse"].calls, 1u);
  EXPECT_EQ(rows["main_loop"].total_ns, 20u);
  EXPECT_EQ(p.threads[0].open_at_end, 1u);
  const std::string report = format_report(p, Options{});
  EXPECT_NE(report.find("trace was cut short"), std::string::npos) << report;
  EXPECT_NE(report.find("1 frame was still open"), std::string::npos) << report;
}

TEST(Report, FileWithoutEndChunkWarns) {
  TraceWriter w;
  w.events(1, {enter(0, kMain), leave(10, kMain)});
  std::string diagnostics;
  const Profile p = load(w.save("t.trace"), {}, &diagnostics);
  EXPECT_TRUE(p.source.truncated);
  EXPECT_EQ(p.events, 2u);
  EXPECT_NE(diagnostics.find("has no end chunk (the recording was cut short)"), std::string::npos) << diagnostics;

  // Cut inside a chunk header.
  w.bytes().append("\x02\x00\x00", 3);
  const Profile q = load(w.save("t2.trace"), {}, &diagnostics);
  EXPECT_EQ(q.events, 2u);
  ASSERT_EQ(q.source.warnings.size(), 1u);
  EXPECT_NE(q.source.warnings[0].find("ignoring the last 3 bytes"), std::string::npos) << q.source.warnings[0];
}

TEST(Report, WrongMagicVersionAndMissingFileAreErrors) {
  ReadOptions quiet;
  quiet.diagnostics = nullptr;
  TraceWriter bad_magic;
  bad_magic.bytes()[0] = 'X';
  Result<Profile> r = load_profile(bad_magic.save("magic.trace"), quiet);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not a tramway trace file"), std::string::npos) << r.status().message();

  TraceWriter v2;
  v2.header().version = 2;
  v2.end();
  r = load_profile(v2.save("v2.trace"), quiet);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(
                "trace file version 2, this tramway reads version 1: re-record it or use the matching tramway"),
            std::string::npos)
      << r.status().message();

  TraceWriter small;
  small.header().header_size = 32;
  r = load_profile(small.save("small.trace"), quiet);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("header_size"), std::string::npos) << r.status().message();

  TraceWriter cut;
  cut.bytes().resize(40);
  r = load_profile(cut.save("cut.trace"), quiet);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("cut short inside its header"), std::string::npos) << r.status().message();

  std::ofstream(temp_path("empty.trace")).flush();
  r = load_profile(temp_path("empty.trace"), quiet);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not a tramway trace file"), std::string::npos) << r.status().message();

  r = load_profile(temp_path("does-not-exist.trace"), quiet);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("cannot open trace file"), std::string::npos) << r.status().message();

  Options options;
  options.input = v2.save("v2.trace");
  std::FILE* out = std::tmpfile();
  const tramway::Status st = run(options, out);
  std::fclose(out);
  EXPECT_FALSE(st.ok());
}

// Opening a FIFO for reading waits for a writer: the reader must refuse it without opening
// it that way. Checked in a child with an alarm, so that a regression fails instead of hanging.
TEST(Report, AFifoOrADirectoryIsRefusedWithoutBlocking) {
  const std::string fifo = temp_path("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const std::string& path : {fifo, ::testing::TempDir()}) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::alarm(10);
      ReadOptions read;
      read.diagnostics = nullptr;
      const Result<Profile> r = load_profile(path, read);
      const bool named = !r.ok() && r.status().message().find(" is a ") != std::string::npos &&
                         r.status().message().find("not a regular file") != std::string::npos;
      if (!named) std::fprintf(stderr, "%s\n", r.ok() ? "read" : r.status().message().c_str());
      ::_exit(named ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_FALSE(WIFSIGNALED(status)) << path << ": killed by signal " << WTERMSIG(status) << " (blocked in open?)";
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << path;
  }
  std::remove(fifo.c_str());
}

TEST(Report, LostEventsAreCountedAndShown) {
  TraceWriter w;
  w.thread(5, "ring-owner");
  w.events(5, {enter(0, kMain), leave(10, kMain)});
  w.lost(5, 7);
  w.lost(6, 3);
  w.lost(5, 2);
  w.end();
  const Profile p = load(w.save("t.trace"));
  EXPECT_EQ(p.lost, 12u);
  ASSERT_EQ(p.threads.size(), 2u);
  EXPECT_EQ(p.threads[0].lost, 9u);
  EXPECT_EQ(p.threads[1].lost, 3u);
  const std::string report = format_report(p, Options{});
  EXPECT_NE(report.find("12 events lost (rings full)"), std::string::npos) << report;
  EXPECT_NE(report.find("in threads 5, 6"), std::string::npos) << report;

  Options per_thread;
  per_thread.per_thread = true;
  const std::string by_thread = format_report(p, per_thread);
  EXPECT_NE(by_thread.find("thread 5 (ring-owner): 2 events over 10 ns, 9 events lost (rings full)"),
            std::string::npos)
      << by_thread;
  EXPECT_NE(by_thread.find("thread 6: 0 events"), std::string::npos) << by_thread;
}

TEST(Report, UnwoundUnmatchedAndOpenFrames) {
  TraceWriter w;
  w.events(1, {
                  leave(0, kNameless),                     // attached inside a live frame: no entry
                  enter(10, kMain), enter(20, kParse), enter(30, kPush),
                  leave(50, kMain),                        // parse and push_back were skipped
                  enter(60, kWeird), unwind(70, kWeird),   // left by an exception
                  enter(80, kMain), enter(85, kParse),     // still open when the trace ends
                  leave(90, kPush),                        // no open frame of push_back: ignored
                  leave(95, kNameless),
              });
  w.end();
  const Profile p = load(w.save("t.trace"), BuildOptions{true});
  const ThreadProfile& t = p.threads.at(0);
  EXPECT_EQ(t.unmatched_exits, 3u);
  EXPECT_EQ(t.unwound, 3u);  // parse, push_back, weird
  EXPECT_EQ(t.open_at_end, 2u);
  auto rows = rows_by_name(p);  // no functions chunk: named by address
  EXPECT_EQ(rows["0x401000"].calls, 2u);
  EXPECT_EQ(rows["0x401000"].total_ns, 40u + 15);  // [10,50] and [80,95]
  EXPECT_EQ(rows["0x401100"].total_ns, 30u + 10);   // [20,50] and [85,95]
  EXPECT_EQ(rows["0x401200"].total_ns, 20u);        // [30,50]
  EXPECT_EQ(rows["0x401300"].total_ns, 10u);
  EXPECT_EQ(rows.count("0x401400"), 0u);
  // Calls record how they ended, sorted by start (parents first).
  ASSERT_EQ(t.calls.size(), 6u);
  EXPECT_EQ(t.calls[0].end, CallEnd::returned);
  EXPECT_EQ(t.calls[1].end, CallEnd::unwound);
  EXPECT_EQ(t.calls[2].depth, 2u);
  EXPECT_EQ(t.calls[5].end, CallEnd::open);

  const std::string report = format_report(p, Options{});
  EXPECT_NE(report.find("3 exits had no matching entry"), std::string::npos) << report;
  EXPECT_NE(report.find("3 frames were left by unwinding"), std::string::npos) << report;
  EXPECT_NE(report.find("2 frames were still open"), std::string::npos) << report;
}

TEST(Report, UnknownChunksAreSkippedAndLateNamesApply) {
  TraceWriter w;
  w.chunk(static_cast<tramway::trace::format::ChunkType>(99), std::string(13, '\x7f'));
  w.events(1, {enter(0, kMain), leave(10, kMain)});
  w.chunk(static_cast<tramway::trace::format::ChunkType>(0), "");
  w.functions({{kMain, "named_later"}});  // names can follow the events that use them
  w.end();
  const Profile p = load(w.save("t.trace"));
  EXPECT_TRUE(p.source.warnings.empty());
  EXPECT_EQ(p.events, 2u);
  EXPECT_EQ(rows_by_name(p)["named_later"].calls, 1u);
}

TEST(Report, LargerHeaderAndUnknownEventKinds) {
  TraceWriter w;
  w.header().header_size = 80;  // a newer header: the reader skips to header_size
  w.bytes().append(16, '\xee');
  w.events(1, {enter(0, kMain), {5, tramway::trace::format::Event::make_word(kMain, {}) | (std::uint64_t{7} << 56)},
               leave(10, kMain)});
  w.end();
  const Profile p = load(w.save("t.trace"));
  EXPECT_EQ(p.events, 3u);
  EXPECT_EQ(p.unknown_kind_events, 1u);
  EXPECT_EQ(rows_by_name(p)["0x401000"].total_ns, 10u);
  EXPECT_NE(format_report(p, Options{}).find("1 event of an unknown kind was ignored"), std::string::npos);
}

TEST(Report, DamagedChunksAreSkippedWithAWarning) {
  TraceWriter w;
  w.events(1, {enter(0, kMain), leave(10, kMain)});
  // An events chunk whose count disagrees with its size.
  std::string payload(8 + 16, '\0');
  payload[4] = 5;
  w.chunk(tramway::trace::format::ChunkType::events, payload);
  w.events(1, {enter(20, kMain), leave(30, kMain)});
  w.end();
  std::string diagnostics;
  const Profile p = load(w.save("t.trace"), {}, &diagnostics);
  EXPECT_EQ(p.events, 4u);
  EXPECT_EQ(rows_by_name(p)["0x401000"].calls, 2u);
  EXPECT_NE(diagnostics.find("damaged events chunk"), std::string::npos) << diagnostics;
}

TEST(Report, TableSortLimitAndUnits) {
  EXPECT_EQ(format_duration(0), "0 ns");
  EXPECT_EQ(format_duration(999), "999 ns");
  EXPECT_EQ(format_duration(1000), "1.00 µs");
  EXPECT_EQ(format_duration(12'345), "12.3 µs");
  EXPECT_EQ(format_duration(123'456), "123 µs");
  EXPECT_EQ(format_duration(999'700), "1.00 ms");
  EXPECT_EQ(format_duration(45'600'000), "45.6 ms");
  EXPECT_EQ(format_duration(1'500'000'000), "1.50 s");
  EXPECT_EQ(format_duration(12'345'000'000'000), "12345 s");

  const Profile p = load(scenario().save("t.trace"));
  auto by_calls = table_rows(p, nullptr, SortKey::calls, 2);
  ASSERT_EQ(by_calls.size(), 2u);
  EXPECT_EQ(by_calls[0].name, "parse(std::string const&)");
  EXPECT_EQ(by_calls[1].name, "0x401400");  // ties (1 call each) by name
  auto by_self = table_rows(p, nullptr, SortKey::self, 0);
  for (std::size_t i = 1; i < by_self.size(); ++i) EXPECT_GE(by_self[i - 1].self_ns, by_self[i].self_ns);
  auto by_name = table_rows(p, nullptr, SortKey::name, 0);
  EXPECT_TRUE(std::is_sorted(by_name.begin(), by_name.end(),
                             [](const Row& a, const Row& b) { return a.name < b.name; }));

  // Columns line up: every line puts the function name at the same display column.
  const auto rows = table_rows(p, nullptr, SortKey::total, 0);
  std::istringstream lines(format_table(rows));
  std::string line;
  ASSERT_TRUE(std::getline(lines, line));
  const std::size_t column = detail::display_width(line) - detail::display_width("function");
  for (const Row& r : rows) {
    ASSERT_TRUE(std::getline(lines, line));
    const std::string name = detail::valid_utf8(r.name);
    EXPECT_EQ(line.substr(line.size() - name.size()), name);
    EXPECT_EQ(detail::display_width(line) - detail::display_width(name), column) << line;
  }
  Options options;
  options.limit = 2;
  const std::string report = format_report(p, options);
  EXPECT_NE(report.find("(2 of 5 functions shown"), std::string::npos) << report;
  EXPECT_NE(report.find("2 threads, 14 events over 100 ns, no events lost"), std::string::npos) << report;
}

TEST(Report, ChromeJsonLoadsAndNests) {
  const Profile p = load(scenario().save("t.trace"), BuildOptions{true});
  const std::string json = render([&](std::FILE* f) { return write_chrome(p, f); });
  EXPECT_NE(json.find("\"displayTimeUnit\":\"ns\""), std::string::npos);
  EXPECT_NE(json.find("\"ts\":0.040,\"dur\":0.050"), std::string::npos) << json;  // push_back [40,90] ns
  if (!have_python()) GTEST_SKIP() << "python3 not found: JSON not parsed";
  const std::string path = temp_path("chrome.json");
  std::ofstream(path, std::ios::binary) << json;
  int status = 0;
  const std::string out = python(R"PY(
import json, sys
d = json.load(open(sys.argv[1], encoding="utf-8"))
assert d["displayTimeUnit"] == "ns"
xs, threads = {}, set()
for e in d["traceEvents"]:
    assert isinstance(e["pid"], int) and isinstance(e["tid"], int), e
    if e["ph"] == "X":
        assert e["dur"] >= 0 and e["ts"] >= 0, e
        xs.setdefault(e["tid"], []).append(e)
    elif e["ph"] == "M":
        if e["name"] == "thread_name":
            threads.add(e["args"]["name"])
    else:
        raise SystemExit("unexpected phase " + e["ph"])
for tid, events in xs.items():
    open_ends = []  # complete events must nest within each thread
    for e in sorted(events, key=lambda e: e["ts"]):
        begin, end = e["ts"], e["ts"] + e["dur"]
        while open_ends and open_ends[-1] <= begin + 1e-9:
            open_ends.pop()
        assert not open_ends or end <= open_ends[-1] + 1e-9, (e, open_ends)
        open_ends.append(end)
print(sum(len(v) for v in xs.values()), sorted(threads))
for e in d["traceEvents"]:
    if e["ph"] == "X" and "weird" in e["name"]:
        print(e["name"].encode("unicode_escape").decode())
)PY",
                                 path, &status);
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("7 ['main', 'worker-1']"), std::string::npos) << out;
  // Quotes, backslash, <>&; and the invalid byte replaced by U+FFFD survive the round trip.
  EXPECT_NE(out.find("weird<\"name\">;with\\\\back & 'quotes' \\ufffd"), std::string::npos) << out;
}

TEST(Report, ChromeNeedsKeptCalls) {
  const Profile p = load(scenario().save("t.trace"));
  std::FILE* f = std::tmpfile();
  const tramway::Status st = write_chrome(p, f);
  std::fclose(f);
  EXPECT_FALSE(st.ok());
}

TEST(Report, FoldedValuesSumToSelfTime) {
  const Profile p = load(scenario().save("t.trace"));
  const std::string folded = render([&](std::FILE* f) { return write_folded(p, f); });
  std::uint64_t sum = 0;
  std::map<std::string, std::uint64_t> stacks;
  std::istringstream lines(folded);
  std::string line;
  while (std::getline(lines, line)) {
    const std::size_t space = line.rfind(' ');
    ASSERT_NE(space, std::string::npos) << line;
    const std::uint64_t value = std::stoull(line.substr(space + 1));
    EXPECT_TRUE(stacks.emplace(line.substr(0, space), value).second) << "stack twice: " << line;
    sum += value;
  }
  std::uint64_t self = 0;
  for (const Row& r : table_rows(p, nullptr, SortKey::name, 0)) self += r.self_ns;
  EXPECT_EQ(sum, self);
  EXPECT_EQ(sum, 135u);
  // parse is aggregated across threads at the top level only where it was top level.
  EXPECT_EQ(stacks["main_loop"], 30u);
  EXPECT_EQ(stacks["main_loop;parse(std::string const&)"], 20u);
  EXPECT_EQ(stacks["main_loop;std::vector<int>::push_back(int&&);parse(std::string const&)"], 10u);
  EXPECT_EQ(stacks["parse(std::string const&)"], 5u);
  // ';' in a name cannot split the frame.
  EXPECT_EQ(stacks["weird<\"name\">:with\\back & 'quotes' \xEF\xBF\xBD;0x401400"], 10u) << folded;

  const std::string per_thread = render([&](std::FILE* f) { return write_folded(p, f, true); });
  EXPECT_NE(per_thread.find("thread 100 (main);main_loop 30\n"), std::string::npos) << per_thread;
  EXPECT_NE(per_thread.find("thread 200 (worker-1);parse(std::string const&) 5\n"), std::string::npos) << per_thread;
}

TEST(Report, SvgIsWellFormedXml) {
  const Profile p = load(scenario().save("t.trace"));
  const std::string svg = render([&](std::FILE* f) { return write_svg(p, f); });
  EXPECT_EQ(svg.find("<svg"), svg.find("\n") + 1);
  EXPECT_NE(svg.find("<title>main_loop (100 ns, 74.07%, 1 call)</title>"), std::string::npos) << svg;
  EXPECT_NE(svg.find("weird&lt;&quot;name&quot;&gt;;with\\back &amp; &apos;quotes&apos;"), std::string::npos);
  // The same name keeps its colour.
  const auto fill_of = [&](const std::string& title_start) {
    const std::size_t at = svg.find("<title>" + title_start);
    const std::size_t fill = svg.find("fill=\"", at);
    return svg.substr(fill, svg.find('"', fill + 6) - fill);
  };
  EXPECT_EQ(fill_of("parse(std::string const&amp;) (20 ns"), fill_of("parse(std::string const&amp;) (5 ns"));

  // Frames narrower than the minimum are left out.
  SvgOptions narrow;
  narrow.min_frame_width = 200;
  const std::string pruned = render([&](std::FILE* f) { return write_svg(p, f, narrow); });
  EXPECT_EQ(pruned.find("0x401400"), std::string::npos);
  EXPECT_NE(pruned.find("<title>main_loop"), std::string::npos);

  if (!have_python()) GTEST_SKIP() << "python3 not found: XML not parsed";
  const std::string path = temp_path("flame.svg");
  std::ofstream(path, std::ios::binary) << svg;
  int status = 0;
  const std::string out = python(R"PY(
import sys, xml.dom.minidom
d = xml.dom.minidom.parse(sys.argv[1])
frames = [g for g in d.getElementsByTagName("g") if g.getAttribute("class") == "f"]
print(len(frames), len(d.getElementsByTagName("title")))
)PY",
                                 path, &status);
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out, "8 8\n");  // "all" and the 7 distinct stacks
}

TEST(Report, EmptyTraceRendersEverything) {
  TraceWriter w;
  w.end();
  const Profile p = load(w.save("t.trace"), BuildOptions{true});
  EXPECT_EQ(p.events, 0u);
  EXPECT_NE(format_report(p, Options{}).find("(no completed calls)"), std::string::npos);
  EXPECT_EQ(render([&](std::FILE* f) { return write_folded(p, f); }), "");
  EXPECT_NE(render([&](std::FILE* f) { return write_svg(p, f); }).find("no completed calls"), std::string::npos);
  EXPECT_NE(render([&](std::FILE* f) { return write_chrome(p, f); }).find("traceEvents"), std::string::npos);
}

TEST(Report, RunWritesTableAndEveryOutput) {
  Options options;
  options.input = scenario().save("t.trace");
  options.chrome = temp_path("out.json");
  options.folded = temp_path("out.folded");
  options.svg = temp_path("out.svg");
  options.progress = false;
  const std::string table = render([&](std::FILE* f) { return run(options, f); });
  EXPECT_NE(table.find(options.input + ": pid 4242"), std::string::npos) << table;
  EXPECT_NE(table.find("main_loop"), std::string::npos) << table;
  EXPECT_NE(table.find("wrote " + options.chrome), std::string::npos) << table;
  EXPECT_NE(slurp(options.chrome).find("traceEvents"), std::string::npos);
  EXPECT_NE(slurp(options.folded).find("main_loop 30"), std::string::npos);
  EXPECT_NE(slurp(options.svg).find("</svg>"), std::string::npos);

  options.svg = "/nonexistent-dir/out.svg";
  std::FILE* f = std::tmpfile();
  const tramway::Status st = run(options, f);
  std::fclose(f);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("cannot write the SVG flame graph to /nonexistent-dir/out.svg"), std::string::npos)
      << st.message();
}

TEST(Report, EscapingKeepsTextValid) {
  EXPECT_EQ(detail::json_escape("a\"b\\c\n\x01"), "a\\\"b\\\\c\\n\\u0001");
  EXPECT_EQ(detail::json_escape("\xc3\xa9"), "\xc3\xa9");                 // é stays
  EXPECT_EQ(detail::json_escape("\xc3"), "\xEF\xBF\xBD");                 // cut sequence
  EXPECT_EQ(detail::valid_utf8("\xed\xa0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(detail::xml_escape("<a&b>'\"\x02"), "&lt;a&amp;b&gt;&apos;&quot;");
  EXPECT_EQ(detail::display_width("12.3 µs"), 7u);
  EXPECT_EQ(detail::first_code_points("µµµ", 2), "µµ");
}

}  // namespace
