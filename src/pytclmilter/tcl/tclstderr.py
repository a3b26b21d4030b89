"""What Tcl's own C code writes on the standard error channel of the script's thread: escaped.

The script's `puts` is escaped (output.py) and its background errors are logged (prelude.py's
bghandle), but Tcl writes some reports itself, on the thread's stderr channel: "error in
background error handler:" and an errorInfo when the interpreter refuses the handler (a callback
blocked in `tpool::wait` past -calltimeout: the limit's timer queues "time limit exceeded" in the
stopped interpreter), "bgerror failed to handle background error." (`interp bgerror {} {}` and a
failing `bgerror` proc), Thread's "Error from thread" (`thread::errorproc ""`). They quote the
error, an MTA's or the script's text, raw: its LF started a line of the log, its ESC reached a
terminal.

So a transform (`chan push`) sits on that channel, shared by every interpreter of the thread
(the host's, the script's, those it creates). A write that is one whole line of printable ASCII
at a line's start passes as it is, in Tcl: the script's usual debug line (output.py hands it to
Tcl's `puts` in one piece) and the first line of Tcl's reports (each written by a call of its
own). Anything else goes through :func:`logline.as_output`, as the script's `puts` does: controls
escaped, backslashes kept (so nothing is escaped twice), each line after the first indented;
and the first too when the write starts a line (Tcl writes the errorInfo it quotes by a call of
its own: its first line is the error's message); a line's start held until its end, so that
it goes out in one write(), no other writer's line inside it.

The transform's commands live in an interpreter of their own, one per thread and never deleted:
Tcl fails every later write on a channel whose transform's interpreter is gone, and the hosts'
interpreters go with their scripts. Thread's threads have standard channels of their own, and
nothing here: there, output.py's `bgerror` handler writes through the escaping `puts`, and no
limit refuses it.

`chan push` leaves Tcl's pointer to the thread's standard stderr on the channel below, and Tcl
names a channel "stderr" only while that pointer is the top of its stack: `chan names` listed
``file2``, which prelude.py's `quiet` took for a script's channel (the milter polled Tcl every
tick for ever), as a script would. So the pointer is moved to the transform (Tcl_SetStdChannel,
by ctypes as threads.py reaches Tcl), and back to the channel below if a script pops it (its
`finalize`, after Tcl took it off the stack, before Tcl frees it). Where Tcl cannot be reached
so, nothing is pushed: Tcl's reports are written raw, as before.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import _tkinter

from ..logline import INDENT, as_output, escape
from . import threads

#: The transform (see the module docstring). `held`: a line's start is held in Python.
TRANSFORM: Final = r"""
namespace eval ::tclmilter::py { variable held 0 }
proc ::tclmilter::py::stderr {op handle args} {
    switch -- $op {
        write {
            set data [lindex $args 0]
            if {!$::tclmilter::py::held && [regexp {^[\t -~]*\r?\n$} $data]} { return $data }
            # (a bare CR ends a line there: `fconfigure stderr -translation cr`)
            if {[chan configure stderr -translation] eq "cr"} { set data [string map {\r \n} $data] }
            lassign [::tclmilter::py::stderr_escaped $data] ::tclmilter::py::held data
            return $data
        }
        flush {
            # (also as a script pops the transform or closes the channel: nothing if nothing held)
            if {!$::tclmilter::py::held} { return }
            lassign [::tclmilter::py::stderr_escaped \n] ::tclmilter::py::held data
            return $data
        }
        finalize { ::tclmilter::py::stderr_popped }
        initialize { return {initialize finalize write flush} }
    }
}
# (none where descriptor 2 was closed: Tcl has no stderr channel then, and writes nothing)
expr {![catch {chan push stderr ::tclmilter::py::stderr}]}
"""


class _Escaper:
    """The Python half of one thread's transform: the start of a line, held until its end."""

    def __init__(self) -> None:
        self.held = b""

    def __call__(self, data: str | bytes) -> tuple[int, bytes]:
        """{held data}: the whole lines of ``data`` (Tcl's bytes) to write, escaped."""
        try:
            raw = data if isinstance(data, bytes) else data.encode("latin-1")
            text = raw.decode("utf-8", "surrogateescape").replace("\r\n", "\n")  # (a terminal's: crlf)
        except UnicodeEncodeError:  # (not Tcl's bytes: its text as it is)
            text = str(data)
        if not self.held and not text.startswith(" "):
            text = INDENT + text
        try:
            whole, self.held = as_output(text, False, self.held)
        except Exception:  # noqa: BLE001 - a failing transform would fail Tcl's write: its report lost
            whole, self.held = [escape(text).encode()], b""
        return int(bool(self.held)), b"".join([line + b"\n" for line in whole])


#: The interpreters of the threads' transforms (kept: see the module docstring), one a thread
#: that made a host. Marked in the thread itself, not by its ident: Python gives an ended
#: thread's ident to the next, whose stderr has no transform yet.
_OWNERS: Final[list[_tkinter.TkappType]] = []
_INSTALLED: Final = threading.local()


class _Standard:
    """Tcl's pointer to this thread's standard stderr, on the transform while it is on the stack."""

    def __init__(self, tcl: Any) -> None:
        self.tcl = tcl
        self.top = tcl.Tcl_GetTopChannel(tcl.Tcl_GetStdChannel(threads.STDERR))
        tcl.Tcl_SetStdChannel(self.top, threads.STDERR)

    def popped(self) -> None:
        """The transform's finalize: if a script popped it, the channel below is the standard one
        (on a close of the whole channel, the transform is still the top, and Tcl forgets it)."""
        below = self.tcl.Tcl_GetTopChannel(self.top)
        if below != self.top and self.tcl.Tcl_GetStdChannel(threads.STDERR) == self.top:
            self.tcl.Tcl_SetStdChannel(below, threads.STDERR)


def install() -> None:
    """The transform on this thread's stderr channel, once per thread; none where Tcl's functions
    cannot be reached."""
    if getattr(_INSTALLED, "done", False):
        return
    try:
        tcl = threads.library()
    except (OSError, AttributeError):
        return
    _INSTALLED.done = True
    # tkinter.Tcl() without its start-up files, as interp.py's _Interpreter: no Tk, no profile
    owner = _tkinter.create(None, "pytclmilter", "Tk", False, True, False, False, None)
    _OWNERS.append(owner)  # (list.append: atomic, whatever thread)
    owner.createcommand("::tclmilter::py::stderr_escaped", _Escaper())
    standard: list[_Standard] = []

    def popped() -> None:
        for one in standard:
            one.popped()

    owner.createcommand("::tclmilter::py::stderr_popped", popped)
    if owner.eval(TRANSFORM) == "1":
        standard.append(_Standard(tcl))
