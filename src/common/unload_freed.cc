#include "common/unload_freed.h"

#include <malloc.h>

#include <algorithm>

#include "common/eject.h"

namespace tramway::common::detail {
namespace {

// A fixed array: registration happens on first use, possibly in a thread that must not
// allocate twice; more objects than this are simply never freed.
constexpr int kMaxObjects = 64;
std::atomic<UnloadFreedBase*> g_objects[kMaxObjects];
std::atomic<int> g_count{0};

// Newest first: an object made later may refer to one made earlier, never the reverse.
__attribute__((destructor(101))) void free_unload_freed_objects() {
  if (!ejecting()) return;
  for (int i = std::min(g_count.load(std::memory_order_acquire), kMaxObjects) - 1; i >= 0; --i) {
    if (UnloadFreedBase* o = g_objects[i].exchange(nullptr)) o->free_now();
  }
  // What tramway's threads allocated and freed stays in their malloc arenas as touched free
  // memory (the symbol tables of a discovery are megabytes); give those pages back, so that
  // the process's RSS after an eject is what it was before the injection.
  malloc_trim(0);
}

}  // namespace

void register_unload_freed(UnloadFreedBase* object) noexcept {
  const int i = g_count.fetch_add(1, std::memory_order_acq_rel);
  if (i < kMaxObjects) g_objects[i].store(object, std::memory_order_release);
}

}  // namespace tramway::common::detail
