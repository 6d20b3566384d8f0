// The tasks-flavor half of suite "grace": generated code that readers call directly, with no
// marker, and a writer that replaces, retires, waits (tasks flavor) and poisons it.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "suite.h"

namespace tramway::torture {

struct TasksTotals {
  std::uint64_t retired = 0, poisoned = 0, passes = 0, errors = 0;
  std::array<std::uint64_t, 4> pipe{};
  std::string first_error;
};

// Starts `readers` reader threads and one writer; stop() joins them and returns the totals.
class TasksTorture {
 public:
  TasksTorture();
  ~TasksTorture();
  bool start(const Options& o, int readers, std::string* error);
  TasksTotals stop();
  // Called from the suite's SIGPROF handler on a tasks reader thread: runs published code
  // nested over whatever the thread was running (often generated code), sometimes twice.
  static void from_signal_handler();

  struct State;  // defined in tasks_readers.cc

 private:
  State* s_;
};

}  // namespace tramway::torture
