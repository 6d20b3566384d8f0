// The bounds of the function that holds a PC, from an object's .eh_frame_hdr search table
// (PT_GNU_EH_FRAME) and the FDE it points to.
//
// For code that runs in a signal handler: no locks, no allocation, only reads of the mapped
// table and FDEs (the caller keeps the object mapped). Handles the table encoding every
// linker writes (datarel sdata4) and FDE pointer encodings of 4 and 8 bytes; anything else is
// "not found".
#pragma once

#include <cstdint>

namespace tramway::common {

struct FunctionBounds {
  std::uintptr_t begin = 0, end = 0;  // [begin, end); empty when not found
  bool found() const noexcept { return end > begin; }
};

// `hdr` is the runtime address of the object's .eh_frame_hdr.
FunctionBounds function_containing(std::uintptr_t hdr, std::uintptr_t pc) noexcept;

}  // namespace tramway::common
