// The program test_gdb runs under gdb: three threads call a patch site while the main thread
// flips it with batches (every batch writes an int3 on it). `gdb_target N` prints "ok" after N
// batches; `gdb_target blocked` blocks SIGTRAP in a thread with a raw system call and prints
// the refused batch's error.
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "tramway/text/patch.h"

extern "C" {
int gdb_flip_fn();  // entry `jmp gdb_flip_a` (1) or `jmp gdb_flip_b` (2)
extern const std::uint8_t gdb_flip_site[], gdb_flip_a[], gdb_flip_b[];
}
__asm__(R"(
  .text
  .p2align 4
  .globl gdb_flip_fn
  .globl gdb_flip_site
  .globl gdb_flip_a
  .globl gdb_flip_b
  .type gdb_flip_fn, @function
gdb_flip_fn:
gdb_flip_site:
  .byte 0xe9
  .long gdb_flip_a - gdb_flip_site - 5
gdb_flip_a:
  movl $1, %eax
  ret
gdb_flip_b:
  movl $2, %eax
  ret
  .size gdb_flip_fn, . - gdb_flip_fn
)");

namespace {

tramway::Status flip(int i) {
  const std::uint8_t* to = (i & 1) ? gdb_flip_a : gdb_flip_b;
  std::uint8_t b[5] = {0xe9};
  const auto rel = static_cast<std::int32_t>(to - (gdb_flip_site + 5));
  std::memcpy(b + 1, &rel, 4);
  tramway::text::PatchBatch batch;
  if (tramway::Status s = batch.add(const_cast<std::uint8_t*>(gdb_flip_site), b); !s.ok()) return s;
  return tramway::text::apply(batch);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "200";
  if (mode == "blocked") {
    std::atomic<bool> blocked{false}, stop{false};
    std::thread t([&] {
      const std::uint64_t m = std::uint64_t{1} << (SIGTRAP - 1);
      syscall(SYS_rt_sigprocmask, SIG_BLOCK, &m, nullptr, 8);
      blocked.store(true);
      while (!stop.load()) {
      }  // runs: 2 ms of CPU with SIGTRAP blocked prove the mask is the program's
    });
    while (!blocked.load()) std::this_thread::yield();
    const tramway::Status s = flip(0);
    stop.store(true);
    t.join();
    std::printf("%s\n", s.ok() ? "applied" : s.message().c_str());
    return 0;
  }
  const int batches = std::atoi(mode.c_str());
  std::atomic<bool> stop{false};
  std::atomic<long> calls{0}, bad{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < 3; ++i) {
    callers.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        const int r = gdb_flip_fn();
        if (r != 1 && r != 2) bad.fetch_add(1);
        calls.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  for (int i = 0; i < batches; ++i) {
    if (tramway::Status s = flip(i); !s.ok()) {
      std::printf("batch %d: %s\n", i, s.message().c_str());
      std::fflush(stdout);
      _exit(2);
    }
  }
  stop.store(true);
  for (auto& t : callers) t.join();
  std::printf("%s after %d batches\n", bad.load() == 0 ? "ok" : "BAD RESULTS", batches);
  return bad.load() == 0 ? 0 : 3;
}
