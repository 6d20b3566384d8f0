/* Offsets the hook stubs' fast path (hook_entry.S) reads, shared with the C++ that owns the
 * structures (sites/hooks/internal.h static_asserts each one against offsetof), so a layout
 * change that forgets the assembly fails to compile instead of corrupting calls. Plain
 * macros: included by the assembler and by C++. */
#ifndef TRAMWAY_ARCH_X86_64_HOOK_LAYOUT_H
#define TRAMWAY_ARCH_X86_64_HOOK_LAYOUT_H

/* tramway::hooks::Ops::State: what a cell or a direct slot with one ops names */
#define TRAMWAY_STATE_FAST 0  /* a byte: one of TRAMWAY_FAST_* */
#define TRAMWAY_STATE_ID 4    /* 32 bits: the ops' counter index */
#define TRAMWAY_STATE_ENTRY 8 /* the entry callback */
#define TRAMWAY_STATE_OPS 16  /* the Ops, the callback's first argument */
/* Ops::State::fast */
#define TRAMWAY_FAST_NONE 0   /* disabled, or extended state: the dispatcher runs it */
#define TRAMWAY_FAST_SAVING 1 /* inline, xmm0-7 saved around the callback */
#define TRAMWAY_FAST_LEAN 2   /* inline, xmm0-7 untouched: the callback was proven not to touch them */
/* SiteCell: the word at a site's entry - 8 points at it */
#define TRAMWAY_CELL_TARGET 0
#define TRAMWAY_CELL_INDEX 8
/* The function the callbacks are told of, in a cell and in a direct slot's data alike (the
 * stubs read it through either): the site's own entry, or the function a detour serves. */
#define TRAMWAY_OWNER_FUNCTION 24
/* SlotData of a direct trampoline */
#define TRAMWAY_SLOT_TAG 0
#define TRAMWAY_SLOT_STATE 8
#define TRAMWAY_SLOT_INDEX 16
/* CounterBlock: per-thread hit counters */
#define TRAMWAY_MAX_OPS 4096
#define TRAMWAY_MAX_SITES (1 << 20)
#define TRAMWAY_BLOCK_HITS 16
#define TRAMWAY_BLOCK_SITE_HITS (TRAMWAY_BLOCK_HITS + 8 * TRAMWAY_MAX_OPS)

#endif /* TRAMWAY_ARCH_X86_64_HOOK_LAYOUT_H */
