// Static keys, static calls, the batch poker and the W^X writer (DESIGN.md, "Performance
// targets"). Figures:
//   static_key/disabled, static_key/enabled, bool_branch          ns a call (CPU time)
//   static_call, direct_call, indirect_call                        ns a call (CPU time)
//   batch/{1,100,10000}/time                                       ms a batch (real time)
//   batch/10000/serialisations                                     count a batch
//   batch/10000/page_writes, batch/10000/page_faults               count a batch (diagnostics)
//   writer/write, writer/write_code                                ns a write (real time)
#include <sys/resource.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "noinline.h"
#include "report.h"
#include "tramway/static_call.h"
#include "tramway/static_key.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/patch.h"


// ---- static keys vs a bool ---------------------------------------------------------------
TRAMWAY_STATIC_KEY_FALSE(bench_key);
std::atomic<bool> bench_flag{false};
std::uint64_t bench_hits;

// Identical bodies but for the branch: both bump a counter on the taken path.
BENCH_NOINLINE void key_branch() {
  if (TRAMWAY_STATIC_BRANCH_UNLIKELY(bench_key)) ++bench_hits;
}
BENCH_NOINLINE void bool_branch() {
  if (__builtin_expect(bench_flag.load(std::memory_order_relaxed), 0)) ++bench_hits;
}

// ---- static call vs direct vs indirect -----------------------------------------------------
// All three call the same function, so only the way of calling differs.
BENCH_NOINLINE int call_target(int x) { return x + 1; }
TRAMWAY_DEFINE_STATIC_CALL(bench_call, call_target);
int (*volatile bench_call_pointer)(int) = &call_target;  // volatile: loaded on every call

// ---- the batch sites (batch_sites.cc) --------------------------------------------------------
TRAMWAY_DECLARE_STATIC_KEY_FALSE(bench_batch_1);
TRAMWAY_DECLARE_STATIC_KEY_FALSE(bench_batch_100);
TRAMWAY_DECLARE_STATIC_KEY_FALSE(bench_batch_10000);

// ---- a function in program text that nothing calls, for the writer -----------------------------
// Defined in assembly so that its bytes are known: `ret` and int3 padding, which the writer
// rewrites with the same bytes.
__asm__(".pushsection .text.tramway_bench_scratch,\"ax\",@progbits\n\t"
        ".balign 64\n\t"
        ".globl tramway_bench_scratch\n\t"
        ".hidden tramway_bench_scratch\n\t"
        ".type tramway_bench_scratch, @function\n"
        "tramway_bench_scratch:\n\t"
        "ret\n\t"
        ".fill 63, 1, 0xcc\n\t"
        ".size tramway_bench_scratch, 64\n\t"
        ".popsection");
extern "C" void tramway_bench_scratch();

namespace {

using benchmark::State;

void fail(State& state, const std::string& what) { state.SkipWithError(what.c_str()); }

// The measured loops. Each benchmark runs an instance of one of these templates, so loops
// compared with each other are the same code but for the call (written inline in a bigger
// function, GCC unrolled one loop and not the other).
template <void (*F)()>
BENCH_NOINLINE void branch_loop(State& state) {
  for (auto _ : state) {
    F();
    benchmark::ClobberMemory();
  }
}
template <class Call>
BENCH_NOINLINE void call_loop(State& state, Call call) {
  int x = 0;
  for (auto _ : state) {
    x = call(x);
    benchmark::DoNotOptimize(x);
  }
}

void bm_static_key(State& state, bool enabled) {
  if (enabled) {
    if (auto s = tramway::enable(bench_key); !s.ok()) return fail(state, "enable: " + s.message());
  }
  const std::uint64_t hits = bench_hits;
  branch_loop<key_branch>(state);
  // The branch must have gone the way the key says, every time.
  const std::uint64_t expected = enabled ? static_cast<std::uint64_t>(state.iterations()) : 0;
  if (bench_hits - hits != expected) fail(state, "the static branch did not follow its key");
  if (enabled) {
    if (auto s = tramway::disable(bench_key); !s.ok()) fail(state, "disable: " + s.message());
  }
}

void bm_bool_branch(State& state) {
  const std::uint64_t hits = bench_hits;
  branch_loop<bool_branch>(state);
  if (bench_hits != hits) fail(state, "the bool branch was taken");
}

// True when the trampoline's first instruction is `jmp rel32` straight to `target`.
bool jumps_directly_to(const void* trampoline, const void* target) {
  const auto* p = static_cast<const std::uint8_t*>(trampoline);
  std::int32_t rel;
  std::memcpy(&rel, p + 1, sizeof rel);
  return p[0] == 0xe9 && reinterpret_cast<std::uintptr_t>(p) + 5 + rel == reinterpret_cast<std::uintptr_t>(target);
}

void bm_static_call(State& state) {
  // Until the first update the trampoline goes through its fallback (an indirect jmp).
  if (auto s = tramway::static_call_update(bench_call, &call_target); !s.ok())
    return fail(state, "static_call_update: " + s.message());
  if (!jumps_directly_to(reinterpret_cast<const void*>(bench_call.trampoline()),
                         reinterpret_cast<const void*>(&call_target)))
    return fail(state, "the static call trampoline is not a direct jmp to its target");
  call_loop(state, [](int x) { return TRAMWAY_STATIC_CALL(bench_call)(x); });
}

void bm_direct_call(State& state) {
  call_loop(state, [](int x) { return call_target(x); });
}

void bm_indirect_call(State& state) {
  call_loop(state, [](int x) { return bench_call_pointer(x); });
}

// Page faults of this thread so far. A batch that faults is touching fresh memory: each fault
// costs microseconds, more in a VM.
long minor_faults() {
  rusage u;
  getrusage(RUSAGE_THREAD, &u);
  return u.ru_minflt;
}

// One iteration = one tramway::set() that flips every branch of `key` (one batch).
void bm_batch(State& state, tramway::StaticKey& key, std::size_t sites) {
  if (const std::size_t n = tramway::branch_count(key); n != sites)
    return fail(state, "expected " + std::to_string(sites) + " branches, found " + std::to_string(n));
  // Not measured: the first write to a page of program text through /proc/self/mem copies
  // it (copy-on-write of the file mapping) — a one-time cost per page.
  bool on = key.enabled();
  for (int i = 0; i < 2; ++i) {
    on = !on;
    if (auto s = tramway::set(key, on); !s.ok()) return fail(state, "set: " + s.message());
  }
  std::uint64_t serialisations_min = std::numeric_limits<std::uint64_t>::max(), serialisations_max = 0;
  std::uint64_t page_writes = 0;
  const long faults = minor_faults();
  for (auto _ : state) {
    const auto before = tramway::text::stats();
    on = !on;
    if (auto s = tramway::set(key, on); !s.ok()) {
      fail(state, "set: " + s.message());
      break;
    }
    const auto after = tramway::text::stats();
    const std::uint64_t serialisations = after.serialisations - before.serialisations;
    serialisations_min = std::min(serialisations_min, serialisations);
    serialisations_max = std::max(serialisations_max, serialisations);
    page_writes += after.page_writes - before.page_writes;
  }
  const double batches = static_cast<double>(state.iterations());
  state.counters["page_faults"] = static_cast<double>(minor_faults() - faults) / batches;
  if (on) (void)tramway::set(key, false);
  // DESIGN: 3 a batch whatever its size. Batches that differ make the run an error (no figure).
  if (serialisations_min != serialisations_max) {
    fail(state, "serialisations varied between batches: " + std::to_string(serialisations_min) + " to " +
                    std::to_string(serialisations_max));
  }
  state.counters["serialisations"] = static_cast<double>(serialisations_max);
  state.counters["page_writes"] = static_cast<double>(page_writes) / batches;
}

// The /proc/self/mem path: a few bytes of program text, rewritten with what they hold.
void bm_writer_write(State& state) {
  auto* at = reinterpret_cast<std::uint8_t*>(&tramway_bench_scratch) + 8;
  std::array<std::uint8_t, 8> bytes;
  std::memcpy(bytes.data(), at, bytes.size());
  // Not measured: the first write copies the page (see bm_batch).
  if (auto s = tramway::text::write_unexecuted(at, bytes); !s.ok()) return fail(state, s.message());
  for (auto _ : state) {
    if (auto s = tramway::text::write_unexecuted(at, bytes); !s.ok()) {
      fail(state, s.message());
      break;
    }
  }
}

// The generated-code path: the same write through a code block's RW view.
void bm_writer_write_code(State& state) {
  auto block = tramway::text::allocate_code(64);
  if (!block.ok()) return fail(state, "allocate_code: " + block.status().message());
  std::array<std::uint8_t, 8> bytes;
  bytes.fill(0xcc);
  for (auto _ : state) {
    if (auto s = tramway::text::write_unexecuted(block->rx + 8, bytes); !s.ok()) {
      fail(state, s.message());
      break;
    }
  }
  tramway::text::free_code(*block);  // nothing ever ran it
}

}  // namespace

int main(int argc, char** argv) {
  using tramway_bench::add;
  using tramway_bench::counter_figure;
  using tramway_bench::Figure;
  using tramway_bench::time_figure;
  // Calls: CPU time, so that a preemption on the two shared cores is not charged to a call.
  auto cpu_ns = [](const char* name) { return std::vector{time_figure(name, Figure::kCpuTime, "ns")}; };
  add("static_key/disabled", [](State& s) { bm_static_key(s, false); }, cpu_ns("static_key/disabled"));
  add("static_key/enabled", [](State& s) { bm_static_key(s, true); }, cpu_ns("static_key/enabled"));
  add("bool_branch", bm_bool_branch, cpu_ns("bool_branch"));
  add("static_call", bm_static_call, cpu_ns("static_call"));
  add("direct_call", bm_direct_call, cpu_ns("direct_call"));
  add("indirect_call", bm_indirect_call, cpu_ns("indirect_call"));
  // Batches and writes: real time, which includes waiting for the membarrier IPIs.
  add("batch/1", [](State& s) { bm_batch(s, bench_batch_1, 1); },
      {time_figure("batch/1/time", Figure::kRealTime, "ms")})
      ->Unit(benchmark::kMillisecond);
  add("batch/100", [](State& s) { bm_batch(s, bench_batch_100, 100); },
      {time_figure("batch/100/time", Figure::kRealTime, "ms")})
      ->Unit(benchmark::kMillisecond);
  add("batch/10000", [](State& s) { bm_batch(s, bench_batch_10000, 10000); },
      {time_figure("batch/10000/time", Figure::kRealTime, "ms"),
       counter_figure("batch/10000/serialisations", "serialisations", "count"),
       counter_figure("batch/10000/page_writes", "page_writes", "count"),
       counter_figure("batch/10000/page_faults", "page_faults", "count")})
      ->Unit(benchmark::kMillisecond);
  add("writer/write", bm_writer_write, {time_figure("writer/write", Figure::kRealTime, "ns")});
  add("writer/write_code", bm_writer_write_code, {time_figure("writer/write_code", Figure::kRealTime, "ns")});
  return tramway_bench::run(argc, argv);
}
