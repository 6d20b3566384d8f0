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

// CLOCK_MONOTONIC in nanoseconds.
inline std::int64_t monotonic_ns() noexcept {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<std::int64_t>(t.tv_sec) * 1'000'000'000 + t.tv_nsec;
}

}  // namespace tramway::common
