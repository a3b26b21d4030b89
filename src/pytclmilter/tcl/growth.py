"""What a script can grow without bound and nothing else limits: its pending `after` events, its
threads of the Thread package and its thread pools, told to the admin once they pass a count no filter needs.

A script that runs `after 3600000 {...}` or `thread::create` at every connection grows them for
as long as it serves (304 threads after 300 connections), until memory or descriptors run out,
with no word until then. A cap would be a policy over the script's own business (a legacy
script may keep a few of each), so none is imposed: the admin is told, early and once.

Counted on the host's event tick (TclHost.service_events), at most every :data:`CHECK_EVERY`
seconds and only while the script has anything pending there: no cost per callback or message.
Told with one warning when a count reaches its threshold, then again only when it reaches twice
the count last told: a few lines in all (1 000, 2 000, 4 000 ... `after` events), never a flood.
The `after` events are the host's own, the threads the process's: told once for the process, not
again by each generation a reload makes.
The thresholds are module attributes, read at each count (a test's `--python` setup lowers them).
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar, Final

log: Final = logging.getLogger("pytclmilter")

#: Seconds between two counts: `after info` lists every pending event, O(n) at each count.
CHECK_EVERY = 5.0
#: Pending `after` events of the script's interpreter first told: a filter that sets a timer per
#: message (a delayed answer, a cache entry's expiry) has as many as its messages in flight, up to
#: the 1 000 connections it serves at once by default (--max-connections); past that, hardly one
#: that does not leak. Each holds its script and id (about 300 bytes with a short script).
AFTER_EVENTS = 1000
#: Threads of the Thread package besides the script's own first told: each holds an interpreter,
#: a stack (8 MiB of address space on Linux) and descriptors; a script's pool rarely needs 64.
THREADS = 64
#: Thread pools (`tpool::create`) first told. `thread::names` lists no pool's worker, and the
#: Thread package tells no pool's worker count; but a pool's workers are bounded by its
#: -maxworkers (4 by default) where its pools are not: a pool made per connection is the leak.
#: A script needs one or two.
POOLS = 16

_AFTER: Final = ("the script has %d pending `after` events: a timer set at every connection or message that "
                 "never runs or is never cancelled? Each keeps its script until it runs; cancel those no "
                 "longer needed (`after cancel`; `after info` lists them). Told again only if their number "
                 "doubles (docs/troubleshooting.md, \"Timers or threads that keep growing\")")
_THREADS: Final = ("the script runs %d threads of the Thread package besides its own: a thread made at every "
                   "connection or message and never ended? Each keeps an interpreter, a stack and descriptors "
                   "until it ends; end them (`thread::release`) or reuse a few (`tpool`; `thread::names` lists "
                   "them). Told again only if their number doubles (docs/troubleshooting.md, \"Timers or threads "
                   "that keep growing\")")

_POOLS: Final = ("the script has %d thread pools of the Thread package (tpool::create): a pool made at every "
                 "connection or message and never released? Each keeps its workers (threads the count of "
                 "threads leaves out) until `tpool::release`; make one at start and post to it (`tpool::names` "
                 "lists them). Told again only if their number doubles (docs/troubleshooting.md, \"Timers or "
                 "threads that keep growing\")")


class Growth:
    """One host's counts: when the next is due, and what was told of each."""

    __slots__ = ("_next", "_after_told")

    #: The threads last told, the process's: `thread::names` lists every thread of the process,
    #: whichever generation counts them, so a reload's old and new script told the same ones
    #: twice, and the new one again from the threshold.
    _process_threads_told: ClassVar[int] = 0
    #: The pools last told, the process's as the threads (`tpool::names` lists every pool).
    _process_pools_told: ClassVar[int] = 0

    def __init__(self) -> None:
        self._next = 0.0
        self._after_told = 0

    def due(self) -> bool:
        """True at most every CHECK_EVERY seconds: count now, and hand the counts to :meth:`counted`."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + CHECK_EVERY
        return True

    def counted(self, after_events: int, threads: int, pools: int = 0) -> None:
        """Warn of a count at its threshold, or at twice the count last told."""
        if after_events >= max(AFTER_EVENTS, 2 * self._after_told):
            self._after_told = after_events
            log.warning(_AFTER, after_events)
        if threads >= max(THREADS, 2 * Growth._process_threads_told):
            Growth._process_threads_told = threads
            log.warning(_THREADS, threads)
        if pools >= max(POOLS, 2 * Growth._process_pools_told):
            Growth._process_pools_told = pools
            log.warning(_POOLS, pools)
