// Fixture for test_hooks_dlclose: a patchable library that is loaded only as the dependency
// of dlclose_user.cc, so a dlclose of that plugin unloads it too.
extern "C" __attribute__((noinline, patchable_function_entry(13, 8))) int dlc_dep_value(int a) {
  asm volatile("");
  return a * 9;
}
