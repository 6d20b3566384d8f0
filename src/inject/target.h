// inject/target.h — what the injector must know of a process before it touches it, and every
// reason to refuse it, each with what the user can do about it.
//
// read_target() only reads /proc (and the target's C library file); it never stops or signals
// the process. check_injectable() refuses, with an actionable message: a process that is gone,
// a zombie or stopped; one another tracer holds (gdb, strace: TracerPid); one of another user
// when we lack CAP_SYS_PTRACE; a set-user-ID/set-group-ID or non-dumpable one; Yama's
// ptrace_scope forbidding the attach (the sysctl and the capability named); a statically linked
// program, another C library than glibc (musl), a glibc without dlopen in libc.so.6 (< 2.34) or
// a 32-bit process; a seccomp filter (strict mode, or a filter, which can kill the process on
// the loader's system calls: the message says how to check and override).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tramway/status.h"

namespace tramway::inject {

struct Mapping {
  std::uintptr_t start = 0, end = 0;
  std::uint64_t offset = 0;
  std::string perms, path;
};
std::vector<Mapping> read_maps(pid_t pid);

struct TargetFacts {
  pid_t pid = 0;
  std::string name;        // comm
  char state = '?';        // of the main thread
  uid_t ruid = 0, euid = 0;
  gid_t rgid = 0, egid = 0;
  pid_t tracer = 0;        // TracerPid
  int seccomp = 0;         // 0 none, 1 strict, 2 filter
  bool non_dumpable = false;
  bool elf64 = true;
  std::string libc_path;   // as in maps; empty when none
  std::uintptr_t libc_base = 0;  // load bias of libc.so.6
  bool musl = false;
  // The caller's side, read with the target's facts so that checks are pure functions of them.
  uid_t caller_euid = 0;
  bool caller_capable = false;  // CAP_SYS_PTRACE in the caller's effective set
  int yama_scope = -1;          // kernel.yama.ptrace_scope, -1 without Yama
};
Result<TargetFacts> read_target(pid_t pid);

struct CheckOptions {
  bool allow_seccomp = false;  // the user read the filter and says the loader's calls pass
};
Status check_injectable(const TargetFacts& t, const CheckOptions& options = {});

// /proc/sys/kernel/yama/ptrace_scope (-1 when there is no Yama).
int yama_ptrace_scope();
// Whether the caller has CAP_SYS_PTRACE in its effective set.
bool has_ptrace_capability();

// The threads of `pid` (/proc/PID/task).
std::vector<pid_t> threads_of(pid_t pid);

}  // namespace tramway::inject
