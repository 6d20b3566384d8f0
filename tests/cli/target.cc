// The program the `tramway` command tests drive. Built twice: with -fpatchable-function-entry=13,8
// (tramway_cli_target) and without (tramway_cli_plain). Its output never depends on timing or
// on being traced, so a traced run must print exactly what an untraced one does.
//
//   (no arguments)  calls cli_target::alpha 11 times, beta 23 times, gamma 37 times (each call
//                   of alpha calls leaf once, of beta twice: leaf 57 times), prints the sums.
//   --serve         also runs the same workload on 2 threads in a loop (pausing 1 ms every 100
//                   rounds) until stdin reaches EOF, checking every result, then prints
//                   "serve: mismatches 0" and the sums.
//   --plugin PATH   like --serve, and 2 more threads dlopen and dlclose PATH (plugin.cc) in a
//                   loop, calling its libplug_work while they hold it, until stdin reaches EOF;
//                   prints "plugin: mismatches 0" (its results checked) before the serve line.
//   --exit N        prints the sums and exits with status N.
//   --sigmask       blocks every signal with pthread_sigmask and prints whether SIGTRAP stayed
//                   blocked (libtramway, when it interposes, keeps it open), then the sums.
//   --throw         calls cli_throw::catcher 30 times; every third call's cli_throw::thrower
//                   throws through cli_throw::middle to it; prints the sum, then the sums.
//   --env           prints LD_PRELOAD and the names of TRAMWAY_* variables it was left with
//                   (what its own children would inherit), then the sums.
#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <stdexcept>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

extern char** environ;

// GCC's IPA could clone a function for constant arguments (alpha.constprop.0): keep each one a
// single, real, called function. Clang does not clone and has no noipa.
#if defined(__clang__)
#define TARGET_FN __attribute__((noinline))
#else
#define TARGET_FN __attribute__((noipa))
#endif

namespace cli_target {

TARGET_FN int leaf(int x) {
  asm volatile("" : "+r"(x));  // no constant folding across the call
  return x * 3 + 1;
}

TARGET_FN int alpha(int x) {
  int r = leaf(x);
  asm volatile("" : "+r"(r));  // and no tail call: the call returns here
  return r + 2;
}

TARGET_FN int beta(int x) {
  int r = leaf(x) + leaf(x + 1);
  asm volatile("" : "+r"(r));
  return r;
}

TARGET_FN int gamma(int x) {
  asm volatile("" : "+r"(x));
  return x ^ 0x55;
}

struct Sums {
  long alpha = 0, beta = 0, gamma = 0;
  bool operator==(const Sums&) const = default;
};

TARGET_FN Sums workload() {
  Sums s;
  for (int i = 0; i < 11; ++i) s.alpha += alpha(i);
  for (int i = 0; i < 23; ++i) s.beta += beta(i);
  for (int i = 0; i < 37; ++i) s.gamma += gamma(i);
  return s;
}

}  // namespace cli_target

// Exceptions through traced frames (a namespace of their own: cli_target::* stays 5 functions).
namespace cli_throw {

TARGET_FN int thrower(int x) {
  asm volatile("" : "+r"(x));
  if (x % 3 == 0) throw std::runtime_error("every third");
  return x;
}

TARGET_FN int middle(int x) {
  int r = thrower(x);
  asm volatile("" : "+r"(r));
  return r + 1;
}

TARGET_FN int catcher(int x) {
  try {
    int r = middle(x);
    asm volatile("" : "+r"(r));
    return r;
  } catch (const std::exception&) {
    return -1;
  }
}

}  // namespace cli_throw

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--throw") == 0) {
    long sum = 0;
    for (int i = 0; i < 30; ++i) sum += cli_throw::catcher(i);
    std::printf("throw sum %ld\n", sum);
  }
  const char* plugin = argc > 2 && std::strcmp(argv[1], "--plugin") == 0 ? argv[2] : nullptr;
  const bool serve = plugin || (argc > 1 && std::strcmp(argv[1], "--serve") == 0);
  if (argc > 1 && std::strcmp(argv[1], "--sigmask") == 0) {
    sigset_t all, now;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
    pthread_sigmask(SIG_BLOCK, nullptr, &now);
    std::printf("SIGTRAP blocked: %s\n", sigismember(&now, SIGTRAP) ? "yes" : "no");
  }
  if (argc > 1 && std::strcmp(argv[1], "--env") == 0) {
    const char* preload = std::getenv("LD_PRELOAD");
    std::printf("LD_PRELOAD=%s\n", preload ? preload : "(unset)");
    for (char** e = environ; *e; ++e) {
      if (std::strncmp(*e, "TRAMWAY_", 8) == 0) std::printf("left: %.*s\n", static_cast<int>(std::strcspn(*e, "=")), *e);
    }
  }
  if (serve) {
    const cli_target::Sums expected = cli_target::workload();
    std::atomic<bool> stop{false};
    std::atomic<long> mismatches{0};
    std::thread workers[2];
    for (auto& w : workers) {
      w = std::thread([&] {
        // Busy in traced functions about half the time: the rest leaves a core to the tests'
        // tramway commands on a 2-core machine.
        for (unsigned n = 1; !stop.load(std::memory_order_relaxed); ++n) {
          if (!(cli_target::workload() == expected)) mismatches.fetch_add(1);
          if (n % 100 == 0) usleep(1000);
        }
      });
    }
    std::atomic<long> plugin_mismatches{0};
    std::thread loaders[2];
    for (auto& l : loaders) {
      if (!plugin) break;
      l = std::thread([&] {
        for (unsigned n = 1; !stop.load(std::memory_order_relaxed); ++n) {
          void* h = dlopen(plugin, RTLD_NOW | RTLD_LOCAL);
          auto work = h ? reinterpret_cast<int (*)(int)>(dlsym(h, "libplug_work")) : nullptr;
          if (!work) {
            plugin_mismatches.fetch_add(1);
            if (h) dlclose(h);
            continue;
          }
          for (int i = 0; i < 50; ++i) {
            if (work(i) != i * 5 + 3) plugin_mismatches.fetch_add(1);
          }
          if (dlclose(h) != 0) plugin_mismatches.fetch_add(1);
          if (n % 100 == 0) usleep(1000);
        }
      });
    }
    char buf[256];
    while (read(0, buf, sizeof buf) > 0) {
    }
    stop = true;
    for (auto& w : workers) w.join();
    if (plugin) {
      for (auto& l : loaders) l.join();
      std::printf("plugin: mismatches %ld\n", plugin_mismatches.load());
    }
    std::printf("serve: mismatches %ld\n", mismatches.load());
  }
  const cli_target::Sums s = cli_target::workload();
  std::printf("alpha %ld\nbeta %ld\ngamma %ld\n", s.alpha, s.beta, s.gamma);
  return argc > 2 && std::strcmp(argv[1], "--exit") == 0 ? std::atoi(argv[2]) : 0;
}
