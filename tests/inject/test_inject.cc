// The injector end to end (issue 13): the `tramway` command loads the agent into programs
// started without it, traces them, ejects, and refuses what it must. The target is
// inject_target.cc (8 threads, blocked calls, handlers before and after injection).
//
// TRAMWAY_INJECT_CYCLES (environment, default 20) sets the inject/attach/detach/eject cycles of
// Inject.CyclesLeaveTheProgramAsItWas; the issue's 1,000 by hand:
//   TRAMWAY_INJECT_CYCLES=1000 build/gcc/tests/inject/test_inject --gtest_filter='*Cycles*'
// (20 cycles or more also check that malloc's bytes in use stop changing after cycle 10.)
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/tramway_mapping.h"
#include "inject/remote_call.h"
#include "inject/target.h"

using namespace std::chrono_literals;
namespace inject = tramway::inject;

namespace {

const std::string kCli = TRAMWAY_CLI_EXE;
const std::string kTarget = TRAMWAY_INJECT_TARGET;
const std::string kStatic = TRAMWAY_INJECT_STATIC;

bool contains(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// A child with a pipe on stdin and one on stdout, stderr to a file; optionally with other ids.
struct Child {
  pid_t pid = -1;
  int in = -1, out = -1;
  std::string err_path;
  std::string buffered;

  void send(const std::string& line) {
    const std::string l = line + "\n";
    ASSERT_EQ(write(in, l.data(), l.size()), static_cast<ssize_t>(l.size()));
  }
  // The next line on stdout, or "" after `timeout`.
  std::string line(std::chrono::milliseconds timeout = 20s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (const auto nl = buffered.find('\n'); nl != std::string::npos) {
        std::string l = buffered.substr(0, nl);
        buffered.erase(0, nl + 1);
        return l;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return "";
      pollfd p{out, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char buf[4096];
      const ssize_t n = read(out, buf, sizeof buf);
      if (n <= 0) return "";
      buffered.append(buf, static_cast<std::size_t>(n));
    }
  }
  // Everything up to end of file (bounded).
  std::string rest(std::chrono::milliseconds timeout = 30s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd p{out, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char buf[4096];
      const ssize_t n = read(out, buf, sizeof buf);
      if (n <= 0) break;
      buffered.append(buf, static_cast<std::size_t>(n));
    }
    std::string all;
    all.swap(buffered);
    return all;
  }
  int wait() {
    int st = 0;
    if (pid > 0) waitpid(pid, &st, 0);
    pid = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  ~Child() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    if (in >= 0) close(in);
    if (out >= 0) close(out);
  }
};

struct Ids {
  uid_t ruid, euid;
};

void start(Child& c, const std::vector<std::string>& argv, const std::string& err_path, const Ids* ids = nullptr) {
  int in[2], out[2];
  ASSERT_EQ(pipe2(in, O_CLOEXEC), 0);
  ASSERT_EQ(pipe2(out, O_CLOEXEC), 0);
  c.err_path = err_path;
  c.pid = fork();
  if (c.pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    const int e = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0666);
    dup2(e, 2);
    if (ids && (setresgid(65534, 65534, 65534) != 0 || setresuid(ids->ruid, ids->euid, ids->euid) != 0)) _exit(122);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(121);
  }
  close(in[0]);
  close(out[1]);
  c.in = in[1];
  c.out = out[0];
}

struct CliRun {
  int code = -1;
  std::string out, err;
};

// Runs the command to completion (bounded), as `ids` if given.
CliRun run(const std::vector<std::string>& argv, const std::string& dir, const Ids* ids = nullptr) {
  static int n = 0;
  Child c;
  start(c, argv, dir + "/cli-err" + std::to_string(n++), ids);
  close(c.in);
  c.in = -1;
  CliRun r;
  r.out = c.rest();
  r.code = c.wait();
  r.err = read_file(c.err_path);
  return r;
}

// What the process holds that tramway could leave behind.
struct Footprint {
  std::string maps, fds, tasks;
};
Footprint footprint(pid_t pid) {
  Footprint f;
  f.maps = read_file("/proc/" + std::to_string(pid) + "/maps");
  for (const std::string sub : {"fd", "task"}) {
    std::string list;
    const std::string dir = "/proc/" + std::to_string(pid) + "/" + sub;
    const CliRun r = {};
    (void)r;
    std::vector<std::string> names;
    if (DIR* d = opendir(dir.c_str())) {
      while (dirent* e = readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::string entry = e->d_name;
        if (std::string(sub) == "fd") {
          char target[512] = {};
          (void)!readlink((dir + "/" + entry).c_str(), target, sizeof target - 1);
          entry += " -> " + std::string(target);
        }
        names.push_back(entry);
      }
      closedir(d);
    }
    std::sort(names.begin(), names.end());
    for (const std::string& s : names) list += s + "\n";
    (std::string(sub) == "fd" ? f.fds : f.tasks) = list;
  }
  return f;
}

// The path of a /proc/PID/maps line ("" for an anonymous mapping).
std::string map_path(const std::string& line) {
  std::istringstream f(line);
  std::string range, perms, offset, dev, inode, path;
  f >> range >> perms >> offset >> dev >> inode;
  std::getline(f >> std::ws, path);
  return path;
}

// Whether `maps` holds a mapping of tramway's: its libraries or its code arenas.
bool maps_tramway(const std::string& maps) {
  std::istringstream in(maps);
  for (std::string l; std::getline(in, l);) {
    if (tramway::common::is_tramway_mapping(map_path(l))) return true;
  }
  return false;
}

long rss_kib(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  for (std::string l; std::getline(f, l);) {
    if (l.rfind("VmRSS:", 0) == 0) return std::atol(l.c_str() + 6);
  }
  return -1;
}

// The number after "events " in a `live status` reply.
long events_of(const std::string& status) {
  std::smatch m;
  static const std::regex re("events ([0-9]+)");
  return std::regex_search(status, m, re) ? std::stol(m[1]) : -1;
}

class Inject : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tramway-test-inject-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    chmod(dir_.c_str(), 0777);
  }
  void TearDown() override {
    const std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }
  void start_target(Child& c, const std::vector<std::string>& args = {}, const Ids* ids = nullptr) {
    std::vector<std::string> argv = {kTarget};
    argv.insert(argv.end(), args.begin(), args.end());
    start(c, argv, dir_ + "/target-err", ids);
    ASSERT_EQ(c.line(), "ready") << read_file(c.err_path);
  }
  std::string untraced_output() {
    Child c;
    start_target(c);
    // Once the handler has run (the timer fires every 10 ms): the output says whether it did.
    std::string counts;
    for (int i = 0; i < 2000 && !std::regex_search(counts, std::regex("alarms [1-9]")); ++i) {
      c.send("counts");
      counts = c.line();
    }
    c.send("end");
    std::string out = c.rest();
    EXPECT_EQ(c.wait(), 0);
    return out;
  }
  CliRun cli(const std::vector<std::string>& args, const Ids* ids = nullptr) {
    std::vector<std::string> argv = {kCli};
    argv.insert(argv.end(), args.begin(), args.end());
    return run(argv, dir_, ids);
  }
  // `live PID attach` on a process that must be refused (as `caller` if given): exit status 1,
  // and the message names `why`. Returns the message.
  std::string expect_refused(pid_t pid, const std::string& why, const Ids* caller = nullptr) {
    const CliRun r = cli({"live", std::to_string(pid), "attach", "work::step*"}, caller);
    EXPECT_EQ(r.code, 1);
    EXPECT_TRUE(contains(r.err, why)) << r.err;
    return r.err;
  }
  // Waits until the recording of `pid` has events (the first callbacks ran).
  void wait_for_events(pid_t pid) {
    for (int i = 0; i < 2000; ++i) {
      const CliRun s = cli({"live", std::to_string(pid), "status"});
      ASSERT_EQ(s.code, 0) << s.err;
      if (events_of(s.out) > 0) return;
      std::this_thread::sleep_for(5ms);
    }
    FAIL() << "no events recorded in 10 s";
  }
  std::string dir_;
};

TEST_F(Inject, CyclesLeaveTheProgramAsItWas) {
  const char* env = std::getenv("TRAMWAY_INJECT_CYCLES");
  const int cycles = env ? std::atoi(env) : 20;
  const std::string expected = untraced_output();
  ASSERT_TRUE(contains(expected, "read 1 byte x")) << expected;

  Child t;
  // Without per-thread caches malloc's count is exact: a cache holds freed chunks as in use,
  // and which thread's cache gets the injector's frees depends on which thread it took.
  setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0", 1);
  start_target(t);
  unsetenv("GLIBC_TUNABLES");
  const std::string pid = std::to_string(t.pid);
  Footprint base;
  long base_rss = 0, last_rss = 0;
  // malloc's bytes in use: the first cycles add what the C library and the loader keep, and a
  // marker on the robust list of each thread that ran tramway code (adopted by later
  // injections); from then on an eject leaves exactly what the injection found.
  constexpr int kHeapSettled = 10;
  long heap_settled = -1, heap_last = -1;
  auto heap_in_use = [&t] {
    t.send("mem");
    const std::string l = t.line();
    return l.starts_with("heap in use ") ? std::stol(l.substr(12)) : -1;
  };
  for (int cycle = 0; cycle <= cycles; ++cycle) {
    const CliRun a = cli({"live", pid, "attach", "work::step*", "-o", dir_ + "/t.trace"});
    ASSERT_EQ(a.code, 0) << "cycle " << cycle << ": " << a.err;
    ASSERT_TRUE(contains(a.err, "loaded the agent into process " + pid)) << a.err;
    ASSERT_TRUE(contains(a.out, "attached 'work::step*': 1 functions")) << a.out;
    wait_for_events(t.pid);
    if (cycle == 1) {  // a handler the program installs after an injection, through libc
      t.send("usr1");
      EXPECT_EQ(t.line(), "usr1 installed");
      // It reached the router through the redirected GOT slot: it runs behind the wrapper.
      const CliRun s = cli({"live", pid, "status"});
      EXPECT_TRUE(contains(s.out, "handlers 10 14\n")) << s.out;
    }
    if (cycle == 0) {  // adopted when libtramway loaded
      const CliRun s = cli({"live", pid, "status"});
      EXPECT_TRUE(contains(s.out, "handlers 14\n")) << s.out;
    }
    if (cycle >= 1) {  // one at a time: a standard signal sent again before delivery merges
      EXPECT_EQ(kill(t.pid, SIGUSR1), 0);
      const std::string want = "usr1 " + std::to_string(cycle);
      std::string c;
      for (int i = 0; i < 2000 && !contains(c, want); ++i) {
        t.send("counts");
        c = t.line();
      }
      EXPECT_TRUE(contains(c, want)) << c;
    }
    const CliRun d = cli({"live", pid, "detach", "work::step*"});
    ASSERT_EQ(d.code, 0) << d.err;
    const CliRun e = cli({"live", pid, "eject"});
    ASSERT_EQ(e.code, 0) << "cycle " << cycle << ": " << e.err << e.out;
    ASSERT_TRUE(contains(e.err, "unloaded the agent from process " + pid)) << e.err;
    t.send("ping");
    ASSERT_EQ(t.line(), "pong");
    const Footprint now = footprint(t.pid);
    ASSERT_FALSE(maps_tramway(now.maps)) << now.maps;
    if (cycle == 0) {
      // The first cycle may leave what the C library keeps (a malloc arena for tramway's threads,
      // heap it does not give back): the baseline is after it.
      base = now;
      base_rss = rss_kib(t.pid);
      continue;
    }
    ASSERT_EQ(now.fds, base.fds) << "cycle " << cycle;
    ASSERT_EQ(now.tasks, base.tasks) << "cycle " << cycle;
    last_rss = rss_kib(t.pid);
    heap_last = heap_in_use();
    if (cycle == kHeapSettled) heap_settled = heap_last;
  }
  // Mappings: identical, but for the heap and the arena growing within what they reserved.
  auto shape = [](const std::string& maps) {
    std::string out;
    std::istringstream in(maps);
    for (std::string l; std::getline(in, l);) {
      if (contains(l, "[heap]")) continue;
      if (map_path(l).empty()) continue;  // anonymous: an arena's split between rw and reserved moves
      out += l + "\n";
    }
    return out;
  };
  EXPECT_EQ(shape(footprint(t.pid).maps), shape(base.maps));
  if (cycles > 0) {
    EXPECT_LT(last_rss - base_rss, 4096) << "RSS grew from " << base_rss << " to " << last_rss << " KiB";
    std::fprintf(stderr, "%d cycles: RSS %ld -> %ld KiB; malloc in use %ld at cycle %d, %ld at the end\n", cycles,
                 base_rss, last_rss, heap_settled, kHeapSettled, heap_last);
  }
  if (cycles >= 2 * kHeapSettled) {
    EXPECT_EQ(heap_last, heap_settled) << "an eject left malloc'd memory behind";
  }

  t.send("counts");
  const std::string counts = t.line();
  std::smatch m;
  ASSERT_TRUE(std::regex_match(counts, m, std::regex("alarms ([0-9]+) usr1 ([0-9]+) sleep_eintr ([0-9]+)"))) << counts;
  EXPECT_EQ(m[3].str(), "0") << "nanosleep returned EINTR: tramway's fix-up signal was not taken back";
  EXPECT_GT(std::stol(m[1]), 0);
  if (cycles >= 1) {
    EXPECT_EQ(std::stol(m[2]), cycles);
  }
  t.send("end");
  EXPECT_EQ(t.rest(), expected);
  EXPECT_EQ(t.wait(), 0);
}

TEST_F(Inject, RecordPidTracesARunningProgramAndEjects) {
  Child t;
  start_target(t);
  const std::string pid = std::to_string(t.pid), trace = dir_ + "/r.trace";
  const Footprint before = footprint(t.pid);
  const CliRun r = cli({"record", "-p", pid, "-f", "work::*", "--duration", "0.3", "-o", trace});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "recording 2 functions of process " + pid)) << r.err;
  EXPECT_TRUE(contains(r.err, "unloaded the agent")) << r.err;
  const CliRun rep = cli({"report", trace});
  ASSERT_EQ(rep.code, 0) << rep.err;
  EXPECT_TRUE(contains(rep.out, "work::step(unsigned long)")) << rep.out;
  EXPECT_TRUE(contains(rep.out, "work::checksum(unsigned long)")) << rep.out;
  EXPECT_FALSE(maps_tramway(footprint(t.pid).maps));
  EXPECT_EQ(footprint(t.pid).tasks, before.tasks);
  t.send("end");
  EXPECT_TRUE(contains(t.rest(), "sleep slept\n"));
}

// -x, -D and -t reach the injected agent as `option` requests for that recording.
TEST_F(Inject, RecordPidTakesTheRecordingsSettings) {
  Child t;
  start_target(t);
  const std::string pid = std::to_string(t.pid), excluded = dir_ + "/x.trace", shallow = dir_ + "/d.trace";
  const CliRun x = cli({"record", "-p", pid, "-f", "work::*", "-x", "work::step*", "--duration", "0.3", "-o", excluded});
  ASSERT_EQ(x.code, 0) << x.err;
  EXPECT_TRUE(contains(x.err, "recording 1 functions of process " + pid)) << x.err;
  CliRun rep = cli({"report", excluded});
  ASSERT_EQ(rep.code, 0) << rep.err;
  EXPECT_TRUE(contains(rep.out, "work::checksum(unsigned long)")) << rep.out;
  EXPECT_FALSE(contains(rep.out, "work::step(unsigned long)")) << rep.out;

  // checksum calls step 1,000 times a call: at depth 1 a step is written only when the
  // recording began inside a checksum (the traced depth starts at the attach).
  const CliRun d = cli({"record", "-p", pid, "-f", "work::*", "-D", "1", "--duration", "0.3", "-o", shallow});
  ASSERT_EQ(d.code, 0) << d.err;
  EXPECT_TRUE(contains(d.err, "recording 2 functions of process " + pid)) << d.err;
  rep = cli({"report", shallow});
  ASSERT_EQ(rep.code, 0) << rep.err;
  auto calls_of = [&](const std::string& fn) {
    std::istringstream in(rep.out);
    for (std::string l; std::getline(in, l);) {
      if (contains(l, fn)) return std::atol(l.c_str());
    }
    return 0L;
  };
  const long checksums = calls_of("work::checksum(unsigned long)"), steps = calls_of("work::step(unsigned long)");
  EXPECT_GT(checksums, 0) << rep.out;
  EXPECT_LE(steps, 2 * 1000) << "steps below the depth limit were written:\n" << rep.out;

  // -t 5us: a checksum lasts about 15 us, a step 20 ns; a step is written only when something
  // (a preemption) made it last 5 us.
  const CliRun m = cli({"record", "-p", pid, "-f", "work::*", "-t", "5us", "--duration", "0.3", "-o", dir_ + "/t.trace"});
  ASSERT_EQ(m.code, 0) << m.err;
  rep = cli({"report", dir_ + "/t.trace"});
  ASSERT_EQ(rep.code, 0) << rep.err;
  EXPECT_GT(calls_of("work::checksum(unsigned long)"), 0) << rep.out;
  EXPECT_LT(calls_of("work::step(unsigned long)"), calls_of("work::checksum(unsigned long)")) << rep.out;
  EXPECT_FALSE(maps_tramway(footprint(t.pid).maps));
  t.send("end");
  EXPECT_TRUE(contains(t.rest(), "sleep slept\n"));
}

// A program nobody here wrote, started without tramway: Debian's python3.11 running queries
// through Debian's libsqlite3.so.0 (functions reached through relocated prologues), traced live
// and ejected; what it prints is what it prints untraced.
TEST_F(Inject, RecordPidOnDebiansPythonAndSqlite) {
  if (access("/usr/bin/python3.11", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/python3.11";
  const std::string script = R"PY(
import sqlite3, sys, threading
stop = threading.Event()
def work():
    db = sqlite3.connect(":memory:")
    db.execute("create table t(k integer primary key, v text)")
    n = 0
    while not stop.is_set():
        db.execute("insert into t(v) values (?)", (str(n),))
        db.execute("select count(*), sum(length(v)) from t where k % 7 = 3").fetchone()
        n += 1
threading.Thread(target=work, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "end":
        break
stop.set()
db = sqlite3.connect(":memory:")
db.execute("create table t(k integer primary key, v text)")
db.executemany("insert into t(v) values (?)", [(str(i),) for i in range(1000)])
print(db.execute("select count(*), sum(length(v)), max(k) from t where k % 7 = 3").fetchone(), flush=True)
)PY";
  auto run_python = [&](bool traced) {
    Child c;
    start(c, {"/usr/bin/python3.11", "-c", script}, dir_ + "/py-err");
    EXPECT_EQ(c.line(), "ready") << read_file(c.err_path);
    if (traced) {
      const std::string pid = std::to_string(c.pid), trace = dir_ + "/py.trace";
      const CliRun r = cli({"record", "-p", pid, "-f", "sqlite3_step", "-f", "sqlite3_prepare_v2", "--duration", "0.5", "-o", trace});
      EXPECT_EQ(r.code, 0) << r.err;
      EXPECT_TRUE(contains(r.err, "unloaded the agent from process " + pid)) << r.err;
      const CliRun rep = cli({"report", trace});
      EXPECT_TRUE(std::regex_search(rep.out, std::regex("\\n *[1-9][0-9]* +.*sqlite3_step\\n"))) << rep.out;
      EXPECT_FALSE(maps_tramway(footprint(c.pid).maps));
    }
    c.send("end");
    const std::string out = c.rest();
    EXPECT_EQ(c.wait(), 0) << read_file(c.err_path);
    return out;
  };
  const std::string plain = run_python(false);
  EXPECT_EQ(plain, "(143, 413, 997)\n");
  EXPECT_EQ(run_python(true), plain);
}

// `tramway run` preloads the agent: eject detaches and gives everything back but leaves it
// loaded (the loader never unloads preloaded objects), and a later attach takes it up again.
TEST_F(Inject, EjectOfAPreloadedAgentLeavesItIdleAndAttachableAgain) {
  Child r;
  start(r, {kCli, "run", "--", kTarget}, dir_ + "/run-err");
  ASSERT_EQ(r.line(), "ready");
  pid_t pid = -1;
  for (int i = 0; i < 2000 && pid < 0; ++i) {
    std::smatch m;
    const std::string err = read_file(r.err_path);
    if (std::regex_search(err, m, std::regex("is running as pid ([0-9]+)"))) pid = std::stoi(m[1]);
    else std::this_thread::sleep_for(5ms);
  }
  ASSERT_GT(pid, 0);
  const std::string p = std::to_string(pid);
  ASSERT_EQ(cli({"live", p, "attach", "work::step*", "-o", dir_ + "/a.trace"}).code, 0);
  const CliRun e = cli({"live", p, "eject"});
  EXPECT_EQ(e.code, 0) << e.err;
  EXPECT_TRUE(contains(e.out, "the agent stays loaded, idle")) << e.out;
  EXPECT_EQ(cli({"live", p, "status"}).code, 1);  // no socket any more
  const CliRun again = cli({"live", p, "attach", "work::step*", "-o", dir_ + "/b.trace"});
  EXPECT_EQ(again.code, 0) << again.err;
  const CliRun s = cli({"live", p, "status"});
  EXPECT_TRUE(contains(s.out, "recording yes")) << s.out;
  EXPECT_TRUE(contains(s.out, "handlers 14\n")) << s.out;
  EXPECT_EQ(cli({"live", p, "stop"}).code, 0);
  r.send("end");
  EXPECT_TRUE(contains(r.rest(), "sleep slept\n"));
  EXPECT_EQ(r.wait(), 0);
}

TEST_F(Inject, ListOfAPlainProcessLoadsTheAgent) {
  Child t;
  start_target(t);
  const CliRun l = cli({"list", std::to_string(t.pid), "work::*"});
  ASSERT_EQ(l.code, 0) << l.err;
  EXPECT_TRUE(contains(l.out, "work::checksum(unsigned long)\t0x")) << l.out;
  EXPECT_TRUE(contains(l.out, "work::step(unsigned long)\t0x")) << l.out;
  EXPECT_EQ(cli({"live", std::to_string(t.pid), "eject"}).code, 0);
}

// ---- refusals ----

TEST_F(Inject, AProcessAnotherTracerHoldsIsRefused) {
  Child t;
  start_target(t);
  ASSERT_EQ(ptrace(PTRACE_SEIZE, t.pid, nullptr, nullptr), 0);
  expect_refused(t.pid, "is being traced by process " + std::to_string(getpid()) +
                            " (a debugger or strace); a process has one tracer at a time");
  // Release it (a seized tracee is released by an interrupt stop and a detach).
  ASSERT_EQ(ptrace(PTRACE_INTERRUPT, t.pid, nullptr, nullptr), 0);
  ASSERT_EQ(waitpid(t.pid, nullptr, __WALL), t.pid);
  ASSERT_EQ(ptrace(PTRACE_DETACH, t.pid, nullptr, nullptr), 0);
  t.send("ping");
  EXPECT_EQ(t.line(), "pong");
}

TEST_F(Inject, AStoppedProcessIsRefused) {
  Child t;
  start_target(t);
  ASSERT_EQ(kill(t.pid, SIGSTOP), 0);
  for (int i = 0; i < 2000 && inject::read_target(t.pid)->state != 'T'; ++i) std::this_thread::sleep_for(1ms);
  expect_refused(t.pid, "is stopped; resume it with `kill -CONT " + std::to_string(t.pid) + "`");
  kill(t.pid, SIGCONT);
}

TEST_F(Inject, AStaticProgramIsRefused) {
  Child t;
  start(t, {kStatic}, dir_ + "/static-err");
  ASSERT_EQ(t.line(), "ready");
  expect_refused(t.pid, "is statically linked (no libc.so.6 in its memory map)");
}

TEST_F(Inject, ASeccompFilterIsRefusedUnlessAllowed) {
  Child t;
  start_target(t, {"--seccomp"});
  const std::string pid = std::to_string(t.pid);
  const std::string err = expect_refused(t.pid, "runs under a seccomp filter (Seccomp: 2 in /proc/" + pid + "/status)");
  EXPECT_TRUE(contains(err, "retry with --allow-seccomp")) << err;
  EXPECT_FALSE(maps_tramway(read_file("/proc/" + pid + "/maps")));
  const CliRun r = cli({"live", pid, "attach", "--allow-seccomp", "work::step*", "-o", dir_ + "/s.trace"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(cli({"live", pid, "eject"}).code, 0);
}

TEST_F(Inject, ASetUserIdProcessIsRefused) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to start a process with two uids";
  Child t;
  const Ids ids{65534, 0};  // real nobody, effective root: as a set-user-ID program runs
  start_target(t, {}, &ids);
  expect_refused(t.pid, "runs set-user-ID or set-group-ID");
}

TEST_F(Inject, ANonDumpableProcessIsRefused) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to start a process as another user";
  Child t;
  const Ids ids{65534, 65534};
  start_target(t, {"--nodump"}, &ids);
  expect_refused(t.pid, "is not dumpable (it called prctl(PR_SET_DUMPABLE, 0)");
}

TEST_F(Inject, AnotherUsersProcessIsRefusedWithoutTheCapability) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to run the command as another user";
  Child t;
  start_target(t);  // root's
  const Ids nobody{65534, 65534};
  expect_refused(t.pid, "belongs to another user", &nobody);
}

// The checks themselves, for the cases this machine cannot stage (Yama, musl, 32-bit, strict mode).
TEST(InjectChecks, EachRefusalSaysWhatToDo) {
  inject::TargetFacts t;
  t.pid = 42;
  t.name = "app";
  t.state = 'S';
  t.libc_path = "/lib/x86_64-linux-gnu/libc.so.6";
  t.caller_euid = 1000;
  t.ruid = t.euid = 1000;
  EXPECT_TRUE(inject::check_injectable(t).ok());

  auto message = [](inject::TargetFacts f) { return inject::check_injectable(f).message(); };
  inject::TargetFacts y = t;
  y.yama_scope = 1;
  EXPECT_TRUE(contains(message(y), "kernel.yama.ptrace_scope = 1 lets only a parent process or CAP_SYS_PTRACE attach to "
                                   "process 42 (app)"))
      << message(y);
  EXPECT_TRUE(contains(message(y), "sysctl kernel.yama.ptrace_scope=0")) << message(y);
  y.yama_scope = 3;
  EXPECT_TRUE(contains(message(y), "kernel.yama.ptrace_scope = 3, which only a reboot lowers")) << message(y);
  y.caller_capable = true;
  y.yama_scope = 2;
  EXPECT_TRUE(inject::check_injectable(y).ok());

  inject::TargetFacts other = t;
  other.euid = other.ruid = 0;
  EXPECT_TRUE(contains(message(other), "belongs to another user (uid 0); run tramway as that user, or as root"));
  inject::TargetFacts musl = t;
  musl.musl = true;
  EXPECT_TRUE(contains(message(musl), "uses the musl C library"));
  inject::TargetFacts x32 = t;
  x32.elf64 = false;
  EXPECT_TRUE(contains(message(x32), "is a 32-bit program"));
  inject::TargetFacts strict = t;
  strict.seccomp = 1;
  EXPECT_TRUE(contains(message(strict), "seccomp strict mode"));
  inject::TargetFacts zombie = t;
  zombie.state = 'Z';
  EXPECT_TRUE(contains(message(zombie), "has exited (it is a zombie)"));
  inject::TargetFacts filtered = t;
  filtered.seccomp = 2;
  inject::CheckOptions allow;
  allow.allow_seccomp = true;
  EXPECT_TRUE(inject::check_injectable(filtered, allow).ok());
}

TEST(InjectChecks, RestartKinds) {
  EXPECT_EQ(inject::restart_kind(-512), inject::RestartKind::kernel);  // -ERESTARTSYS
  EXPECT_EQ(inject::restart_kind(-513), inject::RestartKind::kernel);
  EXPECT_EQ(inject::restart_kind(-514), inject::RestartKind::kernel);
  EXPECT_EQ(inject::restart_kind(-516), inject::RestartKind::kernel);  // -ERESTART_RESTARTBLOCK
  EXPECT_EQ(inject::restart_kind(-EINTR), inject::RestartKind::by_hand);
  EXPECT_EQ(inject::restart_kind(0), inject::RestartKind::none);
  EXPECT_EQ(inject::restart_kind(-EAGAIN), inject::RestartKind::none);
}

}  // namespace
