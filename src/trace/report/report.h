// trace/report — reading trace files and turning them into tables, Perfetto traces, pprof
// profiles, Chrome JSON, folded stacks and SVG flame graphs. Used by `tramway report`.
//
// Guarantees: nothing throws; a damaged or cut-short file is reported up to its last complete
// chunk with a warning saying how much was ignored; lost events, frames left open at the end
// and exits without an entry are counted and printed, never dropped silently. The JSON, folded
// and SVG outputs are deterministic (same file, same bytes out).
//
// Layers inside: read_trace() streams chunks into a TraceSink; ProfileBuilder is the sink
// that rebuilds per-thread call stacks into a Profile; table_rows/format_report, write_chrome,
// write_folded and write_svg render a Profile; run() wires them to `tramway report`'s options.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "trace/report/histogram.h"
#include "tramway/status.h"
#include "tramway/trace/format.h"

namespace tramway::trace::report {

enum class SortKey { calls, total, self, mean, p50, p90, p99, max, name };

// Outputs repeat a stack's frames (a folded line names every frame of its stack), so a deep
// stack or a long name would make them grow faster than the file; these bounds keep every
// output proportional to the events read.
inline constexpr std::uint32_t kDefaultMaxDepth = 512;
inline constexpr std::size_t kMaxNameBytes = 1024;  // longer function and thread names are cut, marked "..."
// Even so, a folded line repeats up to max_depth names, and a crafted file can hold many
// distinct deep stacks: the folded stacks stop (write_folded fails, saying so) past this many
// bytes, 64 times the trace file's size and at least 64 MiB.
inline constexpr std::uint64_t folded_budget(std::uint64_t trace_file_bytes) {
  return trace_file_bytes > (std::uint64_t{1} << 20) ? 64 * trace_file_bytes : std::uint64_t{64} << 20;
}

// Which calls a report covers (call_filter.h); times are ns since the recording began.
struct CallFilter {
  std::uint64_t since_ns = 0;
  std::uint64_t until_ns = ~std::uint64_t{0};
  std::uint64_t min_duration_ns = 0;
  std::vector<std::uint32_t> tids;  // empty: every thread
  bool active() const noexcept { return since_ns != 0 || until_ns != ~std::uint64_t{0} || min_duration_ns != 0 || !tids.empty(); }
};
// "250ns", "10us" (or "10µs"), "1.5ms", "2s", a plain number of seconds: ns, or an error that
// says what is accepted.
Result<std::uint64_t> parse_duration(std::string_view text);

struct Options {
  std::string input;           // the trace file
  CallFilter filter{};         // --since, --until, --min-duration, --tid
  SortKey sort = SortKey::total;
  std::size_t limit = 30;      // table rows; 0 = all
  bool per_thread = false;     // one table per thread
  std::string perfetto;        // write a Perfetto protobuf trace (.pftrace) here, if not empty
  std::string pprof;           // write a gzipped pprof profile here, if not empty
  std::string chrome;          // write Chrome trace-event JSON here, if not empty
  std::string folded;          // write folded stacks here, if not empty
  std::string svg;             // write an SVG flame graph here, if not empty
  std::uint32_t max_depth = kDefaultMaxDepth;  // stack depth the tree outputs render (BuildOptions)
  std::vector<std::string> histograms;  // shell globs: print the latency histogram of each match
  bool calls = false;                   // print the call log after the table
  std::string diff;                     // another trace: print per-function deltas to it instead
  bool progress = true;        // show progress on stderr for large files
};

// Reads options.input, prints the table to `out` and writes the requested outputs.
Status run(const Options& options, std::FILE* out);

// ---- Reading -------------------------------------------------------------------------------

// Receives a trace file's content in file order. Events of one thread arrive in time order.
class TraceSink {
 public:
  virtual ~TraceSink() = default;
  virtual void function(std::uint64_t address, std::string_view name) = 0;
  virtual void thread_name(std::uint32_t tid, std::string_view name) = 0;
  virtual void events(std::uint32_t tid, std::span<const format::Event> events) = 0;
  virtual void lost(std::uint32_t tid, std::uint64_t count) = 0;
};

struct ReadOptions {
  // A percentage line on `diagnostics`, only when it is a terminal and the file is big
  // (> 64 MiB) or reading has taken more than half a second.
  bool progress = false;
  // Warnings (truncation, damaged chunks) are printed here as they are found; nullptr keeps
  // quiet. Either way they are also returned in ReadSummary::warnings.
  std::FILE* diagnostics = stderr;
};

struct ReadSummary {
  std::string path;
  format::FileHeader header{};
  std::uint64_t file_bytes = 0;
  std::uint64_t complete_bytes = 0;  // end of the last complete chunk; the rest was ignored
  std::uint64_t events = 0;          // events handed to the sink
  std::uint64_t lost = 0;            // sum of the lost chunks (or the end chunk's total if larger)
  bool closed_cleanly = false;       // an end chunk was found
  bool truncated = false;            // no end chunk, or the last chunk runs past the end
  std::vector<std::string> warnings;
};

// Fails (with a message saying what to do) only when the file cannot be opened or is not a
// version-1 tramway trace; a file cut short or with damaged chunks still reads.
Result<ReadSummary> read_trace(const std::string& path, TraceSink& sink,
                               const ReadOptions& options = {});

// ---- Reconstruction ------------------------------------------------------------------------

inline constexpr std::uint32_t kNoFunction = ~std::uint32_t{0};

struct FunctionInfo {
  std::uint64_t address = 0;
  std::string name;  // from a functions chunk, else "0x..." (the address)
};

// How a frame was closed.
enum class CallEnd : std::uint8_t {
  returned,  // its exit event
  unwound,   // an unwound event, or skipped by the exit of a frame below it
  open,      // still open at the end of the trace: closed at the thread's last timestamp
};

// One closed frame; kept only with BuildOptions::keep_calls (Chrome output needs them).
struct Call {
  std::uint64_t start_ns = 0;
  std::uint64_t duration_ns = 0;
  std::uint32_t function = 0;  // index into Profile::functions
  std::uint32_t depth = 0;     // 0 = outermost traced frame of its thread
  CallEnd end = CallEnd::returned;
};

// A node of a thread's calling-context tree: one per distinct stack of functions.
struct CallNode {
  std::uint32_t function = kNoFunction;  // kNoFunction for the root (the thread itself)
  std::uint32_t parent = 0;
  std::uint64_t calls = 0;
  std::uint64_t total_ns = 0;  // inclusive time of the calls through this stack
  std::uint64_t self_ns = 0;   // total minus time in traced children
  std::vector<std::uint32_t> children;  // indices into ThreadProfile::tree
};

// Per function in one thread. A recursive function's nested calls count in `total_ns` again
// (total is the sum of per-call durations, like the distribution); `self_ns` never double-counts.
struct FunctionStats {
  std::uint64_t calls = 0;
  std::uint64_t total_ns = 0;
  std::uint64_t self_ns = 0;
  DurationHistogram durations;  // per call, in bounded memory (histogram.h)
};

struct ThreadProfile {
  std::uint32_t tid = 0;
  std::string name;  // from a thread chunk; empty if none named it
  std::uint64_t events = 0;
  std::uint64_t lost = 0;
  std::uint64_t first_ns = 0, last_ns = 0;  // timestamps of its first and last event
  std::uint64_t unmatched_exits = 0;  // exits/unwinds with no open frame of that function
  std::uint64_t unwound = 0;          // frames closed by unwinding (exception, longjmp, exit)
  std::uint64_t open_at_end = 0;      // frames closed at last_ns because the trace ended
  std::uint64_t truncated = 0;        // frames deeper than BuildOptions::max_depth
  std::vector<CallNode> tree;         // tree[0] is the root
  std::unordered_map<std::uint32_t, FunctionStats> functions;  // by function index
  std::vector<Call> calls;            // BuildOptions::keep_calls only, sorted by start
};

struct Profile {
  ReadSummary source;  // header, sizes, warnings of the file it came from
  std::vector<FunctionInfo> functions;   // every address seen in events or functions chunks
  std::vector<ThreadProfile> threads;    // sorted by tid
  std::uint64_t events = 0;
  std::uint64_t lost = 0;
  std::uint64_t unknown_kind_events = 0;   // ignored: written by a newer tramway?
  std::uint64_t begin_ns = 0, end_ns = 0;  // first and last timestamp over all threads
  CallFilter filter{};                     // what load_profile kept (BuildOptions::filter)

  std::uint64_t duration_ns() const { return end_ns - begin_ns; }
};

struct BuildOptions {
  bool keep_calls = false;  // record every frame in ThreadProfile::calls (memory ~ calls)
  CallFilter filter{};      // only the calls it keeps (the Profile remembers it for re-reads)
  // Frames deeper than this (0: no bound) become one node of the calling-context tree per
  // stack, a pseudo-function named "[truncated: frames deeper than N]" whose calls are the
  // frames it stands for; the table's per-function figures and the Chrome output keep them all.
  std::uint32_t max_depth = kDefaultMaxDepth;
};

// The sink that rebuilds call stacks. Feed it (directly, or through read_trace), then finish().
class ProfileBuilder final : public TraceSink {
 public:
  explicit ProfileBuilder(BuildOptions options = {});
  ~ProfileBuilder() override;
  ProfileBuilder(const ProfileBuilder&) = delete;
  ProfileBuilder& operator=(const ProfileBuilder&) = delete;

  void function(std::uint64_t address, std::string_view name) override;
  void thread_name(std::uint32_t tid, std::string_view name) override;
  void events(std::uint32_t tid, std::span<const format::Event> events) override;
  void lost(std::uint32_t tid, std::uint64_t count) override;

  // Closes frames still open, resolves names; the builder is spent afterwards.
  Profile finish(ReadSummary source = {});

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// read_trace + ProfileBuilder.
Result<Profile> load_profile(const std::string& path, const ReadOptions& read = {},
                             const BuildOptions& build = {});

// ---- Outputs -------------------------------------------------------------------------------

// One row per function name (addresses with the same name are merged).
struct Row {
  std::string name;
  std::uint64_t calls = 0;
  std::uint64_t total_ns = 0;
  std::uint64_t self_ns = 0;
  std::uint64_t min_ns = 0;
  std::uint64_t mean_ns = 0;
  // Nearest rank (p99: the smallest duration at least 99% of the calls do not exceed), within
  // DurationHistogram::kMaxRelativeError; min and max are exact.
  std::uint64_t p50_ns = 0, p90_ns = 0, p99_ns = 0;
  std::uint64_t max_ns = 0;
  std::uint64_t stddev_ns = 0;  // population standard deviation
};

// Rows over all threads (thread == nullptr) or one, sorted by `sort` (descending, ties and
// SortKey::name by name ascending), at most `limit` (0 = all).
std::vector<Row> table_rows(const Profile& profile, const ThreadProfile* thread, SortKey sort,
                            std::size_t limit);

// "812 ns", "12.3 µs", "4.56 ms", "1.20 s": three significant digits.
std::string format_duration(std::uint64_t ns);

// Aligned columns: calls, total, self, min, mean, p50, p90, p99, max, stddev, function.
std::string format_table(const std::vector<Row>& rows);

// Log-scale latency histograms, one per function name matching one of `globs` (fnmatch, over
// all threads), bpftrace-style: a line per power of two with its calls and a bar; a glob
// matching no function says so.
std::string format_histograms(const Profile& profile, const std::vector<std::string>& globs);

// What `tramway report` prints: the header line, the table (or one per thread), footnotes.
std::string format_report(const Profile& profile, const Options& options);

// Perfetto's native protobuf format (TrackEvent: a sequence and a track a thread, interned
// names, incremental timestamps, lost events as instants), for https://ui.perfetto.dev. Reads
// profile.source.path again and writes as it reads: memory does not grow with the events.
Status write_perfetto(const Profile& profile, std::FILE* out);

// The indented call log of every thread, uftrace-replay style (a line a call, with its
// duration; a call with callees opens a brace), streamed as the trace file is read again.
Status write_call_log(const Profile& profile, std::FILE* out);

// Per-function deltas from `before` to `after` (calls, total, self, p99), by name, the largest
// change of total time first: what `report A --diff B` prints.
std::string format_diff(const Profile& before, const Profile& after, std::size_t limit);

// pprof's profile.proto, gzipped: a sample a distinct stack of each thread (labelled with the
// thread), its values the stack's calls and self wall time (ns; the default), so `go tool pprof
// -top` shows self and inclusive time per function.
Status write_pprof(const Profile& profile, std::FILE* out);

// Chrome trace-event JSON, "X" events (needs BuildOptions::keep_calls). Loads in Perfetto UI
// and chrome://tracing.
Status write_chrome(const Profile& profile, std::FILE* out);

// Folded stacks ("a;b;c 1234"), values are self time in ns, aggregated across threads; with
// `per_thread`, each stack starts with a frame naming its thread.
Status write_folded(const Profile& profile, std::FILE* out, bool per_thread = false);

struct SvgOptions {
  unsigned width = 1200;          // pixels
  double min_frame_width = 0.1;   // frames narrower than this (pixels) are omitted
  std::string title = "Flame Graph";
};
// A self-contained SVG flame graph of total time, aggregated across threads.
Status write_svg(const Profile& profile, std::FILE* out, const SvgOptions& options = {});

}  // namespace tramway::trace::report
