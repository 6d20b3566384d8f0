#include "common/eh_frame_hdr.h"

#include <cstring>

namespace tramway::common {
namespace {

// DWARF pointer encodings (LSB's exception-frames chapter).
constexpr std::uint8_t kOmit = 0xff;
constexpr std::uint8_t kFormatMask = 0x0f;
constexpr std::uint8_t kUleb128 = 0x01, kUdata2 = 0x02, kUdata4 = 0x03, kUdata8 = 0x04;
constexpr std::uint8_t kSleb128 = 0x09, kSdata2 = 0x0a, kSdata4 = 0x0b, kSdata8 = 0x0c;
constexpr std::uint8_t kDatarelSdata4 = 0x3b;  // the search table's encoding

template <typename T>
T load(const std::uint8_t* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

std::uint64_t uleb(const std::uint8_t*& p) noexcept {
  std::uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    const std::uint8_t b = *p++;
    v |= std::uint64_t{b & 0x7fu} << shift;
    if (!(b & 0x80)) break;
  }
  return v;
}

void skip_leb(const std::uint8_t*& p) noexcept {
  while (*p++ & 0x80) {
  }
}

// Reads a value of the encoding's format only (no pc/data-relative adjustment: callers use this
// for lengths and for fields whose base they add themselves). False for a format we do not know.
bool read_format(const std::uint8_t*& p, std::uint8_t enc, std::int64_t& out) noexcept {
  switch (enc & kFormatMask) {
    case 0x00: case kUdata8: case kSdata8: out = load<std::int64_t>(p); p += 8; return true;
    case kUdata4: out = load<std::uint32_t>(p); p += 4; return true;
    case kSdata4: out = load<std::int32_t>(p); p += 4; return true;
    case kUdata2: out = load<std::uint16_t>(p); p += 2; return true;
    case kSdata2: out = load<std::int16_t>(p); p += 2; return true;
    case kUleb128: out = static_cast<std::int64_t>(uleb(p)); return true;
    case kSleb128: skip_leb(p); return false;  // never used for these fields
    default: return false;
  }
}

// The FDE pointer encoding from a CIE's augmentation ('R'), or kOmit when it cannot be read.
std::uint8_t fde_encoding(const std::uint8_t* cie) noexcept {
  if (load<std::uint32_t>(cie) == 0xffffffffu || load<std::uint32_t>(cie + 4) != 0) return kOmit;
  const std::uint8_t version = cie[8];
  const char* aug = reinterpret_cast<const char*>(cie + 9);
  const std::size_t aug_len = std::strlen(aug);
  if (std::strstr(aug, "eh")) return kOmit;  // the pre-DWARF-2 GCC form
  const std::uint8_t* p = cie + 9 + aug_len + 1;
  skip_leb(p);  // code alignment
  skip_leb(p);  // data alignment
  if (version == 1) ++p; else skip_leb(p);  // return address register
  if (aug[0] != 'z') return 0x00;           // no augmentation data: absolute pointers
  skip_leb(p);                              // augmentation data length
  for (const char* a = aug + 1; *a; ++a) {
    switch (*a) {
      case 'R': return *p;
      case 'L': ++p; break;
      case 'P': {
        const std::uint8_t penc = *p++;
        std::int64_t ignored;
        if (!read_format(p, penc, ignored)) return kOmit;
        break;
      }
      case 'S': case 'B': case 'G': break;
      default: return kOmit;
    }
  }
  return 0x00;
}

}  // namespace

FunctionBounds function_containing(std::uintptr_t hdr, std::uintptr_t pc) noexcept {
  const auto* h = reinterpret_cast<const std::uint8_t*>(hdr);
  if (h[0] != 1 || h[3] != kDatarelSdata4) return {};
  const std::uint8_t* p = h + 4;
  std::int64_t ignored, count;
  if (!read_format(p, h[1], ignored) || !read_format(p, h[2], count) || count <= 0) return {};
  const std::uint8_t* table = p;
  auto loc = [&](std::int64_t i) { return hdr + static_cast<std::intptr_t>(load<std::int32_t>(table + 8 * i)); };
  // The last entry whose initial location is at or before pc.
  std::int64_t lo = 0, hi = count;
  while (lo < hi) {
    const std::int64_t mid = lo + (hi - lo) / 2;
    if (loc(mid) <= pc) lo = mid + 1; else hi = mid;
  }
  if (lo == 0) return {};
  const std::int64_t i = lo - 1;
  const std::uintptr_t begin = loc(i);
  const auto* fde = reinterpret_cast<const std::uint8_t*>(hdr + static_cast<std::intptr_t>(load<std::int32_t>(table + 8 * i + 4)));
  if (load<std::uint32_t>(fde) == 0xffffffffu) return {};  // 64-bit DWARF: not written for x86-64 code
  const std::uint8_t* cie_field = fde + 4;
  const std::uint8_t* cie = cie_field - load<std::uint32_t>(cie_field);
  const std::uint8_t enc = fde_encoding(cie);
  if (enc == kOmit || (enc & 0x80)) return {};
  const std::uint8_t* q = fde + 8;
  std::int64_t range;
  if (!read_format(q, enc, ignored) || !read_format(q, enc & kFormatMask, range) || range <= 0) return {};
  const std::uintptr_t end = begin + static_cast<std::uintptr_t>(range);
  if (pc >= end) return {};  // in a gap between functions (code without CFI)
  return {begin, end};
}

}  // namespace tramway::common
