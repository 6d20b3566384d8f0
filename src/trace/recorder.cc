// The recorder: one trace file per process, a flusher thread draining every thread's ring,
// and the hooks that make traced calls record (exit_hooks.cc).
//
// Each traced function is covered by exactly one of the recorder's ops (two ops on a site
// would run the entry callback twice and hijack the frame twice): attach(glob) hooks the
// matching functions not traced yet with a new ops; detach(glob) detaches the ops that cover
// its functions and re-attaches the ones other globs still want.
#include <fcntl.h>
#include <fnmatch.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/eject.h"
#include "common/fork_hooks.h"
#include "common/own_stack.h"
#include "tramway/grace.h"
#include "common/loader_gate.h"
#include "tramway/hooks.h"
#include "tramway/trace.h"
#include "trace/internal.h"
#include "trace/thread_call_filter.h"

namespace tramway::trace {
namespace {

using detail::ThreadState;
namespace fmt = format;

bool tsc_is_invariant() {
  if (const char* c = std::getenv("TRAMWAY_CLOCK"); c && std::strcmp(c, "monotonic") == 0) return false;
  FILE* f = std::fopen("/proc/cpuinfo", "r");
  if (!f) return false;
  char line[4096];
  bool constant = false, nonstop = false;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "flags", 5) != 0) continue;
    constant = std::strstr(line, " constant_tsc") != nullptr;
    nonstop = std::strstr(line, " nonstop_tsc") != nullptr;
    break;
  }
  std::fclose(f);
  return constant && nonstop;
}

struct Owner {
  std::unique_ptr<hooks::Ops> ops;
  std::set<std::uintptr_t> functions;
};

class Recording {
 public:
  // Control calls; the file. Lock rank trace_recording (common/lock_order.h): held across
  // hooks::attach and hooks::detach (a grace period), so it comes before every lock of
  // libtramway, and fork() takes it first.
  std::mutex mutex;
  bool active = false;
  int fd = -1;
  std::string output;
  Status write_error;
  std::uint64_t start_tsc = 0, start_mono = 0;
  unsigned __int128 ns_per_tick_q32 = 0;  // ns per TSC tick, 32.32 fixed point
  std::map<std::string, std::set<std::uintptr_t>> globs;
  std::vector<Owner> owners;
  std::set<std::uintptr_t> named;  // functions in the file's function table
  std::uint64_t events = 0, lost = 0;
  std::size_t threads = 0;
  unsigned flush_interval_ms = 50;
  bool allow_trap = false;  // RecordOptions::allow_trap
  std::vector<std::string> exclude;  // RecordOptions::exclude
  std::uint64_t min_duration_ns = 0;  // RecordOptions::min_duration_ns: events pass a filter a thread
  std::unordered_map<std::uint32_t, detail::ThreadCallFilter> filters;  // by tid (the flusher's)
  std::vector<fmt::Event> kept;  // the flusher's scratch
  std::uint64_t calls_dropped = 0;
  common::OwnStackThread flusher;  // its own stack: eject leaves none of glibc's cached
  std::condition_variable wake;
  bool stopping = false;
  std::vector<char> buffer;  // the flusher's: one events chunk

  std::uint64_t to_ns(std::uint64_t t) const {
    if (!detail::g_use_tsc) return t > start_mono ? t - start_mono : 0;
    if (t <= start_tsc) return 0;
    return static_cast<std::uint64_t>((static_cast<unsigned __int128>(t - start_tsc) * ns_per_tick_q32) >> 32);
  }

  void write_bytes(const void* data, std::size_t size) {
    if (!write_error.ok()) return;
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t n = ::write(fd, p, size);
      if (n < 0) {
        if (errno == EINTR) continue;
        const int e = errno;
        write_error = Status::error("writing the trace file " + output + ": " + std::strerror(e), e);
        return;
      }
      p += n;
      size -= static_cast<std::size_t>(n);
    }
  }
  void write_chunk(fmt::ChunkType type, const std::string& payload) {
    const fmt::ChunkHeader h{type, static_cast<std::uint32_t>(payload.size())};
    std::string buf(reinterpret_cast<const char*>(&h), sizeof h);
    buf += payload;
    write_bytes(buf.data(), buf.size());
  }
  template <class T>
  static void put(std::string& s, const T& v) {
    s.append(reinterpret_cast<const char*>(&v), sizeof v);
  }

  // Drains every ring into the file. Called with `mutex` held.
  void flush_locked() {
    for (ThreadState* t = detail::all_states(); t; t = t->next) {
      const detail::Life life = t->life.load(std::memory_order_acquire);
      if (life != detail::Life::free) flush_state_locked(t, life);
    }
  }

  // Drains one ring into the file; an exited thread's state is then free for reuse. Called
  // with `mutex` held.
  void flush_state_locked(ThreadState* t, detail::Life life) {
    const std::uint64_t head = t->head.load(std::memory_order_acquire);
    std::uint64_t tail = t->tail.load(std::memory_order_relaxed);
    if (head != tail && !t->named) {
      t->named = true;
      ++threads;
      std::string payload, name;
      char path[64];
      std::snprintf(path, sizeof path, "/proc/self/task/%u/comm", t->tid);
      if (FILE* f = std::fopen(path, "r")) {
        char buf[64] = {};
        if (std::fgets(buf, sizeof buf, f)) name = buf;
        std::fclose(f);
        while (!name.empty() && name.back() == '\n') name.pop_back();
      }
      put(payload, t->tid);
      put(payload, static_cast<std::uint32_t>(name.size()));
      payload += name;
      write_chunk(fmt::ChunkType::thread, payload);
    }
    if (min_duration_ns != 0) {
      drain_filtered(t, head, tail, life);
      tail = head;
    }
    while (tail != head) {
      // One chunk: header, tid, count, events converted to ns straight into the buffer.
      const std::uint64_t n = std::min<std::uint64_t>(head - tail, 1u << 16);
      const std::uint32_t count = static_cast<std::uint32_t>(n);
      const fmt::ChunkHeader ch{fmt::ChunkType::events, static_cast<std::uint32_t>(8 + n * sizeof(fmt::Event))};
      buffer.resize(sizeof ch + ch.size);
      char* out = buffer.data();
      std::memcpy(out, &ch, sizeof ch);
      std::memcpy(out + sizeof ch, &t->tid, 4);
      std::memcpy(out + sizeof ch + 4, &count, 4);
      auto* events_out = reinterpret_cast<fmt::Event*>(out + sizeof ch + 8);
      for (std::uint64_t i = 0; i < n; ++i) {
        const fmt::Event& e = t->ring[(tail + i) & t->mask];
        events_out[i] = fmt::Event{to_ns(e.time_ns), e.word};
      }
      tail += n;
      t->tail.store(tail, std::memory_order_release);
      events += n;
      write_bytes(buffer.data(), buffer.size());
    }
    const std::uint64_t lost_now = t->lost.load(std::memory_order_relaxed);
    if (lost_now != t->lost_reported) {
      std::string payload;
      put(payload, t->tid);
      put(payload, std::uint32_t{0});
      put(payload, lost_now - t->lost_reported);
      write_chunk(fmt::ChunkType::lost, payload);
      lost += lost_now - t->lost_reported;
      t->lost_reported = lost_now;
    }
    if (life == detail::Life::exited) release(t);
  }

  // record -t: the ring's events through the thread's filter, the calls kept written.
  void drain_filtered(ThreadState* t, std::uint64_t head, std::uint64_t tail, detail::Life life) {
    detail::ThreadCallFilter& f =
        filters.try_emplace(t->tid, detail::CallWindow{0, ~std::uint64_t{0}, min_duration_ns}).first->second;
    kept.clear();
    for (; tail != head; ++tail) {
      const fmt::Event& e = t->ring[tail & t->mask];
      f.add(fmt::Event{to_ns(e.time_ns), e.word}, kept);
    }
    t->tail.store(tail, std::memory_order_release);
    if (life == detail::Life::exited) {  // its frames were closed at its exit; the tid may come back
      f.finish(kept);
      calls_dropped += f.dropped();
      filters.erase(t->tid);
    }
    write_events(t->tid, kept);
  }
  // At the end of the recording: the calls still open that are kept.
  void finish_filters() {
    for (auto& [tid, f] : filters) {
      kept.clear();
      f.finish(kept);
      calls_dropped += f.dropped();
      write_events(tid, kept);
    }
    filters.clear();
  }
  void write_events(std::uint32_t tid, const std::vector<fmt::Event>& all) {
    for (std::size_t at = 0; at < all.size();) {
      const std::size_t n = std::min<std::size_t>(all.size() - at, 1u << 16);
      const std::uint32_t count = static_cast<std::uint32_t>(n);
      const fmt::ChunkHeader ch{fmt::ChunkType::events, static_cast<std::uint32_t>(8 + n * sizeof(fmt::Event))};
      buffer.resize(sizeof ch + ch.size);
      std::memcpy(buffer.data(), &ch, sizeof ch);
      std::memcpy(buffer.data() + sizeof ch, &tid, 4);
      std::memcpy(buffer.data() + sizeof ch + 4, &count, 4);
      std::memcpy(buffer.data() + sizeof ch + 8, all.data() + at, n * sizeof(fmt::Event));
      events += n;
      write_bytes(buffer.data(), buffer.size());
      at += n;
    }
  }

  // The next thread starts at the ring's first page: continuing from the previous thread's
  // head would touch every page of the ring over the lives of many short threads.
  static void release(ThreadState* t) {
    t->head.store(0, std::memory_order_relaxed);
    t->tail.store(0, std::memory_order_relaxed);
    t->cached_tail = 0;
    t->lost.store(0, std::memory_order_relaxed);
    t->lost_reported = 0;
    t->life.store(detail::Life::free, std::memory_order_release);
  }

  // Adds to the function table every function of `all` not in it yet.
  void name_functions(const std::vector<hooks::Function>& all) {
    std::string payload;
    for (const hooks::Function& f : all) {
      if (!named.insert(f.entry).second) continue;
      put(payload, static_cast<std::uint64_t>(f.entry));
      put(payload, static_cast<std::uint32_t>(f.name.size()));
      payload += f.name;
      if (payload.size() > (1u << 20)) {
        write_chunk(fmt::ChunkType::functions, payload);
        payload.clear();
      }
    }
    if (!payload.empty()) write_chunk(fmt::ChunkType::functions, payload);
  }

  std::set<std::uintptr_t> traced() const {
    std::set<std::uintptr_t> all;
    for (const Owner& o : owners) all.insert(o.functions.begin(), o.functions.end());
    return all;
  }

  Status hook(const std::set<std::uintptr_t>& functions) {
    if (functions.empty()) return {};
    Owner owner{std::make_unique<hooks::Ops>(), functions};
    owner.ops->entry = detail::entry_callback;
    owner.ops->promise_vector_free = detail::entry_callback_vector_free();
    owner.ops->direct = true;  // one recorder ops a function: each site gets its own slot
    owner.ops->allow_trap = allow_trap;
    if (Status s = hooks::attach(*owner.ops, hooks::Filter::addresses({functions.begin(), functions.end()})); !s.ok()) {
      if (owner.ops->state) (void)owner.ops.release();  // not freed: callbacks may still run (hooks::attach says so)
      return s;
    }
    owners.push_back(std::move(owner));
    return {};
  }

  void flusher_loop() {
    std::unique_lock lock(mutex);
    while (!stopping) {
      wake.wait_for(lock, std::chrono::milliseconds(flush_interval_ms));
      flush_locked();
    }
  }
};

Recording* g_recording = nullptr;
Recording& recording() {
  static auto* r = g_recording = new Recording;  // never destroyed: hijacked frames may return at exit
  return *r;
}

// Unloaded after an eject (common/eject.h): stopped, its buffers can go with the library.
__attribute__((destructor)) void free_recording_at_unload() {
  if (common::ejecting() && g_recording && !g_recording->active) {
    delete g_recording;
    g_recording = nullptr;
  }
}

// fork(): the child gets a copy of the rings but no flusher, and shares the file, so it does
// not write to the parent's recording (its hijacked frames still return through the stub).
// The recorder's ops stay attached in the child (its sites name them) until the child starts a
// recording of its own, which detaches them first.
void lock_for_fork() { recording().mutex.lock(); }
void unlock_after_fork() { recording().mutex.unlock(); }
void forget_in_child() {
  Recording& r = recording();
  if (r.active) {
    ::close(r.fd);
    r.fd = -1;
    r.active = false;
    r.globs.clear();
    r.flusher.forget_after_fork();  // the parent's flusher does not exist here
    new (&r.wake) std::condition_variable();  // nor does its wait on this
  }
  r.mutex.unlock();
}
constexpr common::ForkHook kForkHook{common::LockRank::trace_recording, lock_for_fork, unlock_after_fork,
                                     forget_in_child};
// At load, not at the first start(): see common/fork_hooks.h.
__attribute__((constructor)) void register_fork_hook() { common::register_fork_hook(kForkHook); }
__attribute__((destructor)) void unregister_fork_hook() { common::unregister_fork_hook(kForkHook); }

}  // namespace

// The thread's last events go to the file now, not at the flusher's next round, and its state
// is free for the next new thread at once: left to the flusher, a program that makes threads
// faster than one per flush interval would have a state mapped for each thread made meanwhile.
// Until the state is free, it stays live for the flusher: marked exited, the flusher could
// free it, and a new thread claim it, before this thread has the mutex.
// A thread that ends inside a hook callback (pthread_exit) exits inside a read-side region,
// and the mutex's holder may be a detach or stop() waiting for a grace period, that is, for
// this thread: such a thread does not wait for the mutex, and leaves its state to the flusher.
void detail::retire(ThreadState* t) noexcept {
  Recording& r = recording();
  std::unique_lock lock(r.mutex, std::defer_lock);
  if (!grace::in_read_section()) {
    lock.lock();
  } else if (!lock.try_lock()) {
    t->life.store(Life::exited, std::memory_order_release);  // not touched here again
    r.wake.notify_one();
    return;
  }
  if (r.active) {
    r.flush_state_locked(t, Life::exited);
  } else {
    Recording::release(t);  // the next start() discards what the ring holds
  }
}

Status start(const RecordOptions& options) {
  common::LoaderUse loader_use;  // before the recorder's lock: hooks pin objects (common/loader_gate.h)
  Recording& r = recording();
  std::lock_guard lock(r.mutex);
  if (r.active) return Status::error("trace::start: already recording to " + r.output + " (stop it first)");
  if (options.output.empty()) return Status::error("trace::start: no output file given");
  if (options.ring_events < 64 || (options.ring_events & (options.ring_events - 1)) != 0) {
    return Status::error("trace::start: ring_events must be a power of two of at least 64");
  }
  // A fork()ed child's inherited ops (forget_in_child): one ops a function, so they go first.
  for (auto it = r.owners.begin(); it != r.owners.end();) {
    if (Status s = hooks::detach(*it->ops); !s.ok()) return Status::error("trace::start: " + s.message(), s.sys_errno());
    it = r.owners.erase(it);
  }
  const int fd = ::open(options.output.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int e = errno;
    return Status::error("cannot create the trace file " + options.output + ": " + std::strerror(e), e);
  }
  r.fd = fd;
  r.output = options.output;
  r.write_error = {};
  r.events = r.lost = 0;
  r.threads = 0;
  r.named.clear();
  r.flush_interval_ms = options.flush_interval_ms ? options.flush_interval_ms : 50;
  r.allow_trap = options.allow_trap;
  detail::set_ring_events(options.ring_events);
  r.exclude = options.exclude;
  r.min_duration_ns = options.min_duration_ns;
  r.filters.clear();
  r.calls_dropped = 0;
  detail::g_depth_limit.store(options.max_depth == 0 ? static_cast<std::uint32_t>(detail::kShadowDepth)
                                                     : std::min<std::uint32_t>(options.max_depth, detail::kShadowDepth),
                              std::memory_order_relaxed);

  // Calibrate the TSC against CLOCK_MONOTONIC over 20 ms (a few ppm: a few µs a second).
  detail::g_use_tsc = tsc_is_invariant();
  const std::uint64_t tsc0 = __rdtsc(), mono0 = detail::monotonic_ns();
  if (detail::g_use_tsc) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const std::uint64_t tsc1 = __rdtsc(), mono1 = detail::monotonic_ns();
    r.ns_per_tick_q32 = (static_cast<unsigned __int128>(mono1 - mono0) << 32) / (tsc1 - tsc0);
  }
  r.start_tsc = tsc0;
  r.start_mono = mono0;
  detail::g_epoch.fetch_add(1, std::memory_order_relaxed);
  // Rings keep counting across recordings: start each one empty.
  for (ThreadState* t = detail::all_states(); t; t = t->next) {
    t->tail.store(t->head.load(std::memory_order_acquire), std::memory_order_release);
    t->lost_reported = t->lost.load(std::memory_order_relaxed);
    t->named = false;
  }

  fmt::FileHeader h{};
  std::memcpy(h.magic, fmt::kMagic, sizeof h.magic);
  h.version = fmt::kVersion;
  h.header_size = sizeof h;
  timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  h.start_realtime_ns = std::uint64_t(now.tv_sec) * 1'000'000'000u + std::uint64_t(now.tv_nsec);
  h.pid = static_cast<std::uint64_t>(::getpid());
  h.clock = detail::g_use_tsc ? fmt::Clock::tsc : fmt::Clock::monotonic;
  r.write_bytes(&h, sizeof h);
  if (!r.write_error.ok()) {
    ::close(fd);
    return r.write_error;
  }
  r.active = true;
  r.stopping = false;
  // The flusher must not take the program's signals.
  sigset_t all;
  sigfillset(&all);
  if (const int e = r.flusher.start([](void* p) -> void* { static_cast<Recording*>(p)->flusher_loop(); return nullptr; }, &r, &all);
      e != 0) {
    r.active = false;
    ::close(fd);
    r.fd = -1;
    return Status::error(std::string("cannot start the trace flusher thread: ") + std::strerror(e), e);
  }
  return {};
}

Result<std::size_t> attach(const std::string& glob, Scope scope) {
  common::LoaderUse loader_use;  // before the recorder's lock: hooks pin objects (common/loader_gate.h)
  Recording& r = recording();
  std::lock_guard lock(r.mutex);
  if (!r.active || r.stopping) return Status::error("trace::attach: not recording (start a recording first)");
  if (r.globs.count(glob)) return Status::error("'" + glob + "' is traced already");
  // Every kind: patchable entries and relocated prologues are traced alike.
  auto all = hooks::functions(glob);
  if (!all.ok()) return all.status();
  std::set<std::uintptr_t> matched;
  std::vector<hooks::Function> hookable;
  if (scope == Scope::executable) {
    char exe[PATH_MAX];
    const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    const std::string self = n > 0 ? std::string(exe, static_cast<std::size_t>(n)) : std::string();
    std::erase_if(*all, [&](const hooks::Function& f) { return f.object != self; });
  }
  std::size_t excluded = 0;
  for (hooks::Function& f : *all) {
    if (!hooks::can_hook(f.kind, r.allow_trap)) continue;
    if (std::any_of(r.exclude.begin(), r.exclude.end(),
                    [&](const std::string& x) { return ::fnmatch(x.c_str(), f.name.c_str(), 0) == 0; })) {
      ++excluded;
      continue;
    }
    matched.insert(f.entry);
    hookable.push_back(std::move(f));
  }
  if (matched.empty() && excluded > 0) {
    return Status::error("'" + glob + "' matches " + std::to_string(excluded) +
                         " function(s), all of them excluded (RecordOptions::exclude, -x)");
  }
  if (matched.empty()) {
    const auto traps = std::count_if(all->begin(), all->end(), [](const hooks::Function& f) { return f.kind == hooks::HookKind::trap; });
    return Status::error("'" + glob + "' matches no function of this process that can be hooked" +
                         (all->empty() ? std::string(" (`tramway list --all` lists them)")
                                       : " (it matches " + std::to_string(all->size()) +
                                             " that cannot: `tramway list --all` says why)") +
                         (traps && !r.allow_trap ? "; " + std::to_string(traps) +
                                                       " of them a trap probe could hook: record with --trap "
                                                       "(RecordOptions::allow_trap), a signal a call"
                                                 : std::string()));
  }
  r.name_functions(hookable);
  std::set<std::uintptr_t> fresh;
  const std::set<std::uintptr_t> traced = r.traced();
  for (std::uintptr_t f : matched) {
    if (!traced.count(f)) fresh.insert(f);
  }
  if (Status s = r.hook(fresh); !s.ok()) return s;
  r.globs.emplace(glob, std::move(matched));
  return r.globs[glob].size();
}

Status detach(const std::string& glob) {
  common::LoaderUse loader_use;  // before the recorder's lock: hooks pin objects (common/loader_gate.h)
  Recording& r = recording();
  std::lock_guard lock(r.mutex);
  auto it = r.globs.find(glob);
  if (it == r.globs.end()) return Status::error("'" + glob + "' is not traced");
  r.globs.erase(it);
  std::set<std::uintptr_t> wanted;
  for (const auto& [g, functions] : r.globs) wanted.insert(functions.begin(), functions.end());
  std::vector<Owner> kept;
  std::set<std::uintptr_t> orphans;
  Status result;
  for (Owner& o : r.owners) {
    bool all_wanted = true;
    for (std::uintptr_t f : o.functions) all_wanted = all_wanted && wanted.count(f);
    if (all_wanted) {
      kept.push_back(std::move(o));
      continue;
    }
    if (Status s = hooks::detach(*o.ops); !s.ok()) {
      result = s;
      kept.push_back(std::move(o));
      continue;
    }
    for (std::uintptr_t f : o.functions) {
      if (wanted.count(f)) orphans.insert(f);
    }
  }
  r.owners = std::move(kept);
  if (Status s = r.hook(orphans); !s.ok() && result.ok()) result = s;
  return result;
}

Stats stats() {
  Recording& r = recording();
  std::lock_guard lock(r.mutex);
  Stats s;
  s.recording = r.active;
  s.output = r.output;
  for (const auto& [g, functions] : r.globs) s.globs.push_back(g);
  s.functions = r.traced().size();
  s.events = r.events;
  s.lost = r.lost;
  s.threads = r.threads;
  s.calls_filtered = r.calls_dropped;
  return s;
}

Status flush() {
  Recording& r = recording();
  std::lock_guard lock(r.mutex);
  if (!r.active) return Status::error("trace::flush: not recording");
  r.flush_locked();
  return r.write_error;
}

Status stop() {
  common::LoaderUse loader_use;  // before the recorder's lock: hooks pin objects (common/loader_gate.h)
  Recording& r = recording();
  std::unique_lock lock(r.mutex);
  if (!r.active) return Status::error("trace::stop: not recording");
  Status result;
  for (Owner& o : r.owners) {
    if (Status s = hooks::detach(*o.ops); !s.ok()) {
      if (result.ok()) result = s;
      (void)o.ops.release();  // not freed: its state still names it (hooks::detach says so)
    }
  }
  r.owners.clear();
  r.globs.clear();
  r.stopping = true;
  r.wake.notify_all();
  lock.unlock();
  r.flusher.join();
  lock.lock();
  r.flush_locked();
  r.finish_filters();
  std::string end;
  Recording::put(end, r.events);
  Recording::put(end, r.lost);
  r.write_chunk(fmt::ChunkType::end, end);
  if (::close(r.fd) != 0 && r.write_error.ok()) {
    const int e = errno;
    r.write_error = Status::error("closing the trace file " + r.output + ": " + std::strerror(e), e);
  }
  r.fd = -1;
  r.active = false;
  if (!r.write_error.ok()) return r.write_error;
  return result;
}

}  // namespace tramway::trace
