"""The last resort of a stop: serving that its own thread cannot end, ended from another.

The stop's grace holds every callback (server.py, tcl/limit.py, limits.py), but only where
Python or Tcl get a turn: a Tcl command in C (``exec sleep 600``, a blocking ``gets``), a
Python call in C, a reload's load held there, or Tcl code that nothing limits, keep the serving
thread for as long as they take, and the process with it (until systemd's SIGKILL, which
leaves the socket file and the pid file behind and logs nothing). Nor does Python run the stop
signal's handler meanwhile: it runs handlers in that thread alone, between its statements.

What does run is CPython's C-level handler, which writes the signal's number to the wakeup fd,
the loop's. While serving, the wakeup fd is a SignalPipe (signalpipe.py) instead: a thread reads it and
passes every byte on to the loop's, which sees the signals as before, and a stop signal starts
the clock (and any signal is told at once: ``seen``). When the grace and :data:`MARGIN` are over and the loop does not turn within
:data:`PATIENCE` (it turns between the sessions it cuts, however many), the serving thread is
held: one line names what holds it, ``ending`` removes what must not outlive the process, and
the process exits with :data:`EXIT`, without waiting for it.

Python keeps one wakeup fd per process, and code that sets another while serving (asyncio's
``loop.add_signal_handler`` sets the loop's; uvloop's leaves it) silently switched the relay, and
the deadline with it, off: the loop takes it back every :data:`KEEP_EVERY` seconds, and says so once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Callable, Final

from .repeats import tell_counts_unlocked
from .signalpipe import SignalPipe

log: Final = logging.getLogger("pytclmilter")

#: After the grace: the cut of the sessions still open (UNWIND for async callbacks, a beat).
MARGIN: Final = 3.0
#: How long the loop may take to turn once the margin is over, before the thread counts as held.
PATIENCE: Final = 1.0
#: The exit status then: a stop, but not a clean one (a service manager shows it failed).
EXIT: Final = 1
#: Seconds between the loop's checks that the wakeup fd is still the relay's (:meth:`StopDeadline._keep`).
KEEP_EVERY: Final = 1.0


class StopDeadline:
    """Ends the process when a stop's grace is long over and the serving thread is still held."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stops: tuple[signal.Signals, ...],
                 grace: Callable[[], float], held_by: Callable[[], str], ending: Callable[[], None],
                 seen: Callable[[int], None], replaced: int = 0) -> None:
        self._loop = loop
        self._replaced = replaced  # a --workers worker's: the signal of a reload that replaced it, not a stop
        self._seen = seen  # each signal, in the relay's thread: at once, however held the loop is
        self._stops = {int(sig) for sig in stops}
        self._grace = grace  # read at the signal: a reload may have changed it
        self._held_by = held_by
        self._ending = ending
        self._over = threading.Event()
        self._clock: threading.Thread | None = None
        self._pipe = SignalPipe(self._pass_on, "stop-deadline")
        self._pipe.start()
        self._told: set[bool] = set()  # _taken_back's lines, once each: by the loop, by another
        self._keeper = loop.call_later(KEEP_EVERY, self._keep)

    def end(self) -> None:
        """Serving is over (from the thread that serves, before the loop's handlers go)."""
        self._keeper.cancel()
        self._over.set()
        self._pipe.close()

    def _keep(self) -> None:
        """On the loop, every KEEP_EVERY s: the wakeup fd the relay's again. Code that set
        another while serving (asyncio's add_signal_handler, a hook's set_wakeup_fd) switched
        the deadline off: the stop signals no longer reached the relay, only the loop."""
        found = self._pipe.reclaim()
        if found is not None:
            self._taken_back(found)
        self._keeper = self._loop.call_later(KEEP_EVERY, self._keep)

    def _taken_back(self, found: int) -> None:
        by_the_loop = found == self._pipe.previous
        if by_the_loop in self._told:
            return
        self._told.add(by_the_loop)
        if by_the_loop:  # (the loop gets every signal through the relay as before: nothing lost)
            log.info("the signal wakeup fd was set to the event loop's while serving (a --python file's "
                     "loop.add_signal_handler): taken back, so that a stop held past its grace still ends the "
                     "process; the loop gets the signals as before")
            return
        log.warning("the signal wakeup fd was set to %s while serving (a --python file's signal.set_wakeup_fd): "
                    "taken back, so that a stop held past its grace still ends the process; the signals go to "
                    "the event loop, not to that fd", "none (-1)" if found < 0 else f"fd {found}")

    def _pass_on(self, data: bytes) -> None:
        """The signals, passed on to the loop's wakeup fd (it sees them as before); a stop's
        starts the clock."""
        if self._pipe.previous >= 0:
            try:
                os.write(self._pipe.previous, data)
            except OSError:  # full, or gone: as CPython does, the loop misses it
                pass
        for number in data:
            self._seen(number)
        if self._clock is None and any(number in self._stops for number in data):
            first = next(number for number in data if number in self._stops)
            self._clock = threading.Thread(target=self._watch, args=(time.monotonic(), first),
                                           name="stop-deadline-clock", daemon=True)
            self._clock.start()

    def _watch(self, since: float, number: int) -> None:
        grace = self._grace()
        # (a grace of inf, or past the 292 years a thread's wait takes, is for ever: OverflowError)
        if self._over.wait(min(grace + MARGIN, threading.TIMEOUT_MAX)):
            return
        while self._turns():  # the loop still works through the stop: let it
            if self._over.wait(PATIENCE):
                return
        if not self._over.is_set():
            self._give_up(since, grace, number == self._replaced)

    def _turns(self) -> bool:
        """Whether the loop turns within PATIENCE."""
        turned = threading.Event()
        try:
            self._loop.call_soon_threadsafe(turned.set)
        except RuntimeError:  # closed: serving is over (end() came first)
            return False
        return turned.wait(PATIENCE)

    def _give_up(self, since: float, grace: float, replaced: bool) -> None:
        # (A worker a reload replaced is not stopping: "stopping" and "the stop signal" misled.)
        ending, signalled = ("replaced by a reload", "the reload") if replaced else ("stopping", "the stop signal")
        # The failures counted and not told (a failing `after` loop's): the loop that tells them
        # as it stops never will. Without the lock, which the held thread may hold.
        tell_counts_unlocked()
        log.error("%s: %s still held the milter %.1f s after %s, past the %g s grace, in code the grace cannot "
                  "stop (a command in C such as exec or a blocking read, or code under -calltimeout 0): exiting "
                  "without it, exit status %d", ending, self._held_by(), time.monotonic() - since, signalled, grace,
                  EXIT)
        try:
            self._ending()
        finally:
            logging.shutdown()
            os._exit(EXIT)
