// tools/tramway/attach.h — reaching the agent of a running process, loading it first when the
// process was started without tramway (inject/injector.h), and taking it out again (eject).
//
// connect_or_inject() connects to the agent's socket; where there is none it injects the agent
// (saying so on stderr: which thread paused, for how long) and connects. eject() asks the
// agent to put the process back, waits for tramway's threads to end and unloads the libraries
// (an agent preloaded at start stays loaded, idle). record_process() is `tramway record -p`.
#pragma once

#include <sys/types.h>

#include <cstdint>

#include <string>
#include <vector>

#include "agent/control_io.h"
#include "tramway/status.h"

namespace tramway::cli {

struct AttachOptions {
  bool allow_seccomp = false;
  bool quiet = false;  // no note on stderr when the agent is injected
};

// The connection, and whether this call injected the agent.
struct Attached {
  control::Connection connection;
  bool injected = false;
};
Result<Attached> connect_or_inject(pid_t pid, const AttachOptions& options);

// `tramway live PID eject`: 0, or 1 with the reason on stderr.
int eject(pid_t pid);

struct RecordProcessArgs {
  std::vector<std::string> filters;
  std::string output;  // absolute
  double duration = 0;  // 0: until the process exits or we are interrupted
  // The recording's settings, sent as `option` requests before `start` (agent/control.h).
  std::vector<std::string> excludes;
  unsigned max_depth = 0;        // 0: none
  std::uint64_t min_duration_ns = 0;
  bool trap = false;
  AttachOptions attach;
};
// `tramway record -p PID`: records until the duration is over, the process exits or SIGINT/
// SIGTERM, then stops, and ejects the agent if this command injected it.
int record_process(pid_t pid, const RecordProcessArgs& args);

}  // namespace tramway::cli
