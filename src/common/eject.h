// common/eject.h — what each of tramway's libraries does when the agent ejects
// (`tramway live PID eject`, agent/eject.h orders the steps). While a process runs, tramway
// keeps some things for its whole life on purpose (code arenas, entry pads, thread rings, the
// grace engine's thread, signal handlers behind the router); eject gives them back so that the
// libraries can be unloaded and leave nothing behind.
//
// Order: the recording is stopped and every hook detached first; then give_back_signals,
// stop_callback_thread, a tasks-style watch over tramway's own text, release_fixup_signal,
// no handler in flight, then mark_ejecting. From
// then on the libraries' destructors (run by the loader's dlclose) unmap and close what they
// kept. A process that never ejects is not affected: the destructors do nothing unless
// mark_ejecting was called.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "tramway/status.h"

namespace tramway::common {
void mark_ejecting() noexcept;
bool ejecting() noexcept;
}  // namespace tramway::common

namespace tramway::text::detail {
// Every signal whose handler is the router's goes back to what the program last installed
// (through sigaction, or what it had when tramway loaded), but the fix-up signal, which the
// watch over tramway's text still needs. The router is not installed again by later uses.
Status give_back_signals();
// The fix-up signal back to what it was before tramway (pending ones discarded).
Status release_fixup_signal();
// After an eject of a preloaded agent, for a new injection: the router installs itself again.
Status take_signals_again();
// An injected agent: the program's later sigaction & co. must reach the router (got_redirect.h);
// give_back_signals undoes it.
void bring_interposers_in_front() noexcept;
// The signals whose handler runs behind the router's wrapper now (for `live status`).
std::vector<int> wrapped_signals();
// Handlers of the router running now, on any thread.
int handlers_in_flight() noexcept;
}  // namespace tramway::text::detail

namespace tramway::grace::detail {
// Runs the callbacks queued so far, then ends the callback thread and unmaps its stack.
void stop_callback_thread();
}  // namespace tramway::grace::detail

namespace tramway::trace::detail {
// Threads still inside a call the tracer hijacked the return of (its return address is the
// tracer's return trampoline), with the function: they must return before the tracer unloads.
std::vector<std::pair<pid_t, std::uintptr_t>> threads_in_traced_calls();
}  // namespace tramway::trace::detail
