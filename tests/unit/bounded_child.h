// Helpers for fork() tests that must never hang ctest: a child that does not exit in time is
// killed and reported, and threads are placed by what the kernel says they are doing.
#pragma once

#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>

namespace bounded {

// What wait_bounded says of a child that hung; also what a process exits with when one of its
// own children hung (so that it fits in an exit code).
constexpr int kHung = 99;

inline std::int64_t now_ms() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t(ts.tv_sec) * 1000 + ts.tv_nsec / 1'000'000;
}

inline void nap() {
  const timespec t{0, 2'000'000};
  nanosleep(&t, nullptr);
}

// Waits for `pid` at most `timeout_ms`: its exit code, 128 + the signal that killed it, or kHung
// (it did not exit in time and was killed with SIGKILL).
inline int wait_bounded(pid_t pid, std::int64_t timeout_ms) {
  const std::int64_t deadline = now_ms() + timeout_ms;
  for (;;) {
    int status = 0;
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (r < 0) return 200;
    if (now_ms() >= deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return kHung;
    }
    nap();
  }
}

// Runs `fn` in a fork()ed child and returns what wait_bounded says of it.
inline int run_in_child(const std::function<int()>& fn, std::int64_t timeout_ms) {
  const pid_t pid = fork();
  if (pid < 0) return 201;
  if (pid == 0) _exit(fn());
  return wait_bounded(pid, timeout_ms);
}

// Runs `body` in a fork()ed child that may die of a signal (core dumps off; a 20 s alarm ends
// it if it hangs) and returns its raw wait status.
inline int in_child(const std::function<void()>& body) {
  const pid_t pid = fork();
  if (pid == 0) {
    rlimit no_core{0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    alarm(20);
    body();
    _exit(0);
  }
  int status = -1;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return status;
}

inline std::string describe(int code) {
  if (code == kHung) return "a child hung (killed after the timeout): a deadlock";
  if (code >= 128 && code < 200) return std::string("the child died of signal ") + strsignal(code - 128);
  return "the child exited with code " + std::to_string(code);
}

inline pid_t gettid_() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

// True once thread `tid` of this process sleeps in system call `nr` (as /proc/TID/syscall
// says: only a thread off its CPU inside a call shows its number), within `timeout_ms`.
inline bool wait_blocked_in(pid_t tid, long nr, std::int64_t timeout_ms = 3000) {
  const std::int64_t deadline = now_ms() + timeout_ms;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/syscall", tid);
  while (now_ms() < deadline) {
    if (FILE* f = std::fopen(path, "r")) {
      long seen = -2;
      const int got = std::fscanf(f, "%ld", &seen);
      std::fclose(f);
      if (got == 1 && seen == nr) return true;
    }
    nap();
  }
  return false;
}

// True once thread `tid` of this process sleeps in futex(2) (blocked on a mutex).
inline bool wait_blocked_in_futex(pid_t tid, std::int64_t timeout_ms = 3000) {
  return wait_blocked_in(tid, SYS_futex, timeout_ms);
}

}  // namespace bounded
