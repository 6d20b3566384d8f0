// The ptrace side of a remote call. At every step, what the rest of the target sees: nothing
// until release() but one thread that is not running (its /proc state says "t", tracing stop).
#include "inject/remote_call.h"

#include <elf.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace tramway::inject {
namespace {

// The kernel's internal restart codes (include/linux/errno.h): never seen by a program.
constexpr long long kERestartSys = 512, kERestartNoIntr = 513, kERestartNoHand = 514, kERestartBlock = 516;
constexpr std::size_t kRedZone = 128;
constexpr std::size_t kScratch = 4096;  // the calls' strings, below the red zone

std::int64_t now_ns() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<std::int64_t>(t.tv_sec) * 1'000'000'000 + t.tv_nsec;
}

Status sys_error(const std::string& what) {
  const int e = errno;
  return Status::error(what + ": " + std::strerror(e), e);
}

std::string signal_name(int sig) {
  const char* n = sigabbrev_np(sig);
  return n ? std::string("SIG") + n : "signal " + std::to_string(sig);
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "was killed by " + signal_name(WTERMSIG(status));
  return "changed state";
}

// Signals pending for the thread or its process and not blocked by it (/proc status).
bool signal_pending(pid_t pid, pid_t tid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/status");
  std::uint64_t pnd = 0, shd = 0, blk = 0;
  for (std::string line; std::getline(f, line);) {
    auto field = [&](const char* name, std::uint64_t* v) {
      if (line.rfind(name, 0) == 0) *v = std::stoull(line.substr(std::strlen(name)), nullptr, 16);
    };
    field("SigPnd:", &pnd);
    field("ShdPnd:", &shd);
    field("SigBlk:", &blk);
  }
  return ((pnd | shd) & ~blk) != 0;
}

}  // namespace

RestartKind restart_kind(long long result) noexcept {
  switch (-result) {
    case kERestartSys: case kERestartNoIntr: case kERestartNoHand: case kERestartBlock:
      return RestartKind::kernel;
    case EINTR:
      return RestartKind::by_hand;
    default:
      return RestartKind::none;
  }
}

Hijack::Hijack(Hijack&& o) noexcept
    : pid_(o.pid_), tid_(o.tid_), attached_(o.attached_), gone_(o.gone_), saved_(o.saved_),
      xstate_(std::move(o.xstate_)), mask_(o.mask_), scratch_top_(o.scratch_top_), scratch_(o.scratch_),
      stopped_at_ns_(o.stopped_at_ns_), pause_ns_(o.pause_ns_), facts_(o.facts_) {
  o.attached_ = false;
}

Hijack::~Hijack() { (void)release(); }

// Waits for the next stop of the thread. Signal-delivery stops of real signals are passed on
// (the signal is delivered); `status` receives the stop that is ours to handle.
Status Hijack::wait_stop(std::chrono::milliseconds timeout, int* status, const char* what) {
  const std::int64_t deadline = now_ns() + static_cast<std::int64_t>(timeout.count()) * 1'000'000;
  long pause = 20'000;
  for (;;) {
    const pid_t r = waitpid(tid_, status, __WALL | WNOHANG);
    if (r < 0) {
      if (errno == EINTR) continue;
      gone_ = true;
      return sys_error(std::string("waiting for thread ") + std::to_string(tid_) + " " + what);
    }
    if (r == tid_) {
      if (WIFEXITED(*status) || WIFSIGNALED(*status)) {
        gone_ = true;
        attached_ = false;
        return Status::error("process " + std::to_string(pid_) + " exited while tramway " + what + " (thread " +
                             std::to_string(tid_) + " " + describe_status(*status) + ")", ESRCH);
      }
      return {};
    }
    if (now_ns() >= deadline) {
      return Status::error("thread " + std::to_string(tid_) + " of process " + std::to_string(pid_) + " did not stop within " +
                           std::to_string(timeout.count()) + " ms " + what, ETIMEDOUT);
    }
    const timespec t{0, pause};
    nanosleep(&t, nullptr);
    pause = std::min(pause * 2, 200'000L);  // a call lasts milliseconds: its end is seen within 0.2 ms
  }
}

Result<Hijack> Hijack::seize(pid_t pid, pid_t tid, std::chrono::milliseconds stop_timeout) {
  Hijack h(pid, tid);
  if (ptrace(PTRACE_SEIZE, tid, nullptr, nullptr) != 0) {
    return sys_error("PTRACE_SEIZE of thread " + std::to_string(tid) + " of process " + std::to_string(pid));
  }
  h.attached_ = true;
  if (ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) != 0) return sys_error("PTRACE_INTERRUPT");
  for (;;) {
    int st = 0;
    if (Status s = h.wait_stop(stop_timeout, &st, "to stop it"); !s.ok()) return s;
    const int sig = WSTOPSIG(st), event = st >> 16;
    if (event == PTRACE_EVENT_STOP) {
      if (sig != SIGTRAP) {  // a group stop: the process is stopped (SIGSTOP, SIGTSTP, ...)
        return Status::error("process " + std::to_string(pid) + " is stopped (by " + signal_name(sig) +
                             "); resume it with `kill -CONT " + std::to_string(pid) + "` and retry", EAGAIN);
      }
      break;
    }
    // A signal on its way to the thread: deliver it, then our interrupt stop follows.
    if (ptrace(PTRACE_CONT, tid, nullptr, reinterpret_cast<void*>(static_cast<long>(sig))) != 0) {
      return sys_error("resuming thread " + std::to_string(tid) + " with its signal");
    }
  }
  h.stopped_at_ns_ = now_ns();
  if (ptrace(PTRACE_GETREGS, tid, nullptr, &h.saved_) != 0) return sys_error("PTRACE_GETREGS");
  h.xstate_.resize(64 * 1024);
  iovec iov{h.xstate_.data(), h.xstate_.size()};
  if (ptrace(PTRACE_GETREGSET, tid, reinterpret_cast<void*>(NT_X86_XSTATE), &iov) != 0) return sys_error("reading the thread's extended state");
  h.xstate_.resize(iov.iov_len);
  if (ptrace(PTRACE_GETSIGMASK, tid, reinterpret_cast<void*>(sizeof h.mask_), &h.mask_) != 0) return sys_error("PTRACE_GETSIGMASK");
  h.facts_.pc = h.saved_.rip;
  if (static_cast<long long>(h.saved_.orig_rax) >= 0) {
    h.facts_.syscall = static_cast<long>(h.saved_.orig_rax);
    const RestartKind k = restart_kind(static_cast<long long>(h.saved_.rax));
    h.facts_.restarts = k == RestartKind::kernel;
    h.facts_.eintr_fixed = k == RestartKind::by_hand;
  }
  // Below the red zone: the strings, then the calls' frames.
  h.scratch_top_ = (h.saved_.rsp - kRedZone) & ~std::uintptr_t{15};
  h.scratch_ = h.scratch_top_;
  return h;
}

Status Hijack::write_memory(std::uintptr_t address, const void* data, std::size_t size) {
  iovec local{const_cast<void*>(data), size}, remote{reinterpret_cast<void*>(address), size};
  const ssize_t n = process_vm_writev(pid_, &local, 1, &remote, 1, 0);
  if (n != static_cast<ssize_t>(size)) return sys_error("writing to process " + std::to_string(pid_) + "'s stack");
  return {};
}

Result<std::uintptr_t> Hijack::put_string(const std::string& s) {
  const std::size_t n = (s.size() + 1 + 15) & ~std::size_t{15};
  if (scratch_top_ - scratch_ + n > kScratch) return Status::error("the injected call's strings do not fit its scratch area");
  scratch_ -= n;
  if (Status st = write_memory(scratch_, s.c_str(), s.size() + 1); !st.ok()) return st;
  return scratch_;
}

Result<std::string> Hijack::read_string(std::uintptr_t address, std::size_t max) {
  std::string out(max, '\0');
  iovec local{out.data(), max}, remote{reinterpret_cast<void*>(address), max};
  ssize_t n = process_vm_readv(pid_, &local, 1, &remote, 1, 0);
  if (n <= 0) {  // it may end near an unmapped page: one byte at a time
    n = 0;
    for (std::size_t i = 0; i < max; ++i) {
      iovec l{&out[i], 1}, r{reinterpret_cast<void*>(address + i), 1};
      if (process_vm_readv(pid_, &l, 1, &r, 1, 0) != 1) break;
      ++n;
      if (out[i] == '\0') break;
    }
  }
  out.resize(static_cast<std::size_t>(n));
  if (const auto z = out.find('\0'); z != std::string::npos) out.resize(z);
  return out;
}

Result<std::uint64_t> Hijack::call(std::uintptr_t function, std::initializer_list<std::uint64_t> args,
                                   std::chrono::milliseconds timeout) {
  if (!attached_) return Status::error("thread " + std::to_string(tid_) + " is no longer held");
  if (args.size() > 6) return Status::error("a remote call takes at most 6 arguments");
  user_regs_struct r = saved_;
  unsigned long long* const arg_regs[] = {&r.rdi, &r.rsi, &r.rdx, &r.rcx, &r.r8, &r.r9};
  std::size_t i = 0;
  for (std::uint64_t a : args) *arg_regs[i++] = a;
  r.rax = 0;  // no vector registers for varargs
  r.rip = function;
  r.orig_rax = static_cast<unsigned long long>(-1);  // no restart of the interrupted call on our way out
  // The frame: 16-byte aligned below the strings, then the return address 0, so that the
  // function starts with rsp % 16 == 8 as after a call.
  const std::uintptr_t frame = ((scratch_ - kScratch) & ~std::uintptr_t{15}) - 8;
  const std::uint64_t zero = 0;
  if (Status s = write_memory(frame, &zero, sizeof zero); !s.ok()) return s;
  r.rsp = frame;
  if (ptrace(PTRACE_SETREGS, tid_, nullptr, &r) != 0) return sys_error("PTRACE_SETREGS");
  if (ptrace(PTRACE_CONT, tid_, nullptr, nullptr) != 0) return sys_error("resuming thread " + std::to_string(tid_));
  for (;;) {
    int st = 0;
    if (Status s = wait_stop(timeout, &st, "ran the injected call"); !s.ok()) {
      if (s.sys_errno() == ETIMEDOUT) {
        return Status::error(s.message() + ": it is still inside the call (the loader waiting for a lock another "
                             "thread holds?)", ETIMEDOUT);
      }
      return s;
    }
    const int sig = WSTOPSIG(st), event = st >> 16;
    if (event == 0 && sig == SIGSEGV) {
      user_regs_struct done{};
      if (ptrace(PTRACE_GETREGS, tid_, nullptr, &done) != 0) return sys_error("PTRACE_GETREGS");
      if (done.rip == 0) return done.rax;
      siginfo_t si{};
      ptrace(PTRACE_GETSIGINFO, tid_, nullptr, &si);
      return Status::error("the injected call crashed in process " + std::to_string(pid_) + " (SIGSEGV at pc 0x" +
                           [&] { std::ostringstream o; o << std::hex << done.rip; return o.str(); }() + ")");
    }
    if (event != 0) {  // a group stop or another interrupt: let it go on
      if (ptrace(PTRACE_CONT, tid_, nullptr, nullptr) != 0) return sys_error("resuming thread " + std::to_string(tid_));
      continue;
    }
    // A signal for the thread meanwhile: delivered on top of the call, as on top of any code.
    if (ptrace(PTRACE_CONT, tid_, nullptr, reinterpret_cast<void*>(static_cast<long>(sig))) != 0) {
      return sys_error("resuming thread " + std::to_string(tid_) + " with its signal");
    }
  }
}

Status Hijack::release() {
  if (!attached_) return {};
  attached_ = false;
  user_regs_struct r = saved_;
  if (facts_.eintr_fixed && !signal_pending(pid_, tid_)) {
    // Back onto the syscall instruction (2 bytes), its number in rax: the call runs again.
    r.rax = r.orig_rax;
    r.rip -= 2;
    r.orig_rax = static_cast<unsigned long long>(-1);
  } else {
    facts_.eintr_fixed = false;
  }
  Status result;
  iovec iov{xstate_.data(), xstate_.size()};
  if (!xstate_.empty() && ptrace(PTRACE_SETREGSET, tid_, reinterpret_cast<void*>(NT_X86_XSTATE), &iov) != 0) {
    result = sys_error("restoring the thread's extended state");
  }
  if (ptrace(PTRACE_SETSIGMASK, tid_, reinterpret_cast<void*>(sizeof mask_), &mask_) != 0 && result.ok()) {
    result = sys_error("restoring the thread's signal mask");
  }
  if (ptrace(PTRACE_SETREGS, tid_, nullptr, &r) != 0 && result.ok()) result = sys_error("restoring the thread's registers");
  // Detaching with signal 0 from the SIGSEGV stop drops that signal; the kernel then takes the
  // path of a signal-free return, restarting the interrupted call per the restored registers.
  if (ptrace(PTRACE_DETACH, tid_, nullptr, nullptr) != 0 && result.ok()) result = sys_error("PTRACE_DETACH");
  pause_ns_ = now_ns() - stopped_at_ns_;
  return result;
}

}  // namespace tramway::inject
