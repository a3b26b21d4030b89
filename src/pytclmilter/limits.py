"""Time limits for callbacks: the engine's one interface to them, and the one for Python.

The engine calls every callback (calling.Caller._call) between ``begin`` and ``stop``
of its callback's :class:`Limit`: :data:`PYTHON_LIMIT` for Python callbacks, Tcl's
``interp limit`` (tcl/limit.py) for Tcl ones. The engine reads the clock once before the
call and hands that time to ``begin``, so a limit does not read it again.

A plain Python function cannot be stopped from outside, so a watchdog thread checks a
few times a second whether the callback running on the main thread has
overrun, and if so sends the main thread ``SIGALRM``, whose handler raises
inside the callback. Starting a callback costs a few attribute writes; this
works on the main thread only (where Python runs signal handlers). Async
callbacks are limited with ``asyncio.wait_for`` in the engine instead.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import TracebackType
from typing import Final

from .rootimports import UnsafeModule


_monotonic: Final = time.monotonic  # compiled, a module attribute is a look-up per use
_get_ident: Final = threading.get_ident

#: The limit of what must have one though -calltimeout is 0 (a load: commands/reloading.py), so
#: that Tcl's limit beats all the same: no limit, and told as none, not as 1e+09 s.
UNLIMITED: Final = 1e9


class CallbackTimeout(BaseException):
    """A callback ran longer than the milter's ``call_timeout``.

    A BaseException, like KeyboardInterrupt, so that a callback's own ``except Exception``
    cannot swallow it and keep the milter stuck.
    """


class Limit:
    """How one kind of callback is held to its time limit (this base: not at all)."""

    def begin(self, seconds: float, now: float) -> bool:
        """A callback starts at ``now`` (``time.monotonic()``, read by the engine, which also
        times the callback) and may run ``seconds`` (0: no limit). True if this limit holds it:
        then :meth:`stop` must be called when it returns or raises."""
        return False

    def stop(self) -> bool:
        """The callback is back: True if it ran past its limit, as far as this limit can tell."""
        return False


class PythonLimit(Limit):
    def __init__(self) -> None:
        self._started = 0.0
        self._seconds = 0.0
        self._active = False
        self._late = False  # the watchdog saw the callback running now overrun
        self._why = ""  # a stop's grace ended the allowance before call_timeout: which (hold_to)
        self._held_by = ""  # the grace that limits the callback now, if one does (hold_to)
        self._raised = False  # the callback held now was stopped by the exception (ran_out)
        self._watchdog: threading.Thread | None = None
        self._ended = threading.Event()  # set: the watchdog thread returns (end_watchdog)
        self._main = threading.main_thread().ident
        # A forked worker has no watchdog thread (threads do not survive fork): start a new one.
        os.register_at_fork(after_in_child=self._forget_watchdog)

    def _forget_watchdog(self) -> None:
        self._watchdog = None
        self._main = threading.main_thread().ident

    def begin(self, seconds: float, now: float) -> bool:
        """False when the callback cannot be limited here: no limit, or not the main thread."""
        if not seconds or _get_ident() != self._main:
            return False
        self._seconds, self._started, self._active, self._late, self._why = seconds, now, True, False, ""
        self._held_by = ""
        self._raised = False
        if self._watchdog is None:  # (after: its first wait is as long as this limit makes it)
            self._start()
        return True

    def hold_to(self, by: float, why: str) -> None:
        """The grace ``why`` names ends at ``by`` (monotonic): the callback running now stops then
        if its own limit comes later. From a stop signal's handler, which Python runs inside the
        callback (server.py): one that started before the signal has no other way to learn of it."""
        if self._active and by < self._started + self._seconds:
            # (held already, its limit is that grace's, not call_timeout: a stop during a load)
            limit = f"its limit was {self._held_by}" if self._held_by else _allowance(self._seconds)
            self._why, self._held_by = f"{why} was over ({limit})", why
            self._seconds = max(by - self._started, 0.0)

    def stop(self) -> bool:
        """True if the watchdog saw the callback overrun (it looks every 0.1 s at most). One that
        returns anyway was in C code, which runs the signal handler only when it is done."""
        self._active = False
        self._raised = False
        return self._late

    @property
    def ran_out(self) -> bool:
        """The callback running now was stopped: its CallbackTimeout was raised, wherever that
        was (a Python command's runner as it was entered: tcl/pycommands.py), and it is not back."""
        return self._raised

    def remaining(self) -> float | None:
        """Seconds the callback running now may still run; None when none is held here (code
        that runs inside it, such as a Python command its Tcl calls, is held by the same limit)."""
        if not self._active:
            return None
        return self._started + self._seconds - _monotonic()

    def end_watchdog(self) -> None:
        """No watchdog thread until the next :meth:`begin`: a --workers supervisor runs no
        callback, and forks its workers from a process with no thread of its own (workers.py)."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            self._ended.set()
            watchdog.join()

    def _start(self) -> None:
        signal.signal(signal.SIGALRM, self._expired)
        main = threading.main_thread().ident
        self._ended = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, args=(main, self._ended), name="callback-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def _overrun(self) -> bool:
        return self._active and _monotonic() - self._started > self._seconds

    def _watch(self, main: int, ended: threading.Event) -> None:
        while not ended.wait(min(0.1, max(self._seconds / 4, 0.01))):
            if self._overrun():
                self._late = True
                signal.pthread_kill(main, signal.SIGALRM)

    def _expired(self, signum: int, frame: object) -> None:
        if self._overrun():
            self._active, self._raised = False, True
            if self._why:
                raise CallbackTimeout(f"callback stopped after {_monotonic() - self._started:.1f} s: {self._why}")
            raise CallbackTimeout(f"callback stopped after {self._seconds:g} s (call_timeout)")


def _allowance(seconds: float) -> str:
    """What call_timeout allowed a callback a stop's grace cut short (UNLIMITED: nothing)."""
    return "no call_timeout" if seconds >= UNLIMITED else f"call_timeout is {seconds:g} s"


def internals_dropped(exc: BaseException, tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without its last entries when they are pytclmilter's code raising ``exc`` for the
    code above: the watchdog's signal handler (that entry is where the code was when its time
    ran out), the root import check's loader (the entry is the ``import`` refused). A trace that
    ended in them sent a Python author looking at pytclmilter."""
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    kept_entries = len(entries)
    while kept_entries > 1 and _raises_for_its_caller(exc, entries[kept_entries - 1]):
        kept_entries -= 1
    if kept_entries == len(entries):
        return entries[0] if entries else None
    kept = None
    for entry in reversed(entries[:kept_entries]):
        kept = TracebackType(kept, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return kept


def _raises_for_its_caller(exc: BaseException, entry: TracebackType) -> bool:
    """Compiled, the entry is mypyc's, named by the source path at build time."""
    code = entry.tb_frame.f_code
    if isinstance(exc, CallbackTimeout):
        return code.co_name == "_expired" and os.path.basename(code.co_filename) == "limits.py"
    return isinstance(exc, UnsafeModule) and os.path.basename(code.co_filename) == "rootimports.py"


#: The limit of every Python callback (one watchdog for the process).
PYTHON_LIMIT: Final = PythonLimit()
