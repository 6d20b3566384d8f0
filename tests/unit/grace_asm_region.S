/* void tramway_test_asm_region(void (*fn)(void*), void* arg): raises the marker with the
 * assembly macros, calls fn(arg), lowers it. What a .S trampoline stub does. */
#include "tramway/asm/grace_marker.h"

	.text
	.globl	tramway_test_asm_region
	.type	tramway_test_asm_region, @function
tramway_test_asm_region:
	.cfi_startproc
	pushq	%rbx
	.cfi_def_cfa_offset 16
	.cfi_offset %rbx, -16
	pushq	%r12
	.cfi_def_cfa_offset 24
	.cfi_offset %r12, -24
	subq	$8, %rsp                     /* 16-byte alignment for the calls */
	.cfi_def_cfa_offset 32
	movq	%rdi, %rbx
	movq	%rsi, %r12
	TRAMWAY_MARKER_RAISE %rax, %rcx
	movq	%r12, %rdi
	call	*%rbx
	TRAMWAY_MARKER_LOWER %rax
	addq	$8, %rsp
	.cfi_def_cfa_offset 24
	popq	%r12
	.cfi_def_cfa_offset 16
	popq	%rbx
	.cfi_def_cfa_offset 8
	ret
	.cfi_endproc
	.size	tramway_test_asm_region, . - tramway_test_asm_region

	.section .note.GNU-stack, "", @progbits
