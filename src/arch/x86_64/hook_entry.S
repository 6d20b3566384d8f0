/* The permanent stubs of function hooks (DESIGN.md, "common entry" and "direct trampoline").
 *
 * tramway_hook_entry — the common entry. An enabled site is `call thunk` at a function's
 * entry, and the thunk (generated within rel32 reach of the site) is `jmp *tramway_hook_entry`.
 *
 * tramway_hook_direct — the shared body of direct trampolines. A site in direct mode is
 * `call slot`, and the slot (16 bytes of identical code in a type-stable pool near the site,
 * sites/hooks/direct_slots.cc) is `lea its_data(%rip), %r11; jmp *tramway_hook_direct`.
 * %r11 is free at a function's entry (call-clobbered, not an argument, not the static chain).
 *
 * On entry to either:
 *   (%rsp)   the address after the site's call: the function's body (entry + 5)
 *   8(%rsp)  the return address into the function's caller
 * %rsp is usually 16-byte aligned, but not always: GCC's -fipa-stack-alignment (on at -O2)
 * calls functions of the same unit that need no alignment with %rsp = 0 mod 16 at their
 * entry, so the stubs align their frame themselves.
 *
 * Each saves every register a function may expect at its entry (rdi, rsi, rdx, rcx, r8, r9,
 * rax for varargs, r10 for the static chain, xmm0-7) as a tramway::hooks::EntryRegs, and
 * every other call-clobbered register the code it calls may change (r11, xmm8-15): GCC's
 * interprocedural register allocation (-fipa-ra, on at -O2) lets a caller keep values in any
 * call-clobbered register that a function of its own unit does not touch, across a call to
 * it. GCC turns it off for patchable entries, not for the functions tramway hooks through a
 * relocated prologue. (%r11 still carries a direct slot's data, which is why a relocated
 * function is never in direct mode: sites.cc, mode_for.) Then the stub raises
 * the thread's grace-period marker (ops, lists and slot data are retired through the trace
 * flavor), runs the callbacks, lowers the marker, restores the registers and returns into
 * the function's body. The usual case — one ops, enabled, without extended state, the
 * thread not already in a callback, its counter block there — runs inline (HOOK_CALL_ONE:
 * about 1.5 ns less than calling a C++ dispatcher, measured); every other case goes to the
 * C++ dispatchers (sites/hooks/dispatch.cc), which handle all of them.
 *
 * xmm0-15 are saved only when something may change them: not for an ops whose callback was
 * proven (arch/x86_64/callback_scan.h, at attach) to touch no vector register and never to
 * read its EntryRegs (TRAMWAY_FAST_LEAN; about 1.5 ns a call, measured). So nothing that
 * may call out — the marker's registration and wake-up, the dispatchers — runs before the
 * stub has saved them: those paths save first (HOOK_SAVE_VECTOR). Not saved at all: ymm/zmm
 * upper halves, x87 state (an ops with save_extended_state has the dispatcher save them
 * around its callback); callee-saved registers are preserved by the code called, as the
 * ABI requires. This code is permanent: it is never patched or freed, so a thread
 * preempted anywhere in it needs no grace period.
 */
#include "tramway/asm/grace_marker.h"
#include "arch/x86_64/hook_layout.h"

/* Frame: %rbp, then, at a 16-byte aligned %rsp, EntryRegs (192 bytes), 8 spare bytes at
 * 192(%rsp) (the direct stub keeps its slot data pointer there), a copy of %rbp at
 * 200(%rsp) (hooks::caller_return_slot, sites/hooks/dispatch.cc, finds the caller's return
 * address at 16 bytes above it), xmm8-15 at 208 + 16 * (i - 8)(%rsp) and %r11 at 336(%rsp).
 * The general-purpose registers are saved on entry; the vector ones by HOOK_SAVE_VECTOR, on
 * the paths that need it. */
.macro HOOK_FRAME_ENTER
	pushq	%rbp
	.cfi_def_cfa_offset 16
	.cfi_offset %rbp, -16
	movq	%rsp, %rbp
	.cfi_def_cfa_register %rbp
	subq	$352, %rsp
	andq	$-16, %rsp
	movq	%rbp, 200(%rsp)
	movq	%r11, 336(%rsp)
	movq	%rdi, 0(%rsp)
	movq	%rsi, 8(%rsp)
	movq	%rdx, 16(%rsp)
	movq	%rcx, 24(%rsp)
	movq	%r8, 32(%rsp)
	movq	%r9, 40(%rsp)
	movq	%rax, 48(%rsp)
	movq	%r10, 56(%rsp)
.endm

/* xmm<i> lives at 64 + 16 * i(%rsp), EntryRegs::xmm[i], for i < 8; xmm8-15 above the rest. */
.macro HOOK_SAVE_VECTOR
	.irp i, 0, 1, 2, 3, 4, 5, 6, 7
	movaps	%xmm\i, 64 + 16 * \i(%rsp)
	.endr
	.irp i, 8, 9, 10, 11, 12, 13, 14, 15
	movaps	%xmm\i, 208 + 16 * (\i - 8)(%rsp)
	.endr
.endm

.macro HOOK_RESTORE_VECTOR
	.irp i, 0, 1, 2, 3, 4, 5, 6, 7
	movaps	64 + 16 * \i(%rsp), %xmm\i
	.endr
	.irp i, 8, 9, 10, 11, 12, 13, 14, 15
	movaps	208 + 16 * (\i - 8)(%rsp), %xmm\i
	.endr
.endm

/* Restores the general-purpose registers and returns into the function. The CFI state after
 * it is the one before it, for the code that follows. */
.macro HOOK_FRAME_LEAVE
	movq	0(%rsp), %rdi
	movq	8(%rsp), %rsi
	movq	16(%rsp), %rdx
	movq	24(%rsp), %rcx
	movq	32(%rsp), %r8
	movq	40(%rsp), %r9
	movq	48(%rsp), %rax
	movq	56(%rsp), %r10
	movq	336(%rsp), %r11
	.cfi_remember_state
	leave
	.cfi_def_cfa %rsp, 8
	ret
	.cfi_restore_state
.endm

/* The callback of one ops, as run_callbacks (sites/hooks/dispatch.cc) runs it, or a jump to
 * `slow` — before anything is counted or changed — when the thread is already in a callback
 * or has no counter block yet. In: %rdi the ops' State, %edx the site's counter index, %r11
 * the site's cell or slot data (either names the function at TRAMWAY_OWNER_FUNCTION: a
 * detour's site is not the function's entry); the frame of HOOK_FRAME_ENTER with the marker
 * raised. Clobbers every
 * general-purpose call-clobbered register; vector registers only as the callback does. */
.macro HOOK_CALL_ONE slow
	movq	tramway_hook_in_callback@gottpoff(%rip), %rcx
	cmpb	$0, %fs:(%rcx)
	jne	\slow                       /* recursion: the dispatcher counts it skipped */
	movq	tramway_hook_counter_block@gottpoff(%rip), %r8
	movq	%fs:(%r8), %r8
	testq	%r8, %r8
	jz	\slow                       /* the thread's first hook: the dispatcher claims a block */
	incq	TRAMWAY_BLOCK_SITE_HITS(%r8,%rdx,8)  /* one instruction: a signal cannot split it */
	movl	TRAMWAY_STATE_ID(%rdi), %eax
	incq	TRAMWAY_BLOCK_HITS(%r8,%rax,8)
	movb	$1, %fs:(%rcx)
	movq	TRAMWAY_STATE_ENTRY(%rdi), %rax
	movq	TRAMWAY_STATE_OPS(%rdi), %rdi
	movq	TRAMWAY_OWNER_FUNCTION(%r11), %rsi  /* the function's entry */
	movq	16(%rbp), %rdx              /* the caller's return address */
	movq	%rsp, %rcx                  /* regs */
	call	*%rax
	movq	tramway_hook_in_callback@gottpoff(%rip), %rcx
	movb	$0, %fs:(%rcx)
.endm

/* The rest of a stub, `p` naming its labels, once it has the ops' State in %rdi (with %edx
 * and %r11 as HOOK_CALL_ONE wants them) and the marker raised, only general-purpose registers
 * saved. Labels it defines for the code before it: .L<p>_lower (nothing to run: lower the
 * marker and return), .L<p>_register (the marker could not be raised without a call), and it
 * ends in .L<p>_dispatch, where the stub calls its C++ dispatcher and jumps back to
 * .L<p>_lower_saved. */
.macro HOOK_RUN p
	cmpb	$TRAMWAY_FAST_LEAN, TRAMWAY_STATE_FAST(%rdi)
	jne	.L\p\()_not_lean
	HOOK_CALL_ONE .L\p\()_dispatch_raised
.L\p\()_lower:
	TRAMWAY_MARKER_LOWER_OR %rax, .L\p\()_wake
	HOOK_FRAME_LEAVE
.L\p\()_wake:                        /* the wake-up may clobber vector registers */
	HOOK_SAVE_VECTOR
	call	tramway_grace_wake@PLT
	jmp	.L\p\()_restore
.L\p\()_not_lean:
	HOOK_SAVE_VECTOR
	cmpb	$TRAMWAY_FAST_SAVING, TRAMWAY_STATE_FAST(%rdi)
	jne	.L\p\()_dispatch
	HOOK_CALL_ONE .L\p\()_dispatch
.L\p\()_lower_saved:
	TRAMWAY_MARKER_LOWER %rax
.L\p\()_restore:
	HOOK_RESTORE_VECTOR
	HOOK_FRAME_LEAVE
.L\p\()_register:                    /* the thread's first region: registering may clobber them */
	HOOK_SAVE_VECTOR
	TRAMWAY_MARKER_RAISE %rax, %rcx
	jmp	.L\p\()_dispatch
.L\p\()_dispatch_raised:
	HOOK_SAVE_VECTOR
.L\p\()_dispatch:
.endm

	.text
	.globl	tramway_hook_entry
	.hidden	tramway_hook_entry
	.type	tramway_hook_entry, @function
	.p2align 4
tramway_hook_entry:
	.cfi_startproc
	HOOK_FRAME_ENTER
	TRAMWAY_MARKER_RAISE_OR %rax, %rcx, .Lentry_register
	movq	8(%rbp), %rsi               /* the function's body: entry + 5 */
	movq	-13(%rsi), %r11             /* its cell: the word at entry - 8 */
	movq	TRAMWAY_CELL_TARGET(%r11), %rdi
	testb	$1, %dil
	jnz	.Lentry_dispatch_raised     /* a list of ops */
	testq	%rdi, %rdi
	jz	.Lentry_lower               /* detached meanwhile */
	movl	TRAMWAY_CELL_INDEX(%r11), %edx
	HOOK_RUN entry
	movq	%rsp, %rdi                  /* regs */
	movq	8(%rbp), %rsi               /* the function's body: entry + 5 */
	movq	16(%rbp), %rdx              /* the caller's return address */
	call	tramway_hook_dispatch
	jmp	.Lentry_lower_saved
	.cfi_endproc
	.size	tramway_hook_entry, . - tramway_hook_entry

	.globl	tramway_hook_direct
	.hidden	tramway_hook_direct
	.type	tramway_hook_direct, @function
	.p2align 4
tramway_hook_direct:
	.cfi_startproc
	HOOK_FRAME_ENTER
	movq	%r11, 192(%rsp)             /* the slot's data */
	TRAMWAY_MARKER_RAISE_OR %rax, %rcx, .Ldirect_register
	/* From here on the slot cannot be reused under us; until here it could have been, and
	 * the tag check (the slot's owner against our body) tells. The state was written before
	 * the tag, and x86 does not reorder loads with loads. */
	movq	192(%rsp), %r11
	movq	8(%rbp), %rsi               /* the function's body: entry + 5 */
	cmpq	%rsi, TRAMWAY_SLOT_TAG(%r11)
	jne	.Ldirect_lower              /* another owner, or none: the call goes on untraced */
	movq	TRAMWAY_SLOT_STATE(%r11), %rdi
	movl	TRAMWAY_SLOT_INDEX(%r11), %edx
	HOOK_RUN direct
	movq	%rsp, %rdi                  /* regs */
	movq	8(%rbp), %rsi               /* the function's body: entry + 5 */
	movq	16(%rbp), %rdx              /* the caller's return address */
	movq	192(%rsp), %rcx             /* the slot's data */
	call	tramway_hook_direct_dispatch
	jmp	.Ldirect_lower_saved
	.cfi_endproc
	.size	tramway_hook_direct, . - tramway_hook_direct

	.section .note.GNU-stack, "", @progbits
