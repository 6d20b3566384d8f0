// trace/report/histogram.h — call durations in bounded memory: a log-linear histogram.
//
// Durations below 128 ns are counted exactly; above, each power of two is cut into 64 equal
// buckets, so no bucket is wider than 1/64 of its lower bound. A percentile is the midpoint of
// its bucket, clamped to the exact minimum and maximum: within kMaxRelativeError (1/128, 0.79%)
// of the exact nearest-rank value, and exact below 128 ns. Memory is one counter per bucket
// between the smallest and the largest duration seen — at most kMaxBuckets (3,776, 30 KiB)
// whatever the number of calls, a few hundred for durations within a few decades. Count, sum,
// minimum and maximum are exact; the standard deviation comes from Welford's running variance
// (merged with Chan's formula), exact but for floating-point rounding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tramway::trace::report {

class DurationHistogram {
 public:
  static constexpr std::uint64_t kExactBelow = 128;
  static constexpr double kMaxRelativeError = 1.0 / 128;
  static constexpr std::size_t kMaxBuckets = 128 + 57 * 64;

  void add(std::uint64_t ns);
  void merge(const DurationHistogram& other);

  std::uint64_t count() const noexcept { return count_; }
  std::uint64_t min() const noexcept { return count_ ? min_ : 0; }
  std::uint64_t max() const noexcept { return max_; }
  double mean() const noexcept { return mean_; }
  double stddev() const noexcept;  // population standard deviation; 0 for fewer than 2 calls
  // Nearest rank: the smallest duration at least `pct` percent of the calls do not exceed
  // (0 < pct <= 100), within kMaxRelativeError; 0 when empty.
  std::uint64_t percentile(double pct) const noexcept;

  // Calls per power of two, [2^k, 2^(k+1)) as {2^k, calls} (0 ns counts in [1, 2)), from the
  // smallest non-empty one to the largest, empty ones between included.
  struct Log2Bucket {
    std::uint64_t lower;
    std::uint64_t calls;
  };
  std::vector<Log2Bucket> log2_buckets() const;

  std::size_t buckets_held() const noexcept { return counts_.size(); }  // the memory it uses

 private:
  static std::size_t index_of(std::uint64_t ns) noexcept;
  static std::uint64_t lower_of(std::size_t index) noexcept;
  static std::uint64_t width_of(std::size_t index) noexcept;

  std::vector<std::uint64_t> counts_;  // counts_[i]: calls in bucket first_ + i
  std::size_t first_ = 0;
  std::uint64_t count_ = 0, min_ = ~std::uint64_t{0}, max_ = 0;
  double mean_ = 0, m2_ = 0;  // Welford: running mean and sum of squared deviations
};

}  // namespace tramway::trace::report
