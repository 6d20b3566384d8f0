// Fixture plugin for test_hooks_dlclose: patchable functions loaded and unloaded while hooks
// are attached to them, spread over two pages so a batch writes more than one. Its destructor
// calls a hook the test sets, so a test can stop a dlclose after the loader decided to
// unload the plugin and before it unmaps it.
#define PATCHABLE extern "C" __attribute__((noinline, patchable_function_entry(13, 8)))

PATCHABLE int dlc_plugin_add(int a, int b) {
  asm volatile("");
  return a + b;
}
PATCHABLE int dlc_plugin_twice(int a) {
  asm volatile("");
  return 2 * a;
}
// Padding, so the last function lies in another page than the first two.
__attribute__((used, aligned(4096))) static void padding() { asm volatile(".skip 4096"); }
PATCHABLE int dlc_plugin_far(int a) {
  asm volatile("");
  return a - 7;
}

static void (*g_on_unload)() = nullptr;
extern "C" void dlc_plugin_on_unload(void (*fn)()) { g_on_unload = fn; }

__attribute__((destructor)) static void unloading() {
  if (g_on_unload) g_on_unload();
}
