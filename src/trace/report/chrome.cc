// Chrome trace-event JSON (the "JSON Object Format" of the Trace Event Format document), which
// Perfetto UI and chrome://tracing load. Every frame is one complete ("X") event: nesting
// comes from the times, and a frame closed by unwinding or by the end of the trace still
// balances (no dangling "B"). Timestamps are microseconds; printed from integer nanoseconds
// with three decimals, so they are exact.
#include <cerrno>
#include <cinttypes>
#include <cstring>

#include "trace/report/internal.h"

namespace tramway::trace::report {
namespace {

std::string microseconds(std::uint64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%" PRIu64 ".%03" PRIu64, ns / 1000, ns % 1000);
  return buf;
}

const char* end_name(CallEnd end) {
  switch (end) {
    case CallEnd::returned: return "returned";
    case CallEnd::unwound: return "unwound";
    case CallEnd::open: return "open at end of trace";
  }
  return "";
}

}  // namespace

Status write_chrome(const Profile& profile, std::FILE* out) {
  for (const ThreadProfile& t : profile.threads)
    if (t.tree.size() > 1 && t.calls.empty())
      return Status::error("the Chrome trace needs every call: load the profile with BuildOptions::keep_calls");

  const std::uint64_t pid = profile.source.header.pid;
  std::vector<std::string> names;  // escaped once, used per call
  names.reserve(profile.functions.size());
  for (const FunctionInfo& f : profile.functions) names.push_back(detail::json_escape(f.name));

  std::string line;
  bool first = true;
  const auto emit = [&] {
    std::fputs(first ? "\n" : ",\n", out);
    std::fwrite(line.data(), 1, line.size(), out);
    first = false;
  };
  std::fputs("{\"traceEvents\":[", out);
  line = "{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":" + std::to_string(pid) +
         ",\"tid\":0,\"args\":{\"name\":\"pid " + std::to_string(pid) + " (tramway trace)\"}}";
  emit();
  for (const ThreadProfile& t : profile.threads) {
    const std::string tid = std::to_string(t.tid);
    const std::string thread_name = t.name.empty() ? "thread " + tid : t.name;
    line = "{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":" + std::to_string(pid) + ",\"tid\":" + tid +
           ",\"args\":{\"name\":\"" + detail::json_escape(thread_name) + "\"}}";
    emit();
    for (const Call& c : t.calls) {
      line = "{\"ph\":\"X\",\"cat\":\"function\",\"name\":\"";
      line += names[c.function];
      line += "\",\"pid\":" + std::to_string(pid) + ",\"tid\":" + tid + ",\"ts\":" + microseconds(c.start_ns) +
              ",\"dur\":" + microseconds(c.duration_ns);
      if (c.end != CallEnd::returned) line += ",\"args\":{\"end\":\"" + std::string(end_name(c.end)) + "\"}";
      line += "}";
      emit();
    }
  }
  std::fprintf(out,
               "\n],\n\"displayTimeUnit\":\"ns\",\n\"otherData\":{\"source\":\"tramway\",\"file\":\"%s\","
               "\"events\":%" PRIu64 ",\"lost\":%" PRIu64 ",\"truncated\":%s}}\n",
               detail::json_escape(profile.source.path).c_str(), profile.events, profile.lost,
               profile.source.truncated ? "true" : "false");
  if (std::fflush(out) != 0 || std::ferror(out)) {
    const int e = errno;
    return Status::error(std::string("writing the Chrome trace failed: ") + std::strerror(e), e);
  }
  return {};
}

}  // namespace tramway::trace::report
