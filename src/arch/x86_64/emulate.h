// Carries a thread past an int3 as if it had executed the site's new instruction.
// Async-signal-safe: runs inside the SIGTRAP handler, touches only the ucontext and the
// interrupted thread's stack.
#pragma once

#include <ucontext.h>

#include <cstdint>

#include "arch/x86_64/insn.h"

namespace tramway::arch {

// `site` is the address of the int3 (the instruction's head). Updates the context's rip (and
// rsp, rax for call/ret forms) so that returning from the handler resumes after the emulated
// instruction.
void emulate(const Emulation& e, std::uintptr_t site, ucontext_t* uc) noexcept;

inline std::uintptr_t context_pc(const ucontext_t* uc) noexcept {
  return static_cast<std::uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
}
inline void set_context_pc(ucontext_t* uc, std::uintptr_t pc) noexcept {
  uc->uc_mcontext.gregs[REG_RIP] = static_cast<greg_t>(pc);
}
inline std::uintptr_t context_sp(const ucontext_t* uc) noexcept {
  return static_cast<std::uintptr_t>(uc->uc_mcontext.gregs[REG_RSP]);
}

}  // namespace tramway::arch
