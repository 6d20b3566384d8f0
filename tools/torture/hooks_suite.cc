// Suite "hooks": function hooks (tramway/hooks.h) attached and detached as fast as a
// controller can while caller threads call the hooked functions under a SIGPROF storm.
//
// Workload. 2,000 generated functions tw_fn_<i>(x) (each counts its calls in its library's
// tw_fn_calls_<tag> array and returns x + i), dlopened at start (hooks_functions.h): 0..499
// built by g++-12 (entries of five 1-byte nops, normalised on first enable), 500..999 by
// clang++-14 (one 5-byte nop), both with -fpatchable-function-entry=13,8; 1000..1999 without
// patchable entries (GCC and Clang, -O2, with and without -fcf-protection=full and frame
// pointers; bodies chosen so that the runs hold rip-relative loads, short jccs, a final call,
// stack frames: tools/torture/CMakeLists.txt), hooked through relocated prologues. Only those
// hooks::functions() lists as relocatable are used (the others are listed at start; more than
// a tenth refused fails the run). Every check below applies to both kinds alike.
// Detours: each relocated copy whose tasks grace period has passed is poisoned and
// quarantined instead of freed (detour_poison.h); executing it ends the run with "poison
// executed".
// Callers (--threads) call random functions in a loop and check every return value; the
// SIGPROF handler calls one too, every other signal, so callbacks run in signal context,
// nested over a caller that may be anywhere — in the function, in tramway's stub, in a
// callback. Callbacks sometimes call a hooked function themselves: the recursion guard must
// skip its callbacks (DESIGN invariant 7). The controller owns 32 ops (slots) and steps as
// fast as it can: attach an idle slot with a random filter (addresses of a random subset,
// sometimes a glob such as "tw_fn_5*" or "tw_fn_12*" or a few names; mixing both kinds of
// functions, or relocated ones only), or detach an attached one — mostly
// with detach_async (its grace periods shared, the slot idle again once `done` ran), now and
// then synchronously (disabled first, or live) — or disable and re-enable one, pausing now
// and then so that callers make calls between changes. Up to 6 slots are attached at once,
// so sites carry per-site lists. Half the ops are direct (a site whose only ops is direct calls
// a trampoline slot of its own, and switches to and from the common entry as other ops come
// and go), one in eight saves extended state. Every fourth slot's callback is lean
// (on_entry_lean: proven at attach to leave vector registers and its EntryRegs alone, so the
// stubs skip the xmm0-7 saves); its per-call checks are left out, its counts and lateness are
// not. A cycle is one attach and its detach; --cycles bounds them.
//
// Windows: the exactness check, made without ever stopping the callers. g_window is bumped
// by the controller at every transition (right before an attach, detach, disable or enable
// begins, and right after it returns or, for detach_async, once done has run); before each bump it publishes the descriptor of the new
// window: per function, the slots whose callback must run exactly once for a call made wholly
// inside the window (`one`: attached and enabled before the window began, not detached or
// disabled before it ended, and the function is in its filter) and the slots whose callback
// must not run (`zero`: detached, disabled, or attached to other functions only). A slot in
// transition during the window is in neither. A caller reads w0 = g_window, calls, reads w1;
// when w0 == w1 the call lay inside one window and is checked against its descriptor. Calls
// that straddle a bump are not (counted as straddling), except that no callback may ever run
// twice for one call. Why a descriptor rather than "odd = attached": with several ops attached
// one after the other, "even = nothing attached" would not hold while the second is attached.
//
// Why a whole-window call sees the window's state: the controller's change (the cell store in
// attach/detach, the enabled store in disable/enable under tramway's lock, the code patch of
// a batch, serialised by membarrier on every CPU) is complete when the call returns, before
// the bump; the caller's acquire load of the new value orders the dispatcher's loads after
// it. For the reverse direction (a call whose dispatcher saw a change made after the bump
// must read w1 != w0), attach and detach store the cell with acq_rel; enable's relaxed store
// of the enabled flag is ordered by x86-TSO (tramway is x86_64 only): stores become visible
// in order, loads are not reordered with loads.
//
// Nesting: each call pushes a Frame (thread_local t_frame), so a callback credits the call it
// belongs to, in thread or signal context. The handler's call is checked fully only when the
// thread it interrupted was outside every hooked call; when it interrupted one of our
// callbacks, its callbacks must be skipped (the dispatcher's recursion guard is still up);
// when it interrupted a hooked call elsewhere (tramway's stub or dispatcher, the function's
// body) the guard may or may not be up, so the call ran either every callback due or none.
//
// Checked (each failure is a violation; the run fails on any):
//  * every call returns x + i, and every function's own count equals the calls made to it;
//  * a call inside a window ran each `one` slot's callback exactly once and no `zero` slot's;
//    no call ran a slot's callback twice; a call made from inside a callback ran none;
//  * callbacks receive the called function's entry and its argument (rdi);
//  * no late callback: each slot's `detached` flag is set right after detach() returns or by
//    detach_async's done, and a callback that sees it set (at its start or end) is late; its
//    own count must not move after that either;
//  * counts agree: counters(ops).hits against the callback's own count, exactly while the
//    ops is disabled and a grace period has passed, with bounds at a live or async detach
//    (see check_counts_quiesced, detach_slot and check_live_bounds); counters(ops).recursion_skipped is at least the
//    number of calls seen skipped by the guard (check_skips); counters(ops).functions equals
//    the size of the filter's set;
//  * every attach/detach/disable/enable succeeds; after the run no function is still hooked
//    and every relocated function has its original first bytes back;
//  * VmRSS after warm-up and at the end differ by at most 16 MiB;
//  * no crash and no poison executed: SIGSEGV, SIGILL and SIGBUS end the run (status 3),
//    saying whether the PC was in a poisoned copy.
#include <fnmatch.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "arch/x86_64/callback_scan.h"
#include "detour_poison.h"
#include "hooks_functions.h"
#include "storm.h"
#include "suite.h"
#include "tramway/grace.h"
#include "tramway/hooks.h"
#include "tramway/text/patch.h"
#include "tramway/text/signal_router.h"

namespace tramway::torture {
namespace {

constexpr int kMaxFunctions = kMaxHookFunctions, kSlots = 32;
constexpr std::size_t kMaxAttached = 6;
constexpr std::uint64_t kRing = 256;  // window descriptors kept
constexpr long kRssBoundKiB = 16 * 1024;

using SlotMask = std::uint32_t;  // one bit per slot
static_assert(kSlots <= 32);
HookFunctions g_t;  // [0, g_t.patchable) patchable entries, [g_t.patchable, g_t.count) relocated
int g_count = 0;    // g_t.count
std::uintptr_t* const g_entries = g_t.entries;

// ---- windows -------------------------------------------------------------------------------

struct WindowDesc {
  std::atomic<SlotMask> one[kMaxFunctions];   // slots whose callback must run exactly once
  std::atomic<SlotMask> zero[kMaxFunctions];  // slots whose callback must not run
  std::atomic<std::uint32_t> tag[kSlots];      // each slot's attach (incarnation) tag
};
std::atomic<std::uint64_t> g_window{0};
WindowDesc g_desc[kRing];

enum class SlotState { zero, run, unknown };

// ---- ops slots -------------------------------------------------------------------------------

struct alignas(64) Slot {
  int index = 0;
  hooks::Ops ops;
  std::atomic<bool> detached{true};    // set right after detach() returns
  std::atomic<bool> detaching{false};  // set right before counters are read for a live detach
  std::atomic<bool> async_done{false};  // set by detach_async's done, after `detached`
  std::atomic<std::uint64_t> own{0};            // callbacks run since the attach
  std::atomic<std::uint64_t> own_in_detach{0};  // of which saw `detaching`
  std::atomic<std::uint64_t> late{0};
  // Calls known to have been skipped by the recursion guard with this slot in the cell: the
  // attach's tag in the top 24 bits, the count below. A caller counts only into the tag of
  // the window it checked, so a caller delayed past a detach cannot count into the next attach.
  std::atomic<std::uint64_t> skips_expected{0};
};
Slot g_slots[kSlots];
// Every fourth slot's callback is lean (on_entry_lean): the stubs run it without saving xmm0-7.
constexpr SlotMask kLeanSlots = 0x88888888u;

constexpr int kTagShift = 40;
constexpr std::uint64_t kCountMask = (std::uint64_t{1} << kTagShift) - 1;

void expect_skip(Slot& s, std::uint32_t tag) {
  std::uint64_t v = s.skips_expected.load(std::memory_order_relaxed);
  while ((v >> kTagShift) == tag && !s.skips_expected.compare_exchange_weak(v, v + 1, std::memory_order_release,
                                                                             std::memory_order_relaxed)) {
  }
}

// ---- per-thread accounting -------------------------------------------------------------------

enum Kind { kWrongReturn, kMissed, kTwice, kUnexpected, kNotSkipped, kPartial, kKinds };
const char* const kKindNames[kKinds] = {
    "wrong return value", "callback missed inside a window", "callback ran twice for one call",
    "callback ran where it must not", "callback ran for a call made from inside a callback",
    "handler call ran some of its callbacks but not all"};

enum class Mode : std::uint8_t { full, relaxed, skipped };

struct Record {  // the first violation of a context
  bool set = false;
  int kind = 0, function = 0;
  Mode mode = Mode::full;
  std::uint64_t w0 = 0, w1 = 0;
  SlotMask one = 0, zero = 0;
  std::uint8_t hits[kSlots] = {};
};

// One per context (0: the thread's own code, 1: its SIGPROF handler), written only by that
// context, so a handler never races a half-done increment of the code it interrupted. Atomics
// (plain loads and stores) only so that the progress report may read them.
struct Counters {
  std::atomic<std::uint64_t> calls{0}, checked_inside{0}, checked_outside{0}, straddling{0};
  std::atomic<std::uint64_t> handler_calls{0}, relaxed_calls{0}, relaxed_skipped{0};
  std::atomic<std::uint64_t> skipped_calls{0}, recursive_calls{0}, callbacks{0}, bad_callbacks{0};
  std::atomic<std::uint64_t> violations[kKinds]{};
  Record first;
  std::uint64_t body_calls[kMaxFunctions] = {};  // read after join
};
struct alignas(64) ThreadState {
  Counters context[2];
};

inline void inc(std::atomic<std::uint64_t>& a) {
  a.store(a.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

// The call in progress on this thread (innermost); callbacks credit it.
struct Frame {
  std::uintptr_t entry;
  int x;
  std::uint8_t hits[kSlots];
};

thread_local constinit ThreadState* t_state = nullptr;
thread_local constinit Frame* t_frame = nullptr;
thread_local constinit volatile int t_in_handler = 0;
thread_local constinit volatile int t_call_depth = 0;  // hooked calls in progress (any context)
thread_local constinit volatile int t_cb_depth = 0;    // our callbacks in progress (any context)
thread_local constinit std::uint64_t t_handler_rng = 0;

inline std::uint64_t xorshift(std::uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

void violation(Counters& c, Kind kind, int i, Mode mode, std::uint64_t w0, std::uint64_t w1, SlotMask one,
               SlotMask zero, const Frame& f) {
  inc(c.violations[kind]);
  if (c.first.set) return;
  c.first = Record{true, kind, i, mode, w0, w1, one, zero, {}};
  std::memcpy(c.first.hits, f.hits, sizeof f.hits);
}

// Calls function i with x and checks the call (see the header comment for the modes).
void call_one(Counters& c, int i, int x, Mode mode) {
  Frame f{g_entries[i], x, {}};
  Frame* const outer = t_frame;
  const std::uint64_t w0 = g_window.load(std::memory_order_acquire);
  t_frame = &f;
  t_call_depth = t_call_depth + 1;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  const int r = g_t.fns[i](x);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_call_depth = t_call_depth - 1;
  t_frame = outer;
  const std::uint64_t w1 = g_window.load(std::memory_order_acquire);

  inc(c.calls);
  ++c.body_calls[i];
  if (r != x + g_t.number[i]) violation(c, kWrongReturn, i, mode, w0, w1, 0, 0, f);
  for (int k = 0; k < kSlots; ++k) {
    if (f.hits[k] > 1) violation(c, kTwice, i, mode, w0, w1, 0, 0, f);
  }
  bool skipped_all = false;  // the recursion guard was up: the dispatcher ran no callback
  if (mode == Mode::skipped) {  // nothing may run, whatever the window
    inc(c.skipped_calls);
    for (int k = 0; k < kSlots; ++k) {
      if (f.hits[k]) violation(c, kNotSkipped, i, mode, w0, w1, 0, 0, f);
    }
    skipped_all = true;
  }
  if (w0 != w1) {
    inc(c.straddling);
    return;
  }
  const WindowDesc& d = g_desc[w0 % kRing];
  // Lean slots' callbacks do not see the frame: only their counts and lateness are checked.
  const SlotMask one = d.one[i].load(std::memory_order_acquire) & ~kLeanSlots;
  const SlotMask zero = d.zero[i].load(std::memory_order_acquire) & ~kLeanSlots;
  std::uint32_t tags[kSlots];
  for (int k = 0; k < kSlots; ++k) tags[k] = d.tag[k].load(std::memory_order_acquire);
  // The descriptor is rewritten for window w0 + kRing, published before g_window reaches it;
  // if these loads saw that rewrite, g_window is at least w0 + kRing - 1 now.
  if (g_window.load(std::memory_order_acquire) - w0 >= kRing / 2) {
    inc(c.straddling);
    return;
  }
  bool unexpected = false, missed = false;
  int ran = 0, due = 0;
  for (int k = 0; k < kSlots; ++k) {
    const auto bit = static_cast<SlotMask>(SlotMask{1} << k);
    if ((zero & bit) && f.hits[k]) unexpected = true;
    if (one & bit) {
      ++due;
      ran += f.hits[k] ? 1 : 0;
      if (f.hits[k] != 1) missed = true;
    }
  }
  if (unexpected) violation(c, kUnexpected, i, mode, w0, w1, one, zero, f);
  if (mode == Mode::full) {
    if (missed) violation(c, kMissed, i, mode, w0, w1, one, zero, f);
  } else if (mode == Mode::relaxed) {  // all the callbacks due, or none (the guard was up)
    inc(c.relaxed_calls);
    if (ran != 0 && ran != due) violation(c, kPartial, i, mode, w0, w1, one, zero, f);
    if (due && !ran) {
      inc(c.relaxed_skipped);
      skipped_all = true;
    }
  }
  // Skipped while slot k was attached and enabled on this function for the whole call: the
  // dispatcher found k in the cell with the guard up and counted it in k's recursion_skipped.
  if (skipped_all) {
    for (int k = 0; k < kSlots; ++k) {
      if (one & (SlotMask{1} << k)) expect_skip(g_slots[k], tags[k]);
    }
  }
  if (mode != Mode::skipped) inc(one ? c.checked_inside : c.checked_outside);
}

// The entry callback of every slot; ops.data is its Slot.
void on_entry(const hooks::Ops& ops, std::uintptr_t function, std::uintptr_t, hooks::EntryRegs& regs) {
  Slot& s = *static_cast<Slot*>(ops.data);
  const bool late_at_start = s.detached.load(std::memory_order_acquire);
  s.own.fetch_add(1, std::memory_order_relaxed);
  // Pairs with the fence in the controller's live detach (detach_slot): either this
  // callback's hits increment (made by the dispatcher before it called us) is counted in the
  // hits the controller reads, or this load sees `detaching`.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (s.detaching.load(std::memory_order_relaxed)) s.own_in_detach.fetch_add(1, std::memory_order_relaxed);
  t_cb_depth = t_cb_depth + 1;
  std::atomic_signal_fence(std::memory_order_seq_cst);

  ThreadState* ts = t_state;
  Frame* f = t_frame;
  if (ts) {
    Counters& c = ts->context[t_in_handler];
    if (!f || f->entry != function || static_cast<int>(regs.rdi) != f->x) {
      inc(c.bad_callbacks);
    } else {
      if (f->hits[s.index] < 255) ++f->hits[s.index];
      inc(c.callbacks);
      // Sometimes call a hooked function from here: no callback may run for it.
      const std::uint64_t n = c.callbacks.load(std::memory_order_relaxed);
      if (n % 29 == 0) {
        inc(c.recursive_calls);
        const auto i = (n / 29 * 7919 + static_cast<std::uint64_t>(f->x)) % static_cast<std::uint64_t>(g_count);
        call_one(c, static_cast<int>(i), f->x ^ 0x55, Mode::skipped);
      }
    }
  }

  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_cb_depth = t_cb_depth - 1;
  if (late_at_start || s.detached.load(std::memory_order_acquire)) s.late.fetch_add(1, std::memory_order_relaxed);
}

// The entry callback of the lean slots: leaf code on general-purpose registers that never
// reads its EntryRegs, which the stubs (arch/x86_64/callback_scan.h) run without saving
// xmm0-7 — so the library's own count, lateness and live-detach bounds are checked on that
// path too. It cannot see the caller's frame, so per-call checks leave these slots out.
void on_entry_lean(const hooks::Ops& ops, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  Slot& s = *static_cast<Slot*>(ops.data);
  const bool late_at_start = s.detached.load(std::memory_order_acquire);
  s.own.fetch_add(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);  // as in on_entry
  if (s.detaching.load(std::memory_order_relaxed)) s.own_in_detach.fetch_add(1, std::memory_order_relaxed);
  if (late_at_start || s.detached.load(std::memory_order_acquire)) s.late.fetch_add(1, std::memory_order_relaxed);
}

// Every other SIGPROF calls a random function, nested over whatever the thread was doing.
void on_sigprof(int, siginfo_t*, void*) {
  ThreadState* ts = t_state;
  if (!ts) return;
  const int saved_errno = errno;
  t_in_handler = 1;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  const std::uint64_t r = xorshift(t_handler_rng);
  if (r & 1) {
    Counters& c = ts->context[1];
    inc(c.handler_calls);
    const Mode mode = t_cb_depth > 0 ? Mode::skipped : t_call_depth > 0 ? Mode::relaxed : Mode::full;
    call_one(c, static_cast<int>((r >> 8) % static_cast<std::uint64_t>(g_count)), static_cast<int>((r >> 32) & 0xfffff),
             mode);
  }
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_in_handler = 0;
  errno = saved_errno;
}

// ---- controller ------------------------------------------------------------------------------

struct Shared {
  std::atomic<bool> stop_controller{false}, stop_callers{false};
  std::atomic<std::uint64_t> cycles{0}, attaches{0}, detaches{0}, live_detaches{0}, quiesced_detaches{0};
  std::atomic<std::uint64_t> async_detaches{0}, direct_attaches{0};
  std::atomic<std::uint64_t> disables{0}, windows{0}, count_checks{0}, count_mismatches{0}, moved_after_detach{0};
  std::atomic<std::uint64_t> recursion_skipped{0}, skips_proved{0}, hooked_sites{0}, errors{0};
  std::atomic<std::uint64_t> attach_ns{0}, detach_ns{0}, async_ns{0}, sync_ns{0};
  std::atomic<std::uint64_t> step_ns[6]{};  // controller time: attach, disable+enable, sync detach, async detach, all slots in flight, pauses  // time spent in attach(), detach(), synchronize()
  std::mutex mu;
  std::string first_error;
  void error(const std::string& what) {
    errors.fetch_add(1);
    std::lock_guard<std::mutex> g(mu);
    if (first_error.empty()) first_error = what;
  }
  void mismatch(const std::string& what) {
    count_mismatches.fetch_add(1);
    std::lock_guard<std::mutex> g(mu);
    if (first_error.empty()) first_error = what;
  }
};

std::uint64_t ns_since(std::chrono::steady_clock::time_point t0) {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}

class Controller {
 public:
  Controller(const Options& o, Shared& s) : s_(s), rng_(o.seed), max_cycles_(o.cycles) {
    for (auto& m : member_) m.assign(static_cast<std::size_t>(g_count), false);
  }

  // Window 1: nothing attached. Published before the callers start.
  void publish_initial() { publish(); }

  void run() {
    while (!s_.stop_controller.load(std::memory_order_relaxed) && (!max_cycles_ || s_.cycles.load() < max_cycles_)) {
      step();
    }
    finish();
    s_.stop_controller.store(true);
  }

 private:
  // Writes the descriptor of the next window from state_/member_, then enters it.
  void publish() {
    const std::uint64_t w = g_window.load(std::memory_order_relaxed) + 1;
    WindowDesc& d = g_desc[w % kRing];
    for (int i = 0; i < g_count; ++i) {
      SlotMask one = 0, zero = 0;
      for (int k = 0; k < kSlots; ++k) {
        const auto bit = static_cast<SlotMask>(SlotMask{1} << k);
        switch (state_[k]) {
          case SlotState::zero:
            zero |= bit;
            break;
          case SlotState::run:
            (member_[k][static_cast<std::size_t>(i)] ? one : zero) |= bit;
            break;
          case SlotState::unknown:
            break;
        }
      }
      d.one[i].store(one, std::memory_order_release);
      d.zero[i].store(zero, std::memory_order_release);
    }
    for (int k = 0; k < kSlots; ++k) d.tag[k].store(tag_[k], std::memory_order_release);
    g_window.store(w, std::memory_order_release);
    s_.windows.fetch_add(1, std::memory_order_relaxed);
  }
  void transition(int k, SlotState st) {
    state_[k] = st;
    publish();
  }

  void pause_short() { std::this_thread::sleep_for(std::chrono::microseconds(rng_() % 2000)); }

  // A random filter for slot k; fills member_[k] with the set it selects. Every kind of
  // filter mixes patchable and relocated functions, or selects relocated ones only.
  hooks::Filter make_filter(int k) {
    std::vector<bool>& m = member_[k];
    m.assign(static_cast<std::size_t>(g_count), false);
    const auto kind = rng_() % 8;
    if (kind == 0) {
      // "tw_fn_<d>*": d, d0..d9, d00..d99 (patchable) and for d = 1 every relocated one;
      // "tw_fn_1<d>*": 1d, 1d0..1d9 and the relocated 1d00..1d99; "tw_fn_1<d><e>?": relocated only.
      const auto shape = rng_() % 3;
      const std::string pattern =
          shape == 0   ? "tw_fn_" + std::to_string(1 + rng_() % 9) + "*"
          : shape == 1 ? "tw_fn_1" + std::to_string(rng_() % 10) + "*"
                       : "tw_fn_1" + std::to_string(rng_() % 10) + std::to_string(rng_() % 10) + "?";
      for (int i = 0; i < g_count; ++i) {
        const std::string name = "tw_fn_" + std::to_string(g_t.number[i]);
        m[static_cast<std::size_t>(i)] = fnmatch(pattern.c_str(), name.c_str(), 0) == 0;
      }
      return hooks::Filter::glob(pattern);
    }
    if (kind == 1) {  // a few names
      std::vector<std::string> names;
      const int n = 1 + static_cast<int>(rng_() % 8);
      for (int j = 0; j < n; ++j) {
        const int i = static_cast<int>(rng_() % static_cast<std::uint64_t>(g_count));
        names.push_back("tw_fn_" + std::to_string(g_t.number[i]));
        m[static_cast<std::size_t>(i)] = true;
      }
      return hooks::Filter::names(std::move(names));
    }
    // Addresses of a random subset: small, any size, relocated ones only, or all of them; a
    // duplicate sometimes.
    const auto shape = rng_() % 5;
    const int relocated = g_count - g_t.patchable;
    const int first = shape == 2 && relocated > 0 ? g_t.patchable : 0;
    const int pool = g_count - first;
    const int n = shape == 0   ? 1 + static_cast<int>(rng_() % 16)
                  : shape == 3 ? pool
                               : 1 + static_cast<int>(rng_() % static_cast<std::uint64_t>(pool));
    std::vector<int> all(static_cast<std::size_t>(pool));
    for (int i = 0; i < pool; ++i) all[static_cast<std::size_t>(i)] = first + i;
    std::shuffle(all.begin(), all.end(), rng_);
    std::vector<std::uintptr_t> entries;
    for (int j = 0; j < n; ++j) {
      const int i = all[static_cast<std::size_t>(j)];
      entries.push_back(g_entries[i]);
      m[static_cast<std::size_t>(i)] = true;
    }
    if (rng_() % 8 == 0) entries.push_back(entries.front());
    return hooks::Filter::addresses(std::move(entries));
  }

  std::size_t members(int k) const {
    return static_cast<std::size_t>(std::count(member_[k].begin(), member_[k].end(), true));
  }

  // Counts agree, exactly, at a moment where they are stable: the slot is disabled (its
  // callbacks stop being started once disable() returns, because the dispatcher reads the
  // enabled flag inside the grace-period marker region) and a grace period has passed since,
  // so every dispatcher that counted a hit has also finished the callback that follows it.
  // Then counters(ops).hits (tramway's count) equals the callback's own count.
  void check_counts_quiesced(int k, const char* when) {
    Slot& s = g_slots[k];
    const auto t0 = std::chrono::steady_clock::now();
    if (Status st = grace::synchronize(); !st.ok()) s_.error("grace::synchronize: " + st.message());
    s_.sync_ns.fetch_add(ns_since(t0));
    const hooks::OpsCounters c = hooks::counters(s.ops);
    const std::uint64_t own = s.own.load();
    s_.count_checks.fetch_add(1);
    if (c.hits != own) {
      s_.mismatch("slot " + std::to_string(k) + " " + when + ": counters(ops).hits=" + std::to_string(c.hits) +
                  " but its callback ran " + std::to_string(own) + " times");
    }
  }

  // Invariant 7's "counted, not lost": recursion_skipped includes at least every skip a caller
  // proved (a call skipped by the guard inside a window where the slot ran on that function;
  // see call_one), read before it (release/acquire through skips_expected). It may count more:
  // skips while the slot was disabled, or in calls that straddled a window.
  void check_skips(int k, std::uint64_t counted, std::uint64_t proved) {
    s_.recursion_skipped.fetch_add(counted);
    s_.skips_proved.fetch_add(proved);
    if (counted < proved) {
      s_.mismatch("slot " + std::to_string(k) + ": counters(ops).recursion_skipped=" + std::to_string(counted) +
                  " but " + std::to_string(proved) + " calls were seen skipped by the recursion guard");
    }
  }

  void attach_slot(int k, const hooks::Filter& filter) {
    Slot& s = g_slots[k];
    s.own.store(0);
    own_after_detach_[k] = 0;
    s.own_in_detach.store(0);
    s.detaching.store(false);
    s.detached.store(false);
    // Both modes: half the ops direct (a site whose only ops is direct calls its own slot; a
    // site shared with others goes through the common entry), some saving extended state.
    s.ops.direct = rng_() % 2 == 0;
    s.ops.save_extended_state = rng_() % 8 == 0;
    if (s.ops.direct) s_.direct_attaches.fetch_add(1);
    tag_[k] = next_tag_ = (next_tag_ + 1) & 0xffffff;
    s.skips_expected.store(std::uint64_t{tag_[k]} << kTagShift);
    transition(k, SlotState::unknown);
    const auto t0 = std::chrono::steady_clock::now();
    const Status attached = hooks::attach(s.ops, filter);
    s_.attach_ns.fetch_add(ns_since(t0));
    if (!attached.ok()) {
      s_.error("attach slot " + std::to_string(k) + ": " + attached.message());
      // A failed attach returns once a grace period has passed: callbacks it let in have
      // ended, and its count is final (the detached slot's count must not move from here).
      own_after_detach_[k] = s.own.load();
      s.detached.store(true);
      transition(k, SlotState::zero);
      return;
    }
    attached_[k] = true;
    s_.attaches.fetch_add(1);
    transition(k, SlotState::run);
    const hooks::OpsCounters c = hooks::counters(s.ops);
    if (c.functions != members(k)) {
      s_.error("slot " + std::to_string(k) + " attached to " + std::to_string(c.functions) +
               " functions, its filter selects " + std::to_string(members(k)));
    }
  }

  void disable_enable(int k) {
    Slot& s = g_slots[k];
    transition(k, SlotState::unknown);
    if (Status st = hooks::disable(s.ops); !st.ok()) s_.error("disable: " + st.message());
    transition(k, SlotState::zero);
    s_.disables.fetch_add(1);
    pause_short();
    check_counts_quiesced(k, "while disabled");
    transition(k, SlotState::unknown);
    if (Status st = hooks::enable(s.ops); !st.ok()) s_.error("enable: " + st.message());
    transition(k, SlotState::run);
    pause_short();
  }

  // The bounds of a detach made while callbacks run (see detach_slot).
  void check_live_bounds(int k, const char* what, std::uint64_t hits_before, std::uint64_t own, std::uint64_t in_detach) {
    if (own < hits_before || own - in_detach > hits_before) {
      s_.mismatch("slot " + std::to_string(k) + " " + what + ": counters(ops).hits=" + std::to_string(hits_before) +
                  " before it, its callback ran " + std::to_string(own) + " times (" + std::to_string(in_detach) +
                  " after the read began)");
    }
  }

  void detach_slot(int k) {
    Slot& s = g_slots[k];
    const bool quiesced = rng_() % 2 == 0;
    std::uint64_t hits_before = 0;
    transition(k, SlotState::unknown);
    if (quiesced) {  // disabled first: the counts are compared exactly
      if (Status st = hooks::disable(s.ops); !st.ok()) s_.error("disable: " + st.message());
      transition(k, SlotState::zero);
      check_counts_quiesced(k, "before detach");
      const std::uint64_t skips = s.skips_expected.load(std::memory_order_acquire) & kCountMask;
      const hooks::OpsCounters c = hooks::counters(s.ops);
      hits_before = c.hits;
      check_skips(k, c.recursion_skipped, skips);
    } else {
      // Live detach: callbacks keep starting until the cells are unpublished, so the counts
      // are compared with bounds. Every callback incremented hits (in the dispatcher) before
      // its own count. A callback that did not see `detaching` had its hits increment counted
      // in hits_before (the two seq_cst fences: store-buffering), so
      //   own_final - own_in_detach <= hits_before <= own_final,
      // the right side because every hit counted was a callback that ended before detach
      // returned (invariant 8) and so is in own_final.
      const std::uint64_t skips = s.skips_expected.load(std::memory_order_acquire) & kCountMask;
      s.detaching.store(true, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      const hooks::OpsCounters c = hooks::counters(s.ops);
      hits_before = c.hits;
      check_skips(k, c.recursion_skipped, skips);
    }
    const auto t0 = std::chrono::steady_clock::now();
    const Status detached = hooks::detach(s.ops);
    s_.detach_ns.fetch_add(ns_since(t0));
    if (!detached.ok()) {
      s_.error("detach slot " + std::to_string(k) + ": " + detached.message());
      return;  // still attached: the next cycle's attach of this slot will fail loudly
    }
    s.detached.store(true, std::memory_order_release);
    attached_[k] = false;
    s_.detaches.fetch_add(1);
    transition(k, SlotState::zero);
    const std::uint64_t own = s.own.load(), in_detach = s.own_in_detach.load();
    s_.count_checks.fetch_add(1);
    if (quiesced) {
      s_.quiesced_detaches.fetch_add(1);
      if (own != hits_before) {
        s_.mismatch("slot " + std::to_string(k) + ": its callback ran " + std::to_string(own) +
                    " times by the end of a detach of the disabled ops, counters(ops).hits was " +
                    std::to_string(hits_before));
      }
    } else {
      s_.live_detaches.fetch_add(1);
      check_live_bounds(k, "live detach", hits_before, own, in_detach);
    }
    own_after_detach_[k] = own;
  }

  // Async detach: the same bounds as a live detach, checked once done has run (poll_async).
  void detach_async_slot(int k) {
    Slot& s = g_slots[k];
    transition(k, SlotState::unknown);
    const std::uint64_t skips = s.skips_expected.load(std::memory_order_acquire) & kCountMask;
    s.detaching.store(true, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    const hooks::OpsCounters c = hooks::counters(s.ops);
    hits_before_[k] = c.hits;
    check_skips(k, c.recursion_skipped, skips);
    s.async_done.store(false);
    const auto t0 = std::chrono::steady_clock::now();
    const Status st = hooks::detach_async(s.ops, [&s] {
      s.detached.store(true, std::memory_order_release);
      s.async_done.store(true, std::memory_order_release);
    });
    s_.async_ns.fetch_add(ns_since(t0));
    if (!st.ok()) {
      s_.error("detach_async slot " + std::to_string(k) + ": " + st.message());
      return;
    }
    attached_[k] = false;
    in_flight_[k] = true;
    s_.async_detaches.fetch_add(1);
  }

  // Slots whose async detach completed: no callback of theirs may run from now on.
  void poll_async() {
    for (int k = 0; k < kSlots; ++k) {
      Slot& s = g_slots[k];
      if (!in_flight_[k] || !s.async_done.load(std::memory_order_acquire)) continue;
      in_flight_[k] = false;
      transition(k, SlotState::zero);
      const std::uint64_t own = s.own.load(), in_detach = s.own_in_detach.load();
      s_.count_checks.fetch_add(1);
      check_live_bounds(k, "async detach", hits_before_[k], own, in_detach);
      own_after_detach_[k] = own;
      s_.detaches.fetch_add(1);
      s_.cycles.fetch_add(1);
    }
  }

  // One step: attach a free slot, or detach an attached one (synchronously, disabled first
  // or live, or asynchronously), sometimes disable and re-enable one. A cycle is one attach
  // and its detach; with several slots attached, sites carry per-site lists of ops.
  void step() {
    poll_async();
    // A detached slot's own count must not have moved since its detach completed.
    for (int k = 0; k < kSlots; ++k) {
      if (!attached_[k] && !in_flight_[k] && g_slots[k].own.load() != own_after_detach_[k]) {
        s_.moved_after_detach.fetch_add(1);
        s_.mismatch("slot " + std::to_string(k) + ": its callback ran after its detach completed");
        own_after_detach_[k] = g_slots[k].own.load();
      }
    }
    std::vector<int> idle, attached;
    for (int k = 0; k < kSlots; ++k) {
      if (attached_[k]) attached.push_back(k);
      else if (!in_flight_[k]) idle.push_back(k);
    }
    const auto pick = [this](const std::vector<int>& v) { return v[rng_() % v.size()]; };
    auto t0 = std::chrono::steady_clock::now();
    int what = 0;
    // At most kMaxAttached at once (per-site lists of up to that many ops); the other slots
    // wait out their async detaches' grace periods, so that attaches need not wait for them.
    if (!idle.empty() && (attached.empty() || (attached.size() < kMaxAttached && rng_() % 2 == 0))) {
      const int k = pick(idle);
      attach_slot(k, make_filter(k));
      what = 0;
    } else if (!attached.empty()) {
      const int k = pick(attached);
      // Mostly async: a synchronous detach (and the count check of disable_enable) waits for
      // a grace period of its own, about 30 ms with 16 callers on 2 CPUs preempted inside
      // callbacks; async detaches share grace periods, 32 slots covering their latency.
      const auto r = rng_() % 128;
      if (r == 0) {
        disable_enable(k);
        what = 1;
      } else if (r < 3) {
        detach_slot(k);
        s_.cycles.fetch_add(1);
        what = 2;
      } else {
        detach_async_slot(k);
        what = 3;
      }
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));  // every slot is in flight
      what = 4;
    }
    s_.step_ns[what].fetch_add(ns_since(t0));
    t0 = std::chrono::steady_clock::now();
    if (rng_() % 8 == 0) pause_short();
    s_.step_ns[5].fetch_add(ns_since(t0));
  }

  // Detaches every attached slot and waits for the async ones.
  void finish() {
    for (int k = 0; k < kSlots; ++k) {
      if (attached_[k]) {
        detach_slot(k);
        s_.cycles.fetch_add(1);
      }
    }
    if (Status st = grace::barrier(); !st.ok()) s_.error("grace::barrier: " + st.message());
    poll_async();
    for (int k = 0; k < kSlots; ++k) {
      if (in_flight_[k]) s_.error("slot " + std::to_string(k) + ": detach_async's done did not run by grace::barrier()");
    }
  }

  Shared& s_;
  std::mt19937_64 rng_;
  std::uint64_t max_cycles_;
  std::array<SlotState, kSlots> state_ = [] {
    std::array<SlotState, kSlots> a;
    a.fill(SlotState::zero);
    return a;
  }();
  std::array<std::vector<bool>, kSlots> member_;
  std::array<bool, kSlots> attached_{}, in_flight_{};
  std::array<std::uint64_t, kSlots> hits_before_{};
  std::array<std::uint64_t, kSlots> own_after_detach_{};
  std::array<std::uint32_t, kSlots> tag_{};
  std::uint32_t next_tag_ = 0;
};

// ---- setup and report ------------------------------------------------------------------------

long rss_kib() {
  FILE* f = std::fopen("/proc/self/status", "re");
  if (!f) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof line, f)) {
    if (std::sscanf(line, "VmRSS: %ld kB", &kib) == 1) break;
  }
  std::fclose(f);
  return kib;
}

// Callers never block; at normal priority they would leave the controller (which blocks in
// membarrier and /proc writes every batch) a small share of the CPU.
void lower_priority() { setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10); }

void caller(const Options& o, Shared& s, ThreadState* ts, int index) {
  t_state = ts;
  t_handler_rng = (0x9e3779b97f4a7c15ull * (o.seed + static_cast<std::uint64_t>(index) + 1)) | 1;
  lower_priority();
  { grace::ReadGuard first; }  // register before the storm can enter the stub from a handler
  StormTimer timer(o.signal_interval_us);
  std::uint64_t rng = (0xd1b54a32d192ed03ull * (o.seed + static_cast<std::uint64_t>(index) + 7)) | 1;
  while (!s.stop_callers.load(std::memory_order_relaxed)) {
    const std::uint64_t r = xorshift(rng);
    call_one(ts->context[0], static_cast<int>(r % static_cast<std::uint64_t>(g_count)), static_cast<int>((r >> 32) & 0xfffff), Mode::full);
  }
}

struct Totals {
  std::uint64_t calls = 0, inside = 0, outside = 0, straddling = 0, handler_calls = 0, relaxed = 0, relaxed_skipped = 0;
  std::uint64_t skipped = 0, recursive = 0, callbacks = 0, bad_callbacks = 0, violations = 0;
  std::uint64_t kinds[kKinds] = {};
};
Totals sum(const std::vector<ThreadState>& states) {
  Totals t;
  for (const ThreadState& ts : states) {
    for (const Counters& c : ts.context) {
      t.calls += c.calls.load();
      t.inside += c.checked_inside.load();
      t.outside += c.checked_outside.load();
      t.straddling += c.straddling.load();
      t.handler_calls += c.handler_calls.load();
      t.relaxed += c.relaxed_calls.load();
      t.relaxed_skipped += c.relaxed_skipped.load();
      t.skipped += c.skipped_calls.load();
      t.recursive += c.recursive_calls.load();
      t.callbacks += c.callbacks.load();
      t.bad_callbacks += c.bad_callbacks.load();
      for (int k = 0; k < kKinds; ++k) {
        t.kinds[k] += c.violations[k].load();
        t.violations += c.violations[k].load();
      }
    }
  }
  return t;
}

std::string hits_text(const std::uint8_t (&hits)[kSlots]) {
  std::string out;
  for (int k = 0; k < kSlots; ++k) {  // piecewise: GCC 12 -O3 flags "" + string with -Wrestrict
    if (k) out += ' ';
    out += std::to_string(hits[k]);
  }
  return out;
}

}  // namespace

int run_hooks(const Options& o) {
  if (!install_storm_handler("hooks", on_sigprof)) return 1;
  std::string error, refused;
  if (!load_hook_functions(g_t, &refused, &error) || !install_detour_poison(&error)) {
    std::fprintf(stderr, "hooks: %s\n", error.c_str());
    return 1;
  }
  g_count = g_t.count;
  const int relocated = g_t.count - g_t.patchable;
  std::fprintf(stderr, "hooks: %d functions with patchable entries, %d of %d without them relocatable%s\n%s",
               g_t.patchable, relocated, g_t.without_entry,
               relocated == g_t.without_entry ? "" : "; left out:", refused.c_str());
  // The relocator may refuse a few (a loop whose branch lands inside the run), not more.
  if (relocated * 10 < g_t.without_entry * 9) {
    std::fprintf(stderr, "hooks: fewer than 90%% of the functions without patchable entries are relocatable\n");
    return 1;
  }
  const text::PatchStats patch_before = text::stats();
  // The lean path must really be taken: the scan has to prove on_entry_lean (an optimised
  // build does) and must refuse on_entry, which calls out and reads its EntryRegs.
  const auto lean_scan = tramway::arch::scan_callback(reinterpret_cast<std::uintptr_t>(&on_entry_lean));
  const auto full_scan = tramway::arch::scan_callback(reinterpret_cast<std::uintptr_t>(&on_entry));
  if (!lean_scan.vector_free || lean_scan.reads_regs || (full_scan.vector_free && !full_scan.reads_regs)) {
    std::fprintf(stderr, "hooks: the callback scan does not tell the lean callback (%s) from the full one (%s); "
                 "build the torture optimised (the gcc or clang preset)\n",
                 lean_scan.reason.empty() ? "lean" : lean_scan.reason.c_str(),
                 full_scan.reason.empty() ? "proven lean" : full_scan.reason.c_str());
    return 1;
  }
  for (int k = 0; k < kSlots; ++k) {
    g_slots[k].index = k;
    g_slots[k].ops.entry = (kLeanSlots >> k) & 1 ? on_entry_lean : on_entry;
    g_slots[k].ops.data = &g_slots[k];
  }

  Shared shared;
  Controller controller(o, shared);
  controller.publish_initial();
  std::vector<ThreadState> states(static_cast<std::size_t>(o.threads));
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> callers;
  for (int i = 0; i < o.threads; ++i) {
    callers.emplace_back(caller, std::cref(o), std::ref(shared), &states[static_cast<std::size_t>(i)], i);
  }
  std::thread control([&] { controller.run(); });

  // Warm-up: the site tables and thunks grow until every function has been hooked once.
  const double warmup = std::min(10.0, o.seconds / 4);
  long rss_start = -1;
  const auto end = start + std::chrono::duration<double>(o.seconds);
  auto next_report = start + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < end && !shared.stop_controller.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto now = std::chrono::steady_clock::now();
    const double t = std::chrono::duration<double>(now - start).count();
    if (rss_start < 0 && t >= warmup && shared.cycles.load() >= 10) rss_start = rss_kib();
    if (now >= next_report) {
      next_report += std::chrono::seconds(10);
      const Totals tt = sum(states);
      std::uint64_t late = 0;
      for (const Slot& sl : g_slots) late += sl.late.load();
      std::fprintf(stderr,
                   "hooks: %.0f/%.0f s, %" PRIu64 " cycles, %" PRIu64 " callbacks, %" PRIu64 " calls (%" PRIu64
                   " checked inside, %" PRIu64 " outside), %" PRIu64 " violations\n",
                   t, o.seconds, shared.cycles.load(), tt.callbacks, tt.calls, tt.inside, tt.outside,
                   tt.violations + tt.bad_callbacks + late + shared.errors.load() + shared.count_mismatches.load());
    }
  }
  shared.stop_controller.store(true);
  control.join();  // it detaches every slot and waits for async detaches, the callers still running
  shared.stop_callers.store(true);
  for (auto& t : callers) t.join();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  if (Status st = grace::barrier(); !st.ok()) shared.error("grace::barrier: " + st.message());
  const long rss_end = rss_kib();
  if (rss_start < 0) rss_start = rss_end;  // the run was too short to warm up
  const bool rss_grew = rss_end - rss_start > kRssBoundKiB;

  // Every function's own count against the calls made to it.
  std::uint64_t body_mismatches = 0;
  for (int i = 0; i < g_count; ++i) {
    std::uint64_t made = 0;
    for (const ThreadState& ts : states) made += ts.context[0].body_calls[i] + ts.context[1].body_calls[i];
    const unsigned long long counted = __atomic_load_n(g_t.body_calls[i], __ATOMIC_RELAXED);
    if (counted != made) {
      if (body_mismatches++ == 0) {
        std::fprintf(stderr, "hooks: tw_fn_%d ran %llu times but was called %" PRIu64 " times\n", g_t.number[i],
                     counted, made);
      }
    }
  }
  // Nothing of ours may still be hooked, and the relocated functions have their bytes back.
  if (auto fns = hooks::functions(); !fns.ok()) {
    shared.error("functions: " + fns.status().message());
  } else {
    for (const hooks::Function& f : *fns) {
      if (f.ops != 0 && f.name.rfind("tw_fn_", 0) == 0) shared.hooked_sites.fetch_add(1);
    }
  }
  std::string changed_first;
  const int bytes_changed = relocated_bytes_changed(g_t, &changed_first);
  if (bytes_changed) shared.error(changed_first + " (" + std::to_string(bytes_changed) + " functions)");
  const text::PatchStats patch_after = text::stats();
  const PoisonTotals poison = detour_poison_totals();
  std::uint64_t late = 0;
  for (const Slot& s : g_slots) late += s.late.load();

  const Totals tt = sum(states);
  const std::uint64_t violations = tt.violations + tt.bad_callbacks + late + shared.count_mismatches.load() +
                                   shared.errors.load() + body_mismatches + shared.hooked_sites.load() +
                                   (rss_grew ? 1 : 0);
  for (int k = 0; k < kKinds; ++k) {
    if (tt.kinds[k]) std::fprintf(stderr, "hooks: %" PRIu64 " x %s\n", tt.kinds[k], kKindNames[k]);
  }
  int shown = 0;
  for (const ThreadState& ts : states) {
    for (int ctx = 0; ctx < 2; ++ctx) {
      const Record& r = ts.context[ctx].first;
      if (!r.set || shown++ >= 8) continue;
      std::fprintf(stderr,
                   "hooks:   first in a %s: %s: tw_fn_%d, mode %s, windows %" PRIu64 "/%" PRIu64
                   ", due once 0x%08x, due never 0x%08x, hits per slot [%s]\n",
                   ctx ? "handler" : "thread", kKindNames[r.kind], g_t.number[r.function],
                   r.mode == Mode::full ? "full" : r.mode == Mode::relaxed ? "relaxed" : "skipped", r.w0, r.w1,
                   unsigned{r.one}, unsigned{r.zero}, hits_text(r.hits).c_str());
    }
  }
  if (tt.bad_callbacks) {
    std::fprintf(stderr, "hooks: %" PRIu64 " callbacks with a wrong function, argument or no call in progress\n",
                 tt.bad_callbacks);
  }
  if (late) std::fprintf(stderr, "hooks: %" PRIu64 " callbacks ran after their ops' detach returned\n", late);
  if (const std::uint64_t n = shared.hooked_sites.load()) {
    std::fprintf(stderr, "hooks: %" PRIu64 " functions still hooked after every ops was detached\n", n);
  }
  if (rss_grew) std::fprintf(stderr, "hooks: VmRSS grew from %ld to %ld KiB\n", rss_start, rss_end);
  if (!shared.first_error.empty()) std::fprintf(stderr, "hooks: %s\n", shared.first_error.c_str());

  std::fprintf(stderr, "hooks: controller time (s): attach %.2f, disable+enable %.2f, detach %.2f, detach_async %.2f, waiting for a free slot %.2f, pauses %.2f\n",
               shared.step_ns[0].load() / 1e9, shared.step_ns[1].load() / 1e9, shared.step_ns[2].load() / 1e9,
               shared.step_ns[3].load() / 1e9, shared.step_ns[4].load() / 1e9, shared.step_ns[5].load() / 1e9);
  const auto ms_each = [](const std::atomic<std::uint64_t>& ns, std::uint64_t n) {
    return static_cast<double>(ns.load()) / 1e6 / static_cast<double>(std::max<std::uint64_t>(1, n));
  };
  std::printf("hooks: %s %.1f s, %d callers, signal every %d us: cycles=%" PRIu64 " (%.1f/s), attaches=%" PRIu64
              " (%" PRIu64 " direct; %.2f ms each), detaches=%" PRIu64 " (%" PRIu64 " async, %.2f ms in the call each; %" PRIu64
              " live, %" PRIu64 " disabled first, %.2f ms each)"
              ", disables=%" PRIu64 ", windows=%" PRIu64 ", calls=%" PRIu64 " (handler %" PRIu64
              ", from callbacks %" PRIu64 "), callbacks=%" PRIu64 ", checked_inside=%" PRIu64
              ", checked_outside=%" PRIu64 ", straddling=%" PRIu64 ", handler_relaxed=%" PRIu64 " (%" PRIu64
              " skipped), skipped_checked=%" PRIu64 ", late=%" PRIu64 ", count_checks=%" PRIu64
              " (synchronize %.2f ms each), count_mismatches=%" PRIu64 ", recursion_skipped=%" PRIu64 " (%" PRIu64
              " proved), body_mismatches=%" PRIu64 ", functions=%d (%d relocated, %d refused), runs_displaced=%" PRIu64
              ", pcs_moved=%" PRIu64 ", copies_poisoned=%" PRIu64 " (%" PRIu64 " given back), errors=%" PRIu64
              ", rss_kib=%ld->%ld, violations=%" PRIu64 "\n",
              violations ? "FAIL" : "PASS", elapsed, o.threads, o.signal_interval_us, shared.cycles.load(),
              static_cast<double>(shared.cycles.load()) / elapsed, shared.attaches.load(), shared.direct_attaches.load(),
              ms_each(shared.attach_ns, shared.attaches.load()), shared.detaches.load(), shared.async_detaches.load(),
              ms_each(shared.async_ns, shared.async_detaches.load()), shared.live_detaches.load(),
              shared.quiesced_detaches.load(),
              ms_each(shared.detach_ns, shared.live_detaches.load() + shared.quiesced_detaches.load()),
              shared.disables.load(), shared.windows.load(), tt.calls, tt.handler_calls, tt.recursive, tt.callbacks,
              tt.inside, tt.outside, tt.straddling, tt.relaxed, tt.relaxed_skipped, tt.skipped, late,
              shared.count_checks.load(), ms_each(shared.sync_ns, shared.count_checks.load()),
              shared.count_mismatches.load(), shared.recursion_skipped.load(), shared.skips_proved.load(),
              body_mismatches, g_count, relocated, g_t.without_entry - relocated,
              patch_after.runs_displaced - patch_before.runs_displaced, patch_after.pcs_moved - patch_before.pcs_moved,
              poison.poisoned, poison.given_back, shared.errors.load(), rss_start, rss_end, violations);
  return violations ? 1 : 0;
}

}  // namespace tramway::torture
