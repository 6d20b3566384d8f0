// The glibc functions that set a signal mask without calling sigprocmask (issue 11, defect 4),
// and those that ask for the fix-up signal by name (defect 5).
//
// glibc 2.36's sigblock, sigsetmask, sighold, sigsuspend, pthread_attr_setsigmask_np,
// setcontext and swapcontext make the rt_sigprocmask system call themselves (or through a
// hidden alias), so the sigprocmask interposer never sees them: they are interposed here and
// SIGTRAP and the fix-up signal stripped from their masks the same way. What still goes
// around (raw system calls, makecontext's trampoline) is caught before each batch
// (batch_precheck.cc).
//
// A program that names the fix-up signal in signalfd, sigwait, sigwaitinfo or sigtimedwait
// (or installs a handler for it) would silently never get it: the call fails with EINVAL
// instead, and a message on stderr names TRAMWAY_FIXUP_SIGNAL. A mask that holds every
// real-time signal (sigfillset) is not a use of that one signal.
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "text/internal.h"
#include "text/thread_slots.h"
#include "tramway/text/signal_router.h"

namespace tramway::text::detail {
namespace {

std::atomic<bool> g_fixup_use_seen{false};
std::atomic_flag g_fixup_use_reported = ATOMIC_FLAG_INIT;

// Appends the decimal `v` (async-signal-safe: report_fixup_signal_use may run in a handler).
char* put_int(char* at, int v) {
  char digits[12];
  int n = 0;
  do digits[n++] = static_cast<char>('0' + v % 10); while ((v /= 10) > 0);
  while (n > 0) *at++ = digits[--n];
  return at;
}
char* put(char* at, const char* s) {
  while (*s) *at++ = *s++;
  return at;
}

template <typename F>
F next(const char* name) {
  return reinterpret_cast<F>(::dlsym(RTLD_NEXT, name));
}

using AttrSetmask = int (*)(pthread_attr_t*, const sigset_t*);
using SetContext = int (*)(const ucontext_t*);
using SwapContext = int (*)(ucontext_t*, const ucontext_t*);
using SigSuspend = int (*)(const sigset_t*);
using SigWait = int (*)(const sigset_t*, int*);
using SigWaitInfo = int (*)(const sigset_t*, siginfo_t*);
using SigTimedWait = int (*)(const sigset_t*, siginfo_t*, const timespec*);
using SignalFd = int (*)(int, const sigset_t*, int);

// Resolved at load: setcontext may be called in a signal handler, where dlsym may not.
struct Next {
  AttrSetmask attr_setsigmask = next<AttrSetmask>("pthread_attr_setsigmask_np");
  SetContext setcontext = next<SetContext>("setcontext");
  SwapContext swapcontext = next<SwapContext>("swapcontext");
  SigSuspend sigsuspend = next<SigSuspend>("sigsuspend");
  SigWait sigwait = next<SigWait>("sigwait");
  SigWaitInfo sigwaitinfo = next<SigWaitInfo>("sigwaitinfo");
  SigTimedWait sigtimedwait = next<SigTimedWait>("sigtimedwait");
  SignalFd signalfd = next<SignalFd>("signalfd");
};
Next& real() {
  static Next n;
  return n;
}
__attribute__((constructor(102))) void resolve_at_load() { (void)real(); }

}  // namespace

bool fixup_use_seen() noexcept { return g_fixup_use_seen.load(std::memory_order_relaxed); }
void note_fixup_use() noexcept { g_fixup_use_seen.store(true, std::memory_order_relaxed); }

// True when `set` names the fix-up signal but not every real-time signal.
// Called from sigprocmask, which may run in a signal handler: it must not install the router.
bool names_fixup_signal(const sigset_t* set) noexcept {
  const int fix = installed_fixup_signal();
  if (!set || fix == 0 || !sigismember(set, fix)) return false;
  for (int s = SIGRTMIN; s <= SIGRTMAX; ++s)
    if (!sigismember(set, s)) return true;
  return false;
}

void report_fixup_signal_use(const char* how) noexcept {
  g_fixup_use_seen.store(true, std::memory_order_relaxed);
  if (g_fixup_use_reported.test_and_set()) return;
  const int fix = fixup_signal();
  char msg[512];
  char* at = put(msg, "tramway: the program asked for signal ");
  at = put_int(at, fix);
  at = put(at, " through ");
  at = put(at, how);
  at = put(at, ", but it is tramway's fix-up signal, which the program cannot have (the call failed with "
               "EINVAL); set TRAMWAY_FIXUP_SIGNAL to a real-time signal the program does not use (");
  at = put_int(at, SIGRTMIN + 1);
  at = put(at, "..");
  at = put_int(at, SIGRTMAX);
  at = put(at, ") and restart it\n");
  (void)!::write(2, msg, static_cast<std::size_t>(at - msg));
}

}  // namespace tramway::text::detail

using tramway::text::detail::names_fixup_signal;
using tramway::text::detail::raw_sigprocmask;
using tramway::text::detail::real;
using tramway::text::detail::report_fixup_signal_use;
using tramway::text::detail::strip_router_signals;

namespace {
sigset_t stripped(const sigset_t* set) noexcept {
  sigset_t copy = *set;
  strip_router_signals(&copy);
  return copy;
}

// sigblock/sigsetmask: the old BSD int masks (signals 1..31).
int bsd_mask(int how, int mask) noexcept {
  sigset_t set, old;
  sigemptyset(&set);
  for (int s = 1; s < 32; ++s)
    if (mask & (1u << (s - 1))) sigaddset(&set, s);
  strip_router_signals(&set);
  if (raw_sigprocmask(how, &set, &old) != 0) return -1;
  int out = 0;
  for (int s = 1; s < 32; ++s)
    if (sigismember(&old, s)) out |= static_cast<int>(1u << (s - 1));
  return out;
}

bool refuse_fixup(const sigset_t* set, const char* how) noexcept {
  if (!names_fixup_signal(set)) return false;
  report_fixup_signal_use(how);
  return true;
}
}  // namespace

extern "C" {

__attribute__((visibility("default"))) int sigblock(int mask) noexcept { return bsd_mask(SIG_BLOCK, mask); }
__attribute__((visibility("default"))) int sigsetmask(int mask) noexcept { return bsd_mask(SIG_SETMASK, mask); }

__attribute__((visibility("default"))) int sighold(int sig) noexcept {
  sigset_t one;
  sigemptyset(&one);
  if (sigaddset(&one, sig) != 0) return -1;
  strip_router_signals(&one);
  return raw_sigprocmask(SIG_BLOCK, &one, nullptr) == 0 ? 0 : -1;
}

__attribute__((visibility("default"))) int sigsuspend(const sigset_t* set) {
  if (!real().sigsuspend) {
    errno = ENOSYS;
    return -1;
  }
  const sigset_t copy = stripped(set);
  return real().sigsuspend(&copy);
}

__attribute__((visibility("default"))) int pthread_attr_setsigmask_np(pthread_attr_t* attr, const sigset_t* set) {
  if (!real().attr_setsigmask) return ENOSYS;
  if (!set) return real().attr_setsigmask(attr, nullptr);
  const sigset_t copy = stripped(set);
  return real().attr_setsigmask(attr, &copy);
}

// The context is copied (setcontext reads it all before switching stacks): its fpregs pointer
// still points at the caller's saved state, which stays where it is.
__attribute__((visibility("default"))) int setcontext(const ucontext_t* uc) noexcept {
  if (!real().setcontext) {
    errno = ENOSYS;
    return -1;
  }
  ucontext_t copy = *uc;
  strip_router_signals(&copy.uc_sigmask);
  return real().setcontext(&copy);
}

__attribute__((visibility("default"))) int swapcontext(ucontext_t* save, const ucontext_t* uc) noexcept {
  if (!real().swapcontext) {
    errno = ENOSYS;
    return -1;
  }
  ucontext_t copy = *uc;
  strip_router_signals(&copy.uc_sigmask);
  return real().swapcontext(save, &copy);
}

__attribute__((visibility("default"))) int signalfd(int fd, const sigset_t* set, int flags) noexcept {
  if (refuse_fixup(set, "signalfd") || !real().signalfd) {
    errno = EINVAL;
    return -1;
  }
  return real().signalfd(fd, set, flags);
}

__attribute__((visibility("default"))) int sigwait(const sigset_t* set, int* sig) {
  if (refuse_fixup(set, "sigwait") || !real().sigwait) return EINVAL;
  return real().sigwait(set, sig);
}

__attribute__((visibility("default"))) int sigwaitinfo(const sigset_t* set, siginfo_t* info) {
  if (refuse_fixup(set, "sigwaitinfo") || !real().sigwaitinfo) {
    errno = EINVAL;
    return -1;
  }
  return real().sigwaitinfo(set, info);
}

__attribute__((visibility("default"))) int sigtimedwait(const sigset_t* set, siginfo_t* info,
                                                         const timespec* timeout) {
  if (refuse_fixup(set, "sigtimedwait") || !real().sigtimedwait) {
    errno = EINVAL;
    return -1;
  }
  return real().sigtimedwait(set, info, timeout);
}

}  // extern "C"
