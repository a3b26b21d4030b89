"""The script's `puts` to stdout and stderr, which under systemd are the journal: escaped, and
written a whole line in one write().

Legacy scripts `puts` what the MTA sent (senders, headers) to debug: raw, an SMTP client's ESC
reached a terminal and its LF started a journal line of its own (``ERROR: forged``). So in the
script's interpreter, and in each interpreter it creates, `puts` and `chan puts` are procs that
hand text for stdout or stderr to :func:`logline.as_output` (controls escaped, tabs and
backslashes kept, a newline inside one `puts` indenting the line after it, a line too long for
one write folded). Text for any other channel goes to Tcl's own, renamed, untouched.

Every thread and every --workers process writes on the same descriptors (one journal stream),
and Tcl writes a `puts` in 4096-byte write()s (stderr's newline in one of its own), a buffered
stdout wherever its buffer fills: another writer's line came between, and the tail of a line
began one (``ERROR: forged``). So each line goes out in one write() of at most
logline.OUTPUT_LINE bytes (PIPE_BUF), by :func:`_output` to the descriptor; the pieces of a line
a thread builds by `puts -nonewline` are held until it ends (or the thread, or the process does: a
terminal has no journal, and gets them at once). A whole line of printable ASCII short enough, the usual
debug line, is handed to Tcl's own `puts` in one piece and flushed, without a call into Python.

Python code under ``run`` (a --python hook's print(), a library's sys.stderr.write()) writes the
same way: :func:`python_output` makes sys.stdout and sys.stderr :class:`PythonOutput`, whose text
goes through :func:`_written` as a `puts`'s does, sharing its thread's open line. Raw, a hook's
``print("from", sender)`` put the sender's ESC and CR in the journal, and its LF a line of its
choosing. The program's own lines go to the streams replaced (:func:`unescaped`).

Why not the channels themselves: a transform (`chan push`) or a reflected channel in place of
stdout (`chan create`) sees the buffer Tcl flushes, not `puts` calls, so it cannot tell the
newline one `puts` ends with from one inside its text; and `exec ... 2>@stderr` needs a channel
with a descriptor, which a reflected one has not. Neither would reach Thread's threads either:
Tcl's standard channels are per thread. A thread's interpreters get the same procs, and the
command as a ctypes callback run in that thread, from threads.py's static package.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import select
import sys
import threading
from typing import Any, Callable, Final, Iterator, Sequence, TextIO

from ..logline import OUTPUT_LINE, as_output, clip, escape
from . import threads
from .prelude import kept_own
from .unanswered import Unanswered, place
from .usage import WRONGARGS, TclUsageError, check_count, one_of

log = logging.getLogger(__name__)

#: The command :func:`_output` is in the host's interpreter, aliased into each script interpreter.
COMMAND: Final = "::tclmilter::py::output"
#: In a thread's interpreter: whether its background error's report is due (:func:`_reported`).
REPORTED: Final = "::tclmilter::py::bgreported"
#: The open lines held at most (a thread and a descriptor each): threads that end with a piece
#: held would leave theirs for the process's life. Past it, the oldest is written as it is.
KEPT_OPEN: Final = 256

#: Evaluated in the script's interpreter and in each it creates (prelude.py's bg_made). Its
#: `puts` and prelude.py's `flush_all` call Tcl's own `fconfigure`, not a script's (kept_own).
PRELUDE: Final = r"""
::tcl::namespace::eval ::tclmilter::py {}
rename ::puts ::tclmilter::py::puts
rename ::tcl::chan::puts ::tclmilter::py::chanputs
# Aliases, not procs: an error's errorInfo shows the script's `puts ...` alone, as Tcl's.
interp alias {} ::puts {} ::tclmilter::py::escaped ::tclmilter::py::puts puts
interp alias {} ::tcl::chan::puts {} ::tclmilter::py::escaped ::tclmilter::py::chanputs {chan puts}
# Tcl's puts, its text escaped and written a whole line in one write() when it goes to stdout or
# stderr; its errors as Tcl's own, named as the script called it. The words as Tcl's puts reads
# them: ?-nonewline? ?channelId? string, or the old `puts channelId string nonewline`.
# A background error (`interp bgerror`'s message and options) as Tcl's own handler treats it: a
# code other than error named (`invoked "break" outside of a loop`) above the handler's frame;
# the script's `bgerror` proc called with errorInfo and errorCode set. What is left to its
# caller: {} (nothing), break (drop the errors queued after), {unhandled message errorInfo} (no
# bgerror proc), {failed message errorInfo bgerror's-error its-errorInfo}.
proc ::tclmilter::py::background {message options} {
    set code [expr {[::tcl::dict::get $options -level] ? 2 : [::tcl::dict::get $options -code]}]
    set info [expr {[::tcl::dict::exists $options -errorinfo] ? [::tcl::dict::get $options -errorinfo] : ""}]
    switch -- $code {
        0 { return }
        1 {}
        3 { set message {invoked "break" outside of a loop} }
        4 { set message {invoked "continue" outside of a loop} }
        default { set message "command returned bad code: $code" }
    }
    if {$code != 1} { set info $message$info }
    if {![llength [::tcl::info::commands ::bgerror]]} { return [list unhandled $message $info] }
    set ::errorInfo $info
    set ::errorCode [expr {[::tcl::dict::exists $options -errorcode] ? [::tcl::dict::get $options -errorcode] : "NONE"}]
    set code [catch {uplevel #0 [list ::bgerror $message]} result ropts]
    if {$code == 3} { return break }
    if {$code == 1} { return [list failed $message $info $result [::tcl::dict::get $ropts -errorinfo]] }
}
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
    set whole 0
    if {$channel in {stdout stderr} && $n <= 3} {
        set open [expr {$n == 3 || $n == 2 && [lindex $words 0] eq "-nonewline"}]
        set text [lindex $words $i]
        # A whole line that Tcl writes in one write(): short enough for the line, and for the
        # channel's buffer (which a safe interpreter cannot read), in any -encoding (2 bytes a
        # character at most: unicode) and its newline, with room to spare; and none before it still
        # in the buffer (a non-blocking channel whose reader is stuck: Tcl would keep every line
        # after it, without a bound; here a line through Python is lost, counted, and Tcl's
        # tried first). (open: a line this interpreter began by `puts -nonewline`, Python's.)
        # Only where the channel ends the line with LF, as Python's lines: a -translation cr
        # line ended with a bare CR, which ends no journal line (the next writer's went on in it).
        set bytes [expr {2 * [::tcl::string::length $text] + 4}]
        if {!$open && ![::tcl::info::exists ::tclmilter::py::open($channel)] && $bytes <= @LINE@
                && [regexp {^[\t -~]*$} $text] && ![catch {::tclmilter::py::fconfigure $channel -buffersize} size]
                && $bytes <= $size && [::tclmilter::py::fconfigure $channel -translation] eq "lf"
                && ![::tcl::chan::pending output $channel]} {
            set words [list -nonewline $channel $text\n]
            set whole 1
        } else {
            if {![catch {::tcl::chan::pending output $channel} pending] && $pending} {
                catch {::tcl::chan::flush $channel}
            }
            # Tcl's checks, and errors, for the channel: it writes nothing.
            lset words $i {}
            if {!$open} { set words [linsert $words 0 -nonewline] }
        }
    }
    if {[catch {$command {*}$words} result options]} {
        return -code error -errorcode [::tcl::dict::get $options -errorcode] [::tcl::string::map [list $command $name] $result]
    }
    if {$whole} {
        ::tcl::chan::flush $channel
    } elseif {[::tcl::info::exists text]} {
        lassign [::tclmilter::py::output $channel $text $open] status result code
        if {$status ne "ok"} { return -code error -errorcode $code $result }
        if {$result} { set ::tclmilter::py::open($channel) 1 } else { unset -nocomplain ::tclmilter::py::open($channel) }
    }
    return
}
""".replace("@LINE@", str(OUTPUT_LINE)) + kept_own("fconfigure")


#: In each interpreter of a thread (threads.py), after PRELUDE: no host logs an error of its
#: `after` or `fileevent` handlers, which Tcl's own handler wrote raw on stderr; one that no
#: `bgerror` proc takes is written as Tcl's handler lays it out, through the escaping `puts`
#: (``::puts``: in this namespace, `puts` is Tcl's). A `bgerror` proc of the script's is called
#: as Tcl's handler calls it (errorInfo and errorCode set, its `break` dropping the errors queued
#: after), here, since Tcl's wrote its report of one that fails raw too (``bgerror failed to
#: handle background error``). A safe interpreter's Tcl drops, and still does. A report is
#: written once a minute at its place, its repeats counted, as the script's thread's background
#: errors are logged: an `after` handler failing every millisecond wrote 800 lines a second.
THREAD_BGERROR: Final = r"""
proc ::tclmilter::py::threadbgerror {message options} {
    lassign [::tclmilter::py::background $message $options] what message info result
    switch -- $what {
        break { return -code break }
        unhandled {
            if {[::tclmilter::py::reportdue $what $message $info]} { ::puts stderr $info }
        }
        failed {
            if {[::tclmilter::py::reportdue $what $message $info]} {
                ::puts stderr "bgerror failed to handle background error.\n    Original error: $message\n    Error in bgerror: $result"
            }
        }
    }
}
# Whether to write the report: once a minute at its place, the repeats counted (Python's count,
# told in the log); written, if that cannot be asked.
proc ::tclmilter::py::reportdue {what message info} {
    lassign [::tclmilter::py::bgreported $what $message $info] status due
    expr {$status ne "ok" || $due}
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
        threads.give(threads.SAFE, {COMMAND: _output, REPORTED: _reported}, PRELUDE + THREAD_BGERROR)
        threads.at_end(_thread_ends, write_held_now)


#: The channels whose `puts` is written here, and their descriptors.
_FD: Final = {"stdout": 1, "stderr": 2}
#: (thread, channel) -> the bytes of its open line held, and those written already (a terminal's).
_open: dict[tuple[int, str], tuple[bytes, int]] = {}
#: Re-entrant, as repeats.py's: any allocation under it can start a collection, whose __del__ (a
#: --python file's) may `puts` (milter.tcl) in this thread; a plain Lock waited on itself for
#: ever. A nested `puts` may then reorder or drop a piece held meanwhile, never hang.
_LOCK: Final = threading.RLock()
_full_told = False  # (KEPT_OPEN reached, logged once)
#: channel -> the lines lost on it since the last one written (:func:`_lose`).
_lost: dict[str, int] = {}


def _output(args: Sequence[str]) -> int:
    """{channel text open}: the text of a `puts` to stdout or stderr escaped and written, whole
    lines only, each in one write(), the open line's rest held (1: a line is left open)."""
    # (the script can call it too: with fewer words, or another channel, each call was an
    # internal error, a traceback logged)
    check_count(args, 3, 3, f"{COMMAND} channel text open")
    channel = one_of("channel", args[0], _FD)
    try:
        return int(_written(channel, args[1], args[2] == "0"))
    except OSError as exc:
        reason = os.strerror(exc.errno or 0).lower() if exc.errno else str(exc)
        raise TclUsageError(f'error writing "{channel}": {reason}',
                            ("POSIX", errno.errorcode.get(exc.errno or 0, "EIO"), reason)) from None


def _written(channel: str, text: str, ends: bool) -> bool:
    """``text`` written to ``channel`` as :func:`_output` writes it (``ends``: the line with it):
    whether a line is left open. OSError if the descriptor fails."""
    key = (threading.get_ident(), channel)
    with _LOCK:
        held, done = _open.pop(key, (b"", 0))
    whole, held = as_output(text, ends, held, done)
    lines = [line + b"\n" for line in whole]
    done = done if not whole else 0
    if held and os.isatty(_FD[channel]):  # (no journal there, maybe a prompt: at once, as Tcl's)
        lines.append(held)
        done, held = done + len(held), b""
    for line in lines:
        _write(channel, line)
    if held or done:
        _keep(key, held, done)
        return True
    return False


class PythonOutput(io.TextIOBase):
    """sys.stdout or sys.stderr while ``run`` serves (:func:`python_output`): what Python code
    writes there (a --python hook's print(), a library's sys.stderr.write()) goes out as a
    script's `puts` to that channel does, escaped by :func:`logline.as_output`, each line in one
    write() when its newline comes, a line's start held meanwhile (its thread's, shared with the
    `puts -nonewline` of a script in that thread: the bound, KEPT_OPEN, and the ends at a thread's
    or the process's end, are theirs). A newline inside one write() indents the line after it,
    as inside one `puts`; print() writes its end apart, so its last line is not. flush() writes
    no line's start (on a terminal it is written at once anyway). ``own``: the stream replaced,
    for the program's own lines (:func:`unescaped`)."""

    def __init__(self, channel: str, own: TextIO) -> None:
        super().__init__()
        self.channel, self.own = channel, own
        #: Bytes written here (sys.stdout.buffer.write) go the same way, read as UTF-8 (a byte
        #: that is not, or a character split between two writes, as ``\\xNN``).
        self.buffer = PythonBytes(self)

    @property
    def name(self) -> str:
        return f"<{self.channel}>"

    @property
    def mode(self) -> str:
        return "w"

    @property
    def line_buffering(self) -> bool:  # (each line is written when its newline comes)
        return True

    def reconfigure(self, *, encoding: str | None = None, errors: str | None = None, newline: str | None = None,
                    line_buffering: bool | None = None, write_through: bool | None = None) -> None:
        """TextIOWrapper's, accepted and ignored (a --python file's top level calling it loaded
        before): each line goes out at its newline, escaped, as UTF-8, whatever is asked."""

    def write(self, text: str) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            ends = text.endswith("\n")
            _written(self.channel, text[:-1] if ends else text, ends)
        return len(text)

    def flush(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError, ValueError):  # (the program's own stream: its writes say)
                self.own.flush()

    def fileno(self) -> int:
        return _FD[self.channel]

    def isatty(self) -> bool:
        return os.isatty(_FD[self.channel])

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # (what reaches the descriptor, escaped: as_output's UTF-8)
        return "utf-8"

    @encoding.setter
    def encoding(self, value: str) -> None:
        raise AttributeError("readonly attribute")


class PythonBytes(io.BufferedIOBase):
    """A :class:`PythonOutput`'s ``buffer``: bytes written (sys.stdout.buffer.write(...), a
    TextIOWrapper made on it) go through its text path, escaped as a `puts`."""

    def __init__(self, text: PythonOutput) -> None:
        super().__init__()
        self.text = text

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        chunk = bytes(memoryview(data))  # (TypeError, as a real buffer's, if it holds no bytes)
        self.text.write(chunk.decode("utf-8", "surrogateescape"))
        return len(chunk)

    def flush(self) -> None:
        self.text.flush()

    def fileno(self) -> int:
        return self.text.fileno()

    def isatty(self) -> bool:
        return self.text.isatty()

    def writable(self) -> bool:
        return True


def unescaped(stream: TextIO) -> TextIO:
    """Where pytclmilter's own line for ``stream`` (sys.stdout or sys.stderr) is printed: the
    stream :class:`PythonOutput` replaced, if it is one. Our lines escape what they quote
    already, and some are laid out on purpose (Ctrl-C's answer starts with a newline)."""
    return stream.own if isinstance(stream, PythonOutput) else stream


@contextlib.contextmanager
def python_output() -> Iterator[None]:
    """sys.stdout and sys.stderr as :class:`PythonOutput` meanwhile, where each is the process's
    descriptor (1, 2: under systemd, the journal); else (closed at start, a test's capture) as
    they are. What they buffered is written first; a stream still ours is put back after.
    Logging's handler and faulthandler hold the stream and the descriptor they were given."""
    made: list[PythonOutput] = []
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        try:
            stream.flush()
            if stream.fileno() != fd:
                continue
        except (AttributeError, OSError, ValueError):  # (None, no descriptor, closed)
            continue
        made.append(PythonOutput(name, stream))
        setattr(sys, name, made[-1])
    try:
        yield
    finally:
        for wrapper in made:
            if getattr(sys, wrapper.channel) is wrapper:
                setattr(sys, wrapper.channel, wrapper.own)


#: The background errors that threads' interpreters report on stderr (THREAD_BGERROR).
_REPORTS: Final = Unanswered()


def _reported(args: Sequence[str]) -> int:
    """{what message errorInfo} of a thread's background error no `bgerror` proc took (what:
    unhandled), or that its `bgerror` failed on (failed): 1 to write its report now, else 0,
    counted (its count logged later, unanswered.py). A report whose errorInfo has no frame (a
    `break` of the handler: ``invoked "break" outside of a loop``) is placed by its message
    (clipped, as each place is kept), as its quoted words are no data."""
    if len(args) != 3:  # (a script's call: each was an internal error, its traceback logged)
        raise TclUsageError(f'wrong # args: should be "{REPORTED} what message errorInfo"', WRONGARGS)
    what, message, info = args
    how = "failed in its bgerror proc" if what == "failed" else "reported on stderr"
    label = f"error in a thread's after or fileevent handler, {how}: {escape(clip(message))}"
    where = place(info, message)
    return int(_REPORTS.due(label, message, info, f"{what}\n{where}" if "\n" in where else f"{what}\n{clip(message)}"))


def _keep(key: tuple[int, str], held: bytes, done: int) -> None:
    """Hold ``key``'s open line; past KEPT_OPEN lines, end the one left open longest (a warning,
    once: a thread that then goes on with it starts a line)."""
    global _full_told
    with _LOCK:
        oldest = next(iter(_open)) if len(_open) >= KEPT_OPEN else None
        ended = [(oldest, _open.pop(oldest))] if oldest is not None else []
        _open[key] = (held, done)
    if ended and not _full_told:
        _full_told = True
        log.warning("%d threads hold a line begun by puts -nonewline: the oldest is ended before its end, "
                    "and so on while there are", KEPT_OPEN)
    _end(ended)


def write_held(wait: bool = True) -> None:
    """At the process's end: every line begun by `puts -nonewline` and held, or written on a
    terminal, ended (so that the next line, our own log's or another writer's, starts one of its
    own). ``wait`` False: a descriptor with no room at once (its reader stuck) loses its line.
    The lines a non-blocking descriptor lost since its last written are told now: no line may
    get through again to tell them."""
    with _LOCK:
        held = list(_open.items())
        _open.clear()
    _end(held, wait)
    for channel in list(_lost):
        _lost_told(channel)


def write_held_now() -> None:
    """The process ends at once, from a thread other than the script's, which may be held (a
    stop signal while the script runs, a stop held past its grace, a thread's `exit`): every
    thread's lines held, as :func:`write_held`, waiting for no reader."""
    write_held(wait=False)


def _thread_ends() -> None:
    """A thread of the Thread package ends: its open lines written, ended, as Tcl flushed its
    own channels then (held, they would wait for the process's end, and go on with the text of
    a thread that gets its id)."""
    me = threading.get_ident()
    with _LOCK:
        ended = [(key, _open.pop(key)) for key in list(_open) if key[0] == me]
    _end(ended)


def _end(lines: list[tuple[tuple[int, str], tuple[bytes, int]]], wait: bool = True) -> None:
    """Write each open line's held bytes and a LF; a write that fails loses only its own. Not
    ``wait``ing, a descriptor that does not poll writable loses it, counted (one that does takes
    a line of PIPE_BUF bytes: a pipe has a page free)."""
    lost = 0
    for (_, channel), (data, _) in lines:
        if not wait and not _room(_FD[channel]):
            lost += 1
            continue
        with contextlib.suppress(OSError):
            _write(channel, data + b"\n")
    if lost:
        log.warning("%d lines begun by the script's puts -nonewline are lost as the process ends: their "
                    "descriptor's reader takes no more", lost)


def _write(channel: str, data: bytes) -> None:
    """``data`` on ``channel``'s descriptor in one write() (whole, on a pipe, up to PIPE_BUF);
    OSError if not. A descriptor the script made non-blocking (`fconfigure stdout -blocking
    0`: not to wait for its reader) that takes none of it loses it, counted (:func:`_lose`); only
    the rest of a line begun is waited for, as another writer's must not go on with it."""
    fd = _FD[channel]
    begun = False
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            if not begun:
                _lose(channel)
                return
            select.select([], [fd], [])
        begun = True
    if _lost:
        _lost_told(channel)


def _room(fd: int) -> bool:
    """Whether ``fd`` takes a line now (a closed one: its write says why not)."""
    try:
        return bool(select.select([], [fd], [], 0)[1])
    except (OSError, ValueError):
        return True


def _lose(channel: str) -> None:
    """A line a non-blocking ``channel`` had no room for: counted, a warning at the first."""
    with _LOCK:
        _lost[channel] = _lost.get(channel, 0) + 1
        first = _lost[channel] == 1
    if first:
        log.warning("%s is non-blocking (fconfigure %s -blocking 0) and its reader takes no more: the lines of the "
                    "script's puts to it are lost, and counted, until it does", channel, channel)


def _lost_told(channel: str) -> None:
    """A line got through ``channel`` again: how many did not, logged."""
    with _LOCK:
        lost = _lost.pop(channel, 0)
    if lost:
        log.warning("%d lines of the script's puts to %s were lost: it is non-blocking, and its reader took no "
                    "more", lost, channel)


def _forked() -> None:
    """In a --workers worker: the lines held are the parent's, which writes them."""
    _open.clear()
    _LOCK.release()


os.register_at_fork(before=_LOCK.acquire, after_in_parent=_LOCK.release, after_in_child=_forked)
