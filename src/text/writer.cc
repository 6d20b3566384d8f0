// Writing code without ever mapping it writable and executable (DESIGN invariant 6).
//
// Program text: pwrite to /proc/self/mem. The kernel writes through its own mapping of the
// page (breaking copy-on-write for file-backed text on the first write), so the user mapping
// keeps r-x throughout and other threads keep executing it. Generated code: a plain store
// through the block's RW view. Measured here: one /proc/self/mem write costs about 1 us
// whatever its size, hence one write per touched page per phase. The bytes a page write
// rewrites with their current value are read through the file as well (read_code), so a page
// that was unmapped fails the write instead of crashing the writer.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "common/format.h"
#include "text/internal.h"
#include "common/eject.h"
#include "tramway/text/code_memory.h"
#include "tramway/text/patch.h"

namespace tramway::text::detail {
namespace {

constexpr std::uintptr_t kPageSize = 4096;
// Opened once per process; the file is bound to the mm it was opened in, so a forked child
// must reopen it (writer_after_fork_in_child).
std::atomic<int> g_mem_fd{-1};

Result<int> mem_fd() {
  int fd = g_mem_fd.load(std::memory_order_acquire);
  if (fd >= 0) return fd;
  fd = ::open("/proc/self/mem", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    return Status::error(std::string("cannot open /proc/self/mem for writing code: ") + std::strerror(e) +
                             " (tramway writes program text through it; is /proc mounted?)",
                         e);
  }
  int expected = -1;
  if (!g_mem_fd.compare_exchange_strong(expected, fd)) {
    ::close(fd);
    return expected;
  }
  return fd;
}

// Unloaded after an eject (common/eject.h): no batch runs any more.
__attribute__((destructor)) void close_mem_fd_at_unload() {
  if (!common::ejecting()) return;
  const int fd = g_mem_fd.exchange(-1);
  if (fd >= 0) ::close(fd);
}

}  // namespace

Status write_span(std::uintptr_t address, const std::uint8_t* bytes, std::size_t len) {
  counters().page_writes.fetch_add(1, std::memory_order_relaxed);
  if (std::uint8_t* alias = writable_alias(reinterpret_cast<const void*>(address))) {
    std::memcpy(alias, bytes, len);
    return {};
  }
  auto fd = mem_fd();
  if (!fd.ok()) return fd.status();
  std::size_t done = 0;
  while (done < len) {
    const ssize_t n = ::pwrite(*fd, bytes + done, len - done, static_cast<off_t>(address + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = n < 0 ? errno : EIO;
      return Status::error("writing code at " + common::hex_address(address + done) + " through /proc/self/mem failed: " +
                               std::strerror(e) + " (is the address mapped?)",
                           e);
    }
    done += static_cast<std::size_t>(n);
  }
  return {};
}

}  // namespace tramway::text::detail

namespace tramway::text {

// Through /proc/self/mem like the writes: a page unmapped meanwhile (an object unloaded behind
// its caller's back) is an error, not a SIGSEGV. Generated code is tramway's own and stays mapped.
Status read_code(const void* address, std::span<std::uint8_t> out) {
  if (const std::uint8_t* alias = writable_alias(address)) {
    std::memcpy(out.data(), alias, out.size());
    return {};
  }
  auto fd = detail::mem_fd();
  if (!fd.ok()) return fd.status();
  const auto at = reinterpret_cast<std::uintptr_t>(address);
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::pread(*fd, out.data() + done, out.size() - done, static_cast<off_t>(at + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = n < 0 ? errno : EIO;
      return Status::error("reading code at " + common::hex_address(at + done) + " through /proc/self/mem failed: " +
                               std::strerror(e) + " (was it unmapped, its object unloaded?)",
                           e);
    }
    done += static_cast<std::size_t>(n);
  }
  return {};
}

}  // namespace tramway::text

namespace tramway::text::detail {

Status PageWriter::flush() {
  // Walk the changes page by page, one write per page covering the span from its first to
  // its last changed byte. Bytes in between are rewritten with their current value, which no
  // concurrent fetch can tell apart. A stable sort keeps the last change to a byte last.
  auto by_address = [](const auto& x, const auto& y) { return x.first < y.first; };
  if (!std::is_sorted(bytes_.begin(), bytes_.end(), by_address)) {
    std::stable_sort(bytes_.begin(), bytes_.end(), by_address);
  }
  auto it = bytes_.begin();
  while (it != bytes_.end()) {
    const std::uintptr_t page = it->first & ~(kPageSize - 1);
    auto end = it;
    std::uintptr_t last = it->first;
    while (end != bytes_.end() && (end->first & ~(kPageSize - 1)) == page) last = (end++)->first;
    const std::uintptr_t first = it->first;
    std::uint8_t buf[kPageSize];
    const std::size_t len = last - first + 1;
    if (Status s = read_code(reinterpret_cast<const void*>(first), {buf, len}); !s.ok()) return s;
    for (; it != end; ++it) buf[it->first - first] = it->second;
    if (Status s = write_span(first, buf, len); !s.ok()) return s;
  }
  bytes_.clear();
  return {};
}

void writer_after_fork_in_child() noexcept {
  const int fd = g_mem_fd.exchange(-1);
  if (fd >= 0) ::close(fd);
}

}  // namespace tramway::text::detail
