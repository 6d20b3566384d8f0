// The control socket's server (a poll loop on its own thread) and client.
#include "agent/control_io.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <sstream>

#include "common/own_stack.h"

namespace tramway::control {
namespace {

using Clock = std::chrono::steady_clock;

Status sys_error(const std::string& what) {
  const int e = errno;
  return Status::error(what + ": " + std::strerror(e), e);
}

Result<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    return Status::error("the control socket path " + path + " is longer than " +
                         std::to_string(sizeof addr.sun_path - 1) + " bytes (set XDG_RUNTIME_DIR to a shorter directory)");
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

// Writes everything or gives up after timeout_ms; never raises SIGPIPE.
bool write_all(int fd, std::string_view data, unsigned timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!data.empty()) {
    const ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return false;
      pollfd p{fd, POLLOUT, 0};
      if (poll(&p, 1, static_cast<int>(left)) < 0 && errno != EINTR) return false;
      continue;
    }
    return false;
  }
  return true;
}

struct Client {
  int fd = -1;
  LineBuffer buf;
  Clock::time_point deadline;
  bool partial = false;  // part of a request line has arrived
  bool closed = false;
};

}  // namespace


struct Server::Impl {
  Handler handler;
  ServerOptions opt;
  std::string path;
  int listen_fd = -1;
  int wake[2] = {-1, -1};
  common::OwnStackThread thread;
  bool running = false;
  std::atomic<bool> ended{false};  // the loop ended by itself, after a reply marked `last`
  bool last_sent = false;          // the server thread's
  pid_t owner = 0;
  uid_t uid = 0;
  std::vector<Client> clients;

  static void* main(void* self) {
    static_cast<Impl*>(self)->loop();
    return nullptr;
  }

  void reply(Client& c, const Reply& r) {
    if (!write_all(c.fd, format_reply(r), opt.write_timeout_ms)) c.closed = true;
  }
  void reply_and_close(Client& c, const std::string& message) {
    reply(c, Reply::failure(message));
    c.closed = true;
  }

  Reply handle(const std::string& line) {
    Result<Request> req = parse_request(line);
    if (!req.ok()) return Reply::failure(req.status().message());
    return handler(*req);
  }

  void accept_all() {
    for (;;) {
      const int fd = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;  // EAGAIN, or a connection that went away: nothing to do
      Client c;
      c.fd = fd;
      ucred cred{};
      socklen_t len = sizeof cred;
      if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || (cred.uid != uid && cred.uid != 0)) {
        reply_and_close(c, permission_denied_message(uid));
      } else if (clients.size() >= opt.max_clients) {
        reply_and_close(c, "too many connections (" + std::to_string(opt.max_clients) + "); try again later");
      } else {
        c.deadline = Clock::now() + std::chrono::milliseconds(opt.idle_timeout_ms);
        clients.push_back(std::move(c));
        continue;
      }
      close(fd);
    }
  }

  void read_from(Client& c) {
    char chunk[8192];
    const ssize_t n = recv(c.fd, chunk, sizeof chunk, 0);
    if (n < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) c.closed = true;
      return;
    }
    if (n == 0) {
      if (!c.buf.empty()) reply(c, Reply::failure("truncated request (the connection ended before its newline)"));
      c.closed = true;
      return;
    }
    c.buf.append(std::string_view(chunk, static_cast<std::size_t>(n)));
    std::string line;
    while (!c.closed) {
      const LineBuffer::Next next = c.buf.next(line);
      if (next == LineBuffer::Next::need_more) break;
      if (next == LineBuffer::Next::line) {
        const Reply r = handle(line);
        reply(c, r);
        if (r.last) {
          last_sent = true;
          return;  // nothing more is read: the server ends
        }
      } else if (next == LineBuffer::Next::too_long) {
        reply(c, Reply::failure("request longer than " + std::to_string(kMaxRequest) + " bytes"));
      } else {
        reply_and_close(c, "request longer than " + std::to_string(kMaxRequest) + " bytes (no newline); closing");
      }
    }
    const auto now = Clock::now();
    if (c.buf.empty()) {
      c.partial = false;
      c.deadline = now + std::chrono::milliseconds(opt.idle_timeout_ms);
    } else if (!c.partial) {
      c.partial = true;
      c.deadline = now + std::chrono::milliseconds(opt.line_timeout_ms);
    }
  }

  void loop() {
    std::vector<pollfd> fds;
    for (;;) {
      fds.clear();
      fds.push_back({wake[0], POLLIN, 0});
      fds.push_back({listen_fd, POLLIN, 0});
      auto next_deadline = Clock::time_point::max();
      for (const Client& c : clients) {
        fds.push_back({c.fd, POLLIN, 0});
        next_deadline = std::min(next_deadline, c.deadline);
      }
      int timeout = -1;
      if (next_deadline != Clock::time_point::max()) {
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(next_deadline - Clock::now()).count();
        timeout = static_cast<int>(std::clamp<long long>(ms + 1, 0, 1 << 30));
      }
      if (poll(fds.data(), fds.size(), timeout) < 0 && errno != EINTR) {
        // Cannot happen with valid descriptors; back off rather than spin.
        usleep(10000);
        continue;
      }
      if (fds[0].revents) return;
      // Clients first: those accepted now have no pollfd entry yet.
      for (std::size_t i = 0; i < clients.size(); ++i) {
        if (fds[i + 2].revents) read_from(clients[i]);
      }
      if (last_sent) {
        // The agent is leaving (eject): every connection is closed and the socket removed now,
        // by this thread, which then ends; stop() only joins it.
        unlink(path.c_str());
        close_fds();
        ended.store(true, std::memory_order_release);
        return;
      }
      if (fds[1].revents & POLLIN) accept_all();
      const auto now = Clock::now();
      for (Client& c : clients) {
        if (c.closed || now < c.deadline) continue;
        reply_and_close(c, c.partial ? "request timed out (no newline within " + std::to_string(opt.line_timeout_ms) + " ms)"
                                     : "connection idle for " + std::to_string(opt.idle_timeout_ms / 1000) + " s; closing");
      }
      for (Client& c : clients) {
        if (c.closed) close(c.fd);
      }
      std::erase_if(clients, [](const Client& c) { return c.closed; });
    }
  }

  void close_fds() {
    for (Client& c : clients) close(c.fd);
    clients.clear();
    for (int* fd : {&listen_fd, &wake[0], &wake[1]}) {
      if (*fd >= 0) close(*fd);
      *fd = -1;
    }
  }
};

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() { stop(); }
const std::string& Server::path() const noexcept { return impl_->path; }
bool Server::ended() const noexcept { return impl_->ended.load(std::memory_order_acquire); }

void Server::stop() {
  Impl& s = *impl_;
  if (s.owner != getpid()) {  // a fork()ed child: no thread here, and the socket is the parent's
    s.running = false;
    s.close_fds();
    return;
  }
  if (s.running) {
    const char byte = 1;
    while (!s.ended.load(std::memory_order_acquire) && write(s.wake[1], &byte, 1) < 0 && errno == EINTR) {
    }
    s.thread.join();
    s.running = false;
  }
  if (s.listen_fd >= 0) unlink(s.path.c_str());
  s.close_fds();
}

namespace {

// Binds a listening socket at `path` in a private directory. It is bound and listening under a
// temporary name first and then renamed: a client that sees `path` can connect at once (between
// bind and listen it would be refused). A socket file left at `path` by a dead process of the
// same pid is replaced; one that still answers is not.
Result<int> listen_at(const std::string& path) {
  Result<sockaddr_un> addr = unix_address(path);
  if (!addr.ok()) return addr.status();
  const std::size_t slash = path.rfind('/');
  const std::string temp = path.substr(0, slash + 1) + "." + path.substr(slash + 1) + ".new";
  Result<sockaddr_un> temp_addr = unix_address(temp);
  if (!temp_addr.ok()) return temp_addr.status();

  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    const int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const bool live = probe >= 0 && connect(probe, reinterpret_cast<const sockaddr*>(&*addr), sizeof *addr) == 0;
    if (probe >= 0) close(probe);
    if (live) return Status::error("another agent serves " + path + " (a process of the same pid in another pid namespace?)");
  }
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return sys_error("cannot create the control socket");
  unlink(temp.c_str());
  if (bind(fd, reinterpret_cast<const sockaddr*>(&*temp_addr), sizeof *temp_addr) != 0) {
    Status s = sys_error("cannot bind the control socket " + temp);
    close(fd);
    return s;
  }
  // The directory is 0700 already; 0600 on the socket says the same to anyone who looks.
  if (chmod(temp.c_str(), 0600) != 0 || listen(fd, 16) != 0 || rename(temp.c_str(), path.c_str()) != 0) {
    Status s = sys_error("cannot set up the control socket " + path);
    unlink(temp.c_str());
    close(fd);
    return s;
  }
  return fd;
}

}  // namespace

Result<std::unique_ptr<Server>> Server::start(Handler handler, ServerOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->handler = std::move(handler);
  impl->opt = std::move(options);
  impl->owner = getpid();
  impl->uid = geteuid();
  std::vector<std::string> dirs = impl->opt.dirs.empty() ? socket_dirs() : impl->opt.dirs;

  // A directory we cannot create (XDG_RUNTIME_DIR gone) falls through to the next one; one that
  // exists but is not private is refused: someone may be waiting for us to use it.
  Status last;
  std::string dir;
  for (const std::string& d : dirs) {
    last = ensure_private_dir(d, impl->uid);
    if (last.ok()) {
      dir = d;
      break;
    }
    if (last.sys_errno() == 0) return last;
  }
  if (dir.empty()) return last;
  impl->path = socket_path(dir, impl->owner);
  Result<int> fd = listen_at(impl->path);
  if (!fd.ok()) return fd.status();
  impl->listen_fd = *fd;
  if (pipe2(impl->wake, O_CLOEXEC) != 0) {
    Status s = sys_error("cannot create the control thread's wake-up pipe");
    unlink(impl->path.c_str());
    impl->close_fds();
    return s;
  }

  // Block everything so that no signal meant for the program is delivered here (tramway's
  // pthread_sigmask keeps its own SIGTRAP and fix-up signal open).
  sigset_t all;
  sigfillset(&all);
  const int err = impl->thread.start(&Impl::main, impl.get(), &all);
  if (err != 0) {
    unlink(impl->path.c_str());
    impl->close_fds();
    return Status::error(std::string("cannot start the control thread: ") + std::strerror(err), err);
  }
  pthread_setname_np(impl->thread.handle(), "tramway-ctl");
  impl->running = true;
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

// ---- client ----

namespace {

std::string read_small_file(const std::string& path) {
  std::string text;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return text;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0 && text.size() < (1u << 20)) text.append(buf, static_cast<std::size_t>(n));
  close(fd);
  return text;
}

// The socket of `pid` in the directories we look in, if there is one.
std::string socket_of(pid_t pid) {
  for (const std::string& dir : socket_dirs()) {
    const std::string path = socket_path(dir, pid);
    struct stat st;
    if (lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return path;
  }
  return {};
}

// Why `pid`, which exists, has no socket, and which pid to use instead when there is one: the
// `tramway run` or `record` supervisor's own pid is the usual mistake, and its child has the agent.
std::string no_agent_in(pid_t pid) {
  std::string comm = read_small_file("/proc/" + std::to_string(pid) + "/comm");
  while (!comm.empty() && comm.back() == '\n') comm.pop_back();
  const std::string who = "process " + std::to_string(pid) + (comm.empty() ? "" : " (" + comm + ")");
  std::istringstream children(read_small_file("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children"));
  for (long child; children >> child;) {
    if (socket_of(static_cast<pid_t>(child)).empty()) continue;
    const std::string c = std::to_string(child);
    return who + " is running but has no tramway agent loaded: it is " +
           (comm == "tramway" ? "the tramway command supervising" : "the parent of") + " process " + c +
           ", which has the agent; use that pid (e.g. `tramway live " + c + " status`)";
  }
  return who + " is running but has no tramway agent loaded (`tramway live " + std::to_string(pid) +
         " attach GLOB` loads one into it; or start the program with `tramway run -- PROG` or `tramway record`)";
}

}  // namespace

Result<std::string> find_socket(pid_t pid) {
  if (kill(pid, 0) != 0) {
    if (errno == ESRCH) return Status::error("no process " + std::to_string(pid), ESRCH);
    if (errno == EPERM) {
      return Status::error("process " + std::to_string(pid) + " belongs to another user (tramway talks to your own processes only)", EPERM);
    }
  }
  for (const std::string& dir : socket_dirs()) {
    struct stat st;
    if (lstat(dir.c_str(), &st) != 0) continue;
    if (Status s = check_private_dir(dir, st, geteuid()); !s.ok()) return s;
    const std::string path = socket_path(dir, pid);
    if (lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return path;
  }
  return Status::error(no_agent_in(pid));
}

Result<Connection> Connection::open_path(const std::string& path, unsigned timeout_ms) {
  Result<sockaddr_un> addr = unix_address(path);
  if (!addr.ok()) return addr.status();
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return sys_error("cannot create a socket");
  timeval tv{static_cast<time_t>(timeout_ms / 1000), static_cast<suseconds_t>((timeout_ms % 1000) * 1000)};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(fd, reinterpret_cast<const sockaddr*>(&*addr), sizeof *addr) != 0) {
    const int e = errno;
    close(fd);
    if (e == ECONNREFUSED || e == ENOENT) {
      return Status::error("nobody serves " + path + " (the agent's process has exited?)", e);
    }
    return Status::error("cannot connect to " + path + ": " + std::strerror(e), e);
  }
  return Connection(fd, timeout_ms);
}

Result<Connection> Connection::open(pid_t pid, unsigned timeout_ms) {
  Result<std::string> path = find_socket(pid);
  if (!path.ok()) return path.status();
  Result<Connection> c = open_path(*path, timeout_ms);
  if (!c.ok()) {
    // A socket nobody serves was left by a process that died without cleaning up.
    if (c.status().sys_errno() == ECONNREFUSED) return Status::error(no_agent_in(pid));
    return c.status();
  }
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(c->fd(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && cred.pid != pid) {
    return Status::error(*path + " is served by process " + std::to_string(cred.pid) + ", not " + std::to_string(pid));
  }
  return c;
}

Connection::Connection(Connection&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), timeout_ms_(other.timeout_ms_), buf_(std::move(other.buf_)) {}

Connection& Connection::operator=(Connection&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    timeout_ms_ = other.timeout_ms_;
    buf_ = std::move(other.buf_);
  }
  return *this;
}

Connection::~Connection() {
  if (fd_ >= 0) close(fd_);
}

Status Connection::send_raw(std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Status::error("the agent did not take the request in time", errno);
      return sys_error("cannot send to the agent");
    }
    bytes.remove_prefix(static_cast<std::size_t>(n));
  }
  return {};
}

Result<Reply> Connection::read_reply() {
  constexpr std::size_t kMaxReply = std::size_t{64} << 20;
  for (;;) {
    std::size_t used = 0;
    if (auto r = parse_reply(buf_, &used)) {
      if (r->ok()) buf_.erase(0, used);
      return std::move(*r);
    }
    if (buf_.size() > kMaxReply) return Status::error("the agent's reply is larger than 64 MiB");
    char chunk[16384];
    const ssize_t n = recv(fd_, chunk, sizeof chunk, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return Status::error("no reply from the agent within " + std::to_string(timeout_ms_ / 1000) + " s", ETIMEDOUT);
    }
    if (n < 0) return sys_error("cannot read from the agent");
    if (n == 0) return Status::error("the agent closed the connection before replying");
    buf_.append(chunk, static_cast<std::size_t>(n));
  }
}

Result<Reply> Connection::call(const Request& request) {
  if (Status s = send_raw(format_request(request)); !s.ok()) {
    // The agent may have refused us and closed before our request went out: its reason is
    // worth more than EPIPE.
    Result<Reply> r = read_reply();
    return r.ok() ? r : Result<Reply>(s);
  }
  return read_reply();
}

void Connection::shutdown_write() { ::shutdown(fd_, SHUT_WR); }

}  // namespace tramway::control
