// End-to-end tests of the `tramway` command and its agent, driving the built binaries on
// tests/cli/target.cc (built with patchable entries, and without). Tests named Record* and
// RunLive.AttachDetachCycles need the recorder (libtramway_trace); the others need only the
// agent, hooks' listing and the control socket.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "agent/control.h"
#include "agent/control_io.h"
#include "other_uid.h"
#include "tramway/trace/format.h"

namespace {

using namespace std::chrono_literals;
namespace control = tramway::control;

const std::string kCli = TRAMWAY_CLI_EXE;
const std::string kTarget = TRAMWAY_CLI_TARGET;
const std::string kPlain = TRAMWAY_CLI_PLAIN;
const std::string kPlugin = TRAMWAY_CLI_PLUGIN;

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool contains(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tramway-test-cli-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    const std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }

  // A child whose stdout and stderr go to files and whose stdin is a pipe we hold.
  struct Proc {
    pid_t pid = -1;
    int stdin_fd = -1;
    std::string out_path, err_path;
    int status = 0;
    bool reaped = false;

    void close_stdin() {
      if (stdin_fd >= 0) close(stdin_fd);
      stdin_fd = -1;
    }
    // Exit code, or 128 + signal; -1 on timeout (the child is killed then).
    int wait(std::chrono::milliseconds timeout = 20s) {
      const auto deadline = std::chrono::steady_clock::now() + timeout;
      while (!reaped) {
        const pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
          reaped = true;
          break;
        }
        if (std::chrono::steady_clock::now() > deadline) {
          kill(pid, SIGKILL);
          waitpid(pid, &status, 0);
          reaped = true;
          return -1;
        }
        std::this_thread::sleep_for(2ms);
      }
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::string out() const { return read_file(out_path); }
    std::string err() const { return read_file(err_path); }
  };

  Proc spawn(const std::vector<std::string>& argv, const std::vector<std::pair<std::string, std::string>>& env = {}) {
    Proc p;
    const int n = counter_++;
    p.out_path = dir_ + "/out" + std::to_string(n);
    p.err_path = dir_ + "/err" + std::to_string(n);
    int in[2];
    EXPECT_EQ(pipe2(in, O_CLOEXEC), 0);
    p.pid = fork();
    if (p.pid == 0) {
      dup2(in[0], 0);
      const int o = open(p.out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int e = open(p.err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(o, 1);
      dup2(e, 2);
      if (chdir(dir_.c_str()) != 0) _exit(120);
      for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(121);
    }
    close(in[0]);
    p.stdin_fd = in[1];
    return p;
  }

  // Runs to completion with an empty stdin.
  Proc run(const std::vector<std::string>& argv, const std::vector<std::pair<std::string, std::string>>& env = {}) {
    Proc p = spawn(argv, env);
    p.close_stdin();
    code_ = p.wait();
    return p;
  }

  // `tramway run -- TARGET --serve` (or other serving arguments), once its hint says the agent
  // listens; its pid in `pid`.
  Proc serve(pid_t& pid, const std::vector<std::string>& args = {"--serve"}) {
    std::vector<std::string> argv = {kCli, "run", "--", kTarget};
    argv.insert(argv.end(), args.begin(), args.end());
    Proc p = spawn(argv);
    const std::regex hint("is running as pid ([0-9]+); trace it with: tramway live ([0-9]+) attach");
    for (int i = 0; i < 6000; ++i) {  // 30 s: a loaded machine can be that slow
      std::smatch m;
      const std::string err = p.err();
      if (std::regex_search(err, m, hint)) {
        pid = static_cast<pid_t>(std::stol(m[1]));
        return p;
      }
      std::this_thread::sleep_for(5ms);
    }
    ADD_FAILURE() << "no hint from tramway run: " << p.err();
    pid = -1;
    return p;
  }

  // What the target prints untraced.
  std::string untraced(const std::vector<std::string>& args, int expected_code = 0) {
    std::vector<std::string> argv = {kTarget};
    argv.insert(argv.end(), args.begin(), args.end());
    Proc p = run(argv);
    EXPECT_EQ(code_, expected_code);
    return p.out();
  }

  std::string dir_;
  int counter_ = 0;
  int code_ = 0;
};

// ---- list ----

TEST_F(Cli, ListShowsTheProgramsFunctionsSorted) {
  Proc p = run({kCli, "list", kTarget, "cli_target::*"});
  ASSERT_EQ(code_, 0) << p.err();
  const std::vector<std::string> lines = lines_of(p.out());
  const std::vector<std::string> names = {"cli_target::alpha(int)", "cli_target::beta(int)", "cli_target::gamma(int)",
                                          "cli_target::leaf(int)", "cli_target::workload()"};
  ASSERT_EQ(lines.size(), names.size()) << p.out();
  const std::regex line("([^\t]+)\t0x[0-9a-f]+\t(.+)");
  for (std::size_t i = 0; i < names.size(); ++i) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(lines[i], m, line)) << lines[i];
    EXPECT_EQ(m[1], names[i]);
    EXPECT_EQ(m[2], kTarget);
  }
  EXPECT_EQ(p.out().find("alpha 198"), std::string::npos) << "the program's main ran";
}

TEST_F(Cli, ListWithoutGlobShowsAll) {
  Proc p = run({kCli, "list", kTarget});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_TRUE(contains(p.out(), "main\t0x")) << p.out();
  EXPECT_TRUE(contains(p.out(), "cli_target::leaf(int)\t")) << p.out();
}

TEST_F(Cli, ListOfAProgramWithoutPatchableEntriesShowsItsRelocatableFunctions) {
  Proc p = run({kCli, "list", kPlain, "cli_target::*"});
  ASSERT_EQ(code_, 0) << p.err();
  const std::vector<std::string> lines = lines_of(p.out());
  ASSERT_EQ(lines.size(), 5u) << p.out();
  for (const std::string& l : lines) EXPECT_TRUE(std::regex_match(l, std::regex("cli_target::[^\t]+\t0x[0-9a-f]+\t.+"))) << l;
  // A function that cannot be hooked is left out, and a glob matching only such says so.
  p = run({kCli, "list", kPlain, "pthread_sigmask"});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(p.err(), "no function that can be hooked matches 'pthread_sigmask' (it matches ")) << p.err();
  EXPECT_TRUE(contains(p.err(), " that cannot: `tramway list --all` says why)")) << p.err();
}

TEST_F(Cli, ListNothingMatches) {
  Proc p = run({kCli, "list", kTarget, "no_such_function*"});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(p.err(), "no function matches 'no_such_function*'")) << p.err();
}

TEST_F(Cli, ListAllShowsEveryKindAndASummaryPerObject) {
  // The plain build has the same functions without patchable entries: relocatable (their
  // prologues start with a push or a lea), listed from its .symtab, with its libc's.
  Proc p = run({kCli, "list", "--all", kPlain, "cli_target::*"});
  ASSERT_EQ(code_, 0) << p.err();
  std::vector<std::string> lines = lines_of(p.out());
  const std::regex fn("([^\t]+)\t0x[0-9a-f]+\t([^\t]+)\t(patchable|relocatable|trap|refused)(\t.+)?");
  ASSERT_EQ(lines.size(), 6u) << p.out();  // five functions, one summary
  for (std::size_t i = 0; i < 5; ++i) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(lines[i], m, fn)) << lines[i];
    EXPECT_EQ(m[2], kPlain);
    EXPECT_EQ(m[3], "relocatable") << lines[i];
  }
  EXPECT_EQ(lines[5], "# " + kPlain + ": 0 patchable, 5 relocatable, 0 trap, 0 refused");

  // The patchable build: the same functions, patchable (a patchable entry is preferred).
  p = run({kCli, "list", "--all", kTarget, "cli_target::leaf*"});
  ASSERT_EQ(code_, 0) << p.err();
  lines = lines_of(p.out());
  ASSERT_EQ(lines.size(), 2u) << p.out();
  EXPECT_TRUE(std::regex_match(lines[0], std::regex("cli_target::leaf\\(int\\)\t0x[0-9a-f]+\t.+\tpatchable")))
      << lines[0];
  EXPECT_EQ(lines[1], "# " + kTarget + ": 1 patchable, 0 relocatable, 0 trap, 0 refused");

  // Every object has its summary; the default listing leaves out what cannot be hooked.
  p = run({kCli, "list", "--all", kPlain});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_TRUE(std::regex_search(p.out(), std::regex("\n# [^\n]*/libc\\.so\\.6: 0 patchable, [1-9][0-9]* relocatable, "
                                                    "[0-9]+ trap, [0-9]+ refused\n")))
      << p.out().substr(p.out().size() > 2000 ? p.out().size() - 2000 : 0);
  EXPECT_TRUE(contains(p.out(), "\ttrap\tcannot relocate the prologue")) << "a trap line says why";
  p = run({kCli, "list", kPlain});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_FALSE(contains(p.out(), "\ttrap")) << "without --all only what can be hooked is listed";
  EXPECT_TRUE(contains(p.out(), "cli_target::leaf(int)\t")) << p.out();
}

TEST_F(Cli, ListAllNothingMatches) {
  Proc p = run({kCli, "list", "--all", kPlain, "no_such_function*"});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(p.err(), "no function matches 'no_such_function*'")) << p.err();
}

TEST_F(Cli, ProgramNotFound) {
  Proc p = run({kCli, "list", "tramway-no-such-program"});
  EXPECT_EQ(code_, 127);
  EXPECT_TRUE(contains(p.err(), "tramway: tramway-no-such-program: no such program")) << p.err();
  p = run({kCli, "record", "--", "./not/here"});
  EXPECT_EQ(code_, 127);
  EXPECT_TRUE(contains(p.err(), "tramway: ./not/here: no such program")) << p.err();
}

TEST_F(Cli, ProgramFoundThroughPath) {
  const std::string target_dir = kTarget.substr(0, kTarget.rfind('/'));
  const std::string name = kTarget.substr(kTarget.rfind('/') + 1);
  Proc p = run({kCli, "list", name, "cli_target::leaf*"}, {{"PATH", "/nonexistent:" + target_dir}});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_TRUE(contains(p.out(), "cli_target::leaf(int)")) << p.out();
}

TEST_F(Cli, MissingAgentSaysHowToFindIt) {
  Proc p = run({kCli, "list", kTarget}, {{"TRAMWAY_AGENT", "/nonexistent/libtramway_agent.so"}});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(p.err(), "TRAMWAY_AGENT=/nonexistent/libtramway_agent.so: no such file")) << p.err();
}

TEST_F(Cli, StaticProgramIsRefusedBeforeItRuns) {
  // A static executable would run its main with the agent silently ignored.
  const std::string src = dir_ + "/static.c", exe = dir_ + "/static";
  {
    std::ofstream(src) << "#include <stdio.h>\nint main(void) { puts(\"main ran\"); return 0; }\n";
  }
  const std::string cc = "cc -static -o '" + exe + "' '" + src + "' 2>/dev/null";
  if (std::system(cc.c_str()) != 0) GTEST_SKIP() << "no static libc to build a static program with";
  Proc p = run({kCli, "list", exe});
  EXPECT_NE(code_, 0);
  EXPECT_TRUE(contains(p.err(), "statically linked")) << p.err();
  EXPECT_EQ(p.out(), "");
}

// ---- run, live and the control socket (no recorder needed) ----

TEST_F(Cli, RunPassesExitStatusAndLeavesChildrenUnagented) {
  Proc p = run({kCli, "run", "--", kTarget, "--exit", "7"});
  EXPECT_EQ(code_, 7) << p.err();
  EXPECT_EQ(p.out(), untraced({"--exit", "7"}, 7));

  // The program's environment (what its children inherit) has neither the agent nor our
  // variables; a user's own LD_PRELOAD stays.
  p = run({kCli, "run", "--", kTarget, "--env"}, {{"LD_PRELOAD", "libm.so.6"}});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_TRUE(contains(p.out(), "LD_PRELOAD=libm.so.6\n")) << p.out();
  EXPECT_FALSE(contains(p.out(), "left: TRAMWAY_")) << p.out();
  p = run({kCli, "run", "--", kTarget, "--env"});
  EXPECT_TRUE(contains(p.out(), "LD_PRELOAD=(unset)\n")) << p.out();
}

TEST_F(Cli, LibtramwayInterposesBeforeLibc) {
  // The command preloads libtramway ahead of the agent, so its pthread_sigmask, not libc's, is
  // what the program calls: SIGTRAP (tramway's int3 traps) stays deliverable.
  EXPECT_TRUE(contains(untraced({"--sigmask"}), "SIGTRAP blocked: yes\n"));
  Proc p = run({kCli, "run", "--", kTarget, "--sigmask"});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_TRUE(contains(p.out(), "SIGTRAP blocked: no\n")) << p.out();
}

TEST_F(Cli, RunForwardsTerminationSignals) {
  pid_t pid = -1;
  Proc p = serve(pid);
  ASSERT_GT(pid, 0);
  kill(p.pid, SIGTERM);  // to tramway, which passes it on
  EXPECT_EQ(p.wait(), 128 + SIGTERM) << p.err();
  EXPECT_NE(kill(pid, 0), 0);
  p.close_stdin();
}

TEST_F(Cli, LiveStatusListAndSocketRemovedAtExit) {
  pid_t pid = -1;
  Proc p = serve(pid);
  ASSERT_GT(pid, 0);
  Proc s = run({kCli, "live", std::to_string(pid), "status"});
  EXPECT_EQ(code_, 0) << s.err();
  EXPECT_TRUE(contains(s.out(), "recording no")) << s.out();
  EXPECT_TRUE(contains(s.out(), "pid " + std::to_string(pid))) << s.out();

  s = run({kCli, "list", std::to_string(pid), "cli_target::[ab]*"});
  EXPECT_EQ(code_, 0) << s.err();
  EXPECT_EQ(lines_of(s.out()).size(), 2u) << s.out();
  s = run({kCli, "list", std::to_string(pid), "nothing*"});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(s.err(), "no function matches")) << s.err();
  s = run({kCli, "list", "--all", std::to_string(pid), "cli_target::[ab]*"});
  EXPECT_EQ(code_, 0) << s.err();
  EXPECT_EQ(lines_of(s.out()).size(), 3u) << s.out();  // two patchable functions and their summary
  EXPECT_TRUE(contains(s.out(), ": 2 patchable, 0 relocatable, 0 trap, 0 refused\n")) << s.out();

  s = run({kCli, "live", std::to_string(pid), "stop"});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(s.err(), "error: not recording")) << s.err();

  auto path = control::find_socket(pid);
  ASSERT_TRUE(path.ok()) << path.status().message();
  p.close_stdin();
  EXPECT_EQ(p.wait(), 0) << p.err();
  EXPECT_EQ(p.out(), untraced({"--serve"}));
  struct stat st;
  EXPECT_NE(lstat(path->c_str(), &st), 0) << *path << " left behind";
}

TEST_F(Cli, LiveWithoutAgentSaysHowToStartOne) {
  Proc s = run({kCli, "live", std::to_string(getpid()), "status"});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(s.err(), "process " + std::to_string(getpid()) +
                                    " (test_cli) is running but has no tramway agent loaded (`tramway live " +
                                    std::to_string(getpid()) + " attach GLOB` loads one into it; or start the program "
                                    "with `tramway run -- PROG` or `tramway record`)"))
      << s.err();

  // A pid nobody has: the process that just exited.
  const pid_t gone = s.pid;
  s = run({kCli, "live", std::to_string(gone), "status"});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(s.err(), "no process " + std::to_string(gone))) << s.err();
}

// The pid of `tramway run` itself is the easy mistake: the error names the program's pid.
TEST_F(Cli, LiveOnTheSupervisorNamesTheProgramsPid) {
  pid_t pid = -1;
  Proc p = serve(pid);
  ASSERT_GT(pid, 0);
  const std::string supervisor = std::to_string(p.pid), program = std::to_string(pid);
  Proc s = run({kCli, "live", supervisor, "status"});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(s.err(), "process " + supervisor + " (tramway) is running but has no tramway agent loaded: it is "
                                    "the tramway command supervising process " + program +
                                    ", which has the agent; use that pid (e.g. `tramway live " + program + " status`)"))
      << s.err();
  s = run({kCli, "live", program, "status"});
  EXPECT_EQ(code_, 0) << s.err();
  p.close_stdin();
  EXPECT_EQ(p.wait(), 0) << p.err();
}

TEST_F(Cli, MalformedRequestsGetErrorsAndTheTargetRuns) {
  pid_t pid = -1;
  Proc p = serve(pid);
  ASSERT_GT(pid, 0);
  {
    auto c = control::Connection::open(pid, 5000);
    ASSERT_TRUE(c.ok()) << c.status().message();
    for (std::string bad : {std::string("bogus\n"), std::string("attach\n"), std::string("\x01\x02garbage\n"),
                            std::string("start relative.trace\n"), std::string(5000, 'a') + "\n",
                            std::string("attach ") + std::string(8000, '*') + "\n"}) {
      ASSERT_TRUE(c->send_raw(bad).ok());
      auto r = c->read_reply();
      ASSERT_TRUE(r.ok()) << r.status().message();
      EXPECT_FALSE(r->ok) << bad.substr(0, 30);
    }
    auto r = c->call({control::Verb::status, ""});  // the same connection still works
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_TRUE(r->ok);
  }
  {
    // No newline within the limit: an error, then the connection is closed.
    auto c = control::Connection::open(pid, 5000);
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE(c->send_raw(std::string(20000, 'x')).ok());
    auto r = c->read_reply();
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_FALSE(r->ok);
  }
  {
    // Truncated: the client goes away mid-line.
    auto c = control::Connection::open(pid, 5000);
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE(c->send_raw("list cli_").ok());
    c->shutdown_write();
    auto r = c->read_reply();
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_FALSE(r->ok);
    EXPECT_TRUE(contains(r->text, "truncated")) << r->text;
  }
  // A client stuck mid-request does not hold up another one.
  auto stuck = control::Connection::open(pid, 5000);
  ASSERT_TRUE(stuck.ok());
  ASSERT_TRUE(stuck->send_raw("sta").ok());
  Proc s = run({kCli, "live", std::to_string(pid), "status"});
  EXPECT_EQ(code_, 0) << s.err();

  p.close_stdin();
  EXPECT_EQ(p.wait(), 0) << p.err();
  EXPECT_EQ(p.out(), untraced({"--serve"}));
}

TEST_F(Cli, ConnectionFromAnotherUidIsRefused) {
  if (geteuid() != 0) {
    GTEST_SKIP() << "needs root to connect from another uid (this runs as uid " << geteuid() << ")";
  }
  pid_t pid = -1;
  Proc p = serve(pid);
  ASSERT_GT(pid, 0);
  auto path = control::find_socket(pid);
  ASSERT_TRUE(path.ok()) << path.status().message();

  const std::string reply = request_as_other_uid(*path, "stop\n");
  EXPECT_EQ(reply, "error: permission denied (tramway control socket accepts only uid 0)\n");

  Proc s = run({kCli, "live", std::to_string(pid), "status"});
  EXPECT_EQ(code_, 0) << s.err();
  p.close_stdin();
  EXPECT_EQ(p.wait(), 0) << p.err();
}

// ---- recording (needs the recorder) ----

struct TraceCounts {
  std::map<std::string, std::uint64_t> entries, exits;
  bool ended_cleanly = false;
  std::string error;
};

TraceCounts read_trace(const std::string& path) {
  namespace fmt = tramway::trace::format;
  TraceCounts tc;
  const std::string data = read_file(path);
  if (data.size() < sizeof(fmt::FileHeader)) {
    tc.error = "short file (" + std::to_string(data.size()) + " bytes)";
    return tc;
  }
  fmt::FileHeader h;
  std::memcpy(&h, data.data(), sizeof h);
  if (std::memcmp(h.magic, fmt::kMagic, sizeof h.magic) != 0) {
    tc.error = "bad magic";
    return tc;
  }
  std::map<std::uint64_t, std::string> names;
  std::map<std::uint64_t, std::uint64_t> entries, exits;
  for (std::size_t pos = h.header_size; pos + sizeof(fmt::ChunkHeader) <= data.size();) {
    fmt::ChunkHeader ch;
    std::memcpy(&ch, data.data() + pos, sizeof ch);
    pos += sizeof ch;
    if (pos + ch.size > data.size()) break;  // cut short
    const char* p = data.data() + pos;
    if (ch.type == fmt::ChunkType::functions) {
      for (std::size_t off = 0; off + 12 <= ch.size;) {
        std::uint64_t addr;
        std::uint32_t len;
        std::memcpy(&addr, p + off, 8);
        std::memcpy(&len, p + off + 8, 4);
        names[addr].assign(p + off + 12, len);
        off += 12 + len;
      }
    } else if (ch.type == fmt::ChunkType::events && ch.size >= 8) {
      std::uint32_t count;
      std::memcpy(&count, p + 4, 4);
      for (std::uint32_t i = 0; i < count && 8 + (i + 1) * sizeof(fmt::Event) <= ch.size; ++i) {
        fmt::Event e;
        std::memcpy(&e, p + 8 + i * sizeof e, sizeof e);
        if (e.kind() == fmt::EventKind::entry) ++entries[e.address()];
        else if (e.kind() == fmt::EventKind::exit) ++exits[e.address()];
      }
    } else if (ch.type == fmt::ChunkType::end) {
      tc.ended_cleanly = true;
    }
    pos += ch.size;
  }
  auto name = [&](std::uint64_t a) { return names.count(a) ? names[a] : "0x" + std::to_string(a); };
  for (auto [a, n] : entries) tc.entries[name(a)] += n;
  for (auto [a, n] : exits) tc.exits[name(a)] += n;
  return tc;
}

// Known calls of one run of target.cc without arguments.
const std::map<std::string, std::uint64_t> kCalls = {
    {"cli_target::alpha(int)", 11}, {"cli_target::beta(int)", 23}, {"cli_target::gamma(int)", 37},
    {"cli_target::leaf(int)", 57},  {"cli_target::workload()", 1},
};

TEST_F(Cli, RecordCountsEveryCallAndReportAgrees) {
  const std::string trace = dir_ + "/calls.trace";
  Proc p = run({kCli, "record", "-f", "cli_target::*", "-o", trace, "--", kTarget});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_EQ(p.out(), untraced({}));
  EXPECT_TRUE(contains(p.err(), "tramway: recorded ")) << p.err();
  EXPECT_TRUE(contains(p.err(), "tramway report " + trace)) << p.err();

  const TraceCounts tc = read_trace(trace);
  ASSERT_EQ(tc.error, "");
  EXPECT_TRUE(tc.ended_cleanly);
  EXPECT_EQ(tc.entries, kCalls);
  EXPECT_EQ(tc.exits, kCalls);

  Proc r = run({kCli, "report", trace, "--sort", "name", "--limit", "0"});
  ASSERT_EQ(code_, 0) << r.err();
  for (const auto& [fn, calls] : kCalls) {
    bool found = false;
    for (const std::string& line : lines_of(r.out())) {
      if (!contains(line, fn)) continue;
      std::istringstream words(line);
      for (std::string w; words >> w;) found |= w == std::to_string(calls);
    }
    EXPECT_TRUE(found) << fn << " with " << calls << " calls not in:\n" << r.out();
  }

  // The distribution columns, and a histogram per function a --histogram glob matches.
  Proc h = run({kCli, "report", trace, "--sort", "p99", "--histogram", "cli_target::*", "--histogram", "nope*"});
  ASSERT_EQ(code_, 0) << h.err();
  EXPECT_TRUE(contains(lines_of(h.out()).at(2), "p50")) << h.out();
  EXPECT_TRUE(contains(lines_of(h.out()).at(2), "stddev")) << h.out();
  for (const auto& [fn, calls] : kCalls) {
    EXPECT_TRUE(contains(h.out(), fn + ": " + std::to_string(calls) + (calls == 1 ? " call, min " : " calls, min ")))
        << fn << " has no histogram in:\n" << h.out();
  }
  EXPECT_TRUE(contains(h.out(), "--histogram 'nope*': no function with completed calls matches it")) << h.out();
  Proc bad = run({kCli, "report", trace, "--sort", "p42"});
  EXPECT_NE(code_, 0);
  EXPECT_TRUE(contains(bad.err(), "p42")) << bad.err();

  // Report-time filters: a window that ends before anything starts keeps no call.
  Proc none = run({kCli, "report", trace, "--until", "1ns"});
  ASSERT_EQ(code_, 0) << none.err();
  EXPECT_TRUE(contains(none.out(), "filtered: only calls starting from 0 ns to 1 ns")) << none.out();
  EXPECT_TRUE(contains(none.out(), "(no completed calls)")) << none.out();
  Proc all = run({kCli, "report", trace, "--since", "0s", "-t", "0ns", "--limit", "0"});
  ASSERT_EQ(code_, 0) << all.err();
  EXPECT_TRUE(contains(all.out(), "cli_target::leaf(int)")) << all.out();
  Proc bad_duration = run({kCli, "report", trace, "--min-duration", "10 parsecs"});
  EXPECT_EQ(code_, 2);
  EXPECT_TRUE(contains(bad_duration.err(), "--min-duration: '10 parsecs' is not a duration")) << bad_duration.err();
  Proc backwards = run({kCli, "report", trace, "--since", "2s", "--until", "1s"});
  EXPECT_EQ(code_, 2);
  EXPECT_TRUE(contains(backwards.err(), "--until must come after --since")) << backwards.err();
}

// record -x leaves the functions it matches untraced; -D 2 the calls nested deeper than two
// traced calls (workload, then alpha/beta/gamma: their calls of leaf are the third level).
TEST_F(Cli, RecordExcludesGlobsAndLimitsTheDepth) {
  const std::string excluded = dir_ + "/excluded.trace";
  Proc p = run({kCli, "record", "-f", "cli_target::*", "-x", "cli_target::beta*", "-x", "cli_target::gamma*", "-o",
                excluded, "--", kTarget});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_EQ(p.out(), untraced({}));
  TraceCounts tc = read_trace(excluded);
  ASSERT_EQ(tc.error, "");
  for (const auto& [fn, calls] : kCalls) {
    const bool gone = fn.starts_with("cli_target::beta") || fn.starts_with("cli_target::gamma");
    EXPECT_EQ(tc.entries.count(fn) ? tc.entries.at(fn) : 0u, gone ? 0u : calls) << fn;
  }
  const std::string shallow = dir_ + "/shallow.trace";
  p = run({kCli, "record", "-f", "cli_target::*", "-D", "2", "-o", shallow, "--", kTarget});
  ASSERT_EQ(code_, 0) << p.err();
  tc = read_trace(shallow);
  ASSERT_EQ(tc.error, "");
  EXPECT_EQ(tc.entries.count("cli_target::leaf(int)"), 0u) << "leaf is called at depth 3 only";
  EXPECT_EQ(tc.entries.at("cli_target::alpha(int)"), kCalls.at("cli_target::alpha(int)"));
  EXPECT_EQ(tc.entries.at("cli_target::workload()"), 1u);
  EXPECT_EQ(tc.exits, tc.entries);
  p = run({kCli, "record", "-f", "cli_target::beta*", "-x", "cli_target::*", "-o", shallow, "--", kTarget});
  EXPECT_NE(code_, 0);
  EXPECT_TRUE(contains(p.err(), "all of them excluded")) << p.err();
  p = run({kCli, "record", "-D", "0", "--", kTarget});
  EXPECT_NE(code_, 0);

  // -t: a threshold no call reaches writes none of them, and says how many it left out.
  const std::string none = dir_ + "/none.trace";
  p = run({kCli, "record", "-f", "cli_target::*", "-t", "1000s", "-o", none, "--", kTarget});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_EQ(p.out(), untraced({}));
  tc = read_trace(none);
  ASSERT_EQ(tc.error, "");
  EXPECT_TRUE(tc.entries.empty());
  std::uint64_t all = 0;
  for (const auto& [fn, calls] : kCalls) all += calls;
  EXPECT_TRUE(contains(p.err(), "; " + std::to_string(all) + " shorter calls not written")) << p.err();
  p = run({kCli, "record", "-f", "cli_target::*", "-t", "soon", "--", kTarget});
  EXPECT_EQ(code_, 2);
  EXPECT_TRUE(contains(p.err(), "-t: 'soon' is not a duration")) << p.err();
}

// The same program built without patchable entries: its functions are traced through their
// relocated prologues, with the same counts, exits and output.
TEST_F(Cli, RecordTracesAProgramWithoutPatchableEntriesThroughRelocatedPrologues) {
  const std::string trace = dir_ + "/plain.trace";
  Proc p = run({kCli, "record", "-f", "cli_target::*", "-o", trace, "--", kPlain});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_EQ(p.out(), untraced({}));
  const TraceCounts tc = read_trace(trace);
  ASSERT_EQ(tc.error, "");
  EXPECT_TRUE(tc.ended_cleanly);
  EXPECT_EQ(tc.entries, kCalls);
  EXPECT_EQ(tc.exits, kCalls);
}

TEST_F(Cli, RecordSeveralFiltersAndDefaultOutput) {
  Proc p = run({kCli, "record", "-f", "cli_target::alpha*", "-f", "cli_target::gamma*", "--", kTarget});
  ASSERT_EQ(code_, 0) << p.err();
  const TraceCounts tc = read_trace(dir_ + "/tramway.trace");  // -o defaults to ./tramway.trace
  ASSERT_EQ(tc.error, "");
  EXPECT_EQ(tc.entries, (std::map<std::string, std::uint64_t>{{"cli_target::alpha(int)", 11}, {"cli_target::gamma(int)", 37}}));
}

TEST_F(Cli, RecordExceptionsThroughTracedFrames) {
  const std::string trace = dir_ + "/throw.trace";
  // LD_DEBUG shows where the program's unwinder calls go: to the agent's wrappers, and only
  // to them (a second copy ahead of them would run every wrapper twice).
  Proc p = run({kCli, "record", "-f", "cli_throw::*", "-o", trace, "--", kTarget, "--throw"},
               {{"LD_DEBUG", "bindings"}, {"LD_DEBUG_OUTPUT", dir_ + "/ld"}});
  ASSERT_EQ(code_, 0) << p.err();
  EXPECT_EQ(p.out(), untraced({"--throw"}));
  const TraceCounts tc = read_trace(trace);
  ASSERT_EQ(tc.error, "");
  EXPECT_EQ(tc.entries, (std::map<std::string, std::uint64_t>{
                            {"cli_throw::catcher(int)", 30}, {"cli_throw::middle(int)", 30}, {"cli_throw::thrower(int)", 30}}));
  // 10 throws leave thrower and middle without returning.
  EXPECT_EQ(tc.exits, (std::map<std::string, std::uint64_t>{
                          {"cli_throw::catcher(int)", 30}, {"cli_throw::middle(int)", 20}, {"cli_throw::thrower(int)", 20}}));

  std::string bindings;
  const std::string ls = "cat '" + dir_ + "'/ld.* > '" + dir_ + "/ld-all'";
  ASSERT_EQ(std::system(ls.c_str()), 0);
  for (const std::string& line : lines_of(read_file(dir_ + "/ld-all"))) {
    if (contains(line, "binding file " + kTarget + " ") && contains(line, "__cxa_begin_catch")) bindings += line + "\n";
  }
  EXPECT_TRUE(contains(bindings, "libtramway_agent.so")) << bindings;
  EXPECT_FALSE(contains(bindings, "libtramway_trace")) << bindings;
}

TEST_F(Cli, RecordWithBadFilterStopsBeforeMain) {
  const std::string trace = dir_ + "/bad.trace";
  Proc p = run({kCli, "record", "-f", "cli_target::*", "-f", "nothing_like_this*", "-o", trace, "--", kTarget});
  EXPECT_EQ(code_, 2);
  EXPECT_TRUE(contains(p.err(), "tramway: -f 'nothing_like_this*'")) << p.err();
  EXPECT_EQ(p.out(), "") << "main ran";
  struct stat st;
  EXPECT_NE(stat(trace.c_str(), &st), 0) << "an empty trace was left behind";
  EXPECT_FALSE(contains(p.err(), "tramway report")) << p.err();
}

// The target has no SIGTERM handler: the SIGTERM that ends it kills it before its agent can
// remove the control socket, so tramway does (in a socket directory of the test's own).
TEST_F(Cli, RecordDurationStopsRecordingThenTheProgram) {
  const std::string trace = dir_ + "/duration.trace";
  Proc p = spawn({kCli, "record", "--duration", "0.5", "-f", "cli_target::gamma*", "-o", trace, "--", kTarget, "--serve"},
                 {{"XDG_RUNTIME_DIR", dir_}});
  // stdin stays open: only --duration can end the program.
  EXPECT_EQ(p.wait(15s), 0) << p.err();
  p.close_stdin();
  EXPECT_TRUE(contains(p.err(), "stopped: recorded ")) << p.err();
  const std::string sockets = dir_ + "/tramway";
  struct stat st;
  ASSERT_EQ(stat(sockets.c_str(), &st), 0) << "the agent did not use XDG_RUNTIME_DIR=" << dir_;
  Proc ls = run({"/bin/ls", "-A", sockets});
  EXPECT_EQ(ls.out(), "") << "left in " << sockets;
  const TraceCounts tc = read_trace(trace);
  ASSERT_EQ(tc.error, "");
  EXPECT_TRUE(tc.ended_cleanly);
  ASSERT_EQ(tc.entries.count("cli_target::gamma(int)"), 1u);
  EXPECT_GT(tc.entries.at("cli_target::gamma(int)"), 0u);
}

TEST_F(Cli, AgentDurationStopsRecordingAndTheProgramRunsOn) {
  // TRAMWAY_DURATION, for users of the agent without --duration: recording stops, the program
  // goes on untraced until it ends by itself.
  const std::string trace = dir_ + "/agent-duration.trace";
  Proc p = spawn({kCli, "record", "-f", "cli_target::leaf*", "-o", trace, "--", kTarget, "--serve"},
                 {{"TRAMWAY_DURATION", "0.3"}});
  bool stopped = false;
  for (int i = 0; i < 2000 && !stopped; ++i) {
    stopped = contains(p.err(), "tramway: recorded ");
    if (!stopped) std::this_thread::sleep_for(5ms);
  }
  EXPECT_TRUE(stopped) << p.err();
  EXPECT_EQ(waitpid(p.pid, nullptr, WNOHANG), 0) << "the program ended with the recording";
  const TraceCounts tc = read_trace(trace);
  ASSERT_EQ(tc.error, "");
  EXPECT_TRUE(tc.ended_cleanly);
  p.close_stdin();
  EXPECT_EQ(p.wait(), 0) << p.err();
  EXPECT_EQ(p.out(), untraced({"--serve"}));
}

TEST_F(Cli, LiveAttachTypoLeavesNoRecording) {
  pid_t pid = -1;
  Proc p = serve(pid);
  ASSERT_GT(pid, 0);
  const std::string trace = dir_ + "/typo.trace";
  Proc a = run({kCli, "live", std::to_string(pid), "attach", "no_such_fn*", "-o", trace});
  EXPECT_EQ(code_, 1);
  EXPECT_TRUE(contains(a.err(), "error: ")) << a.err();
  Proc s = run({kCli, "live", std::to_string(pid), "status"});
  EXPECT_TRUE(contains(s.out(), "recording no")) << s.out() << s.err();
  struct stat st;
  EXPECT_NE(stat(trace.c_str(), &st), 0);
  p.close_stdin();
  EXPECT_EQ(p.wait(), 0) << p.err();
}

TEST_F(Cli, RunLiveAttachDetachCycles) {
  const char* env = std::getenv("TRAMWAY_CLI_LIVE_CYCLES");
  const int cycles = env ? std::atoi(env) : 50;
  pid_t pid = -1;
  Proc p = serve(pid);
  ASSERT_GT(pid, 0);
  const std::string spid = std::to_string(pid);
  const std::string trace = dir_ + "/live.trace";
  for (int i = 0; i < cycles; ++i) {
    Proc a = run({kCli, "live", spid, "attach", "cli_target::*", "-o", trace});
    ASSERT_EQ(code_, 0) << "cycle " << i << ": " << a.err();
    EXPECT_TRUE(contains(a.out(), "ok attached 'cli_target::*': 5 functions")) << a.out();
    if (i == 0) {
      EXPECT_TRUE(contains(a.out(), "ok recording to " + trace)) << a.out();
    }
    Proc d = run({kCli, "live", spid, "detach", "cli_target::*"});
    ASSERT_EQ(code_, 0) << "cycle " << i << ": " << d.err();
  }
  Proc s = run({kCli, "live", spid, "status"});
  EXPECT_EQ(code_, 0) << s.err();
  EXPECT_TRUE(contains(s.out(), "recording yes")) << s.out();
  s = run({kCli, "live", spid, "stop"});
  EXPECT_EQ(code_, 0) << s.err();
  EXPECT_TRUE(contains(s.out(), "ok stopped: recorded ")) << s.out();
  EXPECT_EQ(kill(pid, 0), 0) << "the program died";

  p.close_stdin();
  EXPECT_EQ(p.wait(), 0) << p.err();
  EXPECT_EQ(p.out(), untraced({"--serve"}));
  const TraceCounts tc = read_trace(trace);
  ASSERT_EQ(tc.error, "");
  EXPECT_TRUE(tc.ended_cleanly);
  Proc r = run({kCli, "report", trace});
  EXPECT_EQ(code_, 0) << r.err();
}

// The program loads and unloads a plugin on two threads while `tramway live attach 'lib*'`
// selects the plugin's functions (issue 11, defect 3: the program died of SIGSEGV, or the
// attach failed writing code through /proc/self/mem). Each attach succeeds, or finds the
// plugin unloaded (before listing: no match; after: "object unloaded"); the program lives on.
TEST_F(Cli, LiveAttachWhileTheProgramLoadsAndUnloadsAPlugin) {
  pid_t pid = -1;
  Proc p = serve(pid, {"--plugin", kPlugin});
  ASSERT_GT(pid, 0);
  const std::string spid = std::to_string(pid);
  const std::string trace = dir_ + "/plugin.trace";
  int attached = 0;
  for (int i = 0; i < 15; ++i) {
    Proc a = run({kCli, "live", spid, "attach", "lib*", "-o", trace});
    if (code_ == 0) {
      ++attached;
      EXPECT_TRUE(contains(a.out(), "ok attached 'lib*': 2 functions")) << a.out();
      Proc d = run({kCli, "live", spid, "detach", "lib*"});
      ASSERT_EQ(code_, 0) << "cycle " << i << ": " << d.err();
    } else {
      EXPECT_TRUE(contains(a.err(), "object unloaded") ||
                  contains(a.err(), "matches no function of this process that can be hooked"))
          << "cycle " << i << ": " << a.err();
    }
    ASSERT_EQ(kill(pid, 0), 0) << "the program died at cycle " << i << ": " << p.err();
  }
  std::printf("%d of 15 attaches found the plugin loaded\n", attached);
  Proc s = run({kCli, "live", spid, "stop"});
  p.close_stdin();
  EXPECT_EQ(p.wait(), 0) << p.err();
  EXPECT_TRUE(contains(p.out(), "plugin: mismatches 0\nserve: mismatches 0\n")) << p.out();
}

}  // namespace
