#include "common/eject.h"

#include <atomic>

namespace tramway::common {
namespace {
std::atomic<bool> g_ejecting{false};
}  // namespace
void mark_ejecting() noexcept { g_ejecting.store(true, std::memory_order_release); }
bool ejecting() noexcept { return g_ejecting.load(std::memory_order_acquire); }
}  // namespace tramway::common
