// Core serialisation for cross-modifying code. Intel SDM 8.1.3: a processor executing
// modified code must execute a serializing instruction after the modification;
// MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE makes every CPU running one of our threads do so
// (or guarantees it will before returning to user space).
#include "common/membarrier.h"
#include "text/internal.h"

namespace tramway::text::detail {
namespace {

common::Membarrier g_sync_core{MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
                               MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, "PRIVATE_EXPEDITED_SYNC_CORE",
                               "Linux >= 4.16 on x86-64 has it; tramway cannot serialise other threads after "
                               "rewriting code without it"};

}  // namespace

Status prepare_serialization() { return g_sync_core.prepare(); }

Status serialize_all_cores() {
  if (Status s = g_sync_core.run(); !s.ok()) return s;
  counters().serialisations.fetch_add(1, std::memory_order_relaxed);
  return {};
}

// Registration is per mm; re-register in a forked child before its first batch.
void serialize_after_fork_in_child() noexcept { g_sync_core.forget(); }

}  // namespace tramway::text::detail
