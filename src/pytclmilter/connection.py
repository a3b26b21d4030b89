"""One accepted socket, the engine's Link: its reads fed to its engine, its writes, its PROXY
header sniffed, its quick ACKs; and the cut of many at a stop's or a reload's grace.

Below the server (server.py), which listens, times connections out and stops: what a connection
needs of it is :class:`Server`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Final, Mapping, Protocol, cast

from .accept import Acceptor
from .calling import UNWIND
from .engine import ConnectionEngine
from .logline import escape, said
from .shared import LAST_WORDS, Shared

log: Final = logging.getLogger("pytclmilter")

_QUICKACK: Final = getattr(socket, "TCP_QUICKACK", 0)  # Linux only
_UNKNOWN: Final[Any] = object()  # a connection's socket, not fetched yet
#: How a PROXY protocol header starts, v1 and v2: what HAProxy's send-proxy (-v2) puts before
#: the MTA's first packet, which the milter reads as a garbled packet ("unknown command 'Y'").
_PROXY_SIGNATURES: Final = (b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n")
_SNIFFED: Final = 12  # bytes that tell either signature
#: Said after the peer in the log lines of a connection that began with one.
_PROXY_HINT: Final = (" (it began with a PROXY protocol header, which a milter does not speak: remove "
                      "send-proxy from HAProxy's server lines; docs/deployment.md, HAProxy)")


def ended(exc: Exception | None) -> str:
    """How a connection the transport lost ended: ``eof`` when the peer closed it, whether its
    close was read (``exc`` None) or met by a write (EPIPE: a unix socket refuses a write to a
    closed peer at once, where TCP takes the write and reads the EOF next, as when Sendmail
    closes on its `R:` timeout while a callback runs); ``error: ...`` for anything else (a
    reset)."""
    if exc is None or isinstance(exc, BrokenPipeError):
        return "eof"
    return f"error: {said(exc)}"


class Server(Protocol):
    """What a connection needs of its server (server.py's MilterServer): the milter serving new
    connections, its ids, the set of those open, the accept loop, and the replaced generations."""

    @property
    def shared(self) -> Shared: ...
    @property
    def tcp(self) -> bool: ...
    @property
    def connections(self) -> set[Connection]: ...
    @property
    def acceptor(self) -> Acceptor | None: ...
    @property
    def retiring(self) -> Mapping[Shared, object]: ...
    def next_id(self) -> int: ...
    def session_over(self, shared: Shared) -> None: ...


class Connection(asyncio.Protocol):
    """One accepted socket; the engine's Link."""

    __slots__ = ("server", "transport", "engine", "last", "_loop", "_tcp", "_wrote", "_blocked", "_head", "_proxy")

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.engine: ConnectionEngine | None = None
        self._loop = loop
        self.last = self._loop.time()
        self._tcp: Any = None  # the socket for TCP_QUICKACK, _UNKNOWN until fetched, None if not TCP
        self._wrote = False
        self._blocked = False  # the write buffer is full: reading waits for resume_writing
        self._head: bytes | None = b""  # the first bytes, until they tell whether a PROXY header came
        self._proxy = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio types the argument as any transport; a stream server's is a stream Transport.
        # (cast, not isinstance: uvloop's transports do not derive from asyncio.Transport.)
        self.transport = cast(asyncio.Transport, transport)
        # TCP_NODELAY and SO_KEEPALIVE are set on the listening socket; accepted ones inherit them.
        # The socket object for TCP_QUICKACK is fetched when first needed: with uvloop that costs
        # two system calls, and many connections never need it.
        self._tcp = _UNKNOWN if _QUICKACK and self.server.tcp else None
        self.engine = ConnectionEngine(self.server.shared, self.server.next_id(), self)
        self.server.connections.add(self)
        if self.engine.debug:  # per connection: the verdict line names the client
            log.debug("%s: connection from %s", self.engine.name, _peer_text(transport.get_extra_info("peername")))

    @property
    def proxied(self) -> bool:
        return self._proxy

    @property
    def peer(self) -> str:
        """Who is at the other end, as log lines name it; with a hint if it sent a PROXY header."""
        peer = _peer_text(self.transport.get_extra_info("peername") if self.transport is not None else None)
        return peer + _PROXY_HINT if self._proxy else peer

    def _sniff(self, head: bytes, data: bytes) -> None:
        """Do the first bytes start a PROXY protocol header? Told within 12 bytes; an MTA's first
        byte (a length's high byte, 0) tells at once, so a session pays one comparison."""
        if not head and data[:1] == b"\0":  # the common case, without the generator below
            self._head = None
            return
        head += data[: _SNIFFED - len(head)]
        self._proxy = any(sig[: len(head)] == head[: len(sig)] for sig in _PROXY_SIGNATURES)
        self._head = head if self._proxy and len(head) < _SNIFFED else None

    def data_received(self, data: bytes) -> None:
        self.last = self._loop.time()
        self._wrote = False
        if self._head is not None:  # (before the engine: it logs the garbled packet at once)
            self._sniff(self._head, data)
        engine = self.engine
        if engine is None:  # connection_lost came first: nothing reads this connection any more
            return
        engine.data_received(data)
        if not self._wrote and self._tcp is not None and not engine.closed:
            self._quick_ack()

    def _quick_ack(self) -> None:
        """Data we do not answer (macros, no-reply headers) would get a delayed ACK, and the
        MTA's next small write waits ~40 ms for it (Nagle): acknowledge at once instead."""
        if self._tcp is _UNKNOWN:
            self._tcp = self.transport.get_extra_info("socket") if self.transport is not None else None
        try:
            self._tcp.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except (OSError, AttributeError):
            self._tcp = None

    def pause_writing(self) -> None:
        """The peer does not read its replies: stop reading its commands until it does."""
        self._blocked = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._blocked = False
        if self.engine is not None and not self.engine.busy:
            self.resume_reading()
            self.engine.resume()

    @property
    def blocked(self) -> bool:
        return self._blocked

    def eof_received(self) -> bool:
        if self.engine is not None:
            self.engine.connection_lost("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.connections.discard(self)
        if server.acceptor is not None:
            server.acceptor.connection_closed()  # a descriptor is free: accept again if we ran out
        # The transport's last call: letting go of the engine (whose link is this object) lets
        # reference counting free the connection now, not the cycle collector some time later.
        engine, self.engine = self.engine, None
        if engine is not None and not engine.closed:
            engine.connection_lost(ended(exc))
        if server.retiring and engine is not None:
            server.session_over(engine.shared)

    # Link
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._wrote = True
            self.last = self._loop.time()  # the idle clock runs from our answer (docs/protocol.md §9.3)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self._blocked:
            self.transport.resume_reading()

    @property
    def busy(self) -> bool:
        return self.engine is not None and self.engine.busy

    def touch(self) -> None:
        self.last = self._loop.time()

    def expire(self, reason: str) -> None:
        if self.engine is not None:
            self.engine.connection_lost(reason)
        if self.transport is not None:
            self.transport.abort()


async def cut(conns: list["Connection"], reason: str) -> None:
    """Close these sessions now; return once their abort and close callbacks have run, after the
    async callbacks the close cancelled (else the loop's end, or a reload's ``gone``, came first)."""
    engines = [c.engine for c in conns if c.engine is not None]
    await _due_first(engines)
    for conn in conns:
        conn.pause_reading()  # (no command more for the sessions still waiting for their turn)
    for conn in conns:
        conn.expire(reason)
        # The loop turns between sessions: hundreds of close callbacks in one turn took overdue.py's
        # patience, and a stop's orderly cut was taken for a held thread and ended halfway.
        await asyncio.sleep(0)
    ending = [f for f in (e.ending for e in engines) if f is not None and not f.done()]
    if ending:
        await asyncio.wait(ending, timeout=2 * UNWIND)  # (each abandons its callback after UNWIND)


async def _due_first(engines: list[ConnectionEngine]) -> None:
    """Let the async callbacks whose own limit ends with the grace (one started in it gets what
    is left of it, LAST_WORDS at least) reach it before their connections are cut: each is
    then stopped, logged and answered with on_error, as a sync or Tcl one is. Without this the
    loop's timers decided: a cut first left the MTA an EOF and the log no line of the callback.
    Waits UNWIND more at most (a loop a callback holds runs no timers meanwhile)."""
    soon = time.monotonic() + LAST_WORDS
    due = [e for e in engines if e.due <= soon]
    while any(e.due <= soon for e in due) and time.monotonic() < soon + UNWIND:
        await asyncio.sleep(0.005)


def _peer_text(peer: object) -> str:
    """The peer as log lines name it. A unix socket's peer names itself (the path it bound),
    line breaks and all: escaped."""
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return escape(str(peer)) or "unix socket"

