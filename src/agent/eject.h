// agent/eject.h — putting a process back as it was before the agent came (`tramway live PID
// eject`), so that the injector can unload the libraries (inject/injector.h, unload_agent).
//
// release_process() runs on the control thread once the recording is stopped (every hook
// detached, the flusher joined). It waits (bounded) until no thread is inside a call whose
// return the tracer hijacked, gives every signal back to the program's own handler, ends the
// grace engine's callback thread, and then watches every other thread out of tramway's own
// code (the three libraries' text and the code arenas: the tasks-flavor condition, since a
// thread may still be returning through a stub) before it says yes. With `unloading` it also
// marks the process as ejecting (common/eject.h), so that the libraries' destructors unmap
// what they kept. On failure nothing was unloaded and the process runs on; tramway may stay
// partly given back (the message says what to do).
#pragma once

#include <chrono>
#include <string>

#include "tramway/status.h"

namespace tramway::agent {

Result<std::string> release_process(bool unloading, std::chrono::milliseconds budget);

}  // namespace tramway::agent
