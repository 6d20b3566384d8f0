// DurationHistogram (trace/report/histogram.h): the stated error bound against exact
// nearest-rank percentiles, bounded memory, merging, and the log2 view --histogram prints.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "trace/report/histogram.h"

namespace {

using tramway::trace::report::DurationHistogram;

std::uint64_t exact_percentile(const std::vector<std::uint64_t>& sorted, double pct) {
  const auto n = static_cast<double>(sorted.size());
  const auto rank = std::clamp<std::size_t>(static_cast<std::size_t>(std::ceil(pct / 100.0 * n)), 1, sorted.size());
  return sorted[rank - 1];
}

// Log-uniform over [1, 2^40): every bucket size in play, 10^5 values.
std::vector<std::uint64_t> spread_values() {
  std::mt19937_64 rng(42);
  std::uniform_real_distribution<double> exponent(0.0, 40.0);
  std::vector<std::uint64_t> v(100'000);
  for (auto& x : v) x = static_cast<std::uint64_t>(std::exp2(exponent(rng)));
  return v;
}

TEST(DurationHistogram, PercentilesAreWithinTheStatedErrorOfTheExactOnes) {
  std::vector<std::uint64_t> values = spread_values();
  DurationHistogram h;
  for (std::uint64_t v : values) h.add(v);
  std::sort(values.begin(), values.end());
  for (double pct = 0.5; pct <= 100.0; pct += 0.5) {
    const double exact = static_cast<double>(exact_percentile(values, pct));
    const double got = static_cast<double>(h.percentile(pct));
    EXPECT_LE(std::abs(got - exact), exact * DurationHistogram::kMaxRelativeError) << "p" << pct;
  }
  for (double pct : {99.9, 99.99}) {
    const double exact = static_cast<double>(exact_percentile(values, pct));
    EXPECT_LE(std::abs(static_cast<double>(h.percentile(pct)) - exact), exact * DurationHistogram::kMaxRelativeError);
  }
  EXPECT_EQ(h.percentile(100), values.back());
  EXPECT_EQ(h.min(), values.front());
  EXPECT_EQ(h.max(), values.back());
  EXPECT_EQ(h.count(), values.size());
  EXPECT_LE(DurationHistogram::kMaxRelativeError, 0.01);
}

TEST(DurationHistogram, ShortDurationsAreExact) {
  DurationHistogram h;
  std::vector<std::uint64_t> values;
  for (std::uint64_t v = 0; v < DurationHistogram::kExactBelow; ++v)
    for (std::uint64_t k = 0; k <= v % 3; ++k) {
      h.add(v);
      values.push_back(v);
    }
  for (double pct = 1; pct <= 100; pct += 1) EXPECT_EQ(h.percentile(pct), exact_percentile(values, pct)) << pct;
}

TEST(DurationHistogram, MeanAndStandardDeviationAreThoseOfTheCalls) {
  DurationHistogram h;
  for (std::uint64_t v = 1; v <= 1000; ++v) h.add(v);
  EXPECT_DOUBLE_EQ(h.mean(), 500.5);
  EXPECT_NEAR(h.stddev(), std::sqrt((1000.0 * 1000.0 - 1) / 12), 1e-6);  // population, of 1..n
  DurationHistogram one;
  one.add(7);
  EXPECT_EQ(one.stddev(), 0.0);
  EXPECT_EQ(DurationHistogram().percentile(50), 0u);
  EXPECT_EQ(DurationHistogram().min(), 0u);
}

TEST(DurationHistogram, MemoryIsBoundedWhateverTheCalls) {
  DurationHistogram narrow;  // 10^6 calls between 1 and 2 µs: one power of two
  std::mt19937_64 rng(1);
  for (int i = 0; i < 1'000'000; ++i) narrow.add(1024 + rng() % 1024);
  EXPECT_LE(narrow.buckets_held(), 64u);
  DurationHistogram wide;  // every duration a 64-bit count can hold
  wide.add(0);
  wide.add(~std::uint64_t{0});
  for (int i = 0; i < 100'000; ++i) wide.add(rng());
  EXPECT_LE(wide.buckets_held(), DurationHistogram::kMaxBuckets);
  EXPECT_EQ(wide.max(), ~std::uint64_t{0});
  EXPECT_EQ(wide.percentile(100), ~std::uint64_t{0});
  EXPECT_EQ(wide.percentile(1e-9), 0u);
}

TEST(DurationHistogram, MergingEqualsAddingEverything) {
  const std::vector<std::uint64_t> values = spread_values();
  DurationHistogram all, low, high;
  for (std::size_t i = 0; i < values.size(); ++i) {
    all.add(values[i]);
    (values[i] < 5000 ? low : high).add(values[i]);  // disjoint ranges: merge must widen
  }
  DurationHistogram merged;
  merged.merge(high);
  merged.merge(DurationHistogram());
  merged.merge(low);
  EXPECT_EQ(merged.count(), all.count());
  EXPECT_EQ(merged.min(), all.min());
  EXPECT_EQ(merged.max(), all.max());
  EXPECT_EQ(merged.buckets_held(), all.buckets_held());
  for (double pct = 1; pct <= 100; pct += 1) EXPECT_EQ(merged.percentile(pct), all.percentile(pct)) << pct;
  EXPECT_NEAR(merged.mean(), all.mean(), all.mean() * 1e-9);
  EXPECT_NEAR(merged.stddev(), all.stddev(), all.stddev() * 1e-9);
}

TEST(DurationHistogram, Log2BucketsCountEachPowerOfTwoAndKeepTheGaps) {
  DurationHistogram h;
  for (std::uint64_t v : {0, 1, 1, 3, 200, 255, 256, 5000}) h.add(v);
  const auto b = h.log2_buckets();
  // [1,2): 0 and 1 twice; [2,4): 3; [4..128): empty; [128,256): 200, 255; [256,512): 256;
  // then empty up to [4096, 8192): 5000.
  ASSERT_EQ(b.size(), 13u);
  const std::vector<std::uint64_t> calls = {3, 1, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 1};
  for (std::size_t i = 0; i < b.size(); ++i) {
    EXPECT_EQ(b[i].lower, std::uint64_t{1} << i) << i;
    EXPECT_EQ(b[i].calls, calls[i]) << i;
  }
  EXPECT_TRUE(DurationHistogram().log2_buckets().empty());
}

}  // namespace
