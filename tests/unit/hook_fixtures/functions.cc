// Fixture library for test_hook_discovery, built by g++-12 and clang++-14 with and without
// -fpatchable-function-entry=13,8 (tests/unit/CMakeLists.txt). One function per naming case
// discovery must get right: namespaced, overloaded, extern "C" (one of them named like a
// mangled type: "f" demangles to "float"), and static (not exported, so a stripped copy has
// no name for it). Nothing else here may have a patchable entry: the
// test expects exactly these functions.
namespace hook_fx {
int add(int a, int b) { return a + b; }
}  // namespace hook_fx

int overloaded(int a) { return a * 3; }
int overloaded(double d) { return static_cast<int>(d) * 5; }

static int hidden(int a) { return a ^ 0x55; }

extern "C" int c_function(int a) { return hidden(a) + 1; }
extern "C" int f(int a) { return a - 1; }
// The static function's address, which dlsym cannot give.
extern "C" int (*hidden_address())(int) { return &hidden; }
