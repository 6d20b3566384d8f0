#include "attach.h"

#include <signal.h>
#include <time.h>
#include <limits.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include "inject/injector.h"
#include "launch.h"

namespace tramway::cli {
namespace {

Result<inject::AgentFiles> agent_files() {
  Result<Agent> a = find_agent();
  if (!a.ok()) return a.status();
  if (a->preload.size() < 2) return Status::error("cannot find libtramway.so.0 beside the agent " + a->path);
  return inject::AgentFiles{a->preload.front(), a->path};
}

std::string ms_text(std::int64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f ms", static_cast<double>(ns) / 1e6);
  return buf;
}

// tramway's own threads in `pid` (named tramway-*).
std::vector<pid_t> tramway_threads(pid_t pid) {
  std::vector<pid_t> out;
  for (pid_t tid : inject::threads_of(pid)) {
    std::ifstream comm("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/comm");
    std::string name;
    std::getline(comm, name);
    if (name.rfind("tramway-", 0) == 0) out.push_back(tid);
  }
  return out;
}

}  // namespace

Result<Attached> connect_or_inject(pid_t pid, const AttachOptions& o) {
  Result<std::string> sock = control::find_socket(pid);
  if (sock.ok() || sock.status().sys_errno() == ESRCH || sock.status().sys_errno() == EPERM) {
    Result<control::Connection> c = control::Connection::open(pid, 120000);
    if (!c.ok()) return c.status();
    return Attached{std::move(*c), false};
  }
  // Not into a tramway command (the supervisor of `tramway run`): find_socket named its child.
  char self[PATH_MAX] = {}, target[PATH_MAX] = {};
  if (readlink("/proc/self/exe", self, sizeof self - 1) > 0 &&
      readlink(("/proc/" + std::to_string(pid) + "/exe").c_str(), target, sizeof target - 1) > 0 &&
      std::string(self) == target) {
    return sock.status();
  }
#ifdef TRAMWAY_SANITIZED
  return Status::error(sock.status().message() + ". This tramway was built with sanitizers: its agent needs their "
                       "runtime loaded first, so it cannot be loaded into a running program");
#endif
  Result<inject::AgentFiles> files = agent_files();
  if (!files.ok()) return files.status();
  inject::InjectOptions io;
  io.check.allow_seccomp = o.allow_seccomp;
  Result<inject::InjectReport> r = inject::inject_agent(pid, *files, io);
  if (!r.ok()) return Status::error("cannot load the agent into process " + std::to_string(pid) + ": " + r.status().message(),
                                    r.status().sys_errno());
  if (!o.quiet) {
    std::fprintf(stderr, "tramway: loaded the agent into process %d (thread %d paused %s%s); `tramway live %d eject` takes it out\n",
                 static_cast<int>(pid), static_cast<int>(r->tid), ms_text(r->pause_ns).c_str(),
                 r->syscall >= 0 ? (", in system call " + std::to_string(r->syscall) + (r->restarted ? ", restarted" : "")).c_str() : "",
                 static_cast<int>(pid));
  }
  Result<control::Connection> c = control::Connection::open(pid, 120000);
  if (!c.ok()) return c.status();
  return Attached{std::move(*c), true};
}

int eject(pid_t pid) {
  Result<control::Connection> c = control::Connection::open(pid, 120000);
  if (!c.ok()) {
    std::fprintf(stderr, "tramway: %s\n", c.status().message().c_str());
    return 1;
  }
  Result<control::Reply> r = c->call({control::Verb::eject, {}});
  if (!r.ok() || !r->ok) {
    std::fprintf(stderr, "tramway: %s\n", r.ok() ? r->text.c_str() : r.status().message().c_str());
    return 1;
  }
  std::printf("ok %s\n", r->text.c_str());
  const bool unload = !r->lines.empty() && r->lines[0] == "unload yes";
  if (!unload) return 0;
  // The agent's threads end after the reply; the loader may unload its code only then.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::vector<pid_t> left;
  while (!(left = tramway_threads(pid)).empty() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!left.empty()) {
    std::fprintf(stderr, "tramway: the agent's thread %d in process %d did not end within 10 s; the libraries stay loaded\n",
                 static_cast<int>(left[0]), static_cast<int>(pid));
    return 1;
  }
  Result<inject::AgentFiles> files = agent_files();
  if (!files.ok()) {
    std::fprintf(stderr, "tramway: %s\n", files.status().message().c_str());
    return 1;
  }
  Result<inject::InjectReport> u = inject::unload_agent(pid, *files);
  if (!u.ok()) {
    std::fprintf(stderr, "tramway: unloading the agent from process %d: %s\n", static_cast<int>(pid), u.status().message().c_str());
    return 1;
  }
  std::fprintf(stderr, "tramway: unloaded the agent from process %d (thread %d paused %s)\n", static_cast<int>(pid),
               static_cast<int>(u->tid), ms_text(u->pause_ns).c_str());
  return 0;
}

int record_process(pid_t pid, const RecordProcessArgs& a) {
  auto fail = [](const std::string& m) {
    std::fprintf(stderr, "tramway: %s\n", m.c_str());
    return 1;
  };
  if (a.filters.empty()) return fail("record -p needs at least one -f GLOB (the functions to trace in the running process)");
  // Interrupts end the recording, not us: blocked here, waited for below.
  sigset_t stop_signals, old;
  sigemptyset(&stop_signals);
  for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&stop_signals, s);
  pthread_sigmask(SIG_BLOCK, &stop_signals, &old);
  struct Restore {
    sigset_t m;
    ~Restore() { pthread_sigmask(SIG_SETMASK, &m, nullptr); }
  } restore{old};

  Result<Attached> at = connect_or_inject(pid, a.attach);
  if (!at.ok()) return fail(at.status().message());
  control::Connection& c = at->connection;
  auto finish = [&](int rc) {
    if (at->injected) {
      // Leave the process as we found it.
      const int e = eject(pid);
      if (rc == 0) rc = e;
    }
    return rc;
  };
  Result<control::Reply> st = c.call({control::Verb::status, {}});
  if (!st.ok() || !st->ok) return finish(fail(st.ok() ? st->text : st.status().message()));
  if (st->text == "recording") return finish(fail("process " + std::to_string(pid) + " is being recorded already (`tramway live " +
                                                  std::to_string(pid) + " status` says where)"));
  std::vector<std::string> options;
  for (const std::string& x : a.excludes) options.push_back("exclude " + x);
  if (a.max_depth > 0) options.push_back("max-depth " + std::to_string(a.max_depth));
  if (a.min_duration_ns > 0) options.push_back("min-duration " + std::to_string(a.min_duration_ns));
  if (a.trap) options.push_back("trap");
  for (const std::string& o : options) {
    Result<control::Reply> r = c.call({control::Verb::option, o});
    if (!r.ok() || !r->ok) return finish(fail("the agent refused '" + o + "': " + (r.ok() ? r->text : r.status().message())));
  }
  Result<control::Reply> started = c.call({control::Verb::start, a.output});
  if (!started.ok() || !started->ok) return finish(fail(started.ok() ? started->text : started.status().message()));
  std::size_t functions = 0;
  for (const std::string& f : a.filters) {
    Result<control::Reply> r = c.call({control::Verb::attach, f});
    if (!r.ok() || !r->ok) {
      (void)c.call({control::Verb::stop, {}});
      unlink(a.output.c_str());
      return finish(fail("-f '" + f + "': " + (r.ok() ? r->text : r.status().message())));
    }
    const auto colon = r->text.rfind(": ");
    if (colon != std::string::npos) functions += std::strtoul(r->text.c_str() + colon + 2, nullptr, 10);
  }
  std::fprintf(stderr, "tramway: recording %zu functions of process %d to %s%s\n", functions, static_cast<int>(pid),
               a.output.c_str(), a.duration > 0 ? "" : " (Ctrl-C ends it)");
  const auto until = a.duration > 0 ? std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<long>(a.duration * 1000))
                                    : std::chrono::steady_clock::time_point::max();
  bool exited = false;
  while (std::chrono::steady_clock::now() < until) {
    const timespec tick{0, 100'000'000};
    if (sigtimedwait(&stop_signals, nullptr, &tick) > 0) break;
    if (kill(pid, 0) != 0) {
      exited = true;
      break;
    }
  }
  if (exited) {
    std::fprintf(stderr, "tramway: process %d exited; the trace ends where it was last flushed\n", static_cast<int>(pid));
    return 0;
  }
  Result<control::Reply> stopped = c.call({control::Verb::stop, {}});
  if (!stopped.ok() || !stopped->ok) return finish(fail(stopped.ok() ? stopped->text : stopped.status().message()));
  std::fprintf(stderr, "tramway: %s\n", stopped->text.c_str());
  std::fprintf(stderr, "tramway: trace in %s; see it with: tramway report %s\n", a.output.c_str(), shell_quote(a.output).c_str());
  return finish(0);
}

}  // namespace tramway::cli
