// bench/noinline.h — BENCH_NOINLINE, for the functions a benchmark measures.
//
// GCC's noipa keeps it from inlining the measured functions or looking into them (inferring
// they are const, cloning them for a constant argument, folding identical ones). Clang has
// no noipa (and -Werror rejects unknown attributes); noinline is what it offers.
#pragma once

#if defined(__clang__)
#define BENCH_NOINLINE __attribute__((noinline))
#else
#define BENCH_NOINLINE __attribute__((noipa))
#endif
