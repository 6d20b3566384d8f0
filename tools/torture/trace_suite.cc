// Suite "trace": the tracer's exit hooks under fire. Worker threads call traced functions that
// nest, tail-call, recurse past the shadow stack's depth, throw through traced frames, rethrow
// and longjmp out of them, and check every result; a SIGPROF storm lands in all of them at
// random instructions (inside the hook stubs, the return stub and the tracer's bookkeeping)
// and its handler calls traced functions too; a controller attaches and detaches globs at
// random and restarts the recording every so often. Each recording is read back: in every
// thread, each exit or unwound event must close the innermost open frame of the same function
// (frames still open when a recording stops are allowed: those threads were inside them).
// Violations: a wrong result anywhere, a crash (the process dies), an unbalanced file.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csetjmp>
#include <cstdio>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../../tests/trace/fixtures.h"
#include "storm.h"
#include "suite.h"
#include "trace/report/report.h"
#include "tramway/trace.h"

namespace tramway::torture {
namespace {

namespace fmt = trace::format;

std::atomic<std::uint64_t> g_wrong{0};
std::atomic<std::uint64_t> g_handler_calls{0};
std::atomic<bool> g_stop{false};

void on_sigprof(int, siginfo_t*, void*) {
  // middle(3) = leaf(3) + leaf(4) = 10 + 13
  if (trace_fx::middle(3) != 23) g_wrong.fetch_add(1, std::memory_order_relaxed);
  g_handler_calls.fetch_add(1, std::memory_order_relaxed);
}

struct WorkerCounts {
  std::uint64_t calls = 0, throws = 0, jumps = 0;
};

void worker(int interval_us, std::uint64_t seed, WorkerCounts& out) {
  StormTimer storm(interval_us);
  std::mt19937_64 rng(seed);
  WorkerCounts c;
  while (!g_stop.load(std::memory_order_relaxed)) {
    const int x = static_cast<int>(rng() % 1000);
    bool ok = true;
    switch (rng() % 8) {
      case 0:
        ok = trace_fx::outer(x) == 18 * x + 33;
        break;
      case 1:
        ok = trace_fx::tail_caller(x) == 7 * (3 * (x + 1) + 1);
        break;
      case 2: {
        const int depth = 1 + static_cast<int>(rng() % 700);  // past the shadow stack's 512
        ok = trace_fx::recurse(depth) == depth;
        break;
      }
      case 3:
        ok = trace_fx::catcher(-1) == -1 && trace_fx::catcher(x) == 2 * (x + 1);
        ++c.throws;
        break;
      case 4: {
        bool caught = false;
        try {
          trace_fx::rethrower(-1);
        } catch (const std::runtime_error&) {
          caught = true;
        }
        ok = caught;
        ++c.throws;
        break;
      }
      case 5: {
        std::jmp_buf env;
        volatile int got = 0;
        if (setjmp(env) == 0) {
          trace_fx::jumper(&env, -1);
          got = -1;
        } else {
          got = 5;
        }
        ok = got == 5 && trace_fx::jumper(&env, x) == x + 1;
        ++c.jumps;
        break;
      }
      case 6: {
        const trace_fx::Pair p = trace_fx::pair(x, 7);
        ok = p.a == x + 7 && p.b == x - 7 && trace_fx::scale(x, 2.0) == 2.0 * x + 0.5;
        break;
      }
      default:
        ok = trace_fx::middle(x) == 6 * x + 5;
        break;
    }
    if (!ok) g_wrong.fetch_add(1, std::memory_order_relaxed);
    ++c.calls;
  }
  out = c;
}

// Checks that every thread's exits close its innermost open frame.
class BalanceCheck : public trace::report::TraceSink {
 public:
  std::uint64_t n_events = 0, mismatches = 0, open_at_end = 0, n_lost = 0;
  std::string first_mismatch;
  void function(std::uint64_t a, std::string_view name) override { names_[a] = name; }
  void thread_name(std::uint32_t, std::string_view) override {}
  void lost(std::uint32_t, std::uint64_t n) override { n_lost += n; }
  void events(std::uint32_t tid, std::span<const fmt::Event> es) override {
    std::vector<std::uint64_t>& open = open_[tid];
    for (const fmt::Event& e : es) {
      ++n_events;
      if (e.kind() == fmt::EventKind::entry) {
        open.push_back(e.address());
      } else if (open.empty() || open.back() != e.address()) {
        if (mismatches++ == 0) {
          first_mismatch = "thread " + std::to_string(tid) + ": " +
                           (e.kind() == fmt::EventKind::exit ? "exit of " : "unwound ") + names_[e.address()] +
                           (open.empty() ? " with no frame open" : " closes " + names_[open.back()]) + " at depth " +
                           std::to_string(open.size());
        }
      } else {
        open.pop_back();
      }
    }
  }
  void finish() {
    for (auto& [tid, open] : open_) open_at_end += open.size();
  }

 private:
  std::map<std::uint32_t, std::vector<std::uint64_t>> open_;
  std::map<std::uint64_t, std::string> names_;
};

}  // namespace

int run_trace(const Options& options) {
  if (!install_storm_handler("trace", on_sigprof)) return 2;
  const std::string dir = "/tmp";
  const std::string path = dir + "/tramway-torture-trace-" + std::to_string(::getpid()) + ".trace";
  const std::vector<std::string> globs = {"trace_fx::*",        "trace_fx::leaf*",    "trace_fx::middle*",
                                          "trace_fx::outer*",   "trace_fx::*thrower*", "trace_fx::jumper*",
                                          "trace_fx::recurse*", "trace_fx::tail_*",    "trace_fx::*catcher*"};
  std::mt19937_64 rng(options.seed);
  std::vector<WorkerCounts> counts(static_cast<std::size_t>(options.threads));
  std::vector<std::thread> workers;
  for (int i = 0; i < options.threads; ++i) {
    workers.emplace_back(worker, options.signal_interval_us, options.seed * 1000 + static_cast<std::uint64_t>(i),
                         std::ref(counts[static_cast<std::size_t>(i)]));
  }

  std::uint64_t recordings = 0, attaches = 0, detaches = 0, failures = 0;
  struct {
    std::uint64_t events = 0, mismatches = 0, open_at_end = 0, lost = 0;
  } total;
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    std::chrono::duration<double>(options.seconds));
  while (std::chrono::steady_clock::now() < deadline && failures == 0) {
    if (Status s = trace::start({path}); !s.ok()) {
      std::fprintf(stderr, "trace: %s\n", s.message().c_str());
      ++failures;
      break;
    }
    ++recordings;
    std::vector<std::string> attached;
    const auto until = std::min(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(1500));
    while (std::chrono::steady_clock::now() < until) {
      const std::string& g = globs[rng() % globs.size()];
      const bool is_attached = std::find(attached.begin(), attached.end(), g) != attached.end();
      if (!is_attached) {
        auto r = trace::attach(g);
        if (!r.ok()) {
          std::fprintf(stderr, "trace: attach %s: %s\n", g.c_str(), r.status().message().c_str());
          ++failures;
        }
        attached.push_back(g);
        ++attaches;
      } else {
        if (Status s = trace::detach(g); !s.ok()) {
          std::fprintf(stderr, "trace: detach %s: %s\n", g.c_str(), s.message().c_str());
          ++failures;
        }
        std::erase(attached, g);
        ++detaches;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
    }
    if (Status s = trace::stop(); !s.ok()) {
      std::fprintf(stderr, "trace: stop: %s\n", s.message().c_str());
      ++failures;
    }
    BalanceCheck check;
    trace::report::ReadOptions ro;
    ro.diagnostics = nullptr;
    auto summary = trace::report::read_trace(path, check, ro);
    if (!summary.ok() || !summary->closed_cleanly) {
      std::fprintf(stderr, "trace: reading recording %llu: %s\n", static_cast<unsigned long long>(recordings),
                   summary.ok() ? "not closed cleanly" : summary.status().message().c_str());
      ++failures;
    }
    check.finish();
    if (!check.first_mismatch.empty()) std::fprintf(stderr, "trace: recording %llu: %s\n",
                                                    static_cast<unsigned long long>(recordings), check.first_mismatch.c_str());
    total.events += check.n_events;
    total.mismatches += check.mismatches;
    total.open_at_end += check.open_at_end;
    total.lost += check.n_lost;
    std::fprintf(stderr, "trace: %.0f s, %llu recordings, %llu events, %llu mismatched, %llu wrong results\n",
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                 static_cast<unsigned long long>(recordings), static_cast<unsigned long long>(total.events),
                 static_cast<unsigned long long>(total.mismatches),
                 static_cast<unsigned long long>(g_wrong.load()));
  }
  g_stop = true;
  for (std::thread& t : workers) t.join();
  ::unlink(path.c_str());

  WorkerCounts sum;
  for (const WorkerCounts& c : counts) {
    sum.calls += c.calls;
    sum.throws += c.throws;
    sum.jumps += c.jumps;
  }
  const std::uint64_t violations = g_wrong.load() + total.mismatches + failures;
  std::printf(
      "trace: %s %.1f s, %d workers, SIGPROF every %d us: %llu worker calls (%llu throws, %llu longjmps), %llu "
      "traced calls in handlers, %llu recordings, %llu attaches, %llu detaches, %llu events read back "
      "(%llu lost, %llu frames open at a stop), %llu wrong results, %llu mismatched exits, %llu failures\n",
      violations ? "FAIL" : "PASS",
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), options.threads,
      options.signal_interval_us, static_cast<unsigned long long>(sum.calls),
      static_cast<unsigned long long>(sum.throws), static_cast<unsigned long long>(sum.jumps),
      static_cast<unsigned long long>(g_handler_calls.load()), static_cast<unsigned long long>(recordings),
      static_cast<unsigned long long>(attaches), static_cast<unsigned long long>(detaches),
      static_cast<unsigned long long>(total.events), static_cast<unsigned long long>(total.lost),
      static_cast<unsigned long long>(total.open_at_end), static_cast<unsigned long long>(g_wrong.load()),
      static_cast<unsigned long long>(total.mismatches), static_cast<unsigned long long>(failures));
  return violations ? 1 : 0;
}

}  // namespace tramway::torture
