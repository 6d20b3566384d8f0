// Compile-time checks of static calls. Built without any SC_COMPILE_FAIL_* definition it
// must compile (the positive control); each definition adds exactly one ill-typed line that
// must make the build fail.
#include <string>

#include "tramway/static_call.h"

int takes_int(int x) { return x + 1; }
long takes_long(long x) { return x + 2; }
int also_takes_int(int x) { return x + 3; }
void takes_nothing() {}
std::string makes_string() { return "s"; }

TRAMWAY_DEFINE_STATIC_CALL(check_call, takes_int);
TRAMWAY_DEFINE_STATIC_CALL_NULL(check_null, void());
TRAMWAY_DEFINE_STATIC_CALL_RET0(check_ret0, int(int));

#if defined(SC_COMPILE_FAIL_NULL_NON_VOID)
TRAMWAY_DEFINE_STATIC_CALL_NULL(check_bad_null, int());
#endif
#if defined(SC_COMPILE_FAIL_RET0_CLASS_RETURN)
TRAMWAY_DEFINE_STATIC_CALL_RET0(check_bad_ret0, std::string());
#endif

int main() {
  int r = 0;
  // The well-typed forms of every line below.
  r += tramway::static_call_update(check_call, &also_takes_int).ok();
  r += check_call.update(&also_takes_int).ok();
  r += TRAMWAY_STATIC_CALL(check_call)(1);
  r += tramway::static_call_update(check_null, &takes_nothing).ok();
  r += tramway::static_call_update(check_ret0, &takes_int).ok();
  TRAMWAY_STATIC_CALL(check_null)();
#if defined(SC_COMPILE_FAIL_UPDATE_WRONG_TYPE)
  r += tramway::static_call_update(check_call, &takes_long).ok();
#endif
#if defined(SC_COMPILE_FAIL_MEMBER_UPDATE_WRONG_TYPE)
  r += check_call.update(&takes_long).ok();
#endif
#if defined(SC_COMPILE_FAIL_CALL_WRONG_ARG_TYPE)
  r += TRAMWAY_STATIC_CALL(check_call)("a string");
#endif
#if defined(SC_COMPILE_FAIL_CALL_WRONG_ARG_COUNT)
  r += TRAMWAY_STATIC_CALL(check_call)(1, 2);
#endif
  (void)takes_long;
  (void)makes_string;
  return r == 0;
}
