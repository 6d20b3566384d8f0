// dlopen, interposed (common/loader_gate.h). dlopen resolves some names relative to its caller,
// which it finds from its return address, so this stub keeps the caller's return address on
// the stack: it asks tramway_dlopen_route(file) where to go, and jumps there with the
// arguments intact — the real dlopen (the name depends on the caller: not gated) or
// tramway_dlopen_gated (it does not: the real dlopen under the gate).
	.text
	.globl dlopen
	.type dlopen, @function
dlopen:
	.cfi_startproc
	endbr64
	push %rdi
	.cfi_adjust_cfa_offset 8
	push %rsi
	.cfi_adjust_cfa_offset 8
	sub $8, %rsp  // the call below needs rsp 16-aligned
	.cfi_adjust_cfa_offset 8
	call tramway_dlopen_route
	add $8, %rsp
	.cfi_adjust_cfa_offset -8
	pop %rsi
	.cfi_adjust_cfa_offset -8
	pop %rdi
	.cfi_adjust_cfa_offset -8
	jmp *%rax
	.cfi_endproc
	.size dlopen, .-dlopen

	.section .note.GNU-stack,"",@progbits
