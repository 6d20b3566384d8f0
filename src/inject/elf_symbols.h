// inject/elf_symbols.h — the address of an exported function in an ELF file on disk, for
// calling it in a process that mapped the file (libc's dlopen in the target).
//
// Reads .dynsym with libelf; of several versions of a name it takes the default one (the
// version a program linked today binds to: not marked hidden in .gnu.version).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tramway/status.h"

namespace tramway::inject {

// The st_value of each of `names` (in order) in `path`'s dynamic symbol table.
Result<std::vector<std::uintptr_t>> exported_functions(const std::string& path, const std::vector<std::string>& names);

}  // namespace tramway::inject
