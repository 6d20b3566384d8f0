// common/tramway_mapping.h — which mappings of a process are tramway's own: its libraries
// (libtramway.so, libtramway_trace.so, libtramway_agent.so) and its code arenas (the memfd
// "tramway-code", shown as "/memfd:tramway-code (deleted)"). What eject must see every thread
// outside of, and leave none of behind. Header-only: the injector, the command and the tests
// do not link libtramway.
#pragma once

#include <string_view>

namespace tramway::common {

// `path` as /proc/PID/maps shows it.
inline bool is_tramway_mapping(std::string_view path) noexcept {
  const auto slash = path.rfind('/');
  const std::string_view base = slash == std::string_view::npos ? path : path.substr(slash + 1);
  return base.starts_with("libtramway") || base.starts_with("memfd:tramway-code");
}

}  // namespace tramway::common
