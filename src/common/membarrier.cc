// What a membarrier failure means and what the user can do about it (common/membarrier.h).
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/membarrier.h"

namespace tramway::common {
namespace {

// The process's seccomp mode from /proc/self/status (0 none, 1 strict, 2 filter), -1 unknown.
int seccomp_mode() {
  const int fd = ::open("/proc/self/status", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char buf[4096];
  const ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return -1;
  buf[n] = '\0';
  const char* line = std::strstr(buf, "\nSeccomp:");
  return line ? std::atoi(line + 9) : -1;
}

}  // namespace

std::string explain_membarrier_failure(const char* step, int e, const char* needs) {
  std::string m = std::string("membarrier(") + step + ") failed: " + std::strerror(e) + ". ";
  switch (e) {
    case EPERM:
    case EACCES:
      if (seccomp_mode() == 2) {
        return m + "This process runs under a seccomp filter (Seccomp: 2 in /proc/self/status) that refuses it: "
                   "allow the membarrier system call in that filter (a container's seccomp profile, e.g. docker "
                   "--security-opt seccomp=PROFILE; systemd's SystemCallFilter=; the sandbox that started the program)";
      }
      return m + "The kernel refused it although no seccomp filter is set: the process is not registered for it "
                 "(registration belongs to the process's memory, so a fork()ed child registers again), or a "
                 "security module denies it";
    case ENOSYS:
      return m + "This kernel has no membarrier system call (Linux >= 4.3 built with CONFIG_MEMBARRIER has it; " +
             needs + ")";
    case EINVAL:
      return m + "This kernel does not offer the command (" + needs + ")";
    default:
      return m + "(" + needs + ")";
  }
}

}  // namespace tramway::common
