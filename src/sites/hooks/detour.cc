// Detours: entry pads and relocated copies (see detour.h).
#include "sites/hooks/detour.h"

#include <atomic>
#include <cstring>

#include "common/format.h"

namespace tramway::sites::hooks {

namespace {

// Pads are carved from pages of generated code near the functions, 128 a page, never freed
// (under the hook tables' lock).
struct PadPage {
  text::CodeBlock block;
  std::size_t used = 0;
};
std::vector<PadPage> g_pad_pages;
constexpr std::size_t kPadPageSize = 4096;

std::atomic<void (*)(const text::CodeBlock&)> g_freed_hook{nullptr};

}  // namespace

Result<std::uintptr_t> take_entry_pad(std::uintptr_t function, const void* cell, std::uintptr_t run_start) {
  PadPage* page = nullptr;
  for (PadPage& p : g_pad_pages) {
    const auto rx = reinterpret_cast<std::uintptr_t>(p.block.rx);
    if (p.used < kPadPageSize && arch::rel32_reaches(function, rx) && arch::rel32_reaches(function, rx + kPadPageSize) &&
        pad_jmp_home(rx + p.used + kPadSiteOffset, run_start)) {
      page = &p;
      break;
    }
  }
  if (!page) {
    auto block = text::allocate_code_near(reinterpret_cast<const void*>(function), kPadPageSize);
    if (!block.ok()) {
      return Status::error("no room for an entry pad near " + common::hex_address(function) + ": " +
                           block.status().message());
    }
    std::memset(block->rw, arch::kInt3, kPadPageSize);
    g_pad_pages.push_back({*block, 0});
    page = &g_pad_pages.back();
  }
  std::uint8_t* rw = page->block.rw + page->used;
  const auto pad = reinterpret_cast<std::uintptr_t>(page->block.rx) + page->used;
  const auto home = pad_jmp_home(pad + kPadSiteOffset, run_start);
  if (!home) return Status::error("internal: an entry pad out of rel32 reach of " + common::hex_address(function));
  page->used += kPadSize;
  // Nothing has jumped here yet: plain stores through the RW view, ordered before any thread
  // can arrive by the serialisations of the batch that writes the function's jmp.
  std::memcpy(rw, &cell, sizeof cell);
  std::memcpy(rw + kPadSiteOffset, arch::kNop5.data(), arch::kNop5.size());
  std::memcpy(rw + kPadJmpOffset, home->data(), home->size());
  return pad + kPadSiteOffset;
}

std::optional<std::uintptr_t> Detour::continuation(std::uintptr_t pc) const noexcept {
  if (pc <= plan->run_start || pc >= plan->run_end()) return std::nullopt;
  for (const arch::Boundary& b : boundaries)
    if (plan->run_start + b.run_offset == pc) return copy + b.copy_offset;
  return std::nullopt;
}

std::optional<std::uintptr_t> Detour::original(std::uintptr_t pc) const noexcept {
  for (const arch::Boundary& b : boundaries)
    if (copy + b.copy_offset == pc) return plan->run_start + b.run_offset;
  return std::nullopt;
}

std::vector<text::PcMove> Detour::moves() const {
  std::vector<text::PcMove> out;
  for (std::size_t i = 1; i < boundaries.size(); ++i) {
    const std::uintptr_t end = i + 1 < boundaries.size() ? plan->run_start + boundaries[i + 1].run_offset : plan->run_end();
    out.push_back({plan->run_start + boundaries[i].run_offset, end, copy + boundaries[i].copy_offset});
  }
  return out;
}

Result<Detour> build_detour(std::shared_ptr<const arch::RelocationPlan> plan, std::uintptr_t pad_site) {
  const std::size_t size = arch::max_relocated_size(*plan);
  auto block = text::allocate_code_near(reinterpret_cast<const void*>(plan->run_start), size);
  if (!block.ok()) {
    return Status::error("no room for a detour near " + common::hex_address(plan->function) + ": " +
                         block.status().message());
  }
  Detour d;
  d.block = *block;
  d.copy = reinterpret_cast<std::uintptr_t>(d.block.rx);
  auto code = arch::emit_relocated(*plan, d.copy);
  const auto jmp = arch::encode_jmp(plan->run_start, pad_site);
  const auto pad_jmp = arch::encode_jmp(pad_site + arch::kRel32InsnSize, d.copy);
  if (!code.ok() || !jmp || !pad_jmp) {
    text::free_code(d.block);  // nothing has run here yet
    if (!code.ok()) return code.status();
    return Status::error("internal: the detour of " + common::hex_address(plan->function) + " is out of rel32 reach");
  }
  std::memcpy(d.block.rw, code->bytes.data(), code->bytes.size());
  d.boundaries = std::move(code->boundaries);
  d.jmp = *jmp;
  d.pad_jmp = *pad_jmp;
  d.plan = std::move(plan);
  return d;
}

std::optional<arch::Insn5> pad_jmp_home(std::uintptr_t pad_site, std::uintptr_t run_start) {
  return arch::encode_jmp(pad_site + arch::kRel32InsnSize, run_start);
}

void free_detour(const text::CodeBlock& copy) {
  if (auto* hook = g_freed_hook.load(std::memory_order_acquire)) {
    hook(copy);
    return;
  }
  text::free_code(copy);
}

void testing::set_detour_freed_hook(void (*hook)(const text::CodeBlock& copy)) {
  g_freed_hook.store(hook, std::memory_order_release);
}

}  // namespace tramway::sites::hooks
