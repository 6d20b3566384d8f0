// Hooks on any function, on Debian's own libz.so.1 and libsqlite3.so.0 (built without patchable
// entries): four threads compress, check and query through them while the main thread attaches
// and detaches ops on globs, names and addresses of their functions, a fixed number of cycles.
// Every result equals the one computed before any hook, the callbacks ran, and once detached
// every function's bytes are the original ones again. Prototypes are declared here: the -dev
// headers are not needed.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tramway/hooks.h"

namespace {

namespace hooks = tramway::hooks;

constexpr int kWorkers = 4;
constexpr int kCycles = 6;

// ---- the libraries, through dlsym ---------------------------------------------------------
struct Zlib {
  int (*compress2)(unsigned char*, unsigned long*, const unsigned char*, unsigned long, int);
  int (*uncompress)(unsigned char*, unsigned long*, const unsigned char*, unsigned long);
  unsigned long (*compressBound)(unsigned long);
  unsigned long (*crc32)(unsigned long, const unsigned char*, unsigned);
  unsigned long (*adler32)(unsigned long, const unsigned char*, unsigned);
};
struct Sqlite {
  int (*open)(const char*, void**);
  int (*exec)(void*, const char*, int (*)(void*, int, char**, char**), void*, char**);
  int (*prepare_v2)(void*, const char*, int, void**, const char**);
  int (*step)(void*);
  long long (*column_int64)(void*, int);
  int (*finalize)(void*);
  int (*close)(void*);
  int (*libversion_number)();
};
constexpr int kSqliteRow = 100;

template <class F>
bool bind(void* lib, const char* name, F& f) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  return f != nullptr;
}

// ---- the workers' job: deterministic in (worker, round) -----------------------------------
std::uint64_t mix(std::uint64_t h, std::uint64_t v) { return (h ^ v) * 0x100000001b3ull; }

std::vector<unsigned char> input_for(int worker, int round, std::size_t size) {
  std::vector<unsigned char> in(size);
  std::uint64_t x = 0x9e3779b97f4a7c15ull * static_cast<std::uint64_t>(worker * 1000 + round + 1);
  for (std::size_t i = 0; i < size; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    in[i] = static_cast<unsigned char>("the quick brown fox jumps over a lazy dog "[x % 42] ^ ((i % 97) == 0 ? x : 0));
  }
  return in;
}

std::uint64_t zlib_job(const Zlib& z, int worker, int round) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (int k = 0; k < 3; ++k) {
    const auto in = input_for(worker, round * 3 + k, 2000 + 1500 * static_cast<std::size_t>(k));
    unsigned long packed_size = z.compressBound(in.size());
    std::vector<unsigned char> packed(packed_size);
    if (z.compress2(packed.data(), &packed_size, in.data(), in.size(), 1 + (round + k) % 9) != 0) return 1;
    std::vector<unsigned char> out(in.size());
    unsigned long out_size = out.size();
    if (z.uncompress(out.data(), &out_size, packed.data(), packed_size) != 0 || out_size != in.size()) return 2;
    if (out != in) return 3;
    h = mix(h, packed_size);
    h = mix(h, z.crc32(0, packed.data(), static_cast<unsigned>(packed_size)));
    h = mix(h, z.crc32(0, in.data(), static_cast<unsigned>(in.size())));
    h = mix(h, z.adler32(1, in.data(), static_cast<unsigned>(in.size())));
  }
  return h;
}

std::uint64_t sqlite_job(const Sqlite& s, int worker, int round) {
  void* db = nullptr;
  if (s.open(":memory:", &db) != 0) return 1;
  std::string sql = "create table t(k integer, v integer); begin;";
  for (int i = 0; i < 120; ++i) {
    sql += "insert into t values(" + std::to_string((i * 7 + worker) % 13) + "," +
           std::to_string(i * (round + 3) + worker) + ");";
  }
  sql += "commit;";
  std::uint64_t h = 0xcbf29ce484222325ull;
  if (s.exec(db, sql.c_str(), nullptr, nullptr, nullptr) != 0) h = 2;
  for (const char* q : {"select sum(v) from t", "select k, count(*), sum(v) from t group by k order by k",
                        "select max(v) - min(v) from t where k % 3 = 1"}) {
    void* stmt = nullptr;
    if (s.prepare_v2(db, q, -1, &stmt, nullptr) != 0) return 3;
    for (int r; (r = s.step(stmt)) == kSqliteRow;) {
      for (int col = 0; col < 3; ++col) h = mix(h, static_cast<std::uint64_t>(s.column_int64(stmt, col)));
    }
    s.finalize(stmt);
  }
  s.close(db);
  return h;
}

// ---- hooks ---------------------------------------------------------------------------------
// The function bytes a hook changes lie within its first 16 (an endbr64 and the run).
struct Entry {
  std::uintptr_t address;
  std::string name;
  std::vector<std::uint8_t> bytes;
};
std::vector<std::uint8_t> first_bytes(std::uintptr_t a, std::size_t n) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(a);
  return {p, p + n};
}

void count_call(const hooks::Ops& o, std::uintptr_t, std::uintptr_t, hooks::EntryRegs&) {
  static_cast<std::atomic<std::uint64_t>*>(o.data)->fetch_add(1, std::memory_order_relaxed);
}

TEST(DetourLibraries, ZlibAndSqliteHookedAndUnhookedWhileThreadsUseThem) {
  void* libz = dlopen("libz.so.1", RTLD_NOW);
  void* libsqlite = dlopen("libsqlite3.so.0", RTLD_NOW);
  if (!libz || !libsqlite) GTEST_SKIP() << "libz.so.1 or libsqlite3.so.0 is not installed: " << dlerror();
  Zlib z{};
  Sqlite s{};
  ASSERT_TRUE(bind(libz, "compress2", z.compress2) && bind(libz, "uncompress", z.uncompress) &&
              bind(libz, "compressBound", z.compressBound) && bind(libz, "crc32", z.crc32) &&
              bind(libz, "adler32", z.adler32));
  ASSERT_TRUE(bind(libsqlite, "sqlite3_open", s.open) && bind(libsqlite, "sqlite3_exec", s.exec) &&
              bind(libsqlite, "sqlite3_prepare_v2", s.prepare_v2) && bind(libsqlite, "sqlite3_step", s.step) &&
              bind(libsqlite, "sqlite3_column_int64", s.column_int64) &&
              bind(libsqlite, "sqlite3_finalize", s.finalize) && bind(libsqlite, "sqlite3_close", s.close) &&
              bind(libsqlite, "sqlite3_libversion_number", s.libversion_number));

  // Untraced results, one per (worker, round parity): a worker's rounds alternate between two.
  std::uint64_t expected[kWorkers][2];
  for (int w = 0; w < kWorkers; ++w) {
    for (int p = 0; p < 2; ++p) expected[w][p] = mix(zlib_job(z, w, p), sqlite_job(s, w, p));
    ASSERT_NE(expected[w][0], expected[w][1]);
  }

  // Every relocatable function of both libraries, and its original first bytes.
  auto all = hooks::functions();
  ASSERT_TRUE(all.ok()) << all.status().message();
  std::vector<Entry> entries;
  for (const hooks::Function& f : *all) {
    const bool ours = f.object.find("libz.so.1") != std::string::npos || f.object.find("libsqlite3.so.0") != std::string::npos;
    if (ours && f.kind == hooks::HookKind::relocatable)
      entries.push_back({f.entry, f.name, first_bytes(f.entry, std::min<std::size_t>(16, f.size))});
  }
  ASSERT_GT(entries.size(), 100u);

  struct Attachment {
    hooks::Filter filter;
    std::atomic<std::uint64_t> calls{0};
    hooks::Ops ops;
    explicit Attachment(hooks::Filter f) : filter(std::move(f)) {
      ops.entry = count_call;
      ops.data = &calls;
    }
  };
  std::vector<std::unique_ptr<Attachment>> attachments;
  for (const char* g : {"deflate*", "inflate*", "crc32*", "adler32*", "sqlite3_*"})
    attachments.push_back(std::make_unique<Attachment>(hooks::Filter::glob(g)));
  attachments.push_back(std::make_unique<Attachment>(hooks::Filter::names({"compress2", "uncompress", "compressBound"})));
  attachments.push_back(std::make_unique<Attachment>(hooks::Filter::addresses(
      {reinterpret_cast<std::uintptr_t>(z.crc32), reinterpret_cast<std::uintptr_t>(s.step)})));

  std::atomic<bool> stop{false};
  std::atomic<int> rounds[kWorkers] = {};
  std::atomic<int> wrong{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      for (int round = 0; !stop.load(); ++round) {
        if (mix(zlib_job(z, w, round % 2), sqlite_job(s, w, round % 2)) != expected[w][round % 2]) ++wrong;
        rounds[w].fetch_add(1);
      }
    });
  }
  struct Stop {
    std::atomic<bool>& stop;
    std::vector<std::thread>& workers;
    ~Stop() {
      stop = true;
      for (auto& t : workers) t.join();
    }
  } stopper{stop, workers};
  // Every worker finishes a whole round after `since` was read: it ran hooked (or unhooked) in full.
  const auto wait_rounds = [&](const int (&since)[kWorkers]) {
    for (int w = 0; w < kWorkers; ++w)
      while (rounds[w].load() < since[w] + 2 && wrong.load() == 0) std::this_thread::yield();
  };

  const auto jmp_at_entry = [&](std::uintptr_t f) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(f);
    const std::size_t at = p[0] == 0xf3 && p[1] == 0x0f && p[2] == 0x1e && p[3] == 0xfa ? 4 : 0;  // endbr64 stays
    return p[at] == 0xe9;
  };
  std::size_t attached = 0;
  for (int cycle = 0; cycle < kCycles; ++cycle) {
    SCOPED_TRACE("cycle " + std::to_string(cycle));
    for (auto& a : attachments) {
      const auto st = hooks::attach(a->ops, a->filter);
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_GE(hooks::counters(a->ops).functions, 1u);
      if (cycle == 0) attached += hooks::counters(a->ops).functions;
    }
    EXPECT_TRUE(jmp_at_entry(reinterpret_cast<std::uintptr_t>(z.compress2)));
    EXPECT_TRUE(jmp_at_entry(reinterpret_cast<std::uintptr_t>(s.step)));
    int since[kWorkers];
    for (int w = 0; w < kWorkers; ++w) since[w] = rounds[w].load();
    // The main thread's own calls, hooked for certain.
    EXPECT_EQ(mix(zlib_job(z, 0, cycle % 2), sqlite_job(s, 0, cycle % 2)), expected[0][cycle % 2]);
    EXPECT_GT(s.libversion_number(), 3000000);
    wait_rounds(since);
    for (auto& a : attachments) {
      EXPECT_GT(hooks::counters(a->ops).hits, 0u) << "no call was intercepted";
      EXPECT_GT(a->calls.exchange(0), 0u) << "no callback ran";
    }
    // Detached synchronously and asynchronously by turns, in both orders.
    auto pending = std::make_shared<std::atomic<int>>(0);  // outlives a failed assertion
    for (std::size_t i = 0; i < attachments.size(); ++i) {
      auto& a = attachments[(cycle % 2) ? attachments.size() - 1 - i : i];
      if ((i + static_cast<std::size_t>(cycle)) % 2) {
        ASSERT_TRUE(hooks::detach(a->ops).ok());
      } else {
        ++*pending;
        ASSERT_TRUE(hooks::detach_async(a->ops, [pending] { --*pending; }).ok());
      }
    }
    while (pending->load() != 0) std::this_thread::yield();
    for (const Entry& e : entries)
      ASSERT_EQ(first_bytes(e.address, e.bytes.size()), e.bytes) << e.name << " after cycle " << cycle;
    for (int w = 0; w < kWorkers; ++w) since[w] = rounds[w].load();
    wait_rounds(since);  // a round unhooked between two cycles
    EXPECT_EQ(wrong.load(), 0);
    if (wrong.load()) break;
  }
  stop = true;
  std::printf("%zu relocatable functions in libz and libsqlite3; %zu attachments a cycle; worker rounds %d %d %d %d\n",
              entries.size(), attached, rounds[0].load(), rounds[1].load(), rounds[2].load(), rounds[3].load());
  EXPECT_EQ(wrong.load(), 0) << "a result differed from the untraced one";
  for (int w = 0; w < kWorkers; ++w) EXPECT_GE(rounds[w].load(), 4 * kCycles) << "worker " << w;
}

}  // namespace
