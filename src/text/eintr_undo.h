// Takes back an EINTR that tramway's fix-up signal caused.
//
// A thread seen running is sent the fix-up signal (range_watch.cc). If it enters a blocking
// system call before the signal lands, calls such as epoll_wait, poll, nanosleep or
// sigsuspend return EINTR for any handled signal, whatever SA_RESTART says (signal(7)): the
// program would see an interruption it never asked for. The fix-up handler therefore looks at
// the context it interrupted; when it is the return of a `syscall` with -EINTR, the call's
// number is proven from the code (arch/x86_64/syscall_site.h), and the call is one that may
// simply be made again, it rewinds the thread onto the `syscall` instruction with the number
// back in %rax: after sigreturn the call is made again, as if no signal had come.
//
// Left as it is: calls outside libc.so.6 (the only object whose code is known never to be
// unmapped while the handler reads it), calls whose number cannot be proven, and an EINTR that
// the program's own handler saw first (its wrapper notes it; see note_program_handler).
// A timed wait made again waits its full timeout again unless the kernel keeps the deadline
// (absolute clocks, select's and ppoll's updated timeouts): late, never early.
#pragma once

#include <ucontext.h>

#include <cstdint>

#include "text/thread_slots.h"

namespace tramway::text::detail {

// Finds libc's code and unwind table. Called once, at the router's install (not in a handler).
void eintr_undo_init() noexcept;

// In the fix-up handler, before anything reads the frame's PC. True when the call was rewound.
bool undo_own_eintr(ThreadSlot* slot, ucontext_t* uc) noexcept;

// In the router's wrapper, before the program's handler runs.
void note_program_handler(ThreadSlot* slot, const ucontext_t* uc) noexcept;

// How many calls were rewound in this process (tests, status).
std::uint64_t eintr_undone() noexcept;

}  // namespace tramway::text::detail
