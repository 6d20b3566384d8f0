// Direct trampoline slots (Ops::direct): the pool of slots near sites, which a site whose only
// ops is direct calls instead of the common entry's thunk. Which site calls which slot, and
// when a slot is retired, is the site state machine's (sites.cc).
//
// A chunk is one page of generated code near some sites: kSlotsPerChunk slots of 16 bytes,
//   lea data_i(%rip), %r11             ; this slot's SlotData
//   jmp *stub(%rip)                    ; tramway_hook_direct, its address at kDataOffset - 8
//   int3 x 3
// then, from kDataOffset on (cache lines no code shares, so writing them never disturbs a
// line being executed), each slot's SlotData. Code is written once, when the chunk is made,
// and chunks are never unmapped: slots are type-stable. A slot gets an owner (a site and a
// direct ops) by its data: the ops' State first, then the tag (the site's body, entry + 5)
// with release.
// The data then stays as it is for as long as that ops is attached to that site, even while
// the site goes through the common entry because other ops joined it: a thread that called
// the slot earlier and was preempted before its marker still runs the ops, so no call is
// lost, and the site takes the same slot again when the ops is alone there once more.
// Retiring a slot (its ops detached, or the object unloaded): the tag is cleared, the site
// stops calling it (batch), a trace-flavor grace period passes, and only then may another
// owner have it. A thread that called it before and raised its marker after the clear reads
// a tag that is 0 or another site's, and returns into the function untraced.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "arch/x86_64/insn.h"
#include "sites/hooks/internal.h"
#include "tramway/text/code_memory.h"

extern "C" void tramway_hook_direct();  // hook_entry.S

namespace tramway::hooks::detail {
namespace {

constexpr std::size_t kChunkSize = 4096, kSlotCodeSize = 16, kDataOffset = 2048;
constexpr std::size_t kSlotsPerChunk = (kChunkSize - kDataOffset) / sizeof(SlotData);
static_assert(kSlotsPerChunk * kSlotCodeSize + 8 <= kDataOffset);

struct Chunk {
  text::CodeBlock block;
  std::vector<std::uint16_t> free;  // slot indices
};
std::vector<Chunk> g_chunks;  // under g_mu; permanent

DirectSlot slot_of(const Chunk& c, std::size_t i) {
  return {reinterpret_cast<std::uintptr_t>(c.block.rx) + i * kSlotCodeSize,
          reinterpret_cast<SlotData*>(c.block.rw + kDataOffset) + i};
}

}  // namespace

Result<DirectSlot> take_slot_near(std::uintptr_t entry) {
  for (Chunk& c : g_chunks) {
    if (c.free.empty() || !arch::encode_call(entry, reinterpret_cast<std::uintptr_t>(c.block.rx)) ||
        !arch::encode_call(entry, reinterpret_cast<std::uintptr_t>(c.block.rx) + kDataOffset)) {
      continue;
    }
    const std::size_t i = c.free.back();
    c.free.pop_back();
    return slot_of(c, i);
  }
  auto block = text::allocate_code_near(reinterpret_cast<const void*>(entry), kChunkSize);
  if (!block.ok()) return block.status();
  Chunk c{*block, {}};
  std::memset(c.block.rw, arch::kInt3, kDataOffset);
  for (std::size_t i = 0; i < kSlotsPerChunk; ++i) {
    std::uint8_t* code = c.block.rw + i * kSlotCodeSize;
    const auto lea = static_cast<std::int32_t>(kDataOffset + i * sizeof(SlotData)) -
                     static_cast<std::int32_t>(i * kSlotCodeSize + 7);
    const auto jmp = static_cast<std::int32_t>(kDataOffset - 8) - static_cast<std::int32_t>(i * kSlotCodeSize + 13);
    const std::uint8_t lea_r11[3] = {0x4c, 0x8d, 0x1d}, jmp_mem[2] = {0xff, 0x25};
    std::memcpy(code, lea_r11, 3);
    std::memcpy(code + 3, &lea, 4);
    std::memcpy(code + 7, jmp_mem, 2);
    std::memcpy(code + 9, &jmp, 4);
  }
  const auto stub = reinterpret_cast<std::uintptr_t>(&tramway_hook_direct);
  std::memcpy(c.block.rw + kDataOffset - 8, &stub, sizeof stub);
  std::memset(c.block.rw + kDataOffset, 0, kChunkSize - kDataOffset);  // every tag 0
  for (std::size_t i = kSlotsPerChunk; i-- > 1;) c.free.push_back(static_cast<std::uint16_t>(i));
  g_chunks.push_back(std::move(c));
  return slot_of(g_chunks.back(), 0);
}

void give_back_slot(const DirectSlot& slot) {  // after its grace period; under g_mu
  for (Chunk& c : g_chunks) {
    const auto rx = reinterpret_cast<std::uintptr_t>(c.block.rx);
    if (slot.code >= rx && slot.code < rx + kDataOffset) {
      c.free.push_back(static_cast<std::uint16_t>((slot.code - rx) / kSlotCodeSize));
      return;
    }
  }
}

}  // namespace tramway::hooks::detail
