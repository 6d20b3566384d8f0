// trace/report/protobuf_wire.h — the protobuf wire format, written by hand into a growing
// buffer (varints, length-delimited fields, nested messages) for the Perfetto and pprof
// writers: no message objects, a few instructions a field. Nothing is checked against a
// schema here; the tests decode the outputs with protoc and go tool pprof.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace tramway::trace::report::detail {

// Protobuf wire format into a growing buffer. A nested message is written after a one-byte
// length placeholder and its length patched in (moved when it needs more bytes).
class ProtoWriter {
 public:
  std::string bytes;

  void varint(std::uint64_t v) {
    char tmp[10];
    std::size_t n = 0;
    for (; v >= 0x80; v >>= 7) tmp[n++] = static_cast<char>(v | 0x80);
    tmp[n++] = static_cast<char>(v);
    bytes.append(tmp, n);
  }
  void uint(std::uint32_t field, std::uint64_t v) {
    varint(std::uint64_t{field} << 3);
    varint(v);
  }
  void string(std::uint32_t field, std::string_view s) {
    varint(std::uint64_t{field} << 3 | 2);
    varint(s.size());
    bytes.append(s);
  }
  // A packed repeated varint field.
  template <class Range>
  void packed(std::uint32_t field, const Range& values) {
    const std::size_t start = begin(field);
    for (const auto v : values) varint(static_cast<std::uint64_t>(v));
    end(start);
  }
  // Starts a length-delimited field (a nested message); end() closes it.
  std::size_t begin(std::uint32_t field) {
    varint(std::uint64_t{field} << 3 | 2);
    bytes += '\0';
    return bytes.size();
  }
  void end(std::size_t start) {
    const std::size_t length = bytes.size() - start;
    if (length < 0x80) {
      bytes[start - 1] = static_cast<char>(length);
      return;
    }
    char prefix[10];
    std::size_t n = 0;
    for (std::uint64_t v = length; v >= 0x80; v >>= 7) prefix[n++] = static_cast<char>(v | 0x80);
    prefix[n] = static_cast<char>(length >> (7 * n));
    bytes.replace(start - 1, 1, prefix, n + 1);
  }
};

}  // namespace tramway::trace::report::detail
