// text/got_redirect.h — the router's interposers put in front of libc for a libtramway that was
// loaded into a running program (inject/injector.h) rather than preloaded.
//
// A preloaded libtramway comes before libc in the lookup order, so every sigaction, signal,
// sigprocmask, pthread_sigmask, ... call of the program reaches the router's interposers
// (signal_router.cc). Loaded later, it does not: the program's objects were bound to libc's.
// redirect_signal_calls() rewrites, in every loaded object but libc, the loader and tramway's
// own, each GOT slot (R_X86_64_JUMP_SLOT, R_X86_64_GLOB_DAT) that holds libc's address of one
// of those functions so that it holds the interposer's: one aligned 8-byte store per slot, so a
// thread calling through it meanwhile takes either, and both are correct. Slots in RELRO are
// made writable for the store and read-only again. Objects loaded later are taken on the next
// call (the router makes it before every batch). restore_signal_calls() puts libc's addresses
// back (eject). What a GOT does not cover is not redirected: a call through a pointer the
// program got from dlsym, or a raw rt_sigaction system call (batches detect a SIGTRAP
// disposition that is not the router's and refuse, batch_precheck.cc).
#pragma once

#include <cstddef>

namespace tramway::text::detail {

// Returns how many slots were rewritten by this call. Not async-signal-safe; idempotent.
std::size_t redirect_signal_calls() noexcept;
std::size_t restore_signal_calls() noexcept;
// Slots currently redirected (for `tramway live PID status` and tests).
std::size_t redirected_signal_calls() noexcept;

}  // namespace tramway::text::detail
