// The one lock order of tramway: every lock a fork() handler takes, outermost first. A thread
// that holds one of them may take only locks further down the list; fork()'s prepare step
// takes all of them in this order (common/fork_hooks.h runs the layers' hooks by rank), so a
// child never inherits one held by a thread that does not exist in it, and fork() cannot
// deadlock against a thread that nests them.
//
//   rank             lock (file)                                 held across (what it nests)
//   fork_hooks       the fork-hook registry (common/fork_hooks.cc) fork() itself
//   loader_gate      the loader gate (common/loader_gate.h): held  a dlopen or dlclose (its
//                    shared by each dlopen/dlclose tramway makes   constructors, destructors)
//                    or interposes and by each tramway API before  and a whole tramway API
//                    any lock below; the loader's own lock nests   call (grace periods)
//                    inside it, so it comes first
//   trace_recording  Recording::mutex (trace/recorder.cc)          hooks::attach/detach, so
//                                                                 a whole grace period
//   grace_period     g_gp_mu (grace/trace.cc)                      a trace grace period: it
//                                                                 waits for read-side regions
//   hooks_tables     g_mu, the hook tables (sites/hooks/hooks.cc)  site discovery, a patch
//                                                                 batch, code allocation,
//                                                                 grace::call
//   text             the patch lock, then the fix-up request lock, a batch (PC fix-up
//                    the handler table spin lock, code memory      waits for signal answers)
//                    (text/patch.cc, signal_router.cc,
//                    code_memory.cc)
//   grace_leaves     tasks' retired ranges and holdouts, the      nothing: short sections
//                    callback queue, the thread registry           (malloc at most)
//                    (grace/tasks.cc, grace/trace.cc)
//
// Why this order: each layer calls downwards while holding its own lock (the recorder attaches
// and detaches hooks, so waits for grace periods; hooks run batches and queue grace callbacks),
// so upper layers come first. The grace-period lock comes right after the recorder's, before
// every lock code inside a read-side region may take: a grace period waits for those regions,
// so a fork() that held such a lock while waiting for the grace-period lock would wait for a
// region waiting for it. The grace leaves come last because any thread takes the registry
// lock on its first read-side region, whatever it holds then.
//
// Not in the list, because fork() does not take them: tasks' g_tasks_mu (held for a whole
// tasks grace period, which waits for every thread to be observed; a child re-initialises
// it) and the agent's mutex (a child never uses the agent).
//
// The rules that follow:
//  * Nothing holds a lock ranked after grace_period (the hook tables, the text layer's, the
//    leaves) across a grace period: code inside read-side regions (hook callbacks: hooks::
//    disable, counters, static-key flips) may take those.
//  * Code inside a read-side region takes no lock ranked grace_period or before: no trace::
//    call from a hook callback (trace::detach holds the recorder's lock across a grace period;
//    synchronize() already refuses to run there).
//  * Nothing fork()s inside a read-side region: fork waits for the grace period in progress,
//    which waits for that region.
#pragma once

namespace tramway::common {

enum class LockRank : int {
  fork_hooks = 0,
  loader_gate = 5,
  trace_recording = 10,
  grace_period = 20,
  hooks_tables = 30,
  text = 40,
  grace_leaves = 50,
};

}  // namespace tramway::common
