// tramway/trace.h — the function tracer: record entries and exits of hooked functions.
//
// One recording per process. start() opens the trace file (tramway/trace/format.h) and a
// flusher thread; attach(glob) hooks the matching functions (patchable entries and relocated
// prologues, and with RecordOptions::allow_trap trap probes too) so that every call
// records an entry event and, through a per-thread shadow stack of return addresses, an exit
// event; detach(glob) removes them; stop() detaches everything, drains every thread's ring
// buffer and closes the file. Guarantees: events a full ring cannot take are counted as lost
// and written to the file (never dropped silently); a frame still hijacked when its function
// is detached returns normally; C++ exceptions, longjmp and thread exit through traced frames
// are handled (the skipped frames get `unwound` events). Not async-signal-safe, except that
// traced functions may run in signal handlers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tramway/status.h"

namespace tramway::trace {

struct RecordOptions {
  std::string output;                     // the trace file to create (truncated if it exists)
  std::size_t ring_events = 1u << 18;     // per-thread ring capacity, in events (power of two)
  unsigned flush_interval_ms = 10;        // how often the flusher drains the rings
  bool allow_trap = false;                // also trace functions only a trap probe can hook (a signal a call)
  std::vector<std::string> exclude{};     // globs: functions matching one are never traced by attach
  std::uint32_t max_depth = 0;            // calls nested deeper than this many traced calls are not
                                          // recorded (0: no limit but the shadow stack's, 512)
  std::uint64_t min_duration_ns = 0;      // only calls at least this long are written (their callers
                                          // are then too); the others cost their events, not the file
};

// Opens `options.output` and starts recording (no function is traced until attach).
Status start(const RecordOptions& options);

// Traces every function that can be hooked whose demangled name matches `glob` (fnmatch),
// entry and exit. Returns how many functions that covers. Fails if nothing matches or the glob is
// attached already.
// With Scope::executable, only the functions of the main executable: `tramway record` without
// -f, which should not hook every function of the C library and the rest.
enum class Scope { all, executable };
Result<std::size_t> attach(const std::string& glob, Scope scope = Scope::all);

// Stops tracing the functions of an earlier attach(glob); its events recorded so far stay.
Status detach(const std::string& glob);

struct Stats {
  bool recording = false;
  std::string output;
  std::vector<std::string> globs;  // attached
  std::size_t functions = 0;       // functions traced now
  std::uint64_t events = 0;        // written to the file so far
  std::uint64_t lost = 0;          // could not be recorded (full rings)
  std::size_t threads = 0;         // threads that recorded something
  std::uint64_t calls_filtered = 0;  // calls not written, shorter than RecordOptions::min_duration_ns
};
Stats stats();

// Drains every ring into the file now.
Status flush();

// Detaches everything, drains the rings, writes the end chunk and closes the file.
Status stop();

}  // namespace tramway::trace
