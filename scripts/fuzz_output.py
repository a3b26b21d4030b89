"""The output target of scripts/fuzz: Python's writes to sys.stdout and sys.stderr under ``run``
(a --python hook's print(), a library's write()) through tcl/output.py's :class:`PythonOutput`
and ``_written``, which escape them and write each line in one write() as a script's `puts`
(``scripts/fuzz --target output run``).

One input is a list of writes: each a byte (bit 0: stderr, else stdout; bit 1: through
``_written`` as a `puts` with its ``ends`` from bit 2, else PythonOutput.write; bits 3-7: the text
repeated that many times more, to reach the fold) and a length byte, then that many bytes of text
(UTF-8; other bytes as surrogate escapes, as a str may hold them). The descriptors are files of
the harness's own; at the end the lines held open are written (``write_held``). Checked:

* every write() is one whole line: its LF at the end and nowhere before it;
* no line is longer than the fold (OUTPUT_LINE bytes with its LF) and no byte is a raw control:
  each line is UTF-8 whose characters are printable or a tab;
* nothing is lost: each LF the text wrote ends a line (as many lines, at least, as LFs written).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pytclmilter.logline import OUTPUT_LINE  # noqa: E402
from pytclmilter.tcl import output  # noqa: E402


class Stats:
    def __init__(self) -> None:
        self.inputs = self.writes = self.lines = self.folded = 0


STATS = Stats()
_FILES: dict[str, int] = {}
_WRITES: list[bytes] = []


def _files() -> dict[str, int]:
    if not _FILES:
        for channel in output._FD:
            fd, path = tempfile.mkstemp(prefix=f"fuzz-output-{channel}-")
            os.unlink(path)
            _FILES[channel] = fd
    return _FILES


def _recording_write(fd: int, data: bytes) -> int:
    """os.write in output.py's module: each write() recorded, all of it taken."""
    _WRITES.append(bytes(data))
    return len(data)


def parse_input(data: bytes) -> list[tuple[int, str]]:
    writes, i = [], 0
    while i + 2 <= len(data):
        how, n = data[i], data[i + 1]
        text = data[i + 2 : i + 2 + n].decode("utf-8", "surrogateescape")
        writes.append((how, text * (1 + (how >> 3))))
        i += 2 + n
    return writes


class _Os:
    """output.py's ``os`` in the harness: its write() recorded, the rest the real module's."""

    def __getattr__(self, name: str) -> object:
        return _recording_write if name == "write" else getattr(os, name)


def one_input(data: bytes) -> None:
    STATS.inputs += 1
    files = _files()
    saved_fd, saved_os = dict(output._FD), output.os
    output._FD.update(files)
    setattr(output, "os", _Os())  # (a module attribute: its write() recorded)
    _WRITES.clear()
    newlines = 0
    try:
        streams = {c: output.PythonOutput(c, sys.__stderr__) for c in files}
        for how, text in parse_input(data):
            channel = "stderr" if how & 1 else "stdout"
            STATS.writes += 1
            if how & 2:
                ends = bool(how & 4)
                output._written(channel, text, ends)
                newlines += text.count("\n") + ends
            else:
                streams[channel].write(text)
                newlines += text.count("\n")
        output.write_held()
    finally:
        output._FD.update(saved_fd)
        setattr(output, "os", saved_os)
    for line in _WRITES:
        STATS.lines += 1
        assert line.endswith(b"\n") and b"\n" not in line[:-1], f"not one whole line: {line[:200]!r}"
        assert len(line) <= OUTPUT_LINE, f"a line of {len(line)} bytes, past the fold"
        text = line[:-1].decode("utf-8")  # (UnicodeDecodeError: not UTF-8)
        bad = [c for c in text if not (c == "\t" or c.isprintable())]
        assert not bad, f"raw controls {bad[:5]!r} in {line[:200]!r}"
        STATS.folded += len(line) > OUTPUT_LINE - 200
    assert len(_WRITES) >= newlines, (len(_WRITES), newlines)


def seeds() -> dict[str, bytes]:
    def w(how: int, text: bytes) -> bytes:
        return bytes([how, len(text)]) + text

    return {
        "print": w(0, b"from <a@example.org> to b") + w(0, b"\n"),
        "esc-cr-lf": w(1, b"\x1b[2Jforged\r\nERROR: x\n") + w(0, b"tab\there\x7f\xc2\x85\n"),
        "puts-nonewline": w(2, b"part one, ") + w(6, b"part two"),
        "long-line": w(0xF8, b"x" * 200) + w(0, b"\n"),
        "long-multibyte": w(0xFA, "\u00e9\u20ac\U0001f600".encode() * 20) + w(6, b""),
        "surrogates": w(1, b"\xff\xfe bad \xed\xa0\x80\n"),
        "mixed": w(0, b"a") + w(2, b"b") + w(1, b"c\nd") + w(6, "e\u2028\u200e".encode()),
    }
