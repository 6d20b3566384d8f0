// The control protocol: parsing and formatting (no I/O), socket paths and the directory check.
#include "agent/control.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace tramway::control {
namespace {

constexpr std::string_view kRequests =
    "attach GLOB, detach GLOB, status, stop, list [GLOB], list-all [GLOB], option NAME [VALUE], start FILE, eject";

std::string_view trim(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}

// Replies are line-framed: a message must stay on its line.
std::string one_line(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return out;
}

std::string octal_mode(mode_t mode) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(mode & 07777));
  return buf;
}

}  // namespace

const char* verb_name(Verb verb) {
  switch (verb) {
    case Verb::attach: return "attach";
    case Verb::detach: return "detach";
    case Verb::status: return "status";
    case Verb::stop: return "stop";
    case Verb::list: return "list";
    case Verb::list_all: return "list-all";
    case Verb::start: return "start";
    case Verb::eject: return "eject";
    case Verb::option: return "option";
  }
  return "?";
}

Result<Request> parse_request(std::string_view line) {
  if (line.size() > kMaxRequest) {
    return Status::error("request longer than " + std::to_string(kMaxRequest) + " bytes");
  }
  for (std::size_t i = 0; i < line.size(); ++i) {
    const auto c = static_cast<unsigned char>(line[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "request contains a control character (byte 0x%02x at offset %zu)", c, i);
      return Status::error(buf);
    }
  }
  line = trim(line);
  if (line.empty()) return Status::error("empty request (requests: " + std::string(kRequests) + ")");
  const std::size_t space = line.find(' ');
  const std::string_view word = line.substr(0, space);
  const std::string_view arg = space == std::string_view::npos ? std::string_view() : trim(line.substr(space));

  Request r;
  if (word == "attach") r.verb = Verb::attach;
  else if (word == "detach") r.verb = Verb::detach;
  else if (word == "status") r.verb = Verb::status;
  else if (word == "stop") r.verb = Verb::stop;
  else if (word == "list") r.verb = Verb::list;
  else if (word == "list-all") r.verb = Verb::list_all;
  else if (word == "start") r.verb = Verb::start;
  else if (word == "eject") r.verb = Verb::eject;
  else if (word == "option") r.verb = Verb::option;
  else {
    std::string shown(word.substr(0, 64));
    return Status::error("unknown request '" + shown + "' (requests: " + std::string(kRequests) + ")");
  }
  switch (r.verb) {
    case Verb::attach:
    case Verb::detach:
      if (arg.empty()) return Status::error(std::string(word) + " needs a glob, e.g. '" + std::string(word) + " app::*'");
      break;
    case Verb::status:
    case Verb::stop:
    case Verb::eject:
      if (!arg.empty()) return Status::error(std::string(word) + " takes no argument");
      break;
    case Verb::list:
    case Verb::list_all:
      break;
    case Verb::start:
      if (arg.empty() || arg.front() != '/') return Status::error("start needs an absolute file name, e.g. 'start /tmp/app.trace'");
      break;
    case Verb::option:
      if (arg.empty()) {
        return Status::error("option needs a name: exclude GLOB, max-depth N, min-duration NS or trap");
      }
      break;
  }
  r.arg = std::string(arg);
  return r;
}

std::string format_request(const Request& request) {
  std::string out = verb_name(request.verb);
  if (!request.arg.empty()) out += ' ' + one_line(request.arg);
  out += '\n';
  return out;
}

Reply Reply::success(std::string text, std::vector<std::string> lines) {
  Reply r;
  r.ok = true;
  r.text = std::move(text);
  r.lines = std::move(lines);
  return r;
}

Reply Reply::failure(std::string message) {
  Reply r;
  r.text = std::move(message);
  return r;
}

std::string format_reply(const Reply& reply) {
  if (!reply.ok) return "error: " + one_line(reply.text) + "\n";
  std::string out = "ok";
  // A payload is announced by "+N"; a text that happens to start with '+' gets an explicit +0.
  if (!reply.lines.empty() || (!reply.text.empty() && reply.text.front() == '+')) {
    out += " +" + std::to_string(reply.lines.size());
  }
  if (!reply.text.empty()) out += ' ' + one_line(reply.text);
  out += '\n';
  for (const std::string& l : reply.lines) out += one_line(l) + '\n';
  return out;
}

std::optional<Result<Reply>> parse_reply(std::string_view wire, std::size_t* consumed) {
  const std::size_t eol = wire.find('\n');
  if (eol == std::string_view::npos) return std::nullopt;
  const std::string_view first = wire.substr(0, eol);
  std::size_t pos = eol + 1;
  auto done = [&](Reply r) -> std::optional<Result<Reply>> {
    if (consumed) *consumed = pos;
    return Result<Reply>(std::move(r));
  };
  if (first.substr(0, 6) == "error:") return done(Reply::failure(std::string(trim(first.substr(6)))));
  if (first == "ok") return done(Reply::success());
  if (first.substr(0, 3) != "ok ") {
    return Result<Reply>(Status::error("malformed reply from the agent: '" + std::string(first.substr(0, 80)) + "'"));
  }
  std::string_view rest = first.substr(3);
  if (rest.empty() || rest.front() != '+') return done(Reply::success(std::string(rest)));
  std::size_t count = 0;
  const char* begin = rest.data() + 1;
  const char* end = rest.data() + rest.size();
  const auto [p, ec] = std::from_chars(begin, end, count);
  if (ec != std::errc() || p == begin || (p != end && *p != ' ')) {
    return Result<Reply>(Status::error("malformed reply from the agent: '" + std::string(first.substr(0, 80)) + "'"));
  }
  Reply r = Reply::success(std::string(trim(std::string_view(p, static_cast<std::size_t>(end - p)))));
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t nl = wire.find('\n', pos);
    if (nl == std::string_view::npos) return std::nullopt;
    r.lines.emplace_back(wire.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return done(std::move(r));
}

LineBuffer::Next LineBuffer::next(std::string& line) {
  const std::size_t eol = buf_.find('\n');
  if (eol == std::string::npos) {
    // No newline yet: more than a maximal line (plus its '\r') can never become a valid one.
    return buf_.size() > kMaxRequest + 1 ? Next::overflow : Next::need_more;
  }
  std::size_t len = eol;
  if (len > 0 && buf_[len - 1] == '\r') --len;
  const bool too_long = len > kMaxRequest;
  if (!too_long) line.assign(buf_, 0, len);
  buf_.erase(0, eol + 1);
  return too_long ? Next::too_long : Next::line;
}

std::vector<std::string> socket_dirs(const char* xdg_runtime_dir, uid_t uid) {
  std::vector<std::string> dirs;
  // The XDG spec says to ignore a relative XDG_RUNTIME_DIR.
  if (xdg_runtime_dir && xdg_runtime_dir[0] == '/') {
    std::string d = xdg_runtime_dir;
    while (d.size() > 1 && d.back() == '/') d.pop_back();
    dirs.push_back(d + "/tramway");
  }
  dirs.push_back("/tmp/tramway-" + std::to_string(uid));
  return dirs;
}

std::vector<std::string> socket_dirs() { return socket_dirs(std::getenv("XDG_RUNTIME_DIR"), geteuid()); }

std::string socket_path(const std::string& dir, pid_t pid) { return dir + "/" + std::to_string(pid) + ".sock"; }

Status check_private_dir(const std::string& dir, const struct stat& st, uid_t uid) {
  const std::string what = "the control socket directory " + dir;
  const std::string refuse = "; refusing to use it";
  if (S_ISLNK(st.st_mode)) return Status::error(what + " is a symbolic link" + refuse + " (remove it)");
  if (!S_ISDIR(st.st_mode)) return Status::error(what + " is not a directory" + refuse + " (remove it)");
  if (st.st_uid != uid) {
    return Status::error(what + " is owned by uid " + std::to_string(st.st_uid) + ", not by uid " +
                         std::to_string(uid) + refuse + " (someone else created it: remove it as root, or set XDG_RUNTIME_DIR)");
  }
  if ((st.st_mode & 077) != 0) {
    return Status::error(what + " is accessible by group or others (mode " + octal_mode(st.st_mode) + ")" + refuse +
                         " (run `chmod 700 " + dir + "`)");
  }
  return {};
}

Status ensure_private_dir(const std::string& dir, uid_t uid) {
  if (mkdir(dir.c_str(), 0700) == 0) {
    // The umask may have taken bits away: 0700 exactly, so that we can use it.
    if (chmod(dir.c_str(), 0700) != 0) {
      const int e = errno;
      return Status::error("cannot set the mode of " + dir + ": " + std::strerror(e), e);
    }
  } else if (errno != EEXIST) {
    const int e = errno;
    return Status::error("cannot create the control socket directory " + dir + ": " + std::strerror(e), e);
  }
  struct stat st;
  if (lstat(dir.c_str(), &st) != 0) {
    const int e = errno;
    return Status::error("cannot inspect " + dir + ": " + std::strerror(e), e);
  }
  return check_private_dir(dir, st, uid);
}

std::string permission_denied_message(uid_t uid) {
  return "permission denied (tramway control socket accepts only uid " + std::to_string(uid) + ")";
}

std::string function_line(const std::string& name, std::uintptr_t entry, const std::string& object) {
  char addr[32];
  std::snprintf(addr, sizeof addr, "0x%" PRIxPTR, entry);
  return (name.empty() ? std::string("(unnamed)") : name) + '\t' + addr + '\t' + object;
}

}  // namespace tramway::control
