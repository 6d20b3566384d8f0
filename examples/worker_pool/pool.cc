// pool — what one job does, and the threads that run jobs off a queue.
#include <pthread.h>

#include <algorithm>
#include <cstdio>

#include "worker_pool.h"

namespace pool {

// Folds every field of every record, in order, into 64 bits (FNV-1a over the fields).
WP_NOINLINE std::uint64_t digest_records(const std::vector<parse::Record>& records) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](std::uint64_t v) { h = (h ^ v) * 0x100000001b3ull; };
  for (const parse::Record& r : records) {
    mix(r.id);
    mix(r.user);
    mix(r.bytes);
    mix(r.latency_us);
    mix(static_cast<std::uint64_t>(r.op) << 32 | r.tags);
  }
  return h;
}

WP_NOINLINE bool verify_round_trip(Bytes raw, Bytes packed) {
  std::vector<std::uint8_t> back;
  return codec::decompress(packed, back) && std::equal(back.begin(), back.end(), raw.begin(), raw.end());
}

WP_NOINLINE JobResult run_job(const Job& job) {
  const std::string text = gen::generate_block(job.seed, job.block_size);
  const parse::Block block = parse::parse_block(text);
  const Bytes raw = as_bytes(text);
  const std::vector<std::uint8_t> packed = codec::compress(raw);
  JobResult r;
  r.records = block.records.size();
  r.rejected = block.rejected;
  r.record_digest = digest_records(block.records);
  r.raw_bytes = raw.size();
  r.compressed_bytes = packed.size();
  r.crc32 = checksum::crc32(raw);
  r.adler32 = checksum::adler32(packed);
  r.round_trip_ok = verify_round_trip(raw, packed);
  return r;
}

WP_NOINLINE RoundSummary summarize_round(const std::vector<JobResult>& results) {
  RoundSummary s;
  s.jobs = results.size();
  for (std::size_t i = 0; i < results.size(); ++i) {
    const JobResult& r = results[i];
    s.records += r.records;
    s.rejected += r.rejected;
    s.raw_bytes += r.raw_bytes;
    s.compressed_bytes += r.compressed_bytes;
    if (!r.round_trip_ok) s.failed_jobs.push_back(i);
    // Little-endian words, so that the value is the same on every host and in job order
    // whichever thread ran which job.
    const std::uint64_t words[] = {r.crc32, r.adler32, r.record_digest, r.records, r.rejected, r.compressed_bytes};
    std::uint8_t bytes[sizeof words];
    for (std::size_t w = 0; w < std::size(words); ++w)
      for (std::size_t b = 0; b < 8; ++b) bytes[w * 8 + b] = static_cast<std::uint8_t>(words[w] >> (8 * b));
    s.crc32 = checksum::crc32(bytes, s.crc32);
  }
  return s;
}

// ---- the queue --------------------------------------------------------------------------------
WP_NOINLINE void JobQueue::push(const Job& job) {
  {
    std::lock_guard lock(mutex_);
    jobs_.push_back(job);
  }
  ready_.notify_one();
}

WP_NOINLINE bool JobQueue::pop(Job& job) {
  std::unique_lock lock(mutex_);
  ready_.wait(lock, [this] { return closed_ || !jobs_.empty(); });
  if (jobs_.empty()) return false;
  job = jobs_.front();
  jobs_.pop_front();
  return true;
}

WP_NOINLINE void JobQueue::close() {
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
  }
  ready_.notify_all();
}

// ---- the workers ------------------------------------------------------------------------------
WorkerPool::WorkerPool(unsigned threads) {
  threads_.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this, i] { worker_main(i); });
}

WorkerPool::~WorkerPool() {
  queue_.close();
  for (std::thread& t : threads_) t.join();
}

WP_NOINLINE std::vector<JobResult> WorkerPool::run_round(const std::vector<Job>& jobs) {
  results_.assign(jobs.size(), {});
  {
    std::lock_guard lock(done_mutex_);
    pending_ = jobs.size();
  }
  for (const Job& job : jobs) queue_.push(job);
  std::unique_lock lock(done_mutex_);
  all_done_.wait(lock, [this] { return pending_ == 0; });
  return std::move(results_);
}

WP_NOINLINE void WorkerPool::job_done() {
  std::lock_guard lock(done_mutex_);  // also publishes the result to run_round
  if (--pending_ == 0) all_done_.notify_one();
}

WP_NOINLINE void WorkerPool::worker_main(unsigned id) {
  // Named, so that a trace tells the workers apart ("wp-worker-3").
  char name[16];
  std::snprintf(name, sizeof name, "wp-worker-%u", id);
  pthread_setname_np(pthread_self(), name);
  for (Job job; queue_.pop(job);) {
    results_[job.index] = run_job(job);
    job_done();
  }
}

}  // namespace pool
