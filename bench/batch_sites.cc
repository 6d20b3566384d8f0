// Static-key branch sites for the batch benchmarks, written out by preprocessor repetition:
// bench_batch_1 has 1 site, bench_batch_100 has 100, bench_batch_10000 has 10,000 (100
// functions of 100 sites, spread over program text as real code would be). None of this code
// runs; it only has to exist. bench_static checks the counts with tramway::branch_count().
#include <cstdint>

#include "tramway/static_key.h"

TRAMWAY_STATIC_KEY_FALSE(bench_batch_1);
TRAMWAY_STATIC_KEY_FALSE(bench_batch_100);
TRAMWAY_STATIC_KEY_FALSE(bench_batch_10000);

// Every function's taken paths bump its own slot, so no two functions are identical: GCC's
// identical code folding would otherwise emit one body for several, and with it one copy of
// their jump-table entries.
std::uint64_t bench_batch_hits[102];

#define BENCH_SITE(key, slot) \
  if (TRAMWAY_STATIC_BRANCH_UNLIKELY(key)) ++bench_batch_hits[slot];
#define BENCH_SITES_10(key, slot)                                                      \
  BENCH_SITE(key, slot) BENCH_SITE(key, slot) BENCH_SITE(key, slot) BENCH_SITE(key, slot) \
  BENCH_SITE(key, slot) BENCH_SITE(key, slot) BENCH_SITE(key, slot) BENCH_SITE(key, slot) \
  BENCH_SITE(key, slot) BENCH_SITE(key, slot)
#define BENCH_SITES_100(key, slot)                                                                 \
  BENCH_SITES_10(key, slot) BENCH_SITES_10(key, slot) BENCH_SITES_10(key, slot)                    \
  BENCH_SITES_10(key, slot) BENCH_SITES_10(key, slot) BENCH_SITES_10(key, slot)                    \
  BENCH_SITES_10(key, slot) BENCH_SITES_10(key, slot) BENCH_SITES_10(key, slot) BENCH_SITES_10(key, slot)

#define BENCH_FN(n) \
  __attribute__((noinline)) void bench_batch_10000_sites_##n() { BENCH_SITES_100(bench_batch_10000, n) }
// BENCH_FN_10(d) defines functions d0..d9; with d empty, 0..9.
#define BENCH_FN_10(d)                                                                          \
  BENCH_FN(d##0) BENCH_FN(d##1) BENCH_FN(d##2) BENCH_FN(d##3) BENCH_FN(d##4) BENCH_FN(d##5) \
  BENCH_FN(d##6) BENCH_FN(d##7) BENCH_FN(d##8) BENCH_FN(d##9)

BENCH_FN_10()
BENCH_FN_10(1)
BENCH_FN_10(2)
BENCH_FN_10(3)
BENCH_FN_10(4)
BENCH_FN_10(5)
BENCH_FN_10(6)
BENCH_FN_10(7)
BENCH_FN_10(8)
BENCH_FN_10(9)

__attribute__((noinline)) void bench_batch_100_sites() { BENCH_SITES_100(bench_batch_100, 100) }
__attribute__((noinline)) void bench_batch_1_site() { BENCH_SITE(bench_batch_1, 101) }
