// The loader gate (common/loader_gate.h).
#include "common/loader_gate.h"

#include <pthread.h>
#include <time.h>

#include <atomic>
#include <cerrno>

#include "common/fork_hooks.h"
#include "tramway/grace.h"

namespace tramway::common {
namespace {

// Rank loader_gate. The mutex guards the counts only and is never held across anything.
pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;  // clock: CLOCK_REALTIME (the initializer's)
int g_users = 0;             // threads inside an outermost use
bool g_fork_waiting = false;  // a fork waits for g_users to reach 0
bool g_fork_holds = false;    // a fork took the gate: nobody enters until it has passed
bool g_taken = false;         // this fork's prepare took it (parent and child release it)
std::atomic<unsigned long> g_timeouts{0};
thread_local int t_depth = 0;

constexpr int kForkWaitSeconds = 2;

void prepare() {
  g_taken = false;
  if (t_depth > 0) return;
  timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += kForkWaitSeconds;
  pthread_mutex_lock(&g_mu);
  g_fork_waiting = true;
  int rc = 0;
  while (g_users > 0 && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&g_cv, &g_mu, &deadline);
  g_fork_waiting = false;
  if (g_users == 0) {
    g_fork_holds = g_taken = true;
  } else {
    g_timeouts.fetch_add(1, std::memory_order_relaxed);
    pthread_cond_broadcast(&g_cv);  // the users turned away may go on
  }
  pthread_mutex_unlock(&g_mu);
}

void parent() {
  if (!g_taken) return;
  pthread_mutex_lock(&g_mu);
  g_fork_holds = false;
  pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
}

// Only this thread exists: another may have held the mutex, or waited on the condition.
void child() {
  g_mu = PTHREAD_MUTEX_INITIALIZER;
  g_cv = PTHREAD_COND_INITIALIZER;
  g_users = t_depth > 0 ? 1 : 0;  // a fork from inside a use leaves that use in the child
  g_fork_waiting = g_fork_holds = g_taken = false;
}

constexpr ForkHook kForkHook{LockRank::loader_gate, prepare, parent, child};
__attribute__((constructor)) void register_at_load() { register_fork_hook(kForkHook); }
__attribute__((destructor)) void unregister_at_unload() { unregister_fork_hook(kForkHook); }

}  // namespace

LoaderUse::LoaderUse() noexcept {
  if (t_depth++ > 0) return;
  pthread_mutex_lock(&g_mu);
  while (g_fork_holds || (g_fork_waiting && !grace::in_read_section())) pthread_cond_wait(&g_cv, &g_mu);
  ++g_users;
  pthread_mutex_unlock(&g_mu);
}

LoaderUse::~LoaderUse() {
  if (--t_depth > 0) return;
  pthread_mutex_lock(&g_mu);
  if (--g_users == 0 && g_fork_waiting) pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
}

namespace testing {
unsigned long loader_gate_timeouts() noexcept { return g_timeouts.load(); }
}  // namespace testing

}  // namespace tramway::common
