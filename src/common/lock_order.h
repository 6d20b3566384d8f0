// The one lock order of tramway: every lock a fork() handler takes, outermost first. A thread
// that holds one of them may take only locks further down the list; fork()'s prepare step
// takes all of them in this order (common/fork_hooks.h runs the layers' hooks by rank), so a
// child never inherits one held by a thread that does not exist in it, and fork() cannot
// deadlock against a thread that nests them.
//
//   rank             lock (file)                                 held across (what it nests)
//   fork_hooks       the fork-hook registry (common/fork_hooks.cc) fork() itself
//   trace_recording  Recording::mutex (trace/recorder.cc)          hooks::attach/detach, so
//                                                                 a whole grace period
//   hooks_tables     g_mu, the hook tables (sites/hooks/hooks.cc)  site discovery, a patch
//                                                                 batch, code allocation,
//                                                                 grace::call; may be held
//                                                                 across a grace period
//   grace_period     g_gp_mu (grace/trace.cc)                      a trace grace period: the
//                                                                 registry scans
//   text             the patch lock, then the fix-up request lock, a batch (PC fix-up
//                    the handler table spin lock, code memory      waits for signal answers)
//                    (text/patch.cc, signal_router.cc,
//                    code_memory.cc)
//   grace_leaves     tasks' retired ranges and holdouts, the      nothing: short sections
//                    callback queue, the thread registry           (malloc at most)
//                    (grace/tasks.cc, grace/trace.cc)
//
// Why this order: each layer calls downwards while holding its own lock (the recorder attaches
// hooks, hooks run batches and queue grace callbacks), so upper layers come first. The grace
// leaves come last because any thread takes the registry lock on its first read-side region,
// whatever it holds then.
//
// Not in the list, because fork() does not take them: tasks' g_tasks_mu (held for a whole
// tasks grace period, which waits for every thread to be observed; a child re-initialises
// it) and the agent's mutex (a child never uses the agent).
//
// Two rules follow. Code inside a read-side region (a hook callback) must take none of these
// locks: a grace period may be waiting for that region while the lock's holder waits for the
// grace period (trace::detach does). And nothing may fork() inside a read-side region: fork
// waits for the grace period in progress, which waits for that region.
#pragma once

namespace tramway::common {

enum class LockRank : int {
  fork_hooks = 0,
  trace_recording = 10,
  hooks_tables = 20,
  grace_period = 30,
  text = 40,
  grace_leaves = 50,
};

}  // namespace tramway::common
