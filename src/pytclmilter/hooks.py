"""Where a host (the Tcl bridge, the command line, a Python program) joins in a milter's run.

Given once, to ``Milter(hooks=...)``, and immutable: the server, the connections and the
worker processes call them, none replaces them.
"""

from __future__ import annotations

import logging
import signal
import traceback
from dataclasses import dataclass
from typing import Callable

from .connspec import ConnSpec
from .context import Context
from .logline import escape, escape_lines, failure_text, said

log = logging.getLogger("pytclmilter")


def _ignore(*args: object) -> None:
    """The hook nobody asked for."""


class FlushRefused(Exception):
    """A ``flush`` hook before a fork (False) could not write out what the program buffers within
    its bound: no worker is forked (each would write the buffer again). The message says what
    is left and what to do; `milter main` fails with it, a reload is refused with it."""


@dataclass(frozen=True)
class Hooks:
    """All optional."""

    #: A connection's context exists: before its first callback.
    context_created: Callable[[Context], None] = _ignore
    #: The connection is over: after its last callback.
    context_closed: Callable[[Context], None] = _ignore
    #: The socket is bound (with the real port when 0 was asked for): once per serve, while
    #: still root under `pytclmilter run`; with workers, once in the parent.
    listening: Callable[[ConnSpec], None] = _ignore
    #: SIGTERM, SIGINT or SIGHUP arrived; the milter stops after the hook returns.
    signal: Callable[[signal.Signals], None] = _ignore
    #: SIGUSR1 arrived (with workers: at their supervisor): load the filter anew and hand it to
    #: :meth:`Milter.reload <pytclmilter.milter.Milter.reload>`. Runs on the serving loop (with
    #: workers: in the supervisor). Without it the milter leaves SIGUSR1 alone.
    reload: Callable[[], None] | None = None
    #: The process forks workers (False), or a worker that served ends without unwinding (True):
    #: write out what the host buffers, as stdio's buffers are flushed then, so that nothing is
    #: written by parent and child alike, or never. Each waits a bounded time for a reader (and
    #: False stops waiting once a stop is asked); False raises FlushRefused if some is left.
    flush: Callable[[bool], None] = _ignore
    #: The process ends at once, from another thread: a stop's grace is long over and the serving
    #: thread is held in code no limit stops (overdue.py). Remove what must not outlive it (a pid
    #: file); run no Tcl nor anything the held thread may hold. Not in a --workers worker.
    exiting: Callable[[], None] = _ignore
    #: Then, in any process (a --workers worker too): write what the host holds for stdout and
    #: stderr (the lines a script began), waiting for no reader and running no Tcl.
    write_held: Callable[[], None] = _ignore
    #: Called every ``tick_interval`` seconds while serving, if given.
    tick: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        """A hook that is not callable is refused when given, naming it: it failed when called,
        at run() (listening: its traceback), at every connection, or never (tick). (Quoted by
        said(): a value whose repr() raises must not raise that instead.)"""
        for name, spec in self.__dataclass_fields__.items():
            value = getattr(self, name)
            if not callable(value) and not (value is None and spec.default is None):
                raise TypeError(f"Hooks {name} must be callable (or left out), not {said(value, repr)}")


def forget_early_reload() -> None:
    """Take a SIGUSR1 that came while the milter was not serving yet (blocked until then, so it
    waits): there was nothing to reload, and the script just loaded is the one on disk. Run
    before SIGUSR1 is unblocked or waited for; it would otherwise reload at once."""
    if signal.SIGUSR1 in signal.sigpending():
        signal.sigtimedwait((signal.SIGUSR1,), 0)
        log.warning("received SIGUSR1 before the milter served: nothing to reload yet; ignored")


def signalled(hooks: Hooks, sig: signal.Signals) -> None:
    """Call ``hooks.signal``; one that raises (``sys.exit()`` too) is logged, and the caller stops
    the milter all the same. Left to propagate, it swallowed the SIGTERM (the loop logged it and
    the milter served on, until systemd's SIGKILL) or, with workers, ended run() in a traceback."""
    try:
        hooks.signal(sig)
    except BaseException as exc:  # noqa: BLE001 - a host's bug, whatever its class
        log.error("the signal hook %s failed (%s); stopping all the same:\n%s",
                  escape(getattr(hooks.signal, "__qualname__", repr(hooks.signal))),
                  escape(failure_text(exc)), escape_lines("".join(traceback.format_exception(exc)).rstrip()))
