// Fixture for test_hooks_dlclose: a plugin (not patchable itself) that needs dlclose_dep.so.
extern "C" int dlc_dep_value(int a);
extern "C" int dlc_user_value(int a) { return dlc_dep_value(a) + 1; }
