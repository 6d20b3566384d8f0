// Which system call a `syscall` instruction makes, read from the code before it, and whether a
// call of that number that returned EINTR may simply be made again.
//
// Used by the fix-up handler to undo an EINTR that tramway's own signal caused (see
// text/eintr_undo.h). Async-signal-safe: Zydis' decoder is pure, nothing here allocates.
#pragma once

#include <ucontext.h>

#include <cstdint>

namespace tramway::arch {

inline constexpr std::uint8_t kSyscallInsn[2] = {0x0f, 0x05};
inline constexpr std::size_t kSyscallInsnSize = 2;

// The number `%rax` holds at the `syscall` at `site`, proven from the function's code in
// [fn_begin, fn_end): a chain of `mov $imm` / register copies on a straight path into the
// site that no branch of the function enters. -1 when it cannot be proven (a register
// computed, a branch into the path, an indirect jump anywhere in the function, `site` not on
// an instruction boundary). The range must be mapped and readable.
long syscall_number_at(std::uintptr_t fn_begin, std::uintptr_t fn_end, std::uintptr_t site) noexcept;

// True for the blocking calls that a handled signal ends with EINTR whatever SA_RESTART says
// (signal(7)) and that, made again with the same registers, wait on as if never interrupted:
// nothing of theirs is done before EINTR, and timeouts are absolute, kept by the kernel, or
// restart in full (the wait may end later than asked, never earlier). Not connect, close or
// anything else whose EINTR leaves work done.
bool restartable_after_eintr(long nr) noexcept;

inline long context_rax(const ucontext_t* uc) noexcept { return static_cast<long>(uc->uc_mcontext.gregs[REG_RAX]); }
inline void set_context_rax(ucontext_t* uc, long v) noexcept { uc->uc_mcontext.gregs[REG_RAX] = v; }

}  // namespace tramway::arch
