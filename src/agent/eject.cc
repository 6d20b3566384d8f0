#include "agent/eject.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "common/eject.h"
#include "common/format.h"
#include "common/proc.h"
#include "common/tramway_mapping.h"
#include "tramway/text/signal_router.h"

namespace tramway::agent {
namespace {

using Clock = std::chrono::steady_clock;

// The executable mappings of tramway's libraries and code arenas.
std::vector<text::PcRange> own_text() {
  std::vector<text::PcRange> out;
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    std::istringstream in(line);
    std::string range, perms, offset, dev, inode, path;
    in >> range >> perms >> offset >> dev >> inode;
    std::getline(in >> std::ws, path);
    if (perms.size() < 3 || perms[2] != 'x') continue;
    if (!common::is_tramway_mapping(path)) continue;
    const auto dash = range.find('-');
    const std::uintptr_t b = std::stoull(range.substr(0, dash), nullptr, 16), e = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (!out.empty() && out.back().end == b) out.back().end = e;
    else out.push_back({b, e});
  }
  return out;
}

}  // namespace

Result<std::string> release_process(bool unloading, std::chrono::milliseconds budget) {
  const auto deadline = Clock::now() + budget;
  // 1. Calls still running whose return the tracer hijacked would return into its trampoline.
  for (;;) {
    const auto inside = trace::detail::threads_in_traced_calls();
    if (inside.empty()) break;
    if (Clock::now() >= deadline) {
      std::string who;
      for (const auto& [tid, fn] : inside) {
        if (!who.empty()) who += "; ";
        who += "thread " + std::to_string(tid) + " (" + common::thread_name(tid) + ") in the call of " +
               common::hex_address(fn);
      }
      return Status::error("cannot eject: " + std::to_string(inside.size()) + " thread(s) are still inside calls that "
                           "started while they were traced, and would return into tramway: " + who +
                           ". Retry once they have returned (nothing was unloaded; tracing is stopped)", EBUSY);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  // 2. Signals back to the program's handlers; from here no tramway handler is installed.
  if (Status s = text::detail::give_back_signals(); !s.ok()) return s;
  // 3. The grace engine's thread: everything it was to free is freed.
  grace::detail::stop_callback_thread();
  // 4. Every other thread out of tramway's code, seen once after the steps above.
  const std::vector<text::PcRange> ranges = own_text();
  int watched = 0;
  if (!ranges.empty()) {
    Result<std::unique_ptr<text::RangeWatch>> w = text::RangeWatch::start(ranges);
    if (!w.ok()) return w.status();
    const pid_t me = common::current_tid();
    std::vector<pid_t> pending;
    for (pid_t tid : common::list_threads()) {
      if (tid != me) pending.push_back(tid);
    }
    watched = static_cast<int>(pending.size());
    while (!pending.empty()) {
      std::erase_if(pending, [&](pid_t tid) { return (*w)->look(tid).verdict == text::RangeWatch::Verdict::outside; });
      if (pending.empty()) break;
      if (Clock::now() >= deadline) {
        std::string who;
        for (pid_t tid : pending) who += (who.empty() ? "" : ", ") + std::to_string(tid) + " (" + common::thread_name(tid) + ")";
        return Status::error("cannot eject: threads " + who + " did not leave tramway's code within " +
                             std::to_string(budget.count()) + " ms (stopped or traced by a debugger?); nothing was "
                             "unloaded, and the signal handlers are the program's again", ETIMEDOUT);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  // 5. The fix-up signal back, then no handler of the router may still run: one that started
  // before the give-back (a program handler behind the wrapper, blocked in it) would return
  // into tramway's code.
  if (Status s = text::detail::release_fixup_signal(); !s.ok()) return s;
  while (text::detail::handlers_in_flight() > 0) {
    if (Clock::now() >= deadline) {
      return Status::error("cannot eject: a thread is still inside a signal handler the program installed behind "
                           "tramway's wrapper (blocked in it?), and would return into tramway; retry once it has "
                           "returned (nothing was unloaded; the handlers are the program's again)", EBUSY);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (unloading) common::mark_ejecting();
  return "every signal handler given back, " + std::to_string(watched) + " threads seen outside tramway";
}

}  // namespace tramway::agent
