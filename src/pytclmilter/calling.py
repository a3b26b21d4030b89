"""Calling one callback: its time limit, its awaitable, the grace a stopped one gets to end, and
the line and answer of one that fails.

``Caller`` is the engine's base (engine.ConnectionEngine): the one place callbacks are called
(:meth:`Caller._call`), knowing nothing of the connection: where a callback is abandoned
(``_abandoned``, :meth:`Caller._settle`), the engine closes it. Compiled with the hot path (setup.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Awaitable, Final

from .callbacks import Callback, CallbackError
from .limits import CallbackTimeout, internals_dropped
from .logline import SHOWN, clip, escape, escape_lines, failure_text, said
from .meter import Meter
from .repeats import place_of
from .shared import FOREVER, Shared
from .status import Status, parse_status

log: Final = logging.getLogger("pytclmilter")

_monotonic: Final = time.monotonic  # compiled, `time.monotonic` is two look-ups per call
#: Result types that are certainly not awaitable (skips inspect.isawaitable on the hot path).
_PLAIN: Final = frozenset({type(None), str, int, Status})
#: A callback stopped by its limit comes back within 0.1 s of it (the Python watchdog's interval;
#: Tcl's deadline and asyncio's are exact). One that fails later than this past its limit was in
#: code the limit cannot interrupt, and its real time is logged too.
_LATE_STOP: Final = 0.5
#: Seconds an async callback cancelled by its limit (or by its connection's end) may take to end
#: (its ``finally`` clauses) before it is abandoned: one that swallows CancelledError would
#: otherwise hold its connection, or the milter's stop, as long as it likes.
UNWIND: Final = 1.0
#: Abandoned callbacks still running (one that ignored GeneratorExit too): held here so that they
#: are counted, and dropped as each ends. Each keeps its memory until then.
ABANDONED: Final[set["asyncio.Task[Any]"]] = set()


class _Exited(Exception):
    """SystemExit or KeyboardInterrupt raised in an async callback, carried as an Exception: asyncio
    re-raises those two out of the event loop from the task they end, which would end the milter
    for one callback's ``sys.exit()`` (or a library's)."""

    def __init__(self, original: SystemExit | KeyboardInterrupt) -> None:
        super().__init__(str(original))
        self.original = original


def abandon(task: "asyncio.Task[Any]", awaitable: Awaitable[Any]) -> None:
    """Let go of a cancelled callback that goes on: the coroutine it returned is closed
    (GeneratorExit at its await: its ``finally`` clauses run, and an ``except CancelledError``
    does not catch it), and the task cancelled once more, which ends on a closed one. One that
    survives even that is kept in ABANDONED, counted, until it ends. (The callback's coroutine,
    not the task's: that one is compiled by mypyc, and a Task stepping a compiled coroutine
    closed under it crashed the process.)"""
    close = getattr(awaitable, "close", None)
    survives = close is None
    if close is not None:
        try:
            close()
        except RuntimeError:  # "coroutine ignored GeneratorExit": it awaits on
            survives = True
    task.cancel()
    if survives:
        ABANDONED.add(task)
    task.add_done_callback(_forget)


def _forget(task: "asyncio.Task[Any]") -> None:
    ABANDONED.discard(task)
    _consume(task)


def _consume(task: "asyncio.Task[Any]") -> None:
    """Read a finished callback task's outcome, which nobody answers with any more (asyncio would
    log an exception never retrieved)."""
    if not task.cancelled():
        task.exception()


async def _contained(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _Exited(exc) from None


class Caller:
    """Calls the callbacks of one connection (``name``: its log lines' prefix), one at a time.

    A base class, not an object the engine holds: compiled, its attributes and methods are the
    engine's own native ones, with no indirection per callback.
    """

    __slots__ = ("shared", "name", "meter", "calling", "_due", "_unwinding", "_abandoned")

    def __init__(self, shared: Shared, name: str) -> None:
        self.shared = shared
        self.name = name
        self.meter: Meter | None = shared.meter
        #: The callback running now, until it returns (what holds a stop past its grace: overdue.py).
        self.calling: Callback | None = None
        self._due = FOREVER  # when the async callback awaited now reaches its own limit (see due)
        #: An async callback stopped by its limit and answered, still ending (_settle).
        self._unwinding: tuple[str, Callback, asyncio.Task[Any], Awaitable[Any], str] | None = None
        self._abandoned = False  # a callback of this connection ignored its cancellation: it closes

    def _not_awaitable(self, name: str, cb: Callback, awaitable: Awaitable[Any]) -> Status:
        """An async callback where the answer must be given at once: closed unstarted (a coroutine
        merely dropped makes Python warn "never awaited" on stderr), logged (once a minute per
        callback, as a result that is no status: it is so at every connection), taken as continue.
        (An ``async def`` is refused by register: this is a plain function returning one.)"""
        close = getattr(awaitable, "close", None)
        if close:
            close()
        who = cb.name or said(cb.func, repr)
        if self.shared.traces.logged_as(f"{name} {who} is async", self.name) is None:
            log.error("%s: the %s callback %s must not be async; treated as continue (said once a minute for this "
                      "callback)", self.name, name, escape(who))
        return Status.CONTINUE

    def _call(self, name: str, cb: Callback, call_args: tuple[Any, ...], limit: float,
              ignore: bool) -> Status | Awaitable[Status]:
        """Call one callback: the one place for the time limit, failures, and reading the result.

        Returns its status (``on_error`` if it raised or was stopped; continue for a result
        that is no status, with a warning, or for any result with ``ignore``), or, for an
        async callback, an awaitable giving that status. Tcl callbacks return a Status, which
        is taken as it is. With a limit (``limit`` seconds, read by the caller for each callback),
        ``cb.limit`` holds the callback to it (limits.py) and says whether it overran: a
        callback that comes back after its limit, from code the limit cannot interrupt, is
        logged with its time. Without one the clock is not read at all.
        """
        started = _monotonic() if limit or self.meter is not None else 0.0
        limiter = cb.limit
        held = limiter.begin(limit, started)
        late = False
        func = cb.func  # compiled, cb.func(*args) would be a getattr by name, as for a method
        self.calling = cb
        try:
            try:
                result = func(*call_args)
            finally:
                self.calling = None
                if held:
                    late = limiter.stop()  # before anything else: the failure's log line is not limited
        # A filter bug must not take the milter down: any BaseException, sys.exit() included (the
        # Tcl `exit` ends the process, as the manual has it; Python's is a failure like any other),
        # and a library's own class beside Exception. (A stop signal is the loop's: no KeyboardInterrupt.)
        except BaseException as exc:  # noqa: BLE001
            status = self._callback_failed(name, cb, self._grace_named(exc, started), ignore)
            if limit:
                self._check_time(name, cb, started, limit, _LATE_STOP)
            self._timed(name, cb, started)
            return status
        if late or (limit and not held):  # a sync Python callback off the main thread is timed here
            self._check_time(name, cb, started, limit, 0.0)
        if isinstance(result, Status):  # Tcl callbacks and well-behaved Python ones: no parsing
            self._timed(name, cb, started)
            return result
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            if name == "negotiate":
                return self._not_awaitable(name, cb, result)
            return self._awaited(name, cb, result, limit, started, ignore)  # timed when it completes
        self._timed(name, cb, started)
        return Status.CONTINUE if ignore else self._status(name, cb, result)

    def _grace_named(self, exc: BaseException, started: float) -> BaseException:
        """A plain Python callback that started in a stop's or reload's grace was held to what was
        left of it, which the Python limit calls call_timeout (it knows no grace): its line names
        the grace, as a Tcl or an async callback's does."""
        if type(exc) is CallbackTimeout and str(exc).endswith("(call_timeout)") and self.shared.graced(started):
            exc.args = (f"callback {self.shared.overrun(started, _monotonic(), 'call_timeout')}",)
        return exc

    async def _awaited(self, name: str, cb: Callback, awaitable: Awaitable[Any], limit: float, started: float,
                       ignore: bool) -> Status:
        """:meth:`_call` for an async callback, once it returned its awaitable.

        Run as a task of its own, so that the limit answers the MTA at its time whatever the
        callback does with its cancellation (asyncio.wait_for waited until it let go: one that
        swallowed CancelledError held the MTA as long as it liked)."""
        task = asyncio.ensure_future(_contained(awaitable))
        cut: asyncio.CancelledError | None = None
        if not ignore:
            self._due = started + limit if limit else FOREVER
        try:
            done, _ = await asyncio.wait((task,), timeout=limit or None)
        except asyncio.CancelledError as exc:  # the connection is cut, or the loop ends: the callback too
            cut = exc
        if not ignore:
            self._due = FOREVER
        if cut is not None:  # (awaited outside the except clause: compiled, a bare raise after an
            task.cancel()    # await there re-raised an exception already freed, and crashed)
            await self._unwound(name, cb, task, awaitable, "as its connection was cut")
            raise cut
        if not done:
            return await self._stopped(name, cb, task, awaitable, limit, started, ignore)
        try:
            result = task.result()
        except asyncio.CancelledError as exc:
            # From inside the callback: it awaited a task or future that was cancelled. Left to
            # propagate, the connection would wait for ever, paused, with nothing logged.
            status = self._callback_failed(name, cb, exc, ignore)
            self._timed(name, cb, started)
            return status
        # Any BaseException, as in _call: CallbackTimeout (the time limit of Tcl code the callback
        # ran, ctx.tcl), a library's own class beside Exception.
        except BaseException as exc:  # noqa: BLE001
            status = self._callback_failed(name, cb, exc.original if isinstance(exc, _Exited) else exc, ignore)
            if limit:
                self._check_time(name, cb, started, limit, _LATE_STOP)
            self._timed(name, cb, started)
            return status
        if limit:
            self._check_time(name, cb, started, limit, 0.0)
        self._timed(name, cb, started)
        return Status.CONTINUE if ignore else self._status(name, cb, result)

    async def _stopped(self, name: str, cb: Callback, task: "asyncio.Task[Any]", awaitable: Awaitable[Any],
                       limit: float, started: float, ignore: bool) -> Status:
        """An async callback ran out of time: cancelled, and answered with ``on_error`` now. It
        gets UNWIND seconds to end before anything more of this connection runs (its ``finally``
        clauses use the context); :meth:`_settle` waits for it there."""
        task.cancel()
        shared = self.shared  # a stop's grace may have cut the limit short: the line names it, as for Tcl
        why = shared.overrun(started, _monotonic(), "call_timeout")
        status = self._callback_failed(name, cb, CallbackTimeout(f"callback {why}"), ignore)
        self._check_time(name, cb, started, limit, _LATE_STOP)
        self._timed(name, cb, started)
        when = f"when {shared.stop_why} was over" if shared.graced(started) else f"at the {limit:g} s call timeout"
        self._unwinding = (name, cb, task, awaitable, when)
        if ignore:  # abort, close: no answer to give first (abandoned, the engine closes the connection)
            await self._settle()
        return status

    async def _settle(self) -> bool:
        """Wait (UNWIND seconds at most) for a callback stopped by its limit to end; False if it
        did not, and was abandoned."""
        unwinding, self._unwinding = self._unwinding, None
        if unwinding is not None:
            await self._unwound(*unwinding)
        return not self._abandoned

    async def _unwound(self, name: str, cb: Callback, task: "asyncio.Task[Any]", awaitable: Awaitable[Any],
                       when: str) -> None:
        """Give a cancelled callback UNWIND seconds to end; abandon it (logged) if it does not."""
        if not task.done():
            try:
                await asyncio.wait((task,), timeout=UNWIND)
            finally:
                if not task.done():
                    abandon(task, awaitable)
                    self._abandoned = True
                    log.error("%s: %s callback %s ignored its cancellation %s and is abandoned; its "
                              "connection is closed (abandoned callbacks still running: %d)", self.name, name,
                              escape(cb.name or repr(cb.func)), when, len(ABANDONED))
        if task.done():
            _consume(task)

    def _timed(self, name: str, cb: Callback, started: float) -> None:
        """Count a callback's time for --metrics (without metrics the clock was not read)."""
        if self.meter is not None:
            self.meter.callback(name, cb.origin, _monotonic() - started)

    def _check_time(self, name: str, cb: Callback, started: float, limit: float, grace: float) -> None:
        """Count a callback that took longer than ``limit`` (stopped by it, or back late); log one
        that took longer than ``limit`` + ``grace`` seconds."""
        elapsed = _monotonic() - started
        shared = self.shared
        if shared.stop_by != FOREVER:  # a stop's or reload's grace: its end holds it too (call_limit)
            limit = min(limit, shared.call_limit(started))
        if elapsed > limit and self.meter is not None:
            self.meter.overran(name, cb.origin)
        if elapsed > limit + grace:
            self._overran(name, cb, elapsed, limit, started)

    def _overran(self, name: str, cb: Callback, elapsed: float, limit: float, started: float) -> None:
        """A callback came back after its limit: it was in code the limit cannot interrupt (C code,
        a sync callback off the main thread, an async one blocking the event loop). The limit is
        named as the failure line names it: call_timeout, or the grace that ended first."""
        shared = self.shared
        over = f"past the end of {shared.stop_why}" if shared.graced(started) else f"over the {limit:g} s call timeout"
        log.warning("%s: %s callback %s took %.1f s, %s, which could not stop it sooner",
                    self.name, name, escape(cb.name or repr(cb.func)), elapsed, over)

    def _status(self, name: str, cb: Callback, result: Any) -> Status:
        status = parse_status(result)
        if status is None:
            # A proc that ends in `set` returns what it set, for every header of every message:
            # said once a minute per callback (the same place, as for a failure's trace).
            who = cb.name or repr(cb.func)
            if self.shared.traces.logged_as(f"{name} {who} returns no status", self.name) is None:
                log.warning("%s: %s callback %s returned %s, not a status; treated as continue (said once a "
                            "minute for this callback)", self.name, name, escape(who), escape(_result_shown(result)))
            return Status.CONTINUE
        return status

    def _callback_failed(self, name: str, cb: Callback | None, exc: BaseException, ignore: bool = False) -> Status:
        """Log a failure (``cb`` None: the engine's own, around an async chain); ``on_error``.
        With ``ignore`` (abort, close) the line says no answer goes: those events take none."""
        detail = exc.detail if isinstance(exc, CallbackError) else traceback_text(exc)
        status = self.shared.settings.on_error
        # The script's or the MTA's text in every part (a callback name is a Tcl script, an error
        # message may quote a header): escaped, and errorInfo's lines indented (logline).
        who = "chain" if cb is None else cb.name or repr(cb.func)
        text = said(exc)
        message = failure_text(exc)
        seen = self.shared.traces.logged_as(f"{name} {who}\n{place_of(detail, text)}", self.name) if detail else None
        answer = _failure_answer(name, status, ignore, self.shared.settings.dry_run)
        if seen is None:
            log.error("%s: %s callback %s failed (%s), %s:\n%s", self.name, name,
                      escape(who), escape(message), answer, escape_lines(detail))
        else:
            log.error("%s: %s callback %s failed (%s), %s (the same trace as %s)", self.name, name,
                      escape(who), escape(message), answer, seen)
        self.shared.stats.errors += 1
        if self.meter is not None:
            self.meter.failed(name, "python" if cb is None else cb.origin)
        return status


def _failure_answer(name: str, status: Status, ignore: bool, dry: bool) -> str:
    """What a failure line says went to the MTA: under --dry-run continue, not ``on_error``."""
    if ignore:
        return f"no answer ({name} takes none)"
    if dry and status is not Status.CONTINUE:
        return f"would answer {status.smfis}; answering continue"
    return f"answering {status.smfis}"


def _result_shown(result: Any) -> str:
    """A result that is no status as its warning quotes it: a long text, bytes or collection by the
    start of its repr and its length (a Tcl callback's result comes quoted and cut already)."""
    shown = said(result, repr)
    if len(shown) <= SHOWN or not isinstance(result, (str, bytes, bytearray, list, tuple, dict)):
        return shown
    unit = "bytes" if isinstance(result, (bytes, bytearray)) else "characters" if isinstance(result, str) else "items"
    return f"{clip(shown)} ({len(result)} {unit})"


def traceback_text(exc: BaseException) -> str:
    """The traceback of a failure as its log line shows it: without the engine's own frames."""
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, internals_dropped(exc, exc.__traceback__))).rstrip()
