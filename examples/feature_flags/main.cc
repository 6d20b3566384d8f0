// feature_flags — static keys and static calls switched under running threads.
//
// N worker threads loop through two static-key branches (`verbose_checks`, initially false;
// `fast_path`, initially true) and two static calls (`compress`: store | rle | delta;
// `checksum`: adler32 | fnv1a). The main thread flips one of them every --interval-ms and
// reports how long each flip took. Workers count, in thread-local counters, the path each
// branch took and the target each call reached; at the end the counts are merged and
// checked:
//   * every call reached exactly one target (per-target sums == calls made), and every
//     iteration took exactly one path of each branch;
//   * no iteration that began after a flip had returned (and ended before the next one
//     began) saw the old path or target — the guarantee static_key.h and static_call.h make.
//
// Exit status: 0 checks passed, 1 a tramway call failed, 2 bad flags, 3 a check failed.

#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "tramway/static_call.h"
#include "tramway/static_key.h"
#include "tramway/text/patch.h"

// Key and static call names are global assembler symbols; the C++ objects live in a named
// namespace only so that `compress` does not collide with a C symbol of that name (zlib's).
namespace ff {
namespace {

constexpr std::size_t kBlock = 64;
enum Compressor : unsigned { kStore, kRle, kDelta, kCompressors };
enum Checksum : unsigned { kAdler32, kFnv1a, kChecksums };
constexpr const char* kCompressorNames[kCompressors] = {"store", "rle", "delta"};
constexpr const char* kChecksumNames[kChecksums] = {"adler32", "fnv1a"};

struct Tally {
  std::uint64_t verbose[2];  // [off, on]
  std::uint64_t fast[2];     // [off, on]
  std::uint64_t compress[kCompressors];
  std::uint64_t checksum[kChecksums];
  unsigned last_compress;  // the target the latest call reached
  unsigned last_checksum;
};
// Trivially constructible, so targets reach it with one TLS-relative access, no wrapper.
thread_local Tally t_tally;

// --- the targets: small, real work; each records that it ran ---------------------------------
std::size_t compress_store(const std::uint8_t* in, std::size_t n, std::uint8_t* out) {
  ++t_tally.compress[kStore];
  t_tally.last_compress = kStore;
  std::memcpy(out, in, n);
  return n;
}

std::size_t compress_rle(const std::uint8_t* in, std::size_t n, std::uint8_t* out) {
  ++t_tally.compress[kRle];
  t_tally.last_compress = kRle;
  std::size_t o = 0;
  for (std::size_t i = 0; i < n;) {
    std::size_t run = 1;
    while (i + run < n && run < 255 && in[i + run] == in[i]) ++run;
    out[o++] = static_cast<std::uint8_t>(run);
    out[o++] = in[i];
    i += run;
  }
  return o;
}

std::size_t compress_delta(const std::uint8_t* in, std::size_t n, std::uint8_t* out) {
  ++t_tally.compress[kDelta];
  t_tally.last_compress = kDelta;
  std::uint8_t previous = 0;
  for (std::size_t i = 0; i < n; ++i) {
    out[i] = static_cast<std::uint8_t>(in[i] - previous);
    previous = in[i];
  }
  return n;
}

std::uint32_t checksum_adler32(const std::uint8_t* p, std::size_t n) {
  ++t_tally.checksum[kAdler32];
  t_tally.last_checksum = kAdler32;
  std::uint32_t a = 1, b = 0;
  for (std::size_t i = 0; i < n; ++i) {
    a = (a + p[i]) % 65521;
    b = (b + a) % 65521;
  }
  return b << 16 | a;
}

std::uint32_t checksum_fnv1a(const std::uint8_t* p, std::size_t n) {
  ++t_tally.checksum[kFnv1a];
  t_tally.last_checksum = kFnv1a;
  std::uint32_t h = 2166136261u;
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

}  // namespace

TRAMWAY_STATIC_KEY_FALSE(verbose_checks);
TRAMWAY_STATIC_KEY_TRUE(fast_path);
TRAMWAY_DEFINE_STATIC_CALL(compress, compress_store);
TRAMWAY_DEFINE_STATIC_CALL(checksum, checksum_adler32);

namespace {

using CompressFn = std::size_t(const std::uint8_t*, std::size_t, std::uint8_t*);
using ChecksumFn = std::uint32_t(const std::uint8_t*, std::size_t);
CompressFn* const kCompressTargets[kCompressors] = {compress_store, compress_rle, compress_delta};
ChecksumFn* const kChecksumTargets[kChecksums] = {checksum_adler32, checksum_fnv1a};

// What the switches are set to, as a bit set: workers compare it with what they ran.
constexpr unsigned kVerboseBit = 1, kFastBit = 2, kCompressShift = 2, kChecksumShift = 4;

// A seqlock around every flip: odd while a flip is in progress, bumped to the next even
// value once the flip call has returned and g_expected describes the new state.
std::atomic<std::uint64_t> g_seq{0};
std::atomic<unsigned> g_expected{kFastBit | kStore << kCompressShift | kAdler32 << kChecksumShift};
std::atomic<bool> g_stop{false};
std::atomic<unsigned> g_ready{0};

struct WorkerResult {
  Tally tally{};
  std::uint64_t iterations = 0;
  std::uint64_t calls = 0;       // static calls made
  std::uint64_t stale = 0;       // iterations that saw a path or target a completed flip retired
  std::uint64_t bad_output = 0;  // caught by the verbose_checks path
};

void work(WorkerResult& result, unsigned seed) {
  std::uint8_t in[kBlock], packed[2 * kBlock];
  for (std::size_t i = 0; i < kBlock; ++i) in[i] = static_cast<std::uint8_t>((i / 5 + seed) * 37);
  std::uint64_t iterations = 0, calls = 0, stale = 0, bad = 0;
  g_ready.fetch_add(1);
  while (!g_stop.load(std::memory_order_relaxed)) {
    const std::uint64_t seq = g_seq.load(std::memory_order_acquire);
    const unsigned expected = g_expected.load(std::memory_order_relaxed);
    asm volatile("" ::: "memory");  // keep the branches below after the reads above
    unsigned seen = 0;
    // Declared before the first branch: clang 14 rejects an initialised declaration between
    // two static branches of one function (see the note in the README's limits).
    std::size_t len = kBlock, n = 0;
    std::uint32_t sum = 0;

    if (TRAMWAY_STATIC_BRANCH_LIKELY(fast_path)) {
      ++t_tally.fast[1];
      seen |= kFastBit;
      len = kBlock / 2;  // the "fast" configuration handles smaller blocks
    } else {
      ++t_tally.fast[0];
    }
    n = TRAMWAY_STATIC_CALL(compress)(in, len, packed);
    sum = TRAMWAY_STATIC_CALL(checksum)(packed, n);
    calls += 2;
    seen |= t_tally.last_compress << kCompressShift | t_tally.last_checksum << kChecksumShift;
    if (TRAMWAY_STATIC_BRANCH_UNLIKELY(verbose_checks)) {
      ++t_tally.verbose[1];
      seen |= kVerboseBit;
      if (n == 0 || n > 2 * len) ++bad;
    } else {
      ++t_tally.verbose[0];
    }
    in[iterations % kBlock] ^= static_cast<std::uint8_t>(sum);  // feed back: no dead work

    asm volatile("" ::: "memory");  // ... and before the re-read below
    if (!(seq & 1) && g_seq.load(std::memory_order_acquire) == seq && seen != expected) ++stale;
    ++iterations;
  }
  result.tally = t_tally;
  result.iterations = iterations;
  result.calls = calls;
  result.stale = stale;
  result.bad_output = bad;
}

// --- output helpers ---------------------------------------------------------------------------
std::string grouped(std::uint64_t v) {
  std::string digits = std::to_string(v), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

const char* on_off(bool b) { return b ? "on" : "off"; }

struct Flip {
  std::string what;
  tramway::Status status;
};

// The flips, round-robin: each key alone, each static call to its next target, and both keys
// in one KeyBatch (one batch, however many branches).
Flip flip(unsigned step, unsigned& state, std::chrono::nanoseconds& took) {
  using Clock = std::chrono::steady_clock;
  Flip f;
  char buf[96];
  const bool verbose = state & kVerboseBit, fast = state & kFastBit;
  const unsigned c = state >> kCompressShift & 3, k = state >> kChecksumShift & 3;
  Clock::time_point t0, t1;
  switch (step % 5) {
    case 0:
      t0 = Clock::now();
      f.status = tramway::toggle(verbose_checks);
      t1 = Clock::now();
      std::snprintf(buf, sizeof buf, "verbose_checks  %s -> %s", on_off(verbose), on_off(!verbose));
      state ^= kVerboseBit;
      break;
    case 1:
      t0 = Clock::now();
      f.status = fast ? tramway::disable(fast_path) : tramway::enable(fast_path);
      t1 = Clock::now();
      std::snprintf(buf, sizeof buf, "fast_path       %s -> %s", on_off(fast), on_off(!fast));
      state ^= kFastBit;
      break;
    case 2: {
      const unsigned next = (c + 1) % kCompressors;
      t0 = Clock::now();
      f.status = tramway::static_call_update(compress, kCompressTargets[next]);
      t1 = Clock::now();
      std::snprintf(buf, sizeof buf, "compress        %s -> %s", kCompressorNames[c], kCompressorNames[next]);
      state = (state & ~(3u << kCompressShift)) | next << kCompressShift;
      break;
    }
    case 3: {
      const unsigned next = (k + 1) % kChecksums;
      t0 = Clock::now();
      f.status = tramway::static_call_update(checksum, kChecksumTargets[next]);
      t1 = Clock::now();
      std::snprintf(buf, sizeof buf, "checksum        %s -> %s", kChecksumNames[k], kChecksumNames[next]);
      state = (state & ~(3u << kChecksumShift)) | next << kChecksumShift;
      break;
    }
    default:
      t0 = Clock::now();
      f.status = tramway::KeyBatch().toggle(verbose_checks).toggle(fast_path).commit();
      t1 = Clock::now();
      std::snprintf(buf, sizeof buf, "verbose_checks,fast_path %s,%s -> %s,%s", on_off(verbose), on_off(fast),
                    on_off(!verbose), on_off(!fast));
      state ^= kVerboseBit | kFastBit;
      break;
  }
  took = t1 - t0;
  f.what = buf;
  return f;
}

struct Row {
  const char* group;
  const char* path;
  std::uint64_t (*get)(const WorkerResult&);
};

}  // namespace
}  // namespace ff

int main(int argc, char** argv) {
  using namespace ff;
  using Clock = std::chrono::steady_clock;

  unsigned threads = 4;
  double seconds = 3;
  unsigned interval_ms = 200;
  CLI::App app{"Flips tramway static keys and static calls while worker threads run through them."};
  app.add_option("--threads", threads, "worker threads")->capture_default_str()->check(CLI::Range(1u, 256u));
  app.add_option("--seconds", seconds, "how long to run")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            double v = 0;
            if (!CLI::detail::lexical_cast(s, v) || !(v > 0 && v <= 3600)) return "must be in (0, 3600], got " + s;
            return {};
          },
          "SECONDS in (0, 3600]"));
  app.add_option("--interval-ms", interval_ms, "time between flips (ms)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 60000u));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  const auto run_for = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  const auto interval = std::chrono::milliseconds(interval_ms);
  if (interval >= run_for) {
    std::fprintf(stderr, "feature_flags: --interval-ms %u is not shorter than --seconds %g: nothing would flip\n",
                 interval_ms, seconds);
    return 2;
  }

  std::printf("feature_flags: %u workers, %g s, a flip every %u ms  (branches: verbose_checks %zu, fast_path %zu)\n",
              threads, seconds, interval_ms, tramway::branch_count(verbose_checks), tramway::branch_count(fast_path));

  std::vector<WorkerResult> results(threads);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) workers.emplace_back(work, std::ref(results[i]), i);
  while (g_ready.load() < threads) std::this_thread::yield();

  auto stop_workers = [&] {
    g_stop.store(true);
    for (auto& w : workers) w.join();
  };

  // Widths spelled out: "µ" is two bytes, which printf's padding would count as two columns.
  std::printf("   t (s)  %-42s   took (µs)  serial  traps\n", "flip");
  std::vector<double> took_us;
  unsigned state = g_expected.load();
  const auto start = Clock::now();
  for (unsigned step = 0;; ++step) {
    const auto when = start + interval * (step + 1);
    if (when >= start + run_for) break;
    std::this_thread::sleep_until(when);
    const tramway::text::PatchStats before = tramway::text::stats();
    std::chrono::nanoseconds took{};
    g_seq.fetch_add(1);  // odd: flip in progress
    Flip f = flip(step, state, took);
    if (!f.status.ok()) {
      stop_workers();
      std::fprintf(stderr, "feature_flags: %s failed: %s\n", f.what.c_str(), f.status.message().c_str());
      return 1;
    }
    g_expected.store(state, std::memory_order_relaxed);
    g_seq.fetch_add(1);  // even: flip returned, g_expected is the new state
    const tramway::text::PatchStats after = tramway::text::stats();
    took_us.push_back(std::chrono::duration<double, std::micro>(took).count());
    std::printf("  %6.2f  %-42s %12.1f %7llu %6llu\n",
                std::chrono::duration<double>(Clock::now() - start).count(), f.what.c_str(), took_us.back(),
                static_cast<unsigned long long>(after.serialisations - before.serialisations),
                static_cast<unsigned long long>(after.traps_emulated - before.traps_emulated));
  }
  std::this_thread::sleep_until(start + run_for);
  stop_workers();

  if (!took_us.empty()) {
    std::vector<double> sorted = took_us;
    std::sort(sorted.begin(), sorted.end());
    std::printf("  %zu flips: min %.1f µs, median %.1f µs, max %.1f µs (the first one also registers the process "
                "for membarrier)\n",
                sorted.size(), sorted.front(), sorted[sorted.size() / 2], sorted.back());
  }

  // --- the summary table: one row per path/target, a column per worker (up to 8), total ----
  const Row rows[] = {
      {"verbose_checks", "off", [](const WorkerResult& r) { return r.tally.verbose[0]; }},
      {"", "on", [](const WorkerResult& r) { return r.tally.verbose[1]; }},
      {"fast_path", "on", [](const WorkerResult& r) { return r.tally.fast[1]; }},
      {"", "off", [](const WorkerResult& r) { return r.tally.fast[0]; }},
      {"compress", kCompressorNames[kStore], [](const WorkerResult& r) { return r.tally.compress[kStore]; }},
      {"", kCompressorNames[kRle], [](const WorkerResult& r) { return r.tally.compress[kRle]; }},
      {"", kCompressorNames[kDelta], [](const WorkerResult& r) { return r.tally.compress[kDelta]; }},
      {"checksum", kChecksumNames[kAdler32], [](const WorkerResult& r) { return r.tally.checksum[kAdler32]; }},
      {"", kChecksumNames[kFnv1a], [](const WorkerResult& r) { return r.tally.checksum[kFnv1a]; }},
      {"iterations", "", [](const WorkerResult& r) { return r.iterations; }},
      {"static calls", "", [](const WorkerResult& r) { return r.calls; }},
  };
  const bool per_worker = threads <= 8;
  std::printf("\n  %-15s%-8s", "count", "");
  if (per_worker) {
    for (unsigned w = 0; w < threads; ++w) std::printf(" %13s", ("worker " + std::to_string(w)).c_str());
  }
  std::printf(" %15s\n", "total");
  for (const Row& row : rows) {
    std::uint64_t total = 0;
    std::printf("  %-15s%-8s", row.group, row.path);
    for (const WorkerResult& r : results) {
      total += row.get(r);
      if (per_worker) std::printf(" %13s", grouped(row.get(r)).c_str());
    }
    std::printf(" %15s\n", grouped(total).c_str());
  }
  if (!per_worker) {  // too many columns: the per-worker totals as a range instead
    const auto [lo, hi] = std::minmax_element(results.begin(), results.end(), [](auto& a, auto& b) {
      return a.iterations < b.iterations;
    });
    std::printf("  iterations per worker: min %s (worker %td), max %s (worker %td)\n", grouped(lo->iterations).c_str(),
                lo - results.begin(), grouped(hi->iterations).c_str(), hi - results.begin());
  }

  const tramway::text::PatchStats s = tramway::text::stats();
  std::printf("\n  text layer: %llu batches, %llu serialisations, %llu page writes, %llu traps emulated, "
              "%llu restarted\n",
              static_cast<unsigned long long>(s.batches), static_cast<unsigned long long>(s.serialisations),
              static_cast<unsigned long long>(s.page_writes), static_cast<unsigned long long>(s.traps_emulated),
              static_cast<unsigned long long>(s.traps_restarted));

  // --- the checks ----------------------------------------------------------------------------
  std::uint64_t calls = 0, stale = 0, bad = 0;
  std::vector<std::string> failures;
  for (unsigned w = 0; w < threads; ++w) {
    const WorkerResult& r = results[w];
    const Tally& t = r.tally;
    std::uint64_t reached = 0;
    for (auto n : t.compress) reached += n;
    for (auto n : t.checksum) reached += n;
    const auto who = "worker " + std::to_string(w) + ": ";
    if (reached != r.calls) {
      failures.push_back(who + grouped(r.calls) + " static calls made but targets counted " + grouped(reached));
    }
    if (t.verbose[0] + t.verbose[1] != r.iterations || t.fast[0] + t.fast[1] != r.iterations) {
      failures.push_back(who + "branch paths taken do not add up to " + grouped(r.iterations) + " iterations");
    }
    calls += r.calls;
    stale += r.stale;
    bad += r.bad_output;
  }
  if (stale) failures.push_back(grouped(stale) + " iterations saw a path or target that a completed flip had retired");
  if (bad) failures.push_back("verbose_checks caught " + grouped(bad) + " bad outputs");
  if (!failures.empty()) {
    for (const auto& f : failures) std::fprintf(stderr, "feature_flags: FAILED: %s\n", f.c_str());
    return 3;
  }
  std::printf("  check: all %s static calls reached exactly one target; no stale path or target after a flip: OK\n",
              grouped(calls).c_str());
  return 0;
}
