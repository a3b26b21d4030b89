"""The embedded Tcl interpreter: TclMilter's commands, callbacks into Tcl, the event loop, exit.

tkinter's interpreter may only be used from the thread that created it, so
everything here runs on the thread that runs the asyncio loop; ``milter stop``
from other threads arrives through Tcl's own event queue (Thread package) or
through :meth:`Milter.stop`, which is thread-safe.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import sys
import time
import tkinter
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Final, Sequence

import _tkinter

from ..callbacks import CallbackError
from ..context import Context, MilterError
from ..hooks import Hooks
from ..limits import PYTHON_LIMIT, CallbackTimeout
from ..logline import SHOWN, clip, escape, failure_text, tell_counts
from ..milter import Milter
from ..protocol.codec import text
from ..status import Status
from . import context_cmd, output, rootfiles, threads
from .limit import CallLimit, is_limit_error
from .milter_cmd import MilterCommand, SuspendAtMain
from .priv import TclPrivate
from .pycommands import PythonCommands
from .strings import ascii_text, deep_to_tcl, from_tcl, tcl_body_to_wire, tcl_to_wire, to_tcl, wire_to_tcl
from .unanswered import Unanswered, message_of
from .usage import NONE, Answer, TclUsageError, integer

log: Final = logging.getLogger("pytclmilter")

_DONT_WAIT: Final = _tkinter.DONT_WAIT
_ALL_EVENTS: Final = _tkinter.ALL_EVENTS
_IDLE_EVENTS: Final = _tkinter.IDLE_EVENTS
#: What a handler that Tcl refused to run, in the pass whose earlier handler the limit stopped,
#: is logged as (Tcl gives it no message: the interpreter runs nothing until the limit is reset).
_NOT_RUN: Final = ("not run: a handler due with it was stopped at the time limit (-calltimeout), and Tcl "
                   "runs nothing more in that pass")
#: tkinter's own quoting of a tuple as a Tcl list; private to tkinter, so not in its type stubs.
_stringify: Final[Callable[[Any], str]] = getattr(tkinter, "_stringify")

_PRELUDE = r"""
proc exit {{returnCode 0}} {
    set r [::tclmilter::py::exit $returnCode]
    return -code [lindex $r 0] [lindex $r 1]
}

# 1 when no Tcl event can be pending: no `after` timer in either interpreter, no channel but the
# standard three and no file event handler on these (`watched`), no second thread (so no
# thread::send). See service_events. (Counting channels was not enough: a daemon's `close stdin`
# left a script's server socket the third channel, and its connections were never accepted.)
# `threads`: 1 once a script's interpreter has run a thread:: command (TclHost.thread_home);
# before, thread::names here would make this interpreter the one Thread sends this thread's
# scripts to.
# A thread's thread::send events stay queued after it ended, so the poll after the last thread is
# gone still happens: `poll` is 1 while threads exist, from the script's thread::create (traced:
# a worker may send and end between two checks), and when service_events left events queued.
namespace eval ::tclmilter::py { variable poll 0; variable std_events 0 }
proc ::tclmilter::py::poll_next {args} { variable poll 1 }
# The script's `fileevent` and `chan event` (traced): a handler on a standard channel is polled for
# from then on (`fileevent stdin readable ...`).
proc ::tclmilter::py::watched {command op} {
    lassign $command - channel - script
    if {$channel in {stdin stdout stderr} && $script ne ""} { variable std_events 1 }
}
proc ::tclmilter::py::quiet {child threads} {
    variable poll
    variable std_events
    if {$std_events} { return 0 }
    # This interpreter's own directly: `interp eval` allows break and continue in the interpreter
    # it evaluates in, and of a pure list Tcl never clears that, so here the next callback's break
    # came back to Python as a normal return (the child lets it through to here: it is this
    # interpreter that makes it Tcl's error). The child's as a pure list, not compiled: a braced
    # literal would be recompiled on every tick.
    if {[llength [after info]] || [llength [interp eval $child [list after info]]]} { return 0 }
    foreach channel [concat [chan names] [interp eval $child [list ::tcl::chan::names]]] {
        if {$channel ni {stdin stdout stderr}} { return 0 }
    }
    set was $poll
    set poll [expr {$threads && [llength [thread::names]] > 1}]
    expr {!$was && !$poll}
}

# The callbacks' time limit (tcl/limit.py) on the script's interpreter and on every interpreter the
# script made (`interp create`, also inside those): Tcl checks an interpreter's own limit only,
# so code running in a child would otherwise never be stopped, and a child made in a callback
# keeps the deadline it inherited there, past which it refuses every command for ever.
proc ::tclmilter::py::limit_time {child args} {
    set paths [list $child]
    for {set i 0} {$i < [llength $paths]} {incr i} {
        foreach name [interp slaves [lindex $paths $i]] {
            lappend paths [list {*}[lindex $paths $i] $name]
        }
    }
    foreach path $paths { interp limit $path time {*}$args }
}
# The script's `interp create` (traced): the new interpreter gets the limit in force now, and with
# it the handler that gives a callback with time left its full time (Tcl copies the time alone).
proc ::tclmilter::py::interp_made {command code result op} {
    if {$code == 0 && [string match "cr*" [lindex $command 1]]} { ::tclmilter::py::limit_sync }
}

# An interpreter the script creates (`interp create`, in those too; traced) reports its `after` and
# `fileevent` errors as the script's does (its own ::bgerror first, then the log) where Tcl would
# print them raw on stderr; a safe one's Tcl drops, and still does. Its first thread:: command,
# too, does what the script's does (tclmilter.tcl's threads_used): where it is the process's
# first, this host keeps the script (TclHost.thread_home) and Thread's errorproc logs a thread's
# error, which Thread wrote raw on stderr.
# It returns the command's result: Tcl gives that of a leave trace to the next one (rootfiles.py's).
# Its `puts` to stdout and stderr is escaped as the script's is (tcl/output.py), a safe one's too,
# and so are those it creates (a safe one's, with a channel shared, or once marked trusted); one
# not safe gets threads.py's `thread::create` and `tpool::create` too.
proc ::tclmilter::py::bg_made {parent command code result op} {
    if {$code != 0 || ![string match "cr*" [lindex $command 1]]} { return $result }
    set path [list {*}$parent {*}$result]
    interp alias $path ::tclmilter::py::output {} ::tclmilter::py::output
    interp eval $path $::tclmilter::py::outputprelude
    interp alias $path ::tclmilter::py::bg_made {} ::tclmilter::py::bg_made $path
    interp eval $path [list trace add execution ::interp leave ::tclmilter::py::bg_made]
    if {[interp issafe $path]} { return $result }
    interp eval $path $::tclmilter::py::threadsprelude
    foreach name {bgerror threads thread_error poll_next} {
        interp alias $path ::tclmilter::py::$name {} ::tclmilter::py::$name
    }
    foreach name {bgerror threads_used thread_error trace_threads watch_threads} {
        set from [list interp eval [lindex $path 0]]
        set procedure [list proc $name [{*}$from [list ::tcl::info::args ::tclmilter::$name]] \
            [{*}$from [list ::tcl::info::body ::tclmilter::$name]]]
        interp eval $path [list ::tcl::namespace::eval ::tclmilter $procedure]
    }
    interp bgerror $path ::tclmilter::bgerror
    return $result
}

# What a callback's code other than ok and error (TclHost._checked caught it) makes where Tcl's top
# level ends it, as there: a `return` returns (with its own -code at its last level), break,
# continue and any other code are errors, in Tcl's words and errorCode, with the one frame Tcl writes
# (the command's first 150 bytes, in whole characters, and "..."). {0 result} or {1 message}, with
# ::errorInfo and ::errorCode set.
proc ::tclmilter::py::unexpected {code result options command} {
    if {$code == 2 && [dict get $options -level] == 1} {
        set code [dict get $options -code]
        if {$code == 0} { return [list 0 $result] }
    }
    set ::errorCode NONE
    if {[dict exists $options -errorcode]} { set ::errorCode [dict get $options -errorcode] }
    if {$code == 3 || $code == 4} {
        set result "invoked \"[lindex {- - - break continue} $code]\" outside of a loop"
    } elseif {$code != 1} {
        set result "command returned bad code: $code"
    }
    if {$code != 1} { set ::errorCode [list TCL UNEXPECTED_RESULT_CODE $code] }
    set shown $command
    if {[string bytelength $command] > 150} {
        set end 150
        while {[string bytelength [string range $command 0 $end-1]] > 150} { incr end -1 }
        set shown "[string range $command 0 $end-1]..."
    }
    set ::errorInfo "$result\n    while executing\n\"$shown\""
    list 1 $result
}

# Tcl's exit writes what every channel buffers before the process ends (Tcl_Finalize); the milter
# ends by other ways (a worker's os._exit, the end of `run`), so this does it: a script's log file
# keeps its last lines. `ending`: the process or the interpreter goes, so every channel but the
# standard three is made non-blocking first. A flush of a blocking socket waits until a stuck
# peer reads; deleting an interpreter closes its channels, and closing a blocking pipeline waits
# for its programs to end (`open "|tail -f log"`: for ever, and the milter with it). Non-blocking,
# Tcl writes what can go now and detaches the programs. The standard channels stay blocking:
# their descriptors are shared with the process that started the milter.
proc ::tclmilter::py::flush_all {child ending} {
    foreach c [interp eval $child [list ::tcl::chan::names]] {
        if {$ending && $c ni {stdin stdout stderr}} {
            catch {interp eval $child [list ::fconfigure $c -blocking 0]}
        }
        catch {interp eval $child [list ::tcl::chan::flush $c]}
    }
}
"""

# What the second alias of a body callback runs, for blocks that are not plain ASCII: the block
# arrives as the bytes Tcl keeps its text in (strings.py), which become the string without
# another conversion, and tailcall runs the script's callback in the lambda's place (so [info
# level] and uplevel see the callback alone). A lambda in the global namespace, because that is
# where an alias resolves its command.
#: How errorInfo introduces each outer frame.
_CALLED_FROM: Final = "\n    invoked from within\n"
#: Tcl's error for a `yield` outside a coroutine.
_NO_COROUTINE: Final = "yield can only be called in a coroutine"
#: How errorInfo introduces its first frame.
_EXECUTING: Final = "\n    while executing\n"
#: Tcl's error for a command that ended in break, continue or another code where none is allowed.
_UNEXPECTED_CODE: Final = re.compile(r'invoked "(?:break|continue)" outside of a loop|command returned bad code: -?\d+')
_BODY_LAMBDA: Final = "{prefix context bytes} {tailcall {*}$prefix $context [::tcl::encoding::convertfrom identity $bytes]} ::"


#: The host whose script's interpreter Thread evaluates what threads send to this thread in: the
#: first to run a thread:: command (tclmilter.tcl, threads_used). Thread keeps that interpreter
#: for the process's life and would evaluate into freed memory once it is deleted, so the host
#: stays here and its interpreter is never deleted (TclHost.close); empty until then.
_THREAD_HOME: Final[list["TclHost"]] = []


class _Interpreter(tkinter.Tk):
    """What ``tkinter.Tcl()`` makes, less the start-up files of a desktop program.

    ``tkinter.Tk`` sources ``.Tk.tcl`` and ``.pytclmilter.tcl`` and executes ``.Tk.py`` and
    ``.pytclmilter.py`` from $HOME, or from the current directory when HOME is unset, as a
    service's often is (systemd starts it in /). In a daemon that starts as root that is code
    from a path no one configured, read through whatever symlink is there: never read any.
    """

    def readprofile(self, baseName: str, className: str) -> None:  # noqa: N803 - tkinter's names
        """Nothing: see the class."""


def tcl_library_dir() -> Path:
    """Where pkgIndex.tcl lives: the installed package data, else the source tree's tclmilter/."""
    try:
        path = Path(str(resources.files("pytclmilter.tcllib")))
        if (path / "pkgIndex.tcl").exists():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[3] / "tclmilter"


def _to_tcl(value: Any) -> Any:
    """Callback arguments as Tcl values: bytes as text, lists as lists, dicts as key/value lists."""
    if type(value) is str:
        return value if value.isascii() and "\x00" not in value else to_tcl(value)
    if isinstance(value, str):
        return to_tcl(value)
    if isinstance(value, bytes):
        return to_tcl(text(value))
    if isinstance(value, list):
        return tuple(_to_tcl(v) for v in value)
    if isinstance(value, dict):
        flat: list[Any] = []
        for k, v in value.items():
            flat.append(_to_tcl(k))
            flat.append(_to_tcl(v))
        return tuple(flat)
    return value


class NotAStatus:
    """A callback result that is no SMFIS_* name: the engine logs it and continues."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        """As the engine's warning quotes it: a long result by its start (logline.clip)."""
        if len(self.text) <= SHOWN:
            return f'"{self.text}"'
        return f'"{clip(self.text)}" ({len(self.text)} characters)'


_STATUS_BY_NAME: Final = {s.smfis: s for s in Status} | {"": Status.CONTINUE}


def tcl_status(result: Any) -> Status | NotAStatus:
    """A Tcl callback's result by its string value, as Tcl sees it (tkinter hands back typed objects)."""
    if type(result) is str:  # the usual `return SMFIS_...`
        status = _STATUS_BY_NAME.get(result)
        if status is not None:
            return status
    if isinstance(result, tuple):
        result = _stringify(result)
    value = str(result)
    if value == "":
        return Status.CONTINUE
    status = _STATUS_BY_NAME.get(value)
    return status if status is not None else NotAStatus(from_tcl(value))


def _as_registered(info: str, alias: str, script: str) -> str:
    """A callback's errorInfo with its last frame as the script registered the callback: the
    alias it is called through is in no script, and an 8-bit block's second alias is given the
    bytes Tcl keeps the block's text in, shown as other characters (the frame above it, the
    callback's own, shows the block's text). A callback that ends in `break`, `continue` or
    another code has no frame of its own: its error is Tcl's, `while executing` the alias. (When
    the script's interpreter made that error rather than ours, which depends on what ran there
    before, Tcl writes "invoked from within" instead: shown alike.)"""
    frame = info.rfind(f'{_CALLED_FROM}"{alias}_8bit ')
    if frame >= 0:
        return info[:frame]
    for intro in (_CALLED_FROM, _EXECUTING):
        frame = info.rfind(f'{intro}"{alias} ')
        if frame >= 0:
            rest = info[frame + len(intro) + 1 + len(alias):]
            shown = _EXECUTING if _UNEXPECTED_CODE.fullmatch(info[:frame]) else intro
            return f'{info[:frame]}{shown}"{script}{rest}'
    frame = info.rfind(f'{_EXECUTING}"{alias}_8bit ')
    if frame < 0:
        return info
    name = frame + len(_EXECUTING) + 1
    return f"{info[:name]}{script}{_text_of_bytes(info[name + len(alias) + len('_8bit'):])}"


def _usage_as_registered(text: str, alias: str, script: str) -> str:
    """Tcl's `wrong # args` of a callback (its message, errorInfo's first line) with the callback
    as the script registered it: Tcl writes the usage of a command called through an alias with
    the alias's name, which is in no script; TclMilter 1.0 called the callback itself."""
    usage = f'wrong # args: should be "{alias}'
    if text.startswith(usage) and text[len(usage):len(usage) + 1] in (" ", '"'):
        return f'wrong # args: should be "{script}{text[len(usage):]}'
    return text


def _text_of_bytes(shown: str) -> str:
    """What errorInfo shows of words given as the bytes Tcl keeps text in (a character per byte,
    cut after 150), as the text they are."""
    try:
        return text(tcl_to_wire(shown.encode("latin-1")))
    except UnicodeEncodeError:  # (not such a frame after all)
        return shown


@functools.cache
def _tclsh(version: str) -> str | None:
    """The tclsh of this Tcl's version on PATH: what `info nameofexecutable` names under tclsh,
    where TclMilter's scripts ran. Here Tcl was started by Python and names Python, which a
    script that runs Tcl helpers with it would hand a Tcl script."""
    for name in (f"tclsh{version}", "tclsh"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


#: What the log calls an error of an `after` or `fileevent` handler of the script.
_HANDLER_ERROR: Final = "error in an event handler of the script (after, fileevent)"


class TclHost:
    """One interpreter hosting TclMilter for one :class:`Milter`."""

    #: The interpreter the script runs in: a child, so that Tcl's `interp limit` can bound callbacks.
    CHILD = "filter"
    #: The coroutine that runs the script under start(): it exists while the script waits in `milter main`.
    SCRIPT = "::tclmilter::py::script"

    def __init__(self, hooks: Hooks | None = None, on_exit: Callable[[int], None] | None = None) -> None:
        """``hooks``: the program's own (listening, signal); the interpreter adds its context and tick hooks."""
        own = replace(hooks or Hooks(), context_created=self._context_created, context_closed=self._context_closed,
                      tick=self.service_events, flush=self.flush_channels, write_held=output.write_held_now)
        self.milter = Milter(name="TclMilter", hooks=own)
        self.on_exit = on_exit or self.exit_process
        libdir = str(tcl_library_dir())
        # New interpreters (those of Thread's secondary threads too) read TCLLIBPATH into auto_path.
        paths = os.environ.get("TCLLIBPATH", "")
        if libdir not in paths.split():
            os.environ["TCLLIBPATH"] = f"{libdir} {paths}".strip()
        self.tcl = _Interpreter(useTk=False)  # tkinter.Tcl(), without start-up files
        self.tk = self.tcl.tk
        self.tk.call("encoding", "system", "utf-8")  # scripts are UTF-8 whatever the locale
        self.contexts: dict[int, Context] = {}
        self._commands: list[str] = []  # the Python commands, deleted by close()
        #: The files the script's interpreters `source`d as root until its `milter main` (absolute
        #: paths, each once; tcl/rootfiles.py): what a reload reads again. (Not after: a callback
        #: that sources a file per message would grow it for ever.)
        self.sourced: dict[str, None] = {}
        #: How start() sources the script, for error_info: `source top.tcl`.
        self._source_word = ""
        #: `milter main` served inside the script's call (where Tcl could not suspend it).
        self.served_inside = False
        #: `milter main` serves inside a Tcl command (MilterCommand._serve): the callbacks are then
        #: called below the main interpreter's top level, where Tcl lets break and continue through
        #: as a normal result, so their code is checked (_checked).
        self.inside = 0
        #: A reload loads this script: its `milter main` must suspend it, never serve.
        self.loading = False
        #: The background errors logged lately: a failing `after` loop logs once a minute.
        self.bgerrors = Unanswered()
        #: The errors of threads' scripts that no caller got (Thread's errorproc), as bgerrors.
        self.thread_errors = Unanswered()
        #: A handler was stopped by the limit since the background errors were last reported.
        self._handler_stopped = False
        self.command = MilterCommand(self, self.milter)
        self._register("::tclmilter::py::milter", self.command)
        self._register("::tclmilter::py::context", self._context)
        self._register("::tclmilter::py::replacebody", self._replacebody)
        self._register("::tclmilter::py::privstarted", self._priv_started)
        self._register("::tclmilter::py::exit", self._exit)
        self._register("::tclmilter::py::threads", self._threads)
        self._register("::tclmilter::py::bgerror", self._bgerror)
        self._register("::tclmilter::py::thread_error", self._thread_error)
        self._create("::tclmilter::py::serve", self._serve_inside)
        self.tk.call("eval", _PRELUDE)
        self._make_child(libdir)
        # For `quiet` only, and only now: see _make_child.
        self.tk.call("catch", "package require Thread")
        self.private = TclPrivate(self.child_call)
        self.tk.call("interp", "alias", "", "::tclmilter::py::outgoing", self.CHILD, "set", "::tclmilter::outgoing")
        self._outgoing = self._command_object("::tclmilter::py::outgoing")
        self.limit = CallLimit(self.tk.call, self._create, self.CHILD, self.milter.shared)
        self._callbacks = 0
        self._aliases: dict[str, list[str]] = {}  # event -> its Tcl callback's aliases (callback())
        self.pycommands = PythonCommands(self.tk.call, self._create, self.CHILD, self.limit, self.milter)
        self.pycommands.attach(self.milter.tcl_commands)
        self.milter.script = self.pycommands

    def _make_child(self, libdir: str) -> None:
        """The script's interpreter: TclMilter's Python commands and our exit aliased in.

        The Thread package evaluates every thread::send to this thread in the interpreter that
        ran the thread's first thread:: command (its ``Init``). `package require TclMilter` here
        runs `thread::id` (tclmilter.tcl), before the parent has Thread, so that interpreter is
        the script's: workers' sends, `milter stop` among them, reach the script's procs and
        globals as under tclsh.
        """
        child, call = self.CHILD, self.tk.call
        call("interp", "create", child)
        tclsh = _tclsh(str(call("info", "tclversion")))
        if tclsh is not None:  # a script's `exec [info nameofexecutable] helper.tcl` runs Tcl, as under tclsh
            self.child_call("proc", "::tcl::info::nameofexecutable", "", ("return", tclsh))
        for name in ("::tclmilter::py::milter", "::tclmilter::py::context", "::tclmilter::py::replacebody",
                     "::tclmilter::py::privstarted", "::tclmilter::py::exit", "::tclmilter::py::poll_next",
                     "::tclmilter::py::serve", "::tclmilter::py::threads", "::tclmilter::py::bgerror",
                     "::tclmilter::py::thread_error", "::tclmilter::py::watched", "::tclmilter::py::interp_made"):
            call("interp", "alias", child, name, "", name)
        call("interp", "alias", child, "exit", "", "exit")
        call("interp", "alias", child, "::tclmilter::py::bg_made", "", "::tclmilter::py::bg_made", child)
        # The first trace: Tcl gives each leave trace the previous one's result as the command's.
        self.child_call("trace", "add", "execution", "::interp", "leave", "::tclmilter::py::bg_made")
        output.install(self._register, call, child)
        threads.install(call, child)
        rootfiles.install(self._register, call, child, self._sourced)
        self.child_call("lappend", "auto_path", libdir)
        self.child_call("package", "require", "TclMilter")
        for name in ("::fileevent", "::tcl::chan::event"):  # (`chan event` is not `fileevent`)
            self.child_call("trace", "add", "execution", name, "enter", "::tclmilter::py::watched")
        self.child_call("trace", "add", "execution", "::interp", "leave", "::tclmilter::py::interp_made")

    def thread_count(self) -> int:
        """Threads of the Thread package in this process, this one included (1 without Thread)."""
        if not _THREAD_HOME or not self.tk.call("info", "commands", "::thread::names"):
            return 1  # (before any script ran a thread:: command, none can have made a thread)
        return len(self.tk.splitlist(self.tk.call("thread::names")))

    def _sourced(self, path: str) -> None:
        if not self.command.main_calls:
            self.sourced[path] = None

    def child_call(self, *words: Any) -> Any:
        """Invoke a command in the script's interpreter (a pure list: no parsing of source text)."""
        return self.tk.call("interp", "eval", self.CHILD, words)

    # ------------------------------------------------------------ Python-backed commands

    def _register(self, name: str, func: Callable[[Sequence[str]], Any]) -> None:
        """A Tcl command answering {ok value} or {error message}: see tclmilter.tcl for why."""

        def command(*args: str) -> Answer:
            try:
                result = func([from_tcl(a) for a in args])
            except SuspendAtMain:
                return ("suspend", "")
            except TclUsageError as usage:  # (one name per type: compiled, a name has one type)
                return ("error", str(usage), usage.code)
            except MilterError as refused:
                return ("error", str(refused), NONE)
            except Exception as exc:  # noqa: BLE001 - report, never crash the interpreter
                log.exception("internal error in %s", name)
                return ("error", f"internal error: {failure_text(exc)}", NONE)
            return ("ok", "" if result is None else deep_to_tcl(result))

        self._create(name, command)

    def _create(self, name: str, func: Callable[..., Any]) -> None:
        self.tk.createcommand(name, func)
        self._commands.append(name)

    def _context(self, args: Sequence[str]) -> Any:
        return context_cmd.dispatch(self._open_context(args), args[1:])

    def _open_context(self, args: Sequence[str]) -> Context:
        ctx = self.contexts.get(integer(args[0])) if args else None
        if ctx is None:
            raise TclUsageError("context no longer exists")
        return ctx

    def _replacebody(self, args: Sequence[str]) -> None:
        """``$context replacebody data``: the data is fetched as the bytes Tcl keeps its text in.

        Handed over as an argument, tkinter would make text of those bytes and the text would
        have to be made bytes again; fetched as the result of a call, they arrive as bytes.
        """
        ctx = self._open_context(args)
        data = self.tk.call(self._outgoing)
        ctx.replacebody(tcl_body_to_wire(data) if isinstance(data, bytes) else from_tcl(str(data)))

    def _bgerror(self, args: Sequence[str]) -> None:
        """An error of an `after` or `fileevent` handler (tclmilter.tcl's bgerror): logged as a
        callback's error is, where Tcl would print it raw on stderr."""
        message, info = (list(args) + ["", ""])[:2]
        if not message and self._handler_stopped:
            message = _NOT_RUN
        elif is_limit_error(message, ()):
            message = self.limit.stopped()
            if self.pycommands.stopped:  # a Python command was running: where it was, too
                info, self.pycommands.stopped = f"{info}\n{self.pycommands.stopped}", ""
        self.bgerrors.log(_HANDLER_ERROR, message, info)

    def _thread_error(self, args: Sequence[str]) -> None:
        """An error in a script that Thread ran with no caller to return it to (an `-async`
        `thread::send`, a thread's own script): tclmilter.tcl's thread_error, Thread's errorproc.
        Thread wrote it on stderr (``Error from thread tid0x...`` and the errorInfo, raw: an MTA's
        text in the message went to the journal as it was, and a failing loop flooded it)."""
        thread, info = (list(args) + ["", ""])[:2]
        what = f"error in thread {escape(thread)} (thread::send -async, or the thread's own script)"
        self.thread_errors.log(what, message_of(info), info)

    def _threads(self, args: Sequence[str]) -> None:
        """The script's first thread:: command: this interpreter becomes the one Thread sends this
        thread's scripts to, unless another holds that place (an error then, never a send that
        reaches the wrong script or freed memory)."""
        threads.started()
        if not _THREAD_HOME:
            _THREAD_HOME.append(self)
        elif _THREAD_HOME[0] is not self:
            generation = _THREAD_HOME[0].milter.generation
            raise TclUsageError(
                "the Thread package cannot be used by this script: Thread sends what threads send to "
                "this thread to the interpreter of the first script in this process that used it "
                f"(generation {generation}) for as long as the process lives; restart pytclmilter to "
                "use threads in this script (with try --compare: try each script alone)")

    @property
    def thread_home(self) -> bool:
        """Thread evaluates what threads send to this thread in this host's script interpreter."""
        return bool(_THREAD_HOME) and _THREAD_HOME[0] is self

    def _priv_started(self, args: Sequence[str]) -> None:
        self.private.started(integer(args[0]))

    def _exit(self, args: Sequence[str]) -> None:
        code = integer(args[0]) if args else 0
        self.on_exit(code)

    def exit_process(self, code: int) -> None:
        """Tcl's exit: stop serving at once (socket file removed), flush, end the process."""
        self.milter.abort()
        self.flush_channels(ending=True)
        tell_counts(ended_only=False)  # (the script's failing `after` loop's count: cli.main's end is not reached)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)

    # ------------------------------------------------------------ contexts and callbacks

    def _context_created(self, ctx: Context) -> None:
        name = f"::tclmilter::ctx{ctx.id}"
        # (No limit needed: making a command runs no trace, and the alias is made from the host.)
        self.tk.call("interp", "alias", self.CHILD, name, self.CHILD, "::tclmilter::context", ctx.id)
        ctx.host_data = name  # the context command: the first argument of every callback
        ctx.script_priv = self.private
        ctx.script = self.pycommands
        self.contexts[ctx.id] = ctx

    def _context_closed(self, ctx: Context) -> None:
        self.contexts.pop(ctx.id, None)
        name, ctx.host_data = ctx.host_data, None
        self._limited(lambda: self._forget_context(ctx.id, name))

    def _forget_context(self, conn_id: int, name: str | None) -> None:
        self.private.forget(conn_id)
        if name:
            self.tk.call("interp", "alias", self.CHILD, name, "")

    def _limited(self, run: Callable[[], object]) -> None:
        """The Tcl a context hook runs (the context command deleted, its private data unset) runs
        the script's traces on them (`trace add command $ctx delete ...`): held to what the
        hook has left, as Tcl that Python code runs is (pycommands). The engine holds the hook to
        -calltimeout with the Python limit, which cannot stop Tcl: a trace that looped froze the
        milter for good, its stop included. Stopped, the hook fails with CallbackTimeout."""
        left = PYTHON_LIMIT.remaining()
        if left is None:  # (no limit: -calltimeout 0)
            run()
            return
        now = time.monotonic()
        self.limit.begin_within(now + left, now)
        try:
            run()
        except tkinter.TclError:
            if not self.limit.exceeded:
                raise
        finally:
            self.limit.done()
        if self.limit.exceeded:
            self.limit.reset()
            raise CallbackTimeout(f"callback stopped after {self.milter.call_timeout:g} s (call_timeout), in "
                                  "the script's Tcl code that the context's making or deleting ran (a trace)")

    def callback(self, script: str, event: str = "") -> Callable[..., Any]:
        """A Python callable that runs a Tcl command prefix with the context and event arguments;
        it replaces the event's previous one, whose aliases are deleted (forget_callback).

        The prefix is reached through an alias in the main interpreter, so each call is a direct
        invocation across interpreters with no script text parsed. The engine holds it to
        -calltimeout with ``self.limit`` (registered as its Callback's limit).
        """
        words = self.words(script)
        self._callbacks += 1
        command = f"::tclmilter::cb{self._callbacks}"
        run = self._new_callback(command, words, event, script)
        self.forget_callback(event)
        self._aliases[event] = [command, f"{command}_8bit"] if event == "body" else [command]
        return run

    def forget_callback(self, event: str) -> None:
        """Delete the aliases of the event's Tcl callback, replaced or unregistered: a script that
        registers per message (`milter register body [list collect $id]`) would otherwise add
        commands to the interpreter for as long as the milter runs."""
        for name in self._aliases.pop(event, ()):
            self.tk.call("interp", "alias", "", name, "")

    def _new_callback(self, command: str, words: tuple[str, ...], event: str, script: str) -> Callable[..., Any]:
        """callback()'s callable, through a new alias ``command`` to the prefix ``words`` (``script``)."""
        self.tk.call("interp", "alias", "", command, self.CHILD, *words)
        alias = self._command_object(command)
        call = self.tk.call
        tcl_error = tkinter.TclError

        def failure(exc: tkinter.TclError) -> CallbackError:
            return self._failure(exc, command, script)

        def run_header(ctx: Context, name: str, value: str) -> Any:
            """run() for the most frequent callback: its two strings converted without a call each."""
            name = name if name.isascii() and "\x00" not in name else to_tcl(name)
            value = value if value.isascii() and "\x00" not in value else to_tcl(value)
            if self.inside:
                return self._checked(command, script, (alias, ctx.host_data, name, value))
            try:
                result = call(alias, ctx.host_data, name, value)
            except tcl_error as exc:
                raise failure(exc) from None
            return tcl_status(result)

        if event == "header":
            return run_header

        if event == "body":
            return self._body_callback(command, words, alias, script)

        def run(ctx: Context, *args: Any) -> Any:
            if self.inside:
                return self._checked(command, script, (alias, ctx.host_data, *[_to_tcl(a) for a in args]))
            try:
                result = call(alias, ctx.host_data, *[_to_tcl(a) for a in args])
            except tcl_error as exc:
                raise failure(exc) from None
            return tcl_status(result)

        return run

    def _checked(self, command: str, script: str, words: tuple[Any, ...]) -> Status | NotAStatus:
        """A callback's call, its code checked: below the main interpreter's top level (``inside``)
        Tcl takes a break or continue for a normal result, which would answer the MTA. Caught, a
        code other than ok and error becomes what Tcl's top level makes of it (`unexpected` in
        _PRELUDE). (At the top level Tcl does this itself, at no cost per call.)"""
        code = int(self.tk.call("catch", words, "::tclmilter::py::result", "::tclmilter::py::options"))
        result = self.tk.call("set", "::tclmilter::py::result")
        if code != 0 and code != 1:
            code, result = self.tk.splitlist(self.tk.call(
                "::tclmilter::py::unexpected", code, result, self.tk.call("set", "::tclmilter::py::options"),
                self.tk.call("format", "%s", words)))
            code = int(code)
        if code == 1:
            raise self._failure(tkinter.TclError(str(result)), command, script)
        return tcl_status(result)

    def words(self, script: str) -> tuple[str, ...]:
        """A command prefix as its words; TclUsageError with Tcl's message if it is no list."""
        try:
            return tuple(self.tk.splitlist(script))
        except tkinter.TclError as exc:
            raise TclUsageError(str(exc)) from None

    def _body_callback(self, command: str, words: Sequence[str], alias: Any, script: str) -> Callable[..., Any]:
        """callback()'s run() for body blocks: ASCII as it is, others as the bytes Tcl keeps their
        text in, through a second alias that runs _BODY_LAMBDA."""
        self.tk.call("interp", "alias", "", f"{command}_8bit", self.CHILD, "apply", _BODY_LAMBDA, tuple(words))
        alias_8bit = self._command_object(f"{command}_8bit")
        call = self.tk.call
        tcl_error = tkinter.TclError

        def run_body(ctx: Context, block: bytes) -> Any:
            text = ascii_text(block)  # one pass over a block the cache no longer holds
            if self.inside:
                words = (alias, ctx.host_data, text) if text is not None else (alias_8bit, ctx.host_data,
                                                                                wire_to_tcl(block))
                return self._checked(command, script, words)
            try:
                if text is not None:
                    result = call(alias, ctx.host_data, text)
                else:
                    result = call(alias_8bit, ctx.host_data, wire_to_tcl(block))
            except tcl_error as exc:
                raise self._failure(exc, command, script) from None
            return tcl_status(result)

        return run_body

    def _command_object(self, name: str) -> Any:
        """``name`` as a Tcl object that has looked its command up (Tcl's cmdName type).

        Given a str, tkinter makes a new Tcl object for every call and Tcl looks the command up
        in its hash table each time; this one is kept and the look-up is cached in it (Tcl
        re-checks it when commands change), about a tenth of a callback call's cost.
        """
        var = "::tclmilter::py::cmdobj"
        try:
            self.tk.call("set", var, name)
            self.tk.eval(f"namespace origin ${var}")  # resolves the object held by the variable
            return self.tk.call("set", var)
        except tkinter.TclError:  # the plain name works as well, only slower
            return name
        finally:
            self.tk.call("unset", "-nocomplain", var)

    def _failure(self, exc: tkinter.TclError, alias: str, script: str) -> CallbackError:
        """The CallbackError of the callback ``script``, called through ``alias``, that raised ``exc``."""
        info = _usage_as_registered(_as_registered(from_tcl(self.error_info()), alias, script), alias, script)
        code = self.tk.call("set", "::errorCode")
        words = code if isinstance(code, tuple) else self.tk.splitlist(str(code))
        if is_limit_error(str(exc), [str(w) for w in words[:3]]):
            stopped = self.limit.stopped()
            self.limit.reset()
            if self.pycommands.stopped:  # a Python command was running: where it was, too
                info = f"{info}\n{self.pycommands.stopped}"
                self.pycommands.stopped = ""
            return CallbackError(f"callback {stopped}", info)
        return CallbackError(_usage_as_registered(from_tcl(str(exc)), alias, script), info)

    def error_info(self) -> str:
        """Tcl's errorInfo as tclsh would show it: ending at the script's file, without the frames
        of how start() and resume() run it (`source` in a coroutine, in the child interpreter). A
        break, continue or other code at the script's top level is made an error only where our
        call returns it, with that call as its one frame: the script's `source` is named instead
        (tclsh names the command and line, which no longer exist by then)."""
        try:
            info = str(self.tk.call("set", "::errorInfo"))
        except tkinter.TclError:
            return ""
        made = info.find(f'\n    while executing\n"interp eval {self.CHILD} ')
        if made >= 0 and self._source_word and info.count("\n", made) == 2:
            return f'{info[:made]}\n    while executing\n"{self._source_word}"'
        ours = max(info.rfind(f'{_CALLED_FROM}"coroutine {self.SCRIPT} '), info.rfind(f'{_CALLED_FROM}"{self.SCRIPT} '))
        if ours < 0:
            return info
        source = info.rfind(f'{_CALLED_FROM}"source ', 0, ours)
        adjacent = source >= 0 and info.find(_CALLED_FROM, source + 1) == ours
        return info[:source if adjacent else ours]

    # ------------------------------------------------------------ event loop, scripts

    def service_events(self) -> None:
        """Run due Tcl timers, file events and thread messages without blocking.

        With a threaded Tcl every poll is a round trip to Tcl's notifier thread (two thread
        switches, and a wait whenever both CPUs are busy), so it is skipped while the script has
        nothing that could produce an event: most filters never have.
        """
        if self.limit.exceeded:  # a handler was stopped: until reset, the interpreter runs nothing
            self.limit.reset()
            self._report_errors()
        if self.tk.call("::tclmilter::py::quiet", self.CHILD, 1 if _THREAD_HOME else 0) in (1, "1"):
            return
        self.limit.begin_handlers()
        try:
            for _ in range(1000):
                if not self.tk.dooneevent(_DONT_WAIT | _ALL_EVENTS):
                    return
                if self.limit.exceeded:  # its error is reported at the next tick, with time to run
                    break
            self.tk.call("::tclmilter::py::poll_next")  # events may be left: look again at the next tick
        finally:
            self.limit.done()
            # A Python command stopped in a handler: Tcl reported it (bgerror), no callback will.
            self.pycommands.stopped = ""

    def _report_errors(self) -> None:
        """Run the idle handlers, Tcl's reports of background errors among them, before any
        timer: a handler that reschedules itself and loops is due again at once, and its report
        (an idle handler) never got a turn, so nothing was ever logged."""
        self._handler_stopped = True
        self.limit.begin_handlers()  # (the script's own `after idle` handlers run here too)
        try:
            for _ in range(100):
                if not self.tk.dooneevent(_DONT_WAIT | _IDLE_EVENTS) or self.limit.exceeded:
                    break
        finally:
            self.limit.done()
            self._handler_stopped = False

    def set_argv(self, script: str, argv: Sequence[str]) -> None:
        self.child_call("set", "argv0", script)
        self.child_call("set", "argv", tuple(to_tcl(a) for a in argv))
        self.child_call("set", "argc", len(argv))
        self.child_call("set", "tcl_interactive", 0)

    def source(self, path: str) -> None:
        """Evaluate a script file in the script's interpreter; TclError carries errorInfo in ``error_info()``."""
        self.child_call("source", path)

    # ------------------------------------------------------------ run's script, suspended in `milter main`

    def start(self, path: str, within: float = 0.0) -> bool:
        """Source a script whose `milter main` suspends it instead of serving (tclmilter.tcl), so that
        the milter serves outside the script's stack and a reload can replace the script without
        running the code after its `milter main`. True: it waits in `milter main` (serve, then
        resume); False: it ended, or it served inside (where Tcl could not suspend it). TclError
        as source(). ``within``: seconds the script may take to get there (0: no limit), held by
        Tcl's `interp limit` whatever the script sets -calltimeout to; past them the TclError
        comes with ``self.limit.exceeded`` set."""
        self.command.suspend_at_main = True
        self._source_word = str(self.tk.call("format", "%s", ("source", path)))  # (a list: as Tcl shows it)
        if within:
            now = time.monotonic()
            self.limit.begin_within(now + within, now)
        yielded = self.child_call("coroutine", self.SCRIPT, "source", path)
        if within:
            self.limit.clear()
        return self._at_main(yielded)

    @property
    def waiting(self) -> bool:
        """The script waits in `milter main` (start)."""
        return bool(self.child_call("::tcl::info::commands", self.SCRIPT))

    def resume(self, result: Answer) -> bool:
        """The milter stopped: `milter main` returns ``result`` (MilterCommand.serve) and the script
        goes on; True if it waits in `milter main` again. TclError as source()."""
        self.limit.clear()  # the code after `milter main` runs without the callbacks' limit
        return self._at_main(self.child_call(self.SCRIPT, result))

    def _at_main(self, yielded: Any) -> bool:
        """Whether the script waits in `milter main`, which yields "main" (tclmilter.tcl). A `yield`
        of the script's own at its top level, where tclsh has no coroutine, is refused as tclsh
        refuses it (TclError); it suspended the script, and the milter served."""
        if not self.waiting:
            return False
        if str(yielded) == "main":
            return True
        self.child_call("rename", self.SCRIPT, "")  # (unwinds the script)
        self.tk.call("set", "::errorInfo", _NO_COROUTINE)  # (what error_info reads)
        raise tkinter.TclError(_NO_COROUTINE)

    def _serve_inside(self, *args: str) -> Answer:
        """`milter main` where Tcl cannot suspend the script: serve in this call, as TclMilter does."""
        if self.loading:
            return ("error", "milter main: called where Tcl cannot suspend the script (from a command "
                             "implemented in C): a reload cannot load it; restart instead", NONE)
        self.served_inside = self.command.main_hook is None
        try:
            return self.command.serve_inside()
        finally:
            self.limit.clear()

    def cancel_script(self, message: str) -> None:
        """Unwind the script's evaluation where it is, through any `catch` (Tcl's `interp cancel
        -unwind`): the ``message`` is the error its evaluation ends with."""
        self.tk.call("interp", "cancel", "-unwind", "--", self.CHILD, message)

    def flush_channels(self, ending: bool) -> None:
        """Write what the script's channels buffer, as Tcl's exit does; ``ending``: the process
        goes, so wait for no reader and no program (``flush_all`` in _PRELUDE), and write the
        lines `puts -nonewline` began and holds (output.py)."""
        self._flush_tcl(ending)
        if ending:  # (every call but close's: the process ends)
            output.write_held()

    def _flush_tcl(self, ending: bool) -> None:
        if ending:
            self.limit.clear()  # (a stopped callback's limit would refuse every command)
        with contextlib.suppress(tkinter.TclError):  # (an interpreter deleted already)
            self.tk.call("::tclmilter::py::flush_all", self.CHILD, 1 if ending else 0)

    def close(self) -> None:
        """Delete the script's interpreter (a script waiting in `milter main` with it: the code
        after it never runs) and the Python commands, whose references to this host would keep
        the interpreter alive; the interpreter itself goes with the last reference to the host.
        The thread_home's interpreter stays, script and all, with the process (_THREAD_HOME)."""
        if not self.thread_home:
            self._flush_tcl(ending=True)  # its channels are closed with it: without waiting
            self.tk.call("interp", "delete", self.CHILD)
        for name in self._commands:
            self.tk.deletecommand(name)
        self._commands.clear()
        self.milter.tcl_commands.clear()
        self.contexts.clear()
