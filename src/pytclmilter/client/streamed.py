"""An mbox that ``pytclmilter try`` reads from a stream (standard input, a FIFO) as it arrives.

``tail -f mbox | pytclmilter try script.tcl -`` never ends: read to its end first, as a file is,
no message was ever tried. Here each message is handed on as soon as its end is known (the next
``From `` line, or the end of the stream: :class:`~.archive.MboxSplitter`), one piece of the
stream read at a time, so memory stays bounded by ``--max-size``.

The milter serves on the same event loop that waits for the stream, so the stream is not read
there (a read that blocks would hold the milter, and Ctrl-C with it): a thread reads it, one
piece when asked, with ``os.read`` on the descriptor (a daemon thread blocked in a buffered
file's read made the interpreter's exit abort, holding that file's lock). Ctrl-C, or a filter
that stopped serving, :meth:`interrupt` the wait: what was read is listed, the rest is not read.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
from collections import deque
from typing import AsyncIterator

from ..logline import escape
from .archive import Item, MboxSplitter

#: The most read from the stream at once.
_PIECE = 65536


class StreamedMbox:
    """The messages of an mbox stream, as they come; ``first``: its first bytes, read already."""

    kind = "mbox"

    def __init__(self, fd: int, first: bytes, name: str, limit: int) -> None:
        self.name = name  # as the user gave it ("-")
        self._fd = fd
        self._splitter = MboxSplitter(limit)
        self._ready: deque[Item] = deque(self._splitter.feed(first))
        self._wanted: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[bytes]]] = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self._waiting: asyncio.Future[bytes] | None = None
        self._ended = False
        self._interrupted = False

    async def items(self) -> AsyncIterator[Item]:
        """Each message once its end is known; after :meth:`interrupt`, those read already and the
        message being read (not checked: it is listed as not tried), then no more."""
        while True:
            while self._ready:
                yield self._ready.popleft()
            if self._ended:
                return
            if self._interrupted:
                self._ended = True
                pending = self._splitter.pending()
                if pending is not None:
                    yield pending
                return
            data = await self._read()
            if self._interrupted:
                continue
            self._ready.extend(self._splitter.feed(data) if data else self._splitter.end())
            self._ended = not data

    def interrupt(self) -> None:
        """Stop waiting for the stream (on the loop's thread): :meth:`items` lists what it has."""
        self._interrupted = True
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(b"")

    async def _read(self) -> bytes:
        """The stream's next piece, b"" at its end (or a read error, said on stderr)."""
        loop = asyncio.get_running_loop()
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_when_asked, name="try-stream", daemon=True)
            self._reader.start()
        self._waiting = loop.create_future()
        self._wanted.put((loop, self._waiting))
        try:
            return await self._waiting
        except OSError as exc:
            print(f"pytclmilter try: {escape(self.name)}: {exc.strerror or exc}", file=sys.stderr)
            return b""
        finally:
            self._waiting = None

    def _read_when_asked(self) -> None:
        """The reading thread: one piece per request, until the stream ends or the loop is gone."""
        while True:
            loop, wanted = self._wanted.get()
            data: bytes | OSError
            try:
                data = os.read(self._fd, _PIECE)
            except OSError as exc:
                data = exc
            try:
                loop.call_soon_threadsafe(_deliver, wanted, data)
            except RuntimeError:  # the loop closed meanwhile (try is ending)
                return
            if not data or isinstance(data, OSError):
                return


def _deliver(wanted: asyncio.Future[bytes], data: bytes | OSError) -> None:
    if wanted.done():  # (interrupted meanwhile)
        return
    if isinstance(data, OSError):
        wanted.set_exception(data)
    else:
        wanted.set_result(data)
