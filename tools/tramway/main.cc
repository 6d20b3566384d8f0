// tramway — list, record and live-trace the functions of a program, and report on
// the traces (perf/uftrace-like). See `tramway --help`.
//
//   tramway list [--all] PROG [GLOB] | list [--all] PID [GLOB]
//   tramway record [-f GLOB]... [-o FILE] [--duration S] [--trap] -- PROG ARGS...
//   tramway run -- PROG ARGS...
//   tramway record -p PID -f GLOB... [-o FILE] [--duration S]
//   tramway live PID attach GLOB [-o FILE] | detach GLOB | status | stop | eject
//   tramway report FILE [--sort KEY] [--limit N] [--per-thread] [--chrome F] [--folded F] [--svg F]
//                  [--max-depth N]
//
// Programs run with libtramway_agent.so preloaded (src/agent/agent.cc), configured through
// TRAMWAY_* variables; `live` and `list PID` talk to the agent's control socket
// (src/agent/control.h); a process started without tramway gets the agent injected first
// (attach.h, src/inject/injector.h). Exit status: the program's for list PROG/record/run (128 + signal if
// it was killed); 0 or 1 for live and report (1 = an `error:` reply or a failure); 126/127 when
// the program cannot be executed or found.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "agent/control.h"
#include "agent/control_io.h"
#include "attach.h"
#include "launch.h"
#include "trace/report/report.h"

namespace tramway::cli {
namespace {

int fail(const std::string& message, int code = 1) {
  std::fprintf(stderr, "tramway: %s\n", message.c_str());
  return code;
}

int fail(const Status& s) {
  // 127: not found, 126: found but not executable, as a shell says.
  const int code = s.sys_errno() == ENOENT ? 127 : (s.sys_errno() == EACCES || s.sys_errno() == ENOEXEC ? 126 : 1);
  return fail(s.message(), code);
}

bool is_pid(const std::string& s) {
  return !s.empty() && s.size() < 10 && s.find_first_not_of("0123456789") == std::string::npos && s != "0";
}

// The program to run, resolved and checked, with the agent found: or why not.
struct Prepared {
  std::string path;
  Agent agent;
};
Result<Prepared> prepare(const std::string& program) {
  Result<std::string> path = find_program(program);
  if (!path.ok()) return path.status();
  if (Status s = check_preloadable(*path, program); !s.ok()) return s;
  Result<Agent> agent = find_agent();
  if (!agent.ok()) return agent.status();
  return Prepared{*path, *agent};
}

// ---- list ----

int list_process(pid_t pid, const std::string& glob, bool all, const AttachOptions& attach) {
  Result<Attached> a = connect_or_inject(pid, attach);
  if (!a.ok()) return fail(a.status().message());
  control::Request req{all ? control::Verb::list_all : control::Verb::list, glob};
  Result<control::Reply> r = a->connection.call(req);
  if (!r.ok()) return fail(r.status().message());
  if (!r->ok) return fail(r->text);
  for (const std::string& l : r->lines) std::printf("%s\n", l.c_str());
  return 0;
}

int list_program(const std::string& program, const std::string& glob, bool all) {
  Result<Prepared> p = prepare(program);
  if (!p.ok()) return fail(p.status());
  Launch l = with_agent(p->agent, p->path, {program});
  l.env.emplace_back("TRAMWAY_LIST", glob.empty() ? "*" : glob);
  if (all) l.env.emplace_back("TRAMWAY_LIST_ALL", "1");
  Result<Supervisor> s = Supervisor::start(l);
  if (!s.ok()) return fail(s.status());
  s->wait(-1);
  // The agent exits before main with 0 (listed), 1 (no match), 3 (not built with the flag) or
  // 2 (another failure), having said why on stderr; anything else came from elsewhere.
  if (WIFSIGNALED(s->wait_status())) return fail(program + " " + s->describe() + " while being listed", s->exit_code());
  return s->exit_code();
}

// ---- record and run ----

struct RecordArgs {
  std::vector<std::string> filters;
  std::vector<std::string> excludes;
  std::uint32_t max_depth = 0;
  std::string min_duration;  // -t, parsed by trace::report::parse_duration
  std::string output = "tramway.trace";
  double duration = 0;
  bool trap = false;
};

struct FileStamp {
  bool exists = false;
  struct timespec mtime {};
};
FileStamp stamp(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return {};
  return {true, st.st_mtim};
}

// Waits until the agent of `s` listens on its control socket (true), or the program has exited.
// The agent creates the socket in its constructor, before main; the bound is for a machine so
// loaded that this takes long, not for a normal start.
bool wait_for_agent(Supervisor& s) {
  for (int i = 0; i < 6000 && !s.exited(); ++i) {
    if (control::find_socket(s.pid()).ok()) return true;
    s.wait(10);
  }
  return false;
}

// The control socket of an agent whose program is gone: a program killed by a signal (the
// SIGTERM that ends --duration, with no handler for it) cannot remove it itself. Called
// before the program is reaped, so that no other process can have its pid yet.
void remove_stale_socket(pid_t pid) {
  for (const std::string& dir : control::socket_dirs()) {
    const std::string path = control::socket_path(dir, pid);
    struct stat st;
    if (lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_uid == geteuid()) unlink(path.c_str());
  }
}

// Ends a --duration recording: the agent closes the trace (the `stop` request returns when the
// file is complete), then the program gets SIGTERM, and SIGKILL if it lingers.
void end_after_duration(Supervisor& s) {
  Result<control::Connection> c = control::Connection::open(s.pid());
  if (c.ok()) {
    Result<control::Reply> r = c->call({control::Verb::stop, {}});
    if (r.ok() && r->ok) std::fprintf(stderr, "tramway: %s\n", r->text.c_str());
    else if (!s.exited()) std::fprintf(stderr, "tramway: stopping the recording: %s\n", r.ok() ? r->text.c_str() : r.status().message().c_str());
  } else if (!s.exited()) {
    std::fprintf(stderr, "tramway: cannot reach the agent to stop the recording (%s)\n", c.status().message().c_str());
  }
  if (s.exited()) return;
  kill(s.pid(), SIGTERM);
  if (!s.wait(5000)) {
    std::fprintf(stderr, "tramway: the program did not exit within 5 s of SIGTERM; killing it\n");
    kill(s.pid(), SIGKILL);
    s.wait(-1);
  }
}

int record(const RecordArgs& a, const std::vector<std::string>& command) {
  if (command.empty()) return fail("record needs a program: tramway record [-f GLOB]... [-o FILE] -- PROG ARGS...", 2);
  Result<Prepared> p = prepare(command[0]);
  if (!p.ok()) return fail(p.status());
  const std::string output = absolute(a.output);
  const FileStamp before = stamp(output);

  Launch l = with_agent(p->agent, p->path, command);
  std::string filters;
  for (const std::string& f : a.filters) {  // none: the agent traces the executable's functions
    filters += (filters.empty() ? "" : "\n") + f;
  }
  l.env.emplace_back("TRAMWAY_OUTPUT", output);
  l.env.emplace_back("TRAMWAY_FILTERS", filters);
  std::string excludes;
  for (const std::string& x : a.excludes) excludes += (excludes.empty() ? "" : "\n") + x;
  if (!excludes.empty()) l.env.emplace_back("TRAMWAY_EXCLUDE", excludes);
  if (a.max_depth > 0) l.env.emplace_back("TRAMWAY_MAX_DEPTH", std::to_string(a.max_depth));
  if (!a.min_duration.empty()) {
    auto ns = trace::report::parse_duration(a.min_duration);
    if (!ns.ok()) return fail("-t: " + ns.status().message(), 2);
    if (*ns > 0) l.env.emplace_back("TRAMWAY_MIN_DURATION_NS", std::to_string(*ns));
  }
  if (a.duration > 0) l.env.emplace_back("TRAMWAY_CONTROL", "1");
  if (a.trap) l.env.emplace_back("TRAMWAY_TRAP", "1");
  Result<Supervisor> s = Supervisor::start(l);
  if (!s.ok()) return fail(s.status());
  s->before_reap(remove_stale_socket);

  // The duration counts from when the agent is up: recording and listening for `stop`.
  bool ended_by_us = false;
  if (a.duration > 0 && wait_for_agent(*s) && !s->wait(static_cast<int>(a.duration * 1000))) {
    end_after_duration(*s);
    ended_by_us = true;
  }
  s->wait(-1);
  const int code = ended_by_us ? 0 : s->exit_code();

  const FileStamp after = stamp(output);
  const bool written = after.exists && (!before.exists || after.mtime.tv_sec != before.mtime.tv_sec ||
                                        after.mtime.tv_nsec != before.mtime.tv_nsec);
  if (!written) return code;  // the agent said why (a filter matched nothing, ...)
  if (WIFSIGNALED(s->wait_status()) && !ended_by_us) {
    std::fprintf(stderr, "tramway: %s %s: the trace ends where it was last flushed\n", command[0].c_str(),
                 s->describe().c_str());
  }
  std::fprintf(stderr, "tramway: trace in %s; see it with: tramway report %s\n", output.c_str(), shell_quote(output).c_str());
  return code;
}

int run(const std::vector<std::string>& command) {
  if (command.empty()) return fail("run needs a program: tramway run -- PROG ARGS...", 2);
  Result<Prepared> p = prepare(command[0]);
  if (!p.ok()) return fail(p.status());
  Launch l = with_agent(p->agent, p->path, command);
  l.env.emplace_back("TRAMWAY_CONTROL", "1");
  Result<Supervisor> s = Supervisor::start(l);
  if (!s.ok()) return fail(s.status());
  s->before_reap(remove_stale_socket);
  // Say how to attach only once the agent listens, so the hint can be acted on at once.
  if (wait_for_agent(*s)) {
    std::fprintf(stderr,
                 "tramway: %s is running as pid %d; trace it with: tramway live %d attach 'GLOB' "
                 "(tramway list %d lists the functions)\n",
                 command[0].c_str(), static_cast<int>(s->pid()), static_cast<int>(s->pid()), static_cast<int>(s->pid()));
  }
  s->wait(-1);
  return s->exit_code();
}

// ---- live ----

// Prints a reply as it came (ok to stdout, error to stderr); 0 on ok, 1 on error.
int print_reply(const Result<control::Reply>& r) {
  if (!r.ok()) return fail(r.status().message());
  const std::string wire = control::format_reply(*r);
  std::fputs(wire.c_str(), r->ok ? stdout : stderr);
  return r->ok ? 0 : 1;
}

int live(pid_t pid, control::Verb verb, const std::string& arg, const std::string& output, const AttachOptions& attach) {
  // Only attach loads an agent into a process without one: the other requests have nothing to do there.
  Result<control::Connection> c = Status::error("");
  if (verb == control::Verb::attach) {
    Result<Attached> a = connect_or_inject(pid, attach);
    if (!a.ok()) return fail(a.status().message());
    c = std::move(a->connection);
  } else {
    c = control::Connection::open(pid, 120000);
  }
  if (!c.ok()) return fail(c.status().message());
  std::string started;  // the file of a recording this command started
  if (verb == control::Verb::attach) {
    Result<control::Reply> st = c->call({control::Verb::status, {}});
    if (!st.ok() || !st->ok) return print_reply(st);
    if (st->text != "recording") {
      started = absolute(output.empty() ? "tramway-" + std::to_string(pid) + ".trace" : output);
      if (int rc = print_reply(c->call({control::Verb::start, started})); rc != 0) return rc;
    }
  }
  const int rc = print_reply(c->call({verb, arg}));
  if (rc != 0 && !started.empty()) {
    // A mistyped glob should not leave an empty recording running.
    Result<control::Reply> r = c->call({control::Verb::stop, {}});
    if (r.ok() && r->ok) unlink(started.c_str());
  }
  return rc;
}

// ---- report ----

int report(trace::report::Options o) {
  if (Status s = trace::report::run(o, stdout); !s.ok()) return fail(s.message());
  return 0;
}

int main_cli(int argc, char** argv) {
  // CLI11 2.1 keeps parsing options after a subcommand's `--`; split there ourselves.
  std::vector<std::string> tail;
  int cli_argc = argc;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--") == 0) {
      tail.assign(argv + i + 1, argv + argc);
      cli_argc = i;
      break;
    }
  }

  CLI::App app{"tramway: trace the functions of a program (patchable entries, -fpatchable-function-entry=13,8, "
               "or relocated prologues)", "tramway"};
  app.set_version_flag("--version", "tramway " TRAMWAY_VERSION);
  app.require_subcommand(1);
  app.footer(
      "Examples:\n"
      "  tramway list ./app 'app::*'\n"
      "  tramway record -f 'app::*' -o app.trace -- ./app --flag\n"
      "  tramway report app.trace --sort self\n"
      "  tramway run -- ./server        # then: tramway live PID attach 'handle_*'\n");

  std::string list_target, list_glob;
  bool list_all = false;
  CLI::App* list = app.add_subcommand(
      "list", "list the functions tramway can hook in a program (PROG) or in a running agent (PID)");
  list->add_option("target", list_target, "a program to start (it exits before its main), or the PID of a program started by `tramway run`/`record`")->required();
  list->add_option("glob", list_glob, "shell glob on function names (default: all)");
  AttachOptions attach_opts;
  list->add_flag("--allow-seccomp", attach_opts.allow_seccomp, "load the agent into PID even though it runs under a seccomp filter");
  list->add_flag("--all", list_all,
                 "every function, also those that cannot be hooked, with how each can be (patchable, relocatable, "
                 "trap, or refused and why), then a count of each kind per object");

  RecordArgs rec;
  std::vector<std::string> rec_command;
  CLI::App* record_cmd = app.add_subcommand("record", "run a program and record its function calls to a trace file");
  // One glob per -f, so that `-f GLOB PROG` does not take PROG for a second glob.
  record_cmd->add_option("-f,--filter", rec.filters, "trace the functions matching this glob (repeatable; default: every function of the program itself, "
                         "not of its libraries)")
      ->allow_extra_args(false);
  record_cmd->add_option("-x,--exclude", rec.excludes, "never trace the functions matching this glob (repeatable)")
      ->allow_extra_args(false);
  record_cmd->add_option("-D,--depth", rec.max_depth, "trace calls nested at most N traced calls deep")
      ->check(CLI::Range(1, 512));
  record_cmd->add_option("-t,--min-duration", rec.min_duration,
                         "write only the calls that last at least this long (e.g. 10us), and their callers")
      ->type_name("DURATION");
  record_cmd->add_option("-o,--output", rec.output, "the trace file")->capture_default_str();
  record_cmd->add_option("--duration", rec.duration, "record for S seconds (from when the agent is up), then end the program")->check(CLI::PositiveNumber);
  record_cmd->add_flag("--trap", rec.trap,
                       "also trace functions whose prologue cannot be relocated, through trap probes (an int3: "
                       "a signal a call)");
  record_cmd->add_option("command", rec_command, "-- PROG ARGS...");
  pid_t record_pid = 0;
  record_cmd->add_option("-p,--pid", record_pid,
                         "record a running process instead (loading the agent into it if it has none, and taking it "
                         "out again at the end); needs -f")
      ->check(CLI::PositiveNumber);
  record_cmd->add_flag("--allow-seccomp", attach_opts.allow_seccomp, "with -p: load the agent even under a seccomp filter");

  std::vector<std::string> run_command;
  CLI::App* run_cmd = app.add_subcommand("run", "run a program with the agent idle, to be traced later with `tramway live`");
  run_cmd->add_option("command", run_command, "-- PROG ARGS...");

  pid_t live_pid = 0;
  std::string live_glob, live_output;
  CLI::App* live_cmd = app.add_subcommand("live", "control the agent of a running program");
  live_cmd->add_option("pid", live_pid, "the program's process id")->required();
  live_cmd->require_subcommand(1);
  CLI::App* live_attach = live_cmd->add_subcommand("attach", "trace the functions matching GLOB (starts recording if needed)");
  live_attach->add_option("glob", live_glob, "shell glob on function names")->required();
  live_attach->add_option("-o,--output", live_output, "the trace file if recording starts now (default: tramway-PID.trace)");
  std::string live_detach_glob;
  CLI::App* live_detach = live_cmd->add_subcommand("detach", "stop tracing the functions of an earlier attach GLOB");
  live_detach->add_option("glob", live_detach_glob, "the glob given to attach")->required();
  live_attach->add_flag("--allow-seccomp", attach_opts.allow_seccomp,
                        "load the agent even though the process runs under a seccomp filter");
  CLI::App* live_status = live_cmd->add_subcommand("status", "show what is being recorded");
  CLI::App* live_stop = live_cmd->add_subcommand("stop", "stop recording and close the trace file");
  CLI::App* live_eject = live_cmd->add_subcommand(
      "eject", "stop recording, detach everything, give the signal handlers back and unload the agent (the process runs on)");

  trace::report::Options rep;
  std::string sort = "total";
  CLI::App* report_cmd = app.add_subcommand("report", "summarise a trace file; write Perfetto, pprof, Chrome JSON, folded stacks or an SVG flame graph");
  report_cmd->add_option("file", rep.input, "the trace file")->required();
  report_cmd->add_option("--sort", sort, "calls, total, self, mean, p50, p90, p99, max or name")
      ->check(CLI::IsMember({"calls", "total", "self", "mean", "p50", "p90", "p99", "max", "name"}))
      ->capture_default_str();
  report_cmd->add_option("--limit", rep.limit, "table rows (0: all)")->capture_default_str();
  report_cmd->add_flag("--per-thread", rep.per_thread, "one table per thread");
  std::string since, until, min_duration;
  report_cmd->add_option("--since", since, "only calls that start this long after the recording began (e.g. 1.5s)")
      ->type_name("DURATION");
  report_cmd->add_option("--until", until, "only calls that start before this; calls still running then end there")
      ->type_name("DURATION");
  report_cmd->add_option("-t,--min-duration", min_duration, "only calls that last at least this long (e.g. 10us)")
      ->type_name("DURATION");
  report_cmd->add_option("--tid", rep.filter.tids, "only this thread (repeatable)");
  report_cmd->add_flag("--calls", rep.calls, "print the call log of every thread (indented, with durations)");
  report_cmd->add_option("--diff", rep.diff, "print per-function changes from this trace to the FILE given here")
      ->type_name("FILE");
  report_cmd->add_option("--histogram", rep.histograms,
                         "print the log-scale latency histogram of each function matching GLOB (repeatable)")
      ->type_name("GLOB");
  report_cmd->add_option("--perfetto", rep.perfetto, "write a Perfetto protobuf trace (.pftrace) here");
  report_cmd->add_option("--pprof", rep.pprof, "write a gzipped pprof profile (calls and wall time per stack) here");
  report_cmd->add_option("--chrome", rep.chrome, "write Chrome trace-event JSON here (Perfetto UI reads it too)");
  report_cmd->add_option("--folded", rep.folded, "write folded stacks here");
  report_cmd->add_option("--svg", rep.svg, "write an SVG flame graph here");
  report_cmd->add_option("--max-depth", rep.max_depth,
                         "stack depth the folded stacks and flame graph show; deeper frames are one "
                         "'[truncated]' frame (0: no bound: outputs can grow with depth squared)")
      ->capture_default_str();

  try {
    app.parse(cli_argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (!tail.empty() && !record_cmd->parsed() && !run_cmd->parsed()) {
    return fail("`--` is for `tramway record` and `tramway run`", 2);
  }

  if (list->parsed()) {
    return is_pid(list_target) ? list_process(static_cast<pid_t>(std::stol(list_target)), list_glob, list_all, attach_opts)
                               : list_program(list_target, list_glob, list_all);
  }
  if (record_cmd->parsed()) {
    rec_command.insert(rec_command.end(), tail.begin(), tail.end());
    if (record_pid > 0) {
      if (!rec_command.empty()) return fail("record -p PID records a running process: give no program", 2);
      RecordProcessArgs pa;
      pa.excludes = rec.excludes;
      pa.max_depth = rec.max_depth;
      pa.trap = rec.trap;
      if (!rec.min_duration.empty()) {
        auto ns = trace::report::parse_duration(rec.min_duration);
        if (!ns.ok()) return fail("-t: " + ns.status().message(), 2);
        pa.min_duration_ns = *ns;
      }
      pa.filters = rec.filters;
      pa.output = absolute(rec.output);
      pa.duration = rec.duration;
      pa.attach = attach_opts;
      return record_process(record_pid, pa);
    }
    return record(rec, rec_command);
  }
  if (run_cmd->parsed()) {
    run_command.insert(run_command.end(), tail.begin(), tail.end());
    return run(run_command);
  }
  if (live_cmd->parsed()) {
    if (live_attach->parsed()) return live(live_pid, control::Verb::attach, live_glob, live_output, attach_opts);
    if (live_detach->parsed()) return live(live_pid, control::Verb::detach, live_detach_glob, {}, attach_opts);
    if (live_status->parsed()) return live(live_pid, control::Verb::status, {}, {}, attach_opts);
    if (live_stop->parsed()) return live(live_pid, control::Verb::stop, {}, {}, attach_opts);
    if (live_eject->parsed()) return eject(live_pid);
  }
  if (report_cmd->parsed()) {
    using trace::report::SortKey;
    rep.sort = sort == "calls" ? SortKey::calls
               : sort == "self" ? SortKey::self
               : sort == "mean" ? SortKey::mean
               : sort == "p50"  ? SortKey::p50
               : sort == "p90"  ? SortKey::p90
               : sort == "p99"  ? SortKey::p99
               : sort == "max"  ? SortKey::max
               : sort == "name" ? SortKey::name
                                : SortKey::total;
    for (const auto& [text, field, flag] : {std::tuple{&since, &rep.filter.since_ns, "--since"},
                                            std::tuple{&until, &rep.filter.until_ns, "--until"},
                                            std::tuple{&min_duration, &rep.filter.min_duration_ns, "--min-duration"}}) {
      if (text->empty()) continue;
      auto ns = trace::report::parse_duration(*text);
      if (!ns.ok()) return fail(std::string(flag) + ": " + ns.status().message(), 2);
      *field = *ns;
    }
    if (rep.filter.until_ns <= rep.filter.since_ns) {
      return fail("--until must come after --since (" + until + " is not after " + (since.empty() ? "0" : since) + ")", 2);
    }
    return report(rep);
  }
  return 2;
}

}  // namespace
}  // namespace tramway::cli

int main(int argc, char** argv) {
  try {
    return tramway::cli::main_cli(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tramway: %s\n", e.what());
    return 1;
  }
}
