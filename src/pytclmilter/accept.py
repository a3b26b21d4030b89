"""Accepting connections ourselves, so that running out of descriptors is logged once and waited out.

Neither event loop's own server copes with ``accept()`` failing for lack of descriptors:
asyncio's logs a traceback for every failed call (megabytes a second at full CPU), uvloop's
says nothing while libuv closes the connections waiting in the queue unanswered. Here the
listening socket is watched with ``add_reader``; when it is ready a connection is accepted and
handed to the loop's ``connect_accepted_socket``. When ``accept()`` fails for want of
descriptors or kernel memory, accepting stops until a connection closes (which frees a
descriptor) or a short timer passes (something else may have freed one), and the waiting
connections stay queued; one WARNING says so, at most once a minute (repeats.Repeated), and one
INFO line when accepting works again, with the number of failures since; failures no line named
(a second shortage within the minute) are told once the minute is over, or at stop. Open
connections are served throughout: reading and writing need no new descriptor.

At the connection limit (``max_connections``: ``limit`` here) a connection accepted is closed at
once, unanswered: the MTA applies its default action to that session now (Postfix:
``milter_default_action``), rather than after its own timeout as it would if the connection
waited in the listen queue, holding an smtpd process meanwhile; the limit is set so that no
real MTA reaches it. One WARNING says the limit is reached, one more says when a connection
closed below it again, with how many were closed at it; while a peer keeps crossing the limit
back and forth, that pair comes at most every LIMIT_REPEAT seconds, and the connections closed
at the limit between are told once those seconds are over (a timer: the next warning may be
hours away): in the warning that the limit is reached if it still is, else in a line of their
own (or at the end of serving).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from typing import Any, Callable, Final

from .repeats import Repeated

log: Final = logging.getLogger("pytclmilter")

BATCH: Final = 64  # connections accepted per wake-up while recovering: a burst must not hold up open sessions
RETRY: Final = 0.1  # seconds before accepting again when no connection closed meanwhile
REPEAT: Final = 60.0  # seconds between warnings while accepting keeps failing (or fails again)
#: Seconds between warnings that the connection limit is reached. Not Final: compiled, mypyc would
#: inline a Final, and a test shortens it (read only when the limit is crossed).
LIMIT_REPEAT = 60.0
#: Descriptors the process needs besides its connections: the interpreter, the event loop, the
#: log, the listening socket, what the script opens.
MARGIN: Final = 64
# Errors of one connection that went wrong before we took it (accept(2): Linux reports the
# connection's pending network error here): skip it and take the next.
_PEER_ERRORS: Final = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENETUNREACH, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENONET,
})


class Acceptor:
    """Accepts on one listening socket for a running loop; ``close`` stops and closes the socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol], limit: Callable[[], int] = lambda: 0,
                 on_refused: Callable[[], None] = lambda: None) -> None:
        """``limit``: the connection limit in force (read at each accept: a reload or `milter
        configure` may change it), 0 for none; ``on_refused``: called for each connection closed at it."""
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.limit = limit
        self.on_refused = on_refused
        self.open = 0  # connections accepted and not closed yet (connection_closed), for the warning
        self._fd = sock.fileno()
        # What socket.accept() does (CPython's socket.py), with less work per connection:
        # socket.socket's family and type are properties that build an enum member on every
        # read (about 6,600 instructions each), accept() reads them twice and the loop's
        # connect_accepted_socket three times more. Here they are read once, and the accepted
        # sockets are of a subclass where they are plain class attributes.
        self._accept: Callable[[], tuple[int, Any]] = getattr(sock, "_accept")
        self._socket_class: type[socket.socket] = type(
            "AcceptedSocket", (socket.socket,), {"family": sock.family, "type": sock.type})
        self._kind = (sock.family, sock.type, sock.proto)
        self._reading = False
        self._retry: asyncio.Handle | None = None  # accepting is paused until this runs
        self._failures = Repeated(REPEAT, tell=_failures_told)  # failed accepts, a warning a minute
        self._tell_recovery = False  # a warning went out: say once when accepting works again
        self._capped = False  # a connection was closed at the limit, and none has closed since
        self._told = False  # the warning of this time at the limit went out: say when it is over
        self._limit_warned: float | None = None  # loop time of the last warning of the limit
        self._refused = 0  # connections closed at the limit that no line has counted yet
        self._window_end: asyncio.TimerHandle | None = None  # tells the count once LIMIT_REPEAT is over

    def start(self) -> None:
        if not self._reading and self.sock.fileno() >= 0:
            self.loop.add_reader(self._fd, self._ready)
            self._reading = True

    def close(self) -> None:
        """Stop accepting and close the listening socket: new connections are refused from now on
        (once every process that shares the socket has closed it)."""
        self._pause()
        self.sock.close()
        self._tell_refused()

    def connection_closed(self) -> None:
        """A connection's transport closed: its descriptor is free, so accept again at once if we
        were waiting for one."""
        self._released()
        if self._retry is not None:
            self._retry.cancel()
            # Next turn: asyncio's transport closes the descriptor after this call returns.
            self._retry = self.loop.call_soon(self._resume)

    def _ready(self) -> None:
        """The listening socket is readable: take one connection. The loop calls again at once
        while more wait, with the open sessions' turns in between; taking more here would end
        with an accept() that fails (an exception) just to learn that the queue is empty. After a
        warning, take them all, so that the empty queue tells that accepting works again."""
        if not self._reading:  # closed or paused since this call was scheduled
            return
        accept, new_socket = self._accept, self._socket_class
        family, kind, proto = self._kind
        for _ in range(BATCH if self._tell_recovery else 1):
            try:
                fd, _addr = accept()
            except BlockingIOError:  # the queue is empty (or another worker took the connection)
                if self._tell_recovery:
                    self._tell_recovery = False
                    failed = sum(count for _, count in self._failures.overdue(ended_only=False))
                    log.info("accepting connections again (%d failed accepts since the last warning)", failed)
                return
            except OSError as exc:
                if exc.errno in _PEER_ERRORS:
                    continue
                self._failed(exc)
                return
            limit = self.limit()
            if limit and self.open >= limit:
                os.close(fd)
                self._at_limit(limit)
                continue
            self.open += 1
            self.loop.create_task(self._connect(new_socket(family, kind, proto, fd)))
        if self._tell_recovery:  # a full batch: go on next turn, the queue may be empty by now
            self.loop.call_soon(self._ready)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError as exc:  # no transport was made (connection_closed will not come)
            conn.close()
            self._released()
            log.debug("a connection closed before it was set up: %s", exc)

    def _at_limit(self, limit: int) -> None:
        """A connection was closed at once, ``limit`` being open: warn as the limit is reached
        (unless a warning went out less than LIMIT_REPEAT seconds ago), count it either way; a
        count no warning told is told when those seconds are over (_window_over)."""
        self._refused += 1
        self.on_refused()
        if not self._capped:
            self._capped = True
            now = self.loop.time()
            self._told = self._limit_warned is None or now - self._limit_warned >= LIMIT_REPEAT
            if self._told:
                self._warn_limit(limit, self._refused - 1)
                self._refused = 1  # (the line of its end counts this one)
                return
        if not self._told and self._window_end is None and self._limit_warned is not None:
            delay = max(self._limit_warned + LIMIT_REPEAT - self.loop.time(), 0.0)
            self._window_end = self.loop.call_later(delay, self._window_over)

    def _warn_limit(self, limit: int, earlier: int) -> None:
        """The warning that the limit is reached, with the ``earlier`` connections closed at it
        that no line has counted."""
        self._end_window()
        were = "was" if earlier == 1 else "were"
        since = f"; {earlier} more {were} closed at it since the last line about it" if earlier else ""
        log.warning("connection limit reached: %s open (--max-connections %d); new connections are closed at once, "
                    "and the MTA applies its default action to them (Postfix: milter_default_action), until one "
                    "closes%s", _connections(self.open), limit, since)
        self._limit_warned = self.loop.time()

    def _window_over(self) -> None:
        """LIMIT_REPEAT seconds since the last warning: tell the connections closed at the limit
        since, in the warning that it is reached if it still is (its end is then told as ever)."""
        self._window_end = None
        limit = self.limit()
        if self._capped and not self._told and limit:
            self._told = True
            self._warn_limit(limit, self._refused)
            self._refused = 0
        elif not (self._capped and self._told):  # (else the line of its end counts them)
            self._tell_refused()

    def _end_window(self) -> None:
        if self._window_end is not None:
            self._window_end.cancel()
            self._window_end = None

    def _tell_refused(self) -> None:
        """A line with the count of connections closed at the limit that no line has told."""
        self._end_window()
        if self._refused:
            log.warning("%s closed at the connection limit since the last line about it", _connections(self._refused))
            self._refused = 0

    def _released(self) -> None:
        """A connection is over: if it was at the limit, the limit is no longer reached (said once
        the warning of it went out)."""
        self.open -= 1
        if not self._capped:
            return
        limit = self.limit()
        if limit and self.open >= limit:  # (the limit lowered meanwhile)
            return
        self._capped = False
        if self._told and self._limit_warned is not None:
            open_ = _connections(self.open)
            now = (f"below the connection limit again: {open_} open (--max-connections {limit})" if limit
                   else f"connection limit lifted: {open_} open (--max-connections 0: no limit)")  # (a reload, say)
            log.warning("%s; %s closed at the limit in %.1f s", now, _connections(self._refused),
                        self.loop.time() - self._limit_warned)
            self._refused = 0

    def _failed(self, exc: OSError) -> None:
        """Stop accepting for now; warn unless a warning went out less than REPEAT seconds ago
        (then the failure is counted, and told by the INFO line of recovery or tell_counts)."""
        self._pause()
        self._retry = self.loop.call_later(RETRY, self._resume)
        missed = self._failures.due("accept")
        if missed is None:
            return
        since = f"; {missed} failed accepts since the last line about them" if missed else ""
        log.warning("cannot accept connections: %s (open-files limit %s, %d connections open)%s; new "
                    "connections wait in the listen queue, accepting resumes when one closes (warned at most "
                    "once a minute)", exc.strerror or exc, limit_text(), self.open, since)
        self._tell_recovery = True

    def _pause(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def _resume(self) -> None:
        self._retry = None
        self.start()
        if self._tell_recovery:
            # accept() fails for want of a descriptor even when nobody waits, and then the
            # socket would never turn readable to tell that accepting works again: try now.
            self._ready()


def _failures_told(_failures: Repeated, _label: str, count: int) -> None:
    log.warning("%d more failed accepts (out of descriptors or memory) since the last line about them (warned at "
                "most once a minute)", count)


def _connections(n: int) -> str:
    return f"{n} connection" if n == 1 else f"{n} connections"


def limit_text() -> str:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def queue_length(backlog: int) -> int:
    """The listen queue's real length: the kernel silently caps the backlog at net.core.somaxconn."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return min(backlog, int(f.read()))
    except (OSError, ValueError):
        return backlog


def check_fd_limit(backlog: int | None) -> None:
    """Warn at start when the open-files limit cannot hold a full listen queue's connections."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    queue = queue_length(backlog or max(socket.SOMAXCONN, 20))  # listener.bind's default
    if soft != resource.RLIM_INFINITY and soft < queue + MARGIN:
        log.warning("the open-files limit is %d descriptors, fewer than the %d that a full listen queue "
                    "(%d connections) and the process's own files need: connections beyond it wait unaccepted; "
                    "raise it (LimitNOFILE= under systemd, ulimit -n) or lower --backlog", soft, queue + MARGIN, queue)
