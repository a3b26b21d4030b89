"""The asyncio server: listens, times out idle connections, stops gracefully, reloads.

Knows sockets, signals and time; each accepted socket is a :class:`~pytclmilter.connection.Connection`
(connection.py), which hands its bytes to its engine; of the protocol it knows nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Final

from .accept import Acceptor, check_fd_limit
from .connection import Connection, cut
from .connspec import ConnSpec, parse
from .hooks import forget_early_reload, signalled
from .listener import Listener, bind
from .logline import escape
from .repeats import Every, Repeated, tell_counts
from .limits import PYTHON_LIMIT
from .overdue import StopDeadline
from .shared import FOREVER, Shared
from .signalroles import RELOAD, REPLACED, STOP_SIGNALS, StopTold

log: Final = logging.getLogger("pytclmilter")


def _reloads_told(_repeated: Repeated, label: str, count: int) -> None:
    """The count of the SIGUSR1 not logged after ``label``, the line of the first (_reload_refused)."""
    log.warning("%s (%d more within the minute)", label, count)


def already_serving(name: str) -> str:
    return f"milter {name!r} is already serving: serve() and run() may be called again once they have returned"


class _Retiring:
    """A generation replaced by a reload: its sessions still open, and whom to tell when none is."""

    __slots__ = ("open", "over", "gone")

    def __init__(self, open_sessions: int, gone: Callable[[], None]) -> None:
        self.open = open_sessions
        self.over = asyncio.Event()
        self.gone = gone


#: Why a connection pushed back (its replies unread) was idle: not read from while it reads nothing.
_UNREAD: Final = "replies unread by the peer (its receive buffer full: nothing more was read from it)"
#: What the end of serving is logged as, and why the sessions cut at its grace were closed.
_STOPPED: Final = ("stopping", "milter stopped")
_REPLACED: Final = ("replaced by a reload", "milter reloaded")


class MilterServer:
    """Runs one milter's listener until stopped. ``serve`` may be called again after it returns."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop serve() runs on, once it has run
        self.connections: set[Connection] = set()
        self._ids = 0
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        # Reentrant: stop() runs in signal handlers (run's, between the load and serving), which
        # Python may run on the main thread while it holds this lock in serve() or stop_asked().
        self._lock = threading.RLock()
        self.listening: ConnSpec | None = None
        self.tcp = False  # the listener is TCP (inet/inet6), not a unix socket
        self._listener: Listener | None = None
        self.acceptor: Acceptor | None = None
        self._loop_thread: int | None = None  # the thread running serve(): stop() from it sets the event directly
        #: Generations a reload replaced, while sessions of theirs are open (see replace).
        self.retiring: dict[Shared, _Retiring] = {}
        self._retirements: set[asyncio.Future[None]] = set()
        self._ticker: asyncio.Future[None] | None = None
        self._tick_failed = Every(60.0)  # _run_tick's log line
        self._refused_reloads = Repeated(60.0, tell=_reloads_told)  # SIGUSR1 that cannot reload, by line
        #: SIGUSR1 calls hooks.reload (if given); a --workers worker leaves reloading to its supervisor.
        self.reloadable = True
        self._reload_disposition: Any = signal.SIG_DFL
        #: The stop signals' handlers before serve() (run's, or Python's default): put back after
        #: it, where the loop leaves the default action, which ended the process without a word.
        self._stop_dispositions: dict[signal.Signals, Any] = {}
        #: The stop signal that stopped serving, if one did (a --workers worker's exit status says it).
        self.stopped_by: signal.Signals | None = None
        #: Why serving ends, as the log and the metrics say it: a stop, or (a worker) a reload.
        self._ending = _STOPPED
        self._aborted = False  # abort(): serve() ends without the grace
        #: The stop signal that came (Python's handler, _grace_starts), maybe before the loop's takes
        #: it: a SIGUSR1 queued before it must not load a script meanwhile (_on_reload), and a load
        #: under way when it came is abandoned (commands/reloading.py).
        self.stop_signal: signal.Signals | None = None
        self._holding = ""  # what the loop's thread does other than callbacks, for overdue.py
        self._reload_told = False  # the SIGUSR1 waiting for a callback was logged (_seen)
        self._told_again = False  # a stop signal while stopping was logged (_stop_again: once a stop)
        #: The stop's line was logged: by _on_signal, or by the line of a reload's load the stop
        #: abandoned (Milter.tell_stop), which comes first, and _on_signal's then goes to debug.
        self.stop_told = StopTold()

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    @property
    def serving(self) -> bool:
        """serve() runs (from its start until it returns, not only while it listens)."""
        return self._stop is not None

    # ------------------------------------------------------------ stop, from anywhere

    def stop(self) -> None:
        """Ask the server to stop; safe from any thread, from callbacks and from signal handlers."""
        with self._lock:
            loop, ev = self.loop, self._stop
            if loop is None or ev is None:
                self._stop_requested = True  # not serving yet: the next serve() returns at once
                return
        try:
            if threading.get_ident() == self._loop_thread:
                ev.set()
            else:
                loop.call_soon_threadsafe(ev.set)
        except RuntimeError:
            pass  # the loop already closed: nothing left to stop

    def stop_pending(self) -> bool:
        """Whether stop() came before serving, not taken (stop_asked takes it)."""
        with self._lock:
            return self._stop_requested

    def stop_asked(self) -> bool:
        """Whether stop() came before serving (taken: asked once more, False): the --workers
        supervisor, which serves without serve(), stops at once too."""
        with self._lock:
            asked, self._stop_requested = self._stop_requested, False
        return asked

    def abort(self) -> None:
        """Stop at once, synchronously (Tcl's ``exit``): listener closed, socket file removed, peers
        cut; serve() then returns without waiting for a grace (from the loop's thread)."""
        listener, acceptor = self._listener, self.acceptor
        if listener is None or acceptor is None or self.listening is None:
            return
        acceptor.close()
        listener.remove_unix()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        # Else serve() went on waiting for a stop with nothing left to serve: run() never returned.
        self._aborted = True
        if self._stop is not None:
            self._stop.set()

    # ------------------------------------------------------------ serving

    async def serve(self, inherited: Listener | None = None, started: Callable[[], None] | None = None) -> None:
        """Serve with the settings in force now; ``inherited``: a socket the parent of ``--workers``
        bound and announced (hooks.listening), to serve instead of binding one; ``started``, with
        it: called on the loop once serving (the worker's watch on its parent)."""
        hooks = self.shared.hooks
        spec = parse(self.shared.settings.connection)
        loop = asyncio.get_running_loop()
        with self._lock:
            # A second serve() meanwhile would take over the loop and the stop event: stop() then
            # stopped only one of the two, and the other served on for ever.
            if self._stop is not None:
                raise RuntimeError(already_serving(self.shared.settings.name))
            self.loop, self._loop_thread = loop, threading.get_ident()
            self._stop = stop = asyncio.Event()
            # Checked once _stop is set: a stop() that came before serve(), or in a signal handler
            # anywhere in this block, is either seen here or sets the event.
            if self._stop_requested:  # return at once, bound to nothing
                self._stop_requested = False
                self._stop = None
                return
        self.stopped_by, self._ending, self._aborted, self.stop_signal = None, _STOPPED, False, None
        self._told_again, self.stop_told = False, StopTold()
        self.tcp = spec.family != "unix"  # before listening: the first connection may come at once
        try:
            listener, acceptor = self._listen(spec, inherited, loop)
        except BaseException:  # not serving after all: the next serve() may try again
            with self._lock:
                self._stop = None
            raise
        self._listener, self.acceptor, spec = listener, acceptor, listener.spec
        self.listening = spec
        signals = self._install_signals(loop)
        deadline = self._stop_deadline(loop) if signals else None
        sweeper = asyncio.ensure_future(self._sweep(loop))
        self._start_ticker()
        try:
            if inherited is None:
                hooks.listening(spec)
            elif started is not None:
                started()
            await stop.wait()
            log.info("%s: no new connections; %d open", self._ending[0], len(self.connections))
        finally:
            acceptor.close()  # new connections are refused from now on, open ones go on
            listener.remove_unix()
            await self._drain(loop, 0.0 if self._aborted else self.shared.settings.grace)
            tell_counts(ended_only=False)  # (the faults' counts, and any other Repeated's)
            self.shared.stop_by, self.shared.stop_why = FOREVER, ""  # (serve() may be called again)
            await self._end_retirements()
            sweeper.cancel()
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None
            if deadline is not None:
                deadline.end()
            self._remove_signals(loop, signals)
            self.acceptor = None
            self.listening = None
            with self._lock:
                self._stop = None

    def _listen(self, spec: ConnSpec, inherited: Listener | None,
                loop: asyncio.AbstractEventLoop) -> tuple[Listener, Acceptor]:
        """Serve the socket bound for us (``--workers``) or bind one now; accept on it (accept.py)."""
        listener = inherited
        if listener is None:
            settings = self.shared.settings
            listener = bind(spec, settings.backlog, settings.socket_mode, settings.socket_owner)
            check_fd_limit(settings.backlog)  # with --workers, the supervisor checks once
        acceptor = Acceptor(loop, listener.sock, lambda: Connection(self, loop),
                            lambda: self.shared.settings.max_connections, self._refused)
        acceptor.start()
        return listener, acceptor

    def _refused(self) -> None:
        """A connection was closed at the connection limit (accept.py): count it for --metrics."""
        meter = self.shared.meter
        if meter is not None:
            meter.refused()

    # ------------------------------------------------------------ reload

    def replace(self, shared: Shared, gone: Callable[[], None]) -> None:
        """On the loop: serve the connections accepted from now on with ``shared`` (a reloaded
        milter's). Those open finish with the one in force until now, within its grace (then they
        are closed, and no callback of theirs runs past it); ``gone`` is called, on the loop, when
        the last of them is over."""
        old, self.shared = self.shared, shared
        if self._stop is None:  # not serving: nothing to finish
            gone()
            return
        self._start_ticker()
        # Its sessions are cut at the end of its grace: no callback of theirs runs past it either
        # (an answer after it reaches no MTA, and a stuck one held the new script's too).
        grace = old.settings.grace
        old.hold_to(time.monotonic() + grace, f"the reload's {grace:g} s grace")
        retiring = _Retiring(sum(1 for c in self.connections if c.engine is not None and c.engine.shared is old), gone)
        self.retiring[old] = retiring
        task = asyncio.ensure_future(self._retire(old, retiring))
        self._retirements.add(task)
        task.add_done_callback(self._retirements.discard)

    def session_over(self, shared: Shared) -> None:
        """A connection of ``shared`` closed (while some generation retires)."""
        retiring = self.retiring.get(shared)
        if retiring is not None:
            retiring.open -= 1
            if retiring.open <= 0:
                retiring.over.set()

    async def _retire(self, old: Shared, retiring: _Retiring) -> None:
        try:
            if retiring.open > 0:
                try:
                    await asyncio.wait_for(retiring.over.wait(), old.settings.grace)
                except asyncio.TimeoutError:
                    await cut([c for c in self.connections if c.engine is not None and c.engine.shared is old],
                               "milter reloaded")
        finally:
            del self.retiring[old]
            retiring.gone()

    async def _end_retirements(self) -> None:
        """At stop, after the drain: every replaced generation is over."""
        tasks = list(self._retirements)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        """Let open sessions finish for ``grace`` seconds, then close them (abort/close callbacks
        run). No callback runs past the grace (Shared.call_limit), counted from the signal when
        its handler ran first: the stop is over within it, UNWIND and a few moments."""
        self._hold_to_grace(grace, self._ending is _REPLACED)  # (from the signal: _grace_starts)
        deadline = loop.time() + max(self.shared.stop_by - time.monotonic(), 0.0)
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            open_now = len(self.connections)
            log.warning("%s: %d conversation%s still open at the end of the %g s grace cut short (the MTA applies "
                        "its default action to each)", self._ending[0], open_now, "" if open_now == 1 else "s", grace)
        await cut(list(self.connections), self._ending[1])
        if self.connections:
            await asyncio.sleep(0)
        self.connections.clear()

    async def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close connections idle longer than the I/O timeout (progress counts as activity); tell
        the failures counted, not logged, in a window now over (repeats.tell_counts)."""
        while True:
            timeout = self.shared.settings.timeout  # read each round: a reload may change it
            await asyncio.sleep(max(0.05, min(1.0, timeout / 4)))
            tell_counts()
            now = loop.time()
            # A connection whose callback is still running is not idle: the timeout limits waits
            # for the MTA, not callbacks (docs/protocol.md §9.3).
            for conn in [c for c in self.connections if now - c.last > timeout and not c.busy]:
                # A peer whose replies are unread is not read either (pause_writing): "no data"
                # sent an admin looking for a silent MTA that had in fact sent plenty.
                what = f"{_UNREAD if conn.blocked else 'no data'} for {timeout:g}s, closing"
                # A stalled MTA's connections time out together: ten lines a minute and a count.
                engine = conn.engine
                if engine is None or engine.fault_due(what):
                    log.warning("%s: %s", engine.name if engine else "?", what)
                conn.expire("timeout")

    def _start_ticker(self) -> None:
        if self._ticker is None and self.shared.hooks.tick is not None:
            self._ticker = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        """Give a host (the Tcl interpreter) its turn to run timers and file events; after a reload,
        the replaced generations' hosts too while they serve their last sessions."""
        while True:
            await asyncio.sleep(self.shared.settings.tick_interval)
            tick = self.shared.hooks.tick
            if tick is not None:
                self._run_tick(tick)
            if self.retiring:
                for old in list(self.retiring):
                    tick = old.hooks.tick
                    if tick is not None:
                        self._run_tick(tick)

    def _run_tick(self, tick: Callable[[], None]) -> None:
        """One tick; one that fails is logged (at most once a minute) and the next comes as usual:
        an escaping error ended this task, and with it every later timer and file event; a
        sys.exit() (or KeyboardInterrupt) ended run() itself, where the other hooks' is logged."""
        try:
            tick()
        except BaseException:  # noqa: BLE001 - log, and keep ticking
            if self._tick_failed.due():
                log.exception("the host's event tick failed (logged at most once a minute)")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed: list[signal.Signals] = []
        # SIGUSR1 only for a milter that can reload (Hooks.reload): otherwise it keeps its meaning.
        # A --workers worker's milter can, in the supervisor: one sent to a worker is only logged.
        can_reload = self.shared.hooks.reload is not None
        for sig in STOP_SIGNALS + ((RELOAD,) if can_reload else ()):
            try:
                if sig == RELOAD:
                    self._reload_disposition = signal.getsignal(sig)
                    loop.add_signal_handler(sig, self._on_reload if self.reloadable else self._reload_elsewhere)
                    if not self.reloadable:  # a worker: its supervisor tells it when a reload replaced it
                        loop.add_signal_handler(REPLACED, self._on_replaced)
                        signal.signal(REPLACED, self._grace_starts)
                        installed.append(REPLACED)
                        # (blocked since the fork, workers.py: one sent meanwhile is taken now)
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, (REPLACED,))
                    # `run` blocks it in every thread but the one that serves (commands/run.py)
                    forget_early_reload()
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, (sig,))
                else:
                    self._stop_dispositions[sig] = signal.getsignal(sig)
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    signal.signal(sig, self._grace_starts)  # (the loop still gets it, by its wakeup fd)
                installed.append(sig)
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                # An event loop without signal support (NotImplementedError), or a signal this
                # platform lacks: serving goes on, but this signal no longer stops it gracefully,
                # which the admin must know before relying on it.
                log.warning("%s will not %s (the event loop cannot handle it: %s)", sig.name,
                            "reload the milter" if sig == RELOAD else "stop the milter gracefully",
                            exc or type(exc).__name__)
        if not self.reloadable:  # a --workers worker: blocked since the fork (workers.py), taken now
            # (by the handlers above: a stop sent before they were in place is a stop, not a death;
            # one whose handler failed has its default action, as before)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return installed

    def _stop_deadline(self, loop: asyncio.AbstractEventLoop) -> StopDeadline:
        """The process ends when a stop's grace is long over and this thread is still held (overdue.py)."""
        stops = STOP_SIGNALS if self.reloadable else STOP_SIGNALS + (REPLACED,)
        return StopDeadline(loop, stops, lambda: 0.0 if self._aborted else self.shared.settings.grace,
                            self._held_by, self._exiting, self._seen, 0 if self.reloadable else REPLACED)

    def _seen(self, number: int) -> None:
        """A signal came (overdue.py's thread): a reload that must wait for the callback running
        now is told now, once; the loop runs it when the callback returns (_on_reload)."""
        if number != RELOAD or not self.reloadable or self._reload_told:
            return
        held = self._held_by()
        if held.startswith("conn#"):
            self._reload_told = True
            log.warning("received SIGUSR1 while %s runs: the reload waits until it returns (within -calltimeout, "
                        "%g s)", held, self.shared.settings.call_timeout)

    def _held_by(self) -> str:
        """What holds the serving thread, for the line of overdue.py (from its thread)."""
        try:
            engines = [c.engine for c in list(self.connections) if c.engine is not None]
        except RuntimeError:  # (changed meanwhile: the thread is not held after all)
            engines = []
        for engine in engines:
            cb = engine.calling
            if cb is not None:
                return f"{engine.name}'s {escape(engine.ctx.stage)} callback {escape(cb.name or repr(cb.func))}"
        return self._holding or "the serving thread"

    def remove_socket_file(self) -> None:
        """The unix socket's file, if this process bound it and its name still holds it (from any
        thread, as the process ends at once)."""
        if self._listener is not None:
            self._listener.remove_unix()

    def _exiting(self) -> None:
        """The process ends now (overdue.py): the socket's file goes, and the host's own (the pid
        file: not a worker's to remove); what the host holds to write is written."""
        self.remove_socket_file()
        if self.reloadable:
            self.shared.hooks.exiting()
        self.shared.hooks.write_held()

    def _grace_starts(self, signum: int, frame: object) -> None:
        """Python's own handler of the stop signals (the loop's, :meth:`_on_signal`, comes when the
        loop next turns): the grace starts at the signal. Python runs it even while a Tcl callback
        holds the loop (at its limit's beats, tcl/limit.py), which is then held to the grace at
        once rather than to its -calltimeout."""
        if signum != REPLACED and self.stop_signal is None:
            self.stop_signal = signal.Signals(signum)
        self._hold_to_grace(0.0 if self._aborted else self.shared.settings.grace, signum == REPLACED)

    def _hold_to_grace(self, grace: float, reload: bool) -> None:
        """No callback runs more than ``grace`` seconds from now, or from an earlier signal
        (Shared.call_limit); ``reload``: the grace is a reload's (a --workers worker replaced)."""
        by, why = time.monotonic() + grace, f"the {'reload' if reload else 'stop'}'s {grace:g} s grace"
        self.shared.hold_to(by, why)
        PYTHON_LIMIT.hold_to(by, why)  # a plain Python callback the signal came in

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopped_by is not None:  # stopping already: a copy of the stop changes nothing
            self._stop_again(sig)
            return
        self.stop_told.tell(f"received {sig.name}: stopping")
        self.stopped_by = sig
        signalled(self.shared.hooks, sig)
        if self._stop is not None:
            self._stop.set()

    def _stop_again(self, sig: signal.Signals) -> None:
        """A stop signal after the one this stop acts on. Serving alone, an admin's (a second
        Ctrl-C, a `kill` that seemed slow): told once, what it does, nothing more. A --workers
        worker gets the supervisor's copy and, from systemd (KillMode=control-group) or a
        terminal's Ctrl-C, the whole group's: each made a line of its own, as if it stopped twice."""
        if self.reloadable and not self._told_again:
            self._told_again = True
            log.info("received %s while stopping: the stop goes on (the sessions still open keep the rest of the "
                     "%g s grace)", sig.name, self.shared.settings.grace)
            return
        log.debug("received %s while stopping (by %s): the stop goes on", sig.name,
                  self.stopped_by.name if self.stopped_by is not None else "?")

    def _on_replaced(self) -> None:
        self._ending = _REPLACED
        if self._stop is not None:
            self._stop.set()

    def _reload_elsewhere(self) -> None:
        self._reload_refused(f"received SIGUSR1 in a worker: reloading is the supervisor's (pid {os.getppid()}); "
                             "ignored")

    def _reload_refused(self, line: str) -> None:
        """Log why a SIGUSR1 does not reload: once a minute, the others counted (a `kill -USR1`
        in a loop, a storm of them, made as many lines)."""
        missed = self._refused_reloads.due(line, line)
        if missed:
            _reloads_told(self._refused_reloads, line, missed)
        if missed is not None:
            log.warning("%s", line)

    def _on_reload(self) -> None:
        self._reload_told = False
        if self.stop_signal is not None or self._stop is not None and self._stop.is_set():
            self._reload_refused("received SIGUSR1 while stopping: no reload")
            return
        reload = self.shared.hooks.reload
        if reload is None:  # (a reload replaced the milter by one without the hook)
            self._reload_refused("received SIGUSR1: this milter has no reload (Hooks.reload); ignored")
            return
        self._holding = "a reload's load of the script"
        try:
            reload()
        except Exception:  # noqa: BLE001 - a failed reload must not stop serving
            log.exception("reload failed; the milter serves on unchanged")
        finally:
            self._holding = ""

    def _remove_signals(self, loop: asyncio.AbstractEventLoop, sigs: list[signal.Signals]) -> None:
        for sig in sigs:
            loop.remove_signal_handler(sig)
            if sig == RELOAD:  # asyncio leaves the default, which would end the process
                signal.signal(sig, self._reload_disposition)
            elif sig == REPLACED:  # (the same: a late one must not kill the worker)
                signal.signal(sig, signal.SIG_IGN)
            elif sig in self._stop_dispositions:
                previous = self._stop_dispositions.pop(sig)
                # A worker ends now: a copy of the stop that comes late (_stop_again) met the default
                # action and ended it before its last lines (the verdicts, its counts for --metrics).
                signal.signal(sig, previous if self.reloadable else signal.SIG_IGN)
