/* Offsets the hook stubs' fast path (hook_entry.S) reads, shared with the C++ that owns the
 * structures (sites/hooks/hooks.cc static_asserts each one against offsetof), so a layout
 * change that forgets the assembly fails to compile instead of corrupting calls. Plain
 * macros: included by the assembler and by C++. */
#ifndef TRAMWAY_ARCH_X86_64_HOOK_LAYOUT_H
#define TRAMWAY_ARCH_X86_64_HOOK_LAYOUT_H

/* tramway::hooks::Ops (public, tramway/hooks.h) */
#define TRAMWAY_OPS_ENTRY 0
#define TRAMWAY_OPS_STATE 24
/* tramway::hooks::Ops::State */
#define TRAMWAY_STATE_ENABLED 0  /* a byte: 1 while enabled */
#define TRAMWAY_STATE_EXTENDED 2 /* a byte: 1 for save_extended_state */
#define TRAMWAY_STATE_ID 4       /* 32 bits: the ops' counter index */
/* SiteCell: the word at a site's entry - 8 points at it */
#define TRAMWAY_CELL_TARGET 0
#define TRAMWAY_CELL_INDEX 8
/* SlotData of a direct trampoline */
#define TRAMWAY_SLOT_TAG 0
#define TRAMWAY_SLOT_OPS 8
#define TRAMWAY_SLOT_INDEX 16
/* CounterBlock: per-thread hit counters */
#define TRAMWAY_MAX_OPS 4096
#define TRAMWAY_MAX_SITES (1 << 20)
#define TRAMWAY_BLOCK_HITS 16
#define TRAMWAY_BLOCK_SITE_HITS (TRAMWAY_BLOCK_HITS + 8 * TRAMWAY_MAX_OPS)

#endif /* TRAMWAY_ARCH_X86_64_HOOK_LAYOUT_H */
