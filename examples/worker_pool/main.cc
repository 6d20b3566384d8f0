// worker_pool — a multithreaded program for tramway's tracer to trace (`tramway record` in the
// README, and the end-to-end tests).
//
// A pool of --threads workers takes --jobs jobs a round off a queue. Each job generates a
// block of key=value records from a seeded PRNG (gen::), parses it into records (parse::),
// compresses it with an LZSS codec and checks that decompressing gives the block back
// (codec::), and checksums it with CRC-32 and Adler-32 (checksum::); the round's results are
// combined in job order (pool::). One namespace a stage, so that a glob such as 'codec::*'
// selects a stage. The functions are real ones (worker_pool.h: WP_NOINLINE), nested up to
// seven deep: pool::WorkerPool::worker_main -> pool::run_job -> parse::parse_block ->
// parse::parse_record -> parse::parse_field -> parse::parse_tags -> parse::parse_tag.
// Calls a default round makes, roughly: codec:: 22 million, gen:: and parse:: 7 million each,
// checksum:: and pool:: a few per job (--jobs and --block-size scale them).
//
// It links no tramway library: it is compiled with patchable function entries, and the tracer
// preloads its agent into it. stdout depends on the arguments only (not on the number of
// threads or their scheduling, nor on being traced), so a traced and an untraced run print the
// same bytes:
//   round 1: 2000 jobs, 474593 records (7657 rejected), 32834377 -> 8138237 bytes, crc32 0x9f771b9f
//   total: 1 round, 2000 jobs, 474593 records (7657 rejected), 32834377 -> 8138237 bytes (24.8%), ...
// --rounds 0 runs rounds until SIGINT or SIGTERM (the round under way completes), then prints
// the total.
//
// Exit status: 0 done, 1 a round trip did not give a job's block back, 2 bad arguments.

#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>

#include "worker_pool.h"

namespace {

std::atomic<bool> g_stop{false};
static_assert(std::atomic<bool>::is_always_lock_free, "set from a signal handler");

extern "C" void request_stop(int) { g_stop.store(true, std::memory_order_relaxed); }

void add(pool::RoundSummary& total, const pool::RoundSummary& round) {
  total.jobs += round.jobs;
  total.records += round.records;
  total.rejected += round.rejected;
  total.raw_bytes += round.raw_bytes;
  total.compressed_bytes += round.compressed_bytes;
}

}  // namespace

int main(int argc, char** argv) {
  unsigned threads = 4;
  std::uint64_t jobs = 2000;
  std::uint64_t block_size = 16384;
  std::uint64_t seed = 1;
  std::uint64_t rounds = 1;
  bool quiet = false;
  bool verbose = false;

  CLI::App app{"Runs jobs (generate, parse, compress, checksum) on a pool of threads; the program tramway's "
               "tracer examples trace."};
  app.add_option("--threads", threads, "worker threads")->capture_default_str()->check(CLI::Range(1u, 256u));
  app.add_option("--jobs", jobs, "jobs a round")->capture_default_str()->check(CLI::Range(1u, 10'000'000u));
  app.add_option("--block-size", block_size, "bytes of input a job generates (at least)")
      ->capture_default_str()
      ->check(CLI::Range(std::uint64_t{16}, std::uint64_t{64} << 20));
  app.add_option("--seed", seed, "PRNG seed: the same seed, the same output")->capture_default_str();
  app.add_option("--rounds", rounds, "rounds to run; 0: until SIGINT or SIGTERM")->capture_default_str();
  app.add_flag("--quiet", quiet, "print the total only, not a line a round");
  app.add_flag("--verbose", verbose, "also print each round's wall time, to stderr");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }

  if (rounds == 0) {
    struct sigaction sa {};
    sa.sa_handler = request_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
  }

  pool::WorkerPool workers(threads);
  pool::RoundSummary total;
  std::uint64_t round = 0;
  std::vector<pool::Job> batch(jobs);
  while ((rounds == 0 || round < rounds) && !g_stop.load(std::memory_order_relaxed)) {
    ++round;
    for (std::size_t i = 0; i < batch.size(); ++i) batch[i] = {i, gen::job_seed(seed, round, i), block_size};
    const auto t0 = std::chrono::steady_clock::now();
    const pool::RoundSummary s = pool::summarize_round(workers.run_round(batch));
    if (verbose) {
      const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - t0;
      std::fprintf(stderr, "worker_pool: round %llu took %.1f ms\n", static_cast<unsigned long long>(round),
                   took.count());
    }
    if (!s.failed_jobs.empty()) {
      for (std::size_t job : s.failed_jobs)
        std::fprintf(stderr, "worker_pool: round %llu, job %zu: decompress(compress(block)) != block\n",
                     static_cast<unsigned long long>(round), job);
      return 1;
    }
    add(total, s);
    if (!quiet) {
      std::printf("round %llu: %llu jobs, %llu records (%llu rejected), %llu -> %llu bytes, crc32 0x%08x\n",
                  static_cast<unsigned long long>(round), static_cast<unsigned long long>(s.jobs),
                  static_cast<unsigned long long>(s.records), static_cast<unsigned long long>(s.rejected),
                  static_cast<unsigned long long>(s.raw_bytes), static_cast<unsigned long long>(s.compressed_bytes),
                  s.crc32);
      std::fflush(stdout);  // one line a round, also through a pipe
    }
  }

  // Integer arithmetic: the percentage must print the same everywhere.
  const std::uint64_t permille = total.raw_bytes ? (total.compressed_bytes * 1000 + total.raw_bytes / 2) / total.raw_bytes : 0;
  std::printf("total: %llu round%s, %llu jobs, %llu records (%llu rejected), %llu -> %llu bytes (%llu.%llu%%), "
              "every round trip verified\n",
              static_cast<unsigned long long>(round), round == 1 ? "" : "s", static_cast<unsigned long long>(total.jobs),
              static_cast<unsigned long long>(total.records), static_cast<unsigned long long>(total.rejected),
              static_cast<unsigned long long>(total.raw_bytes), static_cast<unsigned long long>(total.compressed_bytes),
              static_cast<unsigned long long>(permille / 10), static_cast<unsigned long long>(permille % 10));
  return 0;
}
