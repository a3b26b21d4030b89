"""Failures that may repeat many times a second, logged once and then counted.

A failure nobody answers (a script's `after` handler failing every tick, a peer opening bad
connections, a store down for every recipient) would write the same line for each time, and a
trace of ten lines for each. This module owns how they are told once and counted: the line of a
lasting failure once in a while (:class:`Every`), a trace logged once and referred to after
(:class:`SameTrace`), the first lines at a place logged whole and the rest counted
(:class:`Repeated`), the counts told when a window ends or the process does
(:func:`tell_counts`, :func:`tell_counts_unlocked`), and what makes two failures one place
(:func:`fault_kind`, :func:`place_of`). It writes no line itself: each user logs (and escapes,
logline.py) its own, and a Repeated's ``tell`` says its counts.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from typing import Callable, Final

#: A number, or a ``repr`` of a str or bytes (quoted by ' or by ", escapes within): fault_kind.
_DATA: Final = re.compile(r"\b\d+\b|b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"")


class Every:
    """A log line for a failure that may repeat for as long as it lasts: due() is True at most
    once every ``seconds`` (the first time at once), so that it is logged once, not flooded."""

    __slots__ = ("seconds", "_last")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.seconds:
            return False
        self._last = now
        return True


class SameTrace:
    """The traces (errorInfo, tracebacks) logged in the last ``seconds``, by the place they show:
    a callback that fails for every message (its database is down) would log the same ten lines
    for each. Each failure keeps its own line; from the second, it refers to the first's trace.
    At most ``keep`` places are remembered, so a script failing in ever new ways cannot grow it,
    each by a digest: a place is a whole trace, which may quote data of any size (a chained
    exception's message, an errorInfo the script gave)."""

    __slots__ = ("seconds", "keep", "_logged")

    def __init__(self, seconds: float = 60.0, keep: int = 100) -> None:
        self.seconds = seconds
        self.keep = keep
        self._logged: dict[bytes, tuple[float, str]] = {}

    def logged_as(self, place: str, who: str) -> str | None:
        """Whose trace of ``place`` was logged in the last ``seconds`` ("conn#1's at 15:18:22");
        None: log it now, as ``who``'s."""
        key = hashlib.blake2b(place.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        now = time.monotonic()
        seen = self._logged.pop(key, None)
        if seen is not None and now - seen[0] < self.seconds:
            self._logged[key] = seen
            return seen[1]
        if len(self._logged) >= self.keep:
            self._logged = {k: v for k, v in self._logged.items() if now - v[0] < self.seconds}
            while len(self._logged) >= self.keep:
                del self._logged[next(iter(self._logged))]
        self._logged[key] = (now, f"{who}'s at {time.strftime('%H:%M:%S')}")
        return None


#: How a Repeated tells a count of failures not logged one by one: (the Repeated, the label of
#: their place, the count), called by :func:`tell_counts` when no failure came to carry it.
Tell = Callable[["Repeated", str, int], None]


class Repeated:
    """Failures nobody answers, which may recur many times a second (an `after` handler that
    fails and reschedules itself, a peer opening bad connections): the first ``whole`` at a place
    within ``seconds`` are logged whole, the next ones only counted, and the count is told by the
    first line after that or, once the ``seconds`` are over, by ``tell`` (:func:`tell_counts`):
    a failure that stops (HAProxy fixed) had its last window's count never told. So a failure
    that lasts makes ``whole`` lines and a count a window. At most ``keep`` places are
    remembered; the count of one forgotten to make room is told all the same, by the next
    :func:`tell_counts`, or at once when ``keep`` labels wait. Thread-safe: a scrape's thread counts, the event loop's tells."""

    __slots__ = ("seconds", "keep", "whole", "clock", "tell", "_places", "_forgotten")

    def __init__(self, seconds: float = 60.0, keep: int = 100, clock: Callable[[], float] = time.monotonic,
                 whole: int = 1, tell: Tell | None = None) -> None:
        self.seconds = seconds
        self.keep = keep
        self.whole = whole
        self.clock = clock
        self.tell = tell
        #: place -> (when its window started, lines logged in it, how many counted since, their label)
        self._places: dict[str, tuple[float, int, int, str]] = {}
        #: The counts of places forgotten to make room, by label, to be told (overdue).
        self._forgotten: dict[str, int] = {}

    def due(self, place: str, label: str = "") -> int | None:
        """None: count this one, log nothing; else log it, saying how many were not logged since
        the last line of ``place`` (0: log it whole, as the first). Its line is named by its
        message, not by a time: a time taken here may differ from the line's own by a second.
        ``label``: what ``tell`` calls the place (default: the place)."""
        missed = self._due(place, label)
        if len(self._forgotten) >= self.keep:  # (read unlocked: at worst told one due later)
            self._tell_forgotten()
        return missed

    def _due(self, place: str, label: str) -> int | None:
        with _LOCK:
            now = self.clock()
            seen = self._places.pop(place, None)
            if seen is not None and now - seen[0] < self.seconds:
                start, logged, counted, _ = seen
                if logged < self.whole and not counted:
                    self._places[place] = (start, logged + 1, 0, label)
                    return 0
                self._places[place] = (start, logged, counted + 1, label)
                if self.tell is not None:
                    _untold.add(self)
                return None
            self._make_room(now)
            self._places[place] = (now, 1, 0, label)
            return 0 if seen is None else seen[2]

    def forget(self, place: str) -> None:
        """``place`` was due but not logged after all (another bound held it back): its next
        failure is its first again, not a repeat of a line that never came."""
        with _LOCK:
            self._places.pop(place, None)

    def overdue(self, ended_only: bool = True) -> list[tuple[str, int]]:
        """The places with failures counted and not told, whose window is over (all of them if
        not ``ended_only``: at the end), by label, with their counts, which are told from now on:
        a summary line each, for a failure that may not come again to carry its count."""
        with _LOCK:
            now = self.clock()
            told = self._take_forgotten()
            for place, (start, logged, counted, label) in list(self._places.items()):
                if counted and (not ended_only or now - start >= self.seconds):
                    told.append((label or place, counted))
                    self._places[place] = (start, logged, 0, label)
            if not any(counted for _, _, counted, _ in self._places.values()):
                _untold.discard(self)
            return told

    def _take_forgotten(self) -> list[tuple[str, int]]:
        told = list(self._forgotten.items())
        self._forgotten.clear()
        return told

    def _tell_forgotten(self) -> None:
        """The counts of ``keep`` labels forgotten to make room, told now rather than by the next
        tell_counts: distinct labels that each recur (a script's error quoting a sender) grew
        them one a label, without bound while nothing called it (a callback looping past the
        sweep). Told outside the lock, as tell_counts tells."""
        with _LOCK:
            told = self._take_forgotten()
        if self.tell is not None:
            for label, count in told:
                self.tell(self, label, count)

    def _make_room(self, now: float) -> None:
        if len(self._places) >= self.keep:
            places = self._places
            self._places = {k: v for k, v in places.items() if now - v[0] < self.seconds}
            for place, seen in places.items():
                if place not in self._places:
                    self._forget_count(place, seen)
            while len(self._places) >= self.keep:
                place = next(iter(self._places))
                self._forget_count(place, self._places.pop(place))

    def _forget_count(self, place: str, seen: tuple[float, int, int, str]) -> None:
        """Keep the count of a place forgotten to make room, which its window's end would tell:
        dropped with it, a script asking 33 macro names bare lost the first one's. At most one
        entry per label, each for a line logged whole, and all told at the next tell_counts."""
        counted, label = seen[2], seen[3] or place
        if counted and self.tell is not None:
            self._forgotten[label] = self._forgotten.get(label, 0) + counted
            _untold.add(self)


#: Re-entrant: the collector may run a __del__ that raises while this thread holds it (any
#: allocation can start a collection), and run's unraisable hook counts that failure here too
#: (commands/run.py); with a plain Lock the thread waited on itself for ever. A nested count
#: may then be overwritten by the one it interrupted: a count off by one, not a hang.
_LOCK: Final = threading.RLock()
#: The Repeated with a ``tell`` that hold counts not told yet: only those, so that one dropped
#: (a reload's interpreter) is forgotten here once its counts are told.
_untold: Final[set[Repeated]] = set()


def _forked() -> None:
    """In a child just forked (a --workers worker): the counts so far are the parent's, which
    tells them; told here too, each would be told once more by every worker (a supervisor's
    count of worker deaths, by the workers it then started)."""
    for repeated in _untold:
        repeated._places = {place: (start, logged, 0, label)
                            for place, (start, logged, _, label) in repeated._places.items()}
        repeated._forgotten = {}
    _untold.clear()
    _LOCK.release()


# A worker forked (--workers) while the metrics' thread held the lock would find it held forever,
# and its event loop would hang at its first fault: the fork waits for it, as logging's locks.
os.register_at_fork(before=_LOCK.acquire, after_in_parent=_LOCK.release, after_in_child=_forked)


def tell_counts(ended_only: bool = True) -> None:
    """Tell the counts of every Repeated whose window is over (all, if not ``ended_only``: at a
    stop): the server's sweep calls it every second or so, the metrics' thread too (it is the
    only one ticking in a --workers supervisor), so a burst's count is told even if the failure
    never comes again, once a window at most."""
    with _LOCK:
        pending = list(_untold)
    for repeated in pending:
        tell = repeated.tell
        for label, count in repeated.overdue(ended_only):
            if tell is not None:
                tell(repeated, label, count)


def tell_counts_unlocked() -> None:
    """Every count not told yet, told without taking the lock: the process ends at once from
    another thread (overdue.py) while the serving thread, held, may hold it for ever (a __del__
    run under it). A snapshot: a count changing meanwhile may be told one short. The counts of
    places forgotten to make room (Repeated._forgotten) too: a stop tells them as well."""
    for _ in range(3):
        try:  # (a set or dict another thread changes while it is read: read again)
            counts = [(repeated, label, counted) for repeated in list(_untold)
                      for label, counted in list(repeated._forgotten.items())]
            counts += [(repeated, label or place, counted) for repeated in list(_untold)
                       for place, (_, _, counted, label) in list(repeated._places.items()) if counted]
            break
        except RuntimeError:
            continue
    else:
        return
    for repeated, label, count in counts:
        if repeated.tell is not None:
            repeated.tell(repeated, label, count)


def fault_kind(message: str) -> str:
    """What faults of one kind share: ``message`` with its numbers and quoted data (how an error
    of the protocol gives the MTA's bytes: ``repr``) as N and '...', so that a peer varying its
    bytes still makes one kind, and a message's own words tell the kinds apart."""
    return _DATA.sub(_placeholder, message)


def _placeholder(found: re.Match[str]) -> str:
    return "N" if found.group().isdigit() else "'...'"


def place_of(trace: str, message: str) -> str:
    """What two failures' traces share when they fail at the same place: the trace without the
    error's message (which quotes data) and without its last frame (a Tcl callback's call with
    its arguments, the context command's name among them) or line (a traceback's exception)."""
    trace = trace.replace(message, "") if message else trace
    cut = trace.rfind("\n    invoked from within\n")
    return trace[:cut if cut >= 0 else max(trace.rfind("\n"), 0)]
