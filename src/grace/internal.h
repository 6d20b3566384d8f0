// Internals shared by the grace layer's flavors. Not installed.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>

#include "tramway/grace.h"

namespace tramway::grace::detail {

// The stall threshold: TRAMWAY_GRACE_STALL_SECONDS, default 10 s.
std::int64_t stall_threshold_ns();
void count_stall_report() noexcept;

// "pc 0x401234 (main+0x14)", the symbol when dladdr knows one.
std::string describe_pc(std::uintptr_t pc);
// The region nesting depth of a registered thread's marker (0 if it has none).
std::uint32_t marker_depth(pid_t tid);

// trace.cc, for the tasks flavor. A trace grace period of its own (shared with synchronize()
// callers that arrive meanwhile) that calls `after_flip` once the phase has flipped.
Status trace_grace_period_with(Wait wait, const std::function<void()>& after_flip);
std::uint64_t phase_flips() noexcept;
// In a signal handler on the thread itself (async-signal-safe): true when the thread is in no
// read-side region that began before the first phase flip after `flips_before` was read.
bool quiet_since(std::uint64_t flips_before) noexcept;

// Whether grace periods can run (membarrier registered, and working if it failed last time):
// checked before unpublishing something that then needs one (hooks::detach). Costs no system
// call while membarrier works.
Status grace_periods_usable();
// For tests: the next `count` grace periods fail (as if membarrier had been refused).
void inject_grace_period_failures(int count) noexcept;

// tasks.cc: synchronize(Flavor::tasks), and its part of holdouts().
Status synchronize_tasks(Wait wait);
std::vector<Holdout> tasks_holdouts();
void tasks_stats(Stats& s) noexcept;
void tasks_before_fork();
void tasks_after_fork_in_parent();
void tasks_after_fork_in_child();

}  // namespace tramway::grace::detail
