// common/unload_freed.h — an object tramway keeps for the whole life of the process and frees
// only when its library is unloaded after an eject.
//
// Tables such as the patch lock's scratch space or the grace engine's thread registry are
// "leaked on purpose": a thread may exit, or a handler run, after the library's static
// destructors, so they must outlive them. After an eject (common/eject.h) nothing of tramway
// runs any more, and every such object is freed by one destructor that the loader runs last
// (priority 101 runs after the plain destructors and the C++ static ones), so that 1,000
// inject/eject cycles leave the heap as they found it; then malloc_trim gives the free pages
// of every arena back. Without an eject nothing is freed.
// Created on first use, lock-free (two racing first uses build two, one is deleted).
// Only for libtramway's own objects: the registry's destructor lives in libtramway, and it
// must not call into a library (the agent) unloaded before it.
#pragma once

#include <atomic>

namespace tramway::common {

namespace detail {
class UnloadFreedBase {
 public:
  virtual void free_now() noexcept = 0;

 protected:
  constexpr UnloadFreedBase() = default;
};
void register_unload_freed(UnloadFreedBase* object) noexcept;
}  // namespace detail

template <typename T>
class UnloadFreed final : detail::UnloadFreedBase {
 public:
  constexpr UnloadFreed() = default;
  UnloadFreed(const UnloadFreed&) = delete;
  UnloadFreed& operator=(const UnloadFreed&) = delete;

  T& get() {
    T* p = p_.load(std::memory_order_acquire);
    if (p) return *p;
    T* fresh = new T;
    if (p_.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
      detail::register_unload_freed(this);
      return *fresh;
    }
    delete fresh;
    return *p;
  }

 private:
  void free_now() noexcept override { delete p_.exchange(nullptr, std::memory_order_acq_rel); }
  std::atomic<T*> p_{nullptr};
};

}  // namespace tramway::common
