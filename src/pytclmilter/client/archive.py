"""The messages ``pytclmilter try`` reads: one message file, a directory of ``.eml`` files, or an mbox.

An mbox is told by its first line (``From ``, as every mbox writer starts a
message) and read with Python's :mod:`mailbox`: a message ends at the next
line that starts with ``From ``, its ``From `` line is dropped, and every
other byte is handed on as it is (8-bit bytes included). ``>From `` lines
are not unquoted, as :mod:`mailbox` leaves them: whether one was quoted by
the writer (mboxrd, mboxo) cannot be told from the file. An mbox that comes
as a stream is cut into the same messages as it arrives (:class:`MboxSplitter`).

A directory: the regular files directly in it whose names end in ``.eml``
(any case), in name order. Subdirectories are not entered and symbolic links
are not followed (a link named ``x.eml`` is skipped, as are other entries);
each file is opened relative to the directory, refusing a link or a file that
is not regular at open time, so a name swapped after the listing is not read.

No message is read past its size limit (--max-size, Postfix's message_size_limit): an endless
stream or a file that grows fills neither memory nor, copied, the disk.
"""

from __future__ import annotations

import mailbox
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Protocol

from .message import FIELD

#: What a mbox starts with: the separator line of its first message.
MBOX_MAGIC = b"From "

#: The largest message read, in bytes (--max-size): Postfix's default message_size_limit.
MAX_SIZE = 10240000

#: How much of a stream is read at once while it is copied.
_CHUNK = 65536

#: The separator line of a message in the copy of an mbox stream (what follows ``From `` is dropped).
_SEPARATOR = b"From -\n"


class Readable(Protocol):
    """A file of bytes, or the part of an mbox one message is (mailbox's get_file)."""

    def read(self, size: int, /) -> bytes: ...


class TooLarge(Exception):
    """A message holds more than the limit: an endless stream or a file that grows is read no further."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes (--max-size)")


def read_at_most(f: Readable, limit: int) -> bytes:
    """The rest of ``f``; TooLarge past ``limit`` bytes, having read one byte more at most."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(limit)
    return data


@dataclass
class Item:
    """One message of the input: its label on the report, and its bytes or why there are none."""

    label: str
    raw: bytes = b""
    error: str = ""


@dataclass
class Listing:
    """The messages of an input and, for a directory, how many entries were left out."""

    kind: str  # "message", "mbox" or "directory"
    path: str
    name: str  # as the user gave it ("-" for standard input, copied to ``path``)
    max_size: int = MAX_SIZE
    ignored: int = 0

    def items(self) -> Iterator[Item]:
        if self.kind == "directory":
            return _directory_items(self)
        if self.kind == "mbox":
            return _mbox_items(self.path, self.max_size)
        return _file_item(self.path, self.name, self.max_size)


def open_input(path: str, name: str, max_size: int = MAX_SIZE) -> Listing:
    """What ``path`` holds; OSError when it cannot be read (a directory: listed, which needs
    read permission; checked here, before any script runs, not when the batch reaches it)."""
    if os.path.isdir(path):
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        return Listing("directory", path, name, max_size)
    with open(path, "rb") as f:
        first = f.read(len(MBOX_MAGIC))
    return Listing("mbox" if first == MBOX_MAGIC else "message", path, name, max_size)


def copy_stream(source: BinaryIO, dest: BinaryIO, limit: int, first: bytes | None = None) -> None:
    """Standard input or another stream, to a file ``open_input`` reads: TooLarge when it holds
    one message of more than ``limit`` bytes (``/dev/zero`` is read no further). An mbox is
    copied whole but for its messages larger than the limit: cut two bytes past it (one more is
    the empty line before the next ``From ``, which mailbox drops) and ended with a line break, so
    that their items still say they are too large, and the rest read and dropped; its ``From ``
    lines, which no one reads, are written as ``From -``: no stream fills the disk. ``first``:
    the stream's first bytes, when they were read already."""
    first = source.read(len(MBOX_MAGIC)) if first is None else first
    if first != MBOX_MAGIC:
        data = first + source.read(max(0, limit + 1 - len(first)))
        if len(data) > limit:
            raise TooLarge(limit)
        dest.write(data)
        return
    dest.write(_SEPARATOR)
    size, cut, in_separator, at_line_start = 0, False, True, False
    while chunk := source.readline(_CHUNK):
        if at_line_start and chunk.startswith(MBOX_MAGIC):
            dest.write(b"\n" + _SEPARATOR if cut else _SEPARATOR)
            size, cut, in_separator = 0, False, True
        elif not (in_separator or cut):
            kept = chunk[:limit + 2 - size]
            dest.write(kept)
            size += len(kept)
            cut = size > limit + 1
        at_line_start = chunk.endswith(b"\n")
        in_separator = in_separator and not at_line_start


class MboxSplitter:
    """An mbox arriving in pieces (a stream: ``tail -f mbox |``), cut into its messages as soon as
    each one's end is known: the next ``From `` line, or the end of the stream. Each message is as
    :mod:`mailbox` reads it from a file (``_mbox_items``): without its ``From `` line and without
    the empty line before the next; no more than ``limit`` + 2 bytes of one are held (the rest
    is counted, and its item says it is too large), so memory stays bounded however long the
    stream or its lines."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0  # messages begun: the one being read is number ``count``
        self._kept = bytearray()  # the message being read, up to limit + 2 bytes
        self._cut = False  # ... and it had more
        self._head = b""  # the start of a line, shorter than "From " and maybe its start
        self._at_line_start = True
        self._in_separator = False  # in a From line (dropped)
        self._empty_line = False  # the last whole line was an empty one (mailbox's last_was_empty)

    def feed(self, data: bytes) -> list[Item]:
        """The messages ``data`` ends (the stream starts with ``From ``: open_stream checked)."""
        done: list[Item] = []
        for piece in _lines(data):
            if self._in_separator:
                whole = piece.endswith(b"\n")
                self._in_separator, self._at_line_start = not whole, whole
                continue
            if not self._at_line_start:
                self._keep(piece)
                continue
            line, self._head = self._head + piece, b""
            if len(line) < len(MBOX_MAGIC) and MBOX_MAGIC.startswith(line):
                self._head = line  # a From line, or not: its next bytes tell
            elif line.startswith(MBOX_MAGIC):
                done += self._separator(line.endswith(b"\n"))
            else:
                self._keep(line)
                self._empty_line = line == b"\n"
        return done

    def end(self) -> list[Item]:
        """The stream ended: its last message (none before the first ``From `` line)."""
        if self._head:
            self._keep(self._head)
            self._head = b""
        return [self._item()] if self.count else []

    def pending(self) -> Item | None:
        """The message being read, whose end is not known yet (the stream stops here: Ctrl-C):
        what came of it so far, not checked; None before the first ``From `` line."""
        return Item(f"#{self.count}", bytes(self._kept) + self._head) if self.count else None

    def _separator(self, whole: bool) -> list[Item]:
        """A ``From `` line: the end of the message before it (if any) and the start of another."""
        done = [self._item()] if self.count else []
        self.count += 1
        self._kept, self._cut, self._empty_line = bytearray(), False, False
        self._in_separator, self._at_line_start = not whole, whole
        return done

    def _keep(self, piece: bytes) -> None:
        room = self.limit + 2 - len(self._kept)
        self._kept += piece[:max(room, 0)]
        self._cut = self._cut or len(piece) > room
        self._at_line_start = piece.endswith(b"\n")
        self._empty_line = False

    def _item(self) -> Item:
        label = f"#{self.count}"
        raw = bytes(self._kept[:-1] if self._empty_line and not self._cut else self._kept)
        if self._cut or len(raw) > self.limit:
            return Item(label, error=str(TooLarge(self.limit)))
        return _checked(Item(label, raw))


def _lines(data: bytes) -> Iterator[bytes]:
    """``data`` cut after each LF (the last piece may have none): lines as mailbox reads them,
    where bytes.splitlines would cut at a lone CR too."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start) + 1 or len(data)
        yield data[start:end]
        start = end


def _file_item(path: str, name: str, limit: int) -> Iterator[Item]:
    with open(path, "rb") as f:
        yield _bounded(name, f, limit)


def _bounded(label: str, f: Readable, limit: int) -> Item:
    """The item of a message read from ``f``: an error when it is larger than ``limit``."""
    try:
        return Item(label, read_at_most(f, limit))
    except TooLarge as exc:
        return Item(label, error=str(exc))


def _mbox_items(path: str, limit: int) -> Iterator[Item]:
    box = mailbox.mbox(path, create=False)
    try:
        for n, key in enumerate(box.iterkeys(), 1):
            with box.get_file(key) as f:
                item = _bounded(f"#{n}", f, limit)
            yield _checked(item)
    finally:
        box.close()


def _directory_items(listing: Listing) -> Iterator[Item]:
    listing.ignored = 0
    dirfd = os.open(listing.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = []
        with os.scandir(dirfd) as entries:
            for entry in entries:
                if entry.name.lower().endswith(".eml") and entry.is_file(follow_symlinks=False):
                    names.append(entry.name)
                else:
                    listing.ignored += 1
        for name in sorted(names):
            yield _checked(_read_at(dirfd, name, listing.max_size))
    finally:
        os.close(dirfd)


def _read_at(dirfd: int, name: str, limit: int) -> Item:
    """The file ``name`` of the directory: never through a link, never a FIFO or device (no blocking open)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as exc:
        return Item(name, error=exc.strerror or str(exc))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Item(name, error="not a regular file")
        try:
            return _bounded(name, f, limit)
        except OSError as exc:
            return Item(name, error=exc.strerror or str(exc))


def _checked(item: Item) -> Item:
    problem = malformed(item.raw) if not item.error else None
    if problem:
        item.error = problem
    return item


def malformed(raw: bytes) -> str | None:
    """Why a message of a batch is not tried, or None.

    ``Message.parse`` takes anything (a single ``try`` sends whatever it is
    given); in an archive, a file with no header section, or a header section
    with a line that is neither a field nor a continuation (where the parser,
    as the MTAs, would start the body), is a broken or foreign file, and a NUL
    byte cannot be sent in a header (the protocol ends strings with NUL)."""
    if not raw.strip():
        return "empty message"
    head = raw.replace(b"\r\n", b"\n").partition(b"\n\n")[0]
    if not FIELD.match(head):
        return "no header fields (the first line is not NAME: value)"
    for n, line in enumerate(head.split(b"\n"), 1):
        if not (FIELD.match(line) or line[:1] in (b" ", b"\t")):
            return f"line {n} of the header section is not a header field"
    if b"\0" in head:
        return "a NUL byte in the header section"
    return None
