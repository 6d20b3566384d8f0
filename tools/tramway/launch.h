// tools/tramway/launch.h — starting a program with the agent preloaded, and supervising it.
//
// Guarantees: find_program resolves a name the way execvp would (a name with a '/' as is, else
// through PATH) and says "no such program" otherwise; check_preloadable refuses programs the
// loader would run without the agent (static, set-user-ID), so `tramway list` never runs a
// program's main by accident. A Supervisor runs one child with our stdin, stdout and stderr,
// forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT that were sent to us by another process (one that
// came from the terminal reached the child already: it is in our process group) and reports the
// child's exit status as a shell does (128 + signal when killed).
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "tramway/status.h"

namespace tramway::cli {

// The executable `name` names (PATH search like execvp).
Result<std::string> find_program(const std::string& name);

// Fails when the loader would not preload the agent into `path` (shown as `name`).
Status check_preloadable(const std::string& path, const std::string& name);

// The agent and the libraries to preload with it: libtramway first, so that its interposed
// signal functions come before libc's, then the agent (which defines the unwinder wrappers).
struct Agent {
  std::string path;
  std::vector<std::string> preload;
};
Result<Agent> find_agent();

// `path` run with argv `argv` and these variables added to (or replacing those of) our environment.
struct Launch {
  std::string path;
  std::vector<std::string> argv;
  std::vector<std::pair<std::string, std::string>> env;
};
// The Launch that runs `argv` (argv[0] already resolved to `path`) with the agent preloaded
// after any LD_PRELOAD the user has.
Launch with_agent(const Agent& agent, const std::string& path, std::vector<std::string> argv);

class Supervisor {
 public:
  static Result<Supervisor> start(const Launch& launch);
  Supervisor(Supervisor&& other) noexcept;
  Supervisor& operator=(Supervisor&&) = delete;
  ~Supervisor();

  pid_t pid() const noexcept { return pid_; }
  // Runs `f` once the child has exited but before it is reaped: its pid cannot have been
  // reused yet, so what `f` removes under that pid was the child's.
  void before_reap(std::function<void(pid_t)> f) { before_reap_ = std::move(f); }
  // Waits up to timeout_ms (-1: for ever) for the child to exit, forwarding signals. True once it has.
  bool wait(int timeout_ms);
  bool exited() const noexcept { return done_; }
  int wait_status() const noexcept { return status_; }
  // Its exit code, or 128 + the signal that killed it.
  int exit_code() const noexcept;
  // "exited with status N" / "was killed by SIGTERM".
  std::string describe() const;

 private:
  Supervisor() = default;
  pid_t pid_ = -1;
  int sigfd_ = -1;
  bool done_ = false;
  int status_ = 0;
  bool restore_mask_ = false;
  sigset_t old_mask_{};  // restored when the child is gone
  std::function<void(pid_t)> before_reap_;
};

// `s` quoted for a POSIX shell when it needs it (for the commands we suggest).
std::string shell_quote(const std::string& s);
// `p` made absolute against the current directory.
std::string absolute(const std::string& p);

}  // namespace tramway::cli
