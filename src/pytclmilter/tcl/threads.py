"""What every thread of the Thread package that the script creates gets: the escaping `puts` of
output.py (any user) and, while the process is root, the checking `source` and `load` of
rootfiles.py.

A thread's interpreter is made by Thread in another thread, with its own standard channels and
Tcl's own commands, where tkinter's commands cannot be called; and the script's thread may be
waiting for it in C (a synchronous `thread::send`, `thread::join`, a `tpool::post` waiting for a
worker's ``-initcmd``): a command answered by that thread would never be answered. So what a
thread gets is a Tcl static package, ``Tclmilterthread``, whose commands are ctypes callbacks:
Python runs them in the calling thread, taking the GIL, which the script's thread does not hold
while it waits in Tcl. `thread::create` and `tpool::create` are procs (:data:`WRAP`, in every
interpreter of the script's that is not safe, and in each thread's) that begin each thread's
script and each worker's ``-initcmd`` with ``::load {} Tclmilterthread``. Its init evaluates
what output.py and rootfiles.py gave (:func:`give`): a safe interpreter (created in a thread)
gets the escaping `puts` only; as any other user than root, the root checks are left out.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import sys
import threading
from typing import Any, Callable, Final, Sequence

import _tkinter

from ..logline import failure_text
from ..repeats import tell_counts
from .strings import tcl_to_text, wire_to_tcl
from .usage import NONE, Answer, TclUsageError

log = logging.getLogger(__name__)

PACKAGE: Final = "Tclmilterthread"
#: What begins each thread's script: its interpreter gets what was given.
START: Final = f"::load {{}} {PACKAGE}"
#: What :func:`give`'s kinds reach, in the order their scripts run: every interpreter, a safe one
#: too (the escaping `puts`); one that is not safe; one that is not safe, while the process is root.
SAFE: Final = 0
TRUSTED: Final = 1
ROOT: Final = 2
_OK: Final = 0
_EVAL_GLOBAL: Final = 0x20000  # TCL_EVAL_GLOBAL
_p = ctypes.c_void_p
_OBJ_COMMAND: Final = ctypes.CFUNCTYPE(ctypes.c_int, _p, _p, ctypes.c_int, ctypes.POINTER(_p))
_INIT: Final = ctypes.CFUNCTYPE(ctypes.c_int, _p)
_THREAD_EXIT: Final = ctypes.CFUNCTYPE(None, _p)
#: The Tcl functions used, with their (result, arguments) types.
_SIGNATURES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "Tcl_StaticPackage": (None, [_p, ctypes.c_char_p, _INIT, _INIT]),
    "Tcl_CreateObjCommand": (_p, [_p, ctypes.c_char_p, _OBJ_COMMAND, _p, _p]),
    "Tcl_GetStringFromObj": (_p, [_p, ctypes.POINTER(ctypes.c_int)]),
    "Tcl_NewStringObj": (_p, [ctypes.c_char_p, ctypes.c_int]),
    "Tcl_NewByteArrayObj": (_p, [ctypes.c_char_p, ctypes.c_int]),
    "Tcl_NewListObj": (_p, [ctypes.c_int, ctypes.POINTER(_p)]),
    "Tcl_SetObjResult": (None, [_p, _p]),
    "Tcl_EvalEx": (ctypes.c_int, [_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]),
    "Tcl_CreateThreadExitHandler": (None, [_THREAD_EXIT, _p]),
    "Tcl_CreateExitHandler": (None, [_THREAD_EXIT, _p]),
    "Tcl_GetStdChannel": (_p, [ctypes.c_int]),
    "Tcl_RegisterChannel": (None, [_p, _p]),
    "Tcl_SetStdChannel": (None, [_p, ctypes.c_int]),
    "Tcl_GetTopChannel": (_p, [_p]),
}
#: TCL_STDIN, TCL_STDOUT, TCL_STDERR.
_STD_CHANNELS: Final = (1 << 1, 1 << 2, 1 << 3)
STDERR: Final = _STD_CHANNELS[2]
#: kind -> its commands (name, the callback handed to Tcl) and its script.
_GIVEN: dict[int, tuple[list[tuple[bytes, Any]], bytes]] = {}
#: The Tcl library and the init callbacks handed to it: kept for the process's life, as Tcl
#: keeps their addresses.
_KEPT: list[Any] = []
#: What :func:`at_end` asked to run in each thread as it ends, and as a thread ends the process.
_AT_END: list[Callable[[], None]] = []
_AT_EXIT: list[Callable[[], None]] = []
#: The threads whose end runs them (their ids: a new thread may get the id of one that ended).
_WATCHED: set[int] = set()
#: Set once a thread of the script's may call this process's Python (:func:`end_process`).
_started = False


#: In every interpreter of the script's that is not safe, in any thread: the Thread package's
#: `thread::create` and `tpool::create`, once loaded here (now, or later by `load`, into this
#: interpreter or one it names), are procs that begin each thread's script and each worker's
#: -initcmd with $threadstart (see the module docstring).
WRAP: Final = r"""
proc ::tclmilter::py::wrapthreads {} {
    if {[llength [::tcl::info::commands ::thread::create]] && ![llength [::tcl::info::procs ::thread::create]]} {
        rename ::thread::create ::tclmilter::py::thread_create
        proc ::thread::create {args} {
            # As Thread reads them: ?-joinable? ?-preserved? ?--? ?script? (thread::wait if none).
            for {set i 0} {[lindex $args $i] in {-joinable -preserved}} {incr i} {}
            if {[lindex $args $i] eq "--"} { incr i }
            if {$i == [llength $args] && [lindex $args end] ne "--"} { lappend args ::thread::wait }
            if {$i == [llength $args] - 1} {
                lset args $i "$::tclmilter::py::threadstart;[lindex $args $i]"
            }
            ::tclmilter::py::threadcall ::tclmilter::py::thread_create thread::create $args
        }
        ::tclmilter::py::polled ::thread::create
    }
    if {[llength [::tcl::info::commands ::tpool::create]] && ![llength [::tcl::info::procs ::tpool::create]]} {
        rename ::tpool::create ::tclmilter::py::tpool_create
        proc ::tpool::create {args} {
            if {[llength $args] % 2 == 0} {
                set init 0
                foreach i [lsearch -all -exact $args -initcmd] {
                    if {$i % 2 == 0} {
                        set script [lindex $args $i+1]
                        lset args [expr {$i + 1}] "$::tclmilter::py::threadstart;$script"
                        set init 1
                    }
                }
                if {!$init} { lappend args -initcmd $::tclmilter::py::threadstart }
            }
            ::tclmilter::py::threadcall ::tclmilter::py::tpool_create tpool::create $args
        }
        ::tclmilter::py::polled ::tpool::create ::tpool::post
    }
    # (an interpreter of the script's thread: tclmilter.tcl's traces of the first thread:: command)
    if {[llength [::tcl::info::procs ::tclmilter::watch_threads]]} { ::tclmilter::watch_threads }
}
# In an interpreter of the script's thread: its commands that start threads make the host look
# for what a short-lived thread sent (prelude.py's `quiet`).
proc ::tclmilter::py::polled {args} {
    if {[llength [::tcl::info::commands ::tclmilter::py::poll_next]]} {
        foreach name $args { trace add execution $name enter ::tclmilter::py::poll_next }
    }
}
# Tcl's command under the proc's name, as in its usage errors.
proc ::tclmilter::py::threadcall {command name arguments} {
    if {[catch {$command {*}$arguments} result options]} {
        return -code error -errorcode [::tcl::dict::get $options -errorcode] [::tcl::string::map [list $command $name] $result]
    }
    return $result
}
# Tcl's `load` (rootfiles.py's proc renames it as root: the trace goes with it), as Tcl's `load`
# reads its words: ?-global? ?-lazy? ?--? fileName ?prefix? ?interp?.
proc ::tclmilter::py::loaded {command code result op} {
    if {$code == 0} {
        ::tclmilter::py::wrapthreads
        set words [lrange $command 1 end]
        for {set i 0} {[::tcl::string::match -* [lindex $words $i]]} {incr i} {
            if {[lindex $words $i] eq "--"} { incr i; break }
        }
        if {[llength $words] > $i + 2} {
            catch {interp eval [lindex $words $i+2] ::tclmilter::py::wrapthreads}
        }
    }
    return $result
}
trace add execution ::load leave ::tclmilter::py::loaded
::tclmilter::py::wrapthreads
"""

#: In a thread's interpreter, after WRAP: an interpreter created in it gets the package too (a
#: safe one its safe part, and this trace through an alias: it has no `load`, and those it
#: creates need the package as much).
_CREATED: Final = r"""
proc ::tclmilter::py::threadmade {parent command code result op} {
    if {$code == 0 && [::tcl::string::match "cr*" [lindex $command 1]]} {
        set path [list {*}$parent {*}$result]
        ::load {} Tclmilterthread $path
        if {[interp issafe $path]} {
            interp alias $path ::tclmilter::py::threadmade {} ::tclmilter::py::threadmade $path
            interp eval $path {trace add execution ::interp leave ::tclmilter::py::threadmade}
        }
    }
    return $result
}
trace add execution ::interp leave {::tclmilter::py::threadmade {}}
"""


def install(call: Callable[..., Any], child: str) -> None:
    """`thread::create` and `tpool::create` as procs in the script's interpreter ``child``
    (``call``: the host's interpreter; prelude.py's bg_made gives the prelude to those the script
    creates), and the package's TRUSTED part, for any user."""
    try:
        give(TRUSTED, {}, f"set ::tclmilter::py::threadstart {{{START}}}\n{WRAP}{_CREATED}")
        start = START
    except (OSError, AttributeError) as exc:
        reason = str(exc).translate({ord(c): " " for c in "{}[]$\\\""})
        # (`file owned /`: euid 0)
        start = (f'if {{[file owned /]}} {{error "refusing to start a thread as root: what it sources and loads '
                 f'could not be checked ({reason}); start threads after milter main has dropped privileges '
                 f'(--user)"}}')
    prelude = f"set ::tclmilter::py::threadstart {{{start}}}\n{WRAP}"
    call("set", "::tclmilter::py::threadsprelude", prelude)
    call("interp", "eval", child, prelude)


def give(kind: int, commands: dict[str, Callable[[Sequence[str]], Any]], script: str) -> None:
    """Make ``load {} Tclmilterthread`` give an interpreter, of any thread, these commands (each
    answers as TclHost's: {ok value} or {error message errorCode}) and then evaluate ``script``
    in it, where ``kind`` reaches it; once a process for each kind (every host's are the same).
    OSError or AttributeError where this Tcl cannot be reached."""
    tcl = library()
    if kind not in _GIVEN:
        _GIVEN[kind] = ([(name.encode(), _OBJ_COMMAND(_command(tcl, name, func))) for name, func in commands.items()],
                        script.encode())


def at_end(thread: Callable[[], None], process: Callable[[], None]) -> None:
    """Run ``thread`` in each thread that loaded the package, as it ends (Tcl_FinalizeThread, as
    Tcl flushes the thread's own channels), and ``process`` as such a thread ends the process
    (Tcl's own `exit` there: Tcl_Exit, which flushes no other thread's channels); once a process.
    OSError or AttributeError where this Tcl cannot be reached."""
    if thread not in _AT_END:
        at_process_exit(process)
        _AT_END.append(thread)


def at_process_exit(process: Callable[[], None]) -> None:
    """Run ``process`` as a thread's `exit` ends the process (at_end), once however often given:
    run's removal of its pid file, which the script's own `exit` does. OSError or AttributeError
    where this Tcl cannot be reached."""
    if not _AT_EXIT:
        library().Tcl_CreateExitHandler(_EXITS, None)
    if process not in _AT_EXIT:
        _AT_EXIT.append(process)


def _thread_ends(_data: int) -> None:
    """A thread's exit handler: never raises (ctypes would print the exception)."""
    _WATCHED.discard(threading.get_ident())
    _run(_AT_END, "as a thread ended")


def _process_exits(_data: int) -> None:
    """Tcl's exit handler (a thread's `exit`): never raises. Tcl then calls C's exit(), which
    skips Python's finalization: the log lines still pending (logs.py holds a loop iteration's
    until its end) and the standard streams' buffers are written here, as the script's own
    `exit` writes them (TclHost.exit_process), after the failures counted and not told yet
    (repeats.tell_counts: a failing `after` loop's count was lost)."""
    _run([*_AT_EXIT, _logs_written], "as a thread ended the process")


#: Seconds a thread's `exit` waits for a log handler another thread is writing with (a stuck
#: terminal would hold it for ever): past them the handler's pending lines are lost.
_LOG_WAIT: Final = 2.0


def _logs_written() -> None:
    """What logging.shutdown() writes: every handler's pending lines (a handler's close() waits a
    while for a stuck reader, logs.py); the standard streams flushed. First the failures counted
    and not told yet (repeats.tell_counts), while every handler is held here: told with a handler
    another thread holds past _LOG_WAIT, they waited for it for ever (the process never ended),
    so then they are not told, as that handler's pending lines are lost."""
    handlers = logging.getLogger().handlers
    held = [handler for handler in handlers if handler.lock is None or handler.lock.acquire(timeout=_LOG_WAIT)]
    try:
        if len(held) == len(handlers):
            tell_counts(ended_only=False)
        for handler in held:
            handler.flush()
            handler.close()
    finally:
        for handler in held:
            if handler.lock is not None:
                handler.lock.release()
    _streams_flushed()


def _run(funcs: list[Callable[[], None]], when: str) -> None:
    for func in funcs:
        try:
            func()
        except Exception:  # noqa: BLE001 - report, never crash the thread
            log.exception("internal error %s", when)


def started() -> None:
    """The script ran a thread:: command (interp.py): threads may call this process's Python from
    now on, as they `puts` and as they end, until the process ends (:func:`end_process`)."""
    global _started
    _started = True


def end_process(code: int) -> None:
    """Once a thread of the script's may call this process's Python, end the process with
    ``code`` here, without Python's finalization: a thread that calls in while Python finalizes
    (a `puts`, its end) makes ctypes take the GIL of an interpreter being freed, and the process
    died of SIGSEGV, SIGBUS or SIGILL (14 `check` runs in 15, 150 threads ending 3 ms apart).
    What finalization does that a user sees is done first: Python's threads waited for, atexit's
    functions (logging's last lines), the standard streams flushed. Else it returns.

    Why Python's private ``threading._shutdown`` and ``atexit._run_exitfuncs``: they are what
    finalization runs for those; ``atexit`` has no public way to run its functions, and joining
    the non-daemon threads of ``threading.enumerate()`` would miss those they start meanwhile.
    Why not finalize and have the callbacks decline instead: ctypes' thunk takes the GIL before
    any Python runs (``sys.is_finalizing()`` is read too late), so the check would have to be C
    of ours in front of each callback, and _tclbytes.c is optional (where it is not built this
    would still be needed); a flag checked and then the GIL taken races with finalization unless
    finalization waits for the callbacks inside, and one held there (a write to a stuck reader)
    would hold the exit, or be ended by Python 3.11's pthread_exit of a thread taking a
    finalizing GIL, in the middle of Tcl and its locks. The tests that end with threads passed
    20 loops in 20 with both CPUs busy (``yes``)."""
    if not _started:
        return
    shutdown = getattr(threading, "_shutdown", None)  # (as finalization: non-daemon threads joined)
    if callable(shutdown):
        shutdown()
    atexit._run_exitfuncs()
    _streams_flushed()
    os._exit(code)


def _streams_flushed() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # (closed, or None)
            stream.flush()


#: The exit handlers handed to Tcl: kept for the process's life, as Tcl keeps its address.
_ENDS: Final = _THREAD_EXIT(_thread_ends)
_EXITS: Final = _THREAD_EXIT(_process_exits)


def library() -> Any:
    """libtcl's functions (as tkinter calls them), the static package registered at the first call.
    OSError or AttributeError where this Tcl cannot be reached."""
    if _KEPT:
        return _KEPT[0]
    tcl = ctypes.CDLL(_tkinter.__file__)
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(tcl, name)
        function.restype, function.argtypes = result, arguments
    init = _INIT(lambda interp: _init(tcl, interp, ROOT))
    safe_init = _INIT(lambda interp: _init(tcl, interp, SAFE))
    _KEPT.extend([tcl, init, safe_init])
    tcl.Tcl_StaticPackage(None, PACKAGE.encode(), init, safe_init)
    return tcl


def _init(tcl: Any, interp: int, upto: int) -> int:
    """The package's init: what was given for kinds up to ``upto``, ROOT's only while root."""
    if upto == ROOT and os.geteuid() != 0:
        upto = TRUSTED
    if threading.get_ident() != threading.main_thread().ident:
        started()  # (a thread the script made some other way than by a thread:: command traced)
    if threading.get_ident() not in _WATCHED:  # (a thread's first interpreter)
        _watch(tcl)
    for kind in sorted(_GIVEN):
        if kind > upto:
            break
        made, text = _GIVEN[kind]
        for name, command in made:
            tcl.Tcl_CreateObjCommand(interp, name, command, None, None)
        code = int(tcl.Tcl_EvalEx(interp, text, len(text), _EVAL_GLOBAL))
        if code != _OK:
            return code
    return _OK


def _watch(tcl: Any) -> None:
    """This thread's end runs at_end's functions; and its standard channels get a reference of
    the package's, so that a script's `close stdout` (stdin, stderr) there closes the channel in
    that interpreter only, as in the script's thread, where the host's holds one. Tcl closed the
    descriptor itself, the process's: the next channel opened got descriptor 1, was named
    ``file1`` as the script's thread's stdout is, and Tcl aborted the process (``Tcl_RegisterChannel:
    duplicate channel names``). The thread's end closes them, leaving 0 to 2 open as ever."""
    _WATCHED.add(threading.get_ident())
    tcl.Tcl_CreateThreadExitHandler(_ENDS, None)
    for kind in _STD_CHANNELS:
        channel = tcl.Tcl_GetStdChannel(kind)
        if channel:  # (none where the descriptor was closed when the thread began)
            tcl.Tcl_RegisterChannel(None, channel)


def _command(tcl: Any, name: str, func: Callable[[Sequence[str]], Any]) -> Callable[..., int]:
    """A Tcl command's C function calling ``func`` with its arguments; never raises (ctypes would
    print the exception and return TCL_OK)."""

    def command(_data: int, interp: int, objc: int, objv: Any) -> int:
        try:
            args = [_text(tcl, objv[i]) for i in range(1, objc)]
            answer: Answer = ("ok", func(args))
        except TclUsageError as usage:
            answer = ("error", str(usage), usage.code)
        except Exception as exc:  # noqa: BLE001 - report, never crash the thread
            log.exception("internal error in %s", name)
            answer = ("error", f"internal error: {failure_text(exc)}", NONE)
        tcl.Tcl_SetObjResult(interp, _obj(tcl, answer))
        return _OK

    return command


def _text(tcl: Any, obj: int) -> str:
    size = ctypes.c_int()
    data = ctypes.string_at(tcl.Tcl_GetStringFromObj(obj, ctypes.byref(size)), size.value)
    return tcl_to_text(data)  # (a lone surrogate one character, as the script's thread has it)


def _obj(tcl: Any, value: Any) -> int:
    """A new Tcl object of a result: bytes a byte array, a tuple a list, None "", else text."""
    if isinstance(value, tuple):
        items = (_p * len(value))(*(_obj(tcl, item) for item in value))
        return int(tcl.Tcl_NewListObj(len(value), items))
    if isinstance(value, bytes):
        return int(tcl.Tcl_NewByteArrayObj(value, len(value)))
    data = wire_to_tcl(str("" if value is None else value).encode("utf-8", "surrogateescape"))
    return int(tcl.Tcl_NewStringObj(data, len(data)))
