// Built without SSE and MMX (CMakeLists.txt): the entry path runs with xmm0-7 unsaved
// (trace/internal.h, now()).
//
// Exit hooks (function graph): a traced call's return address is swapped for the permanent
// return stub (arch/x86_64/trace_return.S) and kept on the thread's shadow stack, so the
// function's `ret` comes to tramway_trace_exit, which records the exit and answers where to
// really return.
//
// Frames are matched by the stack slot their return address lives in, never by position
// alone: a longjmp, an exception or a signal handler that never returns leaves entries behind
// that no `ret` will claim, and matching by slot finds the live one under them. A slot holds
// one live return address at a time, so an entry whose slot is reused by a new call (or lies
// above the one being returned through) belongs to a frame that is gone: it is closed as
// `unwound`. A tail call from a traced function into another reuses the caller's slot, which
// holds the stub already: both entries share the slot and close together.
#include <unistd.h>

#include <bitset>
#include <cstdlib>

#include "trace/internal.h"

namespace tramway::trace::detail {
namespace {

const std::uintptr_t kStub = reinterpret_cast<std::uintptr_t>(&tramway_trace_return);
constexpr std::uint32_t kPruneWindow = 4;

inline void enter_busy(ThreadState* t) noexcept {
  t->busy = true;
  std::atomic_signal_fence(std::memory_order_seq_cst);
}
inline void leave_busy(ThreadState* t) noexcept {
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t->busy = false;
}

// The closing event of an entry, if it was opened in the current recording (a thread keeps
// its shadow stack across recordings; the new file never saw older entries open).
inline void record_close(ThreadState* t, const ShadowEntry& e, std::uint64_t time, format::EventKind kind) noexcept {
  if (e.epoch == g_epoch.load(std::memory_order_relaxed)) (void)record(t, time, e.function, kind);
}

// Closes entries [from, depth) as unwound, innermost first.
void close_from(ThreadState* t, std::uint32_t from, std::uint64_t time) noexcept {
  while (t->depth > from) {
    --t->depth;
    record_close(t, t->stack[t->depth], time, format::EventKind::unwound);
  }
}

// Closes the entries marked dead (no slot) that are on top of the stack, innermost first.
void close_dead_on_top(ThreadState* t, std::uint64_t time) noexcept {
  while (t->depth > 0 && t->stack[t->depth - 1].slot == nullptr) {
    --t->depth;
    record_close(t, t->stack[t->depth], time, format::EventKind::unwound);
  }
}

[[noreturn]] void lost_return() noexcept {
  // Cannot happen unless the shadow stack was corrupted; say so and stop rather than jump
  // anywhere. write(2) is async-signal-safe.
  static const char msg[] = "tramway: a traced function returned through a slot the tracer has no record of; aborting\n";
  (void)!::write(2, msg, sizeof msg - 1);
  std::abort();
}

}  // namespace

void entry_callback(const hooks::Ops&, std::uintptr_t function, std::uintptr_t, hooks::EntryRegs& regs) {
  on_entry(function, hooks::caller_return_slot(regs));
}

bool entry_callback_vector_free() noexcept {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
  return false;
#else
  return g_use_tsc;
#endif
#else
  return g_use_tsc;
#endif
}

void on_entry(std::uintptr_t function, std::uintptr_t* slot) noexcept {
  ThreadState* t = current();
  if (!t) return;
  if (t->busy) {  // a signal handler over our own bookkeeping: leave this call untraced
    t->lost.fetch_add(2, std::memory_order_relaxed);  // its entry and exit
    return;
  }
  enter_busy(t);
  const std::uint64_t time = now();
  std::uintptr_t ret = *slot;
  if (ret == kStub) {
    // A tail call from a traced function: its entry owns this slot and the real return.
    std::uint32_t k = t->depth;
    while (k > 0 && t->stack[k - 1].slot != slot) --k;
    if (k == 0) lost_return();
    close_from(t, k, time);  // anything above it is gone
    ret = t->stack[k - 1].ret;
  } else {
    // A new frame in this slot: an older entry for it is gone (skipped by a longjmp), with
    // the entries pushed after it for frames below it (its callees). Entries pushed after it
    // for frames above this slot belong to callers that ran after the jump and may be live:
    // the file has them open inside the dead ones, so the dead are only marked (no slot, never
    // matched again) and closed once nothing live is above them.
    // Only the newest few entries are looked at (stale ones sit near the top; one missed here
    // is closed when a frame under it returns), so a call costs the same at any depth.
    const std::uint32_t lowest = t->depth > kPruneWindow ? t->depth - kPruneWindow : 0;
    for (std::uint32_t k = t->depth; k > lowest; --k) {
      if (t->stack[k - 1].slot != slot) continue;
      for (std::uint32_t j = k; j <= t->depth; ++j) {
        if (t->stack[j - 1].slot <= slot) t->stack[j - 1].slot = nullptr;
      }
      close_dead_on_top(t, time);
      break;
    }
  }
  if (t->depth == kShadowDepth) {  // bounded: count it, trace neither end of this call
    ++t->overflow;
    t->lost.fetch_add(2, std::memory_order_relaxed);
    leave_busy(t);
    return;
  }
  if (t->depth >= g_depth_limit.load(std::memory_order_relaxed)) {  // deeper than asked (-D): not traced
    leave_busy(t);
    return;
  }
  // An entry is recorded only with room left for its exit and for the exit of every frame
  // open below it: a full ring loses whole calls, and the frames in the file stay balanced.
  if (!has_room(t, std::uint64_t{t->depth} + 2)) {
    t->lost.fetch_add(2, std::memory_order_relaxed);  // its entry and exit
    leave_busy(t);
    return;
  }
  (void)record(t, time, function, format::EventKind::entry);
  t->stack[t->depth++] = ShadowEntry{slot, ret, function, g_epoch.load(std::memory_order_relaxed), false};
  *slot = kStub;
  leave_busy(t);
}

void before_unwind() noexcept {
  ThreadState* t = existing();
  if (!t || t->depth == 0) return;
  enter_busy(t);
  for (std::uint32_t k = t->depth; k > 0; --k) {
    ShadowEntry& e = t->stack[k - 1];
    if (e.restored || e.slot == nullptr) continue;
    if (*e.slot == kStub) *e.slot = e.ret;
    // Entries sharing a slot (tail calls) see `ret` written back by the first one.
    if (*e.slot == e.ret) e.restored = true;
  }
  leave_busy(t);
}

void after_catch(std::uintptr_t caller_sp) noexcept {
  ThreadState* t = existing();
  if (!t || t->depth == 0) return;
  enter_busy(t);
  const std::uint64_t time = now();
  // Close the unwound frames innermost first, then compact the stack keeping the live ones
  // in order.
  std::bitset<kShadowDepth> dead;
  for (std::uint32_t k = t->depth; k > 0; --k) {
    const ShadowEntry& e = t->stack[k - 1];
    if (!e.restored) continue;
    const bool live = reinterpret_cast<std::uintptr_t>(e.slot) >= caller_sp && (*e.slot == e.ret || *e.slot == kStub);
    if (!live) {
      dead.set(k - 1);
      record_close(t, e, time, format::EventKind::unwound);
    }
  }
  std::uint32_t kept = 0;
  for (std::uint32_t k = 0; k < t->depth; ++k) {
    if (dead.test(k)) continue;
    ShadowEntry e = t->stack[k];
    if (e.restored) {
      *e.slot = kStub;
      e.restored = false;
    }
    t->stack[kept++] = e;
  }
  t->depth = kept;
  close_dead_on_top(t, time);
  leave_busy(t);
}

void close_all_frames(ThreadState* t) noexcept {
  enter_busy(t);
  close_from(t, 0, now());
  leave_busy(t);
}

}  // namespace tramway::trace::detail

using namespace tramway::trace::detail;

// Called by the return stub with the stack pointer the caller will see.
extern "C" __attribute__((visibility("hidden"))) std::uintptr_t tramway_trace_exit(std::uintptr_t sp) noexcept {
  auto* const slot = reinterpret_cast<std::uintptr_t*>(sp - 8);
  ThreadState* t = existing();
  if (!t) lost_return();
  enter_busy(t);
  const std::uint64_t time = now();
  std::uint32_t k = t->depth;
  while (k > 0 && t->stack[k - 1].slot != slot) --k;
  if (k == 0) lost_return();
  close_from(t, k, time);  // skipped by a longjmp or a handler that never returned
  const std::uintptr_t ret = t->stack[k - 1].ret;
  // Innermost first: a tail-call chain shares the slot and returns together.
  while (t->depth > 0 && t->stack[t->depth - 1].slot == slot) {
    --t->depth;
    record_close(t, t->stack[t->depth], time, tramway::trace::format::EventKind::exit);
  }
  close_dead_on_top(t, time);
  leave_busy(t);
  return ret;
}

extern "C" void tramway_trace_before_unwind() noexcept { before_unwind(); }
extern "C" void tramway_trace_after_catch(std::uintptr_t caller_sp) noexcept { after_catch(caller_sp); }
