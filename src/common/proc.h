// Reading threads of this process through /proc without disturbing them.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tramway::common {

pid_t current_tid() noexcept;  // async-signal-safe

// Reads a small /proc file into buf (NUL-terminated); false if it cannot be read. One open,
// one read, one close: no allocation.
bool read_small(const char* path, char* buf, std::size_t cap);

// A decimal (optionally negative) or hexadecimal number at the start of s, after blanks. No
// libc call: these run where libc's parsers may not (the signal router installs itself from
// a sigaction call that AddressSanitizer's initialisation makes, whose atoi is not ready).
long long parse_decimal(const char* s) noexcept;
std::uint64_t parse_hex(const char* s) noexcept;

// Every thread of the process (/proc/self/task), the caller included.
std::vector<pid_t> list_threads();

struct TaskProbe {
  bool gone = false;     // the thread no longer exists
  bool running = false;  // on a CPU or runnable: its user PC is not observable
  char state = '?';      // from /proc/self/task/TID/stat: R, S, D, T (stopped), t (traced), ...
  long syscall = -1;     // the system call it is blocked in, -1 if none
  std::uintptr_t sp = 0, pc = 0;  // user SP and PC, valid when !running
};
// /proc/self/task/TID/syscall shows the user PC of a thread that is not running, without
// stopping or signalling it. `pc_only` skips /proc/self/task/TID/stat (state stays '?'):
// one file read instead of two, for proofs that do not print the state.
enum class Probe { with_state, pc_only };
TaskProbe probe_task(pid_t tid, Probe what = Probe::with_state);

std::string thread_name(pid_t tid);

// Signal sets of a thread from /proc/self/task/TID/status (bit n-1 is signal n), for
// diagnostics: why a thread did not run a handler.
struct SignalSets {
  bool known = false;
  std::uint64_t pending = 0, shared_pending = 0, blocked = 0;
};
SignalSets signal_sets(pid_t tid);

}  // namespace tramway::common
