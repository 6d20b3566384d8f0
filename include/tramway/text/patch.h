// tramway/text/patch.h — rewrite instructions that other threads may be executing.
//
// A PatchBatch collects instruction replacements and applies them with the kernel's
// text_poke_bp_batch protocol: int3 on every head; serialize; write every tail; serialize;
// write every head; serialize. At every instant any thread fetching a patched range sees the
// old instruction, the new one, or an int3 at its head; the SIGTRAP router emulates the new
// instruction for a thread that hits the int3. Serialize is
// membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE): at most 3 a batch, whatever its size.
//
// Program text is written through /proc/self/mem and generated code through the RW view of
// its memfd, so no mapping is ever writable and executable, and no page loses execute
// permission. Writes are coalesced: one write per touched page per phase.
//
// A range that holds a run of 1-byte nops (GCC's patchable entry: 90 90 90 90 90) may be
// replaced too, by add_over_nops: a thread may be between two of the nops, so after the
// int3s are serialised and before any tail is written, every PC inside such a run (live or
// in a nested signal frame) is moved to its end, all runs in one move_pcs round.
//
// The entry of a function whose first instructions were copied elsewhere (a detour: DESIGN
// "Hooks on any function") may be replaced too, by add_displacing: a thread may be at any
// instruction boundary of the run, so in that same round every PC inside it is moved to the
// matching instruction of the copy. add_resuming puts such a run's original bytes back: a
// thread that traps at its head meanwhile resumes in the copy, which does what they do.
//
// Batches are serialised by one process-wide lock that fork() respects: a child never
// inherits a half-patched site.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "tramway/status.h"
#include "tramway/text/signal_router.h"

namespace tramway::text {

// Longest replacement one patch may carry (bytes).
inline constexpr std::size_t kMaxPatchBytes = 16;

class PatchBatch {
 public:
  // Queues "write new_bytes at address". The first instruction of new_bytes is the one a
  // trapped thread executes (it must be a nop, jmp, call, ret or `xor eax,eax; ret`); any
  // bytes after a ret/jmp are padding. The range must be entered only at its head: either
  // its current first instruction spans the whole range, or it does not fall through
  // (checked by apply, against the bytes there then). A first nop shorter than new_bytes
  // must be followed by nops only: a trapped thread skips them all rather than resume inside
  // a range being written. An error says which rule was broken.
  Status add(void* address, std::span<const std::uint8_t> new_bytes);

  // Like add, for a range that holds a run of 1-byte nops (0x90) and may be entered between
  // them: fails now unless every byte of the range is 0x90. apply moves the threads that are
  // inside the run out of it (see above). If the range no longer holds the run when the
  // batch is applied (someone normalised it meanwhile), add's rule applies instead.
  Status add_over_nops(void* address, std::span<const std::uint8_t> new_bytes);

  // Like add, for the first bytes of a run of instructions that were copied to a detour, which
  // a thread may be inside (at any instruction boundary). `new_bytes` must be a jmp or call;
  // `moves` send each boundary behind the head to the copy's instruction: sorted, disjoint,
  // each beginning inside (address, address + 16]. apply moves every PC in them (live or
  // nested) after the int3 is serialised and before any tail is written. The caller answers
  // for the moves covering every boundary of the bytes the run's first instructions span, and
  // for no branch targeting the inside of the run (the relocator's refusals).
  Status add_displacing(void* address, std::span<const std::uint8_t> new_bytes, std::span<const PcMove> moves);

  // Like add, for bytes whose first instruction need not be one a trapped thread can be
  // carried past (a relocated run's original instructions, put back): a thread that traps at
  // the head resumes at `resume_at`, which must compute what the new bytes do (the detour's
  // copy of them). The current bytes must be entered only at their head, as for add.
  Status add_resuming(void* address, std::span<const std::uint8_t> new_bytes, std::uintptr_t resume_at);

  // How long apply waits for threads to answer the PC fix-up of add_over_nops ranges. A
  // thread that cannot answer (stopped by a debugger inside a run) fails the batch, which is
  // rolled back.
  void set_fixup_timeout(std::chrono::milliseconds t) noexcept { fixup_timeout_ = t; }
  std::chrono::milliseconds fixup_timeout() const noexcept { return fixup_timeout_; }

  void reserve(std::size_t n) { patches_.reserve(n); }
  std::size_t size() const noexcept { return patches_.size(); }
  bool empty() const noexcept { return patches_.empty(); }
  void clear() noexcept {
    patches_.clear();
    moves_.clear();
  }

  struct Patch {
    std::uintptr_t address;
    std::uint8_t length;
    std::uint8_t bytes[kMaxPatchBytes];
    bool over_nops;  // queued by add_over_nops
    std::uintptr_t resume_at = 0;  // add_resuming: where a thread trapped at the head goes
    bool displacing = false;       // queued by add_displacing
    std::uint32_t first_move = 0, move_count = 0;  // its moves in moves() (none for a one-instruction run)
    // How a thread trapped at the head is carried on, decoded once when queued (arch::Emulation's
    // kind, length and target; internal to text::apply).
    std::uint8_t head_kind = 0, head_length = 0;
    std::uintptr_t head_target = 0;
  };
  const std::vector<Patch>& patches() const noexcept { return patches_; }
  const std::vector<PcMove>& moves() const noexcept { return moves_; }

 private:
  Status queue(void* address, std::span<const std::uint8_t> new_bytes, bool over_nops);
  std::vector<Patch> patches_;
  std::vector<PcMove> moves_;
  std::chrono::milliseconds fixup_timeout_{2000};
};

// Holds the process-wide patch lock. Layers above the text layer (static keys, static
// calls, hooks) take it around "read tables, build batch, apply" so that table updates and
// code updates are one atomic step. fork() takes it too, in the order of tramway's internal
// src/common/lock_order.h.
class PatchLock {
 public:
  PatchLock();
  ~PatchLock();
  PatchLock(const PatchLock&) = delete;
  PatchLock& operator=(const PatchLock&) = delete;
};

// Applies the batch. Patches whose target bytes already hold new_bytes are skipped; an
// empty (or all-skipped) batch costs no serialisation.
Status apply(const PatchBatch& batch);
Status apply(const PatchBatch& batch, const PatchLock& held);

// Writes bytes that no thread can be executing (for example a fresh trampoline, or the
// unreachable tail after a ret) without the int3 protocol, honouring W^X.
Status write_unexecuted(void* address, std::span<const std::uint8_t> bytes);
// Many such writes, one write per touched page.
struct UnexecutedWrite {
  void* address;
  std::span<const std::uint8_t> bytes;
};
Status write_unexecuted(std::span<const UnexecutedWrite> writes);

// Writes single bytes at the heads of instructions other threads may be executing (a trap
// probe's int3, or the byte it replaced) and returns once every core has seen them: one
// serialisation for all. A byte is fetched whole, so a thread sees the old instruction or the
// int3, never a mix. Whoever writes an int3 so has first told the SIGTRAP router what to do
// with it (sites/hooks' trap probes), and keeps telling it until the old byte is back.
struct ByteWrite {
  void* address;
  std::uint8_t byte;
};
Status write_instruction_bytes(std::span<const ByteWrite> writes);

// Reads code that may be unmapped meanwhile: an error (EIO) instead of SIGSEGV when it is.
Status read_code(const void* address, std::span<std::uint8_t> out);

// Counters since process start, for tests and benchmarks.
struct PatchStats {
  std::uint64_t batches = 0;            // batches that changed at least one byte
  std::uint64_t serialisations = 0;     // membarrier(SYNC_CORE) calls
  std::uint64_t page_writes = 0;        // writes issued to program text or code views
  std::uint64_t traps_emulated = 0;     // int3 hits emulated as the new instruction
  std::uint64_t traps_restarted = 0;    // int3 hits whose int3 was already gone (re-executed)
  std::uint64_t nop_runs_replaced = 0;  // add_over_nops ranges applied while they held a nop run
  std::uint64_t pcs_moved = 0;          // PCs moved out of such runs and relocated ones (live or nested)
  std::uint64_t runs_displaced = 0;     // add_displacing ranges applied
};
PatchStats stats() noexcept;

}  // namespace tramway::text
