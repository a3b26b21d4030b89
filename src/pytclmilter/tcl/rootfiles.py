"""What the script pulls in while it runs as root: Tcl's `source` and `load`, and so `package
require`, `auto_load` and Tcl modules, which end in them, refuse a file that another user could
change, as the script itself is refused (safepath.open_trusted: the file and every directory on
its way root's, writable by no one else).

`source` is replaced by a proc that evaluates what was read from the checked descriptor, as
Tcl's own does (in the caller's frame, `info script` set, ``(file "F" line N)`` in errorInfo,
`return` ending the file, a byte order mark first skipped); Tcl's `source` opens the file by
name, and no Tcl command reads a script from a descriptor. `load` checks the library the same
way, then Tcl opens it by name (dlopen takes nothing else): as for the script, no name on the
way is one another user could change once checked. The autoloader's `auto_load_index`, which
evaluates each `tclIndex` as it reads it (init.tcl's ``eval [read $f]``), `source`s it instead.
An interpreter the script creates (`interp create`, in those too) gets all this, a safe one
excepted (it has neither command); so does each thread of the Thread package, through the
static package of threads.py that `thread::create` and `tpool::create` have it load first.
Installed when the script's interpreter is made as root; as any other user the commands read
and load as Tcl's own do.
"""

from __future__ import annotations

import errno
import os
import pwd
from typing import Any, Callable, Final, Sequence, TypeVar

from ..safepath import Untrusted, open_trusted, os_reason, read_trusted
from . import threads
from .usage import TclUsageError, check_count

#: The errorCode of a refused file: as Tcl's for a file it may not open (not EACCES, which
#: Tcl's package index scan ignores without a word).
_REFUSED: Final = ("POSIX", "EPERM", "operation not permitted")
_T = TypeVar("_T")

_PRELUDE: Final = r"""
proc ::source {args} {
    if {[llength $args] == 1} {
        set encoding [::tcl::encoding::system]
    } elseif {[llength $args] != 3} {
        return -code error -errorcode {TCL WRONGARGS} {wrong # args: should be "source ?-encoding name? fileName"}
    } elseif {[lindex $args 0] ne "-encoding"} {
        set option [lindex $args 0]
        return -code error -errorcode [list TCL LOOKUP INDEX option $option] "bad option \"$option\": must be -encoding"
    } else {
        set encoding [lindex $args 1]
    }
    set file [lindex $args end]
    set r [::tclmilter::py::rootread $file]
    if {[lindex $r 0] eq "error"} {
        return -code error -errorcode [lindex $r 2] [lindex $r 1]
    }
    if {[catch {::tcl::encoding::convertfrom $encoding [lindex $r 1]} text options]} {
        return -code error -errorcode [::tcl::dict::get $options -errorcode] $text
    }
    # As Tcl's channel reads a script: CRLF and CR as LF, nothing from ^Z on; and as its
    # `source`, a byte order mark first is skipped.
    set text [::tcl::string::map {\r\n \n \r \n} $text]
    set eof [::tcl::string::first \x1a $text]
    if {$eof >= 0} { set text [::tcl::string::range $text 0 $eof-1] }
    if {[::tcl::string::index $text 0] eq "\ufeff"} { set text [::tcl::string::range $text 1 end] }
    set outer [::tcl::info::script]
    ::tcl::info::script $file
    set code [catch {uplevel 1 $text} result options]
    ::tcl::info::script $outer
    if {$code == 1} {
        # Where Tcl's `source` says which line of the file failed, `uplevel` says which of its body.
        set info [::tcl::dict::get $options -errorinfo]
        set frame [::tcl::string::last "\n    (\"uplevel\" body line " $info]
        if {$frame >= 0 && [regexp -start $frame {line (\d+)\)} $info - line]} {
            set info "[::tcl::string::range $info 0 $frame-1]\n    (file \"$file\" line $line)"
        }
        return -code error -errorcode [::tcl::dict::get $options -errorcode] -errorinfo $info $result
    }
    if {$code == 2} { return -options $options $result }
    return -code $code $result
}

rename ::load ::tclmilter::py::load
proc ::load {args} {
    for {set i 0} {[::tcl::string::match -* [lindex $args $i]]} {incr i} {
        if {[lindex $args $i] eq "--"} { incr i; break }
    }
    if {[lindex $args $i] ne ""} {
        set r [::tclmilter::py::rootcheck [lindex $args $i]]
        if {[lindex $r 0] eq "error"} {
            return -code error -errorcode [lindex $r 2] [lindex $r 1]
        }
    }
    if {[catch {uplevel 1 [list ::tclmilter::py::load {*}$args]} result options]} {
        return -code error -errorcode [::tcl::dict::get $options -errorcode] $result
    }
    return $result
}

# The safe base (::safe::interpCreate) sources and loads for a safe interpreter with its hidden,
# Tcl's own `source` and `load` (`interp invokehidden`, from the master's auto_path): the file is
# checked first, for the `interp` command (words from 3) and a safe interpreter's own (from 2).
# Exposed, they would be called unchecked; marked trusted, a safe interpreter could invoke its own
# children's, and create interpreters with Tcl's own: both are refused.
proc ::tclmilter::py::hidden {at command op} {
    set sub [lindex $command 1]
    if {$sub ne "" && [::tcl::string::first $sub marktrusted] == 0} {
        return -code error -errorcode {POSIX EPERM {operation not permitted}} "refusing to mark an\
            interpreter trusted as root: its hidden source and load, Tcl's own, would not be checked"
    }
    if {[::tcl::string::match exp* $sub] && [::tcl::string::first $sub expose] == 0 && [lindex $command $at] in {source load}} {
        return -code error -errorcode {POSIX EPERM {operation not permitted}} "refusing to expose\
            [lindex $command $at] as root: Tcl's own, which the interpreter hides, would not be checked"
    }
    if {![::tcl::string::match inv* $sub] || [::tcl::string::first $sub invokehidden] != 0} { return }
    while {[lindex $command $at] in {-global -namespace}} {
        incr at [expr {[lindex $command $at] eq "-global" ? 1 : 2}]
    }
    if {[lindex $command $at] eq "--"} { incr at }
    set hidden [lindex $command $at]
    if {$hidden eq "source"} {
        set file [lindex $command end]
    } elseif {$hidden eq "load"} {
        for {incr at} {[::tcl::string::match -* [lindex $command $at]]} {incr at} {
            if {[lindex $command $at] eq "--"} { incr at; break }
        }
        set file [lindex $command $at]
    } else {
        return
    }
    if {$file ne ""} {
        set r [::tclmilter::py::rootcheck $file $hidden]
        if {[lindex $r 0] eq "error"} {
            return -code error -errorcode [lindex $r 2] [lindex $r 1]
        }
    }
}
proc ::tclmilter::py::safemade {command code result op} {
    if {$code == 0 && [::tcl::string::match "cr*" [lindex $command 1]] && [interp issafe $result]} {
        catch {trace add execution [lindex $result end] enter {::tclmilter::py::hidden 2}}
    }
    return $result
}
trace add execution ::interp enter {::tclmilter::py::hidden 3}
trace add execution ::interp leave ::tclmilter::py::safemade

# The autoloader evaluates each tclIndex (version 2.0: a script) as it reads it by name: through
# the `source` above instead, in the same frame (where $dir is its directory). It opens each by
# name first, to read its first line: checked before (as `load`'s library), or another user's
# FIFO held root in open() for ever, their link to /dev/zero had it read without end. A file
# refused fails as `source` would; none there, or one that cannot be opened, is passed over, as
# Tcl's `open` failing was (the walk refuses another user's directory before it finds no file).
proc ::tclmilter::py::rootindex {file var} {
    upvar 1 $var f
    if {![::tcl::file::exists $file]} { return 1 }
    set r [::tclmilter::py::rootcheck $file source]
    if {[lindex $r 0] eq "error"} {
        if {[lrange [lindex $r 2] 0 1] eq {POSIX EPERM}} {
            return -code error -errorcode [lindex $r 2] [lindex $r 1]
        }
        return 1
    }
    catch {set f [open $file]}
}
apply {{} {
    set body [::tcl::info::body ::auto_load_index]
    set opened {[catch {set f [open [file join $dir tclIndex]]}]}
    set checked [::tcl::string::map [list {eval [read $f]} {source [::tcl::file::join $dir tclIndex]} \
        $opened {[::tclmilter::py::rootindex [::tcl::file::join $dir tclIndex] f]}] $body]
    if {[::tcl::string::first $opened $body] < 0 || [::tcl::string::first {eval [read $f]} $body] < 0} {
        error "this Tcl's auto_load_index reads tclIndex files in a way that cannot be checked as root"
    }
    proc ::auto_load_index {} $checked
}}
"""

#: In the host's interpreter: a new interpreter (`interp create`, traced) gets the aliases, the
#: prelude and the trace, unless it is a safe one, which has neither `source` nor `load`.
_HOST: Final = r"""
proc ::tclmilter::py::rootmade {creator command code result op} {
    if {$code == 0 && [::tcl::string::match "cr*" [lindex $command 1]]} {
        set path [list {*}$creator {*}$result]
        if {![interp issafe $path]} { ::tclmilter::py::rootinstall $path }
    }
}
proc ::tclmilter::py::rootinstall {path} {
    foreach name {::tclmilter::py::rootread ::tclmilter::py::rootcheck} {
        interp alias $path $name {} $name
    }
    interp alias $path ::tclmilter::py::rootmade {} ::tclmilter::py::rootmade $path
    interp eval $path $::tclmilter::py::rootprelude
    interp eval $path {trace add execution ::interp leave ::tclmilter::py::rootmade}
}
"""


def install(register: Callable[[str, Callable[[Sequence[str]], Any]], None], call: Callable[..., Any],
            child: str, note: Callable[[str], None]) -> None:
    """As root, the checking `source` and `load` in the script's interpreter ``child``, in those
    it creates and in the Thread package's threads (``call``: the host's interpreter;
    ``register`` makes a Python function a command of it); as any other user, Tcl's own stay.
    ``note`` gets the absolute path of each file the interpreters `source`: a reload reads
    them again, perhaps as --user by then (commands/run.py warns of those it cannot)."""
    if os.geteuid() != 0:
        return

    def read(args: Sequence[str]) -> bytes:
        data = _read(args)
        note(os.path.abspath(os.path.expanduser(args[0])))  # (relative: to the cwd of now)
        return data

    commands: dict[str, Callable[[Sequence[str]], Any]] = {"::tclmilter::py::rootread": _read,
                                                           "::tclmilter::py::rootcheck": _check}
    register("::tclmilter::py::rootread", read)
    register("::tclmilter::py::rootcheck", _check)
    call("set", "::tclmilter::py::rootprelude", _PRELUDE)
    call("eval", _HOST)
    call("::tclmilter::py::rootinstall", child)
    try:  # (once a process, whichever host comes first: the threads' `source` notes nothing)
        threads.give(threads.ROOT, commands, _PRELUDE)
    except (OSError, AttributeError):
        pass  # (threads.install has root refuse to start threads)


def _read(args: Sequence[str]) -> bytes:
    """`source`'s file, read from the descriptor checked while root runs it. (The script can call
    it too: without its file each call was an internal error, a traceback logged.)"""
    check_count(args, 1, 1, "::tclmilter::py::rootread fileName")
    return read_source(args[0])


def read_source(path: str) -> bytes:
    """A Tcl file as `source` reads it (checked as root): TclUsageError with Tcl's words if not."""
    if os.geteuid() != 0:  # (a host made as root, its callbacks run as the --user)
        return _opened(path, "source", _plain, "read")
    return _opened(path, "source", read_trusted, "read")


def _check(args: Sequence[str]) -> None:
    """`load`'s library (or, given ``source``, a file to source by name: the safe base's), checked
    while root runs it."""
    check_count(args, 1, 2, "::tclmilter::py::rootcheck fileName ?source?")
    if os.geteuid() == 0:
        if args[1:] == ["source"]:
            os.close(_opened(args[0], "source", open_trusted, "read"))
        else:
            os.close(_opened(args[0], "load", _library, "load"))


def _library(path: str) -> int:
    """open_trusted; Untrusted for a bare name not in the current directory, which Tcl's `load`
    would then have dlopen look for in its search path (LD_LIBRARY_PATH...), checked by no one."""
    try:
        return open_trusted(path)
    except FileNotFoundError:
        if "/" in path:
            raise
    raise Untrusted(errno.EPERM, "not in the current directory, and the dynamic linker would look for it in "
                                 "directories nothing checks (give the library's path)")


def _opened(name: str, verb: str, opener: Callable[[str], _T], tcl_verb: str) -> _T:
    """``opener`` of the file Tcl names ``name``; the TclUsageError a refusal, or Tcl's own error
    for a file it could not read or load, both naming the file as Tcl got it."""
    try:
        return opener(_tilde(name))
    except Untrusted as exc:
        raise TclUsageError(f'refusing to {verb} "{name}" as root: {exc.strerror}', _REFUSED) from None
    except OSError as exc:
        code = exc.errno or errno.EIO
        if tcl_verb == "load":  # Tcl's words: dlopen's, of the name it was given
            raise TclUsageError(f'couldn\'t load file "{name}": {name}: cannot open shared object file: '
                                f'{os.strerror(code)}') from None
        reason = "illegal operation on a directory" if code == errno.EISDIR else os_reason(exc)  # (Tcl's words)
        raise TclUsageError(f'couldn\'t {tcl_verb} file "{name}": {reason}',
                            ("POSIX", errno.errorcode.get(code, "EIO"), reason)) from None


def _tilde(name: str) -> str:
    """``name`` with ``~`` or ``~user`` first as Tcl 8.6 reads them: $HOME (not the password
    file's entry when HOME is unset, as Python's expanduser falls back to), the user's home;
    Tcl's error when there is none."""
    if not name.startswith("~"):
        return name
    user = name[1:].split("/", 1)[0]
    if not user and "HOME" not in os.environ:
        raise TclUsageError("couldn't find HOME environment variable to expand path",
                            ("TCL", "VALUE", "PATH", "HOMELESS"))
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise TclUsageError(f'user "{user}" doesn\'t exist', ("TCL", "VALUE", "PATH", "NOUSER")) from None
    return os.path.expanduser(name)


def _plain(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
