// Unit tests of the agent's control protocol (agent/control.h) and socket (agent/control_io.h):
// request parsing, reply framing, line splitting, socket paths, the directory check, and a
// server in this process facing malformed, over-long, truncated, slow and foreign clients.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "agent/control.h"
#include "agent/control_io.h"
#include "other_uid.h"

namespace {

using namespace tramway::control;
using tramway::Status;

// ---- requests ----

TEST(ParseRequest, AcceptsEveryVerb) {
  struct Case {
    const char* line;
    Verb verb;
    const char* arg;
  } cases[] = {
      {"attach app::*", Verb::attach, "app::*"},   {"detach  parse_* ", Verb::detach, "parse_*"},
      {"status", Verb::status, ""},                {"stop", Verb::stop, ""},
      {"list", Verb::list, ""},                    {"list foo?", Verb::list, "foo?"},
      {"list-all", Verb::list_all, ""},            {"list-all a*", Verb::list_all, "a*"},
      {"start /tmp/x.trace", Verb::start, "/tmp/x.trace"}, {"  status  ", Verb::status, ""},
      {"attach ns::f(int, char)", Verb::attach, "ns::f(int, char)"},
      {"option exclude ns::*", Verb::option, "exclude ns::*"}, {"option trap", Verb::option, "trap"},
  };
  for (const Case& c : cases) {
    auto r = parse_request(c.line);
    ASSERT_TRUE(r.ok()) << c.line << ": " << r.status().message();
    EXPECT_EQ(r->verb, c.verb) << c.line;
    EXPECT_EQ(r->arg, c.arg) << c.line;
  }
}

TEST(ParseRequest, SaysWhatIsWrong) {
  struct Case {
    std::string line;
    const char* message_part;
  } cases[] = {
      {"", "empty request"},
      {"   ", "empty request"},
      {"bogus", "unknown request 'bogus'"},
      {"ATTACH x", "unknown request"},
      {"attach", "attach needs a glob"},
      {"detach   ", "detach needs a glob"},
      {"status now", "status takes no argument"},
      {"stop it", "stop takes no argument"},
      {"start relative.trace", "absolute file name"},
      {"start", "absolute file name"},
      {"option", "option needs a name"},
      {std::string("attach a\0b", 10), "control character (byte 0x00 at offset 8)"},
      {"status\x01", "control character (byte 0x01"},
      {"attach \x7f", "control character (byte 0x7f"},
      {"attach\tx", "control character (byte 0x09"},
  };
  for (const Case& c : cases) {
    auto r = parse_request(c.line);
    ASSERT_FALSE(r.ok()) << c.line;
    EXPECT_NE(r.status().message().find(c.message_part), std::string::npos) << r.status().message();
  }
  // The list of valid requests comes with an unknown one.
  EXPECT_NE(parse_request("help").status().message().find("attach GLOB"), std::string::npos);
}

TEST(ParseRequest, LengthLimitIsExact) {
  const std::string at_limit = "attach " + std::string(kMaxRequest - 7, 'a');
  ASSERT_EQ(at_limit.size(), kMaxRequest);
  EXPECT_TRUE(parse_request(at_limit).ok());
  auto r = parse_request(at_limit + "a");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("longer than 4096 bytes"), std::string::npos);
}

TEST(FormatRequest, RoundTrips) {
  for (const Request& q : {Request{Verb::attach, "a b*"}, Request{Verb::list, ""}, Request{Verb::start, "/x y"},
                           Request{Verb::stop, ""}, Request{Verb::list_all, "b?"}}) {
    const std::string wire = format_request(q);
    ASSERT_EQ(wire.back(), '\n');
    auto r = parse_request(std::string_view(wire).substr(0, wire.size() - 1));
    ASSERT_TRUE(r.ok()) << wire;
    EXPECT_EQ(r->verb, q.verb);
    EXPECT_EQ(r->arg, q.arg);
  }
}

// ---- replies ----

TEST(Reply, FormatsEachForm) {
  EXPECT_EQ(format_reply(Reply::success()), "ok\n");
  EXPECT_EQ(format_reply(Reply::success("attached 'x': 3 functions")), "ok attached 'x': 3 functions\n");
  EXPECT_EQ(format_reply(Reply::failure("no such thing")), "error: no such thing\n");
  EXPECT_EQ(format_reply(Reply::success("functions", {"a", "b"})), "ok +2 functions\na\nb\n");
  EXPECT_EQ(format_reply(Reply::success("", {"a"})), "ok +1\na\n");
  // Text starting with '+' is not mistaken for a payload count.
  EXPECT_EQ(format_reply(Reply::success("+5 points")), "ok +0 +5 points\n");
  // Newlines never break the framing.
  EXPECT_EQ(format_reply(Reply::failure("two\nlines\r")), "error: two lines \n");
  EXPECT_EQ(format_reply(Reply::success("t", {"x\ny"})), "ok +1 t\nx y\n");
}

TEST(Reply, ParsesWhatFormatWrites) {
  for (const Reply& in : {Reply::success(), Reply::success("text"), Reply::failure("bad: very"),
                          Reply::success("functions", {"f\t0x1\t/bin/x", "g\t0x2\t/bin/x"}), Reply::success("", {"only"}),
                          Reply::success("+5 points")}) {
    const std::string wire = format_reply(in) + "trailing";
    std::size_t used = 0;
    auto r = parse_reply(wire, &used);
    ASSERT_TRUE(r.has_value()) << wire;
    ASSERT_TRUE(r->ok()) << r->status().message();
    EXPECT_EQ((*r)->ok, in.ok);
    EXPECT_EQ((*r)->text, in.text);
    EXPECT_EQ((*r)->lines, in.lines);
    EXPECT_EQ(wire.substr(used), "trailing");
  }
}

TEST(Reply, IncompleteAndMalformed) {
  EXPECT_FALSE(parse_reply("").has_value());
  EXPECT_FALSE(parse_reply("ok attached").has_value());
  EXPECT_FALSE(parse_reply("ok +2 functions\na\n").has_value());
  EXPECT_FALSE(parse_reply("ok +2\na\nb").has_value());
  for (const char* bad : {"hello\n", "okay\n", "ok +x\n", "ok +2x\n", "ok +\n"}) {
    auto r = parse_reply(bad);
    ASSERT_TRUE(r.has_value()) << bad;
    EXPECT_FALSE(r->ok()) << bad;
  }
}

// ---- line splitting ----

TEST(LineBuffer, SplitsStripsAndLimits) {
  LineBuffer b;
  std::string line;
  b.append("status\nlist a*\r\nsto");
  ASSERT_EQ(b.next(line), LineBuffer::Next::line);
  EXPECT_EQ(line, "status");
  ASSERT_EQ(b.next(line), LineBuffer::Next::line);
  EXPECT_EQ(line, "list a*");
  EXPECT_EQ(b.next(line), LineBuffer::Next::need_more);
  b.append("p\n");
  ASSERT_EQ(b.next(line), LineBuffer::Next::line);
  EXPECT_EQ(line, "stop");
  EXPECT_TRUE(b.empty());

  // A complete over-long line is dropped and the stream goes on.
  b.append(std::string(kMaxRequest + 1, 'x') + "\nstatus\n");
  EXPECT_EQ(b.next(line), LineBuffer::Next::too_long);
  ASSERT_EQ(b.next(line), LineBuffer::Next::line);
  EXPECT_EQ(line, "status");

  // Exactly the limit, with or without '\r', is fine.
  b.append(std::string(kMaxRequest, 'y') + "\r\n");
  ASSERT_EQ(b.next(line), LineBuffer::Next::line);
  EXPECT_EQ(line.size(), kMaxRequest);

  // Without a newline, more than a line can hold is an overflow.
  LineBuffer c;
  c.append(std::string(kMaxRequest + 1, 'z'));
  EXPECT_EQ(c.next(line), LineBuffer::Next::need_more);  // could still be a line plus '\r'
  c.append("z");
  EXPECT_EQ(c.next(line), LineBuffer::Next::overflow);
}

// ---- paths and the directory check ----

TEST(SocketPaths, XdgFirstThenTmp) {
  EXPECT_EQ(socket_dirs("/run/user/1000", 1000), (std::vector<std::string>{"/run/user/1000/tramway", "/tmp/tramway-1000"}));
  EXPECT_EQ(socket_dirs("/run/user/7//", 7), (std::vector<std::string>{"/run/user/7/tramway", "/tmp/tramway-7"}));
  EXPECT_EQ(socket_dirs("relative/dir", 7), std::vector<std::string>{"/tmp/tramway-7"});
  EXPECT_EQ(socket_dirs("", 7), std::vector<std::string>{"/tmp/tramway-7"});
  EXPECT_EQ(socket_dirs(nullptr, 0), std::vector<std::string>{"/tmp/tramway-0"});
  EXPECT_EQ(socket_path("/tmp/tramway-0", 1234), "/tmp/tramway-0/1234.sock");
}

struct stat fake_stat(mode_t mode, uid_t uid) {
  struct stat st {};
  st.st_mode = mode;
  st.st_uid = uid;
  return st;
}

TEST(PrivateDir, ChecksTypeOwnerAndMode) {
  EXPECT_TRUE(check_private_dir("/d", fake_stat(S_IFDIR | 0700, 42), 42).ok());
  EXPECT_TRUE(check_private_dir("/d", fake_stat(S_IFDIR | 0500, 42), 42).ok());
  auto expect_refused = [](const struct stat& st, const char* part) {
    Status s = check_private_dir("/d", st, 42);
    ASSERT_FALSE(s.ok()) << part;
    EXPECT_NE(s.message().find(part), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("refusing"), std::string::npos) << s.message();
  };
  expect_refused(fake_stat(S_IFDIR | 0750, 42), "group or others (mode 0750)");
  expect_refused(fake_stat(S_IFDIR | 0701, 42), "mode 0701");
  expect_refused(fake_stat(S_IFDIR | 01777, 42), "mode 1777");
  expect_refused(fake_stat(S_IFDIR | 0700, 43), "owned by uid 43, not by uid 42");
  expect_refused(fake_stat(S_IFLNK | 0777, 42), "symbolic link");
  expect_refused(fake_stat(S_IFREG | 0600, 42), "not a directory");
}

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tramway-test-control-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }
  std::string dir_;
};

using EnsurePrivateDir = TempDir;

TEST_F(EnsurePrivateDir, CreatesMode0700WhateverTheUmask) {
  const mode_t old = umask(0277);  // would leave 0500 without the explicit chmod
  Status s = ensure_private_dir(dir_ + "/sock", geteuid());
  umask(old);
  ASSERT_TRUE(s.ok()) << s.message();
  struct stat st;
  ASSERT_EQ(lstat((dir_ + "/sock").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);
  EXPECT_TRUE(ensure_private_dir(dir_ + "/sock", geteuid()).ok());  // existing and fine
}

TEST_F(EnsurePrivateDir, RefusesAnOpenOrForeignDirectory) {
  const std::string d = dir_ + "/open";
  ASSERT_EQ(mkdir(d.c_str(), 0700), 0);
  ASSERT_EQ(chmod(d.c_str(), 0755), 0);
  Status s = ensure_private_dir(d, geteuid());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("chmod 700"), std::string::npos) << s.message();
  EXPECT_FALSE(ensure_private_dir(dir_ + "/sock", geteuid() + 1).ok());
  ASSERT_EQ(symlink(dir_.c_str(), (dir_ + "/link").c_str()), 0);
  EXPECT_FALSE(ensure_private_dir(dir_ + "/link", geteuid()).ok());
  // Missing parent: a system error, so that the server tries its next directory.
  Status missing = ensure_private_dir(dir_ + "/no/such", geteuid());
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.sys_errno(), ENOENT);
}

// ---- the server ----

class ServerTest : public TempDir {
 protected:
  void start(ServerOptions opt = {}) {
    opt.dirs = {dir_ + "/no/such/dir", dir_ + "/sock"};  // the first cannot be created: skipped
    auto s = Server::start(
        [this](const Request& r) {
          handled_.fetch_add(1);
          if (r.verb == Verb::list) return Reply::success("functions", {"a", "b", "c"});
          return Reply::success(std::string(verb_name(r.verb)) + (r.arg.empty() ? "" : " " + r.arg));
        },
        opt);
    ASSERT_TRUE(s.ok()) << s.status().message();
    server_ = std::move(*s);
  }
  Connection connect() {
    auto c = Connection::open_path(server_->path(), 5000);
    EXPECT_TRUE(c.ok()) << c.status().message();
    return std::move(*c);
  }
  std::unique_ptr<Server> server_;
  std::atomic<int> handled_{0};
};

TEST_F(ServerTest, SocketIsPrivateAndRemovedAtStop) {
  start();
  EXPECT_EQ(server_->path(), socket_path(dir_ + "/sock", getpid()));
  struct stat st;
  ASSERT_EQ(lstat(server_->path().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(lstat((dir_ + "/sock").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  const std::string path = server_->path();
  server_->stop();
  EXPECT_NE(lstat(path.c_str(), &st), 0);
}

TEST_F(ServerTest, SocketPathAppearsOnlyOnceItAccepts) {
  // `tramway run` waits for the file and then tells the user to connect: the file must never be
  // there before listen().
  const std::string path = socket_path(dir_ + "/sock", getpid());
  for (int i = 0; i < 500; ++i) {  // the old bind-then-listen order failed within ~150
    std::atomic<bool> connected{false};
    std::thread watcher([&] {
      struct stat st;
      while (lstat(path.c_str(), &st) != 0) {
      }
      auto c = Connection::open_path(path, 2000);
      connected = c.ok();
    });
    start();
    watcher.join();
    ASSERT_TRUE(connected) << "iteration " << i;
    server_->stop();
    server_.reset();
  }
}

TEST_F(ServerTest, RefusesAnOpenDirectory) {
  ASSERT_EQ(mkdir((dir_ + "/open").c_str(), 0755), 0);
  ASSERT_EQ(chmod((dir_ + "/open").c_str(), 0755), 0);
  ServerOptions opt;
  opt.dirs = {dir_ + "/open", dir_ + "/sock"};  // refused, not skipped
  auto s = Server::start([](const Request&) { return Reply::success(); }, opt);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("group or others"), std::string::npos) << s.status().message();
}

TEST_F(ServerTest, RepliesToEachRequestOnOneConnection) {
  start();
  Connection c = connect();
  auto r = c.call({Verb::attach, "app::*"});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->ok);
  EXPECT_EQ(r->text, "attach app::*");
  r = c.call({Verb::list, ""});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->lines, (std::vector<std::string>{"a", "b", "c"}));
  // Several requests in one write, answered in order.
  ASSERT_TRUE(c.send_raw("status\nstop\n").ok());
  r = c.read_reply();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->text, "status");
  r = c.read_reply();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->text, "stop");
}

TEST_F(ServerTest, BadRequestsGetErrorsAndTheConnectionGoesOn) {
  start();
  Connection c = connect();
  for (std::string bad : {std::string("bogus\n"), std::string("attach\n"), std::string("\x01\x02\n"),
                          std::string("status extra\n"), std::string("start rel\n"), std::string("\n"),
                          std::string(kMaxRequest + 10, 'a') + "\n"}) {
    ASSERT_TRUE(c.send_raw(bad).ok());
    auto r = c.read_reply();
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_FALSE(r->ok) << bad.substr(0, 40);
  }
  auto r = c.call({Verb::status, ""});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->ok);
  EXPECT_EQ(handled_.load(), 1);  // only the valid one reached the handler
}

TEST_F(ServerTest, OverflowWithoutNewlineClosesTheConnection) {
  start();
  Connection c = connect();
  ASSERT_TRUE(c.send_raw(std::string(3 * kMaxRequest, 'x')).ok());
  auto r = c.read_reply();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_FALSE(r->ok);
  EXPECT_NE(r->text.find("longer than 4096 bytes"), std::string::npos) << r->text;
  r = c.read_reply();
  EXPECT_FALSE(r.ok());  // closed
  EXPECT_TRUE(connect().call({Verb::status, ""}).ok());
}

TEST_F(ServerTest, TruncatedRequestGetsAnError) {
  start();
  Connection c = connect();
  ASSERT_TRUE(c.send_raw("status").ok());
  c.shutdown_write();
  auto r = c.read_reply();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_FALSE(r->ok);
  EXPECT_NE(r->text.find("truncated"), std::string::npos) << r->text;
  EXPECT_EQ(handled_.load(), 0);
}

TEST_F(ServerTest, StuckClientTimesOutAndDoesNotBlockOthers) {
  ServerOptions opt;
  opt.line_timeout_ms = 300;
  start(opt);
  Connection stuck = connect();
  ASSERT_TRUE(stuck.send_raw("sta").ok());
  const auto t0 = std::chrono::steady_clock::now();
  Connection other = connect();
  auto r = other.call({Verb::status, ""});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->ok);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(250));
  r = stuck.read_reply();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_FALSE(r->ok);
  EXPECT_NE(r->text.find("timed out"), std::string::npos) << r->text;
}

TEST_F(ServerTest, TooManyConnectionsAreTurnedAway) {
  ServerOptions opt;
  opt.max_clients = 2;
  start(opt);
  Connection a = connect(), b = connect();
  ASSERT_TRUE(a.call({Verb::status, ""}).ok());
  ASSERT_TRUE(b.call({Verb::status, ""}).ok());
  Connection c = connect();
  auto r = c.read_reply();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_FALSE(r->ok);
  EXPECT_NE(r->text.find("too many connections"), std::string::npos);
}

TEST_F(ServerTest, PeerOfAnotherUidIsRefused) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to connect from another uid (this runs as uid " << geteuid() << ")";
  start();
  EXPECT_EQ(request_as_other_uid(server_->path(), "status\n"),
            "error: permission denied (tramway control socket accepts only uid 0)\n");
  EXPECT_EQ(handled_.load(), 0);
  EXPECT_TRUE(connect().call({Verb::status, ""}).ok());
}

TEST_F(ServerTest, ForkedChildLeavesTheSocketAlone) {
  start();
  const pid_t pid = fork();
  if (pid == 0) {
    server_->stop();  // what the agent's exit handler would do in a child
    _exit(0);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  struct stat sb;
  EXPECT_EQ(lstat(server_->path().c_str(), &sb), 0);
  EXPECT_TRUE(connect().call({Verb::status, ""}).ok());
}

}  // namespace
