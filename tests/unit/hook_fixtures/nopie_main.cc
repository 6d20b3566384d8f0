// A non-PIE executable (load bias 0, entries not relocated) compiled with
// -fpatchable-function-entry=13,8. It prints what discovery finds in itself, then the real
// addresses of its functions, for test_hook_discovery to compare:
//   object <base> <path>      the main executable
//   site <entry> <form> <name>
//   function <address> <name>
//   error <message>           discovery failed
#include <cinttypes>
#include <cstdio>

#include "sites/hooks/discovery.h"

namespace nopie {
__attribute__((noinline)) int square(int a) { return a * a; }
__attribute__((noinline)) int square(long a) { return static_cast<int>(a * a * 2); }
}  // namespace nopie
extern "C" __attribute__((noinline)) int nopie_c(int a) { return a + 1; }

int main() {
  using tramway::sites::hooks::EntryForm;
  auto objects = tramway::sites::hooks::discover_loaded_objects();
  if (objects.empty() || !objects[0].ok()) {
    std::printf("error %s\n", objects.empty() ? "no objects" : objects[0].status().message().c_str());
    return 1;
  }
  const auto& exe = *objects[0];
  std::printf("object %" PRIxPTR " %s\n", exe.base, exe.path.c_str());
  for (const auto& s : exe.sites)
    std::printf("site %" PRIxPTR " %s %s\n", s.entry,
                s.form == EntryForm::nop5 ? "nop5" : s.form == EntryForm::nop1x5 ? "nop1x5" : "other", s.name.c_str());
  std::printf("function %" PRIxPTR " %s\n", reinterpret_cast<std::uintptr_t>(static_cast<int (*)(int)>(&nopie::square)),
              "nopie::square(int)");
  std::printf("function %" PRIxPTR " %s\n", reinterpret_cast<std::uintptr_t>(static_cast<int (*)(long)>(&nopie::square)),
              "nopie::square(long)");
  std::printf("function %" PRIxPTR " %s\n", reinterpret_cast<std::uintptr_t>(&nopie_c), "nopie_c");
  return 0;
}
