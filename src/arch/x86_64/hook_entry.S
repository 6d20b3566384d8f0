/* The permanent stubs of function hooks (DESIGN.md, "common entry" and "direct trampoline").
 *
 * tramway_hook_entry — the common entry. An enabled site is `call thunk` at a function's
 * entry, and the thunk (generated within rel32 reach of the site) is `jmp *tramway_hook_entry`.
 *
 * tramway_hook_direct — the shared body of direct trampolines. A site in direct mode is
 * `call slot`, and the slot (16 bytes of identical code in a type-stable pool near the site,
 * sites/hooks/hooks.cc) is `lea its_data(%rip), %r11; jmp *tramway_hook_direct`. %r11 is
 * free at a function's entry (call-clobbered, not an argument, not the static chain).
 *
 * On entry to either:
 *   (%rsp)   the address after the site's call: the function's body (entry + 5)
 *   8(%rsp)  the return address into the function's caller
 * %rsp is usually 16-byte aligned, but not always: GCC's -fipa-stack-alignment (on at -O2)
 * calls functions of the same unit that need no alignment with %rsp = 0 mod 16 at their
 * entry, so the stubs align their frame themselves.
 *
 * Each saves every register a function may expect at its entry (rdi, rsi, rdx, rcx, r8, r9,
 * rax for varargs, r10 for the static chain, xmm0-7) as a tramway::hooks::EntryRegs, raises
 * the thread's grace-period marker (ops, lists and slot data are retired through the trace
 * flavor), calls its C++ dispatcher, lowers the marker, restores the registers and returns
 * into the function's body. Not saved here: ymm/zmm upper halves, x87 state (an ops with
 * save_extended_state has the dispatcher save them around its callback); callee-saved
 * registers are preserved by the dispatcher itself. This code is permanent: it is never
 * patched or freed, so a thread preempted anywhere in it needs no grace period.
 */
#include "tramway/asm/grace_marker.h"

/* Frame: %rbp, then, at a 16-byte aligned %rsp, EntryRegs (192 bytes), 8 spare bytes at
 * 192(%rsp) (the direct stub keeps its slot data pointer there) and a copy of %rbp at
 * 200(%rsp): hooks::caller_return_slot (sites/hooks/hooks.cc) finds the caller's return
 * address at 16 bytes above it. */
.macro HOOK_FRAME_ENTER
	pushq	%rbp
	.cfi_def_cfa_offset 16
	.cfi_offset %rbp, -16
	movq	%rsp, %rbp
	.cfi_def_cfa_register %rbp
	subq	$208, %rsp
	andq	$-16, %rsp
	movq	%rbp, 200(%rsp)
	movq	%rdi, 0(%rsp)
	movq	%rsi, 8(%rsp)
	movq	%rdx, 16(%rsp)
	movq	%rcx, 24(%rsp)
	movq	%r8, 32(%rsp)
	movq	%r9, 40(%rsp)
	movq	%rax, 48(%rsp)
	movq	%r10, 56(%rsp)
	movaps	%xmm0, 64(%rsp)
	movaps	%xmm1, 80(%rsp)
	movaps	%xmm2, 96(%rsp)
	movaps	%xmm3, 112(%rsp)
	movaps	%xmm4, 128(%rsp)
	movaps	%xmm5, 144(%rsp)
	movaps	%xmm6, 160(%rsp)
	movaps	%xmm7, 176(%rsp)
.endm

.macro HOOK_FRAME_LEAVE
	movq	0(%rsp), %rdi
	movq	8(%rsp), %rsi
	movq	16(%rsp), %rdx
	movq	24(%rsp), %rcx
	movq	32(%rsp), %r8
	movq	40(%rsp), %r9
	movq	48(%rsp), %rax
	movq	56(%rsp), %r10
	movaps	64(%rsp), %xmm0
	movaps	80(%rsp), %xmm1
	movaps	96(%rsp), %xmm2
	movaps	112(%rsp), %xmm3
	movaps	128(%rsp), %xmm4
	movaps	144(%rsp), %xmm5
	movaps	160(%rsp), %xmm6
	movaps	176(%rsp), %xmm7
	leave
	.cfi_def_cfa %rsp, 8
	ret
.endm

	.text
	.globl	tramway_hook_entry
	.hidden	tramway_hook_entry
	.type	tramway_hook_entry, @function
	.p2align 4
tramway_hook_entry:
	.cfi_startproc
	HOOK_FRAME_ENTER
	TRAMWAY_MARKER_RAISE %rax, %rcx
	movq	%rsp, %rdi                  /* regs */
	movq	8(%rbp), %rsi               /* the function's body: entry + 5 */
	movq	16(%rbp), %rdx              /* the caller's return address */
	call	tramway_hook_dispatch
	TRAMWAY_MARKER_LOWER %rax
	HOOK_FRAME_LEAVE
	.cfi_endproc
	.size	tramway_hook_entry, . - tramway_hook_entry

	.globl	tramway_hook_direct
	.hidden	tramway_hook_direct
	.type	tramway_hook_direct, @function
	.p2align 4
tramway_hook_direct:
	.cfi_startproc
	HOOK_FRAME_ENTER
	movq	%r11, 192(%rsp)             /* the slot's data; RAISE may call out */
	TRAMWAY_MARKER_RAISE %rax, %rcx
	/* From here on the slot cannot be reused under us; until here it could have been, and
	 * the dispatcher's tag check (the slot's owner against our body) tells. */
	movq	%rsp, %rdi                  /* regs */
	movq	8(%rbp), %rsi               /* the function's body: entry + 5 */
	movq	16(%rbp), %rdx              /* the caller's return address */
	movq	192(%rsp), %rcx             /* the slot's data */
	call	tramway_hook_direct_dispatch
	TRAMWAY_MARKER_LOWER %rax
	HOOK_FRAME_LEAVE
	.cfi_endproc
	.size	tramway_hook_direct, . - tramway_hook_direct

	.section .note.GNU-stack, "", @progbits
