// arch/x86_64: the encodings tramway writes, the analysis of what it replaces, and the int3
// emulator that carries a trapped thread past a site.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "arch/x86_64/emulate.h"
#include "arch/x86_64/insn.h"

namespace {

using tramway::arch::Emulation;
using tramway::arch::Insn5;
using Bytes = std::vector<std::uint8_t>;

constexpr std::uintptr_t kSite = 0x5555'0000'1000;

std::int32_t rel32_of(const Insn5& insn) {
  std::int32_t rel;
  std::memcpy(&rel, &insn[1], 4);
  return rel;
}

// ---- encodings ----------------------------------------------------------------------------

TEST(Encoding, JmpAndCallBytes) {
  const auto jmp = tramway::arch::encode_jmp(kSite, kSite + 0x1234);
  ASSERT_TRUE(jmp.has_value());
  EXPECT_EQ(*jmp, (Insn5{0xe9, 0x2f, 0x12, 0x00, 0x00}));  // rel = 0x1234 - 5

  const auto call = tramway::arch::encode_call(kSite, kSite - 0x10);
  ASSERT_TRUE(call.has_value());
  EXPECT_EQ((*call)[0], 0xe8);
  EXPECT_EQ(rel32_of(*call), -0x15);  // backwards, from the end of the instruction

  // A jmp to the next instruction is rel 0.
  EXPECT_EQ(*tramway::arch::encode_jmp(kSite, kSite + 5), (Insn5{0xe9, 0, 0, 0, 0}));
}

TEST(Encoding, Rel32ReachLimits) {
  const std::uintptr_t next = kSite + 5;  // rel32 is relative to the end of the instruction
  const std::uintptr_t max_fwd = next + INT32_MAX;
  const std::uintptr_t max_back = next - (std::uintptr_t{1} << 31);

  for (auto encode : {tramway::arch::encode_jmp, tramway::arch::encode_call}) {
    const auto fwd = encode(kSite, max_fwd);
    ASSERT_TRUE(fwd.has_value());
    EXPECT_EQ(rel32_of(*fwd), INT32_MAX);
    EXPECT_FALSE(encode(kSite, max_fwd + 1).has_value());

    const auto back = encode(kSite, max_back);
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(rel32_of(*back), INT32_MIN);
    EXPECT_FALSE(encode(kSite, max_back - 1).has_value());
  }
  EXPECT_TRUE(tramway::arch::rel32_reaches(kSite, max_fwd));
  EXPECT_FALSE(tramway::arch::rel32_reaches(kSite, max_fwd + 1));
  EXPECT_TRUE(tramway::arch::rel32_reaches(kSite, max_back));
  EXPECT_FALSE(tramway::arch::rel32_reaches(kSite, max_back - 1));
  // Far apart in the address space, as an executable and libc usually are.
  EXPECT_FALSE(tramway::arch::rel32_reaches(0x5555'0000'0000, 0x7fff'0000'0000));
  EXPECT_FALSE(tramway::arch::rel32_reaches(0x7fff'0000'0000, 0x5555'0000'0000));
}

TEST(Encoding, FixedForms) {
  EXPECT_EQ(tramway::arch::kNop5, (Insn5{0x0f, 0x1f, 0x44, 0x00, 0x00}));
  EXPECT_EQ(tramway::arch::kRetPadded, (Insn5{0xc3, 0xcc, 0xcc, 0xcc, 0xcc}));
  EXPECT_EQ(tramway::arch::kRet0Padded, (Insn5{0x31, 0xc0, 0xc3, 0xcc, 0xcc}));

  auto nop = tramway::arch::emulation_for(kSite, tramway::arch::kNop5);
  ASSERT_TRUE(nop.ok()) << nop.status().message();
  EXPECT_EQ(nop->kind, Emulation::kNop);
  EXPECT_EQ(nop->length, 5);

  auto ret = tramway::arch::emulation_for(kSite, tramway::arch::kRetPadded);
  ASSERT_TRUE(ret.ok()) << ret.status().message();
  EXPECT_EQ(ret->kind, Emulation::kRet);
  EXPECT_EQ(ret->length, 1);

  auto ret0 = tramway::arch::emulation_for(kSite, tramway::arch::kRet0Padded);
  ASSERT_TRUE(ret0.ok()) << ret0.status().message();
  EXPECT_EQ(ret0->kind, Emulation::kRetZero);
}

// ---- emulation_for --------------------------------------------------------------------------

TEST(EmulationFor, EveryRecommendedNopForm) {
  // Intel SDM "Recommended multi-byte sequence of NOP instruction", 1 to 9 bytes, and the
  // 2-byte xchg form.
  const std::vector<Bytes> nops = {
      {0x90},
      {0x66, 0x90},
      {0x0f, 0x1f, 0x00},
      {0x0f, 0x1f, 0x40, 0x00},
      {0x0f, 0x1f, 0x44, 0x00, 0x00},
      {0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00},
      {0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00},
      {0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00},
      {0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00},
  };
  for (const Bytes& b : nops) {
    auto e = tramway::arch::emulation_for(kSite, b);
    ASSERT_TRUE(e.ok()) << tramway::arch::disassemble(kSite, b) << ": " << e.status().message();
    EXPECT_EQ(e->kind, Emulation::kNop) << b.size();
    EXPECT_EQ(e->length, b.size());
  }
}

TEST(EmulationFor, JmpRel8BothDirections) {
  auto fwd = tramway::arch::emulation_for(kSite, Bytes{0xeb, 0x10});
  ASSERT_TRUE(fwd.ok()) << fwd.status().message();
  EXPECT_EQ(fwd->kind, Emulation::kJmp);
  EXPECT_EQ(fwd->length, 2);
  EXPECT_EQ(fwd->target, kSite + 2 + 0x10);

  auto back = tramway::arch::emulation_for(kSite, Bytes{0xeb, 0xf0});
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->target, kSite + 2 - 0x10);
}

TEST(EmulationFor, JmpAndCallRel32MatchTheEncoder) {
  for (std::uintptr_t to : {kSite + 0x12345, kSite - 0x777, kSite + 5}) {
    auto jmp = tramway::arch::emulation_for(kSite, *tramway::arch::encode_jmp(kSite, to));
    ASSERT_TRUE(jmp.ok()) << jmp.status().message();
    EXPECT_EQ(jmp->kind, Emulation::kJmp);
    EXPECT_EQ(jmp->length, 5);
    EXPECT_EQ(jmp->target, to);

    auto call = tramway::arch::emulation_for(kSite, *tramway::arch::encode_call(kSite, to));
    ASSERT_TRUE(call.ok()) << call.status().message();
    EXPECT_EQ(call->kind, Emulation::kCall);
    EXPECT_EQ(call->length, 5);
    EXPECT_EQ(call->target, to);
  }
}

TEST(EmulationFor, RetAndReturnZero) {
  auto ret = tramway::arch::emulation_for(kSite, Bytes{0xc3});
  ASSERT_TRUE(ret.ok()) << ret.status().message();
  EXPECT_EQ(ret->kind, Emulation::kRet);

  auto ret0 = tramway::arch::emulation_for(kSite, Bytes{0x31, 0xc0, 0xc3});
  ASSERT_TRUE(ret0.ok()) << ret0.status().message();
  EXPECT_EQ(ret0->kind, Emulation::kRetZero);
}

TEST(EmulationFor, RejectsWhatItCannotEmulateWithTheInstructionText) {
  struct Case {
    Bytes bytes;
    const char* text;  // what the message must quote
  };
  const std::vector<Case> cases = {
      {{0x48, 0x89, 0xc3}, "mov"},               // mov %rax,%rbx
      {{0xb8, 0x01, 0x00, 0x00, 0x00}, "mov"},   // mov $1,%eax
      {{0xff, 0xe0}, "jmp"},                     // jmp *%rax: not relative
      {{0xff, 0xd0}, "call"},                    // call *%rax
      {{0xc2, 0x08, 0x00}, "ret"},               // ret $8: pops more than the return address
      {{0x31, 0xc0, 0x90}, "xor"},               // xor eax,eax not followed by ret
      {{0x74, 0x05}, "j"},                       // conditional jump
      {{0xcc}, "int3"},
  };
  for (const Case& c : cases) {
    auto e = tramway::arch::emulation_for(kSite, c.bytes);
    ASSERT_FALSE(e.ok()) << tramway::arch::disassemble(kSite, c.bytes);
    EXPECT_NE(e.status().message().find("cannot emulate"), std::string::npos) << e.status().message();
    EXPECT_NE(e.status().message().find(c.text), std::string::npos) << e.status().message();
  }
}

TEST(EmulationFor, RejectsBytesThatDoNotDecode) {
  auto truncated = tramway::arch::emulation_for(kSite, Bytes{0xe9, 0x00, 0x00});
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.status().message().find("does not decode"), std::string::npos);
  EXPECT_NE(truncated.status().message().find("e9 00 00"), std::string::npos) << truncated.status().message();
  EXPECT_FALSE(tramway::arch::emulation_for(kSite, Bytes{}).ok());
}

// ---- first_instruction / disassemble ----------------------------------------------------------

TEST(FirstInstruction, LengthAndFallThrough) {
  struct Case {
    Bytes bytes;
    std::size_t length;
    bool falls_through;
  };
  const std::vector<Case> cases = {
      {{0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3}, 5, true},  // nop5, then more code
      {{0x90, 0x90, 0x90, 0x90, 0x90}, 1, true},        // GCC's 1-byte nops
      {{0xc3, 0xcc, 0xcc, 0xcc, 0xcc}, 1, false},       // ret
      {{0xe9, 0x00, 0x00, 0x00, 0x00}, 5, false},       // jmp rel32
      {{0xeb, 0x03, 0xcc, 0xcc, 0xcc}, 2, false},       // jmp rel8
      {{0xff, 0xe0}, 2, false},                         // jmp *%rax
      {{0xe8, 0x00, 0x00, 0x00, 0x00}, 5, true},        // a call returns to the next byte
      {{0x74, 0x05}, 2, true},                          // a conditional jump may fall through
      {{0xcc}, 1, false},                               // int3
      {{0x0f, 0x0b}, 2, false},                         // ud2
      {{0xf4}, 1, false},                               // hlt
      {{0x48, 0x89, 0xc3, 0xc3}, 3, true},              // mov %rax,%rbx
  };
  for (const Case& c : cases) {
    auto f = tramway::arch::first_instruction(kSite, c.bytes);
    ASSERT_TRUE(f.ok()) << tramway::arch::disassemble(kSite, c.bytes) << ": " << f.status().message();
    EXPECT_EQ(f->length, c.length) << tramway::arch::disassemble(kSite, c.bytes);
    EXPECT_EQ(f->falls_through, c.falls_through) << tramway::arch::disassemble(kSite, c.bytes);
  }
  auto bad = tramway::arch::first_instruction(kSite, Bytes{0xe8, 0x00});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("do not decode"), std::string::npos) << bad.status().message();
}

TEST(Disassemble, AttText) {
  const std::string nop5 = tramway::arch::disassemble(kSite, tramway::arch::kNop5);
  EXPECT_EQ(nop5.rfind("nop", 0), 0u) << nop5;
  EXPECT_NE(nop5.find("(%rax,%rax,1)"), std::string::npos) << nop5;
  EXPECT_EQ(tramway::arch::disassemble(kSite, Bytes{0xc3}), "ret");
  EXPECT_EQ(tramway::arch::disassemble(kSite, Bytes{0x48, 0x89, 0xc3}), "mov %rax, %rbx");
  // Relative targets are printed as absolute addresses from the given runtime address.
  const std::string jmp = tramway::arch::disassemble(0x1000, *tramway::arch::encode_jmp(0x1000, 0x2345));
  EXPECT_NE(jmp.find("jmp"), std::string::npos) << jmp;
  EXPECT_NE(jmp.find("2345"), std::string::npos) << jmp;
  const std::string bad = tramway::arch::disassemble(kSite, Bytes{0xe9, 0x01});
  EXPECT_EQ(bad, "(undecodable: e9 01)");
}

// ---- the emulator ---------------------------------------------------------------------------------

// A ucontext_t as the kernel hands it to the SIGTRAP handler: RIP just past the int3 does
// not matter to emulate() (it is given the site), RSP points into a fake stack.
class Emulator : public ::testing::Test {
 protected:
  void SetUp() override {
    std::memset(&uc_, 0, sizeof uc_);
    for (std::size_t i = 0; i < stack_.size(); ++i) stack_[i] = 0x1111'0000 + i;
    sp_ = reinterpret_cast<std::uintptr_t>(&stack_[32]);
    uc_.uc_mcontext.gregs[REG_RSP] = static_cast<greg_t>(sp_);
    uc_.uc_mcontext.gregs[REG_RIP] = static_cast<greg_t>(kSite + 1);  // after the int3
    uc_.uc_mcontext.gregs[REG_RAX] = 0x7777;
  }
  std::uintptr_t rip() const { return tramway::arch::context_pc(&uc_); }
  std::uintptr_t rsp() const { return tramway::arch::context_sp(&uc_); }
  std::uintptr_t rax() const { return static_cast<std::uintptr_t>(uc_.uc_mcontext.gregs[REG_RAX]); }
  Emulation decode(const Bytes& b) {
    auto e = tramway::arch::emulation_for(kSite, b);
    EXPECT_TRUE(e.ok()) << e.status().message();
    return e.ok() ? *e : Emulation{};
  }
  void expect_stack_untouched(std::size_t from) {
    for (std::size_t i = from; i < stack_.size(); ++i) EXPECT_EQ(stack_[i], 0x1111'0000 + i) << i;
  }

  ucontext_t uc_;
  alignas(16) std::array<std::uintptr_t, 64> stack_;
  std::uintptr_t sp_;
};

TEST_F(Emulator, NopSkipsTheWholeInstruction) {
  tramway::arch::emulate(decode(Bytes(tramway::arch::kNop5.begin(), tramway::arch::kNop5.end())), kSite, &uc_);
  EXPECT_EQ(rip(), kSite + 5);
  EXPECT_EQ(rsp(), sp_);
  EXPECT_EQ(rax(), 0x7777u);
  expect_stack_untouched(0);

  tramway::arch::emulate(decode(Bytes{0x66, 0x90}), kSite, &uc_);
  EXPECT_EQ(rip(), kSite + 2);
}

TEST_F(Emulator, JmpGoesToTheTargetWithoutTouchingTheStack) {
  const std::uintptr_t to = kSite + 0x4000;
  const Insn5 jmp = *tramway::arch::encode_jmp(kSite, to);
  tramway::arch::emulate(decode(Bytes(jmp.begin(), jmp.end())), kSite, &uc_);
  EXPECT_EQ(rip(), to);
  EXPECT_EQ(rsp(), sp_);
  expect_stack_untouched(0);

  tramway::arch::emulate(decode(Bytes{0xeb, 0xfe}), kSite, &uc_);  // jmp to itself
  EXPECT_EQ(rip(), kSite);
}

TEST_F(Emulator, CallPushesTheReturnAddressAndJumps) {
  const std::uintptr_t to = kSite - 0x300;
  const Insn5 call = *tramway::arch::encode_call(kSite, to);
  tramway::arch::emulate(decode(Bytes(call.begin(), call.end())), kSite, &uc_);
  EXPECT_EQ(rip(), to);
  EXPECT_EQ(rsp(), sp_ - 8);
  EXPECT_EQ(stack_[31], kSite + 5);  // the return address, just below the old rsp
  EXPECT_EQ(rax(), 0x7777u);
  expect_stack_untouched(32);        // nothing at or above the old rsp
  for (std::size_t i = 0; i < 31; ++i) EXPECT_EQ(stack_[i], 0x1111'0000 + i);
}

TEST_F(Emulator, RetPopsTheReturnAddress) {
  stack_[32] = 0xdead'beef;
  tramway::arch::emulate(decode(Bytes{0xc3}), kSite, &uc_);
  EXPECT_EQ(rip(), 0xdead'beefu);
  EXPECT_EQ(rsp(), sp_ + 8);
  EXPECT_EQ(rax(), 0x7777u);  // a plain ret keeps the return value
}

TEST_F(Emulator, ReturnZeroClearsRaxAndReturns) {
  stack_[32] = 0xfeed'f00d;
  tramway::arch::emulate(decode(Bytes(tramway::arch::kRet0Padded.begin(), tramway::arch::kRet0Padded.end())),
                         kSite, &uc_);
  EXPECT_EQ(rip(), 0xfeed'f00du);
  EXPECT_EQ(rsp(), sp_ + 8);
  EXPECT_EQ(rax(), 0u);
}

TEST_F(Emulator, CallThenRetRoundTrips) {
  const Insn5 call = *tramway::arch::encode_call(kSite, kSite + 0x100);
  tramway::arch::emulate(decode(Bytes(call.begin(), call.end())), kSite, &uc_);
  tramway::arch::emulate(decode(Bytes{0xc3}), kSite + 0x100, &uc_);
  EXPECT_EQ(rip(), kSite + 5);
  EXPECT_EQ(rsp(), sp_);
}

TEST_F(Emulator, ContextAccessors) {
  tramway::arch::set_context_pc(&uc_, 0x4242);
  EXPECT_EQ(uc_.uc_mcontext.gregs[REG_RIP], 0x4242);
  EXPECT_EQ(tramway::arch::context_pc(&uc_), 0x4242u);
  EXPECT_EQ(tramway::arch::context_sp(&uc_), sp_);
}

}  // namespace
