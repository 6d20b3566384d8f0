// agent/control.h — the control protocol of the tramway agent: requests, replies and where
// the socket lives. Pure code (no socket I/O; control_io.h does that), shared by the agent and
// the `tramway` command so both agree on names, paths and framing, and unit-testable.
//
// Wire protocol (a Unix stream socket, text, '\n'-terminated lines):
//   request   one line of at most kMaxRequest bytes (without the '\n'; one trailing '\r' is
//             dropped), printable: `attach GLOB` | `detach GLOB` | `status` | `stop` |
//             `list [GLOB]` | `list-all [GLOB]` (every kind: `tramway list --all`) |
//             `option exclude GLOB` | `option max-depth N` | `option min-duration NS` |
//             `option trap` (each for the next `start` only, on top of the agent's defaults) |
//             `start FILE` (FILE absolute) | `eject` (the agent puts the process back as it was
//             and its server ends after the reply: see agent/eject.h).
//   reply     one per request. Its first line is `error: MESSAGE`, `ok`, `ok TEXT`, or
//             `ok +N[ TEXT]`: then exactly N more lines follow (the payload of `list`,
//             `list-all` and `status`). Messages never contain a newline.
// Guarantees: parse_request accepts only the requests above and says what is wrong with any
// other line; format_reply/parse_reply round-trip; the socket directory is used only when it
// is a real directory owned by the user and closed to group and others.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tramway/status.h"

namespace tramway::control {

inline constexpr std::size_t kMaxRequest = 4096;  // bytes in a request line, without '\n'

enum class Verb { attach, detach, status, stop, list, start, list_all, eject, option };

struct Request {
  Verb verb = Verb::status;
  std::string arg;  // the glob or file; empty when the verb takes none
};

// Parses one request line (without its '\n'). Errors are meant to be sent back as replies.
Result<Request> parse_request(std::string_view line);
// The wire form of a request, '\n' included.
std::string format_request(const Request& request);
const char* verb_name(Verb verb);

struct Reply {
  bool ok = false;
  std::string text;                 // after "ok " or "error: "
  std::vector<std::string> lines;   // payload (ok replies only)
  bool last = false;                // not on the wire: the server ends once this reply is written (eject)

  static Reply success(std::string text = {}, std::vector<std::string> lines = {});
  static Reply failure(std::string message);
};

// The wire form of a reply; newlines inside the text or payload lines become spaces.
std::string format_reply(const Reply& reply);

// Parses a reply from the start of `wire`. Returns nullopt while the reply is incomplete (the
// caller reads more), a failed Result if it is malformed, and sets `consumed` to its length.
std::optional<Result<Reply>> parse_reply(std::string_view wire, std::size_t* consumed = nullptr);

// Splits a byte stream into request lines and enforces kMaxRequest.
class LineBuffer {
 public:
  // line: `line` holds the next one (without '\n' and one trailing '\r').
  // too_long: a complete line over kMaxRequest was dropped; the stream goes on after it.
  // overflow: more than kMaxRequest bytes without a newline; the stream cannot be resynced.
  enum class Next { line, need_more, too_long, overflow };
  void append(std::string_view bytes) { buf_.append(bytes); }
  Next next(std::string& line);
  bool empty() const noexcept { return buf_.empty(); }
  std::size_t size() const noexcept { return buf_.size(); }

 private:
  std::string buf_;
};

// ---- where the socket lives ----

// The directories a socket for `uid` may be in, the preferred first: `$XDG_RUNTIME_DIR/tramway`
// when `xdg_runtime_dir` is an absolute path, then `/tmp/tramway-UID`.
std::vector<std::string> socket_dirs(const char* xdg_runtime_dir, uid_t uid);
// socket_dirs() of this process's environment and effective uid.
std::vector<std::string> socket_dirs();
std::string socket_path(const std::string& dir, pid_t pid);  // DIR/PID.sock

// Checks what lstat() said about a socket directory: a directory (not a symlink), owned by
// `uid`, no permission bits for group or others. The message says how to fix it.
Status check_private_dir(const std::string& dir, const struct stat& st, uid_t uid);
// Creates `dir` (mode 0700) if it is missing, then checks it as above.
Status ensure_private_dir(const std::string& dir, uid_t uid);

// The reply sent to a peer of another uid.
std::string permission_denied_message(uid_t uid);

// The list line of one function: NAME<TAB>0xADDRESS<TAB>OBJECT (also printed by list mode).
std::string function_line(const std::string& name, std::uintptr_t entry, const std::string& object);

}  // namespace tramway::control
