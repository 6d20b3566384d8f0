// `tramway report --perfetto`: the output decoded with protoc against perfetto_trace.proto
// (the field numbers Perfetto documents), then checked packet by packet: one sequence a
// thread, each starting with its clock and defaults; every slice begun is ended, in nesting
// order; interned names; incremental timestamps adding up to the events' times; lost events
// as instants.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "trace/report/report.h"
#include "trace_writer.h"

namespace {

using namespace tramway::trace::report;
using report_test::enter;
using report_test::leave;
using report_test::TraceWriter;
using report_test::unwind;

constexpr std::uint64_t kMain = 0x401000, kParse = 0x401100, kLeaf = 0x401200, kUnnamed = 0x401300;

std::string temp(const std::string& name) {
  return ::testing::TempDir() + "tramway_perfetto_" + std::to_string(getpid()) + "_" + name;
}

struct Packet {
  std::uint64_t sequence = 0;
  bool has_timestamp = false;
  std::uint64_t timestamp = 0;
  std::string type;  // TYPE_SLICE_BEGIN ...
  std::uint64_t name_iid = 0;
  std::string name;  // the event's own name (instants)
  std::map<std::uint64_t, std::string> interned;
  bool clock_snapshot = false, clears_state = false;
  std::uint64_t uint_value = 0;
  std::uint64_t tid = 0;
  std::string thread_name;
};

// Decodes `file` with protoc; packets in file order, or a failure.
std::vector<Packet> decode(const std::string& file) {
  const std::string command = std::string(TRAMWAY_PROTOC) + " --decode=perfetto.protos.Trace -I " +
                              TRAMWAY_PERFETTO_PROTO_DIR + " " + TRAMWAY_PERFETTO_PROTO_DIR +
                              "/perfetto_trace.proto < " + file + " 2>&1";
  std::FILE* p = popen(command.c_str(), "r");
  std::string text;
  char buf[4096];
  for (std::size_t n; p && (n = std::fread(buf, 1, sizeof buf, p)) > 0;) text.append(buf, n);
  const int status = p ? pclose(p) : -1;
  EXPECT_EQ(status, 0) << command << ":\n" << text;
  std::vector<Packet> out;
  std::istringstream lines(text);
  const std::regex field(R"(^(\s*)(\w+): (.*)$)");
  std::uint64_t pending_iid = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line == "packet {") {
      out.emplace_back();
      continue;
    }
    if (out.empty()) {
      ADD_FAILURE() << "not inside a packet: " << line;
      continue;
    }
    Packet& k = out.back();
    if (line.find("clock_snapshot {") != std::string::npos) k.clock_snapshot = true;
    std::smatch m;
    if (!std::regex_match(line, m, field)) continue;
    const std::size_t depth = m[1].length() / 2;
    const std::string key = m[2], value = m[3];
    const auto number = [&] { return std::stoull(value); };
    const auto quoted = [&] { return value.size() >= 2 ? value.substr(1, value.size() - 2) : value; };
    if (depth == 1 && key == "trusted_packet_sequence_id") k.sequence = number();
    if (depth == 1 && key == "timestamp") k.has_timestamp = true, k.timestamp = number();
    if (depth == 1 && key == "sequence_flags") k.clears_state = number() == 1;
    if (depth == 2 && key == "type") k.type = value;
    if (depth == 2 && key == "name_iid") k.name_iid = number();
    if (depth == 2 && key == "name") k.name = quoted();
    if (depth == 3 && key == "iid") pending_iid = number();
    if (depth == 3 && key == "name") k.interned[pending_iid] = quoted();
    if (depth == 3 && key == "uint_value") k.uint_value = number();
    if (depth == 3 && key == "tid") k.tid = number();
    if (depth == 3 && key == "thread_name") k.thread_name = quoted();
  }
  return out;
}

// main (tid 100): main_loop [10,100] calls parse [20,30] and leaf [40, unwound at 70]; after
// main_loop, parse [110, open at the end: closed at 130, the thread's last event]. A stray exit
// of leaf at 120 has no open frame. worker (200): 3 events lost, then an unnamed function [5,9].
TraceWriter scenario() {
  TraceWriter w;
  w.functions({{kMain, "main_loop"}, {kParse, "parse(std::string const&)"}, {kLeaf, "leaf"}});
  w.thread(100, "main");
  w.thread(200, "worker");
  w.events(100, {enter(10, kMain), enter(20, kParse), leave(30, kParse), enter(40, kLeaf), unwind(70, kMain)});
  w.lost(200, 3);
  w.events(200, {enter(5, kUnnamed), leave(9, kUnnamed)});
  w.events(100, {enter(110, kParse), leave(120, kLeaf), enter(125, kLeaf), leave(130, kLeaf)});
  w.end();
  return w;
}

TEST(Perfetto, EverySliceEndsOnItsThreadsTrackWithInternedNamesAndExactTimes) {
  const std::string trace = scenario().save("t.trace");
  auto profile = load_profile(trace, ReadOptions{false, nullptr});
  ASSERT_TRUE(profile.ok()) << profile.status().message();
  const std::string out = temp("t.pftrace");
  std::FILE* f = std::fopen(out.c_str(), "w");
  ASSERT_NE(f, nullptr);
  ASSERT_TRUE(write_perfetto(*profile, f).ok());
  ASSERT_EQ(std::fclose(f), 0);
  const std::vector<Packet> packets = decode(out);
  ASSERT_FALSE(packets.empty());

  struct Replay {
    bool started = false, described = false;
    std::uint64_t now = 0;
    std::map<std::uint64_t, std::string> names;
    std::vector<std::string> open;                    // names of open slices
    std::vector<std::pair<std::string, std::string>> slices;  // "name@begin-end"
    std::vector<std::uint64_t> lost;
    std::string thread_name;
    std::uint64_t tid = 0;
  };
  std::map<std::uint64_t, Replay> by_sequence;
  for (const Packet& k : packets) {
    ASSERT_NE(k.sequence, 0u) << "a packet without a sequence";
    Replay& r = by_sequence[k.sequence];
    if (k.clock_snapshot) {
      EXPECT_FALSE(r.started) << "a second clock snapshot on sequence " << k.sequence;
      EXPECT_TRUE(k.clears_state);
      r.started = true;
      continue;
    }
    if (!k.thread_name.empty()) {
      r.described = true;
      r.thread_name = k.thread_name;
      r.tid = k.tid;
    }
    if (!k.has_timestamp) continue;
    ASSERT_TRUE(r.started) << "an event before its sequence's clock snapshot";
    r.now += k.timestamp;  // incremental
    for (const auto& [iid, name] : k.interned) {
      EXPECT_EQ(r.names.count(iid), 0u) << "iid " << iid << " interned twice";
      r.names[iid] = name;
    }
    if (k.type == "TYPE_SLICE_BEGIN") {
      ASSERT_EQ(r.names.count(k.name_iid), 1u) << "name_iid " << k.name_iid << " used before it was interned";
      r.open.push_back(r.names[k.name_iid] + "@" + std::to_string(r.now));
    } else if (k.type == "TYPE_SLICE_END") {
      ASSERT_FALSE(r.open.empty()) << "an end with no slice begun, at " << r.now;
      r.slices.emplace_back(r.open.back(), std::to_string(r.now));
      r.open.pop_back();
    } else if (k.type == "TYPE_INSTANT") {
      EXPECT_EQ(k.name, "lost events");
      r.lost.push_back(k.uint_value);
    }
  }
  std::map<std::uint64_t, const Replay*> by_tid;
  for (const auto& [seq, r] : by_sequence) {
    EXPECT_TRUE(r.open.empty()) << "sequence " << seq << " leaves " << r.open.size() << " slices open";
    if (r.tid) by_tid[r.tid] = &r;
  }
  ASSERT_EQ(by_tid.size(), 2u);
  const Replay& main = *by_tid.at(100);
  EXPECT_EQ(main.thread_name, "main");
  const std::vector<std::pair<std::string, std::string>> main_slices = {
      {"parse(std::string const&)@20", "30"}, {"leaf@40", "70"},  {"main_loop@10", "70"},
      {"leaf@125", "130"},                    {"parse(std::string const&)@110", "130"}};
  EXPECT_EQ(main.slices, main_slices);
  EXPECT_TRUE(main.lost.empty());
  const Replay& worker = *by_tid.at(200);
  EXPECT_EQ(worker.thread_name, "worker");
  const std::vector<std::pair<std::string, std::string>> worker_slices = {{"0x401300@5", "9"}};
  EXPECT_EQ(worker.slices, worker_slices);
  EXPECT_EQ(worker.lost, std::vector<std::uint64_t>{3});
  std::remove(trace.c_str());
  std::remove(out.c_str());
}

// Memory stays flat: a long file is written as it is read (100,000 calls on one thread, the
// output a dozen bytes or so an event, nothing kept but the open frames).
TEST(Perfetto, AManyEventTraceIsWrittenAtAboutADozenBytesAnEvent) {
  TraceWriter w;
  w.functions({{kParse, "parse(std::string const&)"}, {kLeaf, "leaf"}});
  std::vector<tramway::trace::format::Event> events;
  std::uint64_t t = 1000;
  for (int i = 0; i < 50'000; ++i) {
    events.push_back(enter(t, kParse));
    events.push_back(enter(t + 3, kLeaf));
    events.push_back(leave(t + 40, kLeaf));
    events.push_back(leave(t + 90, kParse));
    t += 100;
  }
  w.events(7, events).end();
  const std::string trace = w.save("big.trace");
  auto profile = load_profile(trace, ReadOptions{false, nullptr});
  ASSERT_TRUE(profile.ok());
  const std::string out = temp("big.pftrace");
  std::FILE* f = std::fopen(out.c_str(), "w");
  ASSERT_TRUE(write_perfetto(*profile, f).ok());
  const long size = std::ftell(f);
  std::fclose(f);
  EXPECT_LE(size, 14L * 200'000) << "bytes for 200,000 events";
  std::size_t begins = 0, ends = 0;
  for (const Packet& k : decode(out)) {
    begins += k.type == "TYPE_SLICE_BEGIN";
    ends += k.type == "TYPE_SLICE_END";
  }
  EXPECT_EQ(begins, 100'000u);
  EXPECT_EQ(ends, 100'000u);
  std::remove(trace.c_str());
  std::remove(out.c_str());
}

}  // namespace
