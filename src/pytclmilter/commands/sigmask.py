"""Which thread of ``run`` takes SIGUSR1 and SIGCHLD, and what the script's children inherit.

``run`` blocks both before any thread exists (:func:`block_for_the_waiters`): a signal goes to a
thread that does not block it, and a reload or a worker's death taken by a thread with nothing to
do with it (Tcl's notifier, the metrics server, a Thread-package thread) would be lost. But what
the script execs inherits the signal mask of the thread that forks it, and a shell's ``wait``
(``exec sh -c {scan & wait}``) with SIGCHLD blocked waits for ever, and the milter with it. So the
thread that runs the script's code unblocks SIGCHLD while it does (:func:`children_reapable`):
loading, serving alone, after `milter main`. Only the --workers supervisor keeps it blocked in
that thread, taking it with sigtimedwait (workers.py), and its workers unblock it again.

Ctrl-C too: Python's SIGINT handler runs only once Tcl returns, so a script that loops while it
loads (or after `milter main`) could not be interrupted at all. While the script's own code runs
at the top level, SIGINT ends the process, as under tclsh (:func:`interruptible`). ``run`` is a
daemon: there a stop signal (SIGTERM, SIGINT, SIGHUP) while the script's own code runs ends the
process with status 0 and a log line saying what it came during (:func:`stops_meanwhile`), where
the default action had ended it without a word in the log.

And the file size limit: Python ignores SIGXFSZ from its start (a write past RLIMIT_FSIZE then
fails with EFBIG instead of killing the process), and an ignored signal stays ignored across
exec, where Tcl's exec resets only the signals a handler catches. A program the script execs
under a file size limit (`ulimit -f`) went on with EFBIG where under tclsh it is killed, as its
caller expects. :func:`file_size_signal_caught` catches it instead: the milter's own writes still
fail with EFBIG, and what it execs starts with the default action.

And SIGUSR2: the --workers supervisor's word to a worker a reload replaced (workers.py, server.py).
Sent to ``run`` serving alone or to the supervisor (``systemctl kill -s USR2``) its default action
ended the process, status 140, without a line (its workers then logged that the supervisor
died). :func:`unused_signal_ignored` catches it there, with one warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType
from typing import Callable, Iterator

from ..logline import escape
from ..repeats import Repeated, tell_counts
from ..signalroles import REPLACED, STOP_SIGNALS
from ..signalpipe import SignalPipe
from ..tcl.output import write_held_now

log = logging.getLogger("pytclmilter")

#: Taken by whoever waits for them: the server (SIGUSR1), the --workers supervisor (both).
WAITED = (signal.SIGUSR1, signal.SIGCHLD)


def block_for_the_waiters() -> None:
    """Block :data:`WAITED` in this thread and every thread it will start."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)


@contextlib.contextmanager
def children_reapable() -> Iterator[None]:
    """SIGCHLD unblocked in this thread meanwhile, then the mask it had (a reload while serving
    alone runs inside, where it is already unblocked). A SIGCHLD for a --workers worker that comes
    meanwhile is taken here and ignored; the supervisor reaps with waitpid whatever it was woken
    for (workers.py), so the worker is reaped all the same."""
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGCHLD,))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C (SIGINT) ends the process meanwhile, as tclsh's does, then the handler it had.
    Serving installs its own (a graceful stop) for as long as it serves."""
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def stops_meanwhile(doing: str | Callable[[], str], before_exit: Callable[[], None],
                    status: Callable[[], int] = lambda: 0) -> Iterator[None]:
    """A stop signal meanwhile logs ``stopped by SIGTERM while DOING``, calls ``before_exit`` and
    ends the process with ``status()``: 0 (a stop, docs/cli.md), unless a stop before this one
    failed (after `milter main`: a --workers stop that was not clean). Python runs its signal
    handlers only between bytecodes, never while Tcl evaluates (an `after 5000`, a loop), and the
    main thread cannot be unwound out of Tcl: so Python's C-level handler writes the signal's
    number to a pipe (its wakeup fd, signalpipe.py), and the pipe's thread does the stop."""

    def take(numbers: bytes) -> None:
        for number in numbers:
            if number in stops:
                log.warning("stopped by %s while %s", signal.Signals(number).name,
                            escape(doing if isinstance(doing, str) else doing()))
                write_held_now()  # (the lines the script began: Tcl's exit would flush them)
                before_exit()
                code = status()
                tell_counts(ended_only=False)  # (failures counted, not told yet: a stop while serving tells them)
                logging.shutdown()  # (os._exit below flushes nothing)
                os._exit(code)

    stops = {int(sig) for sig in STOP_SIGNALS}
    pipe = SignalPipe(take, "stop-while-loading")
    pipe.start()
    previous = {sig: signal.signal(sig, _taken_by_the_watcher) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        # The handlers first: a signal that finds ours still in place writes to our pipe, before
        # the end's byte, so the pipe's thread sees it.
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        pipe.close()


class StopsBetween:
    """The stop signals' handler between the stretches that have their own: the loads and the
    code after `milter main` (:func:`stops_meanwhile`), and serving (server.py, workers.py).
    In between (the socket being bound, the loop made or closed) the default action ended the
    process without a word: exit status 143, no log line, the socket file or the pid file left
    behind. Here a stop signal is the stop it asks for: ``stopping`` (the log line, systemd's
    STOPPING=1), then the milter stops, or does not start serving, as soon as it can."""

    def __init__(self, stopping: Callable[[signal.Signals], None]) -> None:
        self._stopping = stopping
        self._stop: Callable[[], None] | None = None
        self._asked = False

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._taken)

    def serves(self, stop: Callable[[], None]) -> None:
        """What stops the milter, once loaded (Milter.stop: before serving, it serves nothing)."""
        self._stop = stop
        if self._asked:
            stop()

    def _taken(self, signum: int, frame: FrameType | None) -> None:
        self._stopping(signal.Signals(signum))
        if self._stop is None:
            self._asked = True
        else:
            self._stop()


def _taken_by_the_watcher(signum: int, frame: FrameType | None) -> None:
    """Nothing: the stop is :func:`stops_meanwhile`'s pipe's (Python would run this only once Tcl returns)."""


def file_size_signal_caught() -> None:
    """SIGXFSZ caught and ignored by a handler rather than by its disposition (module docstring).
    Only the main thread can set a handler: elsewhere (an application's thread) it is left alone."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, _past_the_file_size_limit)


def _past_the_file_size_limit(signum: int, frame: FrameType | None) -> None:
    """Nothing: the write that went past the limit fails with EFBIG, and its caller reports that."""


_UNUSED_LINE = ("received SIGUSR2, which means nothing to this process (pytclmilter sends it only to a --workers "
                "worker a reload replaced); ignored")


def _unused_told(_repeated: Repeated, label: str, count: int) -> None:
    """The count of the SIGUSR2 not logged after ``label``, the line of the first."""
    log.warning("%s (%d more within the minute)", label, count)


#: The SIGUSR2 after the first: counted, told once a minute at most (a `kill -USR2` in a loop).
_UNUSED = Repeated(60.0, tell=_unused_told)


def unused_signal_ignored() -> None:
    """SIGUSR2 caught and ignored with a warning (module docstring), by a handler rather than by
    SIG_IGN: a worker forked later inherits the disposition, and an ignored signal is discarded,
    though blocked, where its supervisor's SIGUSR2 must wait for its server's handler (768bbf9);
    what the script execs starts with the default action. The handler never runs in a worker:
    SIGUSR2 is blocked there until its server's own handler replaces this one (server.py).
    Unblocked then: one held since the start (earlyreload.py) is taken now, with its line."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(REPLACED, _unused)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (REPLACED,))


def _unused(signum: int, frame: FrameType | None) -> None:
    """The warning, the first of a minute whole, the others counted (:data:`_UNUSED`)."""
    missed = _UNUSED.due(_UNUSED_LINE, _UNUSED_LINE)
    if missed:
        _unused_told(_UNUSED, _UNUSED_LINE, missed)
    if missed is not None:
        log.warning("%s", _UNUSED_LINE)
