// Small helpers shared by the layers' error messages and timeouts.
#pragma once

#include <time.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace tramway::common {

// "0x7f3a...": how every tramway message shows an address.
inline std::string hex_address(std::uintptr_t a) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%#lx", static_cast<unsigned long>(a));
  return buf;
}

// "[0x1000, 0x2000)": how every tramway message shows an address range. Appended piecewise:
// GCC 12 at -O3 warns (-Wrestrict, a false positive) on "[" + std::string.
inline std::string range_text(std::uintptr_t begin, std::uintptr_t end) {
  std::string s = "[";
  s += hex_address(begin);
  s += ", ";
  s += hex_address(end);
  s += ")";
  return s;
}

// CLOCK_MONOTONIC in nanoseconds.
inline std::int64_t monotonic_ns() noexcept {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<std::int64_t>(t.tv_sec) * 1'000'000'000 + t.tv_nsec;
}

}  // namespace tramway::common
