// Function-hook sites: every patchable function entry of the loaded objects, with its name.
//
// A function compiled with -fpatchable-function-entry=13,8 has a 16-byte-aligned 8-byte
// literal slot before its entry and 5 bytes of nops at it; the object's
// __patchable_function_entries section lists `entry - 8` for each such function. Discovery
// reads that section from memory (so PIE and shared-object entries are already relocated),
// keeps only entries that lie in an executable segment of their own object, and names them
// from the object's file (.symtab, else .dynsym). It only reads: no code or data is changed.
//
// Every other function of the object is listed too: each sized STT_FUNC symbol of .symtab,
// else .dynsym (a stripped distribution library keeps only its exported functions), whose
// bytes lie in an executable segment. Not STT_GNU_IFUNC: an ifunc symbol is its resolver,
// which the loader runs once at relocation; calls go to the implementation it returns, which
// is listed under its own (local, .symtab) symbol when the object has one. How such a
// function can be hooked is decided later, lazily (sites/hooks/hook_kind.h).
#pragma once

#include <link.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tramway/status.h"

namespace tramway::sites::hooks {

// What the 5 bytes at the entry hold now.
enum class EntryForm {
  nop5,    // one 5-byte nop (0f 1f 44 00 xx): Clang's entry, or a GCC entry once normalised
  nop1x5,  // five 1-byte nops: GCC's entry, to be normalised before it is first enabled
  other,   // anything else: already patched, or not a form tramway knows
};

struct EntrySite {
  std::uintptr_t entry = 0;  // runtime address of the function entry (listed address + 8)
  std::string name;          // demangled symbol name; empty when the object has no symbol for it
  std::string symbol;        // raw symbol name; empty when none
  EntryForm form = EntryForm::other;
  std::size_t size = 0;      // the symbol's size; 0 when none
};

// A function without a patchable entry. Aliases (one address, several symbols) are one
// function, named by the rule of name_rank (discovery.cc).
struct FunctionSymbol {
  std::uintptr_t address = 0;  // runtime address of its first byte
  std::size_t size = 0;        // the symbol's size, never 0
  std::string name;            // demangled
  std::string symbol;          // raw
};

struct ObjectSites {
  std::string path;              // the file discovery read; the main executable via /proc/self/exe
  std::uintptr_t base = 0;       // load bias (dlpi_addr): runtime address - link-time address
  std::vector<EntrySite> sites;  // sorted by entry, no duplicates
  std::vector<FunctionSymbol> functions;  // the others, sorted by address, one per address
};

// What discover_object reads: the patchable entries (and their names) only, or every function
// too (the symbol tables of objects without entries: a few milliseconds an object, mostly
// demangling, which listing patchable functions or attaching to them never needs).
enum class Scope { patchable_entries, all_functions };

// Every object loaded now, in load order (the main executable first). Objects are read while
// the loader lock is held, so none can be unloaded half-way. Objects without the section
// (or without a file, like the vDSO) have no sites. One object's failure (e.g. its file was
// replaced since it was loaded) does not hide the others: each element is its own result.
std::vector<Result<ObjectSites>> discover_loaded_objects(Scope scope = Scope::patchable_entries);

// What the entry of a discovered site holds now (forms change as sites are patched).
EntryForm form_at(std::uintptr_t entry);

// One object, as dl_iterate_phdr reports it. The caller keeps the object loaded meanwhile
// (call it from a dl_iterate_phdr callback, or hold a dlopen handle).
// `functions` stays empty unless `scope` is all_functions.
Result<ObjectSites> discover_object(const dl_phdr_info& info, Scope scope = Scope::patchable_entries);

}  // namespace tramway::sites::hooks
