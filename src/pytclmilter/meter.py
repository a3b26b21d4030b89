"""What ``--metrics`` counts, as the engine counts it: plain integers in a list, one per cell.

Each count is one cell of a fixed layout (the offsets below), and a :class:`Meter` adds to the
cells of its process: a list item incremented, no lock, no system call, nothing sent anywhere
(a memoryview on shared memory cost four times as much per count: docs/benchmarks.md). The
exporter (metrics.py) reads the list when scraped; with ``--workers`` each worker copies its
list into its slot of a shared mapping once a second, and the supervisor's exporter sums the
slots. Without ``--metrics`` there is no meter, and the engine's only cost is one ``is None``
test per place.

Compiled with the hot path (setup.py): the engine calls a meter per callback and per verdict.
"""

from __future__ import annotations

from typing import Callable, Final

from .callbacks import EVENTS
from .protocol.events import (
    AddHeader, AddRecipient, ChangeFrom, ChangeHeader, DeleteRecipient, InsertHeader, Quarantine, ReplaceBody,
)

# The tuples are typed tuple[X, ...]: mypyc makes a fixed-length Final tuple a native constant,
# and `len()` of one in a later Final read it before module init had set it.

#: The callback duration histogram's upper bounds, seconds: a Tcl callback takes tens of
#: microseconds, one that looks something up on the network milliseconds, and the default
#: call timeout is 60 s.
BOUNDS: Final[tuple[float, ...]] = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LANGUAGES: Final[tuple[str, ...]] = ("python", "tcl")
#: What a verdict line can say (status names, as logged).
VERDICTS: Final[tuple[str, ...]] = ("accept", "reject", "tempfail", "discard", "continue", "skip", "noreply")
#: Where a verdict is given: an event with callbacks, or negotiate.
STAGES: Final[tuple[str, ...]] = tuple(e for e in EVENTS if e not in ("abort", "close"))
#: Why a connection ended; the engine's reasons, an "error: ..." as error, anything else other.
REASONS: Final[tuple[str, ...]] = ("eof", "quit", "timeout", "protocol error", "negotiation", "milter stopped",
                                   "milter reloaded", "error", "other")
#: Modifications, by the name of the context command that asks for them.
ACTIONS: Final[tuple[str, ...]] = ("addheader", "chgheader", "insheader", "addrcpt", "delrcpt", "chgfrom", "replacebody", "quarantine")

_NB: Final = len(BOUNDS) + 1  # buckets, +Inf included
_NE: Final = len(EVENTS) * len(LANGUAGES)  # (event, language) pairs
_NM: Final = len(VERDICTS) * len(STAGES) * 2  # (verdict, stage, dry run)

# The layout: cell offsets. Only OPEN is a gauge; every other cell counts up.
OPEN: Final = 0
TOTAL: Final = 1
PROTOCOL_ERRORS: Final = 2
REFUSED: Final = 3  # closed at once at the connection limit (accept.py)
CLOSED: Final = 4
MESSAGES: Final = CLOSED + len(REASONS)
ERRORS: Final = MESSAGES + _NM
OVERRUNS: Final = ERRORS + _NE
SUMS: Final = OVERRUNS + _NE  # nanoseconds per (event, language)
BUCKETS: Final = SUMS + _NE  # _NB per (event, language), each counting its own range (not cumulative)
MODIFICATIONS: Final = BUCKETS + _NE * _NB  # per (action, dry run)
CELLS: Final = MODIFICATIONS + len(ACTIONS) * 2

_EVENT: Final = {e: i for i, e in enumerate(EVENTS)}
_VERDICT: Final = {v: i for i, v in enumerate(VERDICTS)}
_STAGE: Final = {s: i for i, s in enumerate(STAGES)}
_REASON: Final = {r: i for i, r in enumerate(REASONS)}
_ACTION: Final[dict[type, int]] = {
    t: ACTIONS.index(n) for t, n in ((AddHeader, "addheader"), (ChangeHeader, "chgheader"), (InsertHeader, "insheader"),
                                     (AddRecipient, "addrcpt"), (DeleteRecipient, "delrcpt"), (ChangeFrom, "chgfrom"),
                                     (ReplaceBody, "replacebody"), (Quarantine, "quarantine"))
}


def pair(event: str, origin: str) -> int:
    """Index of (event, language); a callback's origin is "python" or "tcl"."""
    return _EVENT[event] * 2 + (1 if origin == "tcl" else 0)


def message_cell(verdict: str, stage: str, dry: bool) -> int:
    """``stage`` as the verdict line gives it: "header (answered at eoh)" counts as header."""
    s = _STAGE.get(stage)
    if s is None:
        s = _STAGE.get(stage.partition(" ")[0], 0)
    return MESSAGES + (_VERDICT.get(verdict, 0) * len(STAGES) + s) * 2 + (1 if dry else 0)


def reason_index(reason: str) -> int:
    r = _REASON.get(reason)
    if r is None:
        r = _REASON["error"] if reason.startswith("error") else _REASON["other"]
    return r


def bucket(seconds: float) -> int:
    """The histogram bucket of a duration: the first bound not below it (most callbacks: the first two)."""
    i = 0
    for bound in BOUNDS:
        if seconds <= bound:
            return i
        i += 1
    return i


class Meter:
    """Adds to one process's cells."""

    def __init__(self) -> None:
        self.cells: list[int] = [0] * CELLS

    def opened(self) -> None:
        cells = self.cells
        cells[OPEN] += 1
        cells[TOTAL] += 1

    def closed(self, reason: str) -> None:
        cells = self.cells
        cells[OPEN] -= 1
        cells[CLOSED + reason_index(reason)] += 1

    def protocol_error(self) -> None:
        self.cells[PROTOCOL_ERRORS] += 1

    def refused(self) -> None:
        self.cells[REFUSED] += 1

    def verdict(self, verdict: str, stage: str, dry: bool) -> None:
        self.cells[message_cell(verdict, stage, dry)] += 1

    def callback(self, event: str, origin: str, seconds: float) -> None:
        """A callback came back (or failed) after ``seconds``."""
        cells = self.cells
        p = pair(event, origin)
        cells[BUCKETS + p * _NB + bucket(seconds)] += 1
        cells[SUMS + p] += int(seconds * 1e9)

    def failed(self, event: str, origin: str) -> None:
        self.cells[ERRORS + pair(event, origin)] += 1

    def overran(self, event: str, origin: str) -> None:
        """The callback ran past its time limit (stopped by it, or back late from code it cannot stop)."""
        self.cells[OVERRUNS + pair(event, origin)] += 1

    def modification(self, action: object, dry: bool) -> None:
        """A modification sent at end of message (or, dry run, one that would have been)."""
        self.cells[MODIFICATIONS + _ACTION[type(action)] * 2 + (1 if dry else 0)] += 1


class WorkerCounts:
    """A --workers process's meter and how it publishes its cells (metrics.Block), set once it is
    forked; every generation of the milter holds the same one, so a reload's workers count too."""

    __slots__ = ("meter", "publish")

    def __init__(self) -> None:
        self.meter: Meter | None = None
        self.publish: Callable[[], None] | None = None
