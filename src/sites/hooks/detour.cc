// Detours (see detour.h).
#include "sites/hooks/detour.h"

#include <cstring>

#include "common/format.h"

namespace tramway::sites::hooks {

std::optional<std::uintptr_t> Detour::continuation(std::uintptr_t pc) const noexcept {
  if (pc <= plan.run_start || pc >= plan.run_end()) return std::nullopt;
  for (const arch::Boundary& b : boundaries)
    if (plan.run_start + b.run_offset == pc) return copy + b.copy_offset;
  return std::nullopt;
}

std::optional<std::uintptr_t> Detour::original(std::uintptr_t pc) const noexcept {
  for (const arch::Boundary& b : boundaries)
    if (copy + b.copy_offset == pc) return plan.run_start + b.run_offset;
  return std::nullopt;
}

Result<Detour> build_detour(arch::RelocationPlan plan) {
  const std::size_t size = kDetourCopyOffset + arch::max_relocated_size(plan);
  auto block = text::allocate_code_near(reinterpret_cast<const void*>(plan.run_start), size);
  if (!block.ok()) {
    return Status::error("no room for a detour near " + common::hex_address(plan.function) + ": " +
                         block.status().message());
  }
  Detour d;
  d.block = *block;
  const auto base = reinterpret_cast<std::uintptr_t>(d.block.rx);
  d.entry = base + kDetourSiteOffset;
  d.copy = base + kDetourCopyOffset;
  auto code = arch::emit_relocated(plan, d.copy);
  const auto jmp = arch::encode_jmp(plan.run_start, d.entry);
  if (!code.ok() || !jmp) {
    text::free_code(d.block);  // nothing has run here yet
    if (!code.ok()) return code.status();
    return Status::error("internal: the detour of " + common::hex_address(plan.function) + " is out of rel32 reach");
  }
  // The literal slot stays zero until the site first enters common mode (as in a fresh
  // patchable entry); the site holds Clang's 5-byte nop, which needs no normalisation.
  std::memset(d.block.rw, 0, kDetourSiteOffset);
  std::memcpy(d.block.rw + kDetourSiteOffset, arch::kNop5.data(), arch::kNop5.size());
  std::memcpy(d.block.rw + kDetourCopyOffset, code->bytes.data(), code->bytes.size());
  d.boundaries = std::move(code->boundaries);
  d.jmp = *jmp;
  d.plan = std::move(plan);
  return d;
}

}  // namespace tramway::sites::hooks
