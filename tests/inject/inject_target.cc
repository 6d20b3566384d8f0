// A program started without tramway, for the injector's tests (issue 13): 8 threads, two busy
// in work::step (a plain -O2 function: hooked through its relocated prologue), five blocked in
// read on a pipe, futex, nanosleep, epoll_wait and accept, and main reading commands on stdin.
// A SIGALRM handler is installed before any injection (an interval timer keeps it firing on the
// busy threads); `usr1` installs a SIGUSR1 handler later, after an injection.
//
// Commands (one per line; each answered by one line on stdout):
//   ping         -> pong
//   usr1         -> usr1 installed
//   counts       -> alarms N usr1 M sleep_eintr K   (handlers run; nanosleep interruptions)
//   mem          -> heap in use BYTES   (malloc's count: what tramway may leave behind)
//   end          -> wakes every blocked thread, joins them, prints the results and exits 0
// Options, for the injector's refusals: --seccomp (an allow-everything seccomp filter),
// --nodump (prctl PR_SET_DUMPABLE 0).
// The results are what an untraced run prints too: the busy threads' checksum over a fixed
// range, and for each blocked call what it returned. A blocked call that returns early, with
// EINTR or anything else, is printed as such (and the test's comparison fails).
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace work {
// Not inlined, not patchable: the tracer reaches it through a relocated prologue.
__attribute__((noinline)) std::uint64_t step(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 29;
  return x;
}
std::atomic<std::uint64_t> g_rounds{0};
// Counts its calls: a side effect, so that no compiler calls it once for a whole busy loop
// (Clang did: a call it proves pure and whose result only the last iteration uses).
__attribute__((noinline)) std::uint64_t checksum(std::uint64_t n) {
  g_rounds.fetch_add(1, std::memory_order_relaxed);
  std::uint64_t sum = 0;
  for (std::uint64_t i = 0; i < n; ++i) sum += step(i);
  return sum;
}
}  // namespace work

namespace {

std::atomic<bool> g_end{false};
std::atomic<long> g_alarms{0}, g_usr1{0};
std::atomic<std::uint32_t> g_futex{0};
int g_pipe[2], g_epoll_pipe[2], g_epfd;
std::string g_socket_path;

void on_alarm(int) { g_alarms.fetch_add(1, std::memory_order_relaxed); }
void on_usr1(int) { g_usr1.fetch_add(1, std::memory_order_relaxed); }

// The blocked threads keep SIGALRM and SIGUSR1 blocked: a handler would interrupt their calls
// for real (epoll_wait and nanosleep never restart after one), and the test is about stops only.
// Each thread also allocates once, as a real program's threads do: malloc gives a thread its
// cache on its first call, and the injector's dlopen on a thread that never allocated would
// add one (what the C library keeps, not tramway; the test's heap check would see it).
void block_program_signals() {
  void* volatile first = std::malloc(16);
  std::free(first);
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGALRM);
  sigaddset(&s, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &s, nullptr);
}

std::string describe(long r, int e) { return r < 0 ? std::string("error ") + strerrorname_np(e) : std::to_string(r); }

struct Results {
  std::string read_r, futex_r, sleep_r, epoll_r, accept_r;
  std::uint64_t busy[2] = {0, 0};
};
Results g_results;

// At least one round: under load a busy thread may not have run at all before `end` comes,
// and its result must not depend on that.
void busy(int i) {
  void* volatile first = std::malloc(16);  // see block_program_signals
  std::free(first);
  std::uint64_t last;
  do {
    last = work::checksum(1000);
  } while (!g_end.load(std::memory_order_relaxed));
  g_results.busy[i] = last;
}

void reader() {
  block_program_signals();
  char c = 0;
  const ssize_t r = read(g_pipe[0], &c, 1);
  g_results.read_r = describe(r, errno) + (r == 1 ? std::string(" byte ") + c : "");
}

void futex_waiter() {
  block_program_signals();
  std::string out;
  // Returns 0 only when woken, which `end` does after setting the word; EAGAIN if set before.
  while (g_futex.load() == 0) {
    const long r = syscall(SYS_futex, &g_futex, FUTEX_WAIT_PRIVATE, 0, nullptr, nullptr, 0);
    if (r != 0 && errno != EAGAIN) {
      out += describe(r, errno) + " ";
      break;
    }
  }
  g_results.futex_r = out + "woken";
}

std::atomic<long> g_sleep_eintr{0};

void sleeper() {
  block_program_signals();
  // Sleeps in 100 ms slices until the end; each slice must last its full length. An EINTR is
  // counted (`counts` shows it, and the test wants 0) and the rest of the slice slept. A handled
  // signal that lands as the thread enters nanosleep makes the kernel return EINTR whatever
  // SA_RESTART says; tramway's fix-up signal can be one (a thread seen running is signalled),
  // and its handler must take that EINTR back (text/eintr_undo.h). This thread blocks the
  // program's own signals, so any EINTR here is tramway's.
  std::string out = "slept";
  while (!g_end.load()) {
    timespec before, after, req{0, 100'000'000}, rem{};
    clock_gettime(CLOCK_MONOTONIC, &before);
    int r;
    while ((r = nanosleep(&req, &rem)) != 0 && errno == EINTR) {
      g_sleep_eintr.fetch_add(1);
      req = rem;
    }
    clock_gettime(CLOCK_MONOTONIC, &after);
    const long ns = (after.tv_sec - before.tv_sec) * 1'000'000'000L + (after.tv_nsec - before.tv_nsec);
    if (r != 0) {
      out = "nanosleep " + describe(r, errno);
      break;
    }
    if (ns < 100'000'000) {
      out = "nanosleep returned early";
      break;
    }
  }
  g_results.sleep_r = out;
}

void epoller() {
  block_program_signals();
  epoll_event ev{};
  const int r = epoll_wait(g_epfd, &ev, 1, -1);
  g_results.epoll_r = describe(r, errno);
}

void acceptor(int listener) {
  block_program_signals();
  const int r = accept(listener, nullptr, nullptr);
  g_results.accept_r = r >= 0 ? "connection" : describe(r, errno);
  if (r >= 0) close(r);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--seccomp") == 0) {
      sock_filter allow = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
      sock_fprog prog{1, &allow};
      if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) return 3;
    } else if (std::strcmp(argv[i], "--nodump") == 0) {
      if (prctl(PR_SET_DUMPABLE, 0) != 0) return 3;
    } else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  // Before any injection: the program's own SIGALRM handler and a timer to fire it.
  struct sigaction sa {};
  sa.sa_handler = on_alarm;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGALRM, &sa, nullptr);
  itimerval it{{0, 10'000}, {0, 10'000}};
  setitimer(ITIMER_REAL, &it, nullptr);

  if (pipe(g_pipe) != 0 || pipe(g_epoll_pipe) != 0) return 2;
  g_epfd = epoll_create1(0);
  epoll_event ev{};
  ev.events = EPOLLIN;
  epoll_ctl(g_epfd, EPOLL_CTL_ADD, g_epoll_pipe[0], &ev);
  const int listener = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  g_socket_path = "/tmp/tramway-inject-target-" + std::to_string(getpid()) + ".sock";
  std::strncpy(addr.sun_path, g_socket_path.c_str(), sizeof addr.sun_path - 1);
  unlink(g_socket_path.c_str());
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(listener, 1) != 0) return 2;

  std::vector<std::thread> threads;
  threads.emplace_back(busy, 0);
  threads.emplace_back(busy, 1);
  threads.emplace_back(reader);
  threads.emplace_back(futex_waiter);
  threads.emplace_back(sleeper);
  threads.emplace_back(epoller);
  threads.emplace_back(acceptor, listener);
  std::printf("ready\n");
  std::fflush(stdout);

  block_program_signals();  // main reads stdin: a handler would not disturb it, but keep it simple
  for (std::string line; std::getline(std::cin, line);) {
    if (line == "ping") {
      std::printf("pong\n");
    } else if (line == "usr1") {
      struct sigaction u {};
      u.sa_handler = on_usr1;
      u.sa_flags = SA_RESTART;
      sigemptyset(&u.sa_mask);
      sigaction(SIGUSR1, &u, nullptr);
      std::printf("usr1 installed\n");
    } else if (line == "counts") {
      std::printf("alarms %ld usr1 %ld sleep_eintr %ld\n", g_alarms.load(), g_usr1.load(), g_sleep_eintr.load());
    } else if (line == "mem") {
      const struct mallinfo2 mi = mallinfo2();
      std::printf("heap in use %zu\n", mi.uordblks);
    } else if (line == "end") {
      break;
    } else {
      std::printf("unknown command\n");
    }
    std::fflush(stdout);
  }
  g_end.store(true);
  (void)!write(g_pipe[1], "x", 1);
  g_futex.store(1);
  syscall(SYS_futex, &g_futex, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  (void)!write(g_epoll_pipe[1], "x", 1);
  const int c = socket(AF_UNIX, SOCK_STREAM, 0);
  (void)!connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  for (std::thread& t : threads) t.join();
  close(c);
  unlink(g_socket_path.c_str());
  std::printf("checksum %llu %llu\n", static_cast<unsigned long long>(work::checksum(1000)),
              static_cast<unsigned long long>(g_results.busy[0] == g_results.busy[1] ? work::checksum(1000) : 0));
  std::printf("read %s\nfutex %s\nsleep %s\nepoll %s\naccept %s\n", g_results.read_r.c_str(), g_results.futex_r.c_str(),
              g_results.sleep_r.c_str(), g_results.epoll_r.c_str(), g_results.accept_r.c_str());
  std::printf("alarm handler %s\n", g_alarms.load() > 0 ? "ran" : "never ran");
  return 0;
}
