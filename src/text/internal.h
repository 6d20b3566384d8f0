// Internals shared by the text layer's files. Not installed.
#pragma once

#include <signal.h>
#include <ucontext.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/proc.h"
#include "tramway/status.h"

namespace tramway::text::detail {

struct Counters {
  std::atomic<std::uint64_t> batches{0};
  std::atomic<std::uint64_t> serialisations{0};
  std::atomic<std::uint64_t> page_writes{0};
  std::atomic<std::uint64_t> traps_emulated{0};
  std::atomic<std::uint64_t> traps_restarted{0};
  std::atomic<std::uint64_t> nop_runs_replaced{0};
  std::atomic<std::uint64_t> runs_displaced{0};
  std::atomic<std::uint64_t> pcs_moved{0};
};
Counters& counters() noexcept;

// --- writer.cc: bytes into code, W^X ---------------------------------------------------
// One write of `len` bytes at `address`: through the RW view for generated code, through
// /proc/self/mem for program text.
Status write_span(std::uintptr_t address, const std::uint8_t* bytes, std::size_t len);

// Collects byte changes and writes them with one write per touched page. Changes arrive in
// address order from a sorted batch, so they are appended and only sorted if they are not.
// The buffer keeps its capacity: reused batch after batch, it does not fault pages in again.
class PageWriter {
 public:
  void set(std::uintptr_t address, std::uint8_t byte) { bytes_.emplace_back(address, byte); }
  bool empty() const noexcept { return bytes_.empty(); }
  Status flush();

 private:
  std::vector<std::pair<std::uintptr_t, std::uint8_t>> bytes_;
};

void writer_after_fork_in_child() noexcept;

// --- serialize.cc ---------------------------------------------------------------------
// Registers the process for membarrier SYNC_CORE (once per mm; slow, a few ms, so done before
// a batch writes anything) and fails clearly on kernels without it.
Status prepare_serialization();
// membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE).
Status serialize_all_cores();
void serialize_after_fork_in_child() noexcept;

// --- patch.cc: the trap side --------------------------------------------------------------
// Called by the SIGTRAP router for an int3 trap (si_code SI_KERNEL). Returns true when the
// trap was ours (emulated, or its int3 is gone and the instruction is re-executed).
bool handle_int3(ucontext_t* uc) noexcept;
// Asked first about every int3 trap (async-signal-safe): true when it was a trap probe's and
// the handler carried the thread past it (sites/hooks/trap_probes.cc). Set once.
using ProbeHandler = bool (*)(ucontext_t* uc) noexcept;
void set_probe_handler(ProbeHandler handler) noexcept;

// --- signal_router.cc ------------------------------------------------------------------------
Status ensure_router() noexcept;
// Whether a thread that has not answered a PC fix-up within the batch's timeout is only waiting
// for a CPU: runnable (state R) with the fix-up signal pending and not blocked (it takes it
// when it runs), or delivered and blocked (it is inside the handler). On a loaded machine a
// niced thread can wait longer than the timeout for a CPU, so move_pcs waits on for such
// threads, up to kFixupRunnableLimitNs.
bool waiting_for_cpu(char state, const common::SignalSets& sets, int fixup_signal) noexcept;
inline constexpr std::int64_t kFixupRunnableLimitNs = 20'000'000'000;
// Removes SIGTRAP, the fix-up signal and glibc's internal signals from a mask the program sets.
void strip_router_signals(sigset_t* set) noexcept;
// The handler the router installed for SIGTRAP or the fix-up signal (0 for other signals).
std::uintptr_t router_handler_for(int sig) noexcept;
int installed_fixup_signal() noexcept;        // 0 before the router is installed; never installs it

// --- signal_masks.cc: the glibc mask APIs that do not go through sigprocmask --------------------
// Tells the program, once, on stderr, that it asked for the fix-up signal (`how`: "signalfd",
// "sigwait", "sigaction"...) and what to do; later batches refuse until it is resolved.
void report_fixup_signal_use(const char* how) noexcept;
// True when `set` names the fix-up signal but not every real-time signal (sigfillset).
bool names_fixup_signal(const sigset_t* set) noexcept;
// Whether the program ever named the fix-up signal (a mask, signalfd, sigwait, a handler).
bool fixup_use_seen() noexcept;
void note_fixup_use() noexcept;

// The router's interposer of one of the functions got_redirect.h names (0 for another name).
std::uintptr_t interposer_address(const char* name) noexcept;
// For a libtramway loaded into a running program: put the interposers in front of libc
// (got_redirect.h), now and, through precheck_batch, for objects loaded later.
void bring_interposers_in_front() noexcept;
bool interposers_brought_in_front() noexcept;
// The signals whose kernel handler is the router's wrapper (the program's handler behind it).
std::vector<int> wrapped_signals();

// --- batch_precheck.cc: what apply() checks before any int3 is written --------------------------
// Every thread may take SIGTRAP (none blocks it) and the kernel's SIGTRAP and fix-up
// dispositions are still the router's; the fix-up signal is not the program's (no thread
// blocks it, no signalfd waits for it). Errors name the thread, the signal, and a debugger
// attached to the process.
Status precheck_batch();
// Signals some signalfd of this process waits for (/proc/self/fdinfo, `sigmask:`), bit n-1 for
// signal n.
std::uint64_t signalfd_signals() noexcept;
// "; a debugger (pid N) is attached: see the README's gdb section", or "" when none is.
std::string debugger_note();

// --- range_watch.cc ---------------------------------------------------------------------------
struct ThreadSlot;
// Samples the calling thread (in the fix-up handler) against the published watch, if any.
void sample_for_watch(ThreadSlot* s, const ucontext_t* uc) noexcept;
void watch_after_fork_in_child() noexcept;

// --- fork(): lock rank text (common/lock_order.h) ---------------------------------------------
// Patch lock -> fix-up lock -> handler table -> code memory: patch.cc's fork hook takes them
// in that order, so a child never inherits one of them held.
void router_before_fork() noexcept;
void router_after_fork_in_parent() noexcept;
void router_after_fork_in_child() noexcept;
void code_memory_before_fork() noexcept;
void code_memory_after_fork_in_parent() noexcept;
void code_memory_after_fork_in_child() noexcept;

// --- tests only ---------------------------------------------------------------------------------
namespace testing {
// Called by apply() once every int3 of a batch is in and every core has seen them, before any
// tail is written (threads at a site are carried on as the new instruction); an error fails the
// batch there, and apply puts the old heads back. nullptr: none.
void set_after_int3s_hook(Status (*hook)());
}  // namespace testing

}  // namespace tramway::text::detail
