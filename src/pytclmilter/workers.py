"""``--workers N``: N processes serving one listening socket, supervised by the parent.

The parent binds the socket (and drops privileges) at ``milter main``, then
forks the workers from that very moment, so each starts with the script's
state as it stood when ``milter main`` was called: its own interpreter, its
own Tcl globals, the same callbacks. A worker that dies is replaced and the
death logged; a worker that exits with status 0 asked to stop (``milter
stop``), which stops all. SIGTERM, SIGINT and SIGHUP to the parent stop all
gracefully; then ``milter main`` returns in the parent and the script goes on.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Callable

from .connspec import parse
from .hooks import Hooks
from .listener import Listener, bind
from .settings import Settings

log = logging.getLogger("pytclmilter")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_RESPAWN_WINDOW = 10.0  # seconds
_RESPAWN_BURST = 5  # deaths within the window before respawning slows down

#: Serves the inherited socket in a worker process until stopped; the callable given stops all
#: workers (the worker's ``milter stop``).
Serve = Callable[[Listener, Callable[[], None]], None]


def run_workers(settings: Settings, supervisor: "Supervisor") -> None:
    """Bind the socket, announce it (hooks.listening, once, here), and supervise the workers."""
    listener = bind(parse(settings.connection), settings.backlog, settings.socket_mode)
    try:
        supervisor.hooks.listening(listener.spec)
        supervisor.run(listener)
    finally:
        listener.remove_unix()
        listener.sock.close()


class Supervisor:
    """Forks ``count`` workers running ``serve`` and keeps them running; :meth:`stop` stops all."""

    listener: Listener  # the socket they serve, given to run()

    def __init__(self, count: int, hooks: Hooks, serve: Serve) -> None:
        self.hooks = hooks
        self.serve = serve
        self.count = count
        self.children: dict[int, int] = {}  # pid -> worker number
        self.stopping = False
        self.deaths: list[float] = []

    def run(self, listener: Listener) -> None:
        self.listener = listener
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            for number in range(1, self.count + 1):
                self._spawn(number)
            log.info("%d workers serving %s", self.count, self.listener.spec)
            while self.children:
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    break
                if pid in self.children:
                    self._reaped(pid, self.children.pop(pid), status)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("all workers stopped")

    def _reaped(self, pid: int, number: int, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            return
        if code == 0:
            log.info("worker %d (pid %d) stopped the milter: stopping all workers", number, pid)
            self.stop()
            return
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        log.error("worker %d (pid %d) died (%s); starting a new one", number, pid, how)
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < _RESPAWN_WINDOW] + [now]
        if len(self.deaths) > _RESPAWN_BURST:
            time.sleep(1.0)  # a worker that dies at once must not turn into a fork loop
        if not self.stopping:
            self._spawn(number)

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("received %s: stopping %d workers", signal.Signals(signum).name, len(self.children))
        self.hooks.signal(signal.Signals(signum))
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _spawn(self, number: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self.children[pid] = number
            return
        self._worker(number)  # never returns

    def _worker(self, number: int) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        parent = os.getppid()
        code = 0
        try:
            log.debug("worker %d (pid %d) serving", number, os.getpid())
            listener = Listener(self.listener.sock, self.listener.spec)  # the parent removes the file
            self.serve(listener, lambda: os.kill(parent, signal.SIGTERM))
        except BaseException:  # noqa: BLE001 - a worker must end here, whatever happened
            log.exception("worker %d failed", number)
            code = 70
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
