// The loader gate: fork() waits until no thread is inside a dlopen or dlclose that goes
// through tramway, so a child never inherits the loader's locks held.
//
// glibc 2.36 does not take its loader locks around fork(): a child forked while another
// thread is inside dlopen or dlclose inherits dl_load_write_lock held (dl_iterate_phdr then
// hangs forever) and the link map half edited (dlopen hangs, or asserts "r->r_state ==
// RT_ADD"). A child that attaches hooks calls both. So every dlopen and dlclose tramway makes
// or interposes holds the gate shared (LoaderUse), and fork's prepare step takes it
// exclusively (rank loader_gate, the first of common/lock_order.h) and holds it across fork.
//
// Which calls hold it: tramway's own (pins, sites/hooks/unload.h), the interposed dlclose, and
// the interposed dlopen for a name whose meaning does not depend on who calls (it has a '/'
// and no '$'). dlopen resolves a bare name through its caller's RUNPATH and RPATH, and "$ORIGIN"
// from the caller's directory: called from an interposer, the caller would be libtramway, so
// such names go to the real dlopen untouched (a tail jump, the caller's return address intact)
// and are not gated: a fork during one remains glibc's hazard. dlmopen is not interposed.
//
// Every tramway API that may reach a pin (hooks::attach, detach, detach_async; trace::start,
// attach, detach, stop) takes LoaderUse first, before any tramway lock: the gate is outermost,
// and a thread takes it only at its outermost use (a thread-local depth), so the nested uses —
// pins, a destructor that dlclose runs calling tramway — cost nothing and cannot self-deadlock.
//
// Not a pthread rwlock: glibc's default kind prefers readers, so two threads that dlopen and
// dlclose in a loop keep it read-locked almost all the time and a fork would never get it.
// Here a waiting fork turns new outermost users away until it has passed, except a thread
// inside a trace read-side region (a hook callback): trace::detach holds the gate across a
// grace period that waits for that region, so turning it away would deadlock the fork, the
// detach and the callback. fork waits at most 2 s, then proceeds without the gate (glibc's own
// behaviour): a dlopen constructor waiting for the forking thread, a callback under a tasks
// grace period a detach waits for, or a fork whose registry lock a loading tramway library
// needs in its constructor (common/fork_hooks.cc holds it across prepare) end that way, late
// but not hung. A fork from inside a use (a constructor, a tramway API) skips the gate.
#pragma once

namespace tramway::common {

// Holds the gate shared for its lifetime (a no-op when the thread holds it already).
class LoaderUse {
 public:
  LoaderUse() noexcept;
  ~LoaderUse();
  LoaderUse(const LoaderUse&) = delete;
  LoaderUse& operator=(const LoaderUse&) = delete;
};

namespace testing {
// How many forks proceeded without the gate because it stayed busy for the whole wait.
unsigned long loader_gate_timeouts() noexcept;
}  // namespace testing

}  // namespace tramway::common
