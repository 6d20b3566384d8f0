// Injection into a running process (issue 13), timed from outside as a user sees it: the
// `tramway` command against tests/inject/inject_target.cc started plainly — alone
// (bench_inject_plain_target) for one function, and with 10,000 more functions in a shared
// library (bench_inject_target) for those — side by side with `bpftrace -p` attaching one
// uprobe to the same function of the same process in the same run. Not a Google Benchmark program (each
// sample is a process's life); it prints bench/report.h's JSON lines, medians of the
// repetitions (--benchmark_repetitions=N, default 5), on stdout:
//   inject/first_callback/1      `tramway live PID attach 'work::step*'` on the plain process
//                                without an agent, until it returns (the callbacks run from then
//                                on: two threads call work::step all the time), ms
//   inject/first_callback/10000  the same for 'bench_rfn_*' (10,000 relocated prologues) on the
//                                other, ms
//   inject/pause                 the longest pause of the hijacked thread (the command says it), ms
//   eject                        `tramway live PID eject` (10,000 functions attached), ms
//   bpftrace/attach_pid          `bpftrace -p PID` (the plain process) until its probe on
//                                work::step first fires, ms
//   inject/first_callback/1_ratio_to_bpftrace
// Flags: --figures=REGEX; --benchmark_repetitions=N.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <regex>
#include <string>
#include <vector>

namespace {

double now_ms() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) / 1e6;
}

struct Proc {
  pid_t pid = -1;
  int in = -1, out = -1, err = -1;
};

Proc spawn(const std::vector<std::string>& argv) {
  int in[2], out[2], err[2];
  if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) return {};
  Proc p;
  p.pid = fork();
  if (p.pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    dup2(err[1], 2);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  close(err[1]);
  p.in = in[1];
  p.out = out[0];
  p.err = err[0];
  return p;
}

// Reads from fd until `pattern` appears or `timeout_ms` passes; true if it did.
bool wait_for(int fd, const std::string& pattern, double timeout_ms, std::string* seen = nullptr) {
  std::string buf;
  const double end = now_ms() + timeout_ms;
  while (buf.find(pattern) == std::string::npos) {
    const double left = end - now_ms();
    if (left <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left) + 1) <= 0) continue;
    char c[4096];
    const ssize_t n = read(fd, c, sizeof c);
    if (n <= 0) return false;
    buf.append(c, static_cast<std::size_t>(n));
  }
  if (seen) *seen = buf;
  return true;
}

std::string drain(int fd) {
  std::string s;
  char c[4096];
  ssize_t n;
  while ((n = read(fd, c, sizeof c)) > 0) s.append(c, static_cast<std::size_t>(n));
  return s;
}

// Runs a command to completion: its wall time in ms, its stderr in `err`; < 0 on failure.
double timed(const std::vector<std::string>& argv, std::string* err = nullptr) {
  const double t0 = now_ms();
  Proc p = spawn(argv);
  close(p.in);
  drain(p.out);
  const std::string e = drain(p.err);
  int st = 0;
  waitpid(p.pid, &st, 0);
  const double t = now_ms() - t0;
  close(p.out);
  close(p.err);
  if (err) *err = e;
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    std::fprintf(stderr, "bench_inject: %s failed: %s\n", argv[0].c_str(), e.c_str());
    return -1;
  }
  return t;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::regex figures(".");
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--figures=", 10) == 0) figures = std::regex(argv[i] + 10);
    if (std::strncmp(argv[i], "--benchmark_repetitions=", 24) == 0) reps = std::max(1, std::atoi(argv[i] + 24));
  }
  const std::string cli = BENCH_TRAMWAY_CLI, target = BENCH_INJECT_TARGET, plain = BENCH_INJECT_PLAIN_TARGET;
  const bool bpftrace = access("/usr/bin/bpftrace", X_OK) == 0 && geteuid() == 0;
  std::vector<double> first1, first10k, pause, eject, bpf;
  const std::regex paused("paused ([0-9.]+) ms");
  auto start_target = [](const std::string& path) {
    Proc t = spawn({path});
    if (!wait_for(t.out, "ready", 10000)) std::fprintf(stderr, "bench_inject: %s did not start\n", path.c_str());
    return t;
  };
  auto end_target = [](Proc& t) {
    (void)!write(t.in, "end\n", 4);
    close(t.in);
    drain(t.out);
    waitpid(t.pid, nullptr, 0);
    close(t.out);
    close(t.err);
  };
  for (int r = 0; r < reps; ++r) {
    std::string err;
    std::smatch m;
    {  // one function, then bpftrace on the same process once the agent is out
      Proc t = start_target(plain);
      const std::string pid = std::to_string(t.pid);
      const double ms = timed({cli, "live", pid, "attach", "work::step*", "-o", "/tmp/bench_inject.trace"}, &err);
      if (ms >= 0) first1.push_back(ms);
      if (std::regex_search(err, m, paused)) pause.push_back(std::stod(m[1]));
      timed({cli, "live", pid, "eject"});
      if (bpftrace) {
        const double t0 = now_ms();
        Proc b = spawn({"bpftrace", "-p", pid, "-e", "uprobe:" + plain + ":_ZN4work4stepEm { printf(\"hit\\n\"); exit(); }"});
        if (wait_for(b.out, "hit", 60000)) bpf.push_back(now_ms() - t0);
        kill(b.pid, SIGINT);
        waitpid(b.pid, nullptr, 0);
        close(b.in);
        close(b.out);
        close(b.err);
      }
      end_target(t);
    }
    {  // 10,000 functions
      Proc t = start_target(target);
      const std::string pid = std::to_string(t.pid);
      double ms = timed({cli, "live", pid, "attach", "bench_rfn_*", "-o", "/tmp/bench_inject.trace"}, &err);
      if (ms >= 0) first10k.push_back(ms);
      if (std::regex_search(err, m, paused)) pause.push_back(std::stod(m[1]));
      ms = timed({cli, "live", pid, "eject"});
      if (ms >= 0) eject.push_back(ms);
      end_target(t);
    }
  }
  unlink("/tmp/bench_inject.trace");
  auto print = [&](const std::string& name, double value, const char* unit) {
    if (std::regex_search(name, figures)) std::printf("{\"name\": \"%s\", \"value\": %.3g, \"unit\": \"%s\"}\n", name.c_str(), value, unit);
  };
  print("inject/first_callback/1", median(first1), "ms");
  print("inject/first_callback/10000", median(first10k), "ms");
  print("inject/pause", pause.empty() ? 0 : *std::max_element(pause.begin(), pause.end()), "ms");
  print("eject", median(eject), "ms");
  if (!bpf.empty()) {
    print("bpftrace/attach_pid", median(bpf), "ms");
    print("inject/first_callback/1_ratio_to_bpftrace", median(first1) / median(bpf), "ratio");
  } else {
    std::fprintf(stderr, "bench_inject: no bpftrace figure (bpftrace missing, or not root)\n");
  }
  return first1.empty() ? 1 : 0;
}
