// The fork-hook registry (common/fork_hooks.h).
#include "common/fork_hooks.h"

#include <pthread.h>

#include <cstdio>

namespace tramway::common {
namespace {

constexpr int kMaxHooks = 16;
// Rank fork_hooks, the outermost: fork holds it from prepare to parent/child, so the list a
// fork runs cannot change under it.
pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
constinit ForkHook g_hooks[kMaxHooks] = {};  // sorted by rank; under g_mu
constinit int g_count = 0;
pthread_once_t g_installed = PTHREAD_ONCE_INIT;

void prepare() {
  pthread_mutex_lock(&g_mu);
  for (int i = 0; i < g_count; ++i)
    if (g_hooks[i].prepare) g_hooks[i].prepare();
}
void parent() {
  for (int i = g_count; i-- > 0;)
    if (g_hooks[i].parent) g_hooks[i].parent();
  pthread_mutex_unlock(&g_mu);
}
void child() {
  for (int i = g_count; i-- > 0;)
    if (g_hooks[i].child) g_hooks[i].child();
  pthread_mutex_unlock(&g_mu);
}
void install() { pthread_atfork(prepare, parent, child); }

// Eagerly, when libtramway loads: never from a first use, which may come while another
// thread forks.
__attribute__((constructor)) void install_at_load() { pthread_once(&g_installed, install); }

}  // namespace

void register_fork_hook(const ForkHook& hook) noexcept {
  pthread_once(&g_installed, install);
  pthread_mutex_lock(&g_mu);
  if (g_count == kMaxHooks) {
    pthread_mutex_unlock(&g_mu);
    std::fputs("tramway: internal error: too many fork hooks\n", stderr);
    return;
  }
  int at = g_count;
  while (at > 0 && static_cast<int>(g_hooks[at - 1].rank) > static_cast<int>(hook.rank)) {
    g_hooks[at] = g_hooks[at - 1];
    --at;
  }
  g_hooks[at] = hook;
  ++g_count;
  pthread_mutex_unlock(&g_mu);
}

void unregister_fork_hook(const ForkHook& hook) noexcept {
  pthread_mutex_lock(&g_mu);
  for (int i = 0; i < g_count; ++i) {
    if (g_hooks[i].prepare != hook.prepare || g_hooks[i].child != hook.child) continue;
    for (int j = i + 1; j < g_count; ++j) g_hooks[j - 1] = g_hooks[j];
    --g_count;
    break;
  }
  pthread_mutex_unlock(&g_mu);
}

}  // namespace tramway::common
