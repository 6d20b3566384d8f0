// The functions suite "hooks" calls and hooks: the generated libraries of
// tools/torture/CMakeLists.txt, 1,000 with patchable entries and 1,000 without (hooked through
// relocated prologues), loaded, checked and listed in one table.
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace tramway::torture {

inline constexpr int kMaxHookFunctions = 2000;

struct HookFunctions {
  using Fn = int (*)(int);
  int count = 0;      // functions in the table
  int patchable = 0;  // [0, patchable) have patchable entries, [patchable, count) are relocated
  int without_entry = 0;  // functions built without patchable entries, relocatable or not
  Fn fns[kMaxHookFunctions] = {};
  std::uintptr_t entries[kMaxHookFunctions] = {};
  int number[kMaxHookFunctions] = {};  // tw_fn_<number>: it returns x + number
  unsigned long long* body_calls[kMaxHookFunctions] = {};  // its library's count of its calls
  std::array<std::uint8_t, 16> original[kMaxHookFunctions] = {};  // relocated: its first bytes
  std::size_t original_size[kMaxHookFunctions] = {};
};

// dlopens the libraries and fills `t`: every patchable function (checking its nop form), then
// those without patchable entries that hooks::functions() lists as relocatable; the others
// are left out and described in `*refused` (one line each). False with `*error` on failure.
bool load_hook_functions(HookFunctions& t, std::string* refused, std::string* error);

// Relocated functions whose first bytes differ from those seen at load (once nothing is
// hooked, the batch must have put the original run back); the first is described in `*first`.
int relocated_bytes_changed(const HookFunctions& t, std::string* first);

}  // namespace tramway::torture
