// arch/x86_64/relocate.h, the copy: each fixture's run is emitted into an executable buffer,
// within rel32 reach of the fixture (the near allocator detours use) or out of it, and the
// copy is called as if it were the function: it runs the relocated instructions and jumps
// back into the original function behind the run. Results must equal the original's.
#include <dlfcn.h>
#include <elf.h>
#include <gtest/gtest.h>
#include <link.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "relocate_fixtures.h"

namespace {

using tramway::arch::Boundary;
using tramway::arch::emit_relocated;
using Bytes = std::vector<std::uint8_t>;

std::vector<std::pair<std::uint32_t, std::uint32_t>> boundaries(const rl::RelocatedCode& code) {
  std::vector<std::pair<std::uint32_t, std::uint32_t>> out;
  for (const Boundary& b : code.boundaries) out.emplace_back(b.run_offset, b.copy_offset);
  return out;
}
using Map = std::vector<std::pair<std::uint32_t, std::uint32_t>>;

// A relocated fixture, near or far.
struct Relocated {
  rl::Fixture f;
  rl::RelocationPlan plan;
  rl::Buffer buffer;
  rl::RelocatedCode code;
  Relocated(rl::Fixture fx, bool far)
      : f(fx),
        plan(rl::plan_of(fx)),
        buffer(far ? rl::Buffer::far(f) : rl::Buffer::near(f, tramway::arch::max_relocated_size(plan))),
        code(buffer.load(plan)) {}
  long call(long a, long b = 0, long c = 0, long d = 0) const { return buffer.fn()(a, b, c, d); }
  rl::Insn at_copy(std::size_t offset) const { return rl::decode_at(code.bytes, offset, buffer.address()); }
  // The copy's last instruction jumps to the first byte behind the run.
  void expect_jumps_back() const {
    std::size_t o = code.boundaries.empty() ? 0 : code.boundaries.back().copy_offset;
    rl::Insn last;
    for (; o < code.code_length; o += last.insn.length) last = at_copy(o);
    EXPECT_EQ(o, code.code_length);
    EXPECT_EQ(last.insn.mnemonic, ZYDIS_MNEMONIC_JMP);
    if (last.ops[0].type == ZYDIS_OPERAND_TYPE_IMMEDIATE) {
      EXPECT_EQ(last.target, plan.run_end());
    } else {  // through a literal
      std::uint64_t literal;
      std::memcpy(&literal, code.bytes.data() + (last.target - buffer.address()), 8);
      EXPECT_EQ(literal, plan.run_end());
    }
  }
};

TEST(RelocateRun, PlainPrologueIsCopiedVerbatim) {
  Relocated r(RL_FIXTURE(rl_plain), false);
  EXPECT_EQ(Bytes(r.code.bytes.begin(), r.code.bytes.begin() + 6), r.plan.run_bytes);
  EXPECT_EQ(boundaries(r.code), (Map{{0, 0}, {1, 1}, {4, 4}}));
  EXPECT_EQ(r.code.code_length, 11u);  // + jmp rel32 back
  EXPECT_EQ(r.code.bytes.size(), 11u);  // no literal
  r.expect_jumps_back();
  EXPECT_EQ(r.call(41), 42);
  EXPECT_EQ(r.call(41), r.f.fn(41, 0, 0, 0));
  EXPECT_EQ(r.code.copy_offset(4), 4u);
  EXPECT_FALSE(r.code.copy_offset(2).has_value());  // inside `mov rbp,rsp`
}

TEST(RelocateRun, BehindEndbr64) {
  Relocated r(RL_FIXTURE(rl_endbr), false);
  EXPECT_EQ(boundaries(r.code), (Map{{0, 0}, {1, 1}, {4, 4}}));
  r.expect_jumps_back();
  EXPECT_EQ(r.call(40), 42);
}

TEST(RelocateRun, RipRelativeLoadReadsTheSameAddress) {
  Relocated r(RL_FIXTURE(rl_rip_load), false);
  const rl::Insn mov = r.at_copy(0);
  EXPECT_EQ(mov.insn.mnemonic, ZYDIS_MNEMONIC_MOV);
  EXPECT_EQ(mov.target, reinterpret_cast<std::uintptr_t>(&rl_value));
  EXPECT_NE(Bytes(r.code.bytes.begin(), r.code.bytes.begin() + 7), r.plan.run_bytes);  // displacement rewritten
  EXPECT_EQ(r.call(0), 0x1122334455667788);
  rl_value = -5;  // a load, not a constant
  EXPECT_EQ(r.call(0), -5);
  EXPECT_EQ(r.f.fn(0, 0, 0, 0), -5);
  rl_value = 0x1122334455667788;
  r.expect_jumps_back();
}

TEST(RelocateRun, RipRelativeLea) {
  Relocated r(RL_FIXTURE(rl_rip_lea), false);
  EXPECT_EQ(r.call(0), reinterpret_cast<long>(&rl_value));
}

// cmp dword [rip+x], imm32: the immediate follows the displacement in the encoding.
TEST(RelocateRun, RipRelativeCompareWithImmediateBehindTheDisplacement) {
  Relocated r(RL_FIXTURE(rl_rip_cmp), false);
  const rl::Insn cmp = r.at_copy(0);
  EXPECT_EQ(cmp.insn.mnemonic, ZYDIS_MNEMONIC_CMP);
  EXPECT_EQ(cmp.target, reinterpret_cast<std::uintptr_t>(&rl_word));
  EXPECT_EQ(cmp.ops[1].imm.value.u, 0x12345u);
  rl_word = 0x12345;
  EXPECT_EQ(r.call(0), 1);
  rl_word = 0x12346;
  EXPECT_EQ(r.call(0), 0);
  EXPECT_EQ(r.f.fn(0, 0, 0, 0), 0);
}

TEST(RelocateRun, RipRelativeStoreOfAnImmediate) {
  Relocated r(RL_FIXTURE(rl_rip_store), false);
  rl_word = 0;
  EXPECT_EQ(r.call(7), 7);
  EXPECT_EQ(rl_word, 0x5a5a);
}

TEST(RelocateRun, RipRelativeWithLockPrefix) {
  Relocated r(RL_FIXTURE(rl_lock_rip), false);
  const rl::Insn add = r.at_copy(0);
  EXPECT_TRUE(add.insn.attributes & ZYDIS_ATTRIB_HAS_LOCK);
  EXPECT_EQ(add.target, reinterpret_cast<std::uintptr_t>(&rl_word));
  rl_word = 10;
  EXPECT_EQ(r.call(5), 5);
  EXPECT_EQ(rl_word, 15);
}

TEST(RelocateRun, RipRelativeSseAndAvxLoads) {
  for (const rl::Fixture& f : {RL_FIXTURE(rl_rip_sse), RL_FIXTURE(rl_rip_avx)}) {
    Relocated r(f, false);
    EXPECT_EQ(r.at_copy(0).insn.length, 8);
    EXPECT_EQ(r.at_copy(0).target, reinterpret_cast<std::uintptr_t>(&rl_value));
    rl_value = 0x0102030405060708;
    EXPECT_EQ(r.call(0), 0x0102030405060708);
  }
  rl_value = 0x1122334455667788;
}

TEST(RelocateRun, IndirectTailJumpThroughRipRelativePointer) {
  Relocated r(RL_FIXTURE(rl_jmp_riprel), false);
  EXPECT_EQ(r.at_copy(0).target, reinterpret_cast<std::uintptr_t>(&rl_fnptr));
  EXPECT_EQ(r.call(21), 42);
}

// mov rax, fs:0x28 does not depend on its address: copied byte for byte.
TEST(RelocateRun, StackProtectorCanaryLoadIsCopiedVerbatim) {
  Relocated r(RL_FIXTURE(rl_fs_canary), false);
  EXPECT_EQ(r.plan.run_length(), 13u);
  EXPECT_EQ(Bytes(r.code.bytes.begin(), r.code.bytes.begin() + 13), r.plan.run_bytes);
  EXPECT_EQ(r.call(0), r.f.fn(0, 0, 0, 0));
}

TEST(RelocateRun, JccRel8ToOutsideBecomesRel32) {
  Relocated r(RL_FIXTURE(rl_jcc_out), false);
  EXPECT_EQ(boundaries(r.code), (Map{{0, 0}, {2, 2}, {4, 8}}));  // je grew from 2 to 6 bytes
  const rl::Insn je = r.at_copy(2);
  EXPECT_EQ(je.insn.mnemonic, ZYDIS_MNEMONIC_JZ);
  EXPECT_EQ(je.insn.length, 6);
  EXPECT_EQ(je.insn.raw.imm[0].size, 32);
  EXPECT_EQ(je.target, r.f.address + 10);
  r.expect_jumps_back();
  EXPECT_EQ(r.call(5), 1);  // not taken
  EXPECT_EQ(r.call(0), 2);  // taken
  EXPECT_EQ(r.f.fn(0, 0, 0, 0), 2);
}

// jg back to the run's second instruction: a loop wholly inside the run, run in the copy.
TEST(RelocateRun, JccToInsideTheRunLandsInTheCopy) {
  Relocated r(RL_FIXTURE(rl_jcc_in), false);
  const rl::Insn jg = r.at_copy(*r.code.copy_offset(3));
  EXPECT_EQ(jg.insn.mnemonic, ZYDIS_MNEMONIC_JNLE);
  EXPECT_EQ(jg.target, r.buffer.address() + *r.code.copy_offset(1));
  for (long a : {1L, 10L, 100L}) EXPECT_EQ(r.call(a, 3), r.f.fn(a, 3, 0, 0)) << a;
  EXPECT_EQ(static_cast<int>(r.call(10, 3)), -2);  // eax
}

// A branch to the run's first byte leaves the copy for the function's entry, where any
// other branch to the entry goes too (through the detour's jmp once it is installed).
TEST(RelocateRun, BranchToTheRunsFirstByteReentersTheFunction) {
  Relocated r(RL_FIXTURE(rl_jcc_entry), false);
  const rl::Insn jg = r.at_copy(3);
  EXPECT_EQ(jg.insn.mnemonic, ZYDIS_MNEMONIC_JNLE);
  EXPECT_EQ(jg.target, r.f.address);
  EXPECT_EQ(r.call(5), 0);
  EXPECT_EQ(r.call(-3), -4 & 0xffffffffL);
}

// jrcxz exists only with rel8: jrcxz L1; jmp L2; L1: jmp rel32 <copy of the target>; L2:
TEST(RelocateRun, JrcxzToInsideTheRun) {
  Relocated r(RL_FIXTURE(rl_jrcxz_in), false);
  EXPECT_EQ(boundaries(r.code), (Map{{0, 0}, {1, 1}, {3, 10}, {4, 11}}));  // 2 + 2 + 5
  EXPECT_EQ(r.at_copy(1).insn.mnemonic, ZYDIS_MNEMONIC_JRCXZ);
  EXPECT_EQ(r.at_copy(5).target, r.buffer.address() + 11);  // the copy of `add eax,100`
  EXPECT_EQ(r.call(1, 2, 0, 0), 101);                       // taken
  EXPECT_EQ(r.call(1, 2, 0, 9), 102);                       // not taken
  EXPECT_EQ(r.f.fn(1, 2, 0, 0), 101);
}

TEST(RelocateRun, LoopToOutside) {
  Relocated r(RL_FIXTURE(rl_loop_out), false);
  EXPECT_EQ(r.at_copy(5).target, r.f.address + 6);  // L1: jmp rel32 to the loop's target
  EXPECT_EQ(r.call(10, 0, 0, 1), 10);  // rcx becomes 0: falls through
  EXPECT_EQ(r.call(10, 0, 0, 5), 17);  // taken
  EXPECT_EQ(r.f.fn(10, 0, 0, 5), 17);
  r.expect_jumps_back();
}

TEST(RelocateRun, JmpRel8ToInsideTheRun) {
  Relocated r(RL_FIXTURE(rl_jmp_in), false);
  const rl::Insn jmp = r.at_copy(1);
  EXPECT_EQ(jmp.insn.length, 5);
  EXPECT_EQ(jmp.target, r.buffer.address() + *r.code.copy_offset(4));
  EXPECT_EQ(r.call(1, 1000), 6);
}

TEST(RelocateRun, JmpRel8ToOutsideBecomesRel32) {
  Relocated r(RL_FIXTURE(rl_jmp_out), false);
  const rl::Insn jmp = r.at_copy(2);
  EXPECT_EQ(jmp.insn.length, 5);
  EXPECT_EQ(jmp.target, r.f.address + 8);
  EXPECT_EQ(r.call(1), 8);
}

// call f becomes push <run end>; jmp f: the callee returns behind the run in the function.
TEST(RelocateRun, FinalCallBecomesPushOfTheReturnAddressAndJmp) {
  Relocated r(RL_FIXTURE(rl_call_last), false);
  const rl::Insn push = r.at_copy(4);
  EXPECT_EQ(push.insn.mnemonic, ZYDIS_MNEMONIC_PUSH);
  if (r.plan.run_end() > 0x7fffffff) {  // a PIE: push [rip+literal]
    EXPECT_EQ(push.ops[0].type, ZYDIS_OPERAND_TYPE_MEMORY);
    std::uint64_t literal;
    std::memcpy(&literal, r.code.bytes.data() + (push.target - r.buffer.address()), 8);
    EXPECT_EQ(literal, r.f.address + 9);
    EXPECT_EQ(r.code.bytes.size(), ((r.code.code_length + 7) & ~7u) + 8);
  }
  const rl::Insn jmp = r.at_copy(4 + push.insn.length);
  EXPECT_EQ(jmp.insn.mnemonic, ZYDIS_MNEMONIC_JMP);
  EXPECT_EQ(jmp.target, rl::address_of(&rl_callee));
  rl_seen_ret = 0;
  EXPECT_EQ(r.call(20), 41);
  EXPECT_EQ(rl_seen_ret, r.f.address + 9);  // not in the detour
}

TEST(RelocateRun, FinalIndirectCalls) {
  {
    Relocated r(RL_FIXTURE(rl_call_reg), false);
    rl_seen_ret = 0;
    EXPECT_EQ(r.call(5, reinterpret_cast<long>(&rl_callee)), 11);
    EXPECT_EQ(rl_seen_ret, r.f.address + 6);
  }
  {
    Relocated r(RL_FIXTURE(rl_call_riprel), false);
    rl_seen_ret = 0;
    EXPECT_EQ(r.call(5), 11);
    EXPECT_EQ(rl_seen_ret, r.f.address + 10);
  }
  {  // call [rsp+8]: after the push of the return address the operand is [rsp+16]
    Relocated r(RL_FIXTURE(rl_call_rsp), false);
    const rl::Insn jmp = r.at_copy(2 + r.at_copy(2).insn.length);
    EXPECT_EQ(jmp.insn.mnemonic, ZYDIS_MNEMONIC_JMP);
    EXPECT_EQ(jmp.ops[0].mem.disp.value, 16);
    rl_seen_ret = 0;
    EXPECT_EQ(r.call(5, reinterpret_cast<long>(&rl_callee)), 11);
    EXPECT_EQ(rl_seen_ret, r.f.address + 6);
  }
}

TEST(RelocateRun, SwitchBehindTheRun) {
  Relocated r(RL_FIXTURE(rl_switch_ok), false);
  EXPECT_EQ(r.call(0), 10);
  EXPECT_EQ(r.call(1), 20);
  EXPECT_EQ(r.call(2), 30);
  EXPECT_EQ(r.call(5), 105);
}

// Real -O2 prologues: Debian's own libz.so.1 (tail calls through the PLT, a rip-relative
// lea, the loops of adler32_z and crc32_z), each copy called as the function.
TEST(RelocateRun, DebianLibz) {
  void* z = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!z) GTEST_SKIP() << "libz.so.1 is not installed: " << dlerror();
  const std::vector<std::uint8_t> data(1000, 0x5a);
  const long buf = reinterpret_cast<long>(data.data());
  struct Call {
    const char* name;
    long a, b, c;
  };
  for (const Call& c : {Call{"adler32", 1, buf, 1000}, Call{"adler32_z", 1, buf, 1000}, Call{"crc32", 0, buf, 1000},
                        Call{"crc32_z", 0, buf, 1000}, Call{"zlibVersion", 0, 0, 0},
                        Call{"compressBound", 12345, 0, 0}}) {
    SCOPED_TRACE(c.name);
    void* fn = dlsym(z, c.name);
    ASSERT_NE(fn, nullptr);
    Dl_info info;
    ElfW(Sym)* sym = nullptr;
    ASSERT_NE(dladdr1(fn, &info, reinterpret_cast<void**>(&sym), RTLD_DL_SYMENT), 0);
    ASSERT_NE(sym, nullptr);
    const rl::Fixture f{reinterpret_cast<std::uintptr_t>(fn), {static_cast<const std::uint8_t*>(fn), sym->st_size},
                        reinterpret_cast<rl::Fn>(fn)};
    Relocated r(f, false);
    ASSERT_FALSE(r.code.bytes.empty());
    EXPECT_EQ(r.call(c.a, c.b, c.c), f.fn(c.a, c.b, c.c, 0));
  }
  dlclose(z);
}

// ---- a detour out of rel32 reach of the function and its data -----------------------------

TEST(RelocateFar, RipRelativeOperandOutOfReachIsRefused) {
  const rl::Fixture f = RL_FIXTURE(rl_rip_load);
  rl::Buffer far = rl::Buffer::far(f);
  auto code = emit_relocated(rl::plan_of(f), far.address());
  ASSERT_FALSE(code.ok());
  EXPECT_NE(code.status().message().find("out of rel32 reach of the detour"), std::string::npos)
      << code.status().message();
  EXPECT_NE(code.status().message().find("`mov"), std::string::npos) << code.status().message();
}

TEST(RelocateFar, LeaOutOfReachBecomesMovOfTheAddress) {
  Relocated r(RL_FIXTURE(rl_rip_lea), true);
  EXPECT_EQ(r.at_copy(0).insn.mnemonic, ZYDIS_MNEMONIC_MOV);
  EXPECT_EQ(r.call(0), reinterpret_cast<long>(&rl_value));
  r.expect_jumps_back();  // through a literal
}

TEST(RelocateFar, JccAndTheJumpBackGoThroughLiterals) {
  Relocated r(RL_FIXTURE(rl_jcc_out), true);
  // je L1 (rel8); jmp L2 (rel8); L1: jmp [rip+literal]; L2:
  EXPECT_EQ(boundaries(r.code), (Map{{0, 0}, {2, 2}, {4, 12}}));
  EXPECT_EQ(r.at_copy(2).insn.length, 2);
  EXPECT_EQ(r.at_copy(6).ops[0].type, ZYDIS_OPERAND_TYPE_MEMORY);
  EXPECT_EQ(r.call(5), 1);
  EXPECT_EQ(r.call(0), 2);
  r.expect_jumps_back();
}

TEST(RelocateFar, FinalCallAndLoopGoThroughLiterals) {
  {
    Relocated r(RL_FIXTURE(rl_call_last), true);
    rl_seen_ret = 0;
    EXPECT_EQ(r.call(20), 41);
    EXPECT_EQ(rl_seen_ret, r.f.address + 9);
  }
  {
    Relocated r(RL_FIXTURE(rl_loop_out), true);
    EXPECT_EQ(r.call(10, 0, 0, 1), 10);
    EXPECT_EQ(r.call(10, 0, 0, 5), 17);
  }
  {  // a branch inside the run stays a rel32 inside the copy
    Relocated r(RL_FIXTURE(rl_jrcxz_in), true);
    EXPECT_EQ(r.call(1, 2, 0, 0), 101);
    EXPECT_EQ(r.call(1, 2, 0, 9), 102);
  }
}

// A return address below 2 GiB (a non-PIE executable) fits push imm32, which sign-extends;
// at a made-up address, checked as bytes.
TEST(RelocateEmit, ReturnAddressBelow2GiBIsPushedAsAnImmediate) {
  constexpr std::uintptr_t kFn = 0x401000, kDetour = 0x500000;
  const Bytes code = {0x48, 0x83, 0xec, 0x08,          // sub rsp, 8
                      0xe8, 0xf7, 0x0f, 0x00, 0x00,    // call 0x402000
                      0x48, 0x83, 0xc4, 0x08, 0xc3};   // add rsp, 8; ret
  auto plan = tramway::arch::plan_relocation(kFn, code);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  auto out = emit_relocated(*plan, kDetour);
  ASSERT_TRUE(out.ok()) << out.status().message();
  EXPECT_EQ(Bytes(out->bytes.begin(), out->bytes.begin() + 4), Bytes(code.begin(), code.begin() + 4));
  const rl::Insn push = rl::decode_at(out->bytes, 4, kDetour);
  EXPECT_EQ(push.insn.mnemonic, ZYDIS_MNEMONIC_PUSH);
  EXPECT_EQ(push.ops[0].type, ZYDIS_OPERAND_TYPE_IMMEDIATE);
  EXPECT_EQ(push.ops[0].imm.value.u, 0x401009u);
  const rl::Insn jmp = rl::decode_at(out->bytes, 4 + push.insn.length, kDetour);
  EXPECT_EQ(jmp.target, 0x402000u);
  EXPECT_EQ(out->bytes.size(), out->code_length);  // no literal
}

// A jcc rel32 is 6 bytes long: at the last detour address that reaches its target backwards
// it stays a jcc rel32, one byte further it goes through a literal.
TEST(RelocateEmit, JccAtTheEdgeOfRel32Reach) {
  constexpr std::uintptr_t kFn = 0x10000000, kTarget = kFn + 0x14;
  const Bytes code = {0x85, 0xff,                       // test edi, edi
                      0x74, 0x10,                       // je kFn+0x14
                      0xb8, 0x01, 0x00, 0x00, 0x00,     // mov eax, 1
                      0xc3};
  auto plan = tramway::arch::plan_relocation(kFn, code);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  // The je at detour+2 ends at detour+8: rel32 = kTarget - (detour + 8) >= INT32_MIN.
  const std::uintptr_t last = kTarget + (std::uintptr_t{1} << 31) - 8;
  auto in_reach = emit_relocated(*plan, last);
  ASSERT_TRUE(in_reach.ok()) << in_reach.status().message();
  const rl::Insn je = rl::decode_at(in_reach->bytes, 2, last);
  EXPECT_EQ(je.insn.length, 6);
  EXPECT_EQ(je.target, kTarget);
  auto beyond = emit_relocated(*plan, last + 1);
  ASSERT_TRUE(beyond.ok()) << beyond.status().message();
  EXPECT_EQ(rl::decode_at(beyond->bytes, 2, last + 1).insn.length, 2);  // je L1; jmp L2; L1: jmp [rip+literal]
  EXPECT_EQ(beyond->boundaries[2].copy_offset, 12u);
}

// loope, loopne and jecxz (rel8 only, jecxz with an address-size prefix) keep their form
// and condition; at a made-up address, checked as bytes.
TEST(RelocateEmit, LoopFamilyKeepsItsForm) {
  constexpr std::uintptr_t kFn = 0x401000, kDetour = 0x500000;
  const Bytes code = {0xe1, 0x10,         // 0: loope 0x401012
                      0xe0, 0x20,         // 2: loopne 0x401024
                      0x67, 0xe3, 0x30,   // 4: jecxz 0x401037
                      0xc3};
  auto plan = tramway::arch::plan_relocation(kFn, code);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  auto out = emit_relocated(*plan, kDetour);
  ASSERT_TRUE(out.ok()) << out.status().message();
  struct Expect {
    ZydisMnemonic mnemonic;
    std::uintptr_t target;
  };
  const Expect expect[] = {{ZYDIS_MNEMONIC_LOOPE, 0x401012}, {ZYDIS_MNEMONIC_LOOPNE, 0x401024},
                           {ZYDIS_MNEMONIC_JECXZ, 0x401037}};
  ASSERT_EQ(out->boundaries.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    SCOPED_TRACE(i);
    const std::size_t o = out->boundaries[i].copy_offset;
    const rl::Insn loop = rl::decode_at(out->bytes, o, kDetour);  // loop L1; jmp L2; L1: jmp target; L2:
    EXPECT_EQ(loop.insn.mnemonic, expect[i].mnemonic);
    EXPECT_EQ(loop.insn.length, code[plan->instructions[i].offset] == 0x67 ? 3 : 2);
    const std::size_t l1 = o + loop.insn.length + 2;
    EXPECT_EQ(loop.target, kDetour + l1);
    const rl::Insn skip = rl::decode_at(out->bytes, o + loop.insn.length, kDetour);
    EXPECT_EQ(skip.insn.mnemonic, ZYDIS_MNEMONIC_JMP);
    EXPECT_EQ(skip.target, kDetour + l1 + 5);
    EXPECT_EQ(rl::decode_at(out->bytes, l1, kDetour).target, expect[i].target);
  }
}

}  // namespace
