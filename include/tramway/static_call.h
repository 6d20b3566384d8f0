// tramway/static_call.h — calls whose target is patched, not loaded (the kernel's static_call).
//
//   int fast_hash(const char*);  int slow_hash(const char*);
//   TRAMWAY_DEFINE_STATIC_CALL(hash, fast_hash);          // at namespace scope
//   int h = TRAMWAY_STATIC_CALL(hash)("key");             // call -> trampoline -> fast_hash
//   tramway::static_call_update(hash, &slow_hash);        // rewrites the trampoline's jmp
//
// Each static call has a trampoline in permanent text: one `jmp rel32`, 16-byte aligned so
// the rel32 never straddles a cache line, followed by a fallback `jmp *literal(%rip)` used for
// targets beyond rel32 reach (for example from the executable into libc) — those cost one
// indirect jump. Until the first update the trampoline goes through the fallback too.
// Calls and updates are type-checked: a function of another signature does not compile.
// NULL (does nothing, void functions) and RET0 (returns zero) variants exist.
//
// What update() guarantees when it returns: every call that enters the trampoline afterwards
// reaches the new target; a thread inside the trampoline's jmp while it is rewritten goes to
// the old or the new target, never elsewhere. What it does not guarantee: a call that already
// reached the old target may still be running it — do not free or reuse the old target's code
// or data until a grace period (tramway/grace) has passed.
//
// Names are global assembler symbols (`tramway_sc_tramp_<name>`); a static call used in
// another translation unit or object is declared there with TRAMWAY_DECLARE_STATIC_CALL.
// Define static calls at global or named-namespace scope: inside an anonymous namespace the
// trampoline's declaration would get internal linkage and not bind to the trampoline.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "tramway/status.h"

namespace tramway {

namespace detail {
// The plain function type of a function pointer, without attributes (nonnull, ...) that
// would otherwise stick to the template argument.
template <class R, class... A>
auto plain_function(R (*)(A...)) -> R (*)(A...);

enum class EmptyCall : std::uint8_t { kNone, kReturn, kReturnZero };
// `literal` is the trampoline's fallback pointer (an std::atomic<F*>).
Status update_static_call(void* trampoline, void* literal, void* target, EmptyCall when_null);
}  // namespace detail

template <class F>
class StaticCall;

template <class R, class... A>
class StaticCall<R(A...)> {
 public:
  using Function = R(A...);
  using Return = R;
  constexpr StaticCall(Function* trampoline, std::atomic<Function*>* literal) noexcept
      : trampoline_(trampoline), literal_(literal) {}
  StaticCall(const StaticCall&) = delete;
  StaticCall& operator=(const StaticCall&) = delete;

  // Retargets the trampoline. nullptr makes a void call do nothing and a call returning a
  // scalar return zero.
  Status update(Function* target) {
    constexpr auto empty = std::is_void_v<R> ? detail::EmptyCall::kReturn
                           : (std::is_scalar_v<R>) ? detail::EmptyCall::kReturnZero
                                                   : detail::EmptyCall::kNone;
    return detail::update_static_call(reinterpret_cast<void*>(trampoline_), static_cast<void*>(literal_),
                                      reinterpret_cast<void*>(target), empty);
  }
  // The trampoline itself (what TRAMWAY_STATIC_CALL calls).
  Function* trampoline() const noexcept { return trampoline_; }

 private:
  Function* trampoline_;
  std::atomic<Function*>* literal_;
};

// Type-safe update: the target must have exactly the static call's function type.
template <class F>
Status static_call_update(StaticCall<F>& call, std::type_identity_t<F>* target) {
  return call.update(target);
}

}  // namespace tramway

#define TRAMWAY_DETAIL_SC_STR(x) #x
#define TRAMWAY_DETAIL_SC_TRAMP(name) "tramway_sc_tramp_" #name
#define TRAMWAY_DETAIL_SC_LIT(name) "tramway_sc_lit_" #name

// The trampoline, 32 bytes:
//   +0   the patched instruction: jmp rel32 | ret | jmp +16, padded with int3 to 8 bytes
//   +8   fallback: jmp *literal(%rip), for targets beyond rel32 reach
//   +16  return-zero stub: xor eax,eax; ret (a permanent body, so that no rewrite ever
//        lands between those two instructions)
// `first` is the initial instruction; CFI describes the state at entry (CFA = rsp + 8) so
// debuggers and unwinders walk through it.
#define TRAMWAY_DETAIL_SC_TRAMPOLINE(name, first)                                  \
  __asm__(".pushsection .text.tramway_static_call,\"ax\",@progbits\n\t"            \
          ".balign 16\n\t"                                                         \
          ".globl " TRAMWAY_DETAIL_SC_TRAMP(name) "\n\t"                           \
          ".protected " TRAMWAY_DETAIL_SC_TRAMP(name) "\n\t"                       \
          ".type " TRAMWAY_DETAIL_SC_TRAMP(name) ", @function\n"                   \
          TRAMWAY_DETAIL_SC_TRAMP(name) ":\n\t"                                    \
          ".cfi_startproc\n\t"                                                     \
          first "\n\t"                                                             \
          ".balign 8, 0xcc\n\t"                                                    \
          ".Ltramway_sc_fallback_" #name ":\n\t"                                   \
          "jmp *" TRAMWAY_DETAIL_SC_LIT(name) "(%rip)\n\t"                         \
          ".balign 16, 0xcc\n\t"                                                   \
          ".Ltramway_sc_ret0_" #name ":\n\t"                                       \
          "xorl %eax, %eax\n\t"                                                   \
          "ret\n\t"                                                                \
          ".cfi_endproc\n\t"                                                       \
          ".size " TRAMWAY_DETAIL_SC_TRAMP(name) ", . - " TRAMWAY_DETAIL_SC_TRAMP(name) "\n\t" \
          ".popsection")

#define TRAMWAY_DETAIL_SC_JMP_FALLBACK(name) \
  ".byte 0xe9\n\t.long .Ltramway_sc_fallback_" #name " - . - 4"

#define TRAMWAY_DETAIL_SC_OBJECTS(name, type, init)                                        \
  using tramway_sc_type_##name = type;                                                     \
  tramway_sc_type_##name tramway_sc_call_##name __asm__(TRAMWAY_DETAIL_SC_TRAMP(name));    \
  __attribute__((used)) static std::atomic<tramway_sc_type_##name*>                         \
      tramway_sc_literal_##name __asm__(TRAMWAY_DETAIL_SC_LIT(name)){init};                \
  ::tramway::StaticCall<type> name{&tramway_sc_call_##name, &tramway_sc_literal_##name}

// Defines static call `name` with the type and initial target of function `func`.
#define TRAMWAY_DEFINE_STATIC_CALL(name, func)                                             \
  TRAMWAY_DETAIL_SC_TRAMPOLINE(name, TRAMWAY_DETAIL_SC_JMP_FALLBACK(name));                \
  TRAMWAY_DETAIL_SC_OBJECTS(name, std::remove_pointer_t<decltype(::tramway::detail::plain_function(&func))>, \
                            &func)

// A void static call that initially does nothing (the trampoline is `ret`).
#define TRAMWAY_DEFINE_STATIC_CALL_NULL(name, type)                                        \
  TRAMWAY_DETAIL_SC_TRAMPOLINE(name, ".byte 0xc3, 0xcc, 0xcc, 0xcc, 0xcc");               \
  TRAMWAY_DETAIL_SC_OBJECTS(name, type, nullptr);                                          \
  static_assert(std::is_void_v<decltype(name)::Return>,                                    \
                "TRAMWAY_DEFINE_STATIC_CALL_NULL needs a function type returning void")

// A static call that initially returns zero (the trampoline is `xor eax,eax; ret`).
#define TRAMWAY_DEFINE_STATIC_CALL_RET0(name, type)                                        \
  TRAMWAY_DETAIL_SC_TRAMPOLINE(name, ".byte 0xe9\n\t.long .Ltramway_sc_ret0_" #name " - . - 4"); \
  TRAMWAY_DETAIL_SC_OBJECTS(name, type, nullptr);                                          \
  static_assert(std::is_scalar_v<decltype(name)::Return>,                                  \
                "TRAMWAY_DEFINE_STATIC_CALL_RET0 needs a function type returning a scalar")

// Declares a static call defined in another translation unit or object.
#define TRAMWAY_DECLARE_STATIC_CALL(name, type)                                            \
  std::type_identity_t<type> tramway_sc_call_##name __asm__(TRAMWAY_DETAIL_SC_TRAMP(name)); \
  extern ::tramway::StaticCall<type> name

// The callable: TRAMWAY_STATIC_CALL(name)(args...).
#define TRAMWAY_STATIC_CALL(name) (tramway_sc_call_##name)
