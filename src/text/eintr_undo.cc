#include "text/eintr_undo.h"

#include <errno.h>
#include <link.h>
#include <sys/epoll.h>

#include <atomic>
#include <cstring>

#include "arch/x86_64/emulate.h"
#include "arch/x86_64/syscall_site.h"
#include "common/eh_frame_hdr.h"

namespace tramway::text::detail {
namespace {

// libc's executable segment and its .eh_frame_hdr; written once at install, before the fix-up
// handler is, and read only by handlers.
struct Libc {
  std::uintptr_t text_begin = 0, text_end = 0;
  std::uintptr_t eh_frame_hdr = 0;
};
Libc g_libc;
std::atomic<std::uint64_t> g_undone{0};

int find_libc(dl_phdr_info* info, std::size_t, void* data) {
  auto* want = static_cast<std::uintptr_t*>(data);
  Libc found;
  bool holds = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X)) {
      found.text_begin = lo;
      found.text_end = hi;
      holds = holds || (*want >= lo && *want < hi);
    }
    if (ph.p_type == PT_GNU_EH_FRAME) found.eh_frame_hdr = lo;
  }
  if (!holds || found.eh_frame_hdr == 0) return 0;
  g_libc = found;
  return 1;
}

bool is_eintr_return(const ucontext_t* uc) noexcept { return arch::context_rax(uc) == -EINTR; }

}  // namespace

void eintr_undo_init() noexcept {
  if (g_libc.text_end != 0) return;
  // epoll_wait: a libc function tramway never interposes, so its address is libc's own.
  auto in_libc = reinterpret_cast<std::uintptr_t>(&::epoll_wait);
  dl_iterate_phdr(find_libc, &in_libc);
}

void note_program_handler(ThreadSlot* slot, const ucontext_t* uc) noexcept {
  if (!slot || !is_eintr_return(uc)) return;
  slot->program_eintr_pc.store(arch::context_pc(uc), std::memory_order_relaxed);
  slot->program_eintr_sp.store(arch::context_sp(uc), std::memory_order_relaxed);
}

bool undo_own_eintr(ThreadSlot* slot, ucontext_t* uc) noexcept {
  if (!is_eintr_return(uc)) return false;  // the fast way out: almost every interrupted context
  const Libc& libc = g_libc;
  const std::uintptr_t pc = arch::context_pc(uc);
  const std::uintptr_t site = pc - arch::kSyscallInsnSize;
  if (!slot || pc < libc.text_begin + arch::kSyscallInsnSize || pc > libc.text_end) return false;
  if (std::memcmp(reinterpret_cast<const void*>(site), arch::kSyscallInsn, arch::kSyscallInsnSize) != 0) return false;
  // The program's handler ran on this very return (its sigreturn brought the thread back here
  // and our signal was delivered next): the EINTR is the program's to see.
  if (slot->program_eintr_pc.load(std::memory_order_relaxed) == pc &&
      slot->program_eintr_sp.load(std::memory_order_relaxed) == arch::context_sp(uc)) {
    slot->program_eintr_pc.store(0, std::memory_order_relaxed);
    return false;
  }
  const common::FunctionBounds fn = common::function_containing(libc.eh_frame_hdr, site);
  if (!fn.found()) return false;
  const long nr = arch::syscall_number_at(fn.begin, fn.end, site);
  if (nr < 0 || !arch::restartable_after_eintr(nr)) return false;
  // The arguments are still in their registers: the kernel preserves all but rax, rcx, r11.
  arch::set_context_pc(uc, site);
  arch::set_context_rax(uc, nr);
  g_undone.fetch_add(1, std::memory_order_relaxed);
  return true;
}

std::uint64_t eintr_undone() noexcept { return g_undone.load(std::memory_order_relaxed); }

}  // namespace tramway::text::detail
