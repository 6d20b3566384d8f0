/* A caller that keeps values in call-clobbered registers across a call to a leaf it "knows"
 * leaves them alone, as GCC's -fipa-ra compiles a static function's caller (on at -O2). The
 * hook stubs and the tracer's return stub must not be the clobber (test_trace.cc,
 * Trace.IpaRaCallersKeepTheirRegistersAcrossATracedLeaf and
 * RelocatedHooks.IpaRaCallersKeepTheirRegistersWhateverTheCallbackClobbers). Not patchable: the leaf is
 * hooked through its relocated prologue, as GCC keeps IPA-RA on for such a function.
 *
 * uint64_t tramway_ipa_caller(uint64_t x): calls tramway_ipa_leaf(x) with %rcx, %rsi, %r8,
 * %r9, %r10, %r11 and %xmm8-15 set, and returns the leaf's result, or 0 if any of them changed.
 */
	.text
	.globl	tramway_ipa_leaf
	.type	tramway_ipa_leaf, @function
	.p2align 4
tramway_ipa_leaf:
	.cfi_startproc
	movq	%rdi, %rax
	addq	$0x1000, %rax
	ret
	.cfi_endproc
	.size	tramway_ipa_leaf, . - tramway_ipa_leaf

	.globl	tramway_ipa_caller
	.type	tramway_ipa_caller, @function
	.p2align 4
tramway_ipa_caller:
	.cfi_startproc
	movq	$0x1111, %rcx
	movq	$0x2222, %rsi
	movq	$0x3333, %r8
	movq	$0x4444, %r9
	movq	$0x5555, %r10
	movq	$0x6666, %r11
	.irp i, 8, 9, 10, 11, 12, 13, 14, 15
	movl	$0x80 + \i, %eax
	movq	%rax, %xmm\i
	.endr
	subq	$8, %rsp
	.cfi_adjust_cfa_offset 8
	call	tramway_ipa_leaf
	addq	$8, %rsp
	.cfi_adjust_cfa_offset -8
	cmpq	$0x1111, %rcx
	jne	1f
	cmpq	$0x2222, %rsi
	jne	1f
	cmpq	$0x3333, %r8
	jne	1f
	cmpq	$0x4444, %r9
	jne	1f
	cmpq	$0x5555, %r10
	jne	1f
	cmpq	$0x6666, %r11
	jne	1f
	.irp i, 8, 9, 10, 11, 12, 13, 14, 15
	movq	%xmm\i, %rdx
	cmpq	$0x80 + \i, %rdx
	jne	1f
	.endr
	ret
1:	xorl	%eax, %eax
	ret
	.cfi_endproc
	.size	tramway_ipa_caller, . - tramway_ipa_caller

	.section .note.GNU-stack, "", @progbits
