"""The public Python face: :class:`Milter` holds the configuration and the callbacks and runs the server."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .callbacks import EVENTS, Callback, Registry
from .connspec import ConnSpec, parse
from .context import Context
from .logline import escape
from .protocol.constants import MAX_DATA_SIZE
from .listener import Listener
from .server import MilterServer
from .status import Status, parse_status

log = logging.getLogger("pytclmilter")

DEFAULT_CONNECTION = "unix:/var/run/tclmilter.sock"


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
DEFAULT_TIMEOUT = 7210


@dataclass
class Hooks:
    """Points where a host (the Tcl bridge, the CLI) joins in; all optional."""

    context_created: Callable[[Context], None] = lambda ctx: None
    context_closed: Callable[[Context], None] = lambda ctx: None
    listening: Callable[[ConnSpec], None] = lambda spec: None
    signal: Callable[[signal.Signals], None] = lambda sig: None
    tick: Callable[[], None] | None = None


@dataclass
class Stats:
    """Verdict counts since start, for the log summary."""

    verdicts: Counter[str] = field(default_factory=Counter)
    errors: int = 0

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.verdicts.items())]
        return ", ".join(parts + [f"callback errors={self.errors}"])


class Milter:
    """A mail filter: register callbacks, then :meth:`run`.

    >>> m = Milter(connection="inet:8899@127.0.0.1")
    >>> @m.register("envfrom")
    ... def envfrom(ctx, args):
    ...     return REJECT if args[0] == "<spammer@example.com>" else CONTINUE
    """

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
    ) -> None:
        self.name = name
        self.connection = connection
        self.timeout = timeout
        self.backlog = backlog
        self.on_error = self._status(on_error)
        self.grace = grace
        self.socket_mode = socket_mode
        #: Owner (uid, gid; -1 keeps one) the unix socket's file has from the moment it appears.
        self.socket_owner: tuple[int, int] | None = None
        self.max_data_size = max_data_size
        #: A callback running longer than this is stopped and answered with on_error (0: no limit).
        self.call_timeout = call_timeout
        self.tick_interval = 0.02
        #: Serve this already-bound socket instead of binding (set in each --workers process).
        self.inherited_listener: Listener | None = None
        #: Processes serving one socket; 1 serves in this process (see workers.py).
        self.workers = 1
        self.stop_hook: Callable[[], None] | None = None
        self.registry = Registry()
        self.hooks = Hooks()
        self.stats = Stats()
        self._server = MilterServer(self)

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
        # What exists now (modules, the script, its data) lives as long as the process: keep
        # the garbage collector from scanning it again and again under load (and, with
        # --workers, from touching pages the forked workers share).
        gc.freeze()
        await self._server.serve()
        log.info("%s stopped; verdicts: %s", escape(self.name), self.stats.summary())

    def run(self) -> None:
        """Blocking :meth:`serve` on a fresh event loop, or in ``workers`` processes (see workers.py)."""
        if self.workers > 1:
            from .workers import run_workers

            run_workers(self, self.workers)
            return
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(self.serve())

    def abort(self) -> None:
        """Stop at once from the loop's thread, without grace (used by Tcl's ``exit``)."""
        self._server.abort()

    def stop(self) -> None:
        """Stop serving: from any thread, from a callback, before or during :meth:`run`."""
        self._server.stop()
        if self.stop_hook is not None:  # in --workers: stop the others too
            self.stop_hook()


__all__ = ["Milter", "EVENTS", "DEFAULT_CONNECTION"]
