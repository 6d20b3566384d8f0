// Per-thread trace state: claimed on a thread's first traced call, released at its exit.
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <new>

#include "common/eject.h"
#include "trace/internal.h"

namespace tramway::trace::detail {

bool g_use_tsc = true;
thread_local constinit ThreadState* t_state __attribute__((tls_model("initial-exec"))) = nullptr;
std::atomic<std::uint32_t> g_epoch{0};
std::atomic<std::uint32_t> g_depth_limit{kShadowDepth};

ThreadState* claim_keeping_vectors() noexcept {
  // Saved by hand: the compiler does not know that the caller expects them kept (they are
  // call-clobbered), and emits nothing of its own that touches them before the save or after
  // the restore in a function this small.
  alignas(16) unsigned char saved[8 * 16];
  asm volatile(
      "movaps %%xmm0, 0(%0)\n\tmovaps %%xmm1, 16(%0)\n\tmovaps %%xmm2, 32(%0)\n\tmovaps %%xmm3, 48(%0)\n\t"
      "movaps %%xmm4, 64(%0)\n\tmovaps %%xmm5, 80(%0)\n\tmovaps %%xmm6, 96(%0)\n\tmovaps %%xmm7, 112(%0)"
      :
      : "r"(saved)
      : "memory");
  ThreadState* t = claim();
  asm volatile(
      "movaps 0(%0), %%xmm0\n\tmovaps 16(%0), %%xmm1\n\tmovaps 32(%0), %%xmm2\n\tmovaps 48(%0), %%xmm3\n\t"
      "movaps 64(%0), %%xmm4\n\tmovaps 80(%0), %%xmm5\n\tmovaps 96(%0), %%xmm6\n\tmovaps 112(%0), %%xmm7"
      :
      : "r"(saved)
      : "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7");
  return t;
}

std::uint64_t monotonic_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::uint64_t(ts.tv_sec) * 1'000'000'000u + std::uint64_t(ts.tv_nsec);
}

namespace {

std::atomic<ThreadState*> g_states{nullptr};
std::atomic<std::size_t> g_ring_events{1u << 16};

pthread_key_t g_exit_key;
pthread_once_t g_exit_key_once = PTHREAD_ONCE_INIT;

// Thread exit: close the frames left (pthread_exit and cancellation skip them), then drain
// the state and free it for reuse.
void on_thread_exit(void* arg) {
  auto* t = static_cast<ThreadState*>(arg);
  close_all_frames(t);
  t_state = nullptr;
  retire(t);
}

bool g_exit_key_made = false;
void make_exit_key() { g_exit_key_made = pthread_key_create(&g_exit_key, on_thread_exit) == 0; }

// A state and its ring of `events` events are one mapping.
std::size_t state_bytes(std::size_t events) { return sizeof(ThreadState) + events * sizeof(format::Event); }

// Unloaded after an eject (common/eject.h): no thread is inside a traced call any more and no
// hook runs, so the states are unread; a thread that exits later must not run on_thread_exit.
__attribute__((destructor)) void unmap_states_at_unload() {
  if (!common::ejecting()) return;
  if (g_exit_key_made) pthread_key_delete(g_exit_key);
  for (ThreadState* t = g_states.exchange(nullptr); t;) {
    ThreadState* next = t->next;
    ::munmap(t, state_bytes(t->mask + 1));
    t = next;
  }
}

ThreadState* make_state() noexcept {
  std::size_t events = g_ring_events.load(std::memory_order_relaxed);
  const std::size_t bytes = state_bytes(events);
  void* mem = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) return nullptr;
  auto* t = new (mem) ThreadState;
  t->ring = reinterpret_cast<format::Event*>(static_cast<char*>(mem) + sizeof(ThreadState));
  t->mask = events - 1;
  t->life.store(Life::live, std::memory_order_relaxed);
  ThreadState* head = g_states.load(std::memory_order_relaxed);
  do {
    t->next = head;
  } while (!g_states.compare_exchange_weak(head, t, std::memory_order_release, std::memory_order_relaxed));
  return t;
}

ThreadState* claim_blocked() noexcept {
  ThreadState* t = nullptr;
  const std::size_t events = g_ring_events.load(std::memory_order_relaxed);
  for (ThreadState* s = g_states.load(std::memory_order_acquire); s && !t; s = s->next) {
    if (s->mask + 1 != events) continue;  // made for another recording's ring size
    Life expected = Life::free;
    if (s->life.compare_exchange_strong(expected, Life::live, std::memory_order_acquire)) t = s;
  }
  if (!t) t = make_state();
  if (!t) return nullptr;
  t->tid = static_cast<std::uint32_t>(::syscall(SYS_gettid));
  t->named = false;
  t->depth = 0;
  t->overflow = 0;
  // The key's destructor runs at thread exit. pthread_once and pthread_setspecific are not on
  // the async-signal-safe list; for a key below PTHREAD_KEY_2NDLEVEL_SIZE glibc's setspecific
  // is a store into the thread descriptor, and the once runs when recording starts.
  pthread_once(&g_exit_key_once, make_exit_key);
  (void)pthread_setspecific(g_exit_key, t);
  t_state = t;
  return t;
}

}  // namespace

// With signals blocked, so a handler running traced code cannot claim a second state for
// this thread half-way through.
ThreadState* claim() noexcept {
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  ThreadState* t = claim_blocked();
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return t;
}

ThreadState* all_states() noexcept { return g_states.load(std::memory_order_acquire); }

void set_ring_events(std::size_t events) noexcept {
  pthread_once(&g_exit_key_once, make_exit_key);
  g_ring_events.store(events, std::memory_order_relaxed);
}

std::vector<std::pair<pid_t, std::uintptr_t>> threads_in_traced_calls() {
  std::vector<std::pair<pid_t, std::uintptr_t>> out;
  for (ThreadState* t = g_states.load(std::memory_order_acquire); t; t = t->next) {
    if (t->life.load(std::memory_order_acquire) != Life::live) continue;
    // The owner's field: a racy read, but once every hook is detached a depth only falls.
    const std::uint32_t depth = std::atomic_ref<std::uint32_t>(t->depth).load(std::memory_order_relaxed);
    if (depth == 0 || depth > kShadowDepth) continue;
    const pid_t tid = static_cast<pid_t>(t->tid);
    if (::syscall(SYS_tgkill, ::getpid(), tid, 0) != 0) continue;  // gone without its exit handler
    out.emplace_back(tid, t->stack[0].function);
  }
  return out;
}

}  // namespace tramway::trace::detail
