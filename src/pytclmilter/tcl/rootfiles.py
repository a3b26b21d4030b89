"""What the script pulls in while it runs as root: Tcl's `source` and `load`, and so `package
require`, `auto_load` and Tcl modules, which end in them, refuse a file that another user could
change, as the script itself is refused (safepath.open_trusted: the file and every directory on
its way root's, writable by no one else).

`source` is replaced by a proc that evaluates what was read from the checked descriptor, as
Tcl's own does (in the caller's frame, `info script` set, ``(file "F" line N)`` in errorInfo,
`return` ending the file); Tcl's `source` opens the file by name, and no Tcl command reads a
script from a descriptor. `load` checks the library the same way, then Tcl opens it by name
(dlopen takes nothing else): as for the script, no name on the way is one another user could
change once checked. Installed in the script's interpreter when it is made as root; as any
other user the commands read and load as Tcl's own do.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Callable, Final, Sequence, TypeVar

from ..safepath import Untrusted, open_trusted, os_reason, read_trusted
from .usage import TclUsageError

#: The errorCode of a refused file: as Tcl's for a file it may not open (not EACCES, which
#: Tcl's package index scan ignores without a word).
_REFUSED: Final = ("POSIX", "EPERM", "operation not permitted")
_T = TypeVar("_T")

_PRELUDE: Final = r"""
proc ::source {args} {
    if {[llength $args] == 3 && [lindex $args 0] eq "-encoding"} {
        set encoding [lindex $args 1]
    } elseif {[llength $args] == 1} {
        set encoding [encoding system]
    } else {
        return -code error -errorcode {TCL WRONGARGS} {wrong # args: should be "source ?-encoding name? fileName"}
    }
    set file [lindex $args end]
    set r [::tclmilter::py::rootread $file]
    if {[lindex $r 0] eq "error"} {
        return -code error -errorcode [lindex $r 2] [lindex $r 1]
    }
    # As Tcl's channel reads a script: CRLF and CR as LF, nothing from ^Z on.
    set text [string map {\r\n \n \r \n} [encoding convertfrom $encoding [lindex $r 1]]]
    set eof [string first \x1a $text]
    if {$eof >= 0} { set text [string range $text 0 $eof-1] }
    set outer [info script]
    info script $file
    set code [catch {uplevel 1 $text} result options]
    info script $outer
    if {$code == 1} {
        # Where Tcl's `source` says which line of the file failed, `uplevel` says which of its body.
        set info [dict get $options -errorinfo]
        set frame [string last "\n    (\"uplevel\" body line " $info]
        if {$frame >= 0 && [regexp -start $frame {line (\d+)\)} $info - line]} {
            set info "[string range $info 0 $frame-1]\n    (file \"$file\" line $line)"
        }
        return -code error -errorcode [dict get $options -errorcode] -errorinfo $info $result
    }
    if {$code == 2} { return -options $options $result }
    return -code $code $result
}

rename ::load ::tclmilter::py::load
proc ::load {args} {
    for {set i 0} {[string match -* [lindex $args $i]]} {incr i} {
        if {[lindex $args $i] eq "--"} { incr i; break }
    }
    if {[lindex $args $i] ne ""} {
        set r [::tclmilter::py::rootcheck [lindex $args $i]]
        if {[lindex $r 0] eq "error"} {
            return -code error -errorcode [lindex $r 2] [lindex $r 1]
        }
    }
    if {[catch {uplevel 1 [list ::tclmilter::py::load {*}$args]} result options]} {
        return -code error -errorcode [dict get $options -errorcode] $result
    }
    return $result
}
"""


def install(register: Callable[[str, Callable[[Sequence[str]], Any]], None],
            alias: Callable[[str], None], child_eval: Callable[[str], Any]) -> None:
    """As root, the checking `source` and `load` in the script's interpreter, made and aliased
    to it (``alias``) by the host; as any other user, Tcl's own stay."""
    if os.geteuid() != 0:
        return
    for name, func in (("::tclmilter::py::rootread", _read), ("::tclmilter::py::rootcheck", _check)):
        register(name, func)
        alias(name)
    child_eval(_PRELUDE)


def _read(args: Sequence[str]) -> bytes:
    """`source`'s file, read from the descriptor checked while root runs it."""
    path = _path(args)
    if os.geteuid() != 0:  # (a host made as root, its callbacks run as the --user)
        return _plain(path)
    return _opened(path, "source", read_trusted, "read")


def _check(args: Sequence[str]) -> None:
    """`load`'s library, checked while root runs it."""
    if os.geteuid() == 0:
        os.close(_opened(_path(args), "load", open_trusted, "load"))


def _path(args: Sequence[str]) -> str:
    """The file as Tcl 8.6 names it: ``~`` and ``~user`` at its start are home directories."""
    return os.path.expanduser(args[0]) if args[0].startswith("~") else args[0]


def _opened(path: str, verb: str, opener: Callable[[str], _T], tcl_verb: str) -> _T:
    """``opener(path)``; the TclUsageError a refusal, or Tcl's own ``couldn't TCL_VERB file``."""
    try:
        return opener(path)
    except Untrusted as exc:
        raise TclUsageError(f'refusing to {verb} "{path}" as root: {exc.strerror}', _REFUSED) from None
    except OSError as exc:
        raise _unreadable(path, exc, tcl_verb) from None


def _plain(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _unreadable(path, exc, "read") from None


def _unreadable(path: str, exc: OSError, tcl_verb: str) -> TclUsageError:
    """Tcl's own error, errorCode and all (``POSIX ENOENT {no such file or directory}``)."""
    code = exc.errno or errno.EIO
    return TclUsageError(f'couldn\'t {tcl_verb} file "{path}": {os_reason(exc)}',
                         ("POSIX", errno.errorcode.get(code, "EIO"), os_reason(exc)))
