// Loaded by test_static_key with dlopen: uses a key defined (and exported) by the test
// executable, and defines a key of its own. Its branches join the registry when it loads and
// leave when it unloads.
#include "tramway/static_key.h"

TRAMWAY_DECLARE_STATIC_KEY_FALSE(exe_key_for_plugin);
TRAMWAY_STATIC_KEY_FALSE(plugin_own_key);

extern "C" {
__attribute__((visibility("default"), noinline)) int plugin_reads_exe_key() {
  return TRAMWAY_STATIC_BRANCH_UNLIKELY(exe_key_for_plugin) ? 1 : 0;
}
__attribute__((visibility("default"), noinline)) int plugin_reads_exe_key_likely() {
  return TRAMWAY_STATIC_BRANCH_LIKELY(exe_key_for_plugin) ? 1 : 0;
}
__attribute__((visibility("default"), noinline)) int plugin_reads_own_key() {
  return TRAMWAY_STATIC_BRANCH_UNLIKELY(plugin_own_key) ? 1 : 0;
}
__attribute__((visibility("default"))) tramway::StaticKey* plugin_own_key_address() { return &plugin_own_key; }
}
