// The recorder and exit hooks: every traced call gives an entry and an exit (or `unwound`)
// event, return values and control flow are those of an untraced run, and exceptions,
// longjmp, pthread_exit, cancellation, detach under hijacked frames, deep recursion, tail calls
// and signal handlers running traced code are all survived.
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fixtures.h"
#include "trace/report/report.h"
#include "tramway/hooks.h"
#include "tramway/trace.h"
#include "tramway/trace/format.h"

namespace fmt = tramway::trace::format;
using fmt::EventKind;

namespace {

// A recording as the report library's reader (trace/report) hands it over.
struct Parsed : tramway::trace::report::TraceSink {
  bool ended = false;
  std::uint64_t lost_events = 0;
  std::map<std::uint64_t, std::string> names;
  std::map<std::uint32_t, std::vector<fmt::Event>> by_thread;

  void function(std::uint64_t address, std::string_view name) override { names[address] = name; }
  void thread_name(std::uint32_t, std::string_view) override {}
  void events(std::uint32_t tid, std::span<const fmt::Event> events) override {
    by_thread[tid].insert(by_thread[tid].end(), events.begin(), events.end());
  }
  void lost(std::uint32_t, std::uint64_t count) override { lost_events += count; }

  std::string name(std::uint64_t a) const {
    auto it = names.find(a);
    return it == names.end() ? "?" : it->second;
  }
  // Count of events of `kind` for the function called `fn` (across threads).
  std::size_t count(const std::string& fn, EventKind kind) const {
    std::size_t n = 0;
    for (const auto& [tid, events] : by_thread) {
      for (const fmt::Event& e : events) n += e.kind() == kind && name(e.address()) == fn;
    }
    return n;
  }
};

// Reads a recording; the file must be whole and free of damage.
Parsed parse(const std::string& path) {
  Parsed p;
  tramway::trace::report::ReadOptions options;
  options.diagnostics = nullptr;
  auto summary = tramway::trace::report::read_trace(path, p, options);
  EXPECT_TRUE(summary.ok()) << summary.status().message();
  if (!summary.ok()) return p;
  EXPECT_FALSE(summary->truncated) << path;
  for (const std::string& w : summary->warnings) ADD_FAILURE() << w;
  p.ended = summary->closed_cleanly;
  return p;
}

// Each thread's events must form well-nested frames: an exit or unwound closes the innermost
// open frame of the same function, and times never go backwards.
void expect_balanced(const Parsed& p) {
  for (const auto& [tid, events] : p.by_thread) {
    std::vector<std::uint64_t> open;
    std::uint64_t last = 0;
    for (const fmt::Event& e : events) {
      EXPECT_GE(e.time_ns, last) << "thread " << tid;
      last = e.time_ns;
      if (e.kind() == EventKind::entry) {
        open.push_back(e.address());
      } else {
        ASSERT_FALSE(open.empty()) << "thread " << tid << ": exit of " << p.name(e.address()) << " with no frame open";
        EXPECT_EQ(open.back(), e.address()) << "thread " << tid << ": " << p.name(e.address()) << " closes "
                                            << p.name(open.back());
        open.pop_back();
      }
    }
    std::string names;
    for (std::uint64_t a : open) {  // piecewise: GCC 12 -O3 flags " " + string with -Wrestrict
      names += ' ';
      names += p.name(a);
    }
    EXPECT_TRUE(open.empty()) << "thread " << tid << ": " << open.size() << " frames never closed:" << names;
  }
}

class Trace : public ::testing::Test {
 protected:
  std::string path_;
  void SetUp() override {
    path_ = ::testing::TempDir() + "tramway_trace_" + std::to_string(::getpid()) + ".trace";
    ASSERT_TRUE(tramway::trace::start({path_}).ok());
  }
  Parsed stop_and_parse() {
    tramway::Status s = tramway::trace::stop();
    EXPECT_TRUE(s.ok()) << s.message();
    Parsed p = parse(path_);
    EXPECT_TRUE(p.ended);
    std::remove(path_.c_str());
    return p;
  }
  void attach(const std::string& glob) {
    auto r = tramway::trace::attach(glob);
    ASSERT_TRUE(r.ok()) << r.status().message();
  }
};

TEST_F(Trace, CountsEntriesAndExitsOfNestedCalls) {
  attach("trace_fx::*");
  int sum = 0;
  for (int i = 0; i < 1000; ++i) sum += trace_fx::outer(i);
  EXPECT_EQ(sum, [] {
    int s = 0;
    for (int i = 0; i < 1000; ++i) s += 18 * i + 33;  // outer(i) by hand
    return s;
  }());
  Parsed p = stop_and_parse();
  EXPECT_EQ(p.count("trace_fx::outer(int)", EventKind::entry), 1000u);
  EXPECT_EQ(p.count("trace_fx::outer(int)", EventKind::exit), 1000u);
  EXPECT_EQ(p.count("trace_fx::middle(int)", EventKind::exit), 3000u);
  EXPECT_EQ(p.count("trace_fx::leaf(int)", EventKind::entry), 6000u);
  EXPECT_EQ(p.count("trace_fx::leaf(int)", EventKind::exit), 6000u);
  EXPECT_EQ(p.lost_events, 0u);
  expect_balanced(p);
}

TEST_F(Trace, ReturnValuesSurviveTheReturnStub) {
  attach("trace_fx::*");
  EXPECT_EQ(trace_fx::scale(3.0, 4.0), 12.5);
  const trace_fx::Pair r = trace_fx::pair(10, 3);
  EXPECT_EQ(r.a, 13);
  EXPECT_EQ(r.b, 7);
  EXPECT_EQ(trace_fx::extended(2.0L), 5.0L);
  Parsed p = stop_and_parse();
  EXPECT_EQ(p.count("trace_fx::pair(long, long)", EventKind::exit), 1u);
  EXPECT_EQ(p.count("trace_fx::extended(long double)", EventKind::exit), 1u);
  expect_balanced(p);
}

extern "C" std::uint64_t tramway_ipa_caller(std::uint64_t x);

// GCC's -fipa-ra lets a caller keep values in call-clobbered registers across a call to a
// function it has seen leave them alone (ipa_ra_fixture.S does by hand what GCC did to the
// injector's test program: a loop bound in %r8 came back as the return address). The return
// stub must put every one of them back.
TEST_F(Trace, IpaRaCallersKeepTheirRegistersAcrossATracedLeaf) {
  attach("tramway_ipa_leaf");
  for (std::uint64_t i = 0; i < 1000; ++i) ASSERT_EQ(tramway_ipa_caller(i), i + 0x1000) << "call " << i;
  Parsed p = stop_and_parse();
  EXPECT_EQ(p.count("tramway_ipa_leaf", EventKind::exit), 1000u);
  expect_balanced(p);
}

// A plain ops whose callback clobbers %r11 and %xmm8-15 (so it is not "lean": the stub saves
// the vector registers around it), asked for direct mode and not: the leaf's IPA-RA caller
// still finds them as it left them (hook_entry.S saves them; a relocated function stays in
// common mode, whose entry saves %r11 before anything).
TEST(RelocatedHooks, IpaRaCallersKeepTheirRegistersWhateverTheCallbackClobbers) {
  for (const bool direct : {false, true}) {
    static std::atomic<int> calls{0};
    calls = 0;
    tramway::hooks::Ops ops;
    ops.direct = direct;
    ops.entry = [](const tramway::hooks::Ops&, std::uintptr_t, std::uintptr_t, tramway::hooks::EntryRegs&) {
      calls.fetch_add(1, std::memory_order_relaxed);
      asm volatile(
          "movq $-1, %%r11\n\t"
          "pcmpeqd %%xmm8, %%xmm8\n\t pcmpeqd %%xmm9, %%xmm9\n\t pcmpeqd %%xmm10, %%xmm10\n\t"
          "pcmpeqd %%xmm11, %%xmm11\n\t pcmpeqd %%xmm12, %%xmm12\n\t pcmpeqd %%xmm13, %%xmm13\n\t"
          "pcmpeqd %%xmm14, %%xmm14\n\t pcmpeqd %%xmm15, %%xmm15" ::
              : "r11", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    };
    ASSERT_TRUE(tramway::hooks::attach(ops, tramway::hooks::Filter::names({"tramway_ipa_leaf"})).ok());
    for (std::uint64_t i = 0; i < 100; ++i) {
      ASSERT_EQ(tramway_ipa_caller(i), i + 0x1000) << "call " << i << " (direct asked: " << direct << ")";
    }
    ASSERT_TRUE(tramway::hooks::detach(ops).ok());
    EXPECT_EQ(calls.load(), 100) << "the callback did not run on every call (direct asked: " << direct << ")";
  }
}

// The tracer's entry path runs without xmm0-7 saved (hooks::Ops::promise_vector_free): the
// arguments in them must reach the function on its fast path and on a thread's first traced
// call, which claims the thread's trace state (mmap, the C library) on that path: the thread
// has hooked calls behind it already (a plain ops on another function), so the stubs take
// their inline path to the tracer at once.
TEST_F(Trace, FloatingPointArgumentsSurviveTheEntryPath) {
  attach("trace_fx::weigh8*");
  tramway::hooks::Ops plain;
  plain.entry = [](const tramway::hooks::Ops&, std::uintptr_t, std::uintptr_t, tramway::hooks::EntryRegs&) {};
  ASSERT_TRUE(tramway::hooks::attach(plain, tramway::hooks::Filter::glob("trace_fx::untraced_leaf*")).ok());
  constexpr double kWeighed = 1.5 + 2 * 2.25 + 4 * 3.125 + 8 * 4.0625 + 16 * 5.5 + 32 * 6.75 + 64 * 7.875 + 128 * 8.0;
  auto calls = [] {
    double sum = 0;
    for (int i = 0; i < 3; ++i) {
      volatile double a = 1.5, b = 2.25, c = 3.125, d = 4.0625, e = 5.5, f = 6.75, g = 7.875, h = 8.0;
      sum += trace_fx::weigh8(a, b, c, d, e, f, g, h);
    }
    return sum;
  };
  double first_thread = 0;
  int warmed = 0;
  std::thread([&] {
    for (int i = 0; i < 2; ++i) warmed += trace_fx::untraced_leaf(i);
    first_thread = calls();
  }).join();
  EXPECT_EQ(warmed, 23);
  EXPECT_EQ(first_thread, 3 * kWeighed);
  EXPECT_EQ(calls(), 3 * kWeighed);
  ASSERT_TRUE(tramway::hooks::detach(plain).ok());
  Parsed p = stop_and_parse();
  EXPECT_EQ(p.count("trace_fx::weigh8(double, double, double, double, double, double, double, double)", EventKind::exit),
            6u);
  expect_balanced(p);
}

TEST_F(Trace, TailCallsCloseBothFrames) {
  attach("trace_fx::tail_*");
  attach("trace_fx::leaf*");
  for (int i = 0; i < 100; ++i) EXPECT_EQ(trace_fx::tail_caller(i), 7 * (3 * (i + 1) + 1));
  Parsed p = stop_and_parse();
  EXPECT_EQ(p.count("trace_fx::tail_caller(int)", EventKind::exit), 100u);
  EXPECT_EQ(p.count("trace_fx::tail_callee(int)", EventKind::exit), 100u);
  EXPECT_EQ(p.count("trace_fx::leaf(int)", EventKind::exit), 100u);
  expect_balanced(p);
}

TEST_F(Trace, ExceptionsUnwindThroughTracedFrames) {
  attach("trace_fx::*");
  for (int i = 0; i < 500; ++i) {
    EXPECT_EQ(trace_fx::catcher(-1), -1);
    EXPECT_EQ(trace_fx::catcher(i), 2 * (i + 1));
    bool caught = false;
    try {
      trace_fx::rethrower(-1);
    } catch (const std::runtime_error& e) {
      caught = std::string(e.what()) == "negative";
    }
    EXPECT_TRUE(caught);
  }
  Parsed p = stop_and_parse();
  // catcher returns normally every time; thrower and its callee are unwound on -1.
  EXPECT_EQ(p.count("trace_fx::catcher(int)", EventKind::exit), 1000u);
  EXPECT_EQ(p.count("trace_fx::thrower(int)", EventKind::unwound), 1000u);
  EXPECT_EQ(p.count("trace_fx::thrower(int)", EventKind::exit), 500u);
  EXPECT_EQ(p.count("trace_fx::rethrower(int)", EventKind::unwound), 500u);
  expect_balanced(p);
}

TEST_F(Trace, LongjmpSkipsTracedFrames) {
  attach("trace_fx::*");
  for (int i = 0; i < 500; ++i) {
    std::jmp_buf env;
    volatile int got = 0;
    if (setjmp(env) == 0) {
      trace_fx::jumper(&env, -1);
      got = -100;
    } else {
      got = 5;
    }
    EXPECT_EQ(got, 5);
    EXPECT_EQ(trace_fx::outer(1), 51);  // calls after the jump still trace and return right
  }
  Parsed p = stop_and_parse();
  EXPECT_EQ(p.count("trace_fx::jumper(__jmp_buf_tag (*) [1], int)", EventKind::unwound), 500u);
  EXPECT_EQ(p.count("trace_fx::outer(int)", EventKind::exit), 500u);
  expect_balanced(p);
}

TEST_F(Trace, PthreadExitAndCancellationFromTracedFrames) {
  attach("trace_fx::*");
  for (int i = 0; i < 20; ++i) {
    pthread_t t;
    ASSERT_EQ(pthread_create(&t, nullptr, [](void*) -> void* { trace_fx::exiter(); return nullptr; }, nullptr), 0);
    void* value = nullptr;
    ASSERT_EQ(pthread_join(t, &value), 0);
    EXPECT_EQ(value, reinterpret_cast<void*>(42));

    static volatile int started;
    started = 0;
    ASSERT_EQ(pthread_create(&t, nullptr, [](void*) -> void* { trace_fx::cancel_point(&started); return nullptr; }, nullptr), 0);
    while (!started) std::this_thread::yield();
    ASSERT_EQ(pthread_cancel(t), 0);
    ASSERT_EQ(pthread_join(t, &value), 0);
    EXPECT_EQ(value, PTHREAD_CANCELED);
  }
  Parsed p = stop_and_parse();
  EXPECT_EQ(p.count("trace_fx::exiter()", EventKind::unwound), 20u);
  EXPECT_EQ(p.count("trace_fx::cancel_point(int volatile*)", EventKind::unwound), 20u);
  expect_balanced(p);
}

TEST_F(Trace, DetachWhileFramesAreHijacked) {
  attach("trace_fx::waiter*");
  static volatile int flag;
  flag = 0;
  std::atomic<int> result{0};
  std::thread t([&] { result = trace_fx::waiter(&flag); });
  // Wait for the thread to be inside waiter (its entry recorded), then detach and stop.
  for (int i = 0; i < 1000 && tramway::trace::flush().ok() && tramway::trace::stats().events == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_TRUE(tramway::trace::detach("trace_fx::waiter*").ok());
  Parsed p = stop_and_parse();
  flag = 1;  // now it returns through the stub, after detach and stop
  t.join();
  EXPECT_EQ(result.load(), 7);
  EXPECT_EQ(p.count("trace_fx::waiter(int volatile*)", EventKind::entry), 1u);
}

TEST_F(Trace, DeepRecursionOverflowsTheShadowStackWithoutHarm) {
  attach("trace_fx::recurse*");
  EXPECT_EQ(trace_fx::recurse(2000), 2000);
  EXPECT_EQ(trace_fx::recurse(100), 100);
  Parsed p = stop_and_parse();
  // 512 frames are hijacked; the rest are counted as lost (entry and exit each).
  EXPECT_EQ(p.count("trace_fx::recurse(int)", EventKind::exit), 512u + 100u);
  EXPECT_EQ(p.lost_events, 2u * (2000u - 512u));
  expect_balanced(p);
}

std::atomic<long> g_handler_calls{0};
void traced_handler(int) {
  trace_fx::middle(1);
  g_handler_calls.fetch_add(1, std::memory_order_relaxed);
}

TEST(TraceSignals, HandlersRunTracedCodeOverTracedCode) {
  const std::string path = ::testing::TempDir() + "tramway_signals_" + std::to_string(::getpid()) + ".trace";
  tramway::trace::RecordOptions options{path};
  options.ring_events = 1u << 20;  // no ring overflows
  ASSERT_TRUE(tramway::trace::start(options).ok());
  ASSERT_TRUE(tramway::trace::attach("trace_fx::*").ok());
  struct sigaction sa {};
  sa.sa_handler = traced_handler;
  sa.sa_flags = SA_RESTART;
  ASSERT_EQ(sigaction(SIGALRM, &sa, nullptr), 0);
  itimerval it{{0, 50}, {0, 50}};
  ASSERT_EQ(setitimer(ITIMER_REAL, &it, nullptr), 0);
  long sum = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
  while (std::chrono::steady_clock::now() < until) {
    for (int i = 0; i < 10; ++i) sum += trace_fx::outer(i);
    std::jmp_buf env;
    if (setjmp(env) == 0) trace_fx::jumper(&env, -1);
    sum += trace_fx::catcher(-1);
    ::usleep(20);
  }
  itimerval off{};
  setitimer(ITIMER_REAL, &off, nullptr);
  signal(SIGALRM, SIG_IGN);
  EXPECT_GT(g_handler_calls.load(), 0);
  EXPECT_NE(sum, 0);
  ASSERT_TRUE(tramway::trace::stop().ok());
  Parsed p = parse(path);
  std::remove(path.c_str());
  // Calls a signal handler makes while this thread is inside the tracer's own bookkeeping are
  // left untraced and counted lost; the rest must balance.
  EXPECT_GT(p.count("trace_fx::middle(int)", EventKind::exit), 0u);
  expect_balanced(p);
}

TEST(TraceRing, AFullRingLosesWholeCallsAndTheFramesStayBalanced) {
  const std::string path = ::testing::TempDir() + "tramway_ring_" + std::to_string(::getpid()) + ".trace";
  tramway::trace::RecordOptions options{path};
  options.ring_events = 64;            // a new thread gets a ring this small
  options.flush_interval_ms = 100000;  // and nothing drains it before stop()
  ASSERT_TRUE(tramway::trace::start(options).ok());
  ASSERT_TRUE(tramway::trace::attach("trace_fx::*").ok());
  int sum = 0;
  std::thread([&] {
    for (int i = 0; i < 20; ++i) sum += trace_fx::outer(i);  // 400 events
  }).join();
  ASSERT_TRUE(tramway::trace::stop().ok());
  Parsed p = parse(path);
  std::remove(path.c_str());
  EXPECT_EQ(sum, 20 * 33 + 18 * 190);
  std::size_t events = 0;
  for (const auto& [tid, v] : p.by_thread) events += v.size();
  EXPECT_LE(events, 64u);
  EXPECT_EQ(events + p.lost_events, 400u);  // every event either in the file or counted lost
  expect_balanced(p);
}

TEST(TraceApi, ErrorsSayWhatToDo) {
  EXPECT_FALSE(tramway::trace::attach("trace_fx::*").ok());  // not recording
  tramway::Status s = tramway::trace::start({"/nonexistent-dir/x.trace"});
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("/nonexistent-dir/x.trace"), std::string::npos) << s.message();
  const std::string path = ::testing::TempDir() + "tramway_api.trace";
  ASSERT_TRUE(tramway::trace::start({path}).ok());
  EXPECT_FALSE(tramway::trace::start({path}).ok());
  auto none = tramway::trace::attach("no_such_function_anywhere*");
  EXPECT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("matches no function of this process that can be hooked"), std::string::npos);
  auto r = tramway::trace::attach("trace_fx::leaf*");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 1u);
  EXPECT_FALSE(tramway::trace::attach("trace_fx::leaf*").ok());  // attached already
  // Overlapping globs: each function is traced once, and stays traced while a glob wants it.
  ASSERT_TRUE(tramway::trace::attach("trace_fx::*").ok());
  trace_fx::leaf(1);
  ASSERT_TRUE(tramway::trace::detach("trace_fx::*").ok());
  trace_fx::leaf(2);
  EXPECT_FALSE(tramway::trace::detach("trace_fx::*").ok());
  ASSERT_TRUE(tramway::trace::stop().ok());
  Parsed p = parse(path);
  EXPECT_EQ(p.count("trace_fx::leaf(int)", EventKind::entry), 2u);
  std::remove(path.c_str());
}

}  // namespace
