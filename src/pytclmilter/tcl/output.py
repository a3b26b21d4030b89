"""The script's `puts` to stdout and stderr, which under systemd are the journal, escaped.

Legacy scripts `puts` what the MTA sent (senders, headers) to debug: raw, an SMTP client's ESC
reached a terminal and its LF started a journal line of its own (``ERROR: forged``). So in the
script's interpreter, and in each interpreter it creates, `puts` and `chan puts` are procs that
hand text for stdout or stderr to :func:`logline.as_output` (controls escaped, tabs and
backslashes kept, a newline inside one `puts` indenting the line after it, a line of
logline.OUTPUT_LINE characters or more folded, journald's LineMax in mind) and then call Tcl's
own, renamed. Text
for any other channel, and plain printable ASCII that keeps the line short (the usual debug
line), goes to Tcl's own command untouched, without a call into Python.

Why not the channels themselves: a transform (`chan push`) or a reflected channel in place of
stdout (`chan create`) sees the buffer Tcl flushes, not `puts` calls, so it cannot tell the
newline one `puts` ends with from one inside its text; and `exec ... 2>@stderr` needs a channel
with a descriptor, which a reflected one has not. Neither would reach Thread's threads either:
Tcl's standard channels are per thread. A thread's interpreters get the same procs, and the
command as a ctypes callback run in that thread, from threads.py's static package.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Final, Sequence

from ..logline import OUTPUT_LINE, as_output
from . import threads

#: The command :func:`as_output` is in the host's interpreter, aliased into each script interpreter.
COMMAND: Final = "::tclmilter::py::output"

#: Evaluated in the script's interpreter and in each it creates (interp.py's bg_made).
PRELUDE: Final = r"""
namespace eval ::tclmilter::py {}
rename ::puts ::tclmilter::py::puts
rename ::tcl::chan::puts ::tclmilter::py::chanputs
# Aliases, not procs: an error's errorInfo shows the script's `puts ...` alone, as Tcl's.
interp alias {} ::puts {} ::tclmilter::py::escaped ::tclmilter::py::puts puts
interp alias {} ::tcl::chan::puts {} ::tclmilter::py::escaped ::tclmilter::py::chanputs {chan puts}
# Tcl's puts, its text escaped when it goes to stdout or stderr; its errors as Tcl's own, named
# as the script called it. The words as Tcl's puts reads them: ?-nonewline? ?channelId? string,
# or the old `puts channelId string nonewline`.
proc ::tclmilter::py::escaped {command name args} {
    set words $args
    set n [llength $words]
    if {$n == 1} {
        set channel stdout
    } elseif {$n == 2 || [lindex $words 0] eq "-nonewline"} {
        set channel [lindex $words end-1]
        if {$channel eq "-nonewline"} { set channel stdout }
    } else {
        set channel [lindex $words 0]
    }
    set i [expr {$n == 3 && [lindex $words 0] ne "-nonewline" ? 1 : $n - 1}]
    if {$channel in {stdout stderr} && $n <= 3} {
        # The characters on the channel's open line: from this interpreter's `puts -nonewline`
        # (and the old `puts channelId string nonewline`), where a line may be built in pieces.
        set open [expr {$n == 3 || $n == 2 && [lindex $words 0] eq "-nonewline"}]
        set text [lindex $words $i]
        set column [expr {[info exists ::tclmilter::py::column($channel)] ? $::tclmilter::py::column($channel) : 0}]
        if {[regexp {^[\t -~]*$} $text] && $column + [string length $text] < @LINE@} {
            set left [expr {$column + [string length $text]}]
        } else {
            lassign [lindex [::tclmilter::py::output $text $column] 1] text left
            lset words $i $text
        }
    }
    if {[catch {$command {*}$words} result options]} {
        return -code error -errorcode [dict get $options -errorcode] [string map [list $command $name] $result]
    }
    if {[info exists left]} { set ::tclmilter::py::column($channel) [expr {$open ? $left : 0}] }
}
""".replace("@LINE@", str(OUTPUT_LINE))


#: In each interpreter of a thread (threads.py), after PRELUDE: no host logs an error of its
#: `after` or `fileevent` handlers, which Tcl's own handler wrote raw on stderr; one that no
#: `bgerror` proc takes is written as Tcl's handler lays it out, through the escaping `puts`
#: (``::puts``: in this namespace, `puts` is Tcl's). A safe interpreter's Tcl drops, and still does.
THREAD_BGERROR: Final = r"""
proc ::tclmilter::py::threadbgerror {message options} {
    if {[llength [info commands ::bgerror]]} { tailcall ::tcl::Bgerror $message $options }
    ::puts stderr [dict get $options -errorinfo]
}
if {![interp issafe]} { interp bgerror {} ::tclmilter::py::threadbgerror }
"""


def install(register: Callable[[str, Callable[[Sequence[str]], Any]], None], call: Callable[..., Any],
            child: str) -> None:
    """The escaping `puts` in the script's interpreter ``child`` (``call``: the host's
    interpreter; ``register`` makes a Python function a command of it). bg_made gives it to
    the interpreters the script creates, threads.py to those of the threads it creates (where
    this Tcl cannot be given a package, a thread's `puts` stays Tcl's own)."""
    register(COMMAND, _output)
    call("set", "::tclmilter::py::outputprelude", PRELUDE)
    call("interp", "alias", child, COMMAND, "", COMMAND)
    call("interp", "eval", child, PRELUDE)
    with contextlib.suppress(OSError, AttributeError):
        threads.give(threads.SAFE, {COMMAND: _output}, PRELUDE + THREAD_BGERROR)


def _output(args: Sequence[str]) -> tuple[str, int]:
    """{text column}: as_output of the text, on a line ``column`` characters long so far."""
    return as_output(args[0], int(args[1]))
