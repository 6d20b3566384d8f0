// A detach whose grace period fails (issue 11, defect 9) leaves the ops in a state the user can
// act on: unpublished, and finished by a later detach once grace periods work; detach_async
// runs `done` once one does; under a seccomp filter that refuses membarrier, every call says
// so and what to do, and the ops never ends up half-freed.
#include <gtest/gtest.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <string>

#include "bounded_child.h"
#include "common/membarrier.h"
#include "grace/internal.h"
#include "tramway/grace.h"
#include "tramway/hooks.h"

namespace hooks = tramway::hooks;
namespace grace = tramway::grace;

#define PATCHABLE __attribute__((noinline, patchable_function_entry(13, 8)))
extern "C" {
PATCHABLE int detach_fx_work(int x) {
  asm volatile("");
  return x + 1;
}
PATCHABLE int detach_fx_other(int x) {
  asm volatile("");
  return x + 2;
}
}

namespace {

void count_hit(const hooks::Ops& o, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  static_cast<std::atomic<long>*>(o.data)->fetch_add(1, std::memory_order_relaxed);
}

struct Counted {
  std::atomic<long> hits{0};
  hooks::Ops ops;
  Counted() {
    ops.entry = count_hit;
    ops.data = &hits;
  }
};

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

TEST(DetachFailure, ADetachWhoseGracePeriodFailedIsFinishedByTheNextOne) {
  Counted c;
  ASSERT_TRUE(hooks::attach(c.ops, hooks::Filter::names({"detach_fx_work"})).ok());
  detach_fx_work(1);
  ASSERT_EQ(c.hits.load(), 1);
  grace::detail::inject_grace_period_failures(1);
  const tramway::Status failed = hooks::detach(c.ops);
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(contains(failed.message(), "call hooks::detach again")) << failed.message();
  detach_fx_work(1);
  EXPECT_EQ(c.hits.load(), 1) << "the ops is unpublished: no callback of it starts any more";
  const tramway::Status attach_again = hooks::attach(c.ops, hooks::Filter::names({"detach_fx_work"}));
  ASSERT_FALSE(attach_again.ok());
  EXPECT_TRUE(contains(attach_again.message(), "detach again")) << attach_again.message();
  EXPECT_EQ(hooks::counters(c.ops).functions, 0u);
  ASSERT_TRUE(hooks::detach(c.ops).ok());
  EXPECT_EQ(c.ops.state, nullptr);
  // Reusable as any detached ops.
  ASSERT_TRUE(hooks::attach(c.ops, hooks::Filter::names({"detach_fx_work"})).ok());
  detach_fx_work(1);
  EXPECT_EQ(c.hits.load(), 2);
  ASSERT_TRUE(hooks::detach(c.ops).ok());
}

TEST(DetachFailure, DetachAsyncFinishesAFailedDetach) {
  Counted c;
  ASSERT_TRUE(hooks::attach(c.ops, hooks::Filter::names({"detach_fx_work"})).ok());
  grace::detail::inject_grace_period_failures(1);
  ASSERT_FALSE(hooks::detach(c.ops).ok());
  std::atomic<bool> done{false};
  ASSERT_TRUE(hooks::detach_async(c.ops, [&] { done = true; }).ok());
  ASSERT_TRUE(grace::barrier().ok());
  EXPECT_TRUE(done.load());
  EXPECT_EQ(c.ops.state, nullptr);
}

TEST(DetachFailure, DetachAsyncRunsDoneOnceAGracePeriodSucceeds) {
  Counted c;
  ASSERT_TRUE(hooks::attach(c.ops, hooks::Filter::names({"detach_fx_other"})).ok());
  std::atomic<bool> done{false};
  grace::detail::inject_grace_period_failures(3);  // the callback thread's first three fail
  ASSERT_TRUE(hooks::detach_async(c.ops, [&] { done = true; }).ok());
  ASSERT_TRUE(grace::barrier().ok());
  EXPECT_TRUE(done.load());
  EXPECT_EQ(c.ops.state, nullptr);
}

// The real thing, in a child (a seccomp filter cannot be lifted): membarrier refused with EPERM
// once the ops is attached.
enum SeccompFailure {
  kOk = 0,
  kSetupFailed = 10,
  kFilterFailed = 11,
  kDetachSucceeded = 12,
  kFirstErrorUnclear = 13,
  kCallbackAfterDetach = 14,
  kRetryErrorUnclear = 15,
  kAttachNotRefused = 16,
  kDetachAsyncNotRefused = 17,
  kDisableFailed = 18,
  kFreshAttachErrorUnclear = 19,
};

bool refuse_membarrier() {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_membarrier, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog prog{static_cast<unsigned short>(sizeof filter / sizeof filter[0]), filter};
  return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 && prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
}

bool says_seccomp(const tramway::Status& s) {
  return !s.ok() && contains(s.message(), "seccomp") && contains(s.message(), "allow the membarrier system call");
}

int detach_under_seccomp() {
  Counted c, fresh;
  if (!hooks::attach(c.ops, hooks::Filter::names({"detach_fx_work"})).ok()) return kSetupFailed;
  if (!grace::synchronize().ok()) return kSetupFailed;  // registered for membarrier, and it works
  detach_fx_work(1);
  if (!refuse_membarrier()) return kFilterFailed;
  const tramway::Status first = hooks::detach(c.ops);
  if (first.ok()) return kDetachSucceeded;
  if (!says_seccomp(first) || !contains(first.message(), "call hooks::detach again")) {
    std::fprintf(stderr, "first detach: %s\n", first.message().c_str());
    return kFirstErrorUnclear;
  }
  detach_fx_work(1);
  if (c.hits.load() != 1) return kCallbackAfterDetach;
  const tramway::Status retry = hooks::detach(c.ops);
  if (!says_seccomp(retry) || !contains(retry.message(), "still unpublished")) {
    std::fprintf(stderr, "retried detach: %s\n", retry.message().c_str());
    return kRetryErrorUnclear;
  }
  if (hooks::attach(c.ops, hooks::Filter::names({"detach_fx_work"})).ok()) return kAttachNotRefused;
  if (hooks::detach_async(c.ops, [] {}).ok()) return kDetachAsyncNotRefused;
  if (!hooks::disable(c.ops).ok()) return kDisableFailed;
  // Nothing can be patched either, and attach says why.
  const tramway::Status attach = hooks::attach(fresh.ops, hooks::Filter::names({"detach_fx_other"}));
  if (!says_seccomp(attach)) {
    std::fprintf(stderr, "attach: %s\n", attach.message().c_str());
    return kFreshAttachErrorUnclear;
  }
  return kOk;
}

TEST(DetachFailure, UnderASeccompFilterThatRefusesMembarrierEveryCallSaysSo) {
  const int code = bounded::run_in_child(detach_under_seccomp, 5000);
  EXPECT_EQ(code, kOk) << bounded::describe(code);
}

// Issue 11, defect 13: a membarrier failure names its cause and what to do, not a kernel
// version when the kernel is not the cause.
TEST(MembarrierErrors, EachCauseSaysWhatToDo) {
  const char* needs = "Linux >= 4.14 has it; tramway's grace periods need it";
  const std::string nosys = tramway::common::explain_membarrier_failure("QUERY", ENOSYS, needs);
  EXPECT_TRUE(contains(nosys, "no membarrier system call") && contains(nosys, "CONFIG_MEMBARRIER")) << nosys;
  const std::string inval = tramway::common::explain_membarrier_failure("PRIVATE_EXPEDITED", EINVAL, needs);
  EXPECT_TRUE(contains(inval, "does not offer the command") && contains(inval, needs)) << inval;
  // EPERM: a seccomp filter if the process has one (a container may give the test one), else a
  // missing registration.
  const std::string perm = tramway::common::explain_membarrier_failure("PRIVATE_EXPEDITED", EPERM, needs);
  FILE* f = std::fopen("/proc/self/status", "r");
  ASSERT_NE(f, nullptr);
  char line[256];
  bool filtered = false;
  while (std::fgets(line, sizeof line, f)) filtered = filtered || std::strncmp(line, "Seccomp:\t2", 10) == 0;
  std::fclose(f);
  EXPECT_TRUE(contains(perm, filtered ? "seccomp filter" : "not registered") && !contains(perm, "Linux >=")) << perm;
}

}  // namespace
