/* tramway/asm/grace_marker.h — raise and lower the grace-period marker from assembly.
 *
 * For .S stubs (preprocessed assembly) that must enter a read-side region of the trace flavor
 * (tramway/grace.h) before touching anything that can be retired, exactly as
 * tramway::grace::read_lock()/read_unlock() do:
 *
 *     #include "tramway/asm/grace_marker.h"
 *     TRAMWAY_MARKER_RAISE %rax, %rcx
 *     ...                                  ; the region
 *     TRAMWAY_MARKER_LOWER %rax
 *
 * Stable interface (assembler names exported by libtramway):
 *   tramway_grace_marker           initial-exec TLS: pointer to this thread's marker, or 0
 *   tramway_grace_register_thread  returns the marker (rax), registering the thread
 *   tramway_grace_phase            64-bit word: what an outermost raise stores
 *   tramway_grace_waiting          32-bit word: -1 while a grace period sleeps on it
 *   tramway_grace_wake             wakes it
 * The marker is one 64-bit word at offset 0: the nesting depth in its low 32 bits, the phase
 * in bit 32, and in bit 33 a request to call tramway_grace_wake when the outermost region ends.
 *
 * TRAMWAY_MARKER_RAISE_OR and TRAMWAY_MARKER_LOWER_OR (below) do the same without ever calling
 * out, for code that has not saved what a call clobbers.
 *
 * Clobbers: the scratch registers named, and flags. On a thread's first region RAISE calls
 * tramway_grace_register_thread, and LOWER calls tramway_grace_wake when a grace period waits
 * or asked for a report:
 * both may then clobber every caller-saved register (rax, rcx, rdx, rsi, rdi, r8-r11, and
 * vector registers), so save what must survive, and keep the stack 16-byte aligned at the
 * macro as for a call. Only this thread writes its marker, so no lock prefix is needed; the
 * grace period's membarrier supplies the ordering.
 */
#ifndef TRAMWAY_ASM_GRACE_MARKER_H
#define TRAMWAY_ASM_GRACE_MARKER_H

#ifdef __ASSEMBLER__

.macro TRAMWAY_MARKER_RAISE marker, scratch
	TRAMWAY_MARKER_RAISE_OR \marker, \scratch, .Ltramway_raise_register\@
	jmp	.Ltramway_raise_done\@
.Ltramway_raise_register\@:
	call	tramway_grace_register_thread@PLT
	movq	%rax, \marker
	TRAMWAY_MARKER_ENTER \marker, \scratch
.Ltramway_raise_done\@:
.endm

.macro TRAMWAY_MARKER_LOWER marker
	TRAMWAY_MARKER_LOWER_OR \marker, .Ltramway_lower_wake\@
	jmp	.Ltramway_lower_done\@
.Ltramway_lower_wake\@:
	call	tramway_grace_wake@PLT
.Ltramway_lower_done\@:
.endm

/* The same without calls, for code that must not clobber more than the registers named (vector
 * registers it has not saved, say): RAISE_OR jumps to `unregistered`, raising nothing, on the
 * thread's first region (raise with TRAMWAY_MARKER_RAISE there); LOWER_OR lowers the marker and
 * jumps to `wake` when tramway_grace_wake must be called. */
.macro TRAMWAY_MARKER_RAISE_OR marker, scratch, unregistered
	movq	tramway_grace_marker@gottpoff(%rip), \marker
	movq	%fs:(\marker), \marker
	testq	\marker, \marker
	jz	\unregistered
	TRAMWAY_MARKER_ENTER \marker, \scratch
.endm

.macro TRAMWAY_MARKER_LOWER_OR marker, wake
	movq	tramway_grace_marker@gottpoff(%rip), \marker
	movq	%fs:(\marker), \marker
	subl	$1, (\marker)                 /* the depth; zero: left the outermost region */
	jne	.Ltramway_lower_or_done\@
	testb	$2, 4(\marker)                /* bit 33: a grace period asked us to report */
	jnz	\wake
	movq	tramway_grace_waiting@GOTPCREL(%rip), \marker
	cmpl	$-1, (\marker)
	je	\wake
.Ltramway_lower_or_done\@:
.endm

/* Internal: enters the region once \marker holds this thread's marker. */
.macro TRAMWAY_MARKER_ENTER marker, scratch
	cmpl	$0, (\marker)                 /* outermost region? */
	jne	.Ltramway_enter_nested\@
	movq	tramway_grace_phase@GOTPCREL(%rip), \scratch
	movq	(\scratch), \scratch          /* depth 1 and the current phase */
	movq	\scratch, (\marker)
	jmp	.Ltramway_enter_done\@
.Ltramway_enter_nested\@:
	addq	$1, (\marker)
.Ltramway_enter_done\@:
.endm

#endif /* __ASSEMBLER__ */
#endif /* TRAMWAY_ASM_GRACE_MARKER_H */
