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
# also passes the SIGTRAP of its own breakpoints, and the program dies of it at its first
# shared-library event. gdb's default (nopass) resumes the thread one byte after the int3,
# inside the instruction being written. This catchpoint instead resumes it at the int3,
# silently, without the signal: it traps again until the batch is over, then runs the new
# instruction. Traps that are not tramway's (gdb's own breakpoints, the program's int3s or
# raise(SIGTRAP)) are left to gdb's usual handling.
python
class _TramwayTrap(gdb.Function):
    """$_tramway_trap(): true when the thread stopped on an int3 tramway wrote (still in memory
    at $pc, with a batch in flight)."""

    def __init__(self):
        super(_TramwayTrap, self).__init__("_tramway_trap")

    def invoke(self):
        try:
            if int(gdb.parse_and_eval("*(int *)&tramway_batch_in_flight")) == 0:
                return 0
            pc = int(gdb.selected_frame().pc())
            return 1 if bytes(gdb.selected_inferior().read_memory(pc, 1))[0] == 0xCC else 0
        except Exception:  # no tramway loaded yet, no frame: not ours
            return 0

_TramwayTrap()
end
catch signal SIGTRAP
condition $bpnum $_tramway_trap()
commands
  silent
  continue
end
