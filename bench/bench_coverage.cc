// Coverage of the hooks on any function (issue 12): for each distribution library, the share
// of its sized STT_FUNC symbols (one per address: aliases count once) whose prologue the
// relocator accepts, and with trap probes added. Not a timed benchmark: it prints its figures
// as JSON lines on stdout, in bench/report.h's format, and on stderr the refusal reasons
// counted (addresses, offsets and instruction text folded away) and what discovery cost.
//   {"name": "coverage/libz.so.1", "value": 99.2, "unit": "%"}
//   {"name": "coverage/libz.so.1/with_trap", "value": 100, "unit": "%"}
// A library that is not installed is skipped with a message. Flags: --figures=REGEX (as
// every benchmark program); other flags are ignored.
#include <dlfcn.h>
#include <link.h>
#include <time.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "sites/hooks/discovery.h"
#include "sites/hooks/hook_kind.h"
#include "tramway/hooks.h"

namespace {

constexpr const char* kLibraries[] = {"libc.so.6", "libsqlite3.so.0", "libz.so.1", "libpython3.11.so.1.0"};

double cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) / 1e6;
}

std::string basename_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// The relocator's message without what is particular to one function.
std::string reason_class(std::string r) {
  static const std::regex prefix("^cannot relocate the prologue of the function at 0x[0-9a-f]+: ");
  static const std::regex insn("`[^`]*` at 0x[0-9a-f]+\\+[0-9]+ ");
  static const std::regex address("0x[0-9a-f]+");
  static const std::regex number("\\b[0-9]+ bytes long");
  static const std::regex entry("entry [0-9]+ of");
  r = std::regex_replace(r, prefix, "");
  r = std::regex_replace(r, insn, "");
  r = std::regex_replace(r, address, "ADDR");
  r = std::regex_replace(r, number, "N bytes long");
  r = std::regex_replace(r, entry, "entry N of");
  return r;
}

void figure(const std::regex& keep, const std::string& name, double value) {
  if (!std::regex_search(name, keep)) return;
  std::printf("{\"name\": \"%s\", \"value\": %.2f, \"unit\": \"%%\"}\n", name.c_str(), value);
}

// The CPU cost of one object's discovery (reading its symbols) and of deciding every kind,
// measured on the internal steps hooks::functions() takes, for the lazy design's record.
void time_object(const std::string& lib) {
  struct Walk {
    const std::string& lib;
    double read_ms = -1, kinds_ms = 0;
    std::size_t functions = 0;
  } w{lib};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        auto& w = *static_cast<Walk*>(data);
        if (!info->dlpi_name || basename_of(info->dlpi_name) != w.lib) return 0;
        const double t0 = cpu_ms();
        auto o = tramway::sites::hooks::discover_object(*info, tramway::sites::hooks::Scope::all_functions);
        const double t1 = cpu_ms();
        if (!o.ok()) return 1;
        for (const auto& f : o->functions) (void)tramway::sites::hooks::classify_function(f.address, f.size);
        w.read_ms = t1 - t0;
        w.kinds_ms = cpu_ms() - t1;
        w.functions = o->functions.size();
        return 1;
      },
      &w);
  if (w.read_ms >= 0)
    std::fprintf(stderr, "coverage/%s: reading its symbols took %.1f ms of CPU, deciding the kinds of its %zu "
                 "functions %.1f ms\n", lib.c_str(), w.read_ms, w.functions, w.kinds_ms);
}

}  // namespace

int main(int argc, char** argv) {
  std::regex keep(".");
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--figures=", 10) == 0) keep = std::regex(argv[i] + 10, std::regex::ECMAScript);
  }
  std::vector<std::string> present;
  for (const char* lib : kLibraries) {
    if (dlopen(lib, RTLD_LAZY | RTLD_LOCAL)) present.push_back(lib);
    else std::fprintf(stderr, "coverage/%s: skipped, the library cannot be loaded (%s)\n", lib, dlerror());
  }
  const double before = cpu_ms();
  tramway::Result<std::vector<tramway::hooks::Function>> fns = tramway::hooks::functions();
  const double first = cpu_ms() - before;
  if (!fns.ok()) {
    std::fprintf(stderr, "coverage: %s\n", fns.status().message().c_str());
    return 1;
  }
  const double again_start = cpu_ms();
  (void)tramway::hooks::functions();
  std::fprintf(stderr, "coverage: functions() of every loaded object took %.1f ms of CPU (%zu functions), "
               "%.1f ms once cached\n", first, fns->size(), cpu_ms() - again_start);

  for (const std::string& lib : present) {
    std::size_t total = 0, relocatable = 0, trap = 0, by_policy = 0;
    std::map<std::string, std::size_t> reasons;
    for (const tramway::hooks::Function& f : *fns) {
      if (basename_of(f.object) != lib) continue;
      ++total;
      using tramway::hooks::HookKind;
      // The figures are the relocator's: a function tramway refuses whatever its bytes (its own
      // machinery calls it) is judged by its bytes here, and counted apart on stderr.
      HookKind kind = f.kind;
      std::string reason = f.reason;
      if (kind == HookKind::refused && f.size > 0) {
        const tramway::sites::hooks::HookKindOf k = tramway::sites::hooks::classify_function(f.entry, f.size);
        if (k.kind != HookKind::refused || k.reason != f.reason) {
          ++by_policy;
          kind = k.kind;
          reason = k.reason;
        }
      }
      if (kind == HookKind::relocatable || kind == HookKind::patchable) ++relocatable;
      else if (kind == HookKind::trap) ++trap;
      if (kind == HookKind::trap || kind == HookKind::refused)
        ++reasons[std::string(tramway::hooks::hook_kind_name(kind)) + ": " + reason_class(reason)];
    }
    if (total == 0) {
      std::fprintf(stderr, "coverage/%s: no sized function found\n", lib.c_str());
      continue;
    }
    time_object(lib);
    std::fprintf(stderr, "coverage/%s: %zu functions, %zu relocatable, %zu trap, %zu refused\n", lib.c_str(), total,
                 relocatable, trap, total - relocatable - trap);
    for (const auto& [why, n] : reasons) std::fprintf(stderr, "  %6zu  %s\n", n, why.c_str());
    if (by_policy) {
      std::fprintf(stderr, "  (%zu of them refused by tramway whatever their bytes: hooks::functions() lists why)\n",
                   by_policy);
    }
    figure(keep, "coverage/" + lib, 100.0 * static_cast<double>(relocatable) / static_cast<double>(total));
    figure(keep, "coverage/" + lib + "/with_trap",
           100.0 * static_cast<double>(relocatable + trap) / static_cast<double>(total));
  }
  return 0;
}
