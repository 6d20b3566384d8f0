# Debugging a program that uses tramway with gdb (tested with gdb 13.1):
#   gdb -x /usr/share/tramway/tramway.gdb --args PROG ARGS...    (or `source` it in ~/.gdbinit)
# See the README's "Debugging with gdb" section for why each line is here.

# The fix-up signal (SIGRTMAX-1, gdb's SIG63, unless TRAMWAY_FIXUP_SIGNAL says otherwise): pass
# it silently, as the program needs it answered while a patch batch runs.
python
import os
_tramway_fixup = os.environ.get("TRAMWAY_FIXUP_SIGNAL", "63")
gdb.execute("handle SIG%s nostop noprint pass" % _tramway_fixup)
end

# A thread that traps on tramway's int3 (a patch site in the middle of a batch): gdb sees a
# SIGTRAP it did not cause. Passing it (`handle SIGTRAP pass`) is not an option: gdb 13 then
# also passes the SIGTRAP of its own breakpoints, and any program dies of it at its first
# shared-library event. gdb's default (nopass) resumes the thread one byte after the int3,
# inside the instruction being written. With this catchpoint gdb backs the thread up to the
# int3 and resumes it there, silently, without the signal: it traps again until the batch is
# over, then runs the new instruction. A catchpoint on SIGTRAP also takes over the traps that
# are not tramway's, so those are reported here as gdb would: the program's own int3 (the PC
# put back after it) and a SIGTRAP sent with kill or raise; `signal SIGTRAP` delivers one to
# the program, `continue` goes on without it. gdb's breakpoints and steps are left alone.
python
class _TramwayTrap(gdb.Function):
    """$_tramway_trap(): 1 when the thread stopped on an int3 tramway wrote (still at $pc
    while a batch is in flight), 2 on another int3 (the program's), 3 on a SIGTRAP sent by
    kill/raise, 0 otherwise (gdb's own breakpoints and steps). Also left in $_tramway_kind:
    the commands below must act on what the condition saw, as other threads may run (and
    finish the batch) in between."""

    def __init__(self):
        super(_TramwayTrap, self).__init__("_tramway_trap")

    def invoke(self):
        kind = self.classify()
        gdb.set_convenience_variable("_tramway_kind", kind)
        return kind

    def classify(self):
        try:
            code = int(gdb.parse_and_eval("$_siginfo.si_code"))
            if code <= 0:
                return 3
            if code != 0x80:  # SI_KERNEL: an int3
                return 0
            # Other threads run while gdb evaluates this: the batch generation is read around
            # the look at the code, and only an int3 seen with no batch before or after is not
            # tramway's (a thread wrongly resumed at the program's int3 just traps again).
            before = self.generation()
            pc = int(gdb.selected_frame().pc())
            if bytes(gdb.selected_inferior().read_memory(pc, 1))[0] != 0xCC:
                return 0  # gdb's breakpoint (gdb shows the byte it replaced)
            after = self.generation()
            return 2 if before == after and before % 2 == 0 else 1
        except Exception:
            return 0

    def generation(self):
        try:
            return int(gdb.parse_and_eval("*(unsigned long *)&tramway_batch_generation"))
        except gdb.error:
            return 0  # tramway is not loaded

_TramwayTrap()
end
catch signal SIGTRAP
condition $bpnum $_tramway_trap() != 0
commands
  silent
  if $_tramway_kind == 1
    continue
  else
    if $_tramway_kind == 2
      set $pc = $pc + 1
    end
    echo \nProgram received signal SIGTRAP, Trace/breakpoint trap (not tramway's: `signal SIGTRAP` delivers it).\n
    frame
  end
end
