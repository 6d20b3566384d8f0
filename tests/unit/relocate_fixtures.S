/* Hand-written prologues for test_relocate.cc. Each comment gives the run the relocator
 * must choose ([start, end) from the function) and what the function returns. Integer
 * arguments: a = edi/rdi, b = esi/rsi, c = ecx/rcx. */
	.text

#define FN(name) .globl name; .type name, @function; .p2align 4; name:
#define END(name) .globl name##_end; name##_end: .size name, . - name

/* push rbp; mov rbp,rsp; push r15 [0,6); returns a + 1 */
FN(rl_plain)
	pushq	%rbp
	movq	%rsp, %rbp
	pushq	%r15
	subq	$8, %rsp
	leaq	1(%rdi), %rax
	addq	$8, %rsp
	popq	%r15
	popq	%rbp
	ret
END(rl_plain)

/* endbr64 stays; push rbx; mov rbx,rdi; lea rax,[rbx+2] [4,12); returns a + 2 */
FN(rl_endbr)
	endbr64
	pushq	%rbx
	movq	%rdi, %rbx
	leaq	2(%rbx), %rax
	popq	%rbx
	ret
END(rl_endbr)

/* mov rax,[rip+rl_value] [0,7); returns rl_value */
FN(rl_rip_load)
	movq	rl_value(%rip), %rax
	ret
END(rl_rip_load)

/* lea rax,[rip+rl_value] [0,7); returns &rl_value */
FN(rl_rip_lea)
	leaq	rl_value(%rip), %rax
	ret
END(rl_rip_lea)

/* cmp dword [rip+rl_word], 0x12345 [0,10): the displacement is followed by the immediate;
 * returns rl_word == 0x12345 */
FN(rl_rip_cmp)
	cmpl	$0x12345, rl_word(%rip)
	sete	%al
	movzbl	%al, %eax
	ret
END(rl_rip_cmp)

/* mov dword [rip+rl_word], 0x5a5a [0,10): a store with an immediate behind the
 * displacement; returns a */
FN(rl_rip_store)
	movl	$0x5a5a, rl_word(%rip)
	movl	%edi, %eax
	ret
END(rl_rip_store)

/* lock add dword [rip+rl_word], edi [0,7): the lock prefix must survive the re-encoding;
 * returns a */
FN(rl_lock_rip)
	lock addl	%edi, rl_word(%rip)
	movl	%edi, %eax
	ret
END(rl_lock_rip)

/* movq xmm0,[rip+rl_value] (f3 0f 7e) [0,8); returns rl_value through xmm0 */
FN(rl_rip_sse)
	movq	rl_value(%rip), %xmm0
	movq	%xmm0, %rax
	ret
END(rl_rip_sse)

/* vmovq xmm1,[rip+rl_value] (VEX) [0,8); returns rl_value through xmm1 */
FN(rl_rip_avx)
	vmovq	rl_value(%rip), %xmm1
	vmovq	%xmm1, %rax
	ret
END(rl_rip_avx)

/* jmp [rip+rl_fnptr] [0,6): a tail call through a pointer; returns rl_fnptr(a) */
FN(rl_jmp_riprel)
	jmp	*rl_fnptr(%rip)
END(rl_jmp_riprel)

/* sub rsp,24; mov rax,fs:0x28 [0,13): the stack protector's canary load (fs, absolute
 * displacement: copied as it is); returns the canary */
FN(rl_fs_canary)
	subq	$24, %rsp
	movq	%fs:0x28, %rax
	movq	%rax, 8(%rsp)
	movq	8(%rsp), %rax
	addq	$24, %rsp
	ret
END(rl_fs_canary)

/* test edi,edi; je rel8 (outside); mov eax,1 [0,9); returns a ? 1 : 2 */
FN(rl_jcc_out)
	testl	%edi, %edi
	je	1f
	movl	$1, %eax
	ret
1:	movl	$2, %eax
	ret
END(rl_jcc_out)

/* xchg eax,edi; sub eax,esi [loop head, +1]; jg rel8 back to +1 [0,5): a jcc inside the run
 * to inside the run; returns a - k*b for the first k that makes it <= 0 (b > 0) */
FN(rl_jcc_in)
	xchgl	%eax, %edi
1:	subl	%esi, %eax
	jg	1b
	ret
END(rl_jcc_in)

/* sub edi,1; jg rel8 to the entry [0,5): a branch to the run's first byte; returns 0
 * (a > 0) */
FN(rl_jcc_entry)
0:	subl	$1, %edi
	jg	0b  /* a local label: both assemblers use rel8 (not to a global symbol) */
	movl	%edi, %eax
	ret
END(rl_jcc_entry)

/* xchg eax,edi; jrcxz +4; xchg eax,esi; add eax,100 [0,7): jrcxz to inside the run;
 * returns (c == 0 ? a : b) + 100 */
FN(rl_jrcxz_in)
	xchgl	%eax, %edi
	jrcxz	1f
	xchgl	%eax, %esi
1:	addl	$100, %eax
	ret
END(rl_jrcxz_in)

/* xchg eax,edi; loop rel8 (outside); nop; nop [0,5); returns a when c == 1 (loop falls
 * through to ret), a + 7 otherwise */
FN(rl_loop_out)
	xchgl	%eax, %edi
	loop	1f
	nop
	nop
	ret
1:	addl	$7, %eax
	ret
END(rl_loop_out)

/* xchg eax,edi; jmp rel8 (+4, inside); xchg eax,esi (skipped); add eax,5 [0,7); returns a + 5 */
FN(rl_jmp_in)
	xchgl	%eax, %edi
	jmp	1f
	xchgl	%eax, %esi
1:	addl	$5, %eax
	ret
END(rl_jmp_in)

/* mov eax,edi; jmp rel8 (outside); ud2 [0,6); returns a + 7 */
FN(rl_jmp_out)
	movl	%edi, %eax
	jmp	1f
	ud2
	ud2
1:	addl	$7, %eax
	ret
END(rl_jmp_out)

/* sub rsp,8; call rl_callee [0,9): a final call; returns 2a + 1 */
FN(rl_call_last)
	subq	$8, %rsp
	call	rl_callee
	addq	$8, %rsp
	addl	$1, %eax
	ret
END(rl_call_last)

/* sub rsp,8; call rsi [0,6): a final indirect call; returns b(a) + 1 */
FN(rl_call_reg)
	subq	$8, %rsp
	call	*%rsi
	addq	$8, %rsp
	addl	$1, %eax
	ret
END(rl_call_reg)

/* sub rsp,8; call [rip+rl_fnptr] [0,10): returns rl_fnptr(a) + 1 */
FN(rl_call_riprel)
	subq	$8, %rsp
	call	*rl_fnptr(%rip)
	addq	$8, %rsp
	addl	$1, %eax
	ret
END(rl_call_riprel)

/* push rsi; push rsi; call [rsp+8] [0,6): the operand is rsp-relative; returns b(a) + 1 */
FN(rl_call_rsp)
	pushq	%rsi
	pushq	%rsi
	call	*8(%rsp)
	popq	%rsi
	popq	%rsi
	addl	$1, %eax
	ret
END(rl_call_rsp)

/* returns 2a (+ records its return address in rl_seen_ret) */
FN(rl_callee)
	movq	(%rsp), %rax
	movq	%rax, rl_seen_ret(%rip)
	leal	(%rdi,%rdi), %eax
	ret
END(rl_callee)

/* ---- refused ---- */

/* call rsi; mov eax,edx: a call before the run's last instruction */
FN(rl_call_early)
	call	*%rsi
	movl	%edx, %eax
	ret
END(rl_call_early)

/* xor eax,eax; syscall; ret */
FN(rl_syscall)
	xorl	%eax, %eax
	syscall
	ret
END(rl_syscall)

/* xor eax,eax; int 0x80; ret */
FN(rl_int80)
	xorl	%eax, %eax
	int	$0x80
	ret
END(rl_int80)

/* int3 at the entry (a breakpoint) */
FN(rl_int3)
	int3
	movl	%edi, %eax
	addl	$1, %eax
	ret
END(rl_int3)

/* xor eax,eax; add eax,edi [loop head, +2]; add eax,esi [0,6); dec ecx; jne +2: a branch
 * behind the run into it */
FN(rl_branch_in)
	xorl	%eax, %eax
1:	addl	%edi, %eax
	addl	%esi, %eax
	decl	%ecx
	jne	1b
	ret
END(rl_branch_in)

/* jmp +3 (into the middle of the mov); mov eax, imm32 */
FN(rl_branch_mid)
	.byte	0xeb, 0x01
	.byte	0xb8, 0x01, 0x02, 0x03, 0x04
	ret
END(rl_branch_mid)

/* lea rax,[rip+label inside the run]: a label address taken (computed goto) */
FN(rl_lea_in)
	xorl	%eax, %eax
1:	addl	%edi, %eax
	addl	%esi, %eax
	leaq	1b(%rip), %rax
	jmp	*%rax
END(rl_lea_in)

/* xor eax,eax; ret: 3 bytes */
FN(rl_short)
	xorl	%eax, %eax
	ret
END(rl_short)

/* endbr64; xor eax,eax; ret: 3 bytes behind the endbr64 */
FN(rl_short_endbr)
	endbr64
	xorl	%eax, %eax
	ret
END(rl_short_endbr)

/* 0x06 (push es) is invalid in 64-bit mode */
FN(rl_undecodable_run)
	.byte	0x06
	movl	%edi, %eax
	ret
END(rl_undecodable_run)

/* a valid run, then an undecodable byte behind it */
FN(rl_undecodable_later)
	pushq	%rbp
	movq	%rsp, %rbp
	popq	%rbp
	ret
	.byte	0x06
END(rl_undecodable_later)

/* A switch through a PIC jump table (int32 offsets from the table). rl_switch_ok's cases lie
 * behind the run: returns 10, 20, 30 for a = 0, 1, 2 (and a+100 else); rl_switch_in's table
 * has an entry pointing behind its first byte. */
FN(rl_switch_ok)
	pushq	%rbx
	movl	%edi, %ebx
	cmpl	$2, %ebx
	ja	9f
	leaq	rl_switch_table(%rip), %rdx
	movslq	(%rdx,%rbx,4), %rax
	addq	%rdx, %rax
	jmp	*%rax
1:	movl	$10, %eax
	popq	%rbx
	ret
2:	movl	$20, %eax
	popq	%rbx
	ret
3:	movl	$30, %eax
	popq	%rbx
	ret
9:	leal	100(%rbx), %eax
	popq	%rbx
	ret
	.section .rodata
	.p2align 2
rl_switch_table:
	.long	1b - rl_switch_table, 2b - rl_switch_table, 3b - rl_switch_table
	.text
END(rl_switch_ok)

FN(rl_switch_in)
	pushq	%rbx
0:	movl	%edi, %ebx
	cmpl	$1, %ebx
	ja	9f
	leaq	rl_switch_in_table(%rip), %rdx
	movslq	(%rdx,%rbx,4), %rax
	addq	%rdx, %rax
	jmp	*%rax
1:	movl	$10, %eax
	popq	%rbx
	ret
9:	xorl	%eax, %eax
	popq	%rbx
	ret
	.section .rodata
	.p2align 2
rl_switch_in_table:
	.long	1b - rl_switch_in_table, 0b - rl_switch_in_table
	.text
END(rl_switch_in)

/* long rl_call_stepped(fn, a, b, c, d): fn(a, b, c, d) with the trap flag set, so that
 * every instruction from the call on raises SIGTRAP; clears the flag on return if the
 * handler did not. */
FN(rl_call_stepped)
	subq	$8, %rsp
	movq	%rdi, %rax
	movq	%rsi, %rdi
	movq	%rdx, %rsi
	movq	%rcx, %rdx
	movq	%r8, %rcx
	pushfq
	orq	$0x100, (%rsp)
	popfq
	call	*%rax
	pushfq
	andq	$~0x100, (%rsp)
	popfq
	addq	$8, %rsp
	ret
END(rl_call_stepped)

	.data
	.p2align 3
	.globl	rl_value, rl_word, rl_fnptr, rl_seen_ret
rl_value:	.quad	0x1122334455667788
rl_word:	.long	0
	.p2align 3
rl_fnptr:	.quad	rl_callee
rl_seen_ret:	.quad	0

	.section .note.GNU-stack, "", @progbits
