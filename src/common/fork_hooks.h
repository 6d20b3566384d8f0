// fork(): one set of pthread_atfork handlers for all of tramway, registered when libtramway
// loads, that runs each layer's hook in the order of common/lock_order.h.
//
// Why not one pthread_atfork per layer: prepare handlers run in reverse registration order,
// so the order of the locks would depend on which layer registered first at run time (it did,
// and fork deadlocked against trace::detach); and a layer that registered lazily left a
// window in which a child inherited its lock held. Layers above libtramway (the tracer)
// register their hook here at their own load, by rank, without the layers below knowing them.
#pragma once

#include "common/lock_order.h"

namespace tramway::common {

struct ForkHook {
  LockRank rank;
  void (*prepare)();  // takes the layer's locks (the parent, before fork)
  void (*parent)();   // releases them (the parent, after fork)
  void (*child)();    // resets the layer's per-process state and releases them (the child)
};

// At load (a constructor): hooks of equal rank run in registration order. Prepare hooks run by
// ascending rank; parent and child hooks by descending rank, so a layer's child hook finds the
// layers below it usable.
void register_fork_hook(const ForkHook& hook) noexcept;
// At unload (a destructor) of the library that registered it.
void unregister_fork_hook(const ForkHook& hook) noexcept;

}  // namespace tramway::common
