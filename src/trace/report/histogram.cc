// The log-linear duration histogram (histogram.h).
#include "trace/report/histogram.h"

#include <algorithm>
#include <bit>
#include <cmath>

namespace tramway::trace::report {

// Bucket i < 128 holds the duration i. Above, a duration v with e = bit_width(v) - 7 >= 1 has
// m = v >> e in [64, 128): it goes to 128 + (e - 1) * 64 + (m - 64), which holds
// [m << e, (m + 1) << e), 2^e wide, its lower bound at least 64 * 2^e.
std::size_t DurationHistogram::index_of(std::uint64_t ns) noexcept {
  if (ns < kExactBelow) return static_cast<std::size_t>(ns);
  const unsigned e = static_cast<unsigned>(std::bit_width(ns)) - 7;
  return 128 + (e - 1) * 64 + static_cast<std::size_t>((ns >> e) - 64);
}

std::uint64_t DurationHistogram::lower_of(std::size_t index) noexcept {
  if (index < kExactBelow) return index;
  const std::size_t e = (index - 128) / 64 + 1;
  return (64 + (index - 128) % 64) << e;
}

std::uint64_t DurationHistogram::width_of(std::size_t index) noexcept {
  return index < kExactBelow ? 1 : std::uint64_t{1} << ((index - 128) / 64 + 1);
}

void DurationHistogram::add(std::uint64_t ns) {
  const std::size_t i = index_of(ns);
  if (counts_.empty()) {
    first_ = i;
    counts_.assign(1, 0);
  } else if (i < first_) {
    counts_.insert(counts_.begin(), first_ - i, 0);
    first_ = i;
  } else if (i >= first_ + counts_.size()) {
    counts_.resize(i - first_ + 1, 0);
  }
  ++counts_[i - first_];
  ++count_;
  min_ = std::min(min_, ns);
  max_ = std::max(max_, ns);
  const double x = static_cast<double>(ns), delta = x - mean_;
  mean_ += delta / static_cast<double>(count_);
  m2_ += delta * (x - mean_);
}

void DurationHistogram::merge(const DurationHistogram& other) {
  if (other.count_ == 0) return;
  if (count_ == 0) {
    *this = other;
    return;
  }
  const std::size_t first = std::min(first_, other.first_);
  const std::size_t end = std::max(first_ + counts_.size(), other.first_ + other.counts_.size());
  if (first < first_) counts_.insert(counts_.begin(), first_ - first, 0);
  first_ = first;
  counts_.resize(end - first_, 0);
  for (std::size_t i = 0; i < other.counts_.size(); ++i) counts_[other.first_ - first_ + i] += other.counts_[i];
  const double na = static_cast<double>(count_), nb = static_cast<double>(other.count_), n = na + nb;
  const double delta = other.mean_ - mean_;
  mean_ += delta * nb / n;
  m2_ += other.m2_ + delta * delta * na * nb / n;
  count_ += other.count_;
  min_ = std::min(min_, other.min_);
  max_ = std::max(max_, other.max_);
}

double DurationHistogram::stddev() const noexcept {
  return count_ < 2 ? 0.0 : std::sqrt(std::max(0.0, m2_ / static_cast<double>(count_)));
}

std::uint64_t DurationHistogram::percentile(double pct) const noexcept {
  if (count_ == 0) return 0;
  // The ceil(pct/100 * n)-th smallest duration.
  const double exact_rank = std::ceil(pct / 100.0 * static_cast<double>(count_));
  const std::uint64_t rank = std::clamp<std::uint64_t>(static_cast<std::uint64_t>(std::max(exact_rank, 1.0)), 1, count_);
  if (rank == 1) return min_;  // the extremes are known exactly
  if (rank == count_) return max_;
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < counts_.size(); ++i) {
    seen += counts_[i];
    if (seen < rank) continue;
    const std::size_t index = first_ + i;
    const std::uint64_t mid = lower_of(index) + width_of(index) / 2;
    return std::clamp(mid, min_, max_);
  }
  return max_;  // not reached: the counts add up to count_
}

std::vector<DurationHistogram::Log2Bucket> DurationHistogram::log2_buckets() const {
  std::vector<Log2Bucket> out;
  for (std::size_t i = 0; i < counts_.size(); ++i) {
    if (counts_[i] == 0 && out.empty()) continue;
    // Every bucket lies inside one power of two (its width divides its lower bound's).
    const std::uint64_t lower = lower_of(first_ + i);
    const std::uint64_t power = lower == 0 ? 1 : std::bit_floor(lower);
    if (out.empty() || out.back().lower != power) {
      while (!out.empty() && out.back().lower * 2 < power) out.push_back({out.back().lower * 2, 0});
      out.push_back({power, 0});
    }
    out.back().calls += counts_[i];
  }
  while (!out.empty() && out.back().calls == 0) out.pop_back();
  return out;
}

}  // namespace tramway::trace::report
