// `tramway report`: one pass over the file, then the table and whichever outputs were asked
// for. Every frame is kept in memory only when the Chrome output needs them.
#include <cerrno>
#include <cstring>

#include "trace/report/report.h"

namespace tramway::trace::report {
namespace {

template <class Write>
Status write_file(const std::string& path, const char* what, Write write) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) {
    const int e = errno;
    return Status::error(std::string("cannot write the ") + what + " to " + path + ": " + std::strerror(e) +
                             " (does the directory exist and is it writable?)",
                         e);
  }
  Status st = write(f);
  if (std::fclose(f) != 0 && st.ok()) {
    const int e = errno;
    st = Status::error(std::string("cannot write the ") + what + " to " + path + ": " + std::strerror(e), e);
  }
  if (!st.ok()) return Status::error(st.message() + " (" + path + ")", st.sys_errno());
  return st;
}

}  // namespace

Status run(const Options& options, std::FILE* out) {
  ReadOptions read;
  read.progress = options.progress;
  read.diagnostics = stderr;
  BuildOptions build;
  build.keep_calls = !options.chrome.empty();
  build.max_depth = options.max_depth;
  build.filter = options.filter;
  Result<Profile> profile = load_profile(options.input, read, build);
  if (!profile.ok()) return profile.status();
  if (!options.diff.empty()) {
    Result<Profile> after = load_profile(options.diff, read, build);
    if (!after.ok()) return after.status();
    std::fputs(format_diff(*profile, *after, options.limit).c_str(), out);
    return std::fflush(out) == 0 ? Status() : Status::error("cannot print the report", errno);
  }

  const std::string report = format_report(*profile, options);
  std::fputs(report.c_str(), out);
  if (!options.histograms.empty()) {
    std::fputc('\n', out);
    std::fputs(format_histograms(*profile, options.histograms).c_str(), out);
  }
  if (options.calls) {
    std::fputc('\n', out);
    if (Status st = write_call_log(*profile, out); !st.ok()) return st;
  }

  std::string written;
  if (!options.perfetto.empty()) {
    Status st = write_file(options.perfetto, "Perfetto trace", [&](std::FILE* f) { return write_perfetto(*profile, f); });
    if (!st.ok()) return st;
    written += "wrote " + options.perfetto + " (Perfetto trace: open it in https://ui.perfetto.dev)\n";
  }
  if (!options.pprof.empty()) {
    Status st = write_file(options.pprof, "pprof profile", [&](std::FILE* f) { return write_pprof(*profile, f); });
    if (!st.ok()) return st;
    written += "wrote " + options.pprof + " (pprof profile: go tool pprof -top " + options.pprof + ", or -http=:8080)\n";
  }
  if (!options.chrome.empty()) {
    Status st = write_file(options.chrome, "Chrome trace", [&](std::FILE* f) { return write_chrome(*profile, f); });
    if (!st.ok()) return st;
    written += "wrote " + options.chrome + " (Chrome trace: open it in https://ui.perfetto.dev or chrome://tracing)\n";
  }
  if (!options.folded.empty()) {
    Status st = write_file(options.folded, "folded stacks",
                           [&](std::FILE* f) { return write_folded(*profile, f, options.per_thread); });
    if (!st.ok()) return st;
    written += "wrote " + options.folded + " (folded stacks: for flamegraph.pl or https://speedscope.app)\n";
  }
  if (!options.svg.empty()) {
    SvgOptions svg;
    svg.title = "tramway: " + options.input;
    Status st = write_file(options.svg, "SVG flame graph", [&](std::FILE* f) { return write_svg(*profile, f, svg); });
    if (!st.ok()) return st;
    written += "wrote " + options.svg + " (flame graph: open it in a browser)\n";
  }
  if (!written.empty()) std::fputs(("\n" + written).c_str(), out);
  if (std::fflush(out) != 0 || std::ferror(out)) {
    const int e = errno;
    return Status::error(std::string("cannot print the report: ") + std::strerror(e), e);
  }
  return {};
}

}  // namespace tramway::trace::report
