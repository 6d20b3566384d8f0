// trace internals: per-thread state (event ring and shadow stack), the clock, and the hooks
// between the recorder, the exit hooks and the unwinder wrappers.
//
// Each thread that records owns one ThreadState, found through initial-exec TLS. Only the
// owner writes its shadow stack and the producer side of its ring; the recorder's flusher
// thread reads the ring. States are never unmapped (a frame hijacked before a detach or a stop
// still returns through them); a thread's state is drained and freed at the thread's exit, and
// reused by a later thread.
#pragma once

#include <x86intrin.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "tramway/hooks.h"
#include "tramway/trace/format.h"

extern "C" void tramway_trace_return();  // arch/x86_64/trace_return.S

namespace tramway::trace::detail {

inline constexpr std::size_t kShadowDepth = 512;

struct ShadowEntry {
  std::uintptr_t* slot;      // where the function's return address lives on the stack
  std::uintptr_t ret;        // the original return address
  std::uintptr_t function;   // the function's entry
  std::uint32_t epoch;       // the recording it was opened in (g_epoch)
  bool restored;             // `ret` was written back for an unwinder (exceptions)
};

enum class Life : int { free = 0, live = 1, exited = 2 };

struct ThreadState {
  // Ring: the owner produces, the flusher consumes. Timestamps are raw clock values.
  format::Event* ring = nullptr;
  std::uint64_t mask = 0;
  std::atomic<std::uint64_t> head{0};
  std::uint64_t cached_tail = 0;  // owner's copy of tail
  alignas(64) std::atomic<std::uint64_t> tail{0};
  std::atomic<std::uint64_t> lost{0};  // events that found the ring full (or the stack full)
  std::uint64_t lost_reported = 0;     // flusher's: lost already written to the file
  bool named = false;                  // flusher's: thread chunk written
  alignas(64) std::atomic<Life> life{Life::free};
  std::uint32_t tid = 0;
  ThreadState* next = nullptr;  // every state ever made (never unlinked)

  // Shadow stack: owner only. `busy` keeps a signal handler that runs traced code on this
  // thread away from the stack while the thread changes it.
  volatile bool busy = false;
  std::uint32_t depth = 0;
  std::uint64_t overflow = 0;  // frames not hijacked because the stack was full
  ShadowEntry stack[kShadowDepth];
};

// Bumped by every start(): entries of an earlier recording close without events.
extern std::atomic<std::uint32_t> g_epoch;
// RecordOptions::max_depth, or kShadowDepth: deeper calls are neither recorded nor hooked.
extern std::atomic<std::uint32_t> g_depth_limit;

// Clock: raw TSC when it is invariant (constant_tsc and nonstop_tsc), else CLOCK_MONOTONIC ns.
extern bool g_use_tsc;
std::uint64_t monotonic_ns() noexcept;
// The entry path (on_entry and what it inlines) runs between the hook stubs without xmm0-7
// saved (hooks::Ops::promise_vector_free): exit_hooks.cc is built without SSE and MMX, and
// the helpers below are always inlined into it, so that no copy of them built with vector
// code elsewhere is what it calls. The promise holds only with the TSC clock (monotonic_ns
// calls the C library) and without sanitizers (their runtime calls).
#define TRAMWAY_TRACE_HOT inline __attribute__((always_inline))
TRAMWAY_TRACE_HOT std::uint64_t now() noexcept { return g_use_tsc ? __rdtsc() : monotonic_ns(); }

// The calling thread's state if it has one (initial-exec TLS: one load, no call).
extern thread_local constinit ThreadState* t_state __attribute__((tls_model("initial-exec")));
TRAMWAY_TRACE_HOT ThreadState* existing() noexcept { return t_state; }
// Claims a state for the calling thread (async-signal-safe: mmap and atomics); null if
// memory ran out.
ThreadState* claim() noexcept;
// claim(), with xmm0-7 as they were: for the entry path, which the stubs may not have saved
// them around (claim calls the C library).
ThreadState* claim_keeping_vectors() noexcept;
// The calling thread's state, claimed on first use.
TRAMWAY_TRACE_HOT ThreadState* current() noexcept { return t_state ? t_state : claim_keeping_vectors(); }
// Every state, for the flusher.
ThreadState* all_states() noexcept;
// At its thread's exit (recorder.cc): writes what the state's ring holds to the recording, if
// one is running, and frees the state for reuse. Takes the recorder's mutex, or, in a
// read-side region (a hook callback that called pthread_exit), leaves both to the flusher
// when the mutex is taken.
void retire(ThreadState* t) noexcept;
// Ring capacity for states made from now on.
void set_ring_events(std::size_t events) noexcept;

// Whether the ring has room for `needed` more events.
TRAMWAY_TRACE_HOT bool has_room(ThreadState* t, std::uint64_t needed) noexcept {
  const std::uint64_t h = t->head.load(std::memory_order_relaxed);
  if (t->mask + 1 - (h - t->cached_tail) >= needed) return true;
  t->cached_tail = t->tail.load(std::memory_order_acquire);
  return t->mask + 1 - (h - t->cached_tail) >= needed;
}

// Appends one event to the calling thread's ring; false (and counted lost) if it is full.
TRAMWAY_TRACE_HOT bool record(ThreadState* t, std::uint64_t time, std::uintptr_t function, format::EventKind kind) noexcept {
  const std::uint64_t h = t->head.load(std::memory_order_relaxed);
  if (h - t->cached_tail > t->mask) {
    t->cached_tail = t->tail.load(std::memory_order_acquire);
    if (h - t->cached_tail > t->mask) {
      t->lost.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
  }
  format::Event& e = t->ring[h & t->mask];
  e.time_ns = time;
  e.word = format::Event::make_word(function, kind);
  t->head.store(h + 1, std::memory_order_release);
  return true;
}

// Exit hooks (exit_hooks.cc).
// The entry callback of every ops the recorder attaches, and whether it may be attached with
// hooks::Ops::promise_vector_free (see now()).
void entry_callback(const hooks::Ops&, std::uintptr_t function, std::uintptr_t caller, hooks::EntryRegs& regs);
bool entry_callback_vector_free() noexcept;
void on_entry(std::uintptr_t function, std::uintptr_t* return_slot) noexcept;
// Before an unwinder walks this thread's stack: put every original return address back.
void before_unwind() noexcept;
// After a catch: hijack again the frames that are still live (slots at or above caller_sp)
// and close the ones the exception unwound.
void after_catch(std::uintptr_t caller_sp) noexcept;
// At thread exit: close every frame left on the shadow stack as unwound.
void close_all_frames(ThreadState* t) noexcept;

}  // namespace tramway::trace::detail

// For the unwinder wrappers (unwind_interpose.cc), which are also linked into the agent.
extern "C" {
void tramway_trace_before_unwind() noexcept;
void tramway_trace_after_catch(std::uintptr_t caller_sp) noexcept;
}

namespace tramway::trace::detail {

}  // namespace tramway::trace::detail
