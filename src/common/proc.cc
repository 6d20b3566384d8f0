#include "common/proc.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace tramway::common {

bool read_small(const char* path, char* buf, std::size_t cap) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const ssize_t n = ::read(fd, buf, cap - 1);
  ::close(fd);
  if (n < 0) return false;
  buf[n] = '\0';
  return true;
}

long long parse_decimal(const char* s) noexcept {
  while (*s == ' ' || *s == '\t') ++s;
  const bool negative = *s == '-';
  if (negative || *s == '+') ++s;
  long long v = 0;
  for (; *s >= '0' && *s <= '9'; ++s) v = v * 10 + (*s - '0');
  return negative ? -v : v;
}

std::uint64_t parse_hex(const char* s) noexcept {
  while (*s == ' ' || *s == '\t') ++s;
  if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) s += 2;
  std::uint64_t v = 0;
  for (;; ++s) {
    const char c = *s;
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    if (d < 0) return v;
    v = v << 4 | static_cast<std::uint64_t>(d);
  }
}

pid_t current_tid() noexcept { return static_cast<pid_t>(::syscall(SYS_gettid)); }

std::vector<pid_t> list_threads() {
  std::vector<pid_t> out;
  DIR* d = ::opendir("/proc/self/task");
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    out.push_back(static_cast<pid_t>(std::atoi(e->d_name)));
  }
  ::closedir(d);
  return out;
}

TaskProbe probe_task(pid_t tid, Probe what) {
  TaskProbe p;
  char path[64], buf[512];
  if (what == Probe::with_state) {
    std::snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
    if (!read_small(path, buf, sizeof buf)) {
      p.gone = true;
      return p;
    }
    std::uint64_t flags = 0;
    if (const char* close = std::strrchr(buf, ')'); close && close[1] == ' ') {
      p.state = close[2];
      // Fields after the state: ppid pgrp session tty_nr tpgid flags.
      const char* f = close + 3;
      for (int skip = 0; skip < 5 && f; ++skip) f = std::strchr(f + 1, ' ');
      if (f) flags = std::strtoull(f + 1, nullptr, 10);
    }
    // PF_EXITING: set as do_exit begins, before the thread's tid word is cleared (which is what
    // pthread_join waits for), and never cleared: the thread runs no more user code, so a joined
    // thread reads as gone even while the kernel has yet to reap it.
    constexpr std::uint64_t kPfExiting = 0x4;
    if (p.state == 'Z' || p.state == 'X' || (flags & kPfExiting) != 0) {
      p.gone = true;
      return p;
    }
  }
  std::snprintf(path, sizeof path, "/proc/self/task/%d/syscall", tid);
  if (!read_small(path, buf, sizeof buf)) {
    p.gone = true;
    return p;
  }
  if (std::strncmp(buf, "running", 7) == 0) {
    p.running = true;
    return p;
  }
  // "NR arg1 .. arg6 SP PC" when in a system call, "-1 SP PC" when blocked outside one.
  char* tokens[9];
  int n = 0;
  for (char* save = nullptr, *t = strtok_r(buf, " \n", &save); t && n < 9; t = strtok_r(nullptr, " \n", &save)) {
    tokens[n++] = t;
  }
  if (n < 3) {
    p.running = true;  // unknown format: treat as unobservable
    return p;
  }
  p.syscall = std::strtol(tokens[0], nullptr, 0);
  p.sp = std::strtoull(tokens[n - 2], nullptr, 0);
  p.pc = std::strtoull(tokens[n - 1], nullptr, 0);
  return p;
}

std::string thread_name(pid_t tid) {
  char path[64], buf[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/comm", tid);
  if (!read_small(path, buf, sizeof buf)) return "?";
  std::string s(buf);
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

SignalSets signal_sets(pid_t tid) {
  SignalSets out;
  char path[64], buf[4096];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/status", tid);
  if (!read_small(path, buf, sizeof buf)) return out;
  auto field = [&](const char* name, std::uint64_t* v) {
    const char* at = std::strstr(buf, name);
    if (!at) return false;
    *v = std::strtoull(at + std::strlen(name), nullptr, 16);
    return true;
  };
  out.known = field("\nSigPnd:", &out.pending) && field("\nShdPnd:", &out.shared_pending) &&
              field("\nSigBlk:", &out.blocked);
  return out;
}

}  // namespace tramway::common
