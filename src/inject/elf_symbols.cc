#include "inject/elf_symbols.h"

#include <fcntl.h>
#include <gelf.h>
#include <libelf.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace tramway::inject {

Result<std::vector<std::uintptr_t>> exported_functions(const std::string& path, const std::vector<std::string>& names) {
  elf_version(EV_CURRENT);
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::error("cannot open " + path + ": " + std::strerror(errno), errno);
  Elf* elf = elf_begin(fd, ELF_C_READ, nullptr);
  struct Close {
    int fd;
    Elf* elf;
    ~Close() {
      if (elf) elf_end(elf);
      close(fd);
    }
  } closer{fd, elf};
  if (!elf || elf_kind(elf) != ELF_K_ELF) return Status::error(path + " is not an ELF file");
  Elf_Scn* dynsym = nullptr;
  Elf_Scn* versym = nullptr;
  for (Elf_Scn* s = nullptr; (s = elf_nextscn(elf, s));) {
    GElf_Shdr h;
    if (!gelf_getshdr(s, &h)) continue;
    if (h.sh_type == SHT_DYNSYM) dynsym = s;
    if (h.sh_type == SHT_GNU_versym) versym = s;
  }
  if (!dynsym) return Status::error(path + " has no dynamic symbol table");
  GElf_Shdr dh;
  gelf_getshdr(dynsym, &dh);
  Elf_Data* syms = elf_getdata(dynsym, nullptr);
  Elf_Data* vers = versym ? elf_getdata(versym, nullptr) : nullptr;
  const std::size_t count = dh.sh_entsize ? dh.sh_size / dh.sh_entsize : 0;

  std::vector<std::uintptr_t> out(names.size(), 0);
  std::vector<bool> is_default(names.size(), false);
  for (std::size_t i = 0; i < count; ++i) {
    GElf_Sym sym;
    if (!gelf_getsym(syms, static_cast<int>(i), &sym) || sym.st_shndx == SHN_UNDEF || sym.st_value == 0) continue;
    if (GELF_ST_TYPE(sym.st_info) != STT_FUNC && GELF_ST_TYPE(sym.st_info) != STT_GNU_IFUNC) continue;
    const char* name = elf_strptr(elf, dh.sh_link, sym.st_name);
    if (!name) continue;
    for (std::size_t k = 0; k < names.size(); ++k) {
      if (names[k] != name) continue;
      GElf_Versym v = 0;
      const bool hidden = vers && gelf_getversym(vers, static_cast<int>(i), &v) && (v & 0x8000);
      if (out[k] == 0 || (!hidden && !is_default[k])) {
        out[k] = static_cast<std::uintptr_t>(sym.st_value);
        is_default[k] = !hidden;
      }
    }
  }
  for (std::size_t k = 0; k < names.size(); ++k) {
    if (out[k] == 0) return Status::error(path + " exports no function " + names[k], ENOENT);
  }
  return out;
}

}  // namespace tramway::inject
