// Starting a program with the agent preloaded and supervising it (launch.h).
#include "launch.h"

#include <elf.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>

namespace tramway::cli {
namespace {

bool is_file(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string dir_of(const std::string& p) {
  const std::size_t slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash == 0 ? 1 : slash);
}

std::string self_exe() {
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
}

std::vector<std::string> split_colon(const std::string& s) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  for (;;) {
    const std::size_t end = s.find(':', pos);
    out.push_back(s.substr(pos, end == std::string::npos ? std::string::npos : end - pos));
    if (end == std::string::npos) return out;
    pos = end + 1;
  }
}

}  // namespace


Result<std::string> find_program(const std::string& name) {
  if (name.empty()) return Status::error("no program given");
  auto check = [&](const std::string& p) -> int {  // 0, or why p will not do
    struct stat st;
    if (stat(p.c_str(), &st) != 0) return errno;
    if (!S_ISREG(st.st_mode)) return EACCES;
    return access(p.c_str(), X_OK) == 0 ? 0 : errno;
  };
  if (name.find('/') != std::string::npos) {
    const int e = check(name);
    if (e == 0) return name;
    if (e == ENOENT || e == ENOTDIR) return Status::error(name + ": no such program", ENOENT);
    return Status::error(name + ": cannot execute it: " + std::strerror(e), e);
  }
  const char* path_env = std::getenv("PATH");
  // execvp's default when PATH is unset; an empty entry is the current directory.
  const std::string path = path_env ? path_env : "/bin:/usr/bin";
  int denied = 0;
  for (const std::string& dir : split_colon(path)) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    const int e = check(candidate);
    if (e == 0) return candidate;
    if (e == EACCES) denied = e;
  }
  if (denied) return Status::error(name + ": found in PATH but not executable", denied);
  return Status::error(name + ": no such program", ENOENT);
}

Status check_preloadable(const std::string& path, const std::string& name) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return Status::error(name + ": no such program", errno);
  if (((st.st_mode & S_ISUID) && st.st_uid != geteuid()) || ((st.st_mode & S_ISGID) && st.st_gid != getegid())) {
    return Status::error(name + " is set-user-ID or set-group-ID: the loader does not preload the agent into it");
  }
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};  // execute-only: let exec decide
  Elf64_Ehdr eh{};
  const bool elf = pread(fd, &eh, sizeof eh, 0) == static_cast<ssize_t>(sizeof eh) &&
                   std::memcmp(eh.e_ident, ELFMAG, SELFMAG) == 0 && eh.e_ident[EI_CLASS] == ELFCLASS64 &&
                   eh.e_phentsize == sizeof(Elf64_Phdr);
  bool interp = false;
  for (unsigned i = 0; elf && i < eh.e_phnum; ++i) {
    Elf64_Phdr ph{};
    if (pread(fd, &ph, sizeof ph, static_cast<off_t>(eh.e_phoff + i * sizeof ph)) != static_cast<ssize_t>(sizeof ph)) break;
    interp |= ph.p_type == PT_INTERP;
  }
  close(fd);
  // Scripts and unknown formats are the kernel's business; a static ELF would run without us.
  if (elf && !interp) {
    return Status::error(name + " is statically linked: the agent can only be preloaded into dynamically linked programs");
  }
  return {};
}

Result<Agent> find_agent() {
  Agent a;
  std::vector<std::string> tried;
  if (const char* env = std::getenv("TRAMWAY_AGENT"); env && *env) {
    if (!is_file(env)) return Status::error("TRAMWAY_AGENT=" + std::string(env) + ": no such file");
    a.path = env;
  } else {
    // The install layout first: an installed command must not pick up the build tree it came from.
    const std::string exe = self_exe();
    const std::string installed = dir_of(exe) + "/" TRAMWAY_REL_LIBDIR "/libtramway_agent.so";
    tried.push_back(installed);
    tried.push_back(TRAMWAY_BUILD_AGENT);
    if (!exe.empty() && is_file(installed)) a.path = installed;
    else if (is_file(TRAMWAY_BUILD_AGENT)) a.path = TRAMWAY_BUILD_AGENT;
  }
  if (a.path.empty()) {
    std::string msg = "cannot find the agent library libtramway_agent.so (looked for";
    for (const std::string& t : tried) msg += " " + t;
    return Status::error(msg + "); set TRAMWAY_AGENT=/path/to/libtramway_agent.so");
  }
  a.path = absolute(a.path);
  // libtramway: beside the agent (installed), else the build tree's. If neither exists the
  // loader still finds it through the agent's run path, only after libc in the lookup order.
  // Not libtramway_trace: the agent carries the unwinder wrappers itself, and a second copy
  // ahead of it would run them twice (each calls the next definition).
  const std::string beside = dir_of(a.path) + "/libtramway.so.0";
  if (is_file(beside)) a.preload.push_back(beside);
  else if (is_file(TRAMWAY_BUILD_LIBTRAMWAY)) a.preload.push_back(TRAMWAY_BUILD_LIBTRAMWAY);
  a.preload.push_back(a.path);
  return a;
}

Launch with_agent(const Agent& agent, const std::string& path, std::vector<std::string> argv) {
  Launch l;
  l.path = path;
  l.argv = std::move(argv);
  std::string ours;
  for (const std::string& p : agent.preload) ours += (ours.empty() ? "" : ":") + p;
  const char* existing = std::getenv("LD_PRELOAD");
  l.env.emplace_back("LD_PRELOAD", existing && *existing ? std::string(existing) + ":" + ours : ours);
  l.env.emplace_back("TRAMWAY_PRELOAD", ours);  // what the agent removes again
  return l;
}

// ---- Supervisor ----

Result<Supervisor> Supervisor::start(const Launch& launch) {
  Supervisor s;
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGCHLD}) sigaddset(&set, sig);
  sigprocmask(SIG_BLOCK, &set, &s.old_mask_);
  s.restore_mask_ = true;
  s.sigfd_ = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (s.sigfd_ < 0) return Status::error(std::string("signalfd: ") + std::strerror(errno), errno);

  // exec failures come back through a close-on-exec pipe: nothing read means exec succeeded.
  int errpipe[2];
  if (pipe2(errpipe, O_CLOEXEC) != 0) return Status::error(std::string("pipe: ") + std::strerror(errno), errno);
  std::vector<char*> argv;
  for (const std::string& a : launch.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);

  const pid_t pid = fork();
  if (pid < 0) {
    const int e = errno;
    close(errpipe[0]);
    close(errpipe[1]);
    return Status::error(std::string("fork: ") + std::strerror(e), e);
  }
  if (pid == 0) {
    sigprocmask(SIG_SETMASK, &s.old_mask_, nullptr);
    for (const auto& [k, v] : launch.env) setenv(k.c_str(), v.c_str(), 1);
    execv(launch.path.c_str(), argv.data());
    const int e = errno;
    (void)!write(errpipe[1], &e, sizeof e);
    _exit(127);
  }
  close(errpipe[1]);
  int child_errno = 0;
  ssize_t n;
  while ((n = read(errpipe[0], &child_errno, sizeof child_errno)) < 0 && errno == EINTR) {
  }
  close(errpipe[0]);
  s.pid_ = pid;
  if (n == static_cast<ssize_t>(sizeof child_errno)) {
    s.wait(-1);
    return Status::error(launch.argv[0] + ": cannot execute it: " + std::strerror(child_errno), child_errno);
  }
  return s;
}

Supervisor::Supervisor(Supervisor&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)), sigfd_(std::exchange(o.sigfd_, -1)), done_(o.done_), status_(o.status_),
      restore_mask_(std::exchange(o.restore_mask_, false)), old_mask_(o.old_mask_) {}

Supervisor::~Supervisor() {
  if (sigfd_ >= 0) close(sigfd_);
  if (restore_mask_) sigprocmask(SIG_SETMASK, &old_mask_, nullptr);
}

bool Supervisor::wait(int timeout_ms) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  while (!done_) {
    siginfo_t info{};
    const int r = waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT);
    if ((r == 0 && info.si_pid == pid_) || (r < 0 && errno == ECHILD)) {
      if (r == 0 && before_reap_) before_reap_(pid_);
      int st = 0;
      const pid_t reaped = r == 0 ? waitpid(pid_, &st, 0) : -1;
      done_ = true;
      status_ = reaped == pid_ ? st : 0;
      break;
    }
    int left = -1;
    if (timeout_ms >= 0) {
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (ms <= 0) return false;
      left = static_cast<int>(ms);
    }
    pollfd p{sigfd_, POLLIN, 0};
    poll(&p, 1, left);
    signalfd_siginfo si;
    while (read(sigfd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
      if (si.ssi_signo == SIGCHLD) continue;
      // From the terminal (SI_KERNEL) the child, in our process group, got it too.
      if (si.ssi_code != SI_KERNEL) kill(pid_, static_cast<int>(si.ssi_signo));
    }
  }
  return true;
}

int Supervisor::exit_code() const noexcept {
  if (WIFEXITED(status_)) return WEXITSTATUS(status_);
  if (WIFSIGNALED(status_)) return 128 + WTERMSIG(status_);
  return 1;
}

std::string Supervisor::describe() const {
  if (WIFSIGNALED(status_)) {
    const char* abbrev = sigabbrev_np(WTERMSIG(status_));
    return std::string("was killed by ") + (abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(WTERMSIG(status_)));
  }
  return "exited with status " + std::to_string(exit_code());
}

std::string shell_quote(const std::string& s) {
  const bool plain = !s.empty() && s.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-") ==
                                       std::string::npos;
  if (plain) return s;
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string absolute(const std::string& p) {
  if (!p.empty() && p.front() == '/') return p;
  char buf[PATH_MAX];
  if (!getcwd(buf, sizeof buf)) return p;
  return std::string(buf) + "/" + p;
}

}  // namespace tramway::cli
