"""The public Python face: :class:`Milter` holds the settings, the callbacks and the hooks, and runs the server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, TypeVar, overload

from .callbacks import EVENTS, Callback, Registry
from .connspec import ConnSpec, parse
from .engine import Shared, Stats
from .hooks import Hooks
from .logline import escape
from .meter import Meter
from .protocol.constants import MAX_DATA_SIZE
from .listener import Listener
from .server import MilterServer
from .settings import DEFAULT_CONNECTION, DEFAULT_TIMEOUT, Settings
from .status import Status, parse_status

if TYPE_CHECKING:
    from .metrics import Block, Exporter
    from .workers import Supervisor

log = logging.getLogger("pytclmilter")

T = TypeVar("T")


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
        change: dict[str, Any] = {self.name: value}
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
    ) -> None:
        settings = Settings(name=name, connection=connection, timeout=timeout, backlog=backlog,
                            on_error=self._status(on_error), grace=grace, socket_mode=socket_mode,
                            max_data_size=max_data_size, call_timeout=call_timeout)
        self.registry = Registry()
        self.stats = Stats()
        #: What the server and every connection read, the settings in force among it.
        self.shared = Shared(settings, self.registry, hooks or Hooks(), self.stats)
        self._server = MilterServer(self.shared)
        #: While run() supervises --workers: their supervisor's stop; in a worker: asking the
        #: parent to stop them all. stop() calls it.
        self._stop_others: Callable[[], None] | None = None
        self._exporter: Exporter | None = None  # while serving with `metrics`
        self._publish: Callable[[], None] | None = None  # in a --workers process with `metrics`

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
        status = parse_status(value)
        if status is None:
            raise ValueError(f"unknown status {value!r}")
        return status

    # ------------------------------------------------------------ callbacks

    def register(self, event: str, func: Callable[..., Any] | None = None) -> Any:
        """Add a callback to an event's chain; usable as ``@milter.register("eom")``."""
        Registry.check_event(event)
        if func is None:
            return lambda f: self.register(event, f)
        self.registry.add(event, Callback(func, "python", getattr(func, "__qualname__", repr(func))))
        return func

    def unregister(self, event: str, func: Callable[..., Any]) -> bool:
        return self.registry.remove(event, lambda c: c.func is func)

    # ------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        return self._server.listening is not None

    @property
    def listening(self) -> ConnSpec | None:
        """Where the server listens now (with the real port when 0 was asked for)."""
        return self._server.listening

    def check_connection(self) -> ConnSpec:
        return parse(self.connection)

    async def serve(self) -> None:
        """Serve until :meth:`stop` or a signal; returns, and may be called again."""
        with self._metrics_here():
            await self._serve(None, None)

    async def _serve(self, inherited: Listener | None, started: Callable[[], None] | None) -> None:
        # What exists now (modules, the script, its data) lives as long as the process: keep
        # the garbage collector from scanning it again and again under load (and, with
        # --workers, from touching pages the forked workers share).
        gc.freeze()
        publish = self._publish
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
        log.info("%s stopped; verdicts: %s", escape(self.name), self.stats.summary())

    def run(self) -> None:
        """Blocking :meth:`serve` on a fresh event loop, or in ``workers`` processes (see workers.py)."""
        settings = self.settings
        if settings.workers > 1:
            from .workers import Supervisor, run_workers

            supervisor = Supervisor(settings.workers, self.hooks, self._serve_worker)
            with self._metrics_of_workers(supervisor):
                self._stop_others = supervisor.stop
                try:
                    run_workers(settings, supervisor)
                finally:
                    self._stop_others = None
            return
        with self._metrics_here():
            self._run_here(None, None)

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

        block = Block(supervisor.count)
        supervisor.forked = lambda number: self._count_in_worker(block, number)
        supervisor.reaped = lambda number: block.retire(number - 1)
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

    def _count_in_worker(self, block: "Block", number: int) -> None:
        """In worker ``number``, just forked: count here, publish into its slot (see _serve)."""
        if self._exporter is not None:
            self._exporter.forget()  # the supervisor serves the metrics
            self._exporter = None
        meter = self.shared.meter = Meter()
        self._publish = lambda: block.publish(number - 1, meter.cells)

    def _run_here(self, inherited: Listener | None, started: Callable[[], None] | None) -> None:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(self._serve(inherited, started))

    def _serve_worker(self, listener: Listener, stop_all: Callable[[], None],
                      watch: Callable[[Callable[[], None]], None]) -> None:
        """One --workers process: serve the socket the parent bound; stop() asks it to stop all.
        ``watch`` runs on the loop once it listens, given how to stop this worker alone."""
        self._stop_others = stop_all
        self._run_here(listener, lambda: watch(self._stop_alone))

    def _stop_alone(self) -> None:
        """Stop this process only (a worker whose supervisor died: its pid may be reused)."""
        self._stop_others = None
        self.stop()

    def abort(self) -> None:
        """Stop at once from the loop's thread, without grace (used by Tcl's ``exit``)."""
        self._server.abort()

    def stop(self) -> None:
        """Stop serving: from any thread, from a callback, before or during :meth:`run`."""
        self._server.stop()
        if self._stop_others is not None:  # in --workers: stop the others too
            self._stop_others()


__all__ = ["Milter", "Settings", "Hooks", "EVENTS", "DEFAULT_CONNECTION"]
