#include "child.h"

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <regex>

namespace tramway_bench {

std::string start_child(const std::vector<std::string>& argv, RunningChild& child) {
  int fds[2];
  if (pipe(fds) != 0) return "pipe failed";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  posix_spawn_file_actions_addclose(&actions, fds[1]);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  const int rc = posix_spawnp(&pid, args[0], &actions, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    return "cannot run " + argv[0] + ": " + std::strerror(rc);
  }
  child = {pid, fds[0]};
  return {};
}

std::string finish_child(RunningChild& child, std::string& out, const std::string& name) {
  std::array<char, 4096> buf;
  for (ssize_t n; (n = read(child.out, buf.data(), buf.size())) != 0;) {
    if (n > 0) out.append(buf.data(), static_cast<std::size_t>(n));
    else if (errno != EINTR) break;
  }
  close(child.out);
  int status = 0;
  while (waitpid(child.pid, &status, 0) < 0 && errno == EINTR) {
  }
  child = {};
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return name + " failed (wait status " + std::to_string(status) + ")";
  return {};
}

std::string run_child(const std::vector<std::string>& argv, std::string& out) {
  RunningChild child;
  if (std::string e = start_child(argv, child); !e.empty()) return e;
  return finish_child(child, out, argv[0]);
}

std::string sibling(const char* name) {
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path() / name).string();
}

std::string take_child_figures(const std::string& out, const std::vector<ChildFigure>& figures,
                               benchmark::State& state, const std::string& child) {
  static const std::regex line(R"re(\{"name": "([^"]+)", "value": ([^,]+), "unit": "([^"]+)"\})re");
  for (const ChildFigure& f : figures) {
    bool found = false;
    for (auto it = std::sregex_iterator(out.begin(), out.end(), line); it != std::sregex_iterator() && !found; ++it) {
      if ((*it)[1] != f.name) continue;
      if ((*it)[3] != f.unit) return std::string(f.name) + ": unit " + (*it)[3].str() + ", expected " + f.unit;
      state.counters[f.name] = std::strtod((*it)[2].str().c_str(), nullptr);
      found = true;
    }
    if (!found) return child + " printed no figure " + f.name;
  }
  return {};
}

}  // namespace tramway_bench
