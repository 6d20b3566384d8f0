// tramway/text/code_memory.h — executable memory for generated code, W^X by construction.
//
// Each block is one piece of a memfd mapped twice: an RX view that threads execute and an
// RW view that tramway writes. No mapping is ever writable and executable. Blocks can be
// placed within +-2 GiB of a given address so that a rel32 jmp or call from there reaches
// every byte of the block. After fork() the child gets private copies of every block, so
// parent and child never patch each other's code.
//
// Freeing is the caller's business: a block may be released only once no thread can be
// running in it (see the grace layer).
#pragma once

#include <cstddef>
#include <cstdint>

#include "tramway/status.h"

namespace tramway::text {

struct CodeBlock {
  std::uint8_t* rx = nullptr;  // execute here
  std::uint8_t* rw = nullptr;  // write here; same bytes as rx
  std::size_t size = 0;
};

// A block of `size` bytes (16-byte aligned) anywhere in the address space.
Result<CodeBlock> allocate_code(std::size_t size);

// A block of `size` bytes every byte of which is within rel32 reach of `near` (a 5-byte
// jmp/call at `near` can reach the block, and the block can reach `near`). Fails with a
// message naming the address when that window of the address space is full.
Result<CodeBlock> allocate_code_near(const void* near, std::size_t size);

// Returns a block to its arena. Only after a grace period: see above.
void free_code(const CodeBlock& block);

// If `address` lies in a code block, the RW alias of it; otherwise nullptr.
std::uint8_t* writable_alias(const void* address) noexcept;

}  // namespace tramway::text
