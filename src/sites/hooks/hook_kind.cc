// The kinds of a function without a patchable entry: relocatable when the relocator plans its
// prologue, else trap when its first instruction can run out of line, else refused.
#include "sites/hooks/hook_kind.h"

#include <algorithm>
#include <iterator>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "arch/x86_64/insn.h"
#include "arch/x86_64/relocate.h"

namespace tramway::sites::hooks {

using tramway::hooks::HookKind;

HookKindOf classify_function(std::uintptr_t address, std::size_t size) {
  std::vector<std::uint8_t> code(size);
  if (size == 0 || !arch::read_own_memory(address, code)) code.clear();
  return classify_code(address, size, code);
}

HookKindOf classify_code(std::uintptr_t address, std::size_t size, std::span<const std::uint8_t> code) {
  if (size == 0 || code.size() != size) {
    return {HookKind::refused, "its " + std::to_string(size) + " bytes cannot be read (the symbol's size does not "
                               "match the mapped code)", nullptr};
  }
  Result<arch::RelocationPlan> plan = arch::plan_relocation(address, code);
  if (plan.ok()) return {HookKind::relocatable, {}, std::make_shared<const arch::RelocationPlan>(std::move(*plan))};
  // A trap probe executes the first instruction out of line: it must be relocatable alone.
  Result<arch::RelocationPlan> first = arch::plan_first_instruction(address, code);
  if (first.ok()) return {HookKind::trap, plan.status().message(), nullptr};
  return {HookKind::refused, plan.status().message() + "; nor can its first instruction run out of line behind a "
                             "trap probe: " + first.status().message(), nullptr};
}

namespace {

// Objects whose code runs inside tramway's batches, grace periods and signal handlers.
constexpr std::string_view kOwnObjects[] = {"libtramway", "ld-linux", "linux-vdso", "libZydis",
                                           "libZycore",  "libelf",   "libgcc_s"};
// The C library's entries those call while SIGTRAP may be blocked (tramway's all-blocked
// windows, the handlers) or between a batch's int3 and its last serialisation. Refused in any
// object: an interposer of one of them (ASan's sigprocmask) is what tramway calls.
constexpr std::string_view kLibcEntries[] = {
    "syscall", "getpid", "gettid", "sigaction", "__sigaction", "__libc_sigaction", "signal", "sigprocmask",
    "pthread_sigmask", "sigemptyset", "sigfillset", "sigaddset", "sigdelset", "sigismember", "sigorset",
    "sigandset", "sigisemptyset", "sigaltstack", "sigreturn", "__restore_rt", "raise", "abort", "_exit",
    "__errno_location", "__stack_chk_fail", "__tls_get_addr", "clock_gettime", "__clock_gettime", "sched_yield",
    "nanosleep", "clock_nanosleep", "write", "pwrite64", "pwrite", "tgkill", "pthread_self", "getauxval", "fork",
    "_Fork", "__libc_fork", "dl_iterate_phdr", "process_vm_readv",
    // What registering a thread for grace periods calls, which a thread's first hooked call
    // does from inside the stub: a hook there would recurse into the registration.
    "malloc", "free", "calloc", "realloc", "pthread_once", "pthread_mutex_lock", "pthread_mutex_unlock",
    "pthread_setspecific", "pthread_getspecific"};
// The same for the C++ runtime's allocation (the registration allocates the marker with new).
constexpr std::string_view kCxxEntries[] = {"_Znwm", "_ZdlPv", "_ZdlPvm", "_ZnwmRKSt9nothrow_t"};

std::string_view basename_of(std::string_view path) {
  const std::size_t slash = path.rfind('/');
  return slash == std::string_view::npos ? path : path.substr(slash + 1);
}

}  // namespace

std::optional<std::string> refusal_by_identity(const std::string& object_path, const std::string& symbol) {
  // GCC's hot/cold splitting: `f.cold` is the unlikely part of f, reached by a jump from it,
  // not by a call, so at its "entry" the stack holds no return address for a hook to see.
  const std::string_view sym = symbol;
  if (sym.ends_with(".cold") || sym.find(".cold.") != std::string_view::npos) {
    return std::string("it is the cold part of a function the compiler split, entered by a jump, not a call");
  }
  const std::string_view base = basename_of(object_path);
  for (std::string_view own : kOwnObjects) {
    if (base.starts_with(own)) {
      return "it is in " + std::string(base) + ", whose code runs while tramway patches code or handles signals";
    }
  }
  if (base.starts_with("libstdc++") &&
      std::find(std::begin(kCxxEntries), std::end(kCxxEntries), symbol) != std::end(kCxxEntries)) {
    return "tramway's grace-period registration calls it from inside the hook stub (a hook there would recurse)";
  }
  if (std::find(std::begin(kLibcEntries), std::end(kLibcEntries), symbol) != std::end(kLibcEntries)) {
    return "tramway calls it while it patches code or handles signals (a hook there could recurse into the "
           "patching, or trap where SIGTRAP is blocked)";
  }
  return std::nullopt;
}

}  // namespace tramway::sites::hooks

namespace tramway::hooks {

const char* hook_kind_name(HookKind kind) noexcept {
  switch (kind) {
    case HookKind::patchable: return "patchable";
    case HookKind::relocatable: return "relocatable";
    case HookKind::trap: return "trap";
    case HookKind::refused: return "refused";
  }
  return "refused";
}

}  // namespace tramway::hooks
