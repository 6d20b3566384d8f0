// libtramway_agent.so — preloaded by the `tramway` command (or by hand with LD_PRELOAD) to
// list, record or control a program from inside it.
//
// Preloading by hand: list libtramway.so.0 before the agent, as the command does. Loaded only
// as the agent's dependency it comes after libc in the lookup order and its interposers
// (sigaction, pthread_sigmask, ...) lose: a program that blocks all signals would then block
// SIGTRAP too. (The unwinder's wrappers are compiled into the agent for the same reason;
// preloading libtramway_trace.so.0 as well would run them twice.)
//
// Its constructor runs before the program's own constructors and main. It reads, then removes
// from the environment, the variables below, and removes itself (and the libraries the
// command preloaded with it, TRAMWAY_PRELOAD) from LD_PRELOAD, so the program's children run
// untraced and without the agent:
//   TRAMWAY_LIST=GLOB       print the functions matching GLOB that can be hooked (patchable
//                           entries and relocatable prologues: name, address, object), sorted
//                           by name, and _exit(0) before main; _exit(1) if GLOB matches none.
//                           With TRAMWAY_LIST_ALL=1, every function of every kind (a fourth
//                           column, the hook kind, and a fifth, the reason, for trap and
//                           refused), then one `# OBJECT: N patchable, ...` line per object.
//   TRAMWAY_OUTPUT=FILE     record to FILE; TRAMWAY_FILTERS holds one glob per line (default:
//                           every function of the executable itself). A failure prints
//                           `tramway: ...` and _exit(2)s before main.
//   TRAMWAY_CONTROL=1       serve the control socket (control_io.h); failure: _exit(2).
//   TRAMWAY_TRAP=1          recordings also trace functions only a trap probe can hook
//   TRAMWAY_EXCLUDE         one glob per line: recordings never trace the functions matching one
//   TRAMWAY_MAX_DEPTH=N     recordings leave calls nested deeper than N traced calls untraced
//   TRAMWAY_MIN_DURATION_NS=N  recordings write only the calls that last at least N ns
//   TRAMWAY_DURATION=S      stop recording S seconds after start; the program runs on untraced
//                           (`tramway record --duration` also ends the program, from outside).
// At exit (an atexit handler registered by the constructor, which glibc runs when it finalises
// this library: after the program's exit handlers and static destructors, before
// libtramway_trace, whose recorder it still needs, is finalised) the control socket is closed
// and a running recording is stopped, with a one-line summary on stderr. A fork()ed child does neither. Threads of the agent block every
// signal. Nothing throws out of the agent.
#include <dlfcn.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "agent/control.h"
#include "agent/control_io.h"
#include "agent/eject.h"
#include "common/eject.h"
#include "tramway/hooks.h"
#include "tramway/text/signal_router.h"
#include "tramway/trace.h"

namespace tramway::agent {
namespace {

// ---- environment ----

std::optional<std::string> take_env(const char* name) {
  const char* v = std::getenv(name);
  if (!v) return std::nullopt;
  std::string s = v;
  unsetenv(name);
  return s;
}

std::vector<std::string> split(const std::string& s, const char* separators) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t end = s.find_first_of(separators, pos);
    const std::string part = s.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (!part.empty()) out.push_back(part);
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  return out;
}

std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  return realpath(p.c_str(), buf) ? std::string(buf) : p;
}

// Removes this library and the entries the command added (`added`, colon-separated) from
// LD_PRELOAD, so that programs this one executes do not load the agent. True if this library
// was there (preloaded, not loaded later by dlopen).
bool remove_from_preload(const std::string& added) {
  const char* cur = std::getenv("LD_PRELOAD");
  if (!cur) return false;
  Dl_info info{};
  std::string self;
  if (dladdr(reinterpret_cast<void*>(&remove_from_preload), &info) && info.dli_fname) self = real_path(info.dli_fname);
  const std::vector<std::string> ours = split(added, ":");
  std::string kept;
  bool found = false;
  for (const std::string& e : split(cur, ": ")) {
    if (std::find(ours.begin(), ours.end(), e) != ours.end()) continue;
    if (!self.empty() && real_path(e) == self) {
      found = true;
      continue;
    }
    if (!kept.empty()) kept += ':';
    kept += e;
  }
  if (kept.empty()) unsetenv("LD_PRELOAD");
  else setenv("LD_PRELOAD", kept.c_str(), 1);
  return found;
}

[[noreturn]] void die(int code, const std::string& message) {
  std::fprintf(stderr, "tramway: %s\n", message.c_str());
  std::fflush(stderr);
  _exit(code);
}

std::string program_name() { return program_invocation_name ? program_invocation_name : "the program"; }

// ---- listing ----

// The listing of the functions matching `glob`, sorted by name: those that can be hooked
// (patchable entries and relocatable prologues), or with `all` every kind (hooks::HookKind),
// the kind and the reason on each line, followed by a summary line per object.
Result<std::vector<std::string>> list_lines(const std::string& glob, bool all, std::size_t* loaded = nullptr) {
  Result<std::vector<hooks::Function>> fns = hooks::functions(glob);
  if (!fns.ok()) return fns.status();
  if (loaded) *loaded = fns->size();
  std::vector<const hooks::Function*> hits;
  for (const hooks::Function& f : *fns) {
    if (all || hooks::can_hook(f.kind)) hits.push_back(&f);
  }
  std::sort(hits.begin(), hits.end(), [](const hooks::Function* a, const hooks::Function* b) {
    return a->name != b->name ? a->name < b->name : a->entry < b->entry;
  });
  std::vector<std::string> lines;
  lines.reserve(hits.size());
  std::vector<std::pair<std::string, std::array<std::size_t, 4>>> per_object;  // in order of first appearance
  for (const hooks::Function* f : hits) {
    std::string line = control::function_line(f->name, f->entry, f->object);
    if (all) {
      line += '\t';
      line += hooks::hook_kind_name(f->kind);
      if (!f->reason.empty()) line += '\t' + f->reason;
      auto it = std::find_if(per_object.begin(), per_object.end(), [&](const auto& o) { return o.first == f->object; });
      if (it == per_object.end()) it = per_object.insert(per_object.end(), {f->object, {}});
      ++it->second[static_cast<std::size_t>(f->kind)];
    }
    lines.push_back(std::move(line));
  }
  if (!lines.empty()) {
    std::sort(per_object.begin(), per_object.end());
    for (const auto& [object, n] : per_object) {
      lines.push_back("# " + object + ": " + std::to_string(n[0]) + " patchable, " + std::to_string(n[1]) +
                      " relocatable, " + std::to_string(n[2]) + " trap, " + std::to_string(n[3]) + " refused");
    }
  }
  return lines;
}

std::string no_match(const std::string& glob, std::size_t matched, bool all) {
  if (all || matched == 0) return "no function matches '" + glob + "'";
  return "no function that can be hooked matches '" + glob + "' (it matches " + std::to_string(matched) +
         " that cannot: `tramway list --all` says why)";
}

// Prints the functions `glob` matches (every kind with `all`) and exits: 0, or 1 when none does.
[[noreturn]] void list_mode(const std::string& glob_arg, bool all) {
  const std::string glob = glob_arg.empty() ? "*" : glob_arg;
  std::size_t matched = 0;
  Result<std::vector<std::string>> lines = list_lines(glob, all, &matched);
  if (!lines.ok()) die(2, lines.status().message());
  if (lines->empty()) die(1, no_match(glob, matched, all));
  for (const std::string& l : *lines) std::printf("%s\n", l.c_str());
  std::fflush(stdout);
  _exit(0);
}

// ---- recording ----

// The agent's state. Not destroyed while the process runs: the exit handler may run after
// this library's static destructors (their order against a constructor function's is not
// defined). An eject's unload frees it (free_state_at_unload).
struct State {
  std::mutex mu;  // serialises compound operations (start, stop + summary) between the control
                  // thread, the duration timer and the exit handler
  std::string output;  // the recording's file, as the agent started it
  std::size_t peak_functions = 0;
  bool allow_trap = false;  // TRAMWAY_TRAP=1: recordings may trace trap probes
  std::vector<std::string> exclude;  // TRAMWAY_EXCLUDE: globs recordings never trace
  std::uint32_t max_depth = 0;       // TRAMWAY_MAX_DEPTH: recordings' depth limit (0: none)
  std::uint64_t min_duration_ns = 0; // TRAMWAY_MIN_DURATION_NS: recordings write only calls this long
  // `option` requests (record -p): for the next recording only, on top of the defaults above.
  struct Next {
    std::vector<std::string> exclude;
    std::optional<std::uint32_t> max_depth;
    std::optional<std::uint64_t> min_duration_ns;
    bool allow_trap = false;
  } next;
  control::Server* server = nullptr;
  pid_t pid = 0;
  bool preloaded = false;   // loaded at start (LD_PRELOAD): it cannot be unloaded
  bool injected = false;    // started by tramway_agent_injected (inject/injector.h)
  bool exit_handler = false;
};
State* g_state = nullptr;
State& state() {
  static State* s = g_state = new State;
  return *s;
}

// Unloaded after an eject: the exit handler has run (the loader runs a library's atexit
// handlers at its dlclose) and nothing else of the agent will; priority 101 runs after them
// and after the static destructors. libtramway's own kept objects go with its unload
// (common/unload_freed.h).
__attribute__((destructor(101))) void free_state_at_unload() {
  if (!common::ejecting() || !g_state) return;
  delete g_state->server;  // stopped by the eject; stop() again only joins and closes nothing new
  delete g_state;
  g_state = nullptr;
}

Status start_recording(const std::string& file) {
  State& st = state();
  std::lock_guard lock(st.mu);
  if (const trace::Stats s = trace::stats(); s.recording) {
    return Status::error("already recording to " + (s.output.empty() ? st.output : s.output));
  }
  trace::RecordOptions o;
  o.output = file;
  o.allow_trap = st.allow_trap || st.next.allow_trap;
  o.exclude = st.exclude;
  o.exclude.insert(o.exclude.end(), st.next.exclude.begin(), st.next.exclude.end());
  o.max_depth = st.next.max_depth.value_or(st.max_depth);
  o.min_duration_ns = st.next.min_duration_ns.value_or(st.min_duration_ns);
  st.next = {};
  if (Status s = trace::start(o); !s.ok()) return Status::error("cannot record to " + file + ": " + s.message());
  st.output = file;
  st.peak_functions = 0;
  return {};
}

// `option NAME [VALUE]`: one setting of the next recording.
Status set_option(const std::string& arg) {
  const std::size_t space = arg.find(' ');
  const std::string name = arg.substr(0, space), value = space == std::string::npos ? "" : arg.substr(space + 1);
  State& st = state();
  std::lock_guard lock(st.mu);
  auto number = [&](unsigned long long lo, unsigned long long hi) -> std::optional<unsigned long long> {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || v < lo || v > hi) return std::nullopt;
    return v;
  };
  if (name == "exclude" && !value.empty()) {
    st.next.exclude.push_back(value);
  } else if (name == "max-depth") {
    const auto d = number(1, 512);
    if (!d) return Status::error("max-depth '" + value + "' is not a depth from 1 to 512");
    st.next.max_depth = static_cast<std::uint32_t>(*d);
  } else if (name == "min-duration") {
    const auto ns = number(0, UINT64_MAX);
    if (!ns) return Status::error("min-duration '" + value + "' is not a number of nanoseconds");
    st.next.min_duration_ns = *ns;
  } else if (name == "trap" && value.empty()) {
    st.next.allow_trap = true;
  } else {
    return Status::error("unknown option '" + arg + "' (options: exclude GLOB, max-depth N, min-duration NS, trap)");
  }
  return {};
}

Result<std::size_t> attach(const std::string& glob, trace::Scope scope = trace::Scope::all) {
  Result<std::size_t> n = trace::attach(glob, scope);
  if (!n.ok()) return n.status();
  State& st = state();
  std::lock_guard lock(st.mu);
  st.peak_functions = std::max(st.peak_functions, trace::stats().functions);
  return n;
}

// Stops the recording; the summary line (without "tramway: ") or an error.
Result<std::string> stop_recording() {
  State& st = state();
  std::lock_guard lock(st.mu);
  const trace::Stats before = trace::stats();
  if (!before.recording) return Status::error("not recording");
  st.peak_functions = std::max(st.peak_functions, before.functions);
  const Status stopped = trace::stop();
  // Final counts: whichever the recorder reports last (it may or may not reset them at stop).
  const trace::Stats after = trace::stats();
  const std::string file = before.output.empty() ? st.output : before.output;
  if (!stopped.ok()) return Status::error("stopping the recording to " + file + " failed: " + stopped.message());
  std::string filtered;
  if (after.calls_filtered > 0) filtered = "; " + std::to_string(after.calls_filtered) + " shorter calls not written";
  return "recorded " + std::to_string(std::max(before.events, after.events)) + " events (" +
         std::to_string(std::max(before.lost, after.lost)) + " lost) of " + std::to_string(st.peak_functions) +
         " functions in " + std::to_string(std::max(before.threads, after.threads)) + " threads to " + file + filtered;
}

void print_stop() {
  Result<std::string> r = stop_recording();
  if (r.ok()) std::fprintf(stderr, "tramway: %s\n", r->c_str());
  else if (r.status().message() != "not recording") std::fprintf(stderr, "tramway: %s\n", r.status().message().c_str());
}

// ---- control requests ----

control::Reply status_reply() {
  State& st = state();
  std::lock_guard lock(st.mu);
  const trace::Stats s = trace::stats();
  std::vector<std::string> lines = {
      "pid " + std::to_string(getpid()),
      std::string("recording ") + (s.recording ? "yes" : "no"),
  };
  std::string wrapped = "handlers";  // the program's signal handlers behind the router's wrapper
  for (int sig : text::detail::wrapped_signals()) {
    wrapped += ' ';
    wrapped += std::to_string(sig);  // piecewise: GCC 12 -O3 warns falsely (-Wrestrict) on " " + string
  }
  lines.push_back(wrapped);
  if (s.recording) {
    lines.push_back("output " + (s.output.empty() ? st.output : s.output));
    lines.push_back("functions " + std::to_string(s.functions));
    lines.push_back("events " + std::to_string(s.events));
    lines.push_back("lost " + std::to_string(s.lost));
    lines.push_back("threads " + std::to_string(s.threads));
    for (const std::string& g : s.globs) lines.push_back("glob " + g);
  }
  return control::Reply::success(s.recording ? "recording" : "idle", std::move(lines));
}

void stop_timer();

// Stops the recording, puts the process back (agent/eject.h) and ends the server after the reply.
control::Reply eject_reply() {
  State& st = state();
  stop_timer();
  std::string recorded;
  if (trace::stats().recording) {
    Result<std::string> r = stop_recording();
    if (!r.ok()) return control::Reply::failure("cannot eject: " + r.status().message());
    recorded = *r + "; ";
  }
  const bool unloading = st.injected && !st.preloaded;
  Result<std::string> released = release_process(unloading, std::chrono::seconds(10));
  if (!released.ok()) return control::Reply::failure(released.status().message());
  control::Reply reply = control::Reply::success(
      "ejected: " + recorded + *released +
      (unloading ? "" : "; the agent stays loaded, idle (it was preloaded at start; the loader never unloads those)"),
      {unloading ? "unload yes" : "unload no"});
  reply.last = true;
  return reply;
}

control::Reply handle(const control::Request& req) {
  using control::Reply;
  switch (req.verb) {
    case control::Verb::attach: {
      if (!trace::stats().recording) return Reply::failure("not recording (send 'start FILE' first)");
      Result<std::size_t> n = attach(req.arg);
      if (!n.ok()) return Reply::failure(n.status().message());
      return Reply::success("attached '" + req.arg + "': " + std::to_string(*n) + " functions");
    }
    case control::Verb::detach: {
      if (Status st = trace::detach(req.arg); !st.ok()) return Reply::failure(st.message());
      return Reply::success("detached '" + req.arg + "'");
    }
    case control::Verb::status:
      return status_reply();
    case control::Verb::stop: {
      Result<std::string> r = stop_recording();
      if (!r.ok()) return Reply::failure(r.status().message());
      return Reply::success("stopped: " + *r);
    }
    case control::Verb::list:
    case control::Verb::list_all: {
      const bool all = req.verb == control::Verb::list_all;
      const std::string glob = req.arg.empty() ? "*" : req.arg;
      std::size_t loaded = 0;
      Result<std::vector<std::string>> lines = list_lines(glob, all, &loaded);
      if (!lines.ok()) return Reply::failure(lines.status().message());
      if (lines->empty()) return Reply::failure(no_match(glob, loaded, all));
      return Reply::success("functions", std::move(*lines));
    }
    case control::Verb::start: {
      if (Status st = start_recording(req.arg); !st.ok()) return Reply::failure(st.message());
      return Reply::success("recording to " + req.arg);
    }
    case control::Verb::eject:
      return eject_reply();
    case control::Verb::option:
      if (Status st = set_option(req.arg); !st.ok()) return Reply::failure(st.message());
      return Reply::success("option " + req.arg + " (for the next recording)");
  }
  return Reply::failure("unhandled request");
}

control::Reply handle_safely(const control::Request& req) noexcept {
  try {
    return handle(req);
  } catch (...) {
    return control::Reply::failure("the agent ran out of memory handling the request");
  }
}

// ---- the duration timer ----

struct Timer {
  pthread_t thread{};
  int wake[2] = {-1, -1};
  int timeout_ms = 0;
  bool running = false;

  static void* main(void* self) {
    auto* t = static_cast<Timer*>(self);
    pollfd p{t->wake[0], POLLIN, 0};
    int r;
    while ((r = poll(&p, 1, t->timeout_ms)) < 0 && errno == EINTR) {
    }
    if (r == 0) {  // the time is up, not a wake-up at exit
      try {
        print_stop();
      } catch (...) {
      }
    }
    return nullptr;
  }
};

Timer g_timer;  // trivially destructible

void stop_timer() {
  if (!g_timer.running) return;
  const char byte = 1;
  if (write(g_timer.wake[1], &byte, 1) == 1) pthread_join(g_timer.thread, nullptr);
  g_timer.running = false;
}

// The thread inherits the mask: block every signal so that none meant for the program lands here.
int start_thread_blocking_signals(pthread_t* thread, void* (*fn)(void*), void* arg) {
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  const int err = pthread_create(thread, nullptr, fn, arg);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return err;
}

void at_exit() noexcept {
  State& st = state();
  if (getpid() != st.pid) return;  // a fork()ed child: the recording and the socket are the parent's
  try {
    stop_timer();
    if (st.server) st.server->stop();
    print_stop();
  } catch (...) {
  }
  std::fflush(stderr);
}

// Once: at exit, or at dlclose after an eject (glibc runs a library's atexit handlers then).
void register_exit_handler() {
  State& st = state();
  if (st.exit_handler) return;
  st.exit_handler = true;
  std::atexit([] { at_exit(); });
}

[[noreturn]] void fail_start(const char* output, const std::string& message) {
  if (state().server) state().server->stop();
  if (output) {
    (void)trace::stop();
    unlink(output);
  }
  die(2, message);
}

void init() {
  const std::optional<std::string> list = take_env("TRAMWAY_LIST");
  const std::optional<std::string> list_all = take_env("TRAMWAY_LIST_ALL");
  const std::optional<std::string> output = take_env("TRAMWAY_OUTPUT");
  const std::optional<std::string> filters = take_env("TRAMWAY_FILTERS");
  const std::optional<std::string> control = take_env("TRAMWAY_CONTROL");
  const std::optional<std::string> duration = take_env("TRAMWAY_DURATION");
  const std::optional<std::string> trap = take_env("TRAMWAY_TRAP");
  const std::optional<std::string> exclude = take_env("TRAMWAY_EXCLUDE");
  const std::optional<std::string> max_depth = take_env("TRAMWAY_MAX_DEPTH");
  const std::optional<std::string> min_duration = take_env("TRAMWAY_MIN_DURATION_NS");
  const std::optional<std::string> preload = take_env("TRAMWAY_PRELOAD");
  State& st = state();
  st.preloaded = remove_from_preload(preload.value_or("")) || preload.has_value();
  st.pid = getpid();
  st.allow_trap = trap == "1";
  st.exclude = split(exclude.value_or(""), "\n");
  if (max_depth) {
    char* end = nullptr;
    const unsigned long d = std::strtoul(max_depth->c_str(), &end, 10);
    if (end == max_depth->c_str() || *end != '\0' || d == 0 || d > 512) {
      die(2, "TRAMWAY_MAX_DEPTH='" + *max_depth + "' is not a depth from 1 to 512");
    }
    st.max_depth = static_cast<std::uint32_t>(d);
  }
  if (min_duration) {
    char* end = nullptr;
    const unsigned long long ns = std::strtoull(min_duration->c_str(), &end, 10);
    if (end == min_duration->c_str() || *end != '\0') {
      die(2, "TRAMWAY_MIN_DURATION_NS='" + *min_duration + "' is not a number of nanoseconds");
    }
    st.min_duration_ns = ns;
  }

  if (list) list_mode(*list, list_all == "1");

  int duration_ms = 0;
  if (duration) {
    char* end = nullptr;
    const double s = std::strtod(duration->c_str(), &end);
    if (end == duration->c_str() || *end != '\0' || !(s > 0) || s > 1e6) {
      die(2, "TRAMWAY_DURATION='" + *duration + "' is not a positive number of seconds");
    }
    duration_ms = static_cast<int>(std::ceil(s * 1000));
  }

  // A failure from here on undoes what was started (fail_start: no empty trace, no stale
  // socket), then exits before main so that the user sees it at once.
  if (output) {
    if (Status s = start_recording(*output); !s.ok()) die(2, s.message());
    std::vector<std::string> globs = split(filters.value_or(""), "\n");
    // No filter: every function of the program itself, not of every library it loaded.
    const bool whole_program = globs.empty();
    if (whole_program) globs.push_back("*");
    for (const std::string& g : globs) {
      Result<std::size_t> n = tramway::agent::attach(g, whole_program ? trace::Scope::executable : trace::Scope::all);
      if (!n.ok()) fail_start(output->c_str(), "-f '" + g + "': " + n.status().message() + " (`tramway list " + program_name() + "` lists them)");
    }
  }

  if (control && !control->empty() && *control != "0") {
    Result<std::unique_ptr<control::Server>> s = control::Server::start(&handle_safely);
    if (!s.ok()) fail_start(output ? output->c_str() : nullptr, "control socket: " + s.status().message());
    st.server = s->release();  // never destroyed: see State
  }

  if (duration_ms > 0) {
    g_timer.timeout_ms = duration_ms;
    if (pipe2(g_timer.wake, O_CLOEXEC) != 0 ||
        start_thread_blocking_signals(&g_timer.thread, &Timer::main, &g_timer) != 0) {
      fail_start(output ? output->c_str() : nullptr, "cannot start the duration timer thread");
    }
    g_timer.running = true;
  }

  // Run when this library is finalised, before the libraries it depends on (libtramway_trace).
  if (output || st.server || duration_ms > 0) register_exit_handler();
}

__attribute__((constructor)) void agent_constructor() noexcept {
  try {
    init();
  } catch (...) {
    die(2, "the agent ran out of memory while starting");
  }
}

}  // namespace
}  // namespace tramway::agent

// Called by the injector (inject/injector.h) in a process that loaded the agent with dlopen:
// takes the signals (again, after an eject) and serves the control socket. Returns null, or
// why it could not.
extern "C" __attribute__((visibility("default"))) const char* tramway_agent_injected() noexcept {
  using namespace tramway;
  static char error[512];
  try {
    agent::State& st = agent::state();
    std::lock_guard lock(st.mu);
    if (Status s = text::detail::take_signals_again(); !s.ok()) {
      std::snprintf(error, sizeof error, "%s", s.message().c_str());
      return error;
    }
    st.injected = true;
    if (!st.preloaded) text::detail::bring_interposers_in_front();
    if (st.server && st.server->ended()) {  // ended by an eject: a new one
      st.server->stop();
      delete st.server;
      st.server = nullptr;
    }
    if (!st.server) {
      Result<std::unique_ptr<control::Server>> s = control::Server::start(&agent::handle_safely);
      if (!s.ok()) {
        std::snprintf(error, sizeof error, "control socket: %s", s.status().message().c_str());
        return error;
      }
      st.server = s->release();
    }
    agent::register_exit_handler();
    return nullptr;
  } catch (...) {
    return "the agent ran out of memory while starting";
  }
}
