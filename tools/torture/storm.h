// A per-thread SIGPROF timer for the torture suites' signal storms.
#pragma once

#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>

#include "tramway/text/signal_router.h"

namespace tramway::torture {

// Installs tramway's signal router, then `on_sigprof` as the storm's SIGPROF handler (through
// the router's interposed sigaction, so it runs behind the wrapper). On failure prints why,
// prefixed with the suite's name, and returns false.
inline bool install_storm_handler(const char* suite, void (*on_sigprof)(int, siginfo_t*, void*)) {
  if (Status st = text::install_signal_router(); !st.ok()) {
    std::fprintf(stderr, "%s: %s\n", suite, st.message().c_str());
    return false;
  }
  struct sigaction sa {};
  sa.sa_sigaction = on_sigprof;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGPROF, &sa, nullptr);
  return true;
}

// Fires SIGPROF at this thread every `interval_us` on CLOCK_MONOTONIC (CPU-time timers only
// fire at scheduler ticks, far too coarse). Disarmed when destroyed.
class StormTimer {
 public:
  explicit StormTimer(int interval_us) {
    if (interval_us <= 0) return;
    sigevent ev{};
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = SIGPROF;
    ev._sigev_un._tid = static_cast<pid_t>(syscall(SYS_gettid));
    if (timer_create(CLOCK_MONOTONIC, &ev, &id_) != 0) return;
    itimerspec its{};
    its.it_interval.tv_nsec = its.it_value.tv_nsec = interval_us * 1000L;
    armed_ = timer_settime(id_, 0, &its, nullptr) == 0;
  }
  ~StormTimer() {
    if (armed_) timer_delete(id_);
  }
  StormTimer(const StormTimer&) = delete;
  StormTimer& operator=(const StormTimer&) = delete;

 private:
  timer_t id_{};
  bool armed_ = false;
};

}  // namespace tramway::torture
