// The tasks-flavor half of suite "grace".
//
// Readers reach generated functions through a permanent stub, `jmp *(%rdi)`: loading the
// published pointer and entering the code is one instruction, as for a patched call site, so
// no marker is ever raised. A function spins for a random count (readers are preempted and
// signalled inside it; the SIGPROF handler calls published functions again, and sometimes
// raises SIGUSR2 whose handler does too: nested frames over generated code), then returns
// the pipe word stored in its own block:
//   0 published, 1 retired, 2 a tasks grace period has completed since (then it is poisoned)
// A reader that returns 2 outlived a grace period: a bug. So is executing poison: every
// retired block is filled with ud2 after the grace period and stays quarantined (poisoned)
// for a while before its memory is reused; a SIGILL there ends the run loudly.
#include "tasks_readers.h"

#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "storm.h"
#include "tramway/grace.h"
#include "tramway/text/code_memory.h"

namespace tramway::torture {
namespace {

constexpr int kSlots = 4;
constexpr std::size_t kBlockSize = 64, kCodeSize = 17, kPipeOffset = 32;
constexpr std::size_t kQuarantine = 64;  // poisoned blocks kept before their memory is reused

// entry: mov %rsi,%rcx ; loop: pause ; dec %rcx ; jnz loop ; mov pipe(%rip),%eax ; ret
constexpr std::uint8_t kFunction[kCodeSize] = {0x48, 0x89, 0xf1, 0xf3, 0x90, 0x48, 0xff, 0xc9, 0x75, 0xf9,
                                               0x8b, 0x05, 0x10, 0x00, 0x00, 0x00, 0xc3};
static_assert(kPipeOffset == 16 + 0x10, "the rip-relative load reads the pipe word");

using Stub = std::uint32_t (*)(const std::atomic<std::uint8_t*>* slot, std::uint64_t spins);

struct alignas(64) ReaderCounters {
  std::array<std::atomic<std::uint64_t>, 4> pipe{};
  std::atomic<std::uint64_t> passes{0};
};

}  // namespace

struct TasksTorture::State {
  text::CodeBlock stub_block;
  Stub stub = nullptr;
  std::array<std::atomic<std::uint8_t*>, kSlots> slots{};  // RX addresses of published functions
  std::vector<ReaderCounters> counters;
  std::vector<std::thread> threads;
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> retired{0}, poisoned{0}, errors{0};
  std::mutex mu;  // guards blocks, quarantine, first_error
  std::vector<text::CodeBlock> blocks;  // every live block, by RX address lookup
  std::deque<text::CodeBlock> quarantine;
  std::string first_error;

  void error(const std::string& e) {
    std::lock_guard lock(mu);
    if (errors.fetch_add(1) == 0) first_error = e;
  }
  text::CodeBlock* block_of(const std::uint8_t* rx) {
    for (auto& b : blocks) if (b.rx == rx) return &b;
    return nullptr;
  }
};

namespace {

TasksTorture::State* g_state = nullptr;
thread_local ReaderCounters* t_counters = nullptr;
thread_local std::minstd_rand* t_rng = nullptr;

void set_pipe(const text::CodeBlock& b, std::uint32_t v) {
  __atomic_store_n(reinterpret_cast<std::uint32_t*>(b.rw + kPipeOffset), v, __ATOMIC_RELEASE);
}

void read_once(TasksTorture::State& s, ReaderCounters& c, std::uint64_t spins) {
  const auto slot = (t_rng ? (*t_rng)() : spins) % kSlots;
  const std::uint32_t pipe = s.stub(&s.slots[slot], spins ? spins : 1);
  c.pipe[pipe < 4 ? pipe : 3].fetch_add(1, std::memory_order_relaxed);
  c.passes.fetch_add(1, std::memory_order_relaxed);
}

void on_sigusr2(int) {
  if (g_state && t_counters) read_once(*g_state, *t_counters, 50);
}

// SIGILL/SIGSEGV: a reader ran poisoned or reused code. Async-signal-safe report, then exit.
void on_poison(int sig, siginfo_t* si, void*) {
  char msg[160];
  const int n = std::snprintf(msg, sizeof msg, "grace: FAIL, signal %d at %p: retired code executed after its tasks grace period (or a crash)\n",
                              sig, si->si_addr);
  if (n > 0 && ::write(2, msg, static_cast<std::size_t>(n)) < 0) {}
  std::_Exit(3);
}

Result<text::CodeBlock> make_function() {
  auto b = text::allocate_code(kBlockSize);
  if (!b.ok()) return b.status();
  std::memcpy(b->rw, kFunction, kCodeSize);
  set_pipe(*b, 0);
  return *b;
}

void poison(const text::CodeBlock& b) {
  for (std::size_t i = 0; i + 1 < kPipeOffset; i += 2) {
    b.rw[i] = 0x0f;  // ud2
    b.rw[i + 1] = 0x0b;
  }
}

// Runs once a tasks grace period has passed since `b` was retired.
void after_grace_period(TasksTorture::State& s, text::CodeBlock b) {
  set_pipe(b, 2);  // a reader still inside would return 2
  for (int i = 0; i < 200; ++i) __builtin_ia32_pause();
  poison(b);
  s.poisoned.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard lock(s.mu);
  s.quarantine.push_back(b);
  if (s.quarantine.size() > kQuarantine) {
    text::free_code(s.quarantine.front());
    s.quarantine.pop_front();
  }
}

void writer(TasksTorture::State& s, std::uint64_t seed) {
  std::minstd_rand rng(static_cast<unsigned>(seed) * 7 + 3);
  for (std::uint64_t n = 0; !s.stop.load(std::memory_order_relaxed); ++n) {
    auto fresh = make_function();
    if (!fresh.ok()) {
      s.error("allocating generated code failed: " + fresh.status().message());
      return;
    }
    text::CodeBlock old_block;
    {
      std::lock_guard lock(s.mu);
      s.blocks.push_back(*fresh);
      std::uint8_t* old_rx = s.slots[rng() % kSlots].exchange(fresh->rx, std::memory_order_acq_rel);
      text::CodeBlock* old = s.block_of(old_rx);
      old_block = *old;
      *old = s.blocks.back();
      s.blocks.pop_back();
    }
    set_pipe(old_block, 1);
    if (Status st = grace::retire(old_block.rx, old_block.rx + kPipeOffset); !st.ok()) {
      s.error("retire failed: " + st.message());
      return;
    }
    s.retired.fetch_add(1, std::memory_order_relaxed);
    if (n % 2 == 0) {
      if (Status st = grace::synchronize(grace::Flavor::tasks); !st.ok()) {
        s.error("synchronize(tasks) failed: " + st.message());
        return;
      }
      after_grace_period(s, old_block);
    } else if (Status st = grace::call(grace::Flavor::tasks, [&s, old_block] { after_grace_period(s, old_block); });
               !st.ok()) {
      s.error("call(tasks) failed: " + st.message());
      return;
    }
  }
}

}  // namespace

TasksTorture::TasksTorture() : s_(new State) {}
TasksTorture::~TasksTorture() { delete s_; }

void TasksTorture::from_signal_handler() {
  if (!g_state || !t_counters) return;
  read_once(*g_state, *t_counters, 30);
  if (t_rng && (*t_rng)() % 8 == 0) ::syscall(SYS_tgkill, ::getpid(), ::syscall(SYS_gettid), SIGUSR2);
}

bool TasksTorture::start(const Options& o, int readers, std::string* error) {
  State& s = *s_;
  auto stub = text::allocate_code(16);
  if (!stub.ok()) {
    *error = stub.status().message();
    return false;
  }
  s.stub_block = *stub;
  s.stub_block.rw[0] = 0xff;  // jmp *(%rdi)
  s.stub_block.rw[1] = 0x27;
  s.stub = reinterpret_cast<Stub>(s.stub_block.rx);
  for (auto& slot : s.slots) {
    auto f = make_function();
    if (!f.ok()) {
      *error = f.status().message();
      return false;
    }
    s.blocks.push_back(*f);
    slot.store(f->rx);
  }
  struct sigaction sa {};
  sa.sa_sigaction = on_poison;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGILL, &sa, nullptr);
  sigaction(SIGSEGV, &sa, nullptr);
  struct sigaction usr {};
  usr.sa_handler = on_sigusr2;
  sigaction(SIGUSR2, &usr, nullptr);
  g_state = &s;

  s.counters = std::vector<ReaderCounters>(static_cast<std::size_t>(readers));
  for (int i = 0; i < readers; ++i) {
    s.threads.emplace_back([&s, &o, i] {
      ReaderCounters& c = s.counters[static_cast<std::size_t>(i)];
      std::minstd_rand rng(static_cast<unsigned>(o.seed) * 13 + static_cast<unsigned>(i));
      t_rng = &rng;
      t_counters = &c;
      StormTimer timer(o.signal_interval_us);
      while (!s.stop.load(std::memory_order_relaxed)) read_once(s, c, 1 + rng() % 20000);
      t_counters = nullptr;
    });
  }
  s.threads.emplace_back(writer, std::ref(s), o.seed);
  return true;
}

TasksTotals TasksTorture::stop() {
  State& s = *s_;
  s.stop = true;
  for (auto& t : s.threads) t.join();
  s.threads.clear();
  if (!grace::barrier().ok()) s.error("barrier failed");
  TasksTotals t;
  for (const ReaderCounters& c : s.counters) {
    for (std::size_t k = 0; k < 4; ++k) t.pipe[k] += c.pipe[k].load();
    t.passes += c.passes.load();
  }
  t.retired = s.retired.load();
  t.poisoned = s.poisoned.load();
  t.errors = s.errors.load();
  t.first_error = s.first_error;
  return t;
}

}  // namespace tramway::torture
