// Executable memory for generated code: arenas of one memfd mapped twice (RX and RW),
// carved into 16-byte-aligned blocks. Near placement searches /proc/self/maps for the free
// hole closest to the target and maps there with MAP_FIXED_NOREPLACE.
#include "tramway/text/code_memory.h"

#include "common/eject.h"
#include "common/format.h"
#include "text/internal.h"
#include "common/unload_freed.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace tramway::text {
namespace {

constexpr std::size_t kPage = 4096;
constexpr std::size_t kArenaSize = 256 * 1024;
constexpr std::size_t kAlign = 16;
// Keep a margin below 2 GiB so a 5-byte instruction anywhere in reach still encodes.
constexpr std::uintptr_t kReach = (std::uintptr_t{1} << 31) - kPage;

struct Arena {
  std::uint8_t* rx;
  std::uint8_t* rw;
  std::size_t size;
  int fd;
  std::map<std::size_t, std::size_t> free;  // offset -> length, coalesced
};

struct State {
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;  // lock rank text, the last of it (common/lock_order.h)
  std::vector<Arena*> arenas;  // never shrinks; arenas are not unmapped while the process runs
  std::vector<int> child_fds;  // during fork(): each arena's copy for the child, -1 where none
};
common::UnloadFreed<State> g_state;  // used until the last thread exits (or an eject's unload)
State& state() { return g_state.get(); }

// Unloaded after an eject (common/eject.h): every hook is detached and no thread runs in the
// arenas (the agent watched them), so they go with the library.
__attribute__((destructor)) void unmap_arenas_at_unload() {
  if (!common::ejecting()) return;
  for (Arena* a : state().arenas) {
    munmap(a->rx, a->size);
    munmap(a->rw, a->size);
    close(a->fd);
    delete a;
  }
  state().arenas.clear();
}

bool in_reach(std::uintptr_t near, std::uintptr_t begin, std::size_t size) {
  const std::uintptr_t end = begin + size;
  const std::uintptr_t lo = near > kReach ? near - kReach : 0;
  const std::uintptr_t hi = near + kReach;
  return begin >= lo && end <= hi;
}

std::vector<std::pair<std::uintptr_t, std::uintptr_t>> mapped_ranges() {
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> out;
  if (FILE* f = std::fopen("/proc/self/maps", "re")) {
    char line[512];
    while (std::fgets(line, sizeof line, f)) {
      std::uintptr_t b, e;
      if (std::sscanf(line, "%" SCNxPTR "-%" SCNxPTR, &b, &e) == 2) out.emplace_back(b, e);
    }
    std::fclose(f);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Page-aligned addresses, closest to `near` first, where `size` bytes are free and in reach.
std::vector<std::uintptr_t> candidate_addresses(std::uintptr_t near, std::size_t size) {
  const auto maps = mapped_ranges();
  std::vector<std::uintptr_t> out;
  std::uintptr_t prev_end = 0x10000;  // stay above mmap_min_addr
  auto consider = [&](std::uintptr_t hole_b, std::uintptr_t hole_e) {
    if (hole_e <= hole_b || hole_e - hole_b < size) return;
    // The spot in [hole_b, hole_e - size] nearest to `near`, page aligned.
    std::uintptr_t want = near > size / 2 ? (near - size / 2) & ~(kPage - 1) : 0;
    want = std::clamp(want, (hole_b + kPage - 1) & ~(kPage - 1), (hole_e - size) & ~(kPage - 1));
    if (want >= hole_b && want + size <= hole_e && in_reach(near, want, size)) out.push_back(want);
  };
  for (const auto& [b, e] : maps) {
    consider(prev_end, b);
    prev_end = std::max(prev_end, e);
  }
  consider(prev_end, std::uintptr_t{0x7ffffffff000});  // top of the user address space
  std::sort(out.begin(), out.end(), [&](std::uintptr_t x, std::uintptr_t y) {
    auto dist = [&](std::uintptr_t a) { return a > near ? a - near : near - a; };
    return dist(x) < dist(y);
  });
  return out;
}

// Maps a new arena; at `hint` exactly (MAP_FIXED_NOREPLACE) when hint != 0.
Result<Arena*> map_arena(std::size_t size, std::uintptr_t hint) {
  const int fd = memfd_create("tramway-code", MFD_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    return Status::error(std::string("memfd_create for generated code failed: ") + std::strerror(e), e);
  }
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int e = errno;
    close(fd);
    return Status::error(std::string("sizing the code memfd failed: ") + std::strerror(e), e);
  }
  const int flags = MAP_SHARED | (hint ? MAP_FIXED_NOREPLACE : 0);
  void* rx = mmap(reinterpret_cast<void*>(hint), size, PROT_READ | PROT_EXEC, flags, fd, 0);
  if (rx == MAP_FAILED || (hint && rx != reinterpret_cast<void*>(hint))) {
    const int e = errno;
    if (rx != MAP_FAILED) munmap(rx, size);
    close(fd);
    return Status::error(std::string("mapping the RX view failed: ") + std::strerror(e), e);
  }
  void* rw = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (rw == MAP_FAILED) {
    const int e = errno;
    munmap(rx, size);
    close(fd);
    return Status::error(std::string("mapping the RW view failed: ") + std::strerror(e), e);
  }
  auto* a = new Arena{static_cast<std::uint8_t*>(rx), static_cast<std::uint8_t*>(rw), size, fd, {}};
  a->free.emplace(0, size);
  return a;
}

// First fit inside one arena, honouring reach from `near` when near != 0.
std::uint8_t* carve(Arena& a, std::size_t size, std::uintptr_t near) {
  for (auto it = a.free.begin(); it != a.free.end(); ++it) {
    const auto [off, len] = *it;
    if (len < size) continue;
    const auto where = reinterpret_cast<std::uintptr_t>(a.rx) + off;
    if (near && !in_reach(near, where, size)) continue;
    a.free.erase(it);
    if (len > size) a.free.emplace(off + size, len - size);
    return a.rx + off;
  }
  return nullptr;
}

Result<CodeBlock> allocate(std::size_t size, const void* near_ptr) {
  if (size == 0) return Status::error("cannot allocate an empty code block");
  size = (size + kAlign - 1) & ~(kAlign - 1);
  const auto near = reinterpret_cast<std::uintptr_t>(near_ptr);
  State& st = state();
  pthread_mutex_lock(&st.mu);
  struct Unlock { pthread_mutex_t* m; ~Unlock() { pthread_mutex_unlock(m); } } unlock{&st.mu};
  for (Arena* a : st.arenas) {
    if (std::uint8_t* p = carve(*a, size, near)) {
      return CodeBlock{p, a->rw + (p - a->rx), size};
    }
  }
  const std::size_t arena_size = std::max(kArenaSize, (size + kPage - 1) & ~(kPage - 1));
  Result<Arena*> arena = Status::error("");
  if (!near) {
    arena = map_arena(arena_size, 0);
  } else {
    const auto candidates = candidate_addresses(near, arena_size);
    if (candidates.empty()) {
      return Status::error("no free address space within +-2 GiB of " + common::hex_address(near) + " for " +
                           std::to_string(arena_size) + " bytes of code: that window is fully mapped");
    }
    for (std::uintptr_t c : candidates) {
      arena = map_arena(arena_size, c);
      if (arena.ok()) break;  // else raced with another mapping: try the next hole
    }
  }
  if (!arena.ok()) return arena.status();
  st.arenas.push_back(*arena);
  std::uint8_t* p = carve(**arena, size, near);
  return CodeBlock{p, (*arena)->rw + (p - (*arena)->rx), size};
}

}  // namespace

namespace detail {
// MAP_SHARED views would let parent and child write each other's code (a direct slot the
// parent hands to another ops would change under the child's sites). So the child gets private
// copies at the same addresses. The copies are taken here, in the parent, before fork() and
// under every lock that writes code: the parent resumes as soon as fork() returns, and a copy
// taken in the child's handler would catch the parent's writes of that moment.
void code_memory_before_fork() noexcept {
  pthread_mutex_lock(&state().mu);
  state().child_fds.clear();
  for (Arena* a : state().arenas) {
    int fd = memfd_create("tramway-code", MFD_CLOEXEC);
    if (fd >= 0 && (ftruncate(fd, static_cast<off_t>(a->size)) != 0 ||
                    pwrite(fd, a->rx, a->size, 0) != static_cast<ssize_t>(a->size))) {
      close(fd);
      fd = -1;  // that arena stays shared rather than lose its code
    }
    state().child_fds.push_back(fd);
  }
}
void code_memory_after_fork_in_parent() noexcept {
  for (int fd : state().child_fds)
    if (fd >= 0) close(fd);
  state().child_fds.clear();
  pthread_mutex_unlock(&state().mu);
}
void code_memory_after_fork_in_child() noexcept {
  const std::vector<Arena*>& arenas = state().arenas;
  for (std::size_t i = 0; i < arenas.size() && i < state().child_fds.size(); ++i) {
    Arena* a = arenas[i];
    const int fd = state().child_fds[i];
    if (fd < 0) continue;
    mmap(a->rx, a->size, PROT_READ | PROT_EXEC, MAP_SHARED | MAP_FIXED, fd, 0);
    mmap(a->rw, a->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    close(a->fd);
    a->fd = fd;
  }
  state().child_fds.clear();
  pthread_mutex_unlock(&state().mu);
}
}  // namespace detail

Result<CodeBlock> allocate_code(std::size_t size) { return allocate(size, nullptr); }

Result<CodeBlock> allocate_code_near(const void* near, std::size_t size) {
  if (!near) return Status::error("allocate_code_near needs a target address");
  return allocate(size, near);
}

void free_code(const CodeBlock& block) {
  if (!block.rx) return;
  State& st = state();
  pthread_mutex_lock(&st.mu);
  for (Arena* a : st.arenas) {
    if (block.rx < a->rx || block.rx >= a->rx + a->size) continue;
    std::size_t off = static_cast<std::size_t>(block.rx - a->rx), len = block.size;
    auto next = a->free.lower_bound(off);
    if (next != a->free.end() && off + len == next->first) {
      len += next->second;
      next = a->free.erase(next);
    }
    if (next != a->free.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == off) {
        prev->second += len;
        break;
      }
    }
    a->free.emplace(off, len);
    break;
  }
  pthread_mutex_unlock(&st.mu);
}

std::uint8_t* writable_alias(const void* address) noexcept {
  const auto* p = static_cast<const std::uint8_t*>(address);
  State& st = state();
  pthread_mutex_lock(&st.mu);
  std::uint8_t* out = nullptr;
  for (Arena* a : st.arenas) {
    if (p >= a->rx && p < a->rx + a->size) {
      out = a->rw + (p - a->rx);
      break;
    }
  }
  pthread_mutex_unlock(&st.mu);
  return out;
}

}  // namespace tramway::text
