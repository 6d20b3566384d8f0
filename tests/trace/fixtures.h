// Functions the trace tests trace: built with -fpatchable-function-entry=13,8 (fixtures.cc).
#pragma once

#include <csetjmp>
#include <cstdint>

namespace trace_fx {

struct Pair { long a, b; };  // returned in rax:rdx

int leaf(int x);
int middle(int x);        // calls leaf twice
int outer(int x);         // calls middle three times
double scale(double x, double y);
Pair pair(long a, long b);
long double extended(long double x);
// Every floating-point argument register, each weighted so that any one lost shows.
double weigh8(double a, double b, double c, double d, double e, double f, double g, double h);
int untraced_leaf(int x);  // hooked by a plain ops in the tests, never traced
int tail_caller(int x);   // ends in a tail call to tail_callee
int tail_callee(int x);
int recurse(int depth);   // recursion to `depth`, returns depth
int thrower(int x);       // throws std::runtime_error through two traced frames when x < 0
int catcher(int x);       // calls thrower, catches, returns -1 on an exception
int rethrower(int x);     // catches and rethrows with `throw;`
int jumper(std::jmp_buf* env, int x);  // longjmps out through two traced frames when x < 0
int waiter(volatile int* flag);        // spins until *flag != 0, returns 7
void exiter();            // pthread_exit from two traced frames down
void cancel_point(volatile int* started);  // loops on pthread_testcancel

}  // namespace trace_fx
