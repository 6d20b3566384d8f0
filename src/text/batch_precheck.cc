// What a batch checks before it writes its first int3 (issue 11, defects 4, 5, 6 and 11).
//
// An int3 delivered to a thread that blocks SIGTRAP, or whose SIGTRAP disposition is not the
// router's, kills the process (the kernel forces SIG_DFL). The interposers keep SIGTRAP out of
// every mask set through glibc, but a raw system call (rt_sigprocmask, rt_sigaction) or a glibc
// path that calls the kernel directly goes around them. So before every batch: the kernel's
// SIGTRAP and fix-up dispositions (one rt_sigaction query each), and every thread's blocked
// mask (SigBlk of /proc/self/task/TID/status, one read per thread). A thread that blocks the
// fix-up signal, or a signalfd that waits for it, means the program uses that signal: the
// batch is refused with a message naming TRAMWAY_FIXUP_SIGNAL rather than the program losing
// its signal. Cost, measured with bench_hooks on one thread: see the README's signal section.
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/format.h"
#include "common/proc.h"
#include "text/all_blocked.h"
#include "text/got_redirect.h"
#include "text/internal.h"
#include "text/thread_slots.h"
#include "tramway/text/signal_router.h"

namespace tramway::text::detail {
namespace {

// The kernel's struct sigaction (the raw system call's, not glibc's).
struct KernelAction {
  std::uintptr_t handler;
  unsigned long flags;
  std::uintptr_t restorer;
  std::uint64_t mask;
};

std::uint64_t bit(int sig) { return std::uint64_t{1} << (sig - 1); }

using common::read_small;

pid_t tracer_pid() {
  char buf[4096];
  if (!read_small("/proc/self/status", buf, sizeof buf)) return 0;
  const char* at = std::strstr(buf, "\nTracerPid:");
  return at ? static_cast<pid_t>(common::parse_decimal(at + 11)) : 0;
}

std::string signal_name(int sig) {
  if (sig == SIGTRAP) return "SIGTRAP";
  return "signal " + std::to_string(sig) + " (SIGRTMIN+" + std::to_string(sig - SIGRTMIN) + ")";
}

std::string thread_text(pid_t tid) { return "thread " + std::to_string(tid) + " (" + common::thread_name(tid) + ")"; }

Status disposition_check(int sig, const char* role) {
  KernelAction k{};
  if (::syscall(SYS_rt_sigaction, sig, nullptr, &k, sizeof(std::uint64_t)) != 0) return {};
  if (k.handler == router_handler_for(sig)) return {};
  const std::string what = k.handler == reinterpret_cast<std::uintptr_t>(SIG_DFL)   ? "SIG_DFL"
                           : k.handler == reinterpret_cast<std::uintptr_t>(SIG_IGN) ? "SIG_IGN"
                                                                                   : common::hex_address(k.handler);
  return Status::error("refusing to patch: the kernel's " + signal_name(sig) + " disposition (" + role +
                       ") is no longer tramway's signal router but " + what +
                       ", installed without going through sigaction() (a raw rt_sigaction system call?); an int3 "
                       "would then kill the program. Install handlers through sigaction(), which tramway chains to");
}

// Every signal is blocked for a moment by tramway's own windows (marked: all_blocked.h), by the
// router's handlers before sigreturn (marked in the thread's slot) and by glibc around
// pthread_create, thread exit and fork (not marked). None of these runs a patch site, but a
// preempted thread can sit in one for milliseconds on a loaded machine.

// SIGKILL, SIGSTOP and glibc's two internal signals, which no mask shows blocked.
constexpr std::uint64_t kUnblockable = (std::uint64_t{1} << (SIGKILL - 1)) | (std::uint64_t{1} << (SIGSTOP - 1)) |
                                       (std::uint64_t{1} << 31) | (std::uint64_t{1} << 32);
bool blocks_everything(std::uint64_t mask) { return (mask | kUnblockable) == ~std::uint64_t{0}; }

// CPU time the thread has run (/proc/self/task/TID/schedstat, ns), -1 if unknown.
long long run_time_ns(pid_t tid) {
  char path[64], buf[128];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/schedstat", tid);
  return read_small(path, buf, sizeof buf) ? common::parse_decimal(buf) : -1;
}

// One reading of a thread's sets, judged with what tramway's own records say of the thread:
// - inside one of tramway's windows, the mask that counts is the one the window restores;
// - between a router handler's end and its sigreturn (FrameGuard's destructor blocked
//   everything, then marked the frame exiting) the thread is `ours`, and over at sigreturn,
//   however long a debugger holds it there; once past sigreturn (the record stays until the
//   next handler prunes it) its mask is the program's again, unless it returned into an outer
//   handler;
// - while it moves into or out of a window, or runs a router handler (whose masks block the
//   fix-up signal or everything for a moment), a reading proves nothing (`transient`).
// The mask is read before the records: each verdict stands on one reading, never on a record
// read at another moment than the mask it judges. (A program that blocks everything with a raw
// system call after a handler returned looks `ours` until its next handler: not caught.)
struct Reading {
  common::SignalSets sets;
  bool transient = false;
  bool ours = false;
};
Reading read_sets(pid_t tid) {
  Reading r{common::signal_sets(tid)};
  const WindowLook w = look_at_window(tid);
  if (w.state == WindowLook::inside) r.sets.blocked = w.saved;
  r.transient = w.state == WindowLook::moving;
  if (const ThreadSlot* s = find_slot(tid)) {
    const std::uint32_t d = s->depth.load(std::memory_order_acquire);
    if (d > 0) {
      const bool exiting = d <= kMaxNest && (s->frames[d - 1].load(std::memory_order_acquire) & kExitingTag);
      if (exiting && blocks_everything(r.sets.blocked)) r.ours = true;
      else if (!exiting || d > 1) r.transient = true;
    }
  }
  return r;
}

// How long a settled reading was watched, for the refusal's message.
struct Settled {
  common::SignalSets sets;
  std::int64_t waited_ns = 0;
  long long ran_ns = -1;  // CPU time the thread ran under the mask it was refused for
  bool ours = false;      // in a router handler's exit: not the program's mask, whatever it is
};

// The thread's sets, with the `watched` signals it blocks kept only once proven blocked by the
// program: blocked in every reading, under one unchanged mask and outside tramway's marked
// windows and handlers, while the thread ran 2 ms of CPU time (no transient window lasts that
// long; a thread in a signal storm goes in and out of them, and each change starts the count
// again), or for 1 s of wall time (a thread asleep or stopped: it might wake into a site). A
// signal found unblocked in one reading is dropped: every mask a thread passes through holds
// the program's. `ours` as soon as one reading says so.
constexpr std::int64_t kRunnableLimitNs = 20'000'000'000;  // a thread runnable this long without running

Settled settled_signal_sets(pid_t tid, std::uint64_t watched, bool debugger) {
  Reading r = read_sets(tid);
  const std::int64_t wall_limit = (debugger ? 5'000 : 1'000) * std::int64_t{1'000'000};
  const std::int64_t start = common::monotonic_ns();
  std::uint64_t held = r.sets.blocked & watched;  // blocked in every reading so far
  std::uint64_t mask = r.sets.blocked;
  long long since = r.transient ? -1 : run_time_ns(tid), ran = -1;
  for (int i = 0; r.sets.known && held != 0 && !r.ours; ++i) {
    ran = run_time_ns(tid);
    // Everything blocked, unmarked, is what glibc's own windows look like (pthread_create,
    // thread exit): such a mask must hold for far longer before it counts as the program's.
    const long long needed = blocks_everything(mask) ? 50'000'000 : 2'000'000;
    if (ran >= 0 && since >= 0 && ran - since >= needed) break;
    // The wall-time rule is for a thread that sleeps or is stopped. A runnable thread that has
    // not run proves nothing: on a loaded machine a preempted thread (a niced one, or one in
    // glibc's block-everything window at thread exit, bug 12889) can wait for a CPU longer than
    // a second; it gets one eventually, and then its mask moves or it is gone.
    const std::int64_t waited = common::monotonic_ns() - start;
    if (waited >= wall_limit && (waited >= kRunnableLimitNs || common::probe_task(tid).state != 'R')) break;
    if (i < 20) {
      sched_yield();
    } else {
      const timespec pause{0, 100'000};
      nanosleep(&pause, nullptr);
    }
    r = read_sets(tid);
    held &= r.sets.blocked;
    if (r.transient || r.ours) {
      since = -1;  // moving: count again
      continue;
    }
    if (r.sets.blocked != mask) since = -1;
    if (since < 0) since = run_time_ns(tid);
    mask = r.sets.blocked;
  }
  Settled out{r.sets, common::monotonic_ns() - start, since >= 0 && ran >= 0 ? ran - since : -1, r.ours};
  out.sets.blocked = (r.sets.blocked & ~watched) | held;
  return out;
}

// Where a refused thread is, so that a mask nobody set on purpose can be traced to its code.
std::string where_text(pid_t tid) {
  const common::TaskProbe p = common::probe_task(tid);
  if (p.gone) return "it has exited";
  std::string out = std::string("state ") + p.state;
  if (!p.running) {
    out += ", pc " + common::hex_address(p.pc);
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(p.pc), &info) && info.dli_sname) out += std::string(" (") + info.dli_sname + ")";
    if (p.syscall >= 0) out += ", in system call " + std::to_string(p.syscall);
  }
  return out;
}

std::string watched_text(const Settled& s) {
  std::string out = "; watched for " + std::to_string(s.waited_ns / 1'000'000) + " ms";
  if (s.ran_ns >= 0) out += ", in which it ran " + std::to_string(s.ran_ns / 1'000'000) + " ms of CPU under that mask";
  return out;
}

}  // namespace

std::string debugger_note() {
  const pid_t t = tracer_pid();
  if (t == 0) return "";
  return "; a debugger (pid " + std::to_string(t) + ") is attached: see the README's gdb section (share/tramway/tramway.gdb)";
}

std::uint64_t signalfd_signals() noexcept {
  std::uint64_t out = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return 0;
  const int self = ::dirfd(d);
  char path[64], link[64], buf[1024];
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    const int fd = static_cast<int>(common::parse_decimal(e->d_name));
    if (fd == self) continue;
    std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    const ssize_t n = ::readlink(path, link, sizeof link - 1);
    if (n <= 0) continue;
    link[n] = '\0';
    if (std::strcmp(link, "anon_inode:[signalfd]") != 0) continue;
    std::snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    if (!read_small(path, buf, sizeof buf)) continue;
    if (const char* at = std::strstr(buf, "sigmask:")) out |= common::parse_hex(at + 8);
  }
  ::closedir(d);
  return out;
}

Status precheck_batch() {
  // Objects loaded since the last batch call libc's sigaction & co. until redirected.
  if (interposers_brought_in_front()) redirect_signal_calls();
  const int fix = fixup_signal();
  Status st = disposition_check(SIGTRAP, "int3 traps");
  if (st.ok()) st = disposition_check(fix, "the fix-up signal");
  const std::string fixup_hint = "; it is tramway's fix-up signal: set TRAMWAY_FIXUP_SIGNAL to a real-time signal "
                                 "the program does not use and restart it";
  if (st.ok()) {
    bool debugger_checked = false, debugger = false;
    // The router's own handlers block the fix-up signal for moments that a loaded machine
    // stretches; a thread's mask is asked about it only once the program named the signal
    // (a mask, signalfd, sigwait, a handler: signal_masks.cc).
    const std::uint64_t watched = bit(SIGTRAP) | (fixup_use_seen() ? bit(fix) : 0);
    for (pid_t tid : common::list_threads()) {
      const Reading first = read_sets(tid);
      Settled settled{first.sets, 0, -1, first.ours};
      common::SignalSets& sets = settled.sets;
      if (sets.known && !settled.ours && (sets.blocked & watched)) {
        if (!debugger_checked) debugger = tracer_pid() != 0, debugger_checked = true;
        settled = settled_signal_sets(tid, watched, debugger);
      }
      const std::uint64_t whole_mask = sets.blocked;
      sets.blocked &= watched;
      if (!sets.known || settled.ours) continue;  // exited meanwhile, or ours
      if (sets.blocked & bit(SIGTRAP)) {
        st = Status::error("refusing to patch: " + thread_text(tid) +
                           " blocks SIGTRAP (its mask was set without going through sigprocmask/pthread_sigmask: "
                           "a raw rt_sigprocmask system call, or a glibc function that makes one), and an int3 "
                           "trap it took would kill the program (its blocked set: " + common::hex_address(whole_mask) +
                           "; " + where_text(tid) + watched_text(settled) + "). Unblock SIGTRAP in that thread and retry");
        break;
      }
      if (sets.blocked & bit(fix)) {
        st = Status::error("refusing to patch: " + thread_text(tid) + " blocks " + signal_name(fix) +
                           " (the program reads it with sigwait or a signalfd?)" + fixup_hint);
        break;
      }
    }
  }
  if (st.ok() && fixup_use_seen() && (signalfd_signals() & bit(fix))) {
    st = Status::error("refusing to patch: a signalfd of this process waits for " + signal_name(fix) + fixup_hint);
  }
  if (st.ok()) return st;
  return Status::error(st.message() + debugger_note());
}

}  // namespace tramway::text::detail
