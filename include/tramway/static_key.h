// tramway/static_key.h — zero-cost feature switches (the kernel's jump labels).
//
//   TRAMWAY_STATIC_KEY_FALSE(verbose);                  // at namespace scope
//   if (TRAMWAY_STATIC_BRANCH_UNLIKELY(verbose)) log(); // a 5-byte nop while false
//   tramway::enable(verbose);                           // the nop becomes a jmp
//
// Each branch compiles to one 5-byte nop or jmp plus an entry in the __tramway_jump_table
// section of its object. Changing keys rewrites those instructions with the batch poker
// (tramway/text/patch.h): threads running the branches always take the old or the new path,
// never anything else. One call to enable/disable/toggle, or one KeyBatch, costs one batch
// (at most 3 serialisations) however many branches it switches.
//
// Keys are named: the branch macros take the key's name, not an expression, and the name is
// a global assembler symbol (`tramway_key_<name>`), unique in the process. Keys and branches
// may live in the executable or in shared libraries, loaded at start or by dlopen (their
// branches join when the library loads and leave when it unloads). A key used in another
// object is declared there with TRAMWAY_DECLARE_STATIC_KEY_*; an executable that defines keys
// used by libraries must export its symbols (-rdynamic / ENABLE_EXPORTS).
// When enable() returns, every thread that reaches a branch afterwards takes the new path.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "tramway/status.h"

namespace tramway {

class alignas(8) StaticKey {
 public:
  StaticKey(const StaticKey&) = delete;
  StaticKey& operator=(const StaticKey&) = delete;

  bool enabled() const noexcept { return enabled_.load(std::memory_order_relaxed); }
  // The value the key had at compile time: what the branches' code was built for.
  bool initial() const noexcept { return initial_; }

 protected:
  constexpr explicit StaticKey(bool initial) noexcept : enabled_(initial), initial_(initial) {}

 private:
  friend class KeyBatch;
  std::atomic<bool> enabled_;
  const bool initial_;
};

struct StaticKeyFalse : StaticKey {
  static constexpr bool kInitial = false;
  constexpr StaticKeyFalse() noexcept : StaticKey(false) {}
};
struct StaticKeyTrue : StaticKey {
  static constexpr bool kInitial = true;
  constexpr StaticKeyTrue() noexcept : StaticKey(true) {}
};

// Several key changes applied as one batch.
class KeyBatch {
 public:
  KeyBatch& set(StaticKey& key, bool value) {
    changes_.emplace_back(&key, value ? kOn : kOff);
    return *this;
  }
  KeyBatch& toggle(StaticKey& key) {
    changes_.emplace_back(&key, kFlip);
    return *this;
  }
  // Applies the changes in order, as one batch (a toggle flips the value the key has at that
  // point). On failure no key changes.
  Status commit();

 private:
  enum Op : unsigned char { kOff, kOn, kFlip };
  std::vector<std::pair<StaticKey*, Op>> changes_;
};

inline Status set(StaticKey& key, bool value) { return KeyBatch().set(key, value).commit(); }
inline Status enable(StaticKey& key) { return set(key, true); }
inline Status disable(StaticKey& key) { return set(key, false); }
inline Status toggle(StaticKey& key) { return KeyBatch().toggle(key).commit(); }

// Number of branches of `key` currently known (in loaded objects). For tests and tools.
std::size_t branch_count(const StaticKey& key);

namespace detail {
// One branch: its 5-byte instruction, the label it jumps to, and the key's address with the
// low bit set for a "likely" branch (one whose jump means "false").
struct JumpEntry {
  std::uintptr_t code;
  std::uintptr_t target;
  std::uintptr_t key;
};
void register_jump_table(const JumpEntry* begin, const JumpEntry* end) noexcept;
void unregister_jump_table(const JumpEntry* begin) noexcept;
}  // namespace detail
}  // namespace tramway

// Every object that includes this header registers its own jump table while it is loaded.
// __start_/__stop_ are defined by the linker per object (hidden); weak so that an object with
// no branch links too.
extern "C" {
extern const tramway::detail::JumpEntry __start___tramway_jump_table[]
    __attribute__((weak, visibility("hidden")));
extern const tramway::detail::JumpEntry __stop___tramway_jump_table[]
    __attribute__((weak, visibility("hidden")));
}
namespace {
struct TramwayJumpTableRegistration {
  TramwayJumpTableRegistration() noexcept {
    tramway::detail::register_jump_table(__start___tramway_jump_table, __stop___tramway_jump_table);
  }
  ~TramwayJumpTableRegistration() { tramway::detail::unregister_jump_table(__start___tramway_jump_table); }
};
[[maybe_unused]] const TramwayJumpTableRegistration tramway_jump_table_registration;
}  // namespace

#define TRAMWAY_DETAIL_KEY_SYMBOL(name) "tramway_key_" #name

#define TRAMWAY_STATIC_KEY_FALSE(name) \
  __attribute__((used)) ::tramway::StaticKeyFalse name __asm__(TRAMWAY_DETAIL_KEY_SYMBOL(name))
#define TRAMWAY_STATIC_KEY_TRUE(name) \
  __attribute__((used)) ::tramway::StaticKeyTrue name __asm__(TRAMWAY_DETAIL_KEY_SYMBOL(name))
#define TRAMWAY_DECLARE_STATIC_KEY_FALSE(name) \
  extern ::tramway::StaticKeyFalse name __asm__(TRAMWAY_DETAIL_KEY_SYMBOL(name))
#define TRAMWAY_DECLARE_STATIC_KEY_TRUE(name) \
  extern ::tramway::StaticKeyTrue name __asm__(TRAMWAY_DETAIL_KEY_SYMBOL(name))

// The site: a 5-byte nop (0f 1f 44 00 00) or a 5-byte jmp rel32 to the label, and its
// table entry. `likely_` is 0 for an unlikely branch (jump = true), 1 for a likely one
// (jump = false).
#define TRAMWAY_DETAIL_SITE_ENTRY(name, likely_)                                    \
  ".pushsection __tramway_jump_table, \"aw\"\n\t"                                   \
  ".balign 8\n\t"                                                                   \
  ".quad 771b, %l[tramway_l_jump], " TRAMWAY_DETAIL_KEY_SYMBOL(name) " + " #likely_ \
  "\n\t.popsection\n\t"

// Each branch lives in its own always-inline lambda so its asm goto labels are scoped to it
// (Clang 14 otherwise assumes any asm goto of a function may reach any of its labels, and
// rejects a declaration with an initialiser between two branches).
#define TRAMWAY_DETAIL_BRANCH(name, likely_)                                                 \
  ([]() __attribute__((always_inline)) -> bool {                                             \
    if constexpr (std::remove_cvref_t<decltype(name)>::kInitial != bool(likely_)) {          \
      asm goto("771: .byte 0xe9\n\t.long %l[tramway_l_jump] - 771b - 5\n\t"                \
               TRAMWAY_DETAIL_SITE_ENTRY(name, likely_) : : : : tramway_l_jump);             \
    } else {                                                                                 \
      asm goto("771: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n\t"                                \
               TRAMWAY_DETAIL_SITE_ENTRY(name, likely_) : : : : tramway_l_jump);             \
    }                                                                                        \
    return false;                                                                            \
  tramway_l_jump:                                                                            \
    return true;                                                                             \
  }())

// True when the key is enabled; the false path is the straight line.
#define TRAMWAY_STATIC_BRANCH_UNLIKELY(name) __builtin_expect(TRAMWAY_DETAIL_BRANCH(name, 0), 0)
// True when the key is enabled; the true path is the straight line.
#define TRAMWAY_STATIC_BRANCH_LIKELY(name) __builtin_expect(!TRAMWAY_DETAIL_BRANCH(name, 1), 1)
