#include "arch/x86_64/emulate.h"

namespace tramway::arch {

// The pushes write the interrupted thread's stack just below its rsp. That is safe: a call
// site does not use the red zone (the call itself writes rsp-8), and the kernel put the
// signal frame below the red zone. Not instrumented: ASan must not treat that as an access.
__attribute__((no_sanitize("address", "undefined"))) void emulate(const Emulation& e, std::uintptr_t site,
                                                                  ucontext_t* uc) noexcept {
  greg_t* r = uc->uc_mcontext.gregs;
  switch (e.kind) {
    case Emulation::kNop:
      r[REG_RIP] = static_cast<greg_t>(site + e.length);
      return;
    case Emulation::kJmp:
      r[REG_RIP] = static_cast<greg_t>(e.target);
      return;
    case Emulation::kCall: {
      auto sp = static_cast<std::uintptr_t>(r[REG_RSP]) - 8;
      *reinterpret_cast<std::uintptr_t*>(sp) = site + e.length;
      r[REG_RSP] = static_cast<greg_t>(sp);
      r[REG_RIP] = static_cast<greg_t>(e.target);
      return;
    }
    case Emulation::kRetZero:
      r[REG_RAX] = 0;
      [[fallthrough]];
    case Emulation::kRet: {
      auto sp = static_cast<std::uintptr_t>(r[REG_RSP]);
      r[REG_RIP] = static_cast<greg_t>(*reinterpret_cast<const std::uintptr_t*>(sp));
      r[REG_RSP] = static_cast<greg_t>(sp + 8);
      return;
    }
  }
}

}  // namespace tramway::arch
