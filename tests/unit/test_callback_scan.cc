// arch/x86_64: the scan that lets the hook stubs skip saving xmm0-7 around a callback that
// provably touches no vector, x87 or MMX register. Byte-level cases for each rule, then real
// functions of this test read live, and addresses that must not be read.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "arch/x86_64/callback_scan.h"
#include "common/format.h"

namespace {

using tramway::arch::CallbackScan;
using tramway::common::hex_address;
using Bytes = std::vector<std::uint8_t>;

constexpr std::uintptr_t kAt = 0x5555'0000'1000;

CallbackScan scan(const Bytes& code) { return tramway::arch::scan_callback_bytes(kAt, code); }

// Vector-free, with the reason shown on failure.
void expect_free(const Bytes& code) {
  const CallbackScan r = scan(code);
  EXPECT_TRUE(r.vector_free) << r.reason;
  EXPECT_EQ(r.reason, "");
}

// Not vector-free, because of the instruction at kAt + offset, for a reason starting `why`.
void expect_refused(const Bytes& code, std::size_t offset, const std::string& why) {
  const CallbackScan r = scan(code);
  EXPECT_FALSE(r.vector_free);
  EXPECT_EQ(r.reason.rfind(why, 0), 0u) << r.reason;
  EXPECT_NE(r.reason.find(hex_address(kAt + offset)), std::string::npos) << r.reason;
}

Bytes repeat(std::uint8_t b, std::size_t n) { return Bytes(n, b); }
Bytes operator+(Bytes a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

const Bytes kRet = {0xc3};
const Bytes kEndbr64 = {0xf3, 0x0f, 0x1e, 0xfa};
const Bytes kNop5 = {0x0f, 0x1f, 0x44, 0x00, 0x00};

// ---- returns, nops and the patchable entry --------------------------------------------------

TEST(CallbackScanBytes, PlainReturnsAreFree) {
  expect_free(kRet);
  expect_free(kEndbr64 + kRet);
  expect_free(repeat(0x90, 5) + kRet);  // a -fpatchable-function-entry entry before attach
  expect_free({0xf3, 0xc3});            // rep ret
}

TEST(CallbackScanBytes, Nop5IsRefusedEvenAtTheEntry) {
  // A 5-byte nop may be a static-key site: its jmp form is never checked.
  expect_refused(kNop5 + kRet, 0, "has a 5-byte nop");
  expect_refused(kEndbr64 + kNop5 + kRet, 4, "has a 5-byte nop");
  expect_refused(Bytes{0x90} + kNop5 + kRet, 1, "has a 5-byte nop");
  expect_refused(kNop5 + kNop5 + kRet, 0, "has a 5-byte nop");
  // Other nop encodings are plain instructions.
  expect_free({0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3});
}

// ---- integer code ---------------------------------------------------------------------------

TEST(CallbackScanBytes, IntegerCodeIsFree) {
  // xor %eax,%eax; inc %eax; lock xadd %eax,(%rdi); ret
  expect_free({0x31, 0xc0, 0xff, 0xc0, 0xf0, 0x0f, 0xc1, 0x07, 0xc3});
  // cmovz %rcx,%rax; popcnt %rdi,%rax; lzcnt %rcx,%rax; rdtscp; pause; mfence; lfence; sfence;
  // prefetcht0 (%rax); lea 0(%rip),%rax; ret
  expect_free({0x48, 0x0f, 0x44, 0xc1, 0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0xf3, 0x48, 0x0f, 0xbd, 0xc1, 0x0f, 0x01,
               0xf9, 0xf3, 0x90, 0x0f, 0xae, 0xf0, 0x0f, 0xae, 0xe8, 0x0f, 0xae, 0xf8, 0x0f, 0x18, 0x08, 0x48,
               0x8d, 0x05, 0x00, 0x00, 0x00, 0x00, 0xc3});
  expect_free({0x0f, 0xae, 0xf0, 0xc3});  // mfence; ret
}

TEST(CallbackScanBytes, LoopWithBackEdgeIsFree) {
  // 0: xor %eax,%eax  2: inc %eax  4: cmp %edi,%eax  6: jne 2  8: ret
  expect_free({0x31, 0xc0, 0xff, 0xc0, 0x39, 0xf8, 0x75, 0xfa, 0xc3});
}

// ---- vector, x87 and MMX --------------------------------------------------------------------

TEST(CallbackScanBytes, VectorInstructionsAreRefused) {
  expect_refused({0x90, 0x0f, 0x28, 0xc1, 0xc3}, 1, "uses SSE");                    // movaps %xmm1,%xmm0
  expect_refused({0x66, 0x0f, 0xef, 0xc0, 0xc3}, 0, "uses SSE2");                   // pxor %xmm0,%xmm0
  expect_refused({0xf2, 0x48, 0x0f, 0x2a, 0xc0, 0xc3}, 0, "uses SSE2");             // cvtsi2sd %rax,%xmm0
  expect_refused({0xc5, 0xf8, 0x77, 0xc3}, 0, "uses AVX");                          // vzeroupper
  expect_refused({0xd9, 0xe8, 0xc3}, 0, "uses X87");                                // fld1
  expect_refused({0xdb, 0xe3, 0xc3}, 0, "uses X87");                                // fninit
  expect_refused({0x0f, 0x77, 0xc3}, 0, "uses MMX");                                // emms
  expect_refused({0x0f, 0xae, 0x10, 0xc3}, 0, "uses SSE");                          // ldmxcsr (%rax)
  expect_refused({0x0f, 0xae, 0x07, 0xc3}, 0, "uses SSE");                          // fxsave (%rdi): no operand names a vector
  expect_refused({0x0f, 0xae, 0x27, 0xc3}, 0, "uses XSAVE");                        // xsave (%rdi)
  expect_refused({0xf2, 0x0f, 0x38, 0xf1, 0xc1, 0xc3}, 0, "uses SSE4");             // crc32: not allowlisted
}

TEST(CallbackScanBytes, RegisterRuleHoldsForBaseInstructions) {
  // mov %cr0,%rax is a BASE instruction: the operand check, not the extension, refuses it.
  expect_refused({0x0f, 0x20, 0xc0, 0xc3}, 0, "uses cr0");
}

TEST(CallbackScanBytes, BothWaysOfABranchAreChecked) {
  // 0: test %edi,%edi  2: je 5  4: ret  5: movaps %xmm1,%xmm0  8: ret  (the taken side)
  expect_refused({0x85, 0xff, 0x74, 0x01, 0xc3, 0x0f, 0x28, 0xc1, 0xc3}, 5, "uses SSE");
  // 0: test %edi,%edi  2: je 9  4: pxor %xmm0,%xmm0  8: ret  9: ret  (the fall-through side)
  expect_refused({0x85, 0xff, 0x74, 0x05, 0x66, 0x0f, 0xef, 0xc0, 0xc3, 0xc3}, 4, "uses SSE2");
  // jcc rel32: 0: je 7  6: ret  7: movaps  10: ret
  expect_refused({0x0f, 0x84, 0x01, 0x00, 0x00, 0x00, 0xc3, 0x0f, 0x28, 0xc1, 0xc3}, 7, "uses SSE");
  // loop is a conditional branch too: 0: loop 3  2: ret  3: fld1  5: ret
  expect_refused({0xe2, 0x01, 0xc3, 0xd9, 0xe8, 0xc3}, 3, "uses X87");
}

// ---- control flow ---------------------------------------------------------------------------

TEST(CallbackScanBytes, JmpRel8IsFollowed) {
  // 0: jmp 5  2: ud2  4: int3  5: ret: the junk is never reached.
  expect_free({0xeb, 0x03, 0x0f, 0x0b, 0xcc, 0xc3});
  // 0: jmp 3, into what would be the immediate of a mov at 2: decoded from there (a ret).
  expect_free({0xeb, 0x01, 0xb8, 0xc3, 0x00, 0x00, 0x00});
  // ... and what it reaches is checked: 0: jmp 4  2: ret ret  4: fld1
  expect_refused({0xeb, 0x02, 0xc3, 0xc3, 0xd9, 0xe8, 0xc3}, 4, "uses X87");
}

TEST(CallbackScanBytes, CallsAndUnprovableJumpsAreRefused) {
  expect_refused({0x90, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xc3}, 1, "calls");  // call rel32
  expect_refused({0xff, 0xd0, 0xc3}, 0, "calls");                          // call *%rax
  expect_refused({0xff, 0xe0}, 0, "jumps indirectly");                     // jmp *%rax
  expect_refused({0x3e, 0xff, 0xe0}, 0, "jumps indirectly");               // notrack jmp *%rax
  expect_refused({0xff, 0x28}, 0, "jumps indirectly");                     // ljmp *(%rax)
  expect_refused({0xe9, 0x00, 0x00, 0x00, 0x00, 0xc3}, 0, "jumps rel32");  // a static-key form
  expect_refused({0x66, 0xeb, 0x00, 0xc3}, 0, "jumps in an unexpected form");
}

TEST(CallbackScanBytes, NonReturningAndTrappingInstructionsAreRefused) {
  expect_refused({0xcc}, 0, "changes control flow");                        // int3
  expect_refused({0xcd, 0x80, 0xc3}, 0, "changes control flow");            // int $0x80
  expect_refused({0x0f, 0x0b}, 0, "does not continue");                     // ud2
  expect_refused({0x0f, 0xb9, 0xc0, 0xc3}, 0, "does not continue");         // ud1
  expect_refused({0xf4}, 0, "does not continue");                           // hlt
  expect_refused({0x0f, 0x05, 0xc3}, 0, "changes control flow");            // syscall
  expect_refused({0x0f, 0x34, 0xc3}, 0, "changes control flow");            // sysenter
  expect_refused({0x48, 0xcf}, 0, "changes control flow");                  // iretq
  expect_refused({0xc7, 0xf8, 0x00, 0x00, 0x00, 0x00, 0xc3}, 0, "changes control flow");  // xbegin
  expect_refused({0x0f, 0x01, 0xd5, 0xc3}, 0, "changes control flow");      // xend
  expect_refused({0xc2, 0x08, 0x00}, 0, "returns with an immediate");       // ret $8
  expect_refused({0xcb}, 0, "returns far");                                 // lret
  expect_refused({0x66, 0xc3}, 0, "returns with an operand-size prefix");
  expect_refused({0xff, 0xff, 0xc3}, 0, "does not decode");
}

// ---- reads of rcx (a hook callback's EntryRegs&) -------------------------------------------

TEST(CallbackScanBytes, ReadsOfRcxAreReported) {
  const auto reads = [](const Bytes& code) {
    const CallbackScan r = scan(code);
    EXPECT_TRUE(r.vector_free) << r.reason;
    return r.reads_regs;
  };
  EXPECT_FALSE(reads({0x48, 0x8b, 0x47, 0x08, 0xf0, 0x48, 0xff, 0x00, 0xc3}));  // mov 8(%rdi),%rax; lock incq (%rax)
  EXPECT_FALSE(reads({0x0f, 0x01, 0xf9, 0xc3}));                                // rdtscp only writes ecx
  EXPECT_TRUE(reads({0x48, 0x8b, 0x51, 0x40, 0xc3}));                           // mov 0x40(%rcx),%rdx
  EXPECT_TRUE(reads({0x48, 0x89, 0xc8, 0xc3}));                                 // mov %rcx,%rax
  EXPECT_TRUE(reads({0x8b, 0x04, 0x0f, 0xc3}));                                 // mov (%rdi,%rcx),%eax
  EXPECT_TRUE(reads({0xd3, 0xe0, 0xc3}));                                       // shl %cl,%eax
  EXPECT_TRUE(reads({0xf3, 0xa4, 0xc3}));                                       // rep movsb: rcx is hidden
  // Only on the taken side of a branch: 0: test %edi,%edi  2: je 5  4: ret  5: mov %ch,%al  7: ret
  EXPECT_TRUE(reads({0x85, 0xff, 0x74, 0x01, 0xc3, 0x88, 0xe8, 0xc3}));
  // Unknown unless the scan completed.
  EXPECT_TRUE(scan({0xe8, 0, 0, 0, 0, 0xc3}).reads_regs);
  // After a write of all of rcx, reads see no argument: movzbl 0x29(%rax),%ecx; test %cl,%cl; ret
  EXPECT_FALSE(reads({0x0f, 0xb6, 0x48, 0x29, 0x84, 0xc9, 0xc3}));
  EXPECT_FALSE(reads({0xb9, 0x05, 0, 0, 0, 0x48, 0x89, 0xc8, 0xc3}));  // mov $5,%ecx; mov %rcx,%rax; ret
  EXPECT_TRUE(reads({0x31, 0xc9, 0x89, 0xc8, 0xc3}));  // xor %ecx,%ecx reads it, formally: refused alike
  // A write of cl keeps the rest of the argument: mov $1,%cl; mov %rcx,%rax; ret
  EXPECT_TRUE(reads({0xb1, 0x01, 0x48, 0x89, 0xc8, 0xc3}));
  // but a read of cl alone then sees no argument (Clang's bool loads): mov 0x28(%rax),%cl; test $1,%cl; ret
  EXPECT_FALSE(reads({0x8a, 0x48, 0x28, 0xf6, 0xc1, 0x01, 0xc3}));
  EXPECT_TRUE(reads({0x8a, 0x48, 0x28, 0x88, 0xe8, 0xc3}));  // ... mov %ch,%al: ch was not written
  // Written on one path only: 0: test %edi,%edi  2: je 9  4: mov $0,%ecx  9: mov %ecx,%eax  11: ret
  EXPECT_TRUE(reads({0x85, 0xff, 0x74, 0x05, 0xb9, 0, 0, 0, 0, 0x89, 0xc8, 0xc3}));
  // On both: 0: test %edi,%edi  2: je 11  4: mov $0,%ecx  9: jmp 13  11: mov %edi,%ecx  13: mov %ecx,%eax  15: ret
  EXPECT_FALSE(reads({0x85, 0xff, 0x74, 0x07, 0xb9, 0, 0, 0, 0, 0xeb, 0x02, 0x89, 0xf9, 0x89, 0xc8, 0xc3}));
}

// ---- bounds ---------------------------------------------------------------------------------

TEST(CallbackScanBytes, RunningOffTheCodeIsRefused) {
  const CallbackScan off_end = scan({0x90, 0x90});
  EXPECT_FALSE(off_end.vector_free);
  EXPECT_EQ(off_end.reason, "leaves the readable code at " + hex_address(kAt + 2));
  // An instruction cut by the end of the code: mov $imm32,%eax with two bytes missing.
  EXPECT_EQ(scan({0x90, 0xb8, 0x01, 0x00}).reason, "leaves the readable code at " + hex_address(kAt + 4));
  // A jump out of the code, backwards or forwards.
  EXPECT_EQ(scan({0xeb, 0xf0}).reason, "leaves the readable code at " + hex_address(kAt + 2 - 0x10));
  EXPECT_EQ(scan({0x74, 0x10, 0xc3}).reason, "leaves the readable code at " + hex_address(kAt + 0x12));
  EXPECT_FALSE(scan({}).vector_free);
}

TEST(CallbackScanBytes, TooLongToProve) {
  expect_free(repeat(0x90, tramway::arch::kScanMaxInstructions - 1) + kRet);
  const CallbackScan many = scan(repeat(0x90, tramway::arch::kScanMaxInstructions) + kRet);
  EXPECT_FALSE(many.vector_free);
  EXPECT_EQ(many.reason.rfind("too long to prove", 0), 0u) << many.reason;

  // 0: je `distance`  6: ret  ...  distance: ret. The code reached spans distance + 1 bytes.
  const auto far_branch = [](std::size_t distance) {
    Bytes b = {0x0f, 0x84, 0, 0, 0, 0, 0xc3};
    const auto rel = static_cast<std::uint32_t>(distance - 6);
    std::memcpy(&b[2], &rel, 4);
    b.resize(distance + 1, 0xcc);
    b[distance] = 0xc3;
    return b;
  };
  expect_free(far_branch(tramway::arch::kScanMaxSpan - 1));
  expect_refused(far_branch(tramway::arch::kScanMaxSpan), tramway::arch::kScanMaxSpan, "too long to prove");
}

}  // namespace

// ---- live code ------------------------------------------------------------------------------
// Real functions of this test, at whatever optimisation the build uses. The builtin stays an
// inline `lock xadd` at -O0 too (std::atomic's members would be calls there); the sanitizers
// of the asan preset would add calls to their runtime.
#define CBSCAN_FN extern "C" __attribute__((noinline, used, no_sanitize("address", "undefined")))

CBSCAN_FN void cbscan_bump(long* counter) { __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }
CBSCAN_FN double cbscan_scale(double x) { return x * 1.5 + 0.25; }
CBSCAN_FN void cbscan_bump_twice(long* counter) {
  cbscan_bump(counter);
  cbscan_bump(counter);
}

namespace {

std::uintptr_t address_of(auto* fn) { return reinterpret_cast<std::uintptr_t>(fn); }

TEST(CallbackScanLive, IntegerFunctionIsFree) {
  long n = 0;
  cbscan_bump(&n);
  ASSERT_EQ(n, 1);
  const CallbackScan r = tramway::arch::scan_callback(address_of(&cbscan_bump));
  EXPECT_TRUE(r.vector_free) << r.reason;
}

TEST(CallbackScanLive, FloatingPointFunctionIsNot) {
  ASSERT_EQ(cbscan_scale(2.0), 3.25);
  const CallbackScan r = tramway::arch::scan_callback(address_of(&cbscan_scale));
  EXPECT_FALSE(r.vector_free);
  EXPECT_NE(r.reason.find("uses SSE"), std::string::npos) << r.reason;
}

TEST(CallbackScanLive, FunctionThatCallsIsNot) {
  long n = 0;
  cbscan_bump_twice(&n);
  ASSERT_EQ(n, 2);
  const CallbackScan r = tramway::arch::scan_callback(address_of(&cbscan_bump_twice));
  EXPECT_FALSE(r.vector_free);
  EXPECT_EQ(r.reason.rfind("calls at 0x", 0), 0u) << r.reason;
}

TEST(CallbackScanLive, NullIsNot) {
  const CallbackScan r = tramway::arch::scan_callback(0);
  EXPECT_FALSE(r.vector_free);
  EXPECT_FALSE(r.reason.empty());
}

// Code in an ordinary data page: it need not be executable to be scanned.
struct Pages {
  explicit Pages(std::size_t n, int prot = PROT_READ | PROT_WRITE)
      : size(n * static_cast<std::size_t>(sysconf(_SC_PAGESIZE))),
        base(static_cast<std::uint8_t*>(mmap(nullptr, size, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))) {}
  ~Pages() {
    if (base != MAP_FAILED) munmap(base, size);
  }
  std::uintptr_t at(std::size_t offset) const { return reinterpret_cast<std::uintptr_t>(base) + offset; }
  const std::size_t size;
  std::uint8_t* const base;
};

TEST(CallbackScanLive, UnmappedAddressIsNot) {
  std::uintptr_t gone;
  {
    Pages p(1);
    ASSERT_NE(p.base, MAP_FAILED);
    gone = p.at(0);
  }
  const CallbackScan r = tramway::arch::scan_callback(gone);
  EXPECT_FALSE(r.vector_free);
  EXPECT_EQ(r.reason, "leaves the readable code at " + hex_address(gone));
}

TEST(CallbackScanLive, ProtNonePageIsNot) {
  Pages p(1, PROT_NONE);
  ASSERT_NE(p.base, MAP_FAILED);
  const CallbackScan r = tramway::arch::scan_callback(p.at(0));
  EXPECT_FALSE(r.vector_free);
  EXPECT_EQ(r.reason, "leaves the readable code at " + hex_address(p.at(0)));
}

TEST(CallbackScanLive, CodeAcrossAPageBoundary) {
  Pages p(2);
  ASSERT_NE(p.base, MAP_FAILED);
  const std::size_t page = p.size / 2;
  // Three nops, then `mov $1,%eax` whose immediate starts the second page, then ret.
  const std::uint8_t code[] = {0x90, 0x90, 0x90, 0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3};
  std::memcpy(p.base + page - 5, code, sizeof code);
  const CallbackScan r = tramway::arch::scan_callback(p.at(page - 5));
  EXPECT_TRUE(r.vector_free) << r.reason;

  // Without the second page the mov is cut short at the boundary.
  ASSERT_EQ(mprotect(p.base + page, page, PROT_NONE), 0);
  const CallbackScan cut = tramway::arch::scan_callback(p.at(page - 5));
  EXPECT_FALSE(cut.vector_free);
  EXPECT_EQ(cut.reason, "leaves the readable code at " + hex_address(p.at(page)));
}

}  // namespace
