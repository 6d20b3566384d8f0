// agent/control_io.h — the control socket's I/O: the agent's server and the client the
// `tramway` command uses. The protocol itself (framing, requests, paths) is control.h.
//
// Server guarantees: the socket is PID.sock in the first usable directory of socket_dirs()
// (created 0700; an existing one must be ours and closed to group and others, else start()
// refuses), mode 0600, served by one thread that blocks every signal. Every connection's peer
// uid (SO_PEERCRED) must equal our effective uid or be root's (who may ptrace the process
// anyway), else it gets an `error:` reply and is closed. A reply marked `last` (eject) is the
// server's last: it then closes every connection, removes the socket and its thread ends.
// A bad request gets an `error:` reply; an over-long, truncated or too slow one also closes its
// connection; no request can stop the server. Connections are multiplexed with poll(), so a
// stuck client delays others at most while a reply to it is written (write_timeout_ms). Requests
// run one at a time, on the server thread. stop() (or the destructor) joins the thread and
// removes the socket file — in the process that started it only, so a fork()ed child's exit
// leaves the parent's socket alone.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "agent/control.h"
#include "tramway/status.h"

namespace tramway::control {

struct ServerOptions {
  unsigned line_timeout_ms = 5000;    // a request line must be complete this long after its first byte
  unsigned idle_timeout_ms = 600000;  // a connection with nothing pending is closed after this
  unsigned write_timeout_ms = 5000;   // a reply must be accepted by the client within this
  std::size_t max_clients = 16;
  std::vector<std::string> dirs;      // where to create the socket; empty: socket_dirs()
};

class Server {
 public:
  using Handler = std::function<Reply(const Request&)>;  // runs on the server thread; must not throw

  static Result<std::unique_ptr<Server>> start(Handler handler, ServerOptions options = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  void stop();
  const std::string& path() const noexcept;
  // The server ended by itself after a reply marked `last`: stop() only joins its thread.
  bool ended() const noexcept;

  struct Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The socket of process `pid`, or an error that says why there is none (no such process, no
// agent in it, an unsafe directory).
Result<std::string> find_socket(pid_t pid);

// A client connection. Every call waits at most `timeout_ms` for the agent.
class Connection {
 public:
  // Connects to the agent of `pid` and checks that the peer is that process.
  static Result<Connection> open(pid_t pid, unsigned timeout_ms = 60000);
  // Connects to a socket path (no peer check).
  static Result<Connection> open_path(const std::string& path, unsigned timeout_ms = 60000);

  Connection(Connection&& other) noexcept;
  Connection& operator=(Connection&& other) noexcept;
  ~Connection();

  Result<Reply> call(const Request& request);
  Status send_raw(std::string_view bytes);  // for tests: anything, framed or not
  Result<Reply> read_reply();
  void shutdown_write();
  int fd() const noexcept { return fd_; }

 private:
  Connection(int fd, unsigned timeout_ms) : fd_(fd), timeout_ms_(timeout_ms) {}
  int fd_ = -1;
  unsigned timeout_ms_ = 0;
  std::string buf_;
};

}  // namespace tramway::control
