// The plugin `target --plugin` loads and unloads in a loop (tests/cli/target.cc): patchable
// functions named libplug_*, which `tramway live PID attach 'lib*'` selects while it comes
// and goes.
extern "C" {
__attribute__((noinline)) int libplug_work(int x) {
  asm volatile("" : "+r"(x));
  return x * 5 + 3;
}
__attribute__((noinline)) int libplug_idle(int x) {
  asm volatile("" : "+r"(x));
  return x;
}
}
