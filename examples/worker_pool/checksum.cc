// checksum — CRC-32 (table-driven, a byte at a time) and Adler-32, as zlib defines them.
#include <algorithm>
#include <array>

#include "worker_pool.h"

namespace checksum {

using Crc32Table = std::array<std::uint32_t, 256>;

// Built on first use; C++ makes that thread-safe.
WP_NOINLINE const Crc32Table& crc32_table() {
  static const Crc32Table table = [] {
    Crc32Table t{};
    for (std::uint32_t n = 0; n < 256; ++n) {
      std::uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  return table;
}

WP_NOINLINE std::uint32_t crc32(Bytes data, std::uint32_t crc) {
  const Crc32Table& table = crc32_table();
  crc = ~crc;
  for (std::uint8_t b : data) crc = table[(crc ^ b) & 0xff] ^ (crc >> 8);
  return ~crc;
}

constexpr std::uint32_t kAdlerBase = 65521;
// The most bytes whose sums cannot overflow 32 bits before the modulo (zlib's NMAX).
constexpr std::size_t kAdlerChunk = 5552;

WP_NOINLINE void adler32_chunk(Bytes chunk, std::uint32_t& a, std::uint32_t& b) {
  for (std::uint8_t byte : chunk) {
    a += byte;
    b += a;
  }
  a %= kAdlerBase;
  b %= kAdlerBase;
}

WP_NOINLINE std::uint32_t adler32(Bytes data) {
  std::uint32_t a = 1, b = 0;
  while (!data.empty()) {
    const std::size_t n = std::min(kAdlerChunk, data.size());
    adler32_chunk(data.first(n), a, b);
    data = data.subspan(n);
  }
  return b << 16 | a;
}

}  // namespace checksum
