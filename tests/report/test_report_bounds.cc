// Outputs stay proportional to the file however the file was crafted: stacks deeper than
// BuildOptions::max_depth are rendered truncated (the folded stacks of a 100,000-deep stack
// used to be about depth² bytes), names are cut to kMaxNameBytes, and exits without an open
// frame do not cost a scan of a deep stack. The outputs are written by a child under a
// file-size limit, so that a regression fails the test instead of filling the disk.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "trace/report/report.h"
#include "trace_writer.h"

namespace {

using namespace tramway::trace::report;
using report_test::enter;
using report_test::leave;
using report_test::TraceWriter;

constexpr std::uint64_t kLevel0 = 0x500000, kNeverEntered = 0x600000;
constexpr int kLevels = 4;           // functions deep::level0..3, called in turn
constexpr std::uint32_t kDepth = 100'000;
constexpr std::uint64_t kUnmatched = 20'000;
constexpr rlim_t kFileLimit = 64 << 20;

std::uint64_t level(std::uint32_t depth) { return kLevel0 + 0x100 * (depth % kLevels); }

// One thread, one chain kDepth deep (entries at 0, 1000, ..., exits in reverse), and at the
// deepest point kUnmatched exits of a function that was never entered: about 3.5 MB.
std::string deep_trace() {
  TraceWriter w;
  std::vector<std::pair<std::uint64_t, std::string>> names{{kNeverEntered, "never_entered"}};
  for (int i = 0; i < kLevels; ++i) names.emplace_back(level(i), "deep::level" + std::to_string(i) + "(int)");
  w.functions(names);
  w.thread(1, "deep");
  std::vector<report_test::fmt::Event> events;
  for (std::uint32_t d = 0; d < kDepth; ++d) events.push_back(enter(1000ull * d, level(d)));
  for (std::uint64_t i = 0; i < kUnmatched; ++i) events.push_back(leave(1000ull * kDepth, kNeverEntered));
  for (std::uint32_t d = kDepth; d-- > 0;) events.push_back(leave(1000ull * (2 * kDepth - 1 - d), level(d)));
  w.events(1, events);
  w.end();
  return w.save("deep.trace");
}

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "tramway_bounds_" + ::testing::UnitTest::GetInstance()->current_test_info()->name() +
         "_" + std::to_string(getpid()) + "_" + name;
}

std::uint64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<std::uint64_t>(st.st_size) : 0;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Runs `tramway report` with `options` in a child whose files may not grow past kFileLimit
// (SIGXFSZ kills it if one does); the table goes to `table`.
void run_limited(const Options& options, const std::string& table) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const rlimit limit{kFileLimit, kFileLimit};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    ::signal(SIGXFSZ, SIG_DFL);
    std::FILE* out = std::fopen(table.c_str(), "w");
    const bool ok = out && run(options, out).ok();
    ::_exit(ok && std::fclose(out) == 0 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_FALSE(WIFSIGNALED(status) && WTERMSIG(status) == SIGXFSZ)
      << "an output of the report outgrew " << (kFileLimit >> 20) << " MiB";
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
}

TEST(ReportBounds, ADeepStackKeepsEveryOutputProportionalToTheFile) {
  const std::string input = deep_trace();
  const std::uint64_t input_bytes = file_size(input);
  for (const bool per_thread : {false, true}) {
    SCOPED_TRACE(per_thread ? "per thread" : "all threads");
    Options options;
    options.input = input;
    options.per_thread = per_thread;
    options.limit = 0;
    options.chrome = temp_path("out.json");
    options.folded = temp_path("out.folded");
    options.svg = temp_path("out.svg");
    options.progress = false;
    const std::string table = temp_path("table.txt");
    run_limited(options, table);
    for (const std::string& out : {table, options.chrome, options.folded, options.svg}) {
      EXPECT_LT(file_size(out), 4 * input_bytes) << out;
    }

    // The folded stacks: at most max_depth frames and the truncation frame a line, and the
    // values still add up to the time of the outermost frame.
    std::istringstream folded(slurp(options.folded));
    std::string line;
    std::uint64_t sum = 0, lines = 0, truncated_lines = 0;
    std::size_t deepest = 0;
    while (std::getline(folded, line)) {
      ++lines;
      const std::size_t space = line.rfind(' ');
      ASSERT_NE(space, std::string::npos) << line.substr(0, 200);
      sum += std::stoull(line.substr(space + 1));
      deepest = std::max<std::size_t>(deepest, std::count(line.begin(), line.begin() + space, ';') + 1);
      truncated_lines += line.find("[truncated: frames deeper than 512]") != std::string::npos;
    }
    EXPECT_EQ(sum, 1000ull * (2 * kDepth - 1));
    EXPECT_EQ(deepest, kDefaultMaxDepth + 1 + (per_thread ? 1 : 0));
    EXPECT_EQ(truncated_lines, 1u);
    EXPECT_EQ(lines, kDefaultMaxDepth + 1);
    EXPECT_NE(slurp(options.svg).find("[truncated: frames deeper than 512]"), std::string::npos);
    EXPECT_NE(slurp(table).find("note: " + std::to_string(kDepth - kDefaultMaxDepth) + " frames were deeper than 512"),
              std::string::npos);
    std::remove(table.c_str());
    std::remove(options.chrome.c_str());
    std::remove(options.folded.c_str());
    std::remove(options.svg.c_str());
  }

  // The table still counts every frame, and the exits without a frame were each found out.
  ReadOptions read;
  read.diagnostics = nullptr;
  auto profile = load_profile(input, read);
  ASSERT_TRUE(profile.ok()) << profile.status().message();
  ASSERT_EQ(profile->threads.size(), 1u);
  EXPECT_EQ(profile->threads[0].unmatched_exits, kUnmatched);
  std::uint64_t calls = 0;
  for (const Row& r : table_rows(*profile, nullptr, SortKey::name, 0)) calls += r.calls;
  EXPECT_EQ(calls, kDepth);
  std::remove(input.c_str());
}

TEST(ReportBounds, MaxDepthZeroRendersWholeStacks) {
  TraceWriter w;
  w.functions({{kLevel0, "a"}, {kLevel0 + 0x100, "b"}});
  w.events(1, {enter(0, kLevel0), enter(1, kLevel0 + 0x100), enter(2, kLevel0), leave(3, kLevel0),
               leave(4, kLevel0 + 0x100), leave(5, kLevel0)});
  w.end();
  const std::string input = w.save("small.trace");
  ReadOptions read;
  read.diagnostics = nullptr;
  for (const std::uint32_t depth : {0u, 2u}) {
    BuildOptions build;
    build.max_depth = depth;
    auto profile = load_profile(input, read, build);
    ASSERT_TRUE(profile.ok());
    std::FILE* f = std::tmpfile();
    ASSERT_TRUE(write_folded(*profile, f).ok());
    std::rewind(f);
    char buf[4096] = {};
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    const std::string folded(buf, n);
    if (depth == 0) {
      EXPECT_EQ(folded, "a 2\na;b 2\na;b;a 1\n");
    } else {
      EXPECT_EQ(folded, "a 2\na;b 2\na;b;[truncated: frames deeper than 2] 1\n");
    }
  }
  std::remove(input.c_str());
}

TEST(ReportBounds, LongNamesAreCutInEveryOutput) {
  const std::string huge(1 << 20, 'x');  // a crafted 1 MiB function name, 3 frames deep
  TraceWriter w;
  w.functions({{kLevel0, huge}});
  w.thread(1, std::string(1 << 20, 't'));
  std::vector<report_test::fmt::Event> events;
  for (int d = 0; d < 3; ++d) events.push_back(enter(d, kLevel0));
  for (int d = 3; d-- > 0;) events.push_back(leave(6 - d, kLevel0));
  w.events(1, events);
  w.end();
  Options options;
  options.input = w.save("names.trace");
  options.per_thread = true;
  options.folded = temp_path("out.folded");
  options.svg = temp_path("out.svg");
  options.progress = false;
  const std::string table = temp_path("table.txt");
  run_limited(options, table);
  // Three lines of at most four cut names (the thread's and three frames).
  EXPECT_LT(file_size(options.folded), 3 * 4 * kMaxNameBytes + 100);
  EXPECT_LT(file_size(options.svg), 3 * 4 * 6 * kMaxNameBytes + 10'000);  // name, label and tip, escaped
  EXPECT_LT(file_size(table), 4 * kMaxNameBytes);
  EXPECT_NE(slurp(table).find(std::string(kMaxNameBytes - 3, 'x') + "..."), std::string::npos);
  EXPECT_EQ(slurp(table).find(std::string(kMaxNameBytes, 'x')), std::string::npos);
  for (const std::string& f : {options.input, options.folded, options.svg, table}) std::remove(f.c_str());
}

// Many distinct deep stacks: a folded line repeats every frame of its stack (up to max_depth
// names of up to kMaxNameBytes), so a 35 KB file of 500 frames of 1 KB names over a binary
// tree of 8 levels below them made 510 lines of half a megabyte (a 281 KB one, 12 levels, made
// over 4 GB): the folded stacks stop at their budget, proportional to the file, and say so.
void branch(std::vector<report_test::fmt::Event>& events, std::uint64_t& t, int levels) {
  if (levels == 0) return;
  for (const std::uint64_t f : {kLevel0 + 0x100, kLevel0 + 0x200}) {
    events.push_back(enter(t++, f));
    branch(events, t, levels - 1);
    events.push_back(leave(t++, f));
  }
}

TEST(ReportBounds, ManyDistinctDeepStacksStopTheFoldedStacksAtTheirBudget) {
  TraceWriter w;
  w.functions({{kLevel0, std::string(1000, 'p')}, {kLevel0 + 0x100, std::string(1000, 'l')},
               {kLevel0 + 0x200, std::string(1000, 'r')}});
  w.thread(1, "wide");
  std::vector<report_test::fmt::Event> events;
  std::uint64_t t = 0;
  for (int i = 0; i < 500; ++i) events.push_back(enter(t++, kLevel0));
  branch(events, t, 8);
  for (int i = 0; i < 500; ++i) events.push_back(leave(t++, kLevel0));
  w.events(1, events);
  w.end();
  const std::string input = w.save("wide.trace");
  ASSERT_LT(folded_budget(file_size(input)), kFileLimit + 1);

  Options options;
  options.input = input;
  options.folded = temp_path("out.folded");
  options.progress = false;
  const std::string table = temp_path("table.txt"), message = temp_path("message.txt");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const rlimit limit{kFileLimit, kFileLimit};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    ::signal(SIGXFSZ, SIG_DFL);
    std::FILE* out = std::fopen(table.c_str(), "w");
    const tramway::Status st = run(options, out);
    std::FILE* m = std::fopen(message.c_str(), "w");
    std::fputs(st.message().c_str(), m);
    std::fclose(m);
    ::_exit(st.ok() ? 1 : 0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_FALSE(WIFSIGNALED(status) && WTERMSIG(status) == SIGXFSZ)
      << "the folded stacks outgrew " << (kFileLimit >> 20) << " MiB";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the report did not fail: status " << status;
  const std::string said = slurp(message);
  EXPECT_NE(said.find("--max-depth"), std::string::npos) << said;
  EXPECT_LE(file_size(options.folded), folded_budget(file_size(input)));
  for (const std::string& f : {input, options.folded, table, message}) std::remove(f.c_str());
}

}  // namespace
