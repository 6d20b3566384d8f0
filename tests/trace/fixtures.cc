// Traced by test_trace.cc. noinline keeps each a real call; the tail call is checked there.
#include "fixtures.h"

#include <pthread.h>

#include <stdexcept>

#define FX __attribute__((noinline))

namespace trace_fx {
namespace {
FX int deeper_thrower(int x) {
  if (x < 0) throw std::runtime_error("negative");
  return x + 1;
}
FX int deeper_jumper(std::jmp_buf* env, int x) {
  if (x < 0) std::longjmp(*env, 5);
  return x;
}
FX void deeper_exiter() { pthread_exit(reinterpret_cast<void*>(42)); }
}  // namespace

FX int leaf(int x) { return x * 3 + 1; }
FX int middle(int x) { return leaf(x) + leaf(x + 1); }
FX int outer(int x) { return middle(x) + middle(x + 1) + middle(x + 2); }
FX double scale(double x, double y) { return x * y + 0.5; }
FX Pair pair(long a, long b) { return Pair{a + b, a - b}; }
FX long double extended(long double x) { return x * 2.5L; }
FX double weigh8(double a, double b, double c, double d, double e, double f, double g, double h) {
  return a + 2 * b + 4 * c + 8 * d + 16 * e + 32 * f + 64 * g + 128 * h;
}
FX int untraced_leaf(int x) { return x + 11; }
FX int tail_callee(int x) { return leaf(x) * 7; }
FX int tail_caller(int x) { return tail_callee(x + 1); }
FX int recurse(int depth) {
  if (depth <= 1) return 1;
  int r = recurse(depth - 1) + 1;
  asm volatile("" : "+r"(r));  // not a tail call: the frame stays
  return r;
}
FX int thrower(int x) { return deeper_thrower(x) * 2; }
FX int catcher(int x) {
  try {
    return thrower(x);
  } catch (const std::runtime_error&) {
    return -1;
  }
}
FX int rethrower(int x) {
  try {
    return thrower(x);
  } catch (...) {
    throw;
  }
}
FX int jumper(std::jmp_buf* env, int x) { return deeper_jumper(env, x) + 1; }
FX int waiter(volatile int* flag) {
  while (*flag == 0) {
  }
  return 7;
}
FX void exiter() { deeper_exiter(); }
FX void cancel_point(volatile int* started) {
  *started = 1;
  for (;;) pthread_testcancel();
}

}  // namespace trace_fx
