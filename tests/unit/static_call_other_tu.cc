// A second translation unit of test_static_call: reaches sc_add through
// TRAMWAY_DECLARE_STATIC_CALL, which must name the same trampoline as the definition.
#include "tramway/static_call.h"

TRAMWAY_DECLARE_STATIC_CALL(sc_add, int(int));

int other_tu_call_sc_add(int x) { return TRAMWAY_STATIC_CALL(sc_add)(x); }
void* other_tu_sc_add_trampoline() { return reinterpret_cast<void*>(&tramway_sc_call_sc_add); }
void* other_tu_sc_add_object_trampoline() { return reinterpret_cast<void*>(sc_add.trampoline()); }

static int times_ten(int x) { return x * 10; }
bool other_tu_update_sc_add_to_times_ten() { return tramway::static_call_update(sc_add, &times_ten).ok(); }
