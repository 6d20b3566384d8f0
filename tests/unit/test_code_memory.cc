// text/code_memory.h: executable memory for generated code, W^X by construction, placed
// within rel32 reach on request, private to each process after fork().
#include "tramway/text/code_memory.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

using tramway::text::CodeBlock;

struct Mapping {
  std::uintptr_t begin, end;
  std::string perms, name;
};
std::vector<Mapping> read_maps() {
  std::vector<Mapping> out;
  std::ifstream in("/proc/self/maps");
  std::string line;
  while (std::getline(in, line)) {
    Mapping m;
    std::istringstream ls(line);
    std::string range, offset, dev, inode;
    ls >> range >> m.perms >> offset >> dev >> inode;
    std::getline(ls >> std::ws, m.name);
    m.begin = std::stoull(range.substr(0, range.find('-')), nullptr, 16);
    m.end = std::stoull(range.substr(range.find('-') + 1), nullptr, 16);
    out.push_back(m);
  }
  return out;
}

void expect_no_writable_executable_mapping() {
  for (const Mapping& m : read_maps()) {
    EXPECT_FALSE(m.perms[1] == 'w' && m.perms[2] == 'x') << "W^X broken: " << std::hex << m.begin << "-" << m.end
                                                         << " " << m.perms << " " << m.name;
  }
}

std::string mapping_name(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  for (const Mapping& m : read_maps())
    if (a >= m.begin && a < m.end) return m.name;
  return "(unmapped)";
}

int count_code_mappings() {
  int n = 0;
  for (const Mapping& m : read_maps()) n += m.name.find("tramway-code") != std::string::npos;
  return n;
}

CodeBlock must_allocate(std::size_t size) {
  auto b = tramway::text::allocate_code(size);
  EXPECT_TRUE(b.ok()) << b.status().message();
  return b.ok() ? *b : CodeBlock{};
}

// `mov eax, imm32; ret`
void emit_return_constant(std::uint8_t* rw, std::uint32_t value) {
  rw[0] = 0xb8;
  std::memcpy(rw + 1, &value, 4);
  rw[5] = 0xc3;
}
std::uint32_t run(const std::uint8_t* rx) { return reinterpret_cast<std::uint32_t (*)()>(const_cast<std::uint8_t*>(rx))(); }

__attribute__((noinline)) int function_in_the_executable(int x) { return x * 3; }

bool every_byte_in_reach(const void* near, const CodeBlock& b) {
  const auto n = reinterpret_cast<std::intptr_t>(near);
  const auto lo = reinterpret_cast<std::intptr_t>(b.rx);
  const auto hi = lo + static_cast<std::intptr_t>(b.size);  // one past the last byte
  // A 5-byte jmp at `near` reaches every byte, and a 5-byte jmp anywhere in the block reaches
  // `near`.
  const std::intptr_t lim = std::intptr_t{1} << 31;
  auto fits = [&](std::intptr_t d) { return d >= -lim && d < lim; };
  return fits(lo - (n + 5)) && fits((hi - 1) - (n + 5)) && fits(n - (lo + 5)) && fits(n - hi);
}

TEST(CodeMemory, BlocksAre16ByteAlignedAndRoundedUp) {
  for (std::size_t size : {1, 5, 16, 17, 100, 4096, 5000}) {
    CodeBlock b = must_allocate(size);
    ASSERT_NE(b.rx, nullptr);
    ASSERT_NE(b.rw, nullptr);
    EXPECT_NE(b.rx, b.rw);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.rx) % 16, 0u) << size;
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.rw) % 16, 0u) << size;
    EXPECT_GE(b.size, size);
    EXPECT_EQ(b.size % 16, 0u);
    EXPECT_LT(b.size, size + 16);
  }
  EXPECT_FALSE(tramway::text::allocate_code(0).ok());
  EXPECT_FALSE(tramway::text::allocate_code_near(nullptr, 16).ok());
}

TEST(CodeMemory, RwAndRxViewsAliasTheSameBytes) {
  CodeBlock b = must_allocate(64);
  for (std::size_t i = 0; i < b.size; ++i) b.rw[i] = static_cast<std::uint8_t>(i * 7 + 1);
  for (std::size_t i = 0; i < b.size; ++i) EXPECT_EQ(b.rx[i], static_cast<std::uint8_t>(i * 7 + 1)) << i;
  EXPECT_EQ(tramway::text::writable_alias(b.rx), b.rw);
  EXPECT_EQ(tramway::text::writable_alias(b.rx + 13), b.rw + 13);
  int local = 0;
  EXPECT_EQ(tramway::text::writable_alias(&local), nullptr);
  EXPECT_EQ(tramway::text::writable_alias(reinterpret_cast<const void*>(&function_in_the_executable)), nullptr);
}

TEST(CodeMemory, GeneratedCodeRunsThroughTheRxView) {
  CodeBlock b = must_allocate(16);
  emit_return_constant(b.rw, 0x1234'5678);
  EXPECT_EQ(run(b.rx), 0x1234'5678u);
  // Rewritten through the RW alias, the RX view runs the new bytes (x86 snoops stores to
  // code by physical address, so no serialisation is needed on the writing thread).
  emit_return_constant(b.rw, 42);
  EXPECT_EQ(run(b.rx), 42u);
}

TEST(CodeMemory, ViewsHaveSeparatePermissions) {
  CodeBlock b = must_allocate(32);
  bool rx_found = false, rw_found = false;
  for (const Mapping& m : read_maps()) {
    const auto rx = reinterpret_cast<std::uintptr_t>(b.rx), rw = reinterpret_cast<std::uintptr_t>(b.rw);
    if (rx >= m.begin && rx < m.end) {
      rx_found = true;
      EXPECT_EQ(m.perms, "r-xs") << m.name;
    }
    if (rw >= m.begin && rw < m.end) {
      rw_found = true;
      EXPECT_EQ(m.perms, "rw-s") << m.name;
    }
  }
  EXPECT_TRUE(rx_found);
  EXPECT_TRUE(rw_found);
}

TEST(CodeMemory, NearAFunctionOfTheExecutable) {
  const void* target = reinterpret_cast<const void*>(&function_in_the_executable);
  for (std::size_t size : {16, 200, 4096, 300 * 1024}) {  // the last one needs its own arena
    auto b = tramway::text::allocate_code_near(target, size);
    ASSERT_TRUE(b.ok()) << b.status().message();
    EXPECT_TRUE(every_byte_in_reach(target, *b)) << size << " at " << static_cast<void*>(b->rx);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b->rx) % 16, 0u);
  }
}

TEST(CodeMemory, NearALibcFunction) {
  const void* target = reinterpret_cast<const void*>(&::getpid);
  ASSERT_NE(mapping_name(target).find("libc"), std::string::npos) << mapping_name(target);
  std::vector<CodeBlock> blocks;
  for (int i = 0; i < 20; ++i) {
    auto b = tramway::text::allocate_code_near(target, 1000);
    ASSERT_TRUE(b.ok()) << b.status().message();
    EXPECT_TRUE(every_byte_in_reach(target, *b)) << static_cast<void*>(b->rx);
    blocks.push_back(*b);
  }
  // And the generated code can jump into libc: `jmp getpid` from the block returns our pid.
  CodeBlock& b = blocks.front();
  const auto from = reinterpret_cast<std::intptr_t>(b.rx), to = reinterpret_cast<std::intptr_t>(target);
  const auto rel = static_cast<std::int32_t>(to - (from + 5));
  b.rw[0] = 0xe9;
  std::memcpy(b.rw + 1, &rel, 4);
  EXPECT_EQ(reinterpret_cast<pid_t (*)()>(b.rx)(), getpid());
}

TEST(CodeMemory, DistinctBlocksDoNotOverlap) {
  std::vector<CodeBlock> blocks;
  for (int i = 0; i < 200; ++i) {
    auto b = i % 3 ? tramway::text::allocate_code(static_cast<std::size_t>(1 + (i * 37) % 3000))
                   : tramway::text::allocate_code_near(reinterpret_cast<const void*>(&function_in_the_executable),
                                                       static_cast<std::size_t>(1 + (i * 53) % 2000));
    ASSERT_TRUE(b.ok()) << b.status().message();
    blocks.push_back(*b);
  }
  for (std::size_t i = 0; i < blocks.size(); ++i) std::memset(blocks[i].rw, static_cast<int>(i & 0xff), blocks[i].size);
  for (std::size_t i = 0; i < blocks.size(); ++i)
    for (std::size_t j = 0; j < blocks[i].size; ++j) ASSERT_EQ(blocks[i].rx[j], i & 0xff) << i << " " << j;
  auto by_rx = blocks;
  std::sort(by_rx.begin(), by_rx.end(), [](auto& a, auto& b) { return a.rx < b.rx; });
  for (std::size_t i = 1; i < by_rx.size(); ++i) EXPECT_LE(by_rx[i - 1].rx + by_rx[i - 1].size, by_rx[i].rx);
  auto by_rw = blocks;
  std::sort(by_rw.begin(), by_rw.end(), [](auto& a, auto& b) { return a.rw < b.rw; });
  for (std::size_t i = 1; i < by_rw.size(); ++i) EXPECT_LE(by_rw[i - 1].rw + by_rw[i - 1].size, by_rw[i].rw);
}

TEST(CodeMemory, FreedSpaceIsReused) {
  CodeBlock a = must_allocate(64);
  tramway::text::free_code(a);
  CodeBlock again = must_allocate(64);
  // First fit: the freed range (possibly merged with a smaller hole before it) is taken again.
  EXPECT_LE(again.rx, a.rx);
  EXPECT_GT(again.rx + again.size, a.rx);

  // Filling and freeing a whole arena's worth twice maps no new arena the second time.
  std::vector<CodeBlock> blocks;
  for (int i = 0; i < 1024; ++i) blocks.push_back(must_allocate(256));
  const int mappings = count_code_mappings();
  for (const CodeBlock& b : blocks) tramway::text::free_code(b);
  std::vector<CodeBlock> second;
  for (int i = 0; i < 1024; ++i) second.push_back(must_allocate(256));
  EXPECT_EQ(count_code_mappings(), mappings);
  auto sorted = [](std::vector<CodeBlock> v) {
    std::vector<std::uint8_t*> out;
    for (auto& b : v) out.push_back(b.rx);
    std::sort(out.begin(), out.end());
    return out;
  };
  EXPECT_EQ(sorted(blocks), sorted(second));
}

TEST(CodeMemory, FullWindowFailsWithAMessage) {
  // 6 GiB of reserved address space: +-2 GiB around its middle is entirely mapped.
  constexpr std::size_t kSize = std::size_t{6} << 30;
  void* region = mmap(nullptr, kSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(region, MAP_FAILED);
  const auto middle = static_cast<std::uint8_t*>(region) + kSize / 2;
  auto b = tramway::text::allocate_code_near(middle, 64);
  ASSERT_FALSE(b.ok()) << "allocated at " << static_cast<void*>(b->rx) << " near " << static_cast<void*>(middle);
  const std::string msg = b.status().message();
  EXPECT_NE(msg.find("fully mapped"), std::string::npos) << msg;
  char where[32];
  std::snprintf(where, sizeof where, "%#lx", reinterpret_cast<unsigned long>(middle));
  EXPECT_NE(msg.find(where), std::string::npos) << msg;
  // Near its edge there is room again (just outside the region).
  auto edge = tramway::text::allocate_code_near(region, 64);
  EXPECT_TRUE(edge.ok()) << edge.status().message();
  if (edge.ok()) {
    EXPECT_TRUE(every_byte_in_reach(region, *edge));
  }
  munmap(region, kSize);
}

TEST(CodeMemory, NoMappingIsWritableAndExecutable) {
  std::vector<CodeBlock> blocks;
  for (int i = 0; i < 10; ++i) blocks.push_back(must_allocate(1000));
  auto near = tramway::text::allocate_code_near(reinterpret_cast<const void*>(&function_in_the_executable), 64);
  ASSERT_TRUE(near.ok());
  auto far = tramway::text::allocate_code_near(reinterpret_cast<const void*>(&::getpid), 64);
  ASSERT_TRUE(far.ok());
  EXPECT_GE(count_code_mappings(), 2);
  expect_no_writable_executable_mapping();
}

TEST(CodeMemory, ForkedChildGetsPrivateCode) {
  CodeBlock b = must_allocate(16);
  emit_return_constant(b.rw, 1);
  int to_child[2], to_parent[2];
  ASSERT_EQ(pipe(to_child), 0);
  ASSERT_EQ(pipe(to_parent), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: its write must not reach the parent, and the parent's must not reach it.
    emit_return_constant(b.rw, 2);
    int code = run(b.rx) == 2 ? 0 : 10;
    char c = 'w';
    if (write(to_parent[1], &c, 1) != 1) _exit(11);
    if (read(to_child[0], &c, 1) != 1) _exit(12);  // parent has written 3 meanwhile
    if (run(b.rx) != 2 || b.rx[1] != 2) code = 13;
    _exit(code);
  }
  char c;
  ASSERT_EQ(read(to_parent[0], &c, 1), 1);  // the child has written its byte
  EXPECT_EQ(b.rx[1], 1);
  EXPECT_EQ(run(b.rx), 1u);
  emit_return_constant(b.rw, 3);
  ASSERT_EQ(write(to_child[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(run(b.rx), 3u);
  for (int fd : {to_child[0], to_child[1], to_parent[0], to_parent[1]}) close(fd);
  // The parent's views still alias each other after the fork.
  emit_return_constant(b.rw, 4);
  EXPECT_EQ(run(b.rx), 4u);
  expect_no_writable_executable_mapping();
}

// A fork child's code memory is its own copy, taken at the fork: what the parent writes the
// moment fork() returns in it (a direct slot handed to another ops, say) must not reach the
// child. Before, the child copied the shared views in its own fork handler, after the parent
// had resumed, and caught such writes (a fork child of the lifecycle torture called a slot
// whose state the parent had just set). Repeated, since the old copy raced the parent.
TEST(CodeMemory, AForkChildKeepsItsCodeAsItWasAtTheFork) {
  CodeBlock b = must_allocate(64);
  for (int round = 0; round < 20; ++round) {
    b.rw[0] = 0x11;
    int go[2];
    ASSERT_EQ(pipe(go), 0);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      alarm(20);
      char c;
      if (read(go[0], &c, 1) != 1) _exit(3);
      if (b.rx[0] != 0x11) _exit(1);  // the parent's write reached the child
      b.rw[0] = 0x33;                 // and the child's own writes stay its own
      _exit(b.rx[0] == 0x33 ? 0 : 2);
    }
    b.rw[0] = 0x22;  // at once, while the child may still be in its fork handlers
    ASSERT_EQ(write(go[1], "g", 1), 1);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    close(go[0]);
    close(go[1]);
    ASSERT_TRUE(WIFEXITED(status)) << "round " << round;
    ASSERT_EQ(WEXITSTATUS(status), 0) << "round " << round << (WEXITSTATUS(status) == 1 ? ": the child saw the parent's write" : "");
    EXPECT_EQ(b.rx[0], 0x22);
  }
}

}  // namespace
