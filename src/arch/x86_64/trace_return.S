/* The tracer's return stub (trace/exit_hooks.cc): a traced function's return address is
 * replaced by tramway_trace_return, so its `ret` lands here.
 *
 * On entry %rsp is where the function's caller expects it after the return (the slot the
 * return address was in is at -8(%rsp)), and the return value is in
 * %rax/%rdx and %xmm0/%xmm1 (x87 %st0/%st1 for long double; the C++ handler does not touch
 * the x87 stack, nor the upper halves of ymm/zmm: it uses no vector code and calls no libc).
 * The stub saves them and every other call-clobbered general-purpose register, asks
 * tramway_trace_exit for the original return address (it records the exit event and pops the
 * shadow stack), restores them all and jumps there through a red-zone slot. All of them:
 * GCC's interprocedural register allocation (-fipa-ra, on at -O2) lets a caller keep values
 * in %rcx, %rsi, %r8, ... across a call to a function it knows does not touch them, and the
 * tracer must not be that function's clobber (a traced leaf's caller lost its loop bound to
 * the return address). The vector registers but %xmm0/%xmm1 need no save: the handler is
 * built without SSE.
 *
 * The stub is permanent (never patched or freed), so a thread preempted in it needs nothing.
 * Unwinders cannot know the original return address, so the CFI marks the return address
 * as undefined: a backtrace stops here; C++ exceptions are handled by putting the original
 * return addresses back before unwinding starts (trace/unwind_interpose.cc).
 */
	.text
	.globl	tramway_trace_return
	.type	tramway_trace_return, @function
	.p2align 4
	nop		/* an unwinder looks up (return address - 1): let that be inside this FDE */
tramway_trace_return:
	.cfi_startproc
	.cfi_undefined rip
	pushq	%rbp
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rbp, 0
	movq	%rsp, %rbp
	.cfi_def_cfa_register %rbp
	andq	$-16, %rsp                  /* see hook_entry.S: the caller's %rsp may be 8 mod 16 */
	subq	$112, %rsp
	movaps	%xmm0, 0(%rsp)
	movaps	%xmm1, 16(%rsp)
	movq	%rax, 32(%rsp)
	movq	%rdx, 40(%rsp)
	movq	%rcx, 48(%rsp)
	movq	%rsi, 56(%rsp)
	movq	%rdi, 64(%rsp)
	movq	%r8, 72(%rsp)
	movq	%r9, 80(%rsp)
	movq	%r10, 88(%rsp)
	movq	%r11, 96(%rsp)              /* 104(%rsp): padding, so that -8(%rbp) is never a save slot */
	leaq	8(%rbp), %rdi               /* %rsp as the caller will see it */
	call	tramway_trace_exit
	movq	%rax, -8(%rbp)              /* the original return address, at (caller's %rsp - 16) */
	movaps	0(%rsp), %xmm0
	movaps	16(%rsp), %xmm1
	movq	32(%rsp), %rax
	movq	40(%rsp), %rdx
	movq	48(%rsp), %rcx
	movq	56(%rsp), %rsi
	movq	64(%rsp), %rdi
	movq	72(%rsp), %r8
	movq	80(%rsp), %r9
	movq	88(%rsp), %r10
	movq	96(%rsp), %r11
	movq	%rbp, %rsp
	popq	%rbp
	.cfi_def_cfa %rsp, 8
	.cfi_restore %rbp
	/* In the red zone, which a signal frame never overwrites: no register is spent on the jump. */
	jmp	*-16(%rsp)
	.cfi_endproc
	.size	tramway_trace_return, . - tramway_trace_return

	.section .note.GNU-stack, "", @progbits
