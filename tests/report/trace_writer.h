// A writer of synthetic trace files for the report tests: builds the bytes of
// tramway/trace/format.h chunk by chunk, so a test states exactly what a recording held
// (and can damage it on purpose: wrong magic or version, unknown chunks, a cut-short tail).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "tramway/trace/format.h"

namespace report_test {

namespace fmt = tramway::trace::format;

inline fmt::Event enter(std::uint64_t t, std::uint64_t address) {
  return {t, fmt::Event::make_word(address, fmt::EventKind::entry)};
}
inline fmt::Event leave(std::uint64_t t, std::uint64_t address) {
  return {t, fmt::Event::make_word(address, fmt::EventKind::exit)};
}
inline fmt::Event unwind(std::uint64_t t, std::uint64_t address) {
  return {t, fmt::Event::make_word(address, fmt::EventKind::unwound)};
}

class TraceWriter {
 public:
  explicit TraceWriter(std::uint64_t pid = 4242) {
    fmt::FileHeader h{};
    std::memcpy(h.magic, fmt::kMagic, sizeof h.magic);
    h.version = fmt::kVersion;
    h.header_size = sizeof h;
    h.start_realtime_ns = 1'700'000'000ull * 1'000'000'000ull;
    h.pid = pid;
    h.clock = fmt::Clock::monotonic;
    put(h);
  }

  fmt::FileHeader& header() { return *reinterpret_cast<fmt::FileHeader*>(bytes_.data()); }

  TraceWriter& functions(const std::vector<std::pair<std::uint64_t, std::string>>& names) {
    std::string payload;
    for (const auto& [address, name] : names) {
      append(payload, address);
      append(payload, static_cast<std::uint32_t>(name.size()));
      payload += name;
    }
    return chunk(fmt::ChunkType::functions, payload);
  }
  TraceWriter& thread(std::uint32_t tid, const std::string& name) {
    std::string payload;
    append(payload, tid);
    append(payload, static_cast<std::uint32_t>(name.size()));
    payload += name;
    return chunk(fmt::ChunkType::thread, payload);
  }
  TraceWriter& events(std::uint32_t tid, const std::vector<fmt::Event>& events) {
    std::string payload;
    append(payload, tid);
    append(payload, static_cast<std::uint32_t>(events.size()));
    for (const fmt::Event& e : events) append(payload, e);
    events_ += events.size();
    return chunk(fmt::ChunkType::events, payload);
  }
  TraceWriter& lost(std::uint32_t tid, std::uint64_t count) {
    std::string payload;
    append(payload, tid);
    append(payload, std::uint32_t{0});
    append(payload, count);
    lost_ += count;
    return chunk(fmt::ChunkType::lost, payload);
  }
  TraceWriter& end() {
    std::string payload;
    append(payload, events_);
    append(payload, lost_);
    return chunk(fmt::ChunkType::end, payload);
  }
  TraceWriter& chunk(fmt::ChunkType type, const std::string& payload) {
    put(fmt::ChunkHeader{type, static_cast<std::uint32_t>(payload.size())});
    bytes_ += payload;
    return *this;
  }

  std::string& bytes() { return bytes_; }

  // Writes the file under the test's temporary directory; the name is unique per test process.
  std::string save(const std::string& name) const {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    const std::string path = ::testing::TempDir() + "tramway_report_" + info->name() + "_" +
                             std::to_string(getpid()) + "_" + name;
    std::FILE* f = std::fopen(path.c_str(), "wb");
    EXPECT_NE(f, nullptr) << path;
    if (f) {
      EXPECT_EQ(std::fwrite(bytes_.data(), 1, bytes_.size(), f), bytes_.size());
      std::fclose(f);
    }
    return path;
  }

 private:
  template <class T>
  static void append(std::string& s, const T& v) {
    s.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  template <class T>
  void put(const T& v) {
    append(bytes_, v);
  }

  std::string bytes_;
  std::uint64_t events_ = 0, lost_ = 0;
};

}  // namespace report_test
