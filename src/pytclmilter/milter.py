"""The public Python face: :class:`Milter` holds the settings, the callbacks and the hooks, and runs the server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import signal
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Final, Generic, Iterator, TypeVar, cast, overload

from .callbacks import EVENTS, Callback, Registry, accepts, not_accepted
from .connspec import ConnSpec, parse, parse_metrics, same
from .context import ScriptCalls, hosted
from .shared import Shared, Stats
from .hooks import FlushRefused, Hooks
from .logline import escape
from .meter import Meter, WorkerCounts
from .protocol.constants import MAX_DATA_SIZE
from .scripting import TclCommands
from .listener import Listener
from .server import MilterServer, already_serving
from .settings import DEFAULT_CONNECTION, DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT, Settings
from .status import ERROR_ANSWERS, Status, parse_status

if TYPE_CHECKING:
    from .metrics import Block, Exporter
    from .workers import Supervisor

log = logging.getLogger("pytclmilter")

T = TypeVar("T")
#: A callback or a command as the user wrote it: register and tcl_command hand it back unchanged,
#: so a decorated function keeps its type for the user's type checker.
F = TypeVar("F", bound=Callable[..., Any])

#: Settings fixed when the socket is bound or the workers forked: a reload cannot change them.
RESTART_ONLY: dict[str, str] = {
    "connection": "-connection", "backlog": "-backlog", "workers": "-workers",
    "socket_mode": "--socket-mode", "socket_owner": "--user/--group",
    "metrics": "-metrics",  # its HTTP socket is bound at start, before privileges are dropped
}


class ReloadError(Exception):
    """A milter cannot replace the one serving; nothing changed. ``settings``: the names of the
    settings that differ and only a restart can change (RESTART_ONLY), if that is why."""

    def __init__(self, message: str, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings = settings


_SECONDS = "a number of seconds"
#: What each option given to Milter() or assigned to its attribute must be: checked before a
#: Settings is made, whose compiled fields would refuse it in mypyc's words ("float object
#: expected; got str"), the pure-Python ones deep inside a comparison, or not at all.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "connection": ((str,), "a connection spec such as inet:8899@127.0.0.1"),
    "timeout": ((int, float), _SECONDS),
    "backlog": ((int, type(None)), "a positive integer, or None"),
    "grace": ((int, float), _SECONDS),
    "socket_mode": ((int, type(None)), "a file mode such as 0o660, or None"),
    "socket_owner": ((tuple, type(None)), "a (uid, gid) tuple, or None"),
    "max_data_size": ((int,), "an integer"),
    "call_timeout": ((int, float), _SECONDS),
    "workers": ((int,), "a positive integer"),
    "tick_interval": ((int, float), _SECONDS),
    "metrics": ((str,), 'inet:PORT@HOST, or "" for none'),
    "dry_run": ((bool,), "True or False"),
    "max_connections": ((int,), "an integer, 0 (no limit) or more"),
}


def _same_setting(attr: str, new: Settings, old: Settings) -> bool:
    """Whether a reload leaves ``attr`` as it is: a socket's spec by what it names
    (``unix:/x`` and ``local:/x`` are one socket), the rest by value."""
    ours, theirs = getattr(new, attr), getattr(old, attr)
    if attr in ("connection", "metrics"):
        return same(ours, theirs)
    return bool(ours == theirs)


def _checked(name: str, value: T) -> T:
    """``value`` if it is of the kind option ``name`` takes; TypeError naming the option and what
    it takes (a bool is no number), ValueError for a connection or metrics spec that cannot be
    served (as Tcl's `milter configure -connection` refuses it, not only once run() binds)."""
    kinds, what = _KINDS[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{name} must be {what}, not {value!r}")
    if name == "metrics" and value:
        parse_metrics(str(value))  # ConnSpecError (a ValueError): 'metrics "x": must be ...'
    elif name == "connection":
        parse(str(value))  # ConnSpecError: 'connection "x": unknown socket type ...'
    elif name == "socket_owner" and value is not None:
        if not _is_owner(value):
            raise TypeError(f"{name} must be {what}, not {value!r}")
        if not all(-1 <= i < _NO_ID for i in cast(tuple[int, int], value)):  # (run() died in the chown)
            raise ValueError(f"{name} {value!r}: each id must be -1 (kept as it is) or from 0 to {_NO_ID - 1}")
    elif name == "name" and not str(value).strip():  # the listening line and every log line show it
        raise ValueError(f"name must not be empty, not {value!r}")
    return value


#: uid_t and gid_t: (uid_t)-1, 4294967295, is chown's "leave it as it is", no id.
_NO_ID: Final = 0xFFFFFFFF


def _is_owner(value: object) -> bool:
    """A (uid, gid) pair of numbers (names are the CLI's to look up: --user, --group)."""
    return (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when installed (accept, read and write in C: a fifth less CPU per
    message), asyncio's own otherwise or when PYTCLMILTER_LOOP=asyncio."""
    if os.environ.get("PYTCLMILTER_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class _Setting(Generic[T]):
    """A :class:`Milter` attribute for one field of its settings: reading reads the value in
    force, assigning replaces that value by a new one (:func:`dataclasses.replace`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, milter: None, owner: type) -> "_Setting[T]": ...
    @overload
    def __get__(self, milter: "Milter", owner: type) -> T: ...

    def __get__(self, milter: "Milter | None", owner: type) -> "T | _Setting[T]":
        if milter is None:
            return self
        value: T = getattr(milter.settings, self.name)
        return value

    def __set__(self, milter: "Milter", value: T) -> None:
        change: dict[str, Any] = {self.name: _checked(self.name, value)}
        milter.settings = replace(milter.settings, **change)


class Milter:
    """A mail filter: register callbacks, then :meth:`run`.

    >>> m = Milter(connection="inet:8899@127.0.0.1")
    >>> @m.register("envfrom")
    ... def envfrom(ctx, args):
    ...     return REJECT if args[0] == "<spammer@example.com>" else CONTINUE
    """

    name: _Setting[str] = _Setting()
    connection: _Setting[str] = _Setting()
    timeout: _Setting[float] = _Setting()
    backlog: _Setting[int | None] = _Setting()
    grace: _Setting[float] = _Setting()
    socket_mode: _Setting[int | None] = _Setting()
    #: Owner (uid, gid; -1 keeps one) the unix socket's file has from the moment it appears.
    socket_owner: _Setting[tuple[int, int] | None] = _Setting()
    max_data_size: _Setting[int] = _Setting()
    call_timeout: _Setting[float] = _Setting()
    workers: _Setting[int] = _Setting()
    tick_interval: _Setting[float] = _Setting()
    #: inet:PORT@HOST: serve Prometheus metrics there while running (metrics.py); "": none.
    metrics: _Setting[str] = _Setting()
    #: Run the callbacks but answer the MTA continue, with no modification; log what would have been sent.
    dry_run: _Setting[bool] = _Setting()
    #: MTA connections served at once by a process; more are closed at once (0: no limit).
    max_connections: _Setting[int] = _Setting()

    def __init__(
        self,
        name: str = "pytclmilter",
        connection: str = DEFAULT_CONNECTION,
        timeout: float = DEFAULT_TIMEOUT,
        backlog: int | None = None,
        on_error: Status | str = Status.TEMPFAIL,
        grace: float = 30.0,
        socket_mode: int | None = None,
        max_data_size: int = MAX_DATA_SIZE,
        call_timeout: float = 60.0,
        hooks: Hooks | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        options: dict[str, Any] = {
            "name": name, "connection": connection, "timeout": timeout, "backlog": backlog, "grace": grace,
            "socket_mode": socket_mode, "max_data_size": max_data_size, "call_timeout": call_timeout,
            "max_connections": max_connections}
        settings = Settings(on_error=self._status(on_error), **{k: _checked(k, v) for k, v in options.items()})
        if hooks is not None and not isinstance(hooks, Hooks):  # (else an AttributeError at the first connection)
            raise TypeError(f"hooks must be a pytclmilter.Hooks, or None, not {hooks!r}")
        self.registry = Registry()
        self.stats = Stats()
        #: What the server and every connection read, the settings in force among it.
        self.shared = Shared(settings, self.registry, hooks or Hooks(), self.stats)
        self._server = MilterServer(self.shared)
        #: Commands written in Python for a hosted script (see tcl_command); the host makes them.
        self.tcl_commands = TclCommands()
        #: The script's procs, when a host runs a script (the Tcl bridge sets it): tcl().
        self.script: ScriptCalls | None = None
        #: While run() supervises --workers: their supervisor's stop; in a worker: asking the
        #: parent to stop them all. stop() calls it.
        self._stop_others: Callable[[], None] | None = None
        #: While run() supervises --workers: the supervisor (reload forks a new set of workers).
        self._supervisor: Any = None
        self._exporter: Exporter | None = None  # while serving with `metrics`
        #: In a --workers process with `metrics`: its meter and how it publishes (carried by reloads).
        self._worker_counts = WorkerCounts()

    @property
    def settings(self) -> Settings:
        """The settings in force. Assigning a new value (or one of the attributes above) applies
        to the next :meth:`run`, and at once to what reads it while serving (on_error,
        call_timeout, grace: every open connection)."""
        return self.shared.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self.shared.settings = value

    @property
    def hooks(self) -> Hooks:
        """Given at construction; the server, the connections and the workers call them."""
        return self.shared.hooks

    @property
    def on_error(self) -> Status:
        return self.settings.on_error

    @on_error.setter
    def on_error(self, value: Status | str) -> None:
        self.settings = replace(self.settings, on_error=self._status(value))

    @staticmethod
    def _status(value: Status | str) -> Status:
        # (not None or "": those mean continue as a callback's result, but as on_error a missing
        # value would silently let every message through when a callback fails)
        status = parse_status(value) if value is not None and value != "" else None
        if status is None or status not in ERROR_ANSWERS:
            raise ValueError(f"on_error {value!r}: must be one of {', '.join(s.smfis for s in ERROR_ANSWERS)} "
                             "(a Status or its name)")
        return status

    # ------------------------------------------------------------ callbacks

    @overload
    def register(self, event: str, func: None = None) -> Callable[[F], F]: ...
    @overload
    def register(self, event: str, func: F) -> F: ...

    def register(self, event: str, func: F | None = None) -> F | Callable[[F], F]:
        """Add a callback to an event's chain; usable as ``@milter.register("eom")``."""
        Registry.check_event(event)
        if func is None:
            return lambda f: self.register(event, f)
        if not callable(func):  # refused now, at load: not a TypeError at every message, a tempfail each
            raise TypeError(f"register {event}: {escape(repr(func))} is not callable")
        name = getattr(func, "__qualname__", repr(func))
        if not accepts(func, event):  # the same: refused now, not failed at every message
            raise TypeError(f'register {event}: "{escape(name)}" {not_accepted(event)}')
        if event == "negotiate" and inspect.iscoroutinefunction(func):  # the same: logged at every connection
            raise TypeError(f'register negotiate: "{escape(name)}" is async, and the option negotiation is '
                            "answered at once: make it a plain function")
        self.registry.add(event, Callback(func, "python", name))
        return func

    def unregister(self, event: str, func: Callable[..., Any]) -> bool:
        return self.registry.remove(event, lambda c: c.func is func)

    @overload
    def tcl_command(self, name: str, func: None = None) -> Callable[[F], F]: ...
    @overload
    def tcl_command(self, name: str, func: F) -> F: ...

    def tcl_command(self, name: str, func: F | None = None) -> F | Callable[[F], F]:
        """Give the milter's Tcl script a command ``name`` that calls ``func`` with the words as
        ``str``; usable as ``@milter.tcl_command("greydb")``. ValueError for a name already
        defined or the engine's own (``milter``, ``exit``, ``::tclmilter::...``), or an async
        function. Only a hosted script (``pytclmilter run --python``) sees it."""
        if func is None:
            return lambda f: self.tcl_command(name, f)
        self.tcl_commands.add(name, func)
        return func

    def tcl(self, *words: Any) -> str:
        """Run a command of the hosted Tcl script and return its result as text, as
        :meth:`Context.tcl` does, for code outside a connection (a Python command, a timer)."""
        return hosted(self.script).call(words)

    def tcl_list(self, *words: Any) -> list[str]:
        """:meth:`tcl`, its result split as a Tcl list."""
        return hosted(self.script).call_list(words)

    # ------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        return self._server.listening is not None

    @property
    def listening(self) -> ConnSpec | None:
        """Where the server listens now (with the real port when 0 was asked for)."""
        return self._server.listening

    @property
    def generation(self) -> int:
        """1, or one more than the milter this one replaced (:meth:`reload`)."""
        return self.shared.generation

    def stop_pending(self) -> bool:
        """Whether :meth:`stop` came before this milter serves, and :meth:`run` has not taken it
        yet (a stop while the flush before the workers' fork waits: it ends that wait)."""
        return self._server.stop_pending()

    @property
    def stop_signal(self) -> signal.Signals | None:
        """The stop signal (SIGTERM, SIGINT, SIGHUP) the serving process took while serving (with
        workers, their supervisor), if one came: a ``Hooks.reload`` under way learns of it here,
        though the process's handler took it before the hook could take it itself."""
        if self._supervisor is not None:
            taken: signal.Signals | None = self._supervisor.stop_signal
            return taken
        return self._server.stop_signal

    def tell_stop(self) -> bool:
        """Whether the caller logs the stop signal that came (a reload's load it abandons,
        commands/reloading.py): True once, and the process's own handler (with workers, their
        supervisor's) then logs it at debug; False when that handler logged it already."""
        process = self._supervisor if self._supervisor is not None else self._server
        return process.stop_told.claim()

    def check_connection(self) -> ConnSpec:
        return parse(self.connection)

    async def serve(self) -> None:
        """Serve until :meth:`stop` or a signal; returns, and may be called again (RuntimeError
        while it or :meth:`run` serves)."""
        self._check_idle()
        with self._metrics_here():
            await self._serve(None, None)

    async def _serve(self, inherited: Listener | None, started: Callable[[], None] | None) -> None:
        # What exists now (modules, the script, its data) lives as long as the process: keep
        # the garbage collector from scanning it again and again under load (and, with
        # --workers, from touching pages the forked workers share).
        gc.freeze()
        publish = self._worker_counts.publish
        publisher = None
        if publish is not None:  # a --workers process with metrics: its counts to the supervisor
            from .metrics import publishing

            publisher = asyncio.ensure_future(publishing(publish))
        try:
            await self._server.serve(inherited, started)
        finally:
            if publish is not None and publisher is not None:
                publisher.cancel()
                publish()
        self._tell_stopped()

    def _tell_stopped(self) -> None:
        # (after reloads, the name of the milter that serves last)
        log.info("%s stopped; verdicts: %s", escape(self._server.shared.settings.name), self.stats.summary())

    def run(self) -> None:
        """Blocking :meth:`serve` on a fresh event loop, or in ``workers`` processes (see workers.py)."""
        self._check_idle()
        settings = self.settings
        if settings.workers > 1:
            from .workers import Supervisor, run_workers

            if not self._server.stop_pending():
                self.hooks.flush(False)  # before the workers are forked (a stop ends its wait; FlushRefused)
            if self._server.stop_asked():  # (`milter stop`, a stop signal: commands/sigmask.py)
                self._tell_stopped()  # bound to nothing, as serve() returns then: no socket, no READY=1
                return
            supervisor = Supervisor(settings.workers, self.hooks, self._serve_worker)
            with self._metrics_of_workers(supervisor):
                self._stop_others, self._supervisor = supervisor.stop, supervisor
                if self._server.stop_asked():  # (one that came since: stopped at once, once bound)
                    supervisor.stop()
                try:
                    run_workers(settings, supervisor)
                finally:
                    self._stop_others = self._supervisor = None
                    self.stats.workers_unclean += len(supervisor.unclean)
            return
        with self._metrics_here():
            self._run_here(None, None)

    def _check_idle(self) -> None:
        """RuntimeError while this milter serves: before a second metrics endpoint or set of
        workers is made (the server refuses a second serve() too, under its lock)."""
        if self._server.serving or self._supervisor is not None:
            raise RuntimeError(already_serving(self.name))

    # ------------------------------------------------------------ metrics (metrics.py)

    @contextlib.contextmanager
    def _metrics_here(self) -> Iterator[None]:
        """With ``metrics`` set: count in this process while serving, and serve the counts."""
        if not self.settings.metrics:
            yield
            return
        meter = Meter()
        with self._exporting(lambda: list(meter.cells), lambda: 1):
            self.shared.meter = meter
            try:
                yield
            finally:
                self.shared.meter = None

    @contextlib.contextmanager
    def _metrics_of_workers(self, supervisor: "Supervisor") -> Iterator[None]:
        """With ``metrics`` set: each worker counts and publishes into its slot, this process serves the sum."""
        if not self.settings.metrics:
            yield
            return
        from .metrics import Block

        block = Block(supervisor.slots)
        supervisor.forked = lambda slot: self._count_in_worker(block, slot)
        supervisor.reaped = block.retire
        with self._exporting(block.totals, lambda: len(supervisor.children)):
            yield

    @contextlib.contextmanager
    def _exporting(self, totals: Callable[[], list[int]], alive: Callable[[], int]) -> Iterator[None]:
        """The HTTP endpoint, bound now: before the listening hook drops privileges."""
        from .metrics import Exporter

        self._exporter = Exporter(self.settings.metrics, totals, self.stats, alive)
        try:
            yield
        finally:
            self._exporter.close()
            self._exporter = None

    def _count_in_worker(self, block: "Block", slot: int | None) -> None:
        """In a worker just forked, given ``slot``: count here, publish into the slot (see _serve);
        without one (the supervisor logged why), count nothing. Set on the counts a reload hands
        on: the worker may serve a later generation's milter."""
        if self._exporter is not None:
            self._exporter.forget()  # the supervisor serves the metrics
            self._exporter = None
        if slot is None:
            return
        meter = self._worker_counts.meter = Meter()
        self._worker_counts.publish = lambda: block.publish(slot, meter.cells)

    def _run_here(self, inherited: Listener | None, started: Callable[[], None] | None) -> None:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(self._serve(inherited, started))

    def _serve_worker(self, listener: Listener, stop_all: Callable[[], None],
                      watch: Callable[[Callable[[], None]], None]) -> signal.Signals | None:
        """One --workers process: serve the socket the parent bound; stop() asks it to stop all.
        ``watch`` runs on the loop once it listens, given how to stop this worker alone. The stop
        signal that ended it, if one did (workers.py replaces a worker so stopped)."""
        self._stop_others, self._supervisor = stop_all, None
        if self._worker_counts.meter is not None:
            self.shared.meter = self._worker_counts.meter
        self._server.reloadable = False  # SIGUSR1 goes to the supervisor
        try:
            self._run_here(listener, lambda: watch(self._stop_alone))
        finally:
            self.hooks.flush(True)  # the worker ends with os._exit (workers.py)
        return self._server.stopped_by

    def _stop_alone(self) -> None:
        """Stop this process only (a worker whose supervisor died: its pid may be reused)."""
        self._stop_others = None
        self.stop()

    def reload(self, new: "Milter", gone: Callable[[], None] | None = None) -> None:
        """Hand serving over to ``new`` (another milter, with its own callbacks and hooks), while
        this one serves (from its loop, e.g. in ``Hooks.reload``; with workers, in their
        supervisor): the connections accepted from now on are ``new``'s, those open finish with
        this milter's callbacks within its ``grace`` (then they are closed), and ``gone`` is called
        once they are over. With workers, a set of ``new``'s is forked, and the old set stops
        accepting and finishes. ``new`` continues the verdict counts and is one generation later.

        ReloadError, with nothing changed, if ``new`` differs in a setting that only a restart can
        change (RESTART_ONLY), was stopped before it served, or this milter does not serve."""
        if not isinstance(new, Milter):  # (else an AttributeError on the settings it lacks)
            raise TypeError(f"reload: a pytclmilter.Milter expected; got {type(new).__name__}")
        changed = tuple(attr for attr in RESTART_ONLY if not _same_setting(attr, new.settings, self.settings))
        if changed:
            values = ", ".join(f"{attr} (serving {getattr(self.settings, attr)!r}, new {getattr(new.settings, attr)!r})"
                               for attr in changed)
            raise ReloadError(f"only a restart can change {values}", changed)
        if new._server.stop_asked():  # (its serve() would return at once: with workers, a stop of all)
            raise ReloadError("the new milter was stopped before it served (its script called `milter stop` "
                              "before `milter main`)")
        if not self.running and self._supervisor is None:
            raise ReloadError("the milter is not serving")
        if self._supervisor is not None:
            try:
                new.hooks.flush(False)  # before its workers are forked
            except FlushRefused as exc:
                raise ReloadError(str(exc)) from None
        new.stats = new.shared.stats = self.stats
        # --metrics goes on counting in the same cells: here, and in the workers forked for new
        new.shared.meter, new._worker_counts = self.shared.meter, self._worker_counts
        # (a reload must not start the fault lines' counts again)
        new.shared.faults, new.shared.proxied = self.shared.faults, self.shared.proxied
        new.shared.generation = self.shared.generation + 1
        new._stop_others, new._supervisor = self._stop_others, self._supervisor
        self.stats.generation = new.shared.generation
        self.stats.reloads_ok += 1
        done = gone or (lambda: None)
        if self._supervisor is not None:
            self._supervisor.reload(new._serve_worker, new.generation, done)
        else:
            new._server = self._server
            self._server.replace(new.shared, done)

    def abort(self) -> None:
        """Stop at once from the loop's thread, without grace (used by Tcl's ``exit``)."""
        self._server.abort()

    def remove_socket_file(self) -> None:
        """From any thread, as the process ends at once without unwinding (a Thread-package
        thread's `exit`): the unix socket's file goes, only if this process bound it (with
        --workers, the supervisor) and its name still holds that socket (listener.py)."""
        self._server.remove_socket_file()
        supervisor = self._supervisor
        if supervisor is not None and supervisor.listener is not None:
            supervisor.listener.remove_unix()

    def stop(self) -> None:
        """Stop serving: from any thread, from a callback, before or during :meth:`run`."""
        self._server.stop()
        if self._stop_others is not None:  # in --workers: stop the others too
            self._stop_others()


__all__ = ["Milter", "Settings", "Hooks", "EVENTS", "DEFAULT_CONNECTION", "ReloadError"]
