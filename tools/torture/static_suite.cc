// Suite "static": worker threads run static-key branches and static calls in tight loops,
// a controller flips keys and retargets calls as fast as it can, every thread takes a
// SIGPROF about every 20 us whose handler runs the same sites (so int3 traps land inside
// signal handlers, and handlers land inside the trap handler), and a spinner thread sits in
// generated code that only PC fix-up (move_pcs) can get it out of, nested frames included.
//
// Checked: every static call returned a value only one of its possible targets returns;
// every target's own count equals the calls attributed to it; every move_pcs succeeded and
// got the spinner out; no mapping is ever writable and executable; nothing crashed.
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "storm.h"
#include "suite.h"
#include "tramway/static_call.h"
#include "tramway/static_key.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/patch.h"
#include "tramway/text/signal_router.h"

namespace tramway::torture {
namespace {

constexpr int kTargets = 4;

// Counters per thread and per context (0: thread body, 1: inside the SIGPROF handler), so a
// handler never races a half-done increment of the code it interrupted.
struct Counters {
  std::uint64_t calls = 0;
  std::uint64_t classified[kTargets] = {};  // results attributed to target i
  std::uint64_t target_hits[kTargets] = {};  // target i's own count
  std::uint64_t returned_zero = 0, returned_abs = 0;
  std::uint64_t notify_hits = 0;
  std::uint64_t branches_taken = 0, branches_not_taken = 0;
  std::uint64_t violations = 0;
};
struct alignas(64) ThreadCounters {
  Counters context[2];
};

thread_local ThreadCounters* t_counters = nullptr;
thread_local volatile int t_in_handler = 0;

Counters& here() { return t_counters->context[t_in_handler]; }

TRAMWAY_STATIC_KEY_FALSE(torture_key_a);
TRAMWAY_STATIC_KEY_TRUE(torture_key_b);
TRAMWAY_STATIC_KEY_FALSE(torture_key_c);

// Target i returns x*8 + i + 1: only target i can produce that value for x.
template <int I>
__attribute__((noinline)) int target(int x) {
  ++here().target_hits[I];
  return x * 8 + I + 1;
}
__attribute__((noinline)) void notify_target(int) { ++here().notify_hits; }

int (*const kTargetFns[kTargets])(int) = {target<0>, target<1>, target<2>, target<3>};

}  // namespace

// Static calls need a named namespace (see static_call.h).
TRAMWAY_DEFINE_STATIC_CALL(torture_call, target<0>);
TRAMWAY_DEFINE_STATIC_CALL_NULL(torture_notify, void(int));

namespace {

__attribute__((noinline)) int branch_a() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(torture_key_a) ? 1 : 0; }
__attribute__((noinline)) int branch_b() { return TRAMWAY_STATIC_BRANCH_LIKELY(torture_key_b) ? 1 : 0; }

// One call through the static call, attributed to the target that produced its result.
inline void call_and_classify(Counters& c, int x) {
  ++c.calls;
  const int r = TRAMWAY_STATIC_CALL(torture_call)(x);
  if (r == 0) {
    ++c.returned_zero;  // updated to nullptr: the return-zero stub
  } else if (r == std::abs(x)) {
    ++c.returned_abs;  // libc's abs: a far target, reached through the fallback
  } else if (r / 8 == x && r % 8 >= 1 && r % 8 <= kTargets) {
    ++c.classified[r % 8 - 1];
  } else {
    ++c.violations;
  }
}

// One round of every site kind, as the workers run it.
inline void exercise(int x) {
  Counters& c = here();
  call_and_classify(c, x);
  TRAMWAY_STATIC_CALL(torture_notify)(x);
  // Inlined branches (a site per copy) and out-of-line ones.
  const int taken = branch_a() + branch_b() + (TRAMWAY_STATIC_BRANCH_UNLIKELY(torture_key_c) ? 1 : 0) +
                    (TRAMWAY_STATIC_BRANCH_LIKELY(torture_key_b) ? 1 : 0);
  c.branches_taken += taken;
  c.branches_not_taken += 4 - taken;
}

// One site per signal, rotating: a handler slower than the timer period would leave the
// thread in handlers for good.
void on_sigprof(int, siginfo_t*, void*) {
  if (!t_counters) return;
  t_in_handler = 1;
  Counters& c = here();
  static thread_local unsigned turn = 0;
  switch (turn++ % 3) {
    case 0:
      call_and_classify(c, 3);
      break;
    case 1:
      c.branches_taken += branch_a();
      break;
    default:
      c.branches_taken += branch_b();
      break;
  }
  t_in_handler = 0;
}

// Workers and the spinner never block; at normal priority they would leave the controller
// (which blocks in membarrier and /proc writes every batch) a tenth of the CPU.
void lower_priority() { setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10); }

struct Shared {
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> flips{0}, fixups{0}, pcs_moved{0}, errors{0};
  std::mutex error_mu;
  std::string first_error;
  void error(const std::string& what) {
    errors.fetch_add(1);
    std::lock_guard<std::mutex> g(error_mu);
    if (first_error.empty()) first_error = what;
  }
};

// Generated code the spinner runs: it raises `flag`, then spins until moved out.
//   movabs rax, &flag ; mov byte [rax], 1 ; spin: pause ; jmp spin ; exit: ret
struct Spinner {
  text::CodeBlock block;
  std::uintptr_t begin = 0, exit = 0;
  std::atomic<std::uint8_t> flag{0};
  std::atomic<std::uint64_t> returns{0};
  std::atomic<bool> exited{false};

  Status build() {
    auto b = text::allocate_code(32);
    if (!b.ok()) return b.status();
    block = *b;
    std::uint8_t code[19] = {0x48, 0xb8};
    const auto flag_address = reinterpret_cast<std::uintptr_t>(&flag);
    std::memcpy(code + 2, &flag_address, 8);
    const std::uint8_t rest[] = {0xc6, 0x00, 0x01, 0xf3, 0x90, 0xeb, 0xfc, 0xc3};
    std::memcpy(code + 10, rest, sizeof rest);
    std::memcpy(block.rw, code, 18);
    begin = reinterpret_cast<std::uintptr_t>(block.rx);
    exit = begin + 17;
    return {};
  }
  void run(const Options& o, Shared& s, ThreadCounters* counters) {
    t_counters = counters;
    lower_priority();
    StormTimer timer(o.signal_interval_us);
    auto fn = reinterpret_cast<void (*)()>(block.rx);
    while (!s.stop.load(std::memory_order_relaxed)) {
      fn();  // returns only when move_pcs moves it to `exit`
      flag.store(0);
      returns.fetch_add(1);
    }
    exited.store(true);
  }
};

void worker(const Options& o, Shared& s, ThreadCounters* counters, int index) {
  t_counters = counters;
  lower_priority();
  StormTimer timer(o.signal_interval_us);
  for (int x = 1 + index; !s.stop.load(std::memory_order_relaxed); x = x % 100000 + 1) exercise(x);
}

// Flips keys and retargets static calls as fast as it can.
void controller(const Options& o, Shared& s, ThreadCounters* counters) {
  t_counters = counters;
  StormTimer timer(o.signal_interval_us);
  std::mt19937_64 rng(o.seed);
  StaticKey* keys[] = {&torture_key_a, &torture_key_b, &torture_key_c};
  while (!s.stop.load(std::memory_order_relaxed)) {
    Status st;
    switch (rng() % 8) {
      case 0: case 1: case 2:
        st = toggle(*keys[rng() % 3]);
        break;
      case 3:
        st = KeyBatch().set(torture_key_a, rng() & 1).set(torture_key_b, rng() & 1).set(torture_key_c, rng() & 1).commit();
        break;
      case 4: case 5: case 6: {
        const auto pick = rng() % (kTargets + 2);
        st = pick < kTargets ? static_call_update(torture_call, kTargetFns[pick])
             : pick == kTargets ? torture_call.update(nullptr)
                                : static_call_update(torture_call, &::abs);
        break;
      }
      default:
        st = torture_notify.update(rng() & 1 ? &notify_target : nullptr);
        break;
    }
    if (!st.ok()) s.error("update failed: " + st.message());
    s.flips.fetch_add(1, std::memory_order_relaxed);
  }
}

// Gets the spinner out of its loop with PC fix-ups, concurrently with the controller's
// batches. Each round must get it out: it raised its flag from inside the range.
void fixer(const Options& o, Shared& s, Spinner& spinner, ThreadCounters* counters) {
  t_counters = counters;
  StormTimer timer(o.signal_interval_us);
  while (!s.stop.load(std::memory_order_relaxed)) {
    if (spinner.flag.load() == 0) {
      std::this_thread::yield();
      continue;
    }
    const std::uint64_t before = spinner.returns.load();
    auto moved = text::move_pcs(spinner.begin, spinner.exit, spinner.exit, std::chrono::milliseconds(5000));
    if (!moved.ok()) {
      s.error("move_pcs failed: " + moved.status().message());
      return;
    }
    s.fixups.fetch_add(1);
    s.pcs_moved.fetch_add(static_cast<std::uint64_t>(moved->pcs_moved));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (spinner.returns.load() == before && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    if (spinner.returns.load() == before) {
      s.error("the spinner was still inside the range 5 s after move_pcs returned");
      return;
    }
  }
}

bool any_writable_executable_mapping(std::string* which) {
  FILE* f = std::fopen("/proc/self/maps", "re");
  if (!f) return false;
  char line[512];
  bool found = false;
  while (std::fgets(line, sizeof line, f)) {
    char perms[8] = {};
    if (std::sscanf(line, "%*s %7s", perms) == 1 && perms[1] == 'w' && perms[2] == 'x') {
      found = true;
      *which = line;
    }
  }
  std::fclose(f);
  return found;
}

}  // namespace

int run_static(const Options& o) {
  if (!install_storm_handler("static", on_sigprof)) return 1;

  Shared shared;
  Spinner spinner;
  if (Status st = spinner.build(); !st.ok()) {
    std::fprintf(stderr, "static: %s\n", st.message().c_str());
    return 1;
  }
  // Workers, then the spinner, the controller and the fixer.
  std::vector<ThreadCounters> counters(static_cast<std::size_t>(o.threads) + 3);
  const auto start_stats = text::stats();
  const auto start = std::chrono::steady_clock::now();

  std::vector<std::thread> threads;
  for (int i = 0; i < o.threads; ++i) threads.emplace_back(worker, std::cref(o), std::ref(shared), &counters[i], i);
  std::thread spin_thread([&] { spinner.run(o, shared, &counters[o.threads]); });
  std::thread control_thread(controller, std::cref(o), std::ref(shared), &counters[o.threads + 1]);
  std::thread fix_thread(fixer, std::cref(o), std::ref(shared), std::ref(spinner), &counters[o.threads + 2]);

  std::string rwx;
  bool saw_rwx = false;
  const auto end = start + std::chrono::duration<double>(o.seconds);
  auto next_report = start + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < end && shared.errors.load() == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    saw_rwx = saw_rwx || any_writable_executable_mapping(&rwx);
    if (std::chrono::steady_clock::now() >= next_report) {
      next_report += std::chrono::seconds(10);
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::fprintf(stderr, "static: %.0f/%.0f s, %" PRIu64 " flips, %" PRIu64 " fix-ups, %" PRIu64 " traps emulated\n", t,
                   o.seconds, shared.flips.load(), shared.fixups.load(), text::stats().traps_emulated - start_stats.traps_emulated);
    }
  }
  shared.stop.store(true);
  for (auto& t : threads) t.join();
  control_thread.join();
  fix_thread.join();
  // The spinner may be in its loop, or about to enter it: fetch it out until it has left.
  while (!spinner.exited.load()) {
    if (spinner.flag.load() == 0) {
      std::this_thread::yield();
      continue;
    }
    auto moved = text::move_pcs(spinner.begin, spinner.exit, spinner.exit);
    if (!moved.ok()) {
      shared.error("final move_pcs failed: " + moved.status().message());
      std::fprintf(stderr, "static: %s\n", shared.first_error.c_str());
      std::_Exit(1);  // it cannot be joined
    }
  }
  spin_thread.join();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  Counters total;
  for (const ThreadCounters& tc : counters) {
    for (const Counters& c : tc.context) {
      total.calls += c.calls;
      total.returned_zero += c.returned_zero;
      total.returned_abs += c.returned_abs;
      total.notify_hits += c.notify_hits;
      total.branches_taken += c.branches_taken;
      total.branches_not_taken += c.branches_not_taken;
      total.violations += c.violations;
      for (int i = 0; i < kTargets; ++i) {
        total.classified[i] += c.classified[i];
        total.target_hits[i] += c.target_hits[i];
      }
    }
  }
  std::uint64_t signal_calls = 0;
  for (const ThreadCounters& tc : counters) signal_calls += tc.context[1].calls;
  std::uint64_t mismatched = 0;
  for (int i = 0; i < kTargets; ++i) {
    if (total.classified[i] != total.target_hits[i]) {
      ++mismatched;
      std::fprintf(stderr, "static: target %d ran %" PRIu64 " times but %" PRIu64 " results came from it\n", i,
                   total.target_hits[i], total.classified[i]);
    }
  }
  std::uint64_t accounted = total.returned_zero + total.returned_abs;
  for (int i = 0; i < kTargets; ++i) accounted += total.classified[i];
  const auto end_stats = text::stats();
  const std::uint64_t violations = total.violations + mismatched + shared.errors.load() + (saw_rwx ? 1 : 0);
  if (total.violations) std::fprintf(stderr, "static: %" PRIu64 " calls returned a value no target returns\n", total.violations);
  if (saw_rwx) std::fprintf(stderr, "static: a writable+executable mapping appeared: %s", rwx.c_str());
  if (!shared.first_error.empty()) std::fprintf(stderr, "static: %s\n", shared.first_error.c_str());
  if (accounted + total.violations != total.calls) {
    std::fprintf(stderr, "static: accounting error: %" PRIu64 " calls, %" PRIu64 " accounted\n", total.calls, accounted);
  }

  std::printf("static: %s %.1f s, %d workers, signal every %d us: calls=%" PRIu64 " (in handlers %" PRIu64
              "), branches=%" PRIu64 ", flips=%" PRIu64 ", batches=%" PRIu64 ", serialisations=%" PRIu64
              ", traps_emulated=%" PRIu64 ", traps_restarted=%" PRIu64 ", fixups=%" PRIu64 ", pcs_moved=%" PRIu64
              ", violations=%" PRIu64 "\n",
              violations ? "FAIL" : "PASS", elapsed, o.threads, o.signal_interval_us, total.calls, signal_calls,
              total.branches_taken + total.branches_not_taken, shared.flips.load(),
              end_stats.batches - start_stats.batches, end_stats.serialisations - start_stats.serialisations,
              end_stats.traps_emulated - start_stats.traps_emulated,
              end_stats.traps_restarted - start_stats.traps_restarted, shared.fixups.load(), shared.pcs_moved.load(),
              violations);
  return violations ? 1 : 0;
}

}  // namespace tramway::torture
