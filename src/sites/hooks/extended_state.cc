// Extended state (Ops::save_extended_state): what xsave must save, and the callback run
// between xsave and xrstor. The dispatchers (dispatch.cc) run such an ops; the stubs' fast
// path never does (hooks.cc, fast_mode).
#include <cpuid.h>
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "sites/hooks/internal.h"

namespace tramway::hooks::detail {

// What xsave must save for Ops::save_extended_state: the components the OS enabled (XCR0) and
// the size of the standard-format area for them (CPUID leaf 0xD).
const XsaveLayout& xsave_layout() {
  static const XsaveLayout layout = [] {
    XsaveLayout l;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_XSAVE) || !(c & bit_OSXSAVE)) return l;
    std::uint32_t lo, hi;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    l.mask = (std::uint64_t{hi} << 32) | lo;
    __cpuid_count(0xd, 0, a, b, c, d);
    l.size = b;  // for the components enabled in XCR0
    l.usable = l.size >= 576;
    return l;
  }();
  return layout;
}

// Runs `o`'s callback between xsave and xrstor of every state component the OS enabled. No
// library call may come before the xsave: glibc's string functions use AVX and end with
// vzeroupper, which would clear the very upper halves this is meant to keep. Nor a sanitizer's:
// AddressSanitizer poisons an alloca through its runtime (__asan_alloca_poison), whose memset
// on AMD EPYC ends with vzeroupper (the asan preset lost ymm0's upper half there, not on Intel).
__attribute__((target("xsave"), noinline, no_sanitize("address", "undefined")))
void call_saving_extended_state(Ops& o, std::uintptr_t entry,
                                                                          std::uintptr_t caller, EntryRegs& regs) {
  const XsaveLayout& layout = xsave_layout();
  auto* raw = static_cast<unsigned char*>(__builtin_alloca(layout.size + 64));
  auto* area = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(raw) + 63) & ~std::uintptr_t{63});
  // xrstor faults on a header it did not write: xsave writes only XSTATE_BV, so zero the rest.
  for (std::size_t i = 512; i < 576; i += 8) *reinterpret_cast<volatile std::uint64_t*>(area + i) = 0;
  _xsave64(area, layout.mask);
  o.state->entry(o, entry, caller, regs);
  _xrstor64(area, layout.mask);
}

}  // namespace tramway::hooks::detail
