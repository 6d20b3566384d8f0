// inject/injector.h — loading the tramway agent into a running process that was started
// without it, and unloading it again (DESIGN.md layer 6; the command's `live`, `list PID` and
// `record -p` use it when a process has no agent socket).
//
// inject_agent() checks the target (inject/target.h: every refusal says what to do), picks one
// thread — preferably one asleep in a system call the kernel restarts, else one running outside
// the C library and the loader, whose locks the loader may need — and makes it call, through a
// Hijack (inject/remote_call.h): dlopen(libtramway), dlopen(agent), then the agent's
// tramway_agent_injected(), which adopts the process as it is (signal handlers, threads,
// objects) and starts the control socket with the target's own credentials. Only that thread
// pauses, and only for those calls; the others never stop. Nothing is left behind on failure
// but what the loader keeps (a library that loaded keeps its mapping until unload_agent).
//
// unload_agent() is the last step of `eject`, once the agent has put everything back and its
// threads are gone: the same kind of call makes the loader drop both libraries (dlclose).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "inject/target.h"
#include "tramway/status.h"

namespace tramway::inject {

struct AgentFiles {
  std::string libtramway;  // absolute paths, as the target's loader will open them
  std::string agent;
};

struct InjectOptions {
  CheckOptions check;
  std::chrono::milliseconds stop_timeout{2000};  // for the chosen thread to stop
  std::chrono::milliseconds call_timeout{30000}; // for each call to return
};

struct InjectReport {
  pid_t tid = 0;              // the thread that made the calls
  std::int64_t pause_ns = 0;  // how long it was stopped
  long syscall = -1;          // the system call it was stopped in (-1: none)
  bool restarted = false;     // that call restarted (by the kernel or by hand)
  bool already = false;       // the agent was loaded already (its socket was missing)
};

Result<InjectReport> inject_agent(pid_t pid, const AgentFiles& files, const InjectOptions& options = {});

// Whether the agent's library is mapped into `pid` (an injected or preloaded agent).
bool agent_mapped(pid_t pid, const AgentFiles& files);

// Drops the loader's references to the agent and libtramway (each opened once by inject_agent)
// so that they unload. Fails when they are still mapped afterwards (e.g. preloaded at start).
Result<InjectReport> unload_agent(pid_t pid, const AgentFiles& files, const InjectOptions& options = {});

}  // namespace tramway::inject
