/* tramway_hook_entry: the common entry of function hooks (DESIGN.md, "common entry").
 *
 * An enabled site is `call thunk` at a function's entry, and the thunk (generated within
 * rel32 reach of the site) is `jmp *tramway_hook_entry`. So on entry here:
 *   (%rsp)   the address after the site's call: the function's body (entry + 5)
 *   8(%rsp)  the return address into the function's caller
 * and %rsp is 16-byte aligned (it was 8 mod 16 at the function's entry).
 *
 * It saves every register a function may expect at its entry (rdi, rsi, rdx, rcx, r8, r9,
 * rax for varargs, r10 for the static chain, xmm0-7) as a tramway::hooks::EntryRegs, raises
 * the thread's grace-period marker (the ops and lists the dispatcher reads are retired
 * through the trace flavor), calls tramway_hook_dispatch(regs, body, caller), lowers the
 * marker, restores the registers and returns into the function's body. Not saved: ymm/zmm
 * upper halves, x87 state; callee-saved registers are preserved by the dispatcher itself.
 * This code is permanent: it is never patched or freed, so a thread preempted anywhere in it
 * needs no grace period.
 */
#include "tramway/asm/grace_marker.h"

	.text
	.globl	tramway_hook_entry
	.hidden	tramway_hook_entry
	.type	tramway_hook_entry, @function
	.p2align 4
tramway_hook_entry:
	.cfi_startproc
	pushq	%rbp
	.cfi_def_cfa_offset 16
	.cfi_offset %rbp, -16
	movq	%rsp, %rbp
	.cfi_def_cfa_register %rbp
	subq	$200, %rsp                  /* EntryRegs (192 bytes) at a 16-byte aligned %rsp */
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
	TRAMWAY_MARKER_RAISE %rax, %rcx
	movq	%rsp, %rdi                  /* regs */
	movq	8(%rbp), %rsi               /* the function's body: entry + 5 */
	movq	16(%rbp), %rdx              /* the caller's return address */
	call	tramway_hook_dispatch
	TRAMWAY_MARKER_LOWER %rax
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
	.cfi_endproc
	.size	tramway_hook_entry, . - tramway_hook_entry

	.section .note.GNU-stack, "", @progbits
