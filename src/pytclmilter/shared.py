"""What every connection of one milter shares: its settings, callbacks, hooks, counts, and the
end of a stop's grace (Shared), and the counts since start (Stats).

Below the engine (engine.py reads a ``Shared`` per callback, for its time limit) and the Tcl
side (tcl/limit.py reads the grace): compiled with the hot path (setup.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from .callbacks import Registry
from .hooks import Hooks
from .logline import escape
from .meter import Meter
from .repeats import Repeated, SameTrace
from .settings import Settings

log: Final = logging.getLogger("pytclmilter")

_monotonic: Final = time.monotonic  # compiled, `time.monotonic` is two look-ups per call
#: ``Shared.stop_by`` while serving: no stop's or reload's grace holds the callbacks.
FOREVER: Final = float("inf")
#: Seconds each callback gets once a stop's grace is over (the abort and close callbacks of the
#: sessions it cuts), whatever call_timeout says.
LAST_WORDS: Final = 0.05
#: Of the lines for faults that end a connection (a garbled or truncated packet, a reset), the
#: first FAULT_LINES of each kind in FAULT_WINDOW seconds are logged; the others are counted, and
#: the count told in one line: whoever can reach the socket can open thousands a second.
FAULT_LINES: Final = 10
FAULT_WINDOW: Final = 60.0


@dataclass
class Stats:
    """Verdict counts since start, for the log summary; reloads (with --workers, the supervisor's)."""

    verdicts: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    reloads_ok: int = 0
    reloads_failed: int = 0
    #: Reloads a stop signal abandoned while they loaded (commands/reloading.py): no failure of the script.
    reloads_abandoned: int = 0
    #: --workers: the workers whose stop was not clean (workers.Supervisor.unclean): ``run`` exits 1.
    workers_unclean: int = 0
    #: Of the script serving new connections: 1 at start, one more at every reload that loads.
    generation: int = 1

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.verdicts.items())]
        return ", ".join(parts + [f"callback errors={self.errors}"])


def _faults_told(faults: Repeated, kind: str, count: int) -> None:
    log.warning("%d more connection%s closed for the same reason, not logged one by one (the first %d in %g s "
                "are): %s", count, "" if count == 1 else "s", faults.whole, faults.seconds, escape(kind))


def _proxied_told(_proxied: Repeated, _label: str, count: int) -> None:
    """The count of a minute's PROXY-header connections, when none came after it to carry it
    (HAProxy's send-proxy fixed): else the last minute's were never told."""
    log.warning("%d more connection%s that began with a PROXY header closed with a protocol error since the last "
                "such line (said at most once a minute)", count, "" if count == 1 else "s")


class Shared:
    """What every connection of one milter reads: its settings, callbacks, hooks and counts.

    ``settings`` is replaced whole when an option changes (the value itself never changes), and
    each connection reads it here at every use: an option set while serving (``milter configure
    -onerror`` in a callback) applies at once, to the connections already open too.

    A reload makes a new one (another milter's) for the connections accepted from then on; those
    open keep theirs. ``generation`` tells them apart in the verdict lines.

    ``meter`` counts for ``--metrics`` (meter.py); None without, and each connection reads it once.
    ``traces``: the failed callbacks' traces logged lately, so that the same one is logged once.
    ``faults``: the lines of connections ended by a fault, by kind (:meth:`fault_due`); a reload
    hands it on, as the meter. ``proxied``: the line of those that began with a PROXY header.
    ``stop_by``: once a stop is under way, or a reload replaced this generation, when the grace of
    its open sessions ends (``time.monotonic()``): no callback runs past it (:meth:`call_limit`);
    infinity while serving. ``stop_why`` says, for a log line, which grace that is.
    """

    __slots__ = ("settings", "registry", "hooks", "stats", "generation", "meter", "traces", "faults", "proxied",
                 "stop_by", "stop_why")

    def __init__(self, settings: Settings, registry: Registry, hooks: Hooks, stats: Stats) -> None:
        self.settings = settings
        self.registry = registry
        self.hooks = hooks
        self.stats = stats
        self.generation = 1
        self.meter: Meter | None = None
        self.traces = SameTrace()
        self.faults = Repeated(FAULT_WINDOW, whole=FAULT_LINES, tell=_faults_told)
        self.proxied = Repeated(FAULT_WINDOW, tell=_proxied_told)  # the connections that began with a PROXY header
        self.stop_by = FOREVER
        self.stop_why = ""

    def fault_due(self, kind: str) -> bool:
        """Whether to log the line of a connection ended by a fault of ``kind`` (fault_kind of its
        message): not when FAULT_LINES of that kind were logged in the last FAULT_WINDOW seconds;
        it is counted then, told by repeats.tell_counts once the window is over (or by this method,
        when the next one comes first). A peer opening bad connections as fast as it can must not
        decide the log's size."""
        faults = self.faults
        missed = faults.due(kind)
        if missed:
            _faults_told(faults, kind, missed)
        return missed is not None

    def hold_to(self, by: float, why: str) -> None:
        """No callback runs past ``by`` (monotonic), the end of the grace ``why`` names ("the
        stop's 30 s grace"); an earlier end given before holds."""
        if by < self.stop_by:
            self.stop_by, self.stop_why = by, why

    def graced(self, started: float) -> bool:
        """Whether the end of a stop's or reload's grace, not call_timeout, is what limited a
        callback started at ``started``."""
        limit = self.settings.call_timeout
        return self.stop_by != FOREVER and not (limit and started + limit <= self.stop_by)

    def overrun(self, started: float, now: float, what: str) -> str:
        """Why a callback started at ``started`` was stopped ``now``, for its log line: ``what``
        (the limit's name), or the end of a stop's or reload's grace when that came first."""
        limit = self.settings.call_timeout
        if not self.graced(started):
            return f"stopped after {limit:g} s ({what})"
        allowed = f"{what} is {limit:g} s" if limit else f"no {what}"
        return f"stopped after {now - started:.1f} s: {self.stop_why} was over ({allowed})"

    def call_limit(self, now: float = -1.0) -> float:
        """How long a callback starting ``now`` (-1: now) may run (0: no limit): call_timeout, and
        once a stop is under way (or a reload replaced this generation) no longer than its grace,
        then LAST_WORDS (the abort and close callbacks of the sessions it cuts): an answer after
        that reaches no MTA, and a stuck callback would hold the stop by as much as call_timeout
        again, per callback. The clock is read only then: the per-event path reads none."""
        limit = self.settings.call_timeout
        if self.stop_by == FOREVER:
            return limit
        left = max(self.stop_by - (_monotonic() if now < 0 else now), LAST_WORDS)
        return min(limit, left) if limit else left
