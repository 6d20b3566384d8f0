// worker_pool.h — the stages a job goes through, one namespace each (gen, parse, codec,
// checksum, pool), so that a tracer glob such as 'codec::*' selects one stage. Every function
// declared here, and the helpers in the .cc files, have external linkage in these named
// namespaces (no anonymous namespace): their demangled names are what globs match.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

// Keeps a function a real function at -O2, so that the tracer sees every call: the sources are
// compiled as one translation unit (CMakeLists.txt says why), where GCC and Clang would
// otherwise inline the small and the once-called ones into their callers.
#define WP_NOINLINE __attribute__((noinline))

using Bytes = std::span<const std::uint8_t>;
inline Bytes as_bytes(std::string_view s) { return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()}; }

// ---- gen: deterministic input, a block of key=value records per job (gen.cc) ----------------
namespace gen {
struct Rng {
  std::uint64_t state;
};
std::uint64_t next_random(Rng& rng);  // splitmix64
// In [0, bound): Lemire's multiply-shift, no division; its bias is far below anything counted
// here. Inline, so that a draw is one call (next_random) in a trace, not two.
inline std::uint32_t next_below(Rng& rng, std::uint32_t bound) {
  return static_cast<std::uint32_t>(((next_random(rng) >> 32) * bound) >> 32);
}
// The seed of job `job` of round `round`: a function of the three only, not of scheduling.
std::uint64_t job_seed(std::uint64_t seed, std::uint64_t round, std::uint64_t job);
// At least `size` bytes of lines: mostly records, some comments, about 1 in 64 malformed.
std::string generate_block(std::uint64_t seed, std::size_t size);
void append_record(Rng& rng, std::uint64_t id, std::string& out);
void append_number(std::uint64_t value, std::string& out);
}  // namespace gen

// ---- parse: lines "id=7;user=u12;op=write;bytes=4096;latency_us=250;tags=net|disk" (parse.cc) --
namespace parse {
enum class Op : std::uint8_t { kRead, kWrite, kStat, kOpen, kClose };
struct Record {
  std::uint64_t id = 0;
  std::uint64_t user = 0;
  std::uint64_t bytes = 0;
  std::uint64_t latency_us = 0;
  Op op = Op::kRead;
  std::uint32_t tags = 0;  // bit i: tag i of gen's vocabulary
};
struct Block {
  std::vector<Record> records;
  std::size_t rejected = 0;  // malformed lines
};
Block parse_block(std::string_view text);
bool parse_record(std::string_view line, Record& out);
// `seen`: the fields parsed so far (a bit each), so that duplicates and missing ones are caught.
bool parse_field(std::string_view field, Record& out, unsigned& seen);
bool parse_number(std::string_view text, std::uint64_t& out);
bool parse_user(std::string_view text, std::uint64_t& out);
bool parse_op(std::string_view text, Op& out);
bool parse_tags(std::string_view text, std::uint32_t& out);
int parse_tag(std::string_view text);  // its index, or -1
// The vocabularies gen writes from.
inline constexpr const char* kOpNames[] = {"read", "write", "stat", "open", "close"};
inline constexpr const char* kTagNames[] = {"net", "disk", "cache", "retry", "slow", "cold"};
}  // namespace parse

// ---- codec: LZSS (LZ77 with literal/match flags), with its decoder (codec.cc) ----------------
// Format: the input size (4 bytes, little-endian), then groups of a flag byte and up to 8
// tokens; flag bit i (LSB first) set: token i is a match, 2 bytes = 12-bit offset - 1 and
// 4-bit length - 3 (offsets 1..4096, lengths 3..18); clear: a literal byte.
namespace codec {
std::vector<std::uint8_t> compress(Bytes in);
// False if `in` is not a well-formed stream of this format.
bool decompress(Bytes in, std::vector<std::uint8_t>& out);
}  // namespace codec

// ---- checksum (checksum.cc) -------------------------------------------------------------------
namespace checksum {
// CRC-32 (IEEE, reflected, as zlib's crc32): crc32(b, crc32(a)) == crc32(a followed by b).
std::uint32_t crc32(Bytes data, std::uint32_t crc = 0);
std::uint32_t adler32(Bytes data);
}  // namespace checksum

// ---- pool: the jobs and the threads that run them (pool.cc) ------------------------------------
namespace pool {
struct Job {
  std::size_t index;  // in its round: where its result goes
  std::uint64_t seed;
  std::size_t block_size;
};
struct JobResult {
  std::uint64_t records = 0;
  std::uint64_t rejected = 0;
  std::uint64_t record_digest = 0;  // of every parsed field, in order
  std::uint64_t raw_bytes = 0;
  std::uint64_t compressed_bytes = 0;
  std::uint32_t crc32 = 0;    // of the raw block
  std::uint32_t adler32 = 0;  // of the compressed block
  bool round_trip_ok = false;
};
JobResult run_job(const Job& job);

struct RoundSummary {
  std::uint64_t jobs = 0;
  std::uint64_t records = 0;
  std::uint64_t rejected = 0;
  std::uint64_t raw_bytes = 0;
  std::uint64_t compressed_bytes = 0;
  std::uint32_t crc32 = 0;  // over every job's result, in job order
  std::vector<std::size_t> failed_jobs;  // whose round trip did not give their input back
};
RoundSummary summarize_round(const std::vector<JobResult>& results);

// A FIFO of jobs that worker threads block on.
class JobQueue {
 public:
  void push(const Job& job);
  // Waits for a job; false once the queue is closed and empty.
  bool pop(Job& job);
  void close();

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<Job> jobs_;
  bool closed_ = false;
};

// Runs rounds of jobs on `threads` threads, started once.
class WorkerPool {
 public:
  explicit WorkerPool(unsigned threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  // Queues every job and returns when all have run; result i is job i's.
  std::vector<JobResult> run_round(const std::vector<Job>& jobs);

 private:
  void worker_main(unsigned id);
  void job_done();

  JobQueue queue_;
  std::vector<JobResult> results_;  // each element written by the worker that ran its job
  std::mutex done_mutex_;
  std::condition_variable all_done_;
  std::size_t pending_ = 0;  // jobs of this round not finished yet
  std::vector<std::thread> threads_;
};
}  // namespace pool
