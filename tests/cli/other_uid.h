// Test helper: a request to a control socket from another uid, for the SO_PEERCRED checks.
#pragma once

#include <linux/securebits.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

// Sends `request` (a line, with its '\n') to the socket at `path` as uid/gid 65534, from a child
// that keeps root's capabilities across setuid (SECBIT_NO_SETUID_FIXUP) so that the 0700
// directory lets it through and only the peer-credential check can refuse it. Returns what
// the child read back, or what went wrong. Needs root.
inline std::string request_as_other_uid(const std::string& path, const std::string& request) {
  int p[2];
  if (pipe(p) != 0) return "pipe failed";
  const pid_t pid = fork();
  if (pid == 0) {
    close(p[0]);
    std::string reply = "child setup failed";
    if (prctl(PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP) == 0 && setresgid(65534, 65534, 65534) == 0 &&
        setresuid(65534, 65534, 65534) == 0) {
      const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
      if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        reply = std::string("connect failed: ") + std::strerror(errno);
      } else {
        (void)!send(fd, request.data(), request.size(), MSG_NOSIGNAL);  // the server may have closed already
        char buf[512];
        ssize_t n, total = 0;
        while ((n = read(fd, buf + total, sizeof buf - 1 - total)) > 0) total += n;
        reply.assign(buf, static_cast<std::size_t>(total));
      }
    }
    (void)!write(p[1], reply.data(), reply.size());
    _exit(0);
  }
  close(p[1]);
  std::string out;
  char buf[512];
  ssize_t n;
  while ((n = read(p[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(n));
  close(p[0]);
  waitpid(pid, nullptr, 0);
  return out;
}
