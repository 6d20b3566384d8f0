// codec — LZSS (worker_pool.h gives the format). The encoder finds matches through hash chains
// of 3-byte prefixes, searching at most kMaxChain earlier positions per token (greedy parse).
#include <algorithm>
#include <limits>

#include "worker_pool.h"

namespace codec {

constexpr std::size_t kWindow = 4096;
constexpr std::size_t kMinMatch = 3;
constexpr std::size_t kMaxMatch = 18;
constexpr std::size_t kMaxChain = 32;
constexpr unsigned kHashBits = 12;
constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();
// Positions are 32-bit; the header holds the size in 32 bits.
constexpr std::size_t kMaxInput = std::size_t{1} << 30;

struct Match {
  std::size_t offset = 0;
  std::size_t length = 0;  // 0: none
};

// head[h]: the latest position whose 3 bytes hash to h; prev[p]: the one before p with p's hash.
struct MatchIndex {
  explicit MatchIndex(std::size_t size) : head(std::size_t{1} << kHashBits, kNone), prev(size, kNone) {}
  std::vector<std::uint32_t> head;
  std::vector<std::uint32_t> prev;
};

inline std::uint32_t hash3(const std::uint8_t* p) {
  const std::uint32_t v = p[0] | static_cast<std::uint32_t>(p[1]) << 8 | static_cast<std::uint32_t>(p[2]) << 16;
  return (v * 2654435761u) >> (32 - kHashBits);
}

inline void insert_position(MatchIndex& index, Bytes in, std::size_t pos) {
  if (pos + kMinMatch > in.size()) return;
  const std::uint32_t h = hash3(&in[pos]);
  index.prev[pos] = index.head[h];
  index.head[h] = static_cast<std::uint32_t>(pos);
}

WP_NOINLINE std::size_t match_length(const std::uint8_t* a, const std::uint8_t* b, std::size_t max) {
  std::size_t n = 0;
  while (n < max && a[n] == b[n]) ++n;
  return n;
}

// The longest match for `pos` among the chain's first kMaxChain positions within the window.
WP_NOINLINE Match find_match(const MatchIndex& index, Bytes in, std::size_t pos) {
  Match best;
  if (pos + kMinMatch > in.size()) return best;
  const std::size_t max = std::min(kMaxMatch, in.size() - pos);
  std::uint32_t candidate = index.head[hash3(&in[pos])];
  for (std::size_t chain = 0; candidate != kNone && chain < kMaxChain; ++chain, candidate = index.prev[candidate]) {
    const std::size_t offset = pos - candidate;
    if (offset > kWindow) break;  // the chain only gets older
    // A candidate can only beat `best` if it also matches at best.length: that one byte rules
    // most of them out without a call.
    if (best.length > 0 && in[candidate + best.length] != in[pos + best.length]) continue;
    const std::size_t length = match_length(&in[candidate], &in[pos], max);
    if (length > best.length) {
      best = {offset, length};
      if (length == max) break;
    }
  }
  if (best.length < kMinMatch) best = {};
  return best;
}

struct TokenWriter {
  std::vector<std::uint8_t>& out;
  std::size_t flags_at = 0;
  unsigned used = 8;  // tokens in the current group
};

inline void start_token(TokenWriter& w, bool is_match) {
  if (w.used == 8) {
    w.flags_at = w.out.size();
    w.out.push_back(0);
    w.used = 0;
  }
  if (is_match) w.out[w.flags_at] |= static_cast<std::uint8_t>(1u << w.used);
  ++w.used;
}

WP_NOINLINE void emit_literal(TokenWriter& w, std::uint8_t byte) {
  start_token(w, false);
  w.out.push_back(byte);
}

WP_NOINLINE void emit_match(TokenWriter& w, Match m) {
  start_token(w, true);
  const std::size_t offset = m.offset - 1;
  w.out.push_back(static_cast<std::uint8_t>(offset & 0xff));
  w.out.push_back(static_cast<std::uint8_t>((offset >> 8) << 4 | (m.length - kMinMatch)));
}

WP_NOINLINE std::vector<std::uint8_t> compress(Bytes in) {
  std::vector<std::uint8_t> out;
  if (in.size() > kMaxInput) return out;  // not a valid stream: the round trip check fails
  out.reserve(in.size() / 2 + 16);
  for (unsigned i = 0; i < 4; ++i) out.push_back(static_cast<std::uint8_t>(in.size() >> (8 * i)));
  MatchIndex index(in.size());
  TokenWriter writer{out};
  for (std::size_t pos = 0; pos < in.size();) {
    const Match m = find_match(index, in, pos);
    if (m.length == 0) {
      emit_literal(writer, in[pos]);
      insert_position(index, in, pos++);
    } else {
      emit_match(writer, m);
      for (std::size_t end = pos + m.length; pos < end; ++pos) insert_position(index, in, pos);
    }
  }
  return out;
}

// Byte by byte: a match may overlap the bytes it produces (offset < length repeats them).
WP_NOINLINE bool copy_match(std::vector<std::uint8_t>& out, std::size_t offset, std::size_t length) {
  if (offset == 0 || offset > out.size()) return false;
  const std::size_t from = out.size() - offset;
  for (std::size_t i = 0; i < length; ++i) out.push_back(out[from + i]);
  return true;
}

WP_NOINLINE bool decompress(Bytes in, std::vector<std::uint8_t>& out) {
  out.clear();
  if (in.size() < 4) return false;
  std::size_t size = 0;
  for (unsigned i = 0; i < 4; ++i) size |= static_cast<std::size_t>(in[i]) << (8 * i);
  if (size > kMaxInput) return false;
  out.reserve(size + kMaxMatch);
  std::size_t i = 4;
  while (out.size() < size) {
    if (i >= in.size()) return false;
    const unsigned flags = in[i++];
    for (unsigned bit = 0; bit < 8 && out.size() < size; ++bit) {
      if (flags >> bit & 1) {
        if (i + 2 > in.size()) return false;
        const std::size_t offset = (in[i] | static_cast<std::size_t>(in[i + 1] >> 4) << 8) + 1;
        const std::size_t length = (in[i + 1] & 0xfu) + kMinMatch;
        i += 2;
        if (!copy_match(out, offset, length)) return false;
      } else {
        if (i >= in.size()) return false;
        out.push_back(in[i++]);
      }
    }
  }
  return i == in.size() && out.size() == size;
}

}  // namespace codec
