// The function tracer (tramway/trace.h), side by side with uftrace. Figures:
//   trace/untraced                  ns a call of a patchable function, not traced (CPU time)
//   trace/traced                    ns a call of it traced: entry and exit events recorded
//                                   into the trace file (CPU time of the calling thread)
//   trace/bytes_per_event           the trace file's size over the events it holds
//   uftrace/record                  ns a call of the same function under `uftrace record -P`,
//                                   entry and exit recorded into its data directory (thread CPU time)
//   uftrace/bytes_per_event         uftrace's per-thread data files' size over the events (2 a call)
//   trace/traced/ratio_to_uftrace   trace/traced over uftrace/record, both from this run: below 1,
//                                   tramway is faster (the direction of bench_hooks' ratios)
//   trace/timestamp                 ns one TSC read (rdtsc) costs here: a traced call takes two,
//                                   the floor under trace/traced (uftrace reads clock_gettime twice)
//   trace/relocated                 ns a traced call of the same body built without a patchable
//                                   entry (trace_relocated_target.cc), hooked through a relocated
//                                   prologue (CPU time, as trace/traced)
//   uftrace/dynamic_full            ns a call of that body under `uftrace record -P` on a build
//                                   without instrumentation flags: uftrace's full dynamic patching
//                                   (bench_uftrace_plain_child). Skipped, saying why, when this
//                                   uftrace cannot do it (Debian 12's 0.13 is built without capstone)
//   trace/relocated/ratio_to_uftrace_full    trace/relocated over uftrace/dynamic_full (target <= 1/3)
//   trace/relocated/ratio_to_uftrace_record  trace/relocated over uftrace/record, uftrace's tracing
//                                   of a patchable entry: the peer figure this run always has
//   trace/floor                     ns a call of the patchable function through a minimal hand-written
//                                   tracer of the same shape: an entry stub that reads the TSC, stores
//                                   an event and swaps the return address, a return stub that reads the
//                                   TSC, stores an event and jumps back (no shadow stack, one thread)
//   trace/traced/over_floor         trace/traced over trace/floor
//   trace/floor/ratio_to_uftrace_record  trace/floor over uftrace/record: the ratio no tracer of this
//                                   shape beats with this clock
//   trace/relocated/floor           the same floor with tramway's relocated hook as the entry: the
//                                   relocated function between two TSC reads, its callback only
//                                   sending its return to a stub that jumps back
//   trace/relocated/above_floor     trace/relocated minus trace/relocated/floor: the tracer's own
//                                   bookkeeping (events, shadow stack, finding the frame at the return)
//
// A traced run makes kCalls calls: its events are all recorded (none lost; checked), and every
// kBurst calls the rings are flushed with timing paused, so the figure is what the calling
// thread pays to record, not what the flusher thread pays to write. uftrace runs as a child, once
// a repetition, as in bench_hooks.cc (which says why).
#include <x86intrin.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <string>
#include <vector>

#include "child.h"
#include "noinline.h"
#include "report.h"
#include "tramway/hooks.h"
#include "tramway/trace.h"
#include "tramway/trace/format.h"

// trace_target.cc: compiled with -fpatchable-function-entry=13,8; trace_relocated_target.cc:
// the same body, without.
extern "C" void bench_trace_target(std::uint64_t x);
extern "C" void bench_trace_relocated_target(std::uint64_t x);

namespace {

using benchmark::State;
using tramway::Status;
using tramway_bench::run_child;
using tramway_bench::sibling;
using tramway_bench::take_child_figures;
namespace hooks = tramway::hooks;
namespace trace = tramway::trace;
namespace fs = std::filesystem;

constexpr char kGlob[] = "bench_trace_target";
constexpr char kRelocatedGlob[] = "bench_trace_relocated_target";
// Calls a traced run (and a uftrace run) makes: 2 million events, 32 MB of trace at 16 bytes
// an event, in a scratch directory removed afterwards.
constexpr benchmark::IterationCount kCalls = 1'000'000;
// Calls between flushes: their events (2 a call) fill at most half of a default ring
// (RecordOptions::ring_events, 65,536), so none is lost whether or not the flusher keeps up.
constexpr std::uint64_t kBurst = 1u << 14;

void fail(State& state, const std::string& what) { state.SkipWithError(what.c_str()); }

void bm_timestamp(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(__rdtsc());
}

// A directory of its own under TMPDIR (or /tmp), removed with everything in it.
struct ScratchDir {
  std::string path;
  ScratchDir() {
    std::error_code ec;
    std::string pattern = (fs::temp_directory_path(ec) / "bench_trace.XXXXXX").string();
    if (!ec && mkdtemp(pattern.data())) path = pattern;
  }
  ~ScratchDir() {
    std::error_code ignored;
    if (!path.empty()) fs::remove_all(path, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
};

// ---- calls ------------------------------------------------------------------------------------
// One loop for every call figure, so that they differ by the tracing only. With `between`,
// every kBurst calls it runs with timing paused.
template <void (*F)(std::uint64_t)>
BENCH_NOINLINE void call_loop(State& state, const std::function<void()>* between) {
  std::uint64_t i = 0;
  for (auto _ : state) {
    F(++i);
    if ((i & (kBurst - 1)) == 0 && between) {
      state.PauseTiming();
      (*between)();
      state.ResumeTiming();
    }
  }
}

void bm_untraced(State& state) { call_loop<bench_trace_target>(state, nullptr); }

// What any tracer of the relocated function that hooks returns pays at least with this clock:
// its hook, whose callback swaps the return address for a stub that only jumps back (the
// function's `ret` then mispredicts, as it does under every return-hooking tracer, uftrace's
// too), and a timestamp on each side of the call. Nothing recorded, no shadow stack.
extern "C" std::uintptr_t bench_floor_return_to;  // one thread: one frame at a time
std::uintptr_t bench_floor_return_to = 0;
extern "C" void bench_floor_return();
asm(R"(
	.text
	.type	bench_floor_return, @function
bench_floor_return:
	jmp	*bench_floor_return_to(%rip)
	.size	bench_floor_return, . - bench_floor_return
)");

// The minimal tracer under trace/floor: events into a ring of 4,096, the one open frame's
// return address in a global (the benchmark's thread calls one function, unnested).
extern "C" {
struct FloorEvent {
  std::uint64_t time, function;
};
alignas(64) FloorEvent bench_floor_ring[4096];
std::uint64_t bench_floor_head = 0;
std::uintptr_t bench_floor_caller = 0;
void bench_floor_call(std::uint64_t x);  // calls bench_trace_target(x) through the stubs
}
asm(R"(
	/* One event: the TSC and the function into the ring's next slot (clobbers rax, rcx, rdx). */
	.macro FLOOR_EVENT
	rdtsc
	shlq	$32, %rdx
	orq	%rdx, %rax
	movq	bench_floor_head(%rip), %rcx
	leaq	1(%rcx), %rdx
	movq	%rdx, bench_floor_head(%rip)
	andq	$4095, %rcx
	shlq	$4, %rcx
	leaq	bench_floor_ring(%rip), %rdx
	movq	%rax, (%rdx,%rcx)
	leaq	bench_trace_target(%rip), %rax
	movq	%rax, 8(%rdx,%rcx)
	.endm
	.text
	.type	bench_floor_call, @function
bench_floor_call:
	FLOOR_EVENT
	movq	(%rsp), %rax
	movq	%rax, bench_floor_caller(%rip)
	leaq	bench_floor_exit(%rip), %rax
	movq	%rax, (%rsp)
	jmp	bench_trace_target
	.size	bench_floor_call, . - bench_floor_call
	.type	bench_floor_exit, @function
bench_floor_exit:
	movq	%rax, %r11
	FLOOR_EVENT
	movq	%r11, %rax
	jmp	*bench_floor_caller(%rip)
	.size	bench_floor_exit, . - bench_floor_exit
)");

void bm_floor(State& state) { call_loop<bench_floor_call>(state, nullptr); }

void bm_relocated_floor(State& state) {
  hooks::Ops ops;
  ops.entry = [](const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs& regs) {
    std::uintptr_t* slot = hooks::caller_return_slot(regs);
    bench_floor_return_to = *slot;
    *slot = reinterpret_cast<std::uintptr_t>(&bench_floor_return);
  };
  ops.promise_vector_free = true;  // as the tracer's (the function takes no floating-point argument)
  if (Status s = hooks::attach(ops, hooks::Filter::glob(kRelocatedGlob)); !s.ok()) {
    return fail(state, "hooks::attach: " + s.message());
  }
  std::uint64_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(__rdtsc());
    bench_trace_relocated_target(++i);
    benchmark::DoNotOptimize(__rdtsc());
  }
  if (Status s = hooks::detach(ops); !s.ok()) fail(state, "hooks::detach: " + s.message());
}

// The end chunk (format.h: the last one of a file closed cleanly) holds the totals.
bool read_end_chunk(const std::string& file, std::uint64_t& events, std::uint64_t& lost) {
  namespace format = trace::format;
  std::ifstream in(file, std::ios::binary);
  format::ChunkHeader header;
  std::uint64_t totals[2];
  constexpr auto kTail = static_cast<std::streamoff>(sizeof header + sizeof totals);
  if (!in.seekg(-kTail, std::ios::end)) return false;
  if (!in.read(reinterpret_cast<char*>(&header), sizeof header) || !in.read(reinterpret_cast<char*>(totals), sizeof totals))
    return false;
  if (header.type != format::ChunkType::end || header.size != sizeof totals) return false;
  events = totals[0];
  lost = totals[1];
  return true;
}

// Traces calls of F, the function `glob` names.
template <void (*F)(std::uint64_t)>
void bm_traced(State& state, const char* glob) {
  ScratchDir dir;
  if (dir.path.empty()) return fail(state, "cannot create a scratch directory");
  trace::RecordOptions options;
  options.output = dir.path + "/bench.trace";
  if (Status s = trace::start(options); !s.ok()) return fail(state, "trace::start: " + s.message());
  if (auto attached = trace::attach(glob); !attached.ok()) {
    (void)trace::stop();
    return fail(state, std::string("trace::attach(\"") + glob + "\"): " + attached.status().message());
  }
  Status flushed;
  const std::function<void()> flush = [&flushed] {
    if (flushed.ok()) flushed = trace::flush();
  };
  call_loop<F>(state, &flush);
  if (Status s = trace::stop(); !s.ok()) return fail(state, "trace::stop: " + s.message());
  if (!flushed.ok()) return fail(state, "trace::flush: " + flushed.message());

  std::uint64_t events = 0, lost = 0;
  if (!read_end_chunk(options.output, events, lost))
    return fail(state, options.output + " does not end with an end chunk (tramway/trace/format.h)");
  const auto expected = 2 * static_cast<std::uint64_t>(state.iterations());
  if (lost != 0 || events != expected) {
    return fail(state, "the trace holds " + std::to_string(events) + " events and " + std::to_string(lost) +
                           " lost for " + std::to_string(state.iterations()) + " calls; expected " +
                           std::to_string(expected) + " and none lost");
  }
  std::error_code ec;
  const auto bytes = fs::file_size(options.output, ec);
  if (ec) return fail(state, "size of " + options.output + ": " + ec.message());
  state.counters["bytes_per_event"] = static_cast<double>(bytes) / static_cast<double>(events);
}

// ---- uftrace, as a child (bench/child.h) -------------------------------------------------------
// uftrace's records of the traced threads: one TID.dat file each (perf-cpuN.dat hold its
// scheduling events, not calls).
std::uintmax_t uftrace_record_bytes(const fs::path& data) {
  static const std::regex tid_file(R"([0-9]+\.dat)");
  std::uintmax_t bytes = 0;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(data, ec)) {
    if (std::regex_match(e.path().filename().string(), tid_file)) bytes += e.file_size(ec);
  }
  return bytes;
}

// uftrace 0.13 patches the address __patchable_function_entries lists, so its child is built
// with -fpatchable-function-entry=5 (bench_hooks.cc's bm_uftrace says why); --no-libcall keeps it
// from also hooking the PLT. One run a repetition (Iterations(1)). `child` and `figure`: the
// plain build and uftrace/dynamic_full for its full dynamic patching.
void bm_uftrace(State& state, const char* child, const char* figure) {
  ScratchDir dir;
  if (dir.path.empty()) return fail(state, "cannot create a scratch directory");
  const std::string data = dir.path + "/data";
  std::string out;
  for (auto _ : state) {
    if (std::string e = run_child({"uftrace", "record", "--no-libcall", "-d", data, "-P", "^bench_uftrace_target$",
                                   sibling(child), std::to_string(kCalls), figure},
                                  out);
        !e.empty()) {
      return fail(state, e);
    }
  }
  if (std::string e = take_child_figures(out, {{figure, "ns"}}, state, child); !e.empty()) {
    return fail(state, e);
  }
  // Its smallest record is 16 bytes: fewer bytes than 8 an event means calls went unrecorded.
  const double events = 2.0 * static_cast<double>(kCalls);
  const auto bytes = static_cast<double>(uftrace_record_bytes(data));
  if (bytes < 8 * events) {
    return fail(state, "uftrace recorded " + std::to_string(static_cast<std::uint64_t>(bytes)) + " bytes for " +
                           std::to_string(kCalls) + " calls: not every entry and exit");
  }
  state.counters[std::string(figure) + "/bytes_per_event"] = bytes / events;
}

// Empty when this uftrace can patch a function built without instrumentation flags; else why
// not. Its full dynamic patching decodes the prologue with capstone, which `uftrace --version`
// lists among its features when built with it.
std::string uftrace_full_unavailable() {
  std::string version;
  if (std::string e = run_child({"uftrace", "--version"}, version); !e.empty()) return e;
  while (!version.empty() && version.back() == '\n') version.pop_back();
  if (version.find("capstone") != std::string::npos) return {};
  return "this uftrace (" + version +
         ") is built without capstone, so -P cannot patch a function without patchable entries "
         "(uftrace record -v reports its 'dynamic patch type' as 0 (none) and the function as failed)";
}

}  // namespace

int main(int argc, char** argv) {
  using tramway_bench::add;
  using tramway_bench::counter_figure;
  using tramway_bench::difference_figure;
  using tramway_bench::Figure;
  using tramway_bench::ratio_figure;
  using tramway_bench::time_figure;
  auto cpu_ns = [](const char* name) { return time_figure(name, Figure::kCpuTime, "ns"); };

  // trace/untraced runs the nops of a site not hooked now, the same ones in every repetition:
  // GCC's five 1-byte nops become one 5-byte nop at a site's first hook, so that happens here,
  // before any repetition (as in bench_hooks). Failing, trace/traced fails too, and says why.
  {
    hooks::Ops ops;
    ops.entry = [](const hooks::Ops&, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {};
    Status s = hooks::attach(ops, hooks::Filter::addresses({reinterpret_cast<std::uintptr_t>(&bench_trace_target)}));
    if (s.ok()) s = hooks::detach(ops);
    if (!s.ok()) std::fprintf(stderr, "%s: hooking bench_trace_target: %s\n", argv[0], s.message().c_str());
  }
  add("trace/untraced", bm_untraced, {cpu_ns("trace/untraced")});
  add("trace/timestamp", bm_timestamp, {cpu_ns("trace/timestamp")});
  add("trace/traced", [](State& s) { bm_traced<bench_trace_target>(s, kGlob); },
      {cpu_ns("trace/traced"), counter_figure("trace/bytes_per_event", "bytes_per_event", "bytes")})
      ->Iterations(kCalls);
  add("trace/relocated", [](State& s) { bm_traced<bench_trace_relocated_target>(s, kRelocatedGlob); },
      {cpu_ns("trace/relocated")})
      ->Iterations(kCalls);
  add("trace/floor", bm_floor, {cpu_ns("trace/floor"), ratio_figure("trace/traced/over_floor", "trace/traced", "trace/floor")});
  add("trace/relocated/floor", bm_relocated_floor,
      {cpu_ns("trace/relocated/floor"),
       difference_figure("trace/relocated/above_floor", "trace/relocated", "trace/relocated/floor", "ns")});
  add("uftrace", [](State& s) { bm_uftrace(s, "bench_uftrace_child", "uftrace/record"); },
      {counter_figure("uftrace/record", "uftrace/record", "ns"),
       counter_figure("uftrace/bytes_per_event", "uftrace/record/bytes_per_event", "bytes"),
       ratio_figure("trace/traced/ratio_to_uftrace", "trace/traced", "uftrace/record"),
       ratio_figure("trace/relocated/ratio_to_uftrace_record", "trace/relocated", "uftrace/record"),
       ratio_figure("trace/floor/ratio_to_uftrace_record", "trace/floor", "uftrace/record")})
      ->Iterations(1);
  if (std::string why = uftrace_full_unavailable(); !why.empty()) {
    std::fprintf(stderr, "uftrace/dynamic_full: skipped: %s\n", why.c_str());
  } else {
    add("uftrace_full", [](State& s) { bm_uftrace(s, "bench_uftrace_plain_child", "uftrace/dynamic_full"); },
        {counter_figure("uftrace/dynamic_full", "uftrace/dynamic_full", "ns"),
         ratio_figure("trace/relocated/ratio_to_uftrace_full", "trace/relocated", "uftrace/dynamic_full")})
        ->Iterations(1);
  }
  return tramway_bench::run(argc, argv);
}
