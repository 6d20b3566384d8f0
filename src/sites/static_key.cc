// Static keys: the jump tables of loaded objects, indexed by key, switched in batches.
// All state here is guarded by the text layer's PatchLock, so "update the tables" and
// "patch the code" are one step that dlopen/dlclose and fork() see whole.
#include "tramway/static_key.h"

#include <cstdio>
#include <unordered_map>
#include <vector>

#include "arch/x86_64/insn.h"
#include "tramway/text/patch.h"
#include "common/unload_freed.h"

namespace tramway {
namespace {

using detail::JumpEntry;

struct Table {
  const JumpEntry* begin;
  const JumpEntry* end;
  int references;  // one per translation unit of the object that included static_key.h
};

struct Registry {
  std::vector<Table> tables;
  std::unordered_map<const StaticKey*, std::vector<const JumpEntry*>> by_key;
};
common::UnloadFreed<Registry> g_registry;  // kept until unload: objects unregister during exit
Registry& registry() { return g_registry.get(); }

const StaticKey* key_of(const JumpEntry& e) { return reinterpret_cast<const StaticKey*>(e.key & ~std::uintptr_t{1}); }

// jmp when (enabled XOR likely): an unlikely branch jumps to its "true" code, a likely one
// to its "false" code.
Status add_entry(text::PatchBatch& batch, const JumpEntry& e, bool enabled) {
  const bool jump = enabled != bool(e.key & 1);
  if (!jump) return batch.add(reinterpret_cast<void*>(e.code), arch::kNop5);
  const auto jmp = arch::encode_jmp(e.code, e.target);
  if (!jmp) return Status::error("static-key branch target out of rel32 reach (corrupt jump table?)");
  return batch.add(reinterpret_cast<void*>(e.code), *jmp);
}

}  // namespace

// Key state lives in StaticKey::enabled_, which only this file writes (under the lock).
Status KeyBatch::commit() {
  text::PatchLock lock;
  // Fold the changes into one final value per key, in first-touched order.
  std::unordered_map<StaticKey*, bool> final_value;
  std::vector<StaticKey*> order;
  for (auto& [key, op] : changes_) {
    auto it = final_value.find(key);
    const bool current = it != final_value.end() ? it->second : key->enabled();
    if (it == final_value.end()) order.push_back(key);
    final_value[key] = op == kFlip ? !current : op == kOn;
  }
  std::vector<std::pair<StaticKey*, bool>> previous;
  text::PatchBatch batch;
  Registry& reg = registry();
  std::size_t sites = 0;
  for (StaticKey* key : order) {
    if (auto it = reg.by_key.find(key); it != reg.by_key.end()) sites += it->second.size();
  }
  batch.reserve(sites);
  for (StaticKey* key : order) {
    const bool value = final_value[key];
    if (key->enabled() == value) continue;
    previous.emplace_back(key, key->enabled());
    if (auto it = reg.by_key.find(key); it != reg.by_key.end()) {
      for (const JumpEntry* e : it->second) {
        if (Status s = add_entry(batch, *e, value); !s.ok()) return s;
      }
    }
  }
  // Published before the code changes, so enabled() is never behind the code.
  for (auto& [key, old] : previous) key->enabled_.store(!old, std::memory_order_relaxed);
  if (Status s = text::apply(batch, lock); !s.ok()) {
    for (auto& [key, old] : previous) key->enabled_.store(old, std::memory_order_relaxed);
    return s;
  }
  changes_.clear();
  return {};
}

std::size_t branch_count(const StaticKey& key) {
  text::PatchLock lock;
  auto& m = registry().by_key;
  auto it = m.find(&key);
  return it == m.end() ? 0 : it->second.size();
}

namespace detail {

void register_jump_table(const JumpEntry* begin, const JumpEntry* end) noexcept {
  if (!begin || begin == end) return;
  text::PatchLock lock;
  Registry& reg = registry();
  for (Table& t : reg.tables) {
    if (t.begin == begin) {
      ++t.references;
      return;
    }
  }
  reg.tables.push_back({begin, end, 1});
  // A key may have changed before this object loaded: bring its branches in line.
  text::PatchBatch batch;
  for (const JumpEntry* e = begin; e != end; ++e) {
    const StaticKey* key = key_of(*e);
    reg.by_key[key].push_back(e);
    if (key->enabled() != key->initial()) {
      if (Status s = add_entry(batch, *e, key->enabled()); !s.ok()) {
        std::fprintf(stderr, "tramway: static key branch at %#lx: %s\n", static_cast<unsigned long>(e->code),
                     s.message().c_str());
      }
    }
  }
  if (Status s = text::apply(batch, lock); !s.ok()) {
    std::fprintf(stderr, "tramway: bringing a loaded object's static-key branches in line failed: %s\n",
                 s.message().c_str());
  }
}

void unregister_jump_table(const JumpEntry* begin) noexcept {
  if (!begin) return;
  text::PatchLock lock;
  Registry& reg = registry();
  for (auto t = reg.tables.begin(); t != reg.tables.end(); ++t) {
    if (t->begin != begin || --t->references > 0) continue;
    // One pass per key, not per entry: a key with many branches would otherwise cost
    // quadratic time at dlclose and exit.
    const JumpEntry* const b = t->begin;
    const JumpEntry* const e = t->end;
    auto in_table = [&](const JumpEntry* p) { return p >= b && p < e; };
    for (const JumpEntry* p = b; p != e; ++p) {
      auto it = reg.by_key.find(key_of(*p));
      if (it == reg.by_key.end()) continue;
      if (std::erase_if(it->second, in_table) && it->second.empty()) reg.by_key.erase(it);
    }
    reg.tables.erase(t);
    return;
  }
}

}  // namespace detail
}  // namespace tramway
