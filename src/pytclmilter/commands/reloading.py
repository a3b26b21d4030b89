"""``pytclmilter run``'s script generations: the one serving, and SIGUSR1's reload.

A reload loads the script and every ``--python`` file afresh, in a new interpreter, exactly as
at start, up to its ``milter main``, where the script waits (TclHost.start). Then
:meth:`Milter.reload` hands new connections to it; the replaced script's interpreter is deleted
once its last session is over, without running what follows its ``milter main`` (only the
script serving at the final stop goes on there). A load that fails changes nothing: the error
is logged as ``pytclmilter check`` reports it. The process may have dropped its privileges
(``--user``) by now: the files are read with the rights it runs with.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import threading
import time
import tkinter
import traceback
import weakref
from types import FrameType
from typing import Any, Callable, NoReturn

from ..limits import PYTHON_LIMIT, UNLIMITED, CallbackTimeout, internals_dropped
from ..logline import escape, escape_lines, said
from ..milter import RESTART_ONLY, ReloadError
from ..signalroles import STOP_SIGNALS
from ..tcl.interp import TclHost
from .check import NO_MAIN, callback_errors, script_error
from .common import HooksFailed, ScriptExit, UsageError
from .logs import flush_log
from . import sigmask

log = logging.getLogger("pytclmilter")

#: Makes the interpreter of a generation as at start (make_host, run's options, argv), with
#: ``on_exit`` for Tcl's exit while it loads (None: the process's).
Load = Callable[["Callable[[int], None] | None"], TclHost]


class Abandoned(Exception):
    """A stop signal came while the new generation loaded: it is not loaded, the stop goes on."""


class _AbandonedAtStop:
    """While a generation loads: a stop signal abandons the load at once, not at its limit.

    The load runs on the thread that serves, so the server's own stop (its loop's handler)
    waited for the load to end: up to -calltimeout (60 s), for ever with -calltimeout 0.
    Python runs this handler at the beats of Tcl's limit and between a --python file's
    statements; it runs the handler it replaced first (the server's: the grace starts then).
    A stop that handler took before this one was in place, once the reload was asked, is
    ``taken`` (Milter.stop_signal): it abandons the load as well.

    The abandon line tells the stop (:attr:`tells`), unless the process's handler told it
    already; ``tell`` (Milter.tell_stop) says which, and that handler, which runs later (the
    server's loop) or from ours (the --workers supervisor), logs its own at debug: one stop
    made two lines, in either order."""

    def __init__(self, taken: Callable[[], signal.Signals | None] = lambda: None,
                 tell: Callable[[], bool] = lambda: True) -> None:
        self.signal: signal.Signals | None = None
        self.tells = False  # the abandon line tells the stop (its own handler's line did not)
        self._taken_before = taken
        self._tell = tell
        self.host: TclHost | None = None  # the interpreter loading, once made
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> "_AbandonedAtStop":
        if threading.current_thread() is threading.main_thread():  # (only it may set a handler)
            for sig in STOP_SIGNALS:
                # Known before ours is in place: Python may run ours as soon as it is (before the
                # next signal.signal, which runs the handlers due first), and without the one it
                # replaced the stop was never begun: the load abandoned, the process served on.
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._taken)
        taken = self._taken_before()  # (after: one in between is either's)
        if self.signal is None and taken is not None:
            self.tells = self._tell() or self.tells  # (ours may have told it just now)
            self.signal = taken
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _taken(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:  # before the handler: the supervisor's logs at once
            self.tells = self._tell() or self.tells
        handler = self._previous.get(signal.Signals(signum))
        if callable(handler):
            handler(signum, frame)
        self.signal = self.signal or signal.Signals(signum)  # the one the abandon line tells
        PYTHON_LIMIT.hold_to(time.monotonic(), "the stop")  # a --python file's setup: stopped now
        if self.host is not None:
            self.host.limit.expire()  # Tcl's next check stops the script where it is

    def stopped(self) -> bool:
        """A stop signal came: a limit begun after it (the script's, TclScript.start) ends now."""
        return self.signal is not None

    def check(self) -> None:
        """Abandoned, if a stop signal came."""
        if self.signal is not None:
            raise Abandoned(self.signal.name)


class LoadFailed(Exception):
    """The new generation did not load: what check would say, and the details (errorInfo)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


#: Tcl's exit once a generation serves (or, the first one, runs): ends the process.
Exit = Callable[[TclHost, int], None]


class Generations:
    """The script ``run`` serves: :attr:`current`, replaced by :meth:`reload` (Hooks.reload)."""

    def __init__(self, script: str, load: Load, exit_process: Exit = TclHost.exit_process) -> None:
        #: Where a reload reads the script, and how its lines name it: run gives the absolute path
        #: (the working directory may have changed since the start), as it does for the --python
        #: files and as Tcl's errorInfo then names the script, so that the lines of a reload
        #: agree (they named it as given on the command line and as absolute by turns).
        self.script = script
        self._load = load
        self._exit_process = exit_process
        self.current = self._ends_the_process(load(None))

    def _ends_the_process(self, host: TclHost) -> TclHost:
        """From now on Tcl's exit in ``host`` ends the process (``exit_process``)."""
        host.on_exit = functools.partial(self._exit_process, host)
        return host

    def reload(self) -> bool:
        """Load the next generation and serve new connections with it (True), or log why not;
        Abandoned, once logged, when a stop signal came while it loaded (the stop goes on)."""
        current = self.current
        number = current.milter.generation + 1
        # Watched from before the loading line: a stop after it (systemd's, the admin's, seeing
        # it) was taken by the serving process's handler until the watch began, and the load
        # went on to its end (generation 2 "serves" while all stopped), however long it took.
        watch = _AbandonedAtStop(lambda: current.milter.stop_signal, current.milter.tell_stop)
        try:
            with watch:
                log.info("reload: loading generation %d from %s", number, escape(self.script))
                flush_log()  # (now, not once the loop turns: a load may take a while)
                _check_replaceable(current)
                host = self._start(watch)
            if watch.signal is not None:  # after the load's last look: its line tells the stop all the same
                host.close()
                watch.check()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the running script serves on
            if watch.signal is not None:  # (Abandoned, or a failure after the stop came: the stop's)
                self._abandoned(current, number, watch)
            self._failed(current, number, exc)
            return False
        self.current = host
        try:
            current.milter.reload(host.milter, lambda: self._gone(current, number - 1))
        except ReloadError as exc:
            self.current = current
            host.close()
            _collect()
            self._failed(current, number, exc)
            return False
        return True

    def _start(self, watch: _AbandonedAtStop) -> TclHost:
        """The new generation's interpreter, its script waiting in `milter main`; Abandoned when
        a stop signal comes meanwhile (``watch``)."""
        exited = ScriptExit()
        # The load runs on the thread that serves: while it runs, no connection is answered.
        # Without -calltimeout, UNLIMITED: Tcl's limit beats all the same, and a stop's signal
        # is taken at its beats and abandons the load.
        within = self.current.milter.call_timeout
        stopped = _stopped(within, self.current.milter.generation)
        try:
            host = _held(self._load, exited, within or UNLIMITED, watch.check)
        except (Exception, CallbackTimeout) as exc:
            # A stop meanwhile abandons the load, whatever that made it raise: the limit's
            # CallbackTimeout, or Tcl's error around it when it came in a Python command Tcl ran.
            watch.check()
            if isinstance(exc, HooksFailed) and exc.stopped:
                raise LoadFailed(f"--python {exc.path}: {stopped}", exc.detail) from None
            if isinstance(exc, CallbackTimeout):  # ran out in our part of the load, not a file's
                tb = internals_dropped(exc, exc.__traceback__)
                raise LoadFailed(stopped, "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()) from None
            raise
        host.loading = True
        watch.host = host
        try:
            watch.check()
            with sigmask.children_reapable():  # under --workers, in the supervisor
                started = host.start(self.script, within or UNLIMITED, watch.stopped)
            watch.check()
            if not started:
                raise LoadFailed(f"{self.script}: error: {NO_MAIN}")
            errors = callback_errors(self.script, host)
            if errors:
                raise LoadFailed(errors[0], "\n".join(errors[1:]))
        except tkinter.TclError as exc:
            info = host.error_info()
            exceeded = host.limit.exceeded
            host.close()
            watch.check()
            if exited.code is not None:
                raise LoadFailed(f"{self.script}: error: the script called exit {exited.code} while loading") from None
            if exceeded:
                raise LoadFailed(f"{self.script}: error: {stopped}", info) from None
            raise LoadFailed(script_error(self.script, exc, info), info) from None
        except BaseException:
            host.close()
            raise
        host.loading = False
        return self._ends_the_process(host)  # as at start

    def _abandoned(self, current: TclHost, number: int, watch: _AbandonedAtStop) -> NoReturn:
        """A stop signal came while generation ``number`` loaded: told (once, watch.tells), and
        Abandoned for the stop to go on."""
        current.milter.stats.reloads_abandoned += 1
        name = watch.signal.name if watch.signal is not None else "?"
        if watch.tells:
            log.warning("reload: generation %d abandoned: received %s while it loaded; stopping", number, name)
        else:  # the process's handler told the stop (it came before the load began)
            log.warning("reload: generation %d abandoned: the milter is stopping", number)
        _collect()
        raise Abandoned(name) from None

    def _failed(self, current: TclHost, number: int, exc: Exception) -> None:
        current.milter.stats.reloads_failed += 1
        if isinstance(exc, (LoadFailed, HooksFailed)):
            message, detail = str(exc), exc.detail
        elif isinstance(exc, ReloadError) and exc.settings:  # in the options' own spelling
            message, detail = f"{', '.join(RESTART_ONLY[s] for s in exc.settings)} cannot change without a restart", ""
        elif isinstance(exc, (UsageError, ReloadError)):
            message, detail = str(exc), ""
        else:  # a --python file's error
            message, detail = f"{type(exc).__name__}: {said(exc)}", "".join(traceback.format_exception(exc)).rstrip()
        log.error("reload: generation %d not loaded, generation %d serves on unchanged: %s%s", number,
                  current.milter.generation, escape(message), "\n" + escape_lines(detail) if detail else "")
        _collect()

    def _gone(self, old: TclHost, number: int) -> None:
        if old.thread_home:  # it ran its first thread:: command while finishing its sessions
            log.warning("reload: generation %d's interpreter stays for the process's life: its script used "
                        "the Thread package after the reload, and Thread sends to that interpreter; "
                        "restart to free it and to use threads in the script", number)
        old.close()
        _collect_until_freed(old)
        log.info("reload: generation %d is gone (its last session is over); generation %d serves",
                 number, self.current.milter.generation)


def _held(load: Load, exited: ScriptExit, seconds: float, check_stop: Callable[[], None] = lambda: None) -> TclHost:
    """``load`` held to ``seconds`` by the Python limit (the --python files' import and setup);
    ``check_stop`` raises once the limit is held for a stop that came before (it could not hold it).
    Its CallbackTimeout comes wherever the load is: in a file's code (its import, the look-up of
    its setup, its setup) as HooksFailed, in ours (making the interpreter) as it is. A stop holds
    the limit to now (_AbandonedAtStop), so one at the very start of a load ends it in our part.
    It may also come after the load returned, before the release: the interpreter made is
    closed then (a reload goes on serving: nothing else would free it)."""
    held = PYTHON_LIMIT.begin(seconds, time.monotonic())
    host: TclHost | None = None
    try:
        check_stop()
        host = load(exited)
        if held:
            PYTHON_LIMIT.stop()
    except BaseException:
        if held:  # (again when the CallbackTimeout came first: that left the limit inactive)
            PYTHON_LIMIT.stop()
        if host is not None:
            _close_failed_load(host)
        raise
    return host


def _close_failed_load(host: TclHost) -> None:
    """Close the interpreter of a load that failed, logging an error of the close: the load's
    own error, which is raising, is what the reload reports (the close's error hid it)."""
    try:
        host.close()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the load's error goes on
        log.error("reload: closing the interpreter of the failed load failed too: %s",
                  escape(f"{type(exc).__name__}: {said(exc)}"))


def _stopped(seconds: float, generation: int) -> str:
    """Why a load was stopped: it ran past the serving generation's -calltimeout."""
    return (f"loading was stopped after {seconds:g} s (-calltimeout of generation {generation}): "
            "the milter serves nothing while a script loads")


def _check_replaceable(current: TclHost) -> None:
    if current.served_inside:
        raise ReloadError("the serving script's `milter main` was called where Tcl cannot suspend a "
                          "script (from a command implemented in C), so it cannot be replaced; restart instead")
    if current.thread_home:
        raise ReloadError("the serving script has used the Thread package, which sends what threads send to "
                          "this thread to that script's interpreter for as long as the process lives, so the "
                          "interpreter cannot be replaced; restart instead")
    threads = current.thread_count() - 1
    if threads:
        raise ReloadError(f"the serving script runs {threads} other thread(s), which would outlive its "
                          "interpreter; restart instead")


_FREE_TRIES = 20  # 2 s: the last connection's transport is long closed by then


def _collect_until_freed(old: TclHost) -> None:
    """_collect() until ``old`` is freed, from the loop's next turn on (a few tries, 0.1 s apart).

    A generation is gone from the last frames of its retirement, which still hold it, and the
    transport of its last connection may still hold that connection's engine for a turn or two;
    a collection then finds the host alive and gc.freeze keeps it, interpreter and Python
    commands, until the next reload."""
    ref = weakref.ref(old.tcl)  # (a TclHost, compiled, takes no weak reference; its Tcl object does)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not serving: nothing of a retirement holds it
        _collect()
        return

    def attempt(tries: int) -> None:
        _collect()
        if ref() is not None and tries > 1:
            loop.call_later(0.1, attempt, tries - 1)

    loop.call_soon(attempt, _FREE_TRIES)


def _collect() -> None:
    """Free a closed interpreter now: the serving process froze what existed when it started
    (Milter.serve: gc.freeze), the old host among it, and its cycles would never be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
