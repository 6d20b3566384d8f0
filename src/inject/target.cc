#include "inject/target.h"

#include <dirent.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace tramway::inject {
namespace {

std::string proc(pid_t pid, const char* file) { return "/proc/" + std::to_string(pid) + "/" + file; }

std::string basename_of(const std::string& p) {
  const auto slash = p.rfind('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

bool is_glibc(const std::string& path) {
  const std::string b = basename_of(path);
  return b == "libc.so.6" || (b.rfind("libc-2.", 0) == 0 && b.size() > 3 && b.compare(b.size() - 3, 3, ".so") == 0);
}

}  // namespace

std::vector<Mapping> read_maps(pid_t pid) {
  std::vector<Mapping> out;
  std::ifstream f(proc(pid, "maps"));
  for (std::string line; std::getline(f, line);) {
    std::istringstream in(line);
    Mapping m;
    std::string range, dev;
    unsigned long inode = 0;
    in >> range >> m.perms >> std::hex >> m.offset >> dev >> std::dec >> inode;
    std::getline(in >> std::ws, m.path);
    const auto dash = range.find('-');
    if (dash == std::string::npos) continue;
    m.start = std::stoull(range.substr(0, dash), nullptr, 16);
    m.end = std::stoull(range.substr(dash + 1), nullptr, 16);
    out.push_back(std::move(m));
  }
  return out;
}

std::vector<pid_t> threads_of(pid_t pid) {
  std::vector<pid_t> out;
  DIR* d = opendir(proc(pid, "task").c_str());
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] >= '0' && e->d_name[0] <= '9') out.push_back(static_cast<pid_t>(std::atol(e->d_name)));
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

int yama_ptrace_scope() {
  std::ifstream f("/proc/sys/kernel/yama/ptrace_scope");
  int v = -1;
  if (!(f >> v)) return -1;
  return v;
}

bool has_ptrace_capability() {
  constexpr int kCapSysPtrace = 19;  // linux/capability.h
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);) {
    if (line.rfind("CapEff:", 0) == 0) return (std::stoull(line.substr(7), nullptr, 16) >> kCapSysPtrace) & 1;
  }
  return geteuid() == 0;
}

Result<TargetFacts> read_target(pid_t pid) {
  TargetFacts t;
  t.pid = pid;
  t.caller_euid = geteuid();
  t.caller_capable = has_ptrace_capability();
  t.yama_scope = yama_ptrace_scope();
  std::ifstream status(proc(pid, "status"));
  if (!status) {
    if (errno == ENOENT || access(proc(pid, "").c_str(), F_OK) != 0) return Status::error("no process " + std::to_string(pid), ESRCH);
    return Status::error("cannot read " + proc(pid, "status") + ": " + std::strerror(errno), errno);
  }
  for (std::string line; std::getline(status, line);) {
    std::istringstream in(line);
    std::string key;
    in >> key;
    if (key == "Name:") std::getline(in >> std::ws, t.name);
    else if (key == "State:") in >> t.state;
    else if (key == "Uid:") in >> t.ruid >> t.euid;
    else if (key == "Gid:") in >> t.rgid >> t.egid;
    else if (key == "TracerPid:") in >> t.tracer;
    else if (key == "Seccomp:") in >> t.seccomp;
  }
  // A non-dumpable process's /proc files belong to root (proc(5), "dumpable").
  struct stat st;
  if (stat(proc(pid, "status").c_str(), &st) == 0 && st.st_uid == 0 && t.euid != 0) t.non_dumpable = true;

  if (const int fd = open(proc(pid, "exe").c_str(), O_RDONLY | O_CLOEXEC); fd >= 0) {
    unsigned char ident[EI_NIDENT] = {};
    if (read(fd, ident, sizeof ident) == static_cast<ssize_t>(sizeof ident) && std::memcmp(ident, ELFMAG, SELFMAG) == 0) {
      t.elf64 = ident[EI_CLASS] == ELFCLASS64;
    }
    close(fd);
  }
  for (const Mapping& m : read_maps(pid)) {
    const std::string b = basename_of(m.path);
    if (b.rfind("ld-musl", 0) == 0 || b.rfind("libc.musl", 0) == 0) t.musl = true;
    if (is_glibc(m.path) && t.libc_path.empty()) {  // maps are sorted: its first mapping
      t.libc_path = m.path;
      t.libc_base = m.start - m.offset;
    }
  }
  return t;
}

Status check_injectable(const TargetFacts& t, const CheckOptions& options) {
  const std::string who = "process " + std::to_string(t.pid) + (t.name.empty() ? "" : " (" + t.name + ")");
  if (t.state == 'Z' || t.state == 'X') return Status::error(who + " has exited (it is a zombie)", ESRCH);
  if (t.state == 'T') {
    return Status::error(who + " is stopped; resume it with `kill -CONT " + std::to_string(t.pid) + "` and retry", EAGAIN);
  }
  if (t.tracer != 0) {
    return Status::error(who + " is being traced by process " + std::to_string(t.tracer) +
                         " (a debugger or strace); a process has one tracer at a time: detach it and retry", EBUSY);
  }
  const bool capable = t.caller_capable;
  if (!capable && (t.ruid != t.caller_euid || t.euid != t.caller_euid)) {
    return Status::error(who + " belongs to another user (uid " + std::to_string(t.euid) +
                         "); run tramway as that user, or as root", EPERM);
  }
  if (t.ruid != t.euid || t.rgid != t.egid) {
    return Status::error(who + " runs set-user-ID or set-group-ID (its real and effective ids differ); tramway does "
                         "not load code into it. Start it under `tramway run` from its own user instead", EPERM);
  }
  if (t.non_dumpable) {
    return Status::error(who + " is not dumpable (it called prctl(PR_SET_DUMPABLE, 0), or changed its credentials): it "
                         "has asked not to be inspected, and tramway does not load code into it", EPERM);
  }
  if (const int scope = t.yama_scope; scope >= 1 && !capable) {
    if (scope == 3) {
      return Status::error("Yama forbids every ptrace attach (kernel.yama.ptrace_scope = 3, which only a reboot lowers); "
                           "start the program under `tramway run` instead", EPERM);
    }
    if (scope == 2 || scope == 1) {
      return Status::error(std::string("Yama's kernel.yama.ptrace_scope = ") + std::to_string(scope) +
                           " lets only " + (scope == 2 ? "CAP_SYS_PTRACE" : "a parent process or CAP_SYS_PTRACE") +
                           " attach to " + who + ": run tramway as root (or give it CAP_SYS_PTRACE: `setcap "
                           "cap_sys_ptrace+ep $(command -v tramway)`), or lower it with `sysctl kernel.yama.ptrace_scope=0`",
                           EPERM);
    }
  }
  if (!t.elf64) return Status::error(who + " is a 32-bit program; tramway injects into x86-64 programs only", ENOEXEC);
  if (t.musl) return Status::error(who + " uses the musl C library; tramway loads its agent through glibc's dlopen only", ENOEXEC);
  if (t.libc_path.empty()) {
    return Status::error(who + " is statically linked (no libc.so.6 in its memory map): there is no dynamic loader to load "
                         "the agent with; rebuild it dynamically linked", ENOEXEC);
  }
  if (t.seccomp == 1) {
    return Status::error(who + " runs in seccomp strict mode: any system call of the loader but read, write and exit "
                         "would kill it", EPERM);
  }
  if (t.seccomp == 2 && !options.allow_seccomp) {
    return Status::error(who + " runs under a seccomp filter (Seccomp: 2 in /proc/" + std::to_string(t.pid) +
                         "/status), which may kill it on a system call the loader or the agent makes (openat, mmap, "
                         "mprotect, socket, bind, clone3, rt_sigaction, membarrier). If you know the filter allows "
                         "them (systemd's SystemCallFilter=@system-service does), retry with --allow-seccomp", EPERM);
  }
  return {};
}

}  // namespace tramway::inject
