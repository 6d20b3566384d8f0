// tramway/text/signal_router.h — signals that cannot lose a thread.
//
// The router is installed when libtramway loads. It
//  * owns SIGTRAP: an int3 at a site being patched is emulated as the new instruction;
//    every other SIGTRAP (a debugger's breakpoint, a program's own int3, raise(SIGTRAP)) goes
//    to the handler the program installed, or gets the default action;
//  * interposes sigaction/signal/sigset/bsd_signal/sysv_signal so that every handler the
//    program installs runs behind a thin async-signal-safe wrapper which records, per thread,
//    the interrupted context of every handler in progress (nested frames);
//  * keeps SIGTRAP and its fix-up signal deliverable: they are removed from every signal
//    mask the program sets through sigprocmask/pthread_sigmask/sigaction (a blocked SIGTRAP at
//    an int3 would kill the process).
// move_pcs() moves every thread interrupted inside a range — live or in a nested frame — out
// of it; a RangeWatch observes threads against ranges without moving them (the tasks grace
// period). The fix-up signal is SIGRTMAX-1 unless TRAMWAY_FIXUP_SIGNAL names another (a
// number); the program cannot install a handler for it.
#pragma once

#include <chrono>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "tramway/status.h"

namespace tramway::text {

// Idempotent. Runs at load; exposed for programs that load libtramway late.
Status install_signal_router();

// The real-time signal tramway uses to reach threads.
int fixup_signal() noexcept;

struct MoveReport {
  int threads_seen = 0;       // threads of the process other than the caller
  int threads_signalled = 0;  // running or runnable, or possibly in range: signalled
  int threads_observed = 0;   // proven outside through /proc (blocked, stopped), not disturbed
  int pcs_moved = 0;          // interrupted PCs (live or nested) that were moved
};

// Moves the interrupted PC of every thread of the process (every entry of /proc/self/task)
// that lies in [begin, end) to `destination`, including PCs saved in nested signal frames.
// Returns when every thread has answered or was proven outside the range. A thread that
// does not answer within `timeout` (stopped or traced inside the range, or a handler that
// never returns) yields an error naming it.
Result<MoveReport> move_pcs(std::uintptr_t begin, std::uintptr_t end, std::uintptr_t destination,
                            std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));

// One range of a batched fix-up: PCs in [begin, end) go to `destination`.
struct PcMove {
  std::uintptr_t begin = 0, end = 0;
  std::uintptr_t destination = 0;
};

// The same for many ranges at once (sorted by begin, disjoint, none empty; an error
// otherwise): one signal round trip to the running threads for all of them. Each PC is moved
// at most once, by the range it lies in (a destination is not looked up again). An empty
// span moves nothing and signals nobody. The moves are copied: the caller's array is not
// read after the call returns.
Result<MoveReport> move_pcs(std::span<const PcMove> moves,
                            std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));

struct PcRange {
  std::uintptr_t begin = 0, end = 0;  // [begin, end)
};

// Observes threads against a set of code ranges without moving them. A thread is outside
// when, at one instant after the watch began, its live PC, every PC saved in its nested signal
// frames and the int3 it may be having emulated all lie outside every range. A blocked or
// stopped thread is looked at through /proc and its recorded frames, undisturbed; a running
// one is sent the fix-up signal, whose handler samples its own frames. One watch at a time
// per process; single-threaded use.
//
// Stages let a caller ask early and decide late: an answer sampled in an earlier stage than
// the current one counts only if the thread's `quiet` probe (called in its handler) said true
// then; otherwise the thread is asked again.
class RangeWatch {
 public:
  // Runs in the sampled thread's signal handler: async-signal-safe, no locks.
  using QuiescenceProbe = bool (*)() noexcept;

  // Fails when another watch is active.
  static Result<std::unique_ptr<RangeWatch>> start(std::vector<PcRange> ranges, QuiescenceProbe quiet = nullptr);
  ~RangeWatch();
  RangeWatch(const RangeWatch&) = delete;
  RangeWatch& operator=(const RangeWatch&) = delete;

  enum class Verdict {
    outside,  // gone, or seen outside since the watch began (and in this stage, or quiet): final
    inside,   // seen inside (pc says where): look again later
    asked,    // running: signalled, its answer is not in yet (one signal outstanding at most)
  };
  struct Look {
    Verdict verdict;
    std::uintptr_t pc = 0;  // inside: a PC found in a range; asked: the last one seen, 0 if none
  };
  Look look(pid_t tid);
  // Signals `tid` if /proc shows it running (one file read), so that its answer is sampled
  // while the caller does something else. No signal if one is outstanding.
  void ask_if_running(pid_t tid);
  void next_stage();

  // The watched ranges, sorted and merged.
  const std::vector<PcRange>& ranges() const noexcept { return ranges_; }
  int threads_signalled() const noexcept { return threads_signalled_; }  // distinct threads asked

 private:
  explicit RangeWatch(std::vector<PcRange> ranges, std::uint64_t epoch);
  struct Asked {
    bool outstanding = false;
    std::uint32_t samples_at_ask = 0;
    std::uintptr_t last_inside = 0;
    bool ever_signalled = false;
  };
  Look ask(pid_t tid, Asked& a);
  std::vector<PcRange> ranges_;
  std::uint64_t epoch_;
  std::uint32_t stage_ = 0;
  std::unordered_map<pid_t, Asked> asked_;
  int threads_signalled_ = 0;
};

// The interrupted PCs of the signal handlers the calling thread is running, outermost first
// (empty outside handlers). For tests and diagnostics; async-signal-safe.
std::size_t interrupted_pcs(std::uintptr_t* out, std::size_t capacity) noexcept;

}  // namespace tramway::text
