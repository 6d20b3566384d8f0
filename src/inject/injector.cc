#include "inject/injector.h"

#include <dlfcn.h>
#include <signal.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "common/tramway_mapping.h"
#include "inject/elf_symbols.h"
#include "inject/remote_call.h"

namespace tramway::inject {
namespace {

struct Loader {
  std::uintptr_t dlopen = 0, dlsym = 0, dlerror = 0, dlclose = 0;
  std::vector<Mapping> maps;
};

Result<Loader> find_loader(const TargetFacts& t) {
  // The file as the target sees it (its mount namespace).
  const std::string file = "/proc/" + std::to_string(t.pid) + "/root" + t.libc_path;
  Result<std::vector<std::uintptr_t>> a = exported_functions(file, {"dlopen", "dlsym", "dlerror", "dlclose"});
  if (!a.ok()) {
    if (a.status().sys_errno() == ENOENT) {
      return Status::error("process " + std::to_string(t.pid) + "'s C library (" + t.libc_path +
                           ") has no dlopen: glibc older than 2.34 keeps it in libdl, which tramway does not use");
    }
    return a.status();
  }
  Loader l;
  l.dlopen = t.libc_base + (*a)[0];
  l.dlsym = t.libc_base + (*a)[1];
  l.dlerror = t.libc_base + (*a)[2];
  l.dlclose = t.libc_base + (*a)[3];
  l.maps = read_maps(t.pid);
  return l;
}

std::string task_file(pid_t pid, pid_t tid, const char* f) {
  return "/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/" + f;
}

struct Candidate {
  pid_t tid = 0;
  int rank = 0;  // lower first
};

// System calls a thread sleeps in without holding a lock of the C library or the loader, that
// resume correctly after a stop (restarted by the kernel, or by hand after an EINTR).
bool quiet_syscall(long nr) {
  switch (nr) {
    case SYS_read: case SYS_readv: case SYS_pread64: case SYS_nanosleep: case SYS_clock_nanosleep:
    case SYS_accept: case SYS_accept4: case SYS_epoll_wait: case SYS_epoll_pwait: case SYS_poll:
    case SYS_ppoll: case SYS_select: case SYS_pselect6: case SYS_recvfrom: case SYS_recvmsg:
    case SYS_wait4: case SYS_waitid: case SYS_pause: case SYS_rt_sigsuspend: case SYS_futex:
      return true;
    default:
      return false;
  }
}

std::vector<Candidate> rank_threads(pid_t pid) {
  std::vector<Candidate> out;
  for (pid_t tid : threads_of(pid)) {
    std::ifstream comm(task_file(pid, tid, "comm"));
    std::string name;
    std::getline(comm, name);
    if (name.rfind("tramway-", 0) == 0) continue;  // an agent's own thread
    std::ifstream stat(task_file(pid, tid, "stat"));
    std::string s;
    std::getline(stat, s);
    const auto paren = s.rfind(')');
    if (paren == std::string::npos || paren + 2 >= s.size()) continue;
    const char state = s[paren + 2];
    std::ifstream sc(task_file(pid, tid, "syscall"));
    std::string first;
    sc >> first;
    int rank;
    if (state == 'S' && !first.empty() && first != "running" && quiet_syscall(std::atol(first.c_str()))) rank = 0;
    else if (state == 'R') rank = 1;
    else if (state == 'S') rank = 2;
    else continue;  // D (uninterruptible), T/t (stopped, traced), Z
    out.push_back({tid, rank});
  }
  std::stable_sort(out.begin(), out.end(), [](const Candidate& a, const Candidate& b) { return a.rank < b.rank; });
  return out;
}

// Whether `pc` lies in the C library or the dynamic loader, whose locks (malloc's, the
// loader's) a thread stopped there may hold: dlopen would then wait for itself.
bool in_runtime(const std::vector<Mapping>& maps, std::uintptr_t pc) {
  for (const Mapping& m : maps) {
    if (pc < m.start || pc >= m.end) continue;
    const auto slash = m.path.rfind('/');
    const std::string b = slash == std::string::npos ? m.path : m.path.substr(slash + 1);
    return b.rfind("libc.so", 0) == 0 || b.rfind("ld-linux", 0) == 0 || b.rfind("libc-", 0) == 0 ||
           b.rfind("libstdc++", 0) == 0 || b.rfind("libgcc_s", 0) == 0;
  }
  return false;
}

// Seizes a thread in a state where calling the loader is safe.
Result<Hijack> take_thread(pid_t pid, const Loader& loader, const InjectOptions& o) {
  std::string last = "it has no thread tramway can use (all are stopped, traced or in uninterruptible sleep)";
  for (int attempt = 0; attempt < 50; ++attempt) {
    const std::vector<Candidate> c = rank_threads(pid);
    if (c.empty()) break;
    for (const Candidate& cand : c) {
      Result<Hijack> h = Hijack::seize(pid, cand.tid, o.stop_timeout);
      if (!h.ok()) {
        if (h.status().sys_errno() == ESRCH && kill(pid, 0) != 0) return h.status();
        if (h.status().sys_errno() == EAGAIN || h.status().sys_errno() == EPERM) return h.status();
        last = h.status().message();
        continue;  // the thread exited, or would not stop: the next one
      }
      const StopFacts& f = h->stopped();
      const bool quiet = f.syscall >= 0 ? quiet_syscall(f.syscall) || !in_runtime(loader.maps, f.pc)
                                        : !in_runtime(loader.maps, f.pc);
      if (quiet) return h;
      last = "every thread was inside the C library or the loader when stopped";
      (void)h->release();  // let it leave the C library, and try again
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return Status::error("cannot pick a thread of process " + std::to_string(pid) + " to load the agent with: " + last, EAGAIN);
}

Result<std::string> remote_dlerror(Hijack& h, const Loader& l, const InjectOptions& o) {
  Result<std::uint64_t> e = h.call(l.dlerror, {}, o.call_timeout);
  if (!e.ok()) return e.status();
  if (*e == 0) return std::string("(no message)");
  return h.read_string(*e, 1024);
}

// Runs `body` on a thread of the target and restores it whatever happens.
template <class Body>
Result<InjectReport> with_thread(pid_t pid, const InjectOptions& o, Body body) {
  Result<TargetFacts> t = read_target(pid);
  if (!t.ok()) return t.status();
  if (Status s = check_injectable(*t, o.check); !s.ok()) return s;
  Result<Loader> loader = find_loader(*t);
  if (!loader.ok()) return loader.status();
  // The seize must come from one thread: a tracee belongs to the thread that attached it, and
  // is released if that thread exits (so a failure cannot leave the target stopped).
  Result<InjectReport> out = Status::error("internal: the injector thread did not run");
  std::thread worker([&] {
    Result<Hijack> h = take_thread(pid, *loader, o);
    if (!h.ok()) {
      out = h.status();
      return;
    }
    InjectReport report;
    report.tid = h->tid();
    report.syscall = h->stopped().syscall;
    Status s = body(*h, *loader, report);
    const Status released = h->release();
    report.pause_ns = h->pause_ns();
    report.restarted = h->stopped().restarts || h->stopped().eintr_fixed;
    if (!s.ok()) out = s;
    else if (!released.ok()) out = Status::error("the agent loaded, but thread " + std::to_string(report.tid) +
                                                 " could not be restored: " + released.message());
    else out = report;
  });
  worker.join();
  return out;
}

Result<std::uint64_t> remote_dlopen(Hijack& h, const Loader& l, const InjectOptions& o, const std::string& path, int flags) {
  Result<std::uintptr_t> p = h.put_string(path);
  if (!p.ok()) return p.status();
  Result<std::uint64_t> handle = h.call(l.dlopen, {*p, static_cast<std::uint64_t>(flags)}, o.call_timeout);
  if (!handle.ok()) return handle.status();
  if (*handle == 0 && !(flags & RTLD_NOLOAD)) {
    Result<std::string> why = remote_dlerror(h, l, o);
    return Status::error("the target's loader cannot load " + path + ": " + (why.ok() ? *why : why.status().message()));
  }
  return handle;
}

// The executable mappings of tramway's libraries and code arenas in `pid`.
std::vector<Mapping> tramway_text(pid_t pid) {
  std::vector<Mapping> out;
  for (const Mapping& m : read_maps(pid)) {
    if (m.perms.size() >= 3 && m.perms[2] == 'x' && common::is_tramway_mapping(m.path)) {
      out.push_back(m);
    }
  }
  return out;
}

bool inside(const std::vector<Mapping>& text, std::uintptr_t pc) {
  for (const Mapping& m : text) {
    if (pc >= m.start && pc < m.end) return true;
  }
  return false;
}

// The user PC of a thread that is not running, from /proc (0 when it is running or unknown).
std::uintptr_t blocked_pc(pid_t pid, pid_t tid) {
  std::ifstream f(task_file(pid, tid, "syscall"));
  std::string line;
  std::getline(f, line);
  if (line.empty() || line == "running") return 0;
  const auto last = line.rfind(' ');
  return last == std::string::npos ? 0 : std::stoull(line.substr(last + 1), nullptr, 16);
}

// A tasks grace period over tramway's text, by ptrace: every thread but `held` (stopped by us,
// at `held_pc`) is seen outside it once. Nothing can enter it any more (no hook, no handler of
// tramway installed, its threads gone), so once is enough; a thread the agent's own watch saw
// may still have been finishing a handler's last instructions. Blocked threads are read from
// /proc; running ones are stopped for the look (and resumed as a Hijack resumes them).
Status observe_outside(pid_t pid, pid_t held, std::uintptr_t held_pc, const InjectOptions& o) {
  const std::vector<Mapping> text = tramway_text(pid);
  if (text.empty()) return {};
  if (inside(text, held_pc)) return Status::error("thread " + std::to_string(held) + " is inside tramway's code", EAGAIN);
  std::vector<pid_t> pending;
  for (pid_t tid : threads_of(pid)) {
    if (tid != held) pending.push_back(tid);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!pending.empty()) {
    std::erase_if(pending, [&](pid_t tid) {
      if (const std::uintptr_t pc = blocked_pc(pid, tid); pc != 0) return !inside(text, pc);
      Result<Hijack> h = Hijack::seize(pid, tid, o.stop_timeout);
      if (!h.ok()) return kill(pid, 0) != 0 || access(task_file(pid, tid, "stat").c_str(), F_OK) != 0;  // gone
      const bool out = !inside(text, h->stopped().pc);
      (void)h->release();
      return out;
    });
    if (pending.empty()) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      return Status::error("thread " + std::to_string(pending[0]) + " stayed inside tramway's code for 5 s", ETIMEDOUT);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return {};
}

std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  return realpath(p.c_str(), buf) ? std::string(buf) : p;
}

// The files as the target's maps name them.
AgentFiles canonical(const AgentFiles& f) { return {real_path(f.libtramway), real_path(f.agent)}; }

}  // namespace

bool agent_mapped(pid_t pid, const AgentFiles& files) {
  const std::string agent = real_path(files.agent);
  for (const Mapping& m : read_maps(pid)) {
    if (m.path == agent) return true;
  }
  return false;
}

Result<InjectReport> inject_agent(pid_t pid, const AgentFiles& given, const InjectOptions& o) {
  const AgentFiles files = canonical(given);
  const bool already = agent_mapped(pid, files);
  Result<InjectReport> r = with_thread(pid, o, [&](Hijack& h, const Loader& l, InjectReport&) -> Status {
    // The C++ runtime first, on its own: loaded as libtramway's dependency it would bind its
    // own std::string members to the copies libtramway exports (they come first in that scope),
    // and then libtramway could never unload. It stays loaded (libstdc++ cannot unload), which
    // changes nothing for a C++ program: it had it already.
    for (const char* runtime : {"libstdc++.so.6", "libgcc_s.so.1"}) {
      Result<std::uint64_t> handle = remote_dlopen(h, l, o, runtime, RTLD_NOW | RTLD_LOCAL);
      if (!handle.ok()) return handle.status();
    }
    // libtramway first: its signal router adopts the handlers before the agent runs.
    for (const std::string* lib : {&files.libtramway, &files.agent}) {
      // RTLD_DEEPBIND: the libraries' own references to sigaction, pthread_sigmask, dlopen, ...
      // bind to libtramway's wrappers (which an injected library cannot put ahead of libc's
      // for the program), so that tramway's own threads keep SIGTRAP deliverable.
      Result<std::uint64_t> handle = remote_dlopen(h, l, o, *lib, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (!handle.ok()) return handle.status();
      if (lib != &files.agent) continue;
      Result<std::uintptr_t> name = h.put_string("tramway_agent_injected");
      if (!name.ok()) return name.status();
      Result<std::uint64_t> fn = h.call(l.dlsym, {*handle, *name}, o.call_timeout);
      if (!fn.ok()) return fn.status();
      if (*fn == 0) return Status::error(files.agent + " has no tramway_agent_injected (an agent of another version?)");
      Result<std::uint64_t> message = h.call(*fn, {}, o.call_timeout);
      if (!message.ok()) return message.status();
      if (*message != 0) {  // the agent's error message
        Result<std::string> why = h.read_string(*message, 2048);
        return Status::error("the agent loaded into process " + std::to_string(pid) + " but could not start: " +
                             (why.ok() ? *why : why.status().message()));
      }
    }
    return {};
  });
  if (r.ok()) r->already = already;
  return r;
}

Result<InjectReport> unload_agent(pid_t pid, const AgentFiles& given, const InjectOptions& options) {
  const AgentFiles files = canonical(given);
  InjectOptions o = options;
  o.check.allow_seccomp = true;  // the loader unmaps and closes only: a filter that let it load lets it unload
  Result<InjectReport> r = with_thread(pid, o, [&](Hijack& h, const Loader& l, InjectReport&) -> Status {
    if (Status s = observe_outside(pid, h.tid(), h.stopped().pc, o); !s.ok()) {
      return Status::error("cannot unload yet: " + s.message() + " (nothing was unloaded)", s.sys_errno());
    }
    for (const std::string* lib : {&files.agent, &files.libtramway}) {
      // One reference from inject_agent, one from this lookup.
      Result<std::uint64_t> handle = remote_dlopen(h, l, o, *lib, RTLD_NOW | RTLD_NOLOAD);
      if (!handle.ok()) return handle.status();
      if (*handle == 0) continue;
      for (int i = 0; i < 2; ++i) {
        Result<std::uint64_t> rc = h.call(l.dlclose, {*handle}, o.call_timeout);
        if (!rc.ok()) return rc.status();
        if (*rc != 0) {
          Result<std::string> why = remote_dlerror(h, l, o);
          return Status::error("dlclose of " + *lib + " failed in process " + std::to_string(pid) + ": " +
                               (why.ok() ? *why : why.status().message()));
        }
      }
    }
    return {};
  });
  if (!r.ok()) return r;
  for (const Mapping& m : read_maps(pid)) {
    if (m.path == files.agent || m.path == files.libtramway) {
      return Status::error(m.path + " is still mapped in process " + std::to_string(pid) +
                           " (loaded when it started, under `tramway run`? The loader never unloads those)");
    }
  }
  return r;
}

}  // namespace tramway::inject
