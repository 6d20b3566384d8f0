// Function-hook site discovery: the object's file (opened with libelf) says where the
// __patchable_function_entries section is and which symbol sits at each entry; the values
// and the entry bytes are read from memory, where the loader has already relocated them.
#include "sites/hooks/discovery.h"

#include <cxxabi.h>
#include <fcntl.h>
#include <gelf.h>
#include <libelf.h>
#include <sys/auxv.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "arch/x86_64/insn.h"

namespace tramway::sites::hooks {
namespace {

constexpr std::string_view kSection = "__patchable_function_entries";
constexpr std::uintptr_t kSlotBytes = 8;  // the listed address is the slot; the entry follows it
constexpr std::size_t kEntryBytes = 5;

struct ElfFile {
  int fd = -1;
  Elf* elf = nullptr;
  ElfFile() = default;
  ElfFile(const ElfFile&) = delete;
  ElfFile& operator=(const ElfFile&) = delete;
  ~ElfFile() {
    if (elf) elf_end(elf);
    if (fd >= 0) close(fd);
  }
};

Status elf_failure(const std::string& path, const std::string& what) {
  const int err = elf_errno();  // 0 when libelf itself did not fail
  return Status::error("site discovery: " + path + ": " + what + (err ? std::string(" (") + elf_errmsg(err) + ")" : ""));
}

// [addr, addr + size) lies inside one PT_LOAD segment of the object (an executable one if
// `exec`): memory that can be read without faulting while the object stays loaded.
bool loaded(const dl_phdr_info& info, std::uintptr_t addr, std::size_t size, bool exec) {
  for (int i = 0; i < info.dlpi_phnum; ++i) {
    const auto& ph = info.dlpi_phdr[i];
    if (ph.p_type != PT_LOAD || (exec && !(ph.p_flags & PF_X))) continue;
    const std::uintptr_t lo = info.dlpi_addr + ph.p_vaddr;
    if (addr >= lo && addr - lo <= ph.p_memsz && size <= ph.p_memsz - (addr - lo)) return true;
  }
  return false;
}

// The kernel maps the vDSO without a file behind it (and builds it without patchable entries).
bool is_vdso(const dl_phdr_info& info) {
  const auto ehdr = getauxval(AT_SYSINFO_EHDR);
  return ehdr && reinterpret_cast<std::uintptr_t>(info.dlpi_phdr) ==
                     ehdr + reinterpret_cast<const ElfW(Ehdr)*>(ehdr)->e_phoff;
}

// The loader names the main executable "".
Result<std::string> object_path(const dl_phdr_info& info) {
  if (info.dlpi_name && *info.dlpi_name) return std::string(info.dlpi_name);
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf);
  if (n < 0 || static_cast<std::size_t>(n) == sizeof buf) {
    const int e = n < 0 ? errno : ENAMETOOLONG;
    return Status::error(std::string("site discovery: cannot resolve the main executable through /proc/self/exe: ") +
                             std::strerror(e),
                         e);
  }
  return std::string(buf, static_cast<std::size_t>(n));
}

// Addresses come from the file but are read in memory, so the file must be the one that was
// loaded. A file replaced on disk since (a package upgrade, a rebuild) almost always differs
// in its program headers or its notes (the build id).
Status check_same_object(Elf* elf, const dl_phdr_info& info, const std::string& path) {
  auto mismatch = [&] {
    return Status::error("site discovery: " + path +
                         " is not the file that was loaded from that path (replaced on disk since?); restart the "
                         "process to hook its functions");
  };
  std::size_t count = 0;
  if (elf_getphdrnum(elf, &count) != 0 || count != info.dlpi_phnum) return mismatch();
  std::size_t raw_size = 0;
  const char* raw = elf_rawfile(elf, &raw_size);
  for (std::size_t i = 0; i < count; ++i) {
    GElf_Phdr f;
    const auto& m = info.dlpi_phdr[i];
    if (!gelf_getphdr(elf, static_cast<int>(i), &f) || f.p_type != m.p_type || f.p_flags != m.p_flags ||
        f.p_offset != m.p_offset || f.p_vaddr != m.p_vaddr || f.p_filesz != m.p_filesz || f.p_memsz != m.p_memsz)
      return mismatch();
    const std::uintptr_t note = info.dlpi_addr + f.p_vaddr;
    if (f.p_type == PT_NOTE && raw && f.p_offset + f.p_filesz <= raw_size && loaded(info, note, f.p_filesz, false) &&
        std::memcmp(raw + f.p_offset, reinterpret_cast<const void*>(note), f.p_filesz) != 0)
      return mismatch();
  }
  return {};
}

EntryForm read_form(std::uintptr_t entry) {
  std::uint8_t b[kEntryBytes];
  std::memcpy(b, reinterpret_cast<const void*>(entry), sizeof b);
  if (std::all_of(std::begin(b), std::end(b), [](std::uint8_t x) { return x == 0x90; })) return EntryForm::nop1x5;
  // The last byte is the displacement of `nopl disp8(%rax,%rax,1)`: Clang 14 writes 0x08 there,
  // tramway (arch::kNop5) 0x00; either way it is one instruction.
  if (std::equal(b, b + 4, arch::kNop5.begin())) return EntryForm::nop5;
  return EntryForm::other;
}

std::string demangle(const std::string& symbol) {
  // Only _Z names: __cxa_demangle also decodes type names, so a C function `i` would become "int".
  if (!symbol.starts_with("_Z")) return symbol;
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> d(abi::__cxa_demangle(symbol.c_str(), nullptr, nullptr, &status),
                                                &std::free);
  return status == 0 && d ? std::string(d.get()) : symbol;
}

// How good a name is among a function's aliases, lower is better: an exported name (global or
// weak) beats a local one, then the fewest leading underscores (`write` over `__write` and
// `__libc_write`: the name users call), then global beats weak; the first in the table breaks
// a tie, so the choice is stable per file.
int name_rank(unsigned bind, const char* name) {
  int underscores = 0;
  while (name[underscores] == '_' && underscores < 15) ++underscores;
  return (bind == STB_LOCAL ? 64 : 0) + underscores * 2 + (bind == STB_WEAK ? 1 : 0);
}

// Reads the STT_FUNC symbols of `symbols`: those at a site's link-time entry name the site;
// with `all`, every other one with a size whose bytes are loaded code becomes a function, one
// per address (aliases named by name_rank).
Status read_functions(Elf* elf, Elf_Scn* symbols, const dl_phdr_info& info, bool all, ObjectSites& out) {
  GElf_Shdr sh;
  Elf_Data* data = gelf_getshdr(symbols, &sh) ? elf_getdata(symbols, nullptr) : nullptr;
  if (!data || sh.sh_entsize == 0) return elf_failure(out.path, "cannot read its symbol table");
  struct Named {
    int rank = INT_MAX;
    EntrySite* site = nullptr;   // the site at that address, if any
    std::size_t function = SIZE_MAX;  // else its index in out.functions
  };
  std::unordered_map<GElf_Addr, Named> by_link_address;
  for (auto& s : out.sites) by_link_address[s.entry - out.base].site = &s;
  for (std::size_t i = 0; i < sh.sh_size / sh.sh_entsize; ++i) {
    GElf_Sym sym;
    if (!gelf_getsym(data, static_cast<int>(i), &sym) || GELF_ST_TYPE(sym.st_info) != STT_FUNC ||
        sym.st_shndx == SHN_UNDEF || sym.st_shndx >= SHN_LORESERVE)
      continue;
    const char* name = elf_strptr(elf, sh.sh_link, sym.st_name);
    if (!name || !*name) continue;
    auto it = by_link_address.find(sym.st_value);
    if (it == by_link_address.end()) {
      if (!all || sym.st_size == 0 || !loaded(info, out.base + sym.st_value, sym.st_size, true)) continue;
      it = by_link_address.emplace(sym.st_value, Named{}).first;
      it->second.function = out.functions.size();
      out.functions.push_back({out.base + sym.st_value, sym.st_size, {}, {}});
    }
    Named& n = it->second;
    if (n.site) n.site->size = std::max<std::size_t>(n.site->size, sym.st_size);
    else out.functions[n.function].size = std::max<std::size_t>(out.functions[n.function].size, sym.st_size);
    const int rank = name_rank(GELF_ST_BIND(sym.st_info), name);
    if (rank >= n.rank) continue;
    n.rank = rank;
    (n.site ? n.site->symbol : out.functions[n.function].symbol) = name;
  }
  for (auto& s : out.sites) s.name = s.symbol.empty() ? std::string() : demangle(s.symbol);
  for (auto& f : out.functions) f.name = demangle(f.symbol);
  std::sort(out.functions.begin(), out.functions.end(),
            [](const FunctionSymbol& a, const FunctionSymbol& b) { return a.address < b.address; });
  return {};
}

}  // namespace

Result<ObjectSites> discover_object(const dl_phdr_info& info, Scope scope) {
  ObjectSites out;
  out.base = info.dlpi_addr;
  if (is_vdso(info)) {
    out.path = info.dlpi_name ? info.dlpi_name : "";
    return out;
  }
  auto path = object_path(info);
  if (!path.ok()) return path.status();
  out.path = std::move(*path);

  static const bool libelf_ready = elf_version(EV_CURRENT) != EV_NONE;
  if (!libelf_ready) return elf_failure(out.path, "libelf does not support the current ELF version");
  ElfFile file;
  file.fd = open(out.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file.fd < 0) {
    const int e = errno;
    return Status::error("site discovery: cannot open " + out.path + " to read its patchable function entries: " +
                             std::strerror(e),
                         e);
  }
  file.elf = elf_begin(file.fd, ELF_C_READ_MMAP, nullptr);
  if (!file.elf || elf_kind(file.elf) != ELF_K_ELF || gelf_getclass(file.elf) != ELFCLASS64)
    return elf_failure(out.path, "not a 64-bit ELF file");
  if (Status st = check_same_object(file.elf, info, out.path); !st.ok()) return st;
  std::size_t shstrndx = 0;
  if (elf_getshdrstrndx(file.elf, &shstrndx) != 0) return elf_failure(out.path, "cannot read its section names");

  // Sections: the entry lists, where code is (runtime ranges), and the symbol tables.
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> code;
  std::vector<GElf_Shdr> lists;
  Elf_Scn *symtab = nullptr, *dynsym = nullptr;
  for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(file.elf, scn));) {
    GElf_Shdr sh;
    if (!gelf_getshdr(scn, &sh)) return elf_failure(out.path, "cannot read a section header");
    const char* name = elf_strptr(file.elf, shstrndx, sh.sh_name);
    const std::uintptr_t addr = out.base + sh.sh_addr;
    if (name && name == kSection) {
      // SHF_ALLOC and loaded, or reading it would fault: the file cannot be the loaded one.
      if (!(sh.sh_flags & SHF_ALLOC) || !loaded(info, addr, sh.sh_size, false))
        return Status::error("site discovery: " + out.path + ": " + std::string(kSection) +
                             " is not in a loaded segment (object linked by an unsupported tool?)");
      lists.push_back(sh);
    } else if ((sh.sh_flags & SHF_EXECINSTR) && (sh.sh_flags & SHF_ALLOC) && loaded(info, addr, sh.sh_size, true)) {
      code.emplace_back(addr, addr + sh.sh_size);
    } else if (sh.sh_type == SHT_SYMTAB) {
      symtab = scn;
    } else if (sh.sh_type == SHT_DYNSYM) {
      dynsym = scn;
    }
  }

  // The values in memory are relocated (link-time address + base; on disk they may be 0).
  // Entries of functions the linker discarded can read 0, the base (link-time 0: the ELF
  // header) or point anywhere: only slot + entry inside a code section of this object count.
  for (const GElf_Shdr& sh : lists) {
    const auto* values = reinterpret_cast<const std::uint8_t*>(out.base + sh.sh_addr);
    for (std::size_t off = 0; off + sizeof(std::uintptr_t) <= sh.sh_size; off += sizeof(std::uintptr_t)) {
      std::uintptr_t slot;
      std::memcpy(&slot, values + off, sizeof slot);
      const bool in_code = std::any_of(code.begin(), code.end(), [&](const auto& r) {
        return slot >= r.first && slot < r.second && kSlotBytes + kEntryBytes <= r.second - slot;
      });
      if (!in_code) continue;
      out.sites.emplace_back().entry = slot + kSlotBytes;
    }
  }
  std::sort(out.sites.begin(), out.sites.end(), [](const auto& a, const auto& b) { return a.entry < b.entry; });
  out.sites.erase(std::unique(out.sites.begin(), out.sites.end(),
                              [](const auto& a, const auto& b) { return a.entry == b.entry; }),
                  out.sites.end());
  for (auto& s : out.sites) s.form = read_form(s.entry);

  // .symtab names every function; a stripped object keeps only .dynsym (exported functions).
  const bool all = scope == Scope::all_functions;
  if (Elf_Scn* symbols = symtab ? symtab : dynsym; symbols && (all || !out.sites.empty()))
    if (Status st = read_functions(file.elf, symbols, info, all, out); !st.ok()) return st;
  return out;
}

std::vector<Result<ObjectSites>> discover_loaded_objects(Scope scope) {
  struct Walk {
    Scope scope;
    std::vector<Result<ObjectSites>> objects;
    bool out_of_memory = false;
  } walk{scope, {}, false};
  // Everything happens inside the callback: the loader lock held there keeps each object
  // mapped while it is read. No exception may cross dl_iterate_phdr: it would leave the lock held.
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) -> int {
        auto& w = *static_cast<Walk*>(data);
        try {
          w.objects.push_back(discover_object(*info, w.scope));
          return 0;
        } catch (const std::bad_alloc&) {
          w.out_of_memory = true;
          return 1;
        }
      },
      &walk);
  if (walk.out_of_memory) walk.objects.push_back(Status::error("site discovery ran out of memory"));
  return std::move(walk.objects);
}

EntryForm form_at(std::uintptr_t entry) { return read_form(entry); }

}  // namespace tramway::sites::hooks
