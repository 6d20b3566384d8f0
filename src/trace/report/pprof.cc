// pprof's profile.proto (github.com/google/pprof/proto/profile.proto), gzipped: the calling-
// context tree of every thread as samples, one a distinct stack, with two values — the stack's
// calls and its self wall time — so `pprof -top` shows self (flat) and inclusive (cum) time as
// the table does, and -sample_index=calls the calls. A sample carries its thread as a label.
// Memory is that of the tree (one node a distinct stack), not of the events.
#include <zlib.h>

#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "trace/report/internal.h"
#include "trace/report/protobuf_wire.h"

namespace tramway::trace::report {
namespace {

// Field numbers of profile.proto.
enum : std::uint32_t {
  kSampleType = 1, kSample = 2, kMapping = 3, kLocation = 4, kFunction = 5, kStringTable = 6,
  kDurationNanos = 10, kDefaultSampleType = 14,
  kValueTypeType = 1, kValueTypeUnit = 2,
  kSampleLocations = 1, kSampleValues = 2, kSampleLabel = 3,
  kLabelKey = 1, kLabelStr = 2,
  kMappingId = 1, kMappingStart = 2, kMappingLimit = 3, kMappingFilename = 5, kMappingHasFunctions = 7,
  kLocationId = 1, kLocationMapping = 2, kLocationAddress = 3, kLocationLine = 4,
  kLineFunction = 1,
  kFunctionId = 1, kFunctionName = 2, kFunctionSystemName = 3,
};

class Strings {
 public:
  std::uint64_t operator()(const std::string& s) {
    auto [it, fresh] = index_.try_emplace(s, table_.size());
    if (fresh) table_.push_back(s);
    return it->second;
  }
  const std::vector<std::string>& table() const { return table_; }

 private:
  std::unordered_map<std::string, std::uint64_t> index_{{"", 0}};
  std::vector<std::string> table_{""};
};

Status gzip_to(const std::string& bytes, std::FILE* out) {
  z_stream z{};
  if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
    return Status::error("pprof: zlib could not start a gzip stream");
  }
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data()));
  z.avail_in = static_cast<uInt>(bytes.size());
  unsigned char buf[1 << 16];
  int rc = Z_OK;
  do {
    z.next_out = buf;
    z.avail_out = sizeof buf;
    rc = deflate(&z, Z_FINISH);
    const std::size_t n = sizeof buf - z.avail_out;
    if (n > 0 && std::fwrite(buf, 1, n, out) != n) {
      const int e = errno;
      deflateEnd(&z);
      return Status::error(std::string("writing the pprof profile: ") + std::strerror(e), e);
    }
  } while (rc == Z_OK);
  deflateEnd(&z);
  return rc == Z_STREAM_END ? Status() : Status::error("pprof: zlib failed to compress the profile");
}

}  // namespace

Status write_pprof(const Profile& profile, std::FILE* out) {
  detail::ProtoWriter w;
  Strings str;
  const auto value_type = [&](std::uint32_t field, const char* type, const char* unit) {
    const std::size_t v = w.begin(field);
    w.uint(kValueTypeType, str(type));
    w.uint(kValueTypeUnit, str(unit));
    w.end(v);
  };
  value_type(kSampleType, "calls", "count");
  value_type(kSampleType, "wall", "nanoseconds");

  // A location and a function a function of the trace, with the same id (its index + 1).
  const std::size_t m = w.begin(kMapping);
  w.uint(kMappingId, 1);
  w.uint(kMappingStart, 0);
  w.uint(kMappingLimit, ~std::uint64_t{0});
  w.uint(kMappingFilename, str("pid " + std::to_string(profile.source.header.pid)));
  w.uint(kMappingHasFunctions, 1);
  w.end(m);
  for (std::size_t i = 0; i < profile.functions.size(); ++i) {
    const std::size_t loc = w.begin(kLocation);
    w.uint(kLocationId, i + 1);
    w.uint(kLocationMapping, 1);
    w.uint(kLocationAddress, profile.functions[i].address);
    const std::size_t line = w.begin(kLocationLine);
    w.uint(kLineFunction, i + 1);
    w.end(line);
    w.end(loc);
    const std::size_t fn = w.begin(kFunction);
    w.uint(kFunctionId, i + 1);
    const std::uint64_t name = str(detail::valid_utf8(profile.functions[i].name));
    w.uint(kFunctionName, name);
    w.uint(kFunctionSystemName, name);
    w.end(fn);
  }

  std::vector<std::uint64_t> stack;
  const std::uint64_t thread_key = str("thread");
  for (const ThreadProfile& t : profile.threads) {
    const std::uint64_t thread = str(detail::valid_utf8(detail::thread_label(t)));
    for (std::size_t n = 1; n < t.tree.size(); ++n) {
      const CallNode& node = t.tree[n];
      if (node.calls == 0 && node.self_ns == 0) continue;
      stack.clear();  // leaf first
      for (std::size_t at = n; at != 0; at = t.tree[at].parent) stack.push_back(t.tree[at].function + 1);
      const std::size_t s = w.begin(kSample);
      w.packed(kSampleLocations, stack);
      w.packed(kSampleValues, std::initializer_list<std::uint64_t>{node.calls, node.self_ns});
      const std::size_t label = w.begin(kSampleLabel);
      w.uint(kLabelKey, thread_key);
      w.uint(kLabelStr, thread);
      w.end(label);
      w.end(s);
    }
  }
  w.uint(kDurationNanos, profile.duration_ns());
  const std::uint64_t wall = str("wall");
  for (const std::string& s : str.table()) w.string(kStringTable, s);
  w.uint(kDefaultSampleType, wall);
  return gzip_to(w.bytes, out);
}

}  // namespace tramway::trace::report
