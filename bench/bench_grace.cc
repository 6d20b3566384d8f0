// Grace periods: tramway's trace flavor side by side with liburcu's memb and qsbr flavors
// (DESIGN.md, "Grace-period flavors" and "Performance targets"). Figures:
//   marker/pair, urcu_memb/read_pair        ns a read_lock()+read_unlock() pair (thread CPU time;
//                                           series of each in turn, see bm_read_pairs)
//   marker/pair_ratio_to_urcu_memb          ratio of the two
//   gp/trace/busy/T/{median,p99}            us a synchronize(), T readers in regions back to back
//   gp/urcu_memb/busy/T/{median,p99}        us a urcu_memb_synchronize_rcu(), the same readers
//   gp/trace/busy/T/ratio_to_urcu_memb      ratio of the two medians
//   gp/urcu_qsbr/busy/T/{median,p99}        us a urcu_qsbr_synchronize_rcu(), T readers with a
//                                           quiescent state after each region
//   gp/trace/blocked/T/{median,p99}         us a synchronize(), T registered readers blocked in
//                                           read() on a pipe
//   signal_round/busy/T/{median,p99}        us one move_pcs() signal round trip to T busy
//                                           threads (the tasks flavor's floor)
//   gp/tasks/busy/T/{median,p99}            us a synchronize(Flavor::tasks) over a retired range,
//                                           the busy readers of gp/trace/busy
//   gp/tasks/busy/T/ratio_to_signal_round   its median over signal_round/busy/T's
//   gp/tasks/blocked/T/{median,p99}         us the same, readers blocked in read()
//   call/throughput                         callbacks/s: 100,000 call()s, then barrier()
// for T in 1, 2, 8, 32.
//
// One repetition of a GP benchmark starts its readers, waits until each has been through a
// region, times individual grace periods (at most kMaxSamples, for about kBudget), stops and
// joins the readers; its median and p99 are computed here from its own timings, and each
// figure is the median of those over the repetitions. tramway and urcu-memb are timed in
// turn in the same repetition, with the same readers (bm_gp_paired). Each timed grace period
// retires a heap object the readers dereference: the timing thread swaps in a new one,
// waits, then poisons and frees the old one; a reader that finds anything but the magic value
// counts a violation, and any violation or failed synchronize() fails the run. A watchdog
// exits with status 3, saying what hung, if a grace period lasts kHang.
#define _LGPL_SOURCE 1  // liburcu's inline read side, as its users get it
#include <urcu/urcu-memb.h>
#include <urcu/urcu-qsbr.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "noinline.h"
#include "report.h"
#include "tramway/grace.h"
#include "tramway/text/signal_router.h"

namespace {

using benchmark::State;
using Clock = std::chrono::steady_clock;

// Per repetition of a GP figure: stop timing after kMaxSamples grace periods, or once kBudget
// has passed and kMinSamples were timed, or after kHardBudget whatever the count.
constexpr std::size_t kMaxSamples = 1000;
constexpr std::size_t kMinSamples = 20;
constexpr std::chrono::milliseconds kBudget{250};
constexpr std::chrono::milliseconds kHardBudget{600};
constexpr int kWarmup = 3;  // untimed grace periods once the readers run
// Paired benchmarks (bm_gp_paired) alternate flavors after series of kSeriesMax grace
// periods, or of at least kSeriesMin lasting kSeriesTime.
constexpr int kSeriesMax = 100;
constexpr int kSeriesMin = 2;
constexpr std::chrono::milliseconds kSeriesTime{20};
// A paired figure is a ratio of two medians: it waits for kMinSamples of each flavor even when
// grace periods are slow (32 busy readers on 2 cores: about 70 ms each, in 4 ms scheduler
// ticks, where 6 samples made the median one tick either way), up to this long.
constexpr std::chrono::milliseconds kPairedHardBudget{8000};
constexpr int kCallbacks = 100'000;
// A grace period (or a start, or a join) that takes this long is a hang: report and exit.
constexpr std::chrono::seconds kHang{30};

void fail(State& state, const std::string& what) { state.SkipWithError(what.c_str()); }

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// ---- the watchdog ------------------------------------------------------------------------------
// A hung grace period must not hang the benchmark run silently: the watchdog reports what was
// running (figure, step, tramway's stats) and exits with status 3.
class Watchdog {
 public:
  Watchdog() : thread_([this](std::stop_token stop) { loop(stop); }) {}

  // The benchmark thread enters step `what` (copied), timed from now.
  void enter(const std::string& what) {
    std::lock_guard lock(mutex_);
    what_ = what;
    since_ns_.store(now_ns(), std::memory_order_relaxed);
  }
  void restart() { since_ns_.store(now_ns(), std::memory_order_relaxed); }  // same step, again
  void leave() { since_ns_.store(0, std::memory_order_relaxed); }

  // Leaves the step when it goes out of scope.
  struct Scope {
    Watchdog* w;
    ~Scope() { w->leave(); }
  };

 private:
  static std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  }

  void loop(std::stop_token stop) {
    std::unique_lock lock(mutex_);
    while (!stop.stop_requested()) {
      cv_.wait_for(lock, stop, std::chrono::milliseconds(500), [] { return false; });
      const std::int64_t since = since_ns_.load(std::memory_order_relaxed);
      if (since == 0 || now_ns() - since < std::chrono::nanoseconds(kHang).count()) continue;
      const auto s = tramway::grace::stats();
      std::fprintf(stderr,
                   "bench_grace: HANG: %s has not finished after %lld s (tramway stats: grace_periods=%llu "
                   "synchronize_calls=%llu callbacks_run=%llu threads_registered=%llu)\n",
                   what_.c_str(), static_cast<long long>(kHang.count()),
                   static_cast<unsigned long long>(s.grace_periods),
                   static_cast<unsigned long long>(s.synchronize_calls),
                   static_cast<unsigned long long>(s.callbacks_run),
                   static_cast<unsigned long long>(s.threads_registered));
      std::fflush(stderr);
      std::_Exit(3);
    }
  }

  std::mutex mutex_;
  std::condition_variable_any cv_;
  std::string what_;
  std::atomic<std::int64_t> since_ns_{0};
  std::jthread thread_;  // last: starts after the members it uses, stops before they go
};

Watchdog* g_watchdog;

// ---- the flavors ---------------------------------------------------------------------------------
// What a reader thread does around its regions, and what the timing thread waits with.
struct Trace {
  static constexpr const char* kName = "trace";
  static void register_thread() {}  // on the first region
  static void unregister_thread() {}
  static void lock() { tramway::grace::read_lock(); }
  static void unlock() { tramway::grace::read_unlock(); }
  static void quiescent() {}
  static std::string synchronize() {
    const tramway::Status s = tramway::grace::synchronize();
    return s.ok() ? std::string() : "synchronize: " + s.message();
  }
};

// Tasks: the same readers (busy in trace regions, or blocked); each grace period retires a
// range no thread ever runs in, so it costs a trace grace period plus one observation of
// every thread: /proc for blocked ones, a signal round trip for running ones.
struct Tasks : Trace {
  static constexpr const char* kName = "tasks";
  static std::string synchronize() {
    static const std::uint8_t nobody_runs_here[16] = {};
    if (tramway::Status s = tramway::grace::retire(nobody_runs_here, nobody_runs_here + 16); !s.ok())
      return "retire: " + s.message();
    const tramway::Status s = tramway::grace::synchronize(tramway::grace::Flavor::tasks);
    return s.ok() ? std::string() : "synchronize(tasks): " + s.message();
  }
};

struct UrcuMemb {
  static void register_thread() { urcu_memb_register_thread(); }
  static void unregister_thread() { urcu_memb_unregister_thread(); }
  static void lock() { urcu_memb_read_lock(); }
  static void unlock() { urcu_memb_read_unlock(); }
  static void quiescent() {}
  static std::string synchronize() {
    urcu_memb_synchronize_rcu();
    return {};
  }
};

struct UrcuQsbr {
  static constexpr const char* kName = "urcu_qsbr";
  static void register_thread() { urcu_qsbr_register_thread(); }  // online from here
  static void unregister_thread() { urcu_qsbr_unregister_thread(); }
  static void lock() { urcu_qsbr_read_lock(); }
  static void unlock() { urcu_qsbr_read_unlock(); }
  static void quiescent() { urcu_qsbr_quiescent_state(); }
  static std::string synchronize() {
    urcu_qsbr_synchronize_rcu();
    return {};
  }
};

// ---- what the readers read -------------------------------------------------------------------------
constexpr std::uint64_t kMagic = 0x7472616d77617921;  // "tramway!"
constexpr std::uint64_t kPoison = 0xdeadbeefdeadbeef;

struct Node {
  std::atomic<std::uint64_t> magic{kMagic};
  std::atomic<std::uint64_t> value{0};
};

// Which flavor protects the readers' regions in a paired benchmark (see bm_gp_paired).
enum Mode : int { kModeTrace, kModeMemb };

struct Shared {
  alignas(64) std::atomic<Node*> node{nullptr};
  std::atomic<int> mode{kModeTrace};
  alignas(64) std::atomic<bool> stop{false};
  std::atomic<int> ready{0};
  std::atomic<std::uint64_t> violations{0};
  std::atomic<std::uint64_t> regions{0};
};

// Reads through the published node. The magic is checked again last: a node retired too early
// is then caught if it is freed at any time between the load of its address and the end of
// the region (in practice, when the reader was preempted in between).
inline void read_node(Shared& s, std::uint64_t& bad, std::uint64_t& sum) {
  const Node* n = s.node.load(std::memory_order_acquire);
  if (n->magic.load(std::memory_order_relaxed) != kMagic) ++bad;
  sum += n->value.load(std::memory_order_relaxed);
  if (n->magic.load(std::memory_order_relaxed) != kMagic) ++bad;
}

// One read-side region.
template <class F>
inline void region(Shared& s, std::uint64_t& bad, std::uint64_t& sum) {
  F::lock();
  read_node(s, bad, sum);
  F::unlock();
}

// One region of a paired reader in flavor `mode`: reads only if the mode is still `mode` once
// inside. A region that starts after the writer switched modes and began the old flavor's
// grace period therefore sees the new mode (that grace period's ordering) and reads nothing.
template <class F>
inline void region_in_mode(Shared& s, int mode, std::uint64_t& bad, std::uint64_t& sum) {
  F::lock();
  if (s.mode.load(std::memory_order_relaxed) == mode) read_node(s, bad, sum);
  F::unlock();
}

void reader_done(Shared& s, std::uint64_t bad, std::uint64_t sum, std::uint64_t regions) {
  benchmark::DoNotOptimize(sum);
  s.violations.fetch_add(bad, std::memory_order_relaxed);
  s.regions.fetch_add(regions, std::memory_order_relaxed);
}

// Regions back to back (qsbr: each followed by a quiescent state).
template <class F>
void busy_reader(Shared& s) {
  F::register_thread();
  std::uint64_t bad = 0, sum = 0, regions = 1;
  region<F>(s, bad, sum);
  F::quiescent();
  s.ready.fetch_add(1, std::memory_order_release);
  while (!s.stop.load(std::memory_order_relaxed)) {
    region<F>(s, bad, sum);
    F::quiescent();
    ++regions;
  }
  F::unregister_thread();
  reader_done(s, bad, sum, regions);
}

// Regions back to back, each a tramway or a urcu-memb region as the writer's mode says.
void paired_reader(Shared& s) {
  UrcuMemb::register_thread();
  std::uint64_t bad = 0, sum = 0, regions = 2;
  region<Trace>(s, bad, sum);  // registers with tramway
  region<UrcuMemb>(s, bad, sum);
  s.ready.fetch_add(1, std::memory_order_release);
  while (!s.stop.load(std::memory_order_relaxed)) {
    if (s.mode.load(std::memory_order_relaxed) == kModeTrace) {
      region_in_mode<Trace>(s, kModeTrace, bad, sum);
    } else {
      region_in_mode<UrcuMemb>(s, kModeMemb, bad, sum);
    }
    ++regions;
  }
  UrcuMemb::unregister_thread();
  reader_done(s, bad, sum, regions);
}

// Registers (one region), then blocks in read() until the write end of the pipe is closed.
void blocked_reader(Shared& s, int fd) {
  std::uint64_t bad = 0, sum = 0;
  region<Trace>(s, bad, sum);
  reader_done(s, bad, sum, 1);
  s.ready.fetch_add(1, std::memory_order_release);
  char c;
  while (read(fd, &c, 1) < 0 && errno == EINTR) {
  }
}

// Swaps in a new node, waits for a grace period (timed when `samples` is given), then
// poisons and frees the old node. Returns the error, if any.
template <class F>
std::string retire_one(Shared& s, std::uint64_t i, std::vector<double>* samples) {
  Node* fresh = new Node;
  fresh->value.store(i, std::memory_order_relaxed);
  Node* old = s.node.exchange(fresh, std::memory_order_acq_rel);
  g_watchdog->restart();
  const auto t0 = Clock::now();
  std::string error = F::synchronize();
  const auto t1 = Clock::now();
  if (!error.empty()) return error;  // the old node may still be in use: leaked (the run fails)
  if (samples) samples->push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  old->magic.store(kPoison, std::memory_order_relaxed);
  old->value.store(kPoison, std::memory_order_relaxed);
  delete old;
  return {};
}

// Nearest-rank percentile of sorted values.
double percentile(const std::vector<double>& sorted, double p) {
  const auto rank = static_cast<std::size_t>(std::ceil(p / 100 * static_cast<double>(sorted.size())));
  return sorted[std::clamp<std::size_t>(rank, 1, sorted.size()) - 1];
}

double median_of(const std::vector<double>& sorted) {
  const std::size_t n = sorted.size();
  return n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
}

// The reader threads of one repetition: started (each through a first region) by start(),
// stopped and joined by stop() or at the latest by the destructor.
class Readers {
 public:
  Readers(Shared& s, std::string figure) : s_(s), figure_(std::move(figure)) {}
  ~Readers() { stop(); }

  template <class Fn, class... Args>
  void start(int threads, Fn fn, Args... args) {
    g_watchdog->enter(figure_ + ": starting " + std::to_string(threads) + " reader threads");
    started_ = Clock::now();
    for (int i = 0; i < threads; ++i) threads_.emplace_back(fn, std::ref(s_), args...);
    while (s_.ready.load(std::memory_order_acquire) < threads)
      std::this_thread::sleep_for(std::chrono::microseconds(100));
  }

  // Stops and joins the readers; returns their regions per second since start().
  double stop(int wake_fd = -1) {
    if (threads_.empty()) return 0;
    g_watchdog->enter(figure_ + ": stopping and joining the reader threads");
    s_.stop.store(true, std::memory_order_relaxed);
    if (wake_fd >= 0) close(wake_fd);
    const double seconds = seconds_since(started_);
    for (auto& t : threads_) t.join();
    threads_.clear();
    g_watchdog->leave();
    return static_cast<double>(s_.regions.load()) / seconds;
  }

 private:
  Shared& s_;
  std::string figure_;
  std::vector<std::thread> threads_;
  Clock::time_point started_;
};

// Enough samples, or enough time (`scale` budgets for `scale` series timed in turn).
bool enough(std::size_t fewest, Clock::duration spent, int scale, Clock::duration hard_budget = kHardBudget) {
  return fewest >= kMaxSamples || (spent >= scale * kBudget && fewest >= kMinSamples) ||
         (spent >= scale * hard_budget && fewest > 0);
}

// Sorts `samples` and sets the counters `<prefix>median_us` and `<prefix>p99_us`.
void set_figures(State& state, const std::string& prefix, std::vector<double>& samples) {
  std::sort(samples.begin(), samples.end());
  state.counters[prefix + "median_us"] = median_of(samples);
  state.counters[prefix + "p99_us"] = percentile(samples, 99);
}

std::string tramway_stats_delta(const tramway::grace::Stats& before) {
  const auto after = tramway::grace::stats();
  return "tramway grace_periods +" + std::to_string(after.grace_periods - before.grace_periods) +
         ", synchronize_calls +" + std::to_string(after.synchronize_calls - before.synchronize_calls) +
         ", threads_registered " + std::to_string(after.threads_registered) + ", tasks grace_periods +" +
         std::to_string(after.tasks_grace_periods - before.tasks_grace_periods) + ", threads signalled +" +
         std::to_string(after.threads_signalled - before.threads_signalled) + ", observed +" +
         std::to_string(after.threads_observed - before.threads_observed);
}

enum class Kind { kBusy, kBlocked };

// One repetition of gp/<flavor>/<busy|blocked>/<threads>: readers of one flavor, the
// timing thread retires nodes one grace period at a time.
template <class F>
void bm_gp(State& state, Kind kind, int threads) {
  const std::string figure =
      std::string("gp/") + F::kName + (kind == Kind::kBusy ? "/busy/" : "/blocked/") + std::to_string(threads);
  int pipe_fds[2] = {-1, -1};
  if (kind == Kind::kBlocked && pipe2(pipe_fds, O_CLOEXEC) != 0)
    return fail(state, std::string("pipe2: ") + std::strerror(errno));
  Shared s;
  s.node.store(new Node, std::memory_order_relaxed);
  Readers readers(s, figure);
  if (kind == Kind::kBusy) {
    readers.start(threads, busy_reader<F>);
  } else {
    readers.start(threads, blocked_reader, pipe_fds[0]);
    // Give the last ones time to get from ready++ into read().
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }

  const auto before = tramway::grace::stats();
  std::vector<double> samples;
  samples.reserve(kMaxSamples);
  std::string error;
  double seconds = 0;
  for (auto _ : state) {
    g_watchdog->enter(figure + ": warm-up synchronize()");
    std::uint64_t i = 0;
    for (int w = 0; w < kWarmup && error.empty(); ++w) error = retire_one<F>(s, ++i, nullptr);
    g_watchdog->enter(figure + ": timed synchronize()");
    const auto start = Clock::now();
    while (error.empty()) {
      error = retire_one<F>(s, ++i, &samples);
      if (enough(samples.size(), Clock::now() - start, 1)) break;
    }
    seconds = seconds_since(start);
  }
  const std::string stats = tramway_stats_delta(before);
  const double rate = readers.stop(pipe_fds[1]);
  if (kind == Kind::kBlocked) close(pipe_fds[0]);

  if (!error.empty()) return fail(state, figure + ": " + error);
  if (const std::uint64_t v = s.violations.load(); v != 0)
    return fail(state, figure + ": readers observed retired (freed) data " + std::to_string(v) + " times");
  delete s.node.load(std::memory_order_relaxed);
  set_figures(state, "", samples);
  std::fprintf(stderr, "%s: %zu grace periods in %.3f s (max %.0f us), reader regions %.3g/s", figure.c_str(),
               samples.size(), seconds, samples.back(), kind == Kind::kBusy ? rate : 0.0);
  if (std::is_base_of_v<Trace, F>) std::fprintf(stderr, "; %s", stats.c_str());
  std::fprintf(stderr, "\n");
}

// One repetition of gp/{trace,urcu_memb}/busy/<threads>. The same reader threads are
// tramway and urcu-memb readers in turn, and the timing thread alternates short series of
// tramway and urcu-memb grace periods, so that both flavors are measured under the same
// conditions: on two shared cores, how the scheduler places the threads (and what else
// runs) changes these times several-fold from one second to the next, so figures taken
// one after the other would compare conditions rather than flavors.
// Switching mode: set the mode, then wait for a grace period of the old flavor without
// retiring anything; afterwards every region that can still see a node is of the new flavor.
void bm_gp_paired(State& state, int threads) {
  const std::string figure = "gp/{trace,urcu_memb}/busy/" + std::to_string(threads);
  // Which flavor goes first alternates between repetitions.
  static std::map<int, int> repetitions;
  const int first = repetitions[threads]++ % 2 == 0 ? kModeTrace : kModeMemb;
  Shared s;
  s.node.store(new Node, std::memory_order_relaxed);
  s.mode.store(first, std::memory_order_relaxed);
  Readers readers(s, figure);
  readers.start(threads, paired_reader);

  auto retire = [&s](int mode, std::uint64_t i, std::vector<double>* samples) {
    return mode == kModeTrace ? retire_one<Trace>(s, i, samples) : retire_one<UrcuMemb>(s, i, samples);
  };
  auto switch_mode = [&s](int to) {
    s.mode.store(to, std::memory_order_seq_cst);
    g_watchdog->restart();
    return to == kModeTrace ? UrcuMemb::synchronize() : Trace::synchronize();
  };

  const auto before = tramway::grace::stats();
  std::vector<double> samples[2];
  samples[0].reserve(kMaxSamples);
  samples[1].reserve(kMaxSamples);
  std::string error;
  double seconds = 0;
  int switches = 0;
  for (auto _ : state) {
    g_watchdog->enter(figure + ": warm-up");
    std::uint64_t i = 0;
    int mode = first;
    // One untimed grace period of each flavor; back to the first flavor.
    for (int k = 0; k < 2 && error.empty(); ++k) {
      error = retire(mode, ++i, nullptr);
      mode = 1 - mode;
      if (error.empty()) error = switch_mode(mode);
    }
    g_watchdog->enter(figure + ": timed synchronize(), in turn");
    const auto start = Clock::now();
    while (error.empty()) {
      // A series: kSeriesTime and kSeriesMin grace periods, or kSeriesMax of them.
      const auto series_start = Clock::now();
      for (int n = 1; error.empty(); ++n) {
        error = retire(mode, ++i, &samples[mode]);
        if (n >= kSeriesMax || (n >= kSeriesMin && Clock::now() - series_start >= kSeriesTime)) break;
      }
      if (!error.empty()) break;
      // Stop only after both flavors had as many series.
      if (mode != first) {
        if (enough(std::min(samples[0].size(), samples[1].size()), Clock::now() - start, 2, kPairedHardBudget)) break;
      }
      mode = 1 - mode;
      error = switch_mode(mode);
      ++switches;
    }
    seconds = seconds_since(start);
  }
  const std::string stats = tramway_stats_delta(before);
  const double rate = readers.stop();

  if (!error.empty()) return fail(state, figure + ": " + error);
  if (const std::uint64_t v = s.violations.load(); v != 0)
    return fail(state, figure + ": readers observed retired (freed) data " + std::to_string(v) + " times");
  delete s.node.load(std::memory_order_relaxed);
  set_figures(state, "trace_", samples[kModeTrace]);
  set_figures(state, "urcu_memb_", samples[kModeMemb]);
  std::fprintf(stderr,
               "%s: %zu tramway and %zu urcu-memb grace periods in %.3f s (%d switches; max %.0f and %.0f us), "
               "reader regions %.3g/s; %s\n",
               figure.c_str(), samples[kModeTrace].size(), samples[kModeMemb].size(), seconds, switches,
               samples[kModeTrace].back(), samples[kModeMemb].back(), rate, stats.c_str());
}

// ---- read-side markers ----------------------------------------------------------------------------
// Both loops are instances of one template, not unrolled, so they differ only in the pair.
#if defined(__clang__)
#define BENCH_NO_UNROLL _Pragma("clang loop unroll(disable)")
#else
#define BENCH_NO_UNROLL _Pragma("GCC unroll 1")
#endif

template <class Pair>
BENCH_NOINLINE void pair_loop(std::uint64_t n, Pair pair) {
  BENCH_NO_UNROLL
  for (std::uint64_t i = 0; i < n; ++i) pair();
}

void trace_pairs(std::uint64_t n) {
  pair_loop(n, [] {
    tramway::grace::read_lock();
    tramway::grace::read_unlock();
  });
}
void urcu_memb_pairs(std::uint64_t n) {
  pair_loop(n, [] {
    urcu_memb_read_lock();
    urcu_memb_read_unlock();
  });
}

double thread_cpu_ns() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e9 + static_cast<double>(t.tv_nsec);
}

// One repetition of marker/pair and urcu_memb/read_pair: short series of each in turn (so
// that both see the same conditions: the cost of a pair on the shared cores changes
// several-fold from one second to the next), thread CPU time per pair, the median series.
void bm_read_pairs(State& state) {
  constexpr std::uint64_t kPairs = 200'000;  // a series: about 0.2 to 1 ms
  constexpr int kSeries = 400;                // of each
  Trace::lock();  // registers the thread with tramway, outside the measured loops
  Trace::unlock();
  urcu_memb_register_thread();
  trace_pairs(kPairs);  // warm-up
  urcu_memb_pairs(kPairs);
  std::vector<double> ns[2];
  for (auto _ : state) {
    for (int k = 0; k < kSeries; ++k) {
      for (int mode : {k % 2, 1 - k % 2}) {  // which goes first alternates
        const double t0 = thread_cpu_ns();
        mode == kModeTrace ? trace_pairs(kPairs) : urcu_memb_pairs(kPairs);
        ns[mode].push_back((thread_cpu_ns() - t0) / kPairs);
      }
    }
  }
  const bool urcu_ongoing = urcu_memb_read_ongoing();
  urcu_memb_unregister_thread();
  if (tramway::grace::in_read_section()) return fail(state, "still inside a read-side region after balanced pairs");
  if (urcu_ongoing) return fail(state, "still inside a urcu read-side region after balanced pairs");
  for (auto& v : ns) std::sort(v.begin(), v.end());
  state.counters["trace_ns"] = median_of(ns[kModeTrace]);
  state.counters["urcu_memb_ns"] = median_of(ns[kModeMemb]);
}

// ---- signal round trip ------------------------------------------------------------------------------
// The physical floor of the tasks flavor with busy threads: a preempted thread must run before
// it can be seen. One move_pcs() over a range no thread is in signals every running thread
// and waits for each to answer; that is one round trip to all of them.
void bm_signal_round(State& state, int threads) {
  const Watchdog::Scope watch{g_watchdog};
  const std::string figure = "signal_round/busy/" + std::to_string(threads);
  std::atomic<bool> stop{false};
  std::atomic<int> running{0};
  std::vector<std::thread> busy;
  for (int i = 0; i < threads; ++i) {
    busy.emplace_back([&] {
      running.fetch_add(1);
      while (!stop.load(std::memory_order_relaxed)) __builtin_ia32_pause();
    });
  }
  while (running.load() < threads) std::this_thread::yield();
  std::vector<double> samples;
  samples.reserve(kMaxSamples);
  std::string error;
  int signalled_min = threads;
  for (auto _ : state) {
    g_watchdog->enter(figure + ": move_pcs()");
    const auto start = Clock::now();
    while (error.empty()) {
      const auto t0 = Clock::now();
      auto r = tramway::text::move_pcs(1, 2, 1);  // [1, 2): no thread is ever there
      samples.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      if (!r.ok()) error = r.status().message();
      else signalled_min = std::min(signalled_min, r->threads_signalled);
      if (enough(samples.size(), Clock::now() - start, 1)) break;
    }
  }
  stop = true;
  for (auto& t : busy) t.join();
  if (!error.empty()) return fail(state, figure + ": " + error);
  set_figures(state, "", samples);
  std::fprintf(stderr, "%s: %zu rounds, at least %d threads signalled each\n", figure.c_str(), samples.size(),
               signalled_min);
}

// ---- callbacks --------------------------------------------------------------------------------------
std::atomic<std::uint64_t> g_callbacks_run{0};

void count_callback() { g_callbacks_run.fetch_add(1, std::memory_order_relaxed); }

void bm_call_throughput(State& state) {
  const Watchdog::Scope watch{g_watchdog};
  g_watchdog->enter("call/throughput: first call() and barrier()");
  // Not measured: the first call() starts the callback thread.
  if (auto st = tramway::grace::call(count_callback); !st.ok()) return fail(state, "call: " + st.message());
  if (auto st = tramway::grace::barrier(); !st.ok()) return fail(state, "barrier: " + st.message());
  double rate = 0;
  const auto before = tramway::grace::stats();
  std::uint64_t ran = 0;
  for (auto _ : state) {
    g_watchdog->enter("call/throughput: " + std::to_string(kCallbacks) + " call()s and barrier()");
    const std::uint64_t run_before = g_callbacks_run.load();
    const auto start = Clock::now();
    for (int i = 0; i < kCallbacks; ++i) {
      if (auto st = tramway::grace::call(count_callback); !st.ok()) return fail(state, "call: " + st.message());
    }
    if (auto st = tramway::grace::barrier(); !st.ok()) return fail(state, "barrier: " + st.message());
    rate = kCallbacks / seconds_since(start);
    ran = g_callbacks_run.load() - run_before;
  }
  const auto after = tramway::grace::stats();
  // Every callback queued before barrier() must have run when it returns.
  if (ran != static_cast<std::uint64_t>(kCallbacks))
    return fail(state, "barrier() returned after " + std::to_string(ran) + " of " + std::to_string(kCallbacks) +
                           " callbacks had run");
  state.counters["callbacks_per_s"] = rate;
  std::fprintf(stderr, "call/throughput: %d callbacks, %llu grace periods, %.0f callbacks/s\n", kCallbacks,
               static_cast<unsigned long long>(after.grace_periods - before.grace_periods), rate);
}

}  // namespace

int main(int argc, char** argv) {
  using tramway_bench::add;
  using tramway_bench::counter_figure;
  using tramway_bench::ratio_figure;
  Watchdog watchdog;
  g_watchdog = &watchdog;

  // Read-side pairs: thread CPU time, so that a preemption is not charged to a pair.
  add("read_pairs", bm_read_pairs,
      {counter_figure("marker/pair", "trace_ns", "ns"),
       ratio_figure("marker/pair_ratio_to_urcu_memb", "marker/pair", "urcu_memb/read_pair"),
       counter_figure("urcu_memb/read_pair", "urcu_memb_ns", "ns")})
      ->Iterations(1);

  // Grace periods: one benchmark iteration times many of them (see the top of the file).
  auto gp_figures = [](const std::string& base) {
    return std::vector{counter_figure(base + "/median", "median_us", "us"),
                       counter_figure(base + "/p99", "p99_us", "us")};
  };
  for (int t : {1, 2, 8, 32}) {
    const std::string n = std::to_string(t);
    const std::string trace = "gp/trace/busy/" + n, memb = "gp/urcu_memb/busy/" + n;
    add("gp/busy/" + n, [t](State& s) { bm_gp_paired(s, t); },
        {counter_figure(trace + "/median", "trace_median_us", "us"),
         counter_figure(trace + "/p99", "trace_p99_us", "us"),
         ratio_figure(trace + "/ratio_to_urcu_memb", trace + "/median", memb + "/median"),
         counter_figure(memb + "/median", "urcu_memb_median_us", "us"),
         counter_figure(memb + "/p99", "urcu_memb_p99_us", "us")})
        ->Iterations(1);
    add("gp/urcu_qsbr/busy/" + n, [t](State& s) { bm_gp<UrcuQsbr>(s, Kind::kBusy, t); },
        gp_figures("gp/urcu_qsbr/busy/" + n))
        ->Iterations(1);
    add("gp/trace/blocked/" + n, [t](State& s) { bm_gp<Trace>(s, Kind::kBlocked, t); },
        gp_figures("gp/trace/blocked/" + n))
        ->Iterations(1);
    add("signal_round/busy/" + n, [t](State& s) { bm_signal_round(s, t); }, gp_figures("signal_round/busy/" + n))
        ->Iterations(1);
    auto tasks_busy = gp_figures("gp/tasks/busy/" + n);
    tasks_busy.push_back(ratio_figure("gp/tasks/busy/" + n + "/ratio_to_signal_round", "gp/tasks/busy/" + n + "/median",
                                      "signal_round/busy/" + n + "/median"));
    add("gp/tasks/busy/" + n, [t](State& s) { bm_gp<Tasks>(s, Kind::kBusy, t); }, tasks_busy)->Iterations(1);
    add("gp/tasks/blocked/" + n, [t](State& s) { bm_gp<Tasks>(s, Kind::kBlocked, t); },
        gp_figures("gp/tasks/blocked/" + n))
        ->Iterations(1);
  }

  add("call/throughput", bm_call_throughput,
      {counter_figure("call/throughput", "callbacks_per_s", "callbacks/s")})
      ->Iterations(1);
  return tramway_bench::run(argc, argv);
}
