// The assembly fixtures of relocate_fixtures.S and the helpers test_relocate*.cc share: a
// fixture's bytes within its symbol bounds, and executable buffers near and far from it.
#pragma once

#include <Zydis/Zydis.h>
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "arch/x86_64/insn.h"
#include "arch/x86_64/relocate.h"
#include "common/format.h"
#include "tramway/text/code_memory.h"

#define RL_FIXTURES(X)                                                                                   \
  X(rl_plain) X(rl_endbr) X(rl_rip_load) X(rl_rip_lea) X(rl_rip_cmp) X(rl_rip_store) X(rl_jcc_out)       \
  X(rl_jcc_in) X(rl_jrcxz_in) X(rl_loop_out) X(rl_jmp_in) X(rl_jmp_out) X(rl_call_last) X(rl_call_reg) \
  X(rl_call_riprel) X(rl_call_rsp) X(rl_callee) X(rl_call_early) X(rl_syscall) X(rl_int80) X(rl_int3)   \
  X(rl_branch_in) X(rl_branch_mid) X(rl_lea_in) X(rl_short) X(rl_short_endbr) X(rl_undecodable_run)     \
  X(rl_undecodable_later) X(rl_switch_ok) X(rl_switch_in) X(rl_jcc_entry) \
  X(rl_lock_rip) X(rl_rip_sse) X(rl_rip_avx) X(rl_jmp_riprel) X(rl_fs_canary)

extern "C" {
#define RL_DECLARE(name) long name(long, long, long, long); extern const std::uint8_t name##_end[];
RL_FIXTURES(RL_DECLARE)
#undef RL_DECLARE
long rl_call_stepped(long (*fn)(long, long, long, long), long a, long b, long c, long d);
extern std::int64_t rl_value;
extern std::int32_t rl_word;
extern std::uintptr_t rl_seen_ret;
extern void* rl_fnptr;
}

namespace rl {

using Fn = long (*)(long, long, long, long);
using tramway::arch::RelocatedCode;
using tramway::arch::RelocationPlan;

struct Fixture {
  std::uintptr_t address;
  std::span<const std::uint8_t> code;  // the symbol's bytes
  Fn fn;
};
inline Fixture fixture(Fn fn, const std::uint8_t* end) {
  const auto a = reinterpret_cast<std::uintptr_t>(fn);
  return {a, {reinterpret_cast<const std::uint8_t*>(a), reinterpret_cast<std::uintptr_t>(end) - a}, fn};
}
#define RL_FIXTURE(name) ::rl::fixture(&name, name##_end)

inline std::uintptr_t address_of(Fn fn) { return reinterpret_cast<std::uintptr_t>(fn); }

// The plan of a fixture that must be relocatable.
inline RelocationPlan plan_of(const Fixture& f) {
  auto plan = tramway::arch::plan_relocation(f.address, f.code);
  EXPECT_TRUE(plan.ok()) << plan.status().message();
  return plan.ok() ? *plan : RelocationPlan{};
}

// One decoded instruction of emitted code.
struct Insn {
  ZydisDecodedInstruction insn;
  ZydisDecodedOperand ops[ZYDIS_MAX_OPERAND_COUNT];
  std::uintptr_t target = 0;  // absolute target of a relative branch or rip-relative operand
};
inline Insn decode_at(std::span<const std::uint8_t> bytes, std::size_t offset, std::uintptr_t base) {
  Insn d{};
  ZydisDecoder decoder;
  ZydisDecoderInit(&decoder, ZYDIS_MACHINE_MODE_LONG_64, ZYDIS_STACK_WIDTH_64);
  EXPECT_TRUE(ZYAN_SUCCESS(
      ZydisDecoderDecodeFull(&decoder, bytes.data() + offset, bytes.size() - offset, &d.insn, d.ops)));
  for (std::size_t i = 0; i < d.insn.operand_count_visible; ++i) {
    const bool rel = (d.ops[i].type == ZYDIS_OPERAND_TYPE_IMMEDIATE && d.ops[i].imm.is_relative) ||
                     (d.ops[i].type == ZYDIS_OPERAND_TYPE_MEMORY && d.ops[i].mem.base == ZYDIS_REGISTER_RIP);
    if (rel) ZydisCalcAbsoluteAddress(&d.insn, &d.ops[i], base + offset, &d.target);
  }
  return d;
}

// Where the copy runs: a code block within rel32 reach of the fixture (the near allocator
// the detours use), or a private mapping out of rel32 reach of it and of its data.
class Buffer {
 public:
  static Buffer near(const Fixture& f, std::size_t size) {
    Buffer b;
    auto block = tramway::text::allocate_code_near(reinterpret_cast<const void*>(f.address), size);
    EXPECT_TRUE(block.ok()) << block.status().message();
    if (block.ok()) b.block_ = *block;
    return b;
  }
  static Buffer far(const Fixture& f) {
    Buffer b;
    const std::uintptr_t page = f.address & ~std::uintptr_t{0xfff};
    for (std::uintptr_t gib : {8, 12, 16, 24, 32}) {
      for (const std::uintptr_t hint : {page + (gib << 30), page - (gib << 30)}) {
        void* p = mmap(reinterpret_cast<void*>(hint), 4096, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == MAP_FAILED) continue;
        if (reinterpret_cast<std::uintptr_t>(p) == hint) {
          b.far_ = static_cast<std::uint8_t*>(p);
          return b;
        }
        munmap(p, 4096);
      }
    }
    ADD_FAILURE() << "no free page 8 to 32 GiB away from the fixture";
    return b;
  }
  Buffer() = default;
  Buffer(Buffer&& o) noexcept : block_(o.block_), far_(o.far_) { o.block_ = {}, o.far_ = nullptr; }
  Buffer& operator=(Buffer&&) = delete;
  ~Buffer() {
    if (block_.rx) tramway::text::free_code(block_);
    if (far_) munmap(far_, 4096);
  }

  std::uintptr_t address() const { return reinterpret_cast<std::uintptr_t>(far_ ? far_ : block_.rx); }
  // Emits the plan's copy here; the copy is then callable as the function.
  RelocatedCode load(const RelocationPlan& plan) {
    auto code = tramway::arch::emit_relocated(plan, address());
    EXPECT_TRUE(code.ok()) << code.status().message();
    if (!code.ok()) return {};
    EXPECT_LE(code->bytes.size(), tramway::arch::max_relocated_size(plan));
    if (far_) {
      EXPECT_LE(code->bytes.size(), 4096u);
      std::memcpy(far_, code->bytes.data(), code->bytes.size());
      EXPECT_EQ(mprotect(far_, 4096, PROT_READ | PROT_EXEC), 0);
    } else {
      EXPECT_LE(code->bytes.size(), block_.size);
      std::memcpy(block_.rw, code->bytes.data(), code->bytes.size());
    }
    loaded_ = true;
    return *code;
  }
  // The copy, entered as the function: it runs the run's relocated instructions, then jumps
  // back to the original function behind the run.
  Fn fn() const {
    EXPECT_TRUE(loaded_);
    return reinterpret_cast<Fn>(address());
  }

 private:
  tramway::text::CodeBlock block_;
  std::uint8_t* far_ = nullptr;
  bool loaded_ = false;
};

}  // namespace rl
