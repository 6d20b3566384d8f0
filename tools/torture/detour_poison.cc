// Suite "hooks"' poisoning of freed detour copies: see detour_poison.h.
#include "detour_poison.h"

#include <signal.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "sites/hooks/detour.h"
#include "tramway/text/code_memory.h"

namespace tramway::torture {
namespace {

// The last kQuarantine copies stay poisoned and allocated; older ones are given back.
constexpr std::size_t kQuarantine = 4096;

std::mutex g_mu;
text::CodeBlock g_ring[kQuarantine];  // under g_mu
std::uint64_t g_next = 0;             // under g_mu
// What the fault handler reads: each ring slot's range, start 0 while it is being replaced.
std::atomic<std::uintptr_t> g_start[kQuarantine];
std::atomic<std::size_t> g_size[kQuarantine];
std::atomic<std::uint64_t> g_poisoned{0}, g_given_back{0}, g_bytes{0};

// ud2 (0f 0b), and every third byte 06 (push %es, undefined in 64-bit mode): a PC at any
// offset faults within two instructions. With ud2 alone a PC at an odd offset would decode
// 0b 0f, `or (%rdi),%ecx`, and slide through the block into whatever follows it.
void poison(const text::CodeBlock& b) {
  static constexpr std::uint8_t kPattern[3] = {0x0f, 0x0b, 0x06};
  for (std::size_t i = 0; i < b.size; ++i) b.rw[i] = kPattern[i % 3];
}

void on_detour_freed(const text::CodeBlock& b) {
  poison(b);
  g_poisoned.fetch_add(1, std::memory_order_relaxed);
  g_bytes.fetch_add(b.size, std::memory_order_relaxed);
  std::lock_guard lock(g_mu);
  const std::size_t slot = g_next++ % kQuarantine;
  if (g_ring[slot].rx) {
    g_start[slot].store(0, std::memory_order_release);
    text::free_code(g_ring[slot]);
    g_given_back.fetch_add(1, std::memory_order_relaxed);
  }
  g_ring[slot] = b;
  g_size[slot].store(b.size, std::memory_order_relaxed);
  g_start[slot].store(reinterpret_cast<std::uintptr_t>(b.rx), std::memory_order_release);
}

// Async-signal-safe formatting: append text and hex numbers to a fixed buffer.
struct Line {
  char buf[256];
  std::size_t n = 0;
  void text(const char* s) {
    while (*s && n < sizeof buf) buf[n++] = *s++;
  }
  void hex(std::uintptr_t v) {
    text("0x");
    char digits[16];
    int k = 0;
    do {
      digits[k++] = "0123456789abcdef"[v & 15];
      v >>= 4;
    } while (v && k < 16);
    while (k && n < sizeof buf) buf[n++] = digits[--k];
  }
  void number(unsigned v) {
    char digits[10];
    int k = 0;
    do {
      digits[k++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v && k < 10);
    while (k && n < sizeof buf) buf[n++] = digits[--k];
  }
};

void on_fault(int sig, siginfo_t* si, void* ctx) {
  const auto pc = static_cast<std::uintptr_t>(static_cast<ucontext_t*>(ctx)->uc_mcontext.gregs[REG_RIP]);
  std::uintptr_t block = 0;
  for (std::size_t k = 0; k < kQuarantine && !block; ++k) {
    const std::uintptr_t s = g_start[k].load(std::memory_order_acquire);
    if (s && pc >= s && pc < s + g_size[k].load(std::memory_order_relaxed)) block = s;
  }
  Line l;
  l.text("hooks: FAIL, signal ");
  l.number(static_cast<unsigned>(sig));
  l.text(" at pc ");
  l.hex(pc);
  l.text(" (fault address ");
  l.hex(reinterpret_cast<std::uintptr_t>(si->si_addr));
  if (block) {
    l.text("): poison executed, in the detour copy at ");
    l.hex(block);
    l.text(" freed after its tasks grace period\n");
  } else {
    l.text("): a crash outside the poisoned copies\n");
  }
  if (::write(2, l.buf, l.n) < 0) {
  }
  std::_Exit(3);
}

}  // namespace

bool install_detour_poison(std::string* error) {
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGILL, SIGSEGV, SIGBUS}) {
    if (sigaction(sig, &sa, nullptr) != 0) {
      *error = "sigaction(" + std::to_string(sig) + ") failed";
      return false;
    }
  }
  sites::hooks::testing::set_detour_freed_hook(on_detour_freed);
  return true;
}

PoisonTotals detour_poison_totals() {
  return {g_poisoned.load(), g_given_back.load(), g_bytes.load()};
}

}  // namespace tramway::torture
