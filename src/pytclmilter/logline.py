r"""How text reaches the log: escaped, bounded, and the per-message line on a short path.

This module owns what a line says and how it is written: escaping (:func:`escape` and its
kin), bounding (:func:`guard`, :func:`clip`, :func:`one_line`), a script's output
(:func:`as_output`, :func:`folded_lines`), and the verdict line's direct path (:func:`info`).
How a failure that repeats is logged once and then counted is repeats.py's, which needs
nothing of this module.

The engine logs one line per message (its verdict), handed straight to the one handler that
would write it. logging's path for one record (Logger.info, _log, makeRecord, the record's
__init__, handle, callHandlers, the handler's handle and emit, getMessage: a dozen interpreted
calls) was a tenth of the engine's instructions per message.
``pytclmilter run`` installs a handler that can tell when it is the only place the line can go,
unfiltered (``DirectSink.takes``); then the line is formatted and queued by it in one call, the
same text logging would have written. Otherwise (an application's own logging set-up, a filter,
a second handler, syslog) the line goes through logging as usual.

Text from the MTA or a script reaches a line only through :func:`escape` (one line; :func:`as_field`
for a value of a ``key=value`` field) or :func:`escape_lines` (what follows a line: a traceback,
Tcl's errorInfo), so that no client
host name, sender, reply text or error message can end a log line early, start a forged one,
or send escape sequences to a terminal. The rule, in both:

* a backslash is written ``\\``; CR, LF and tab ``\r``, ``\n``, ``\t``; any other C0
  control and DEL ``\xNN``; a byte that was not UTF-8 (kept as U+DC80 + byte, see
  protocol/codec.py) ``\xNN`` of that byte; any other character Python does not call
  printable (C1 controls, line and paragraph separators, bidi overrides) ``\uNNNN``;
  everything else, UTF-8 letters included, as it is;
* in the lines after a line, each line is escaped alone and indented by two spaces unless it
  already starts with a space: a line of the log that starts with a space continues the one
  above it.

:func:`guard` applies the second rule, and the first for controls only, to a whole formatted
record: ``pytclmilter run``'s formatter calls it on every record, stderr and syslog alike, so
that a call site that forgot to escape still cannot forge a line. It leaves backslashes alone,
so text escaped by the call site is not escaped twice (and the text of escaped arguments is
the same with and without it). It also bounds the record (:data:`LINE_KEPT`, :data:`LINES_KEPT`):
a line too long keeps its two ends, a record of too many lines its first and last lines, and
each cut says how much it left out. :func:`info`'s direct path makes no record, and only bounds
its line: its arguments must be escaped, as the engine's verdict line escapes them.
"""

from __future__ import annotations

import logging
from typing import Callable, Final, Protocol

# Before repeats.py, the greylist example imported Repeated from here, and users have copies of
# it: they keep working. Only this name, and no cycle (repeats imports nothing of this module).
from .repeats import Repeated as Repeated

INFO: Final = logging.INFO
INDENT: Final = "  "
#: str.isprintable as an object: compiled, ``text.isprintable()`` looks the method up by name on
#: every call (two thirds of the cost of escaping a sender); this is a direct call.
isprintable: Final[Callable[[str], bool]] = str.isprintable
_NAMED: Final = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


#: Characters of a long text from the MTA or a script that an error or log line quotes: a refused
#: string, a callback's result that is no status (a body callback ending in a setpriv of the
#: body so far returns it, and would be logged whole for every block).
SHOWN: Final = 60


#: What a record keeps of a line longer than their sum: its first and last characters. A text from
#: the MTA or a script can be megabytes (an error quoting a body it was given); syslog takes a
#: record as one datagram, which Linux refuses over about 208 KiB (the whole record was lost); and
#: the disk is finite. The ends say what the line was (a callback's name, what was answered).
LINE_KEPT: Final = (600, 200)
#: What a record keeps of more lines than their sum (a deep errorInfo or traceback): the first
#: (where it happened) and the last (the callback). With LINE_KEPT, a record stays under 170 KB
#: (51 lines, each of 800 characters of at most 4 bytes, or of escapes cut at 4 x 800): one datagram.
LINES_KEPT: Final = (40, 10)
#: The longest line a record keeps whole.
LONGEST: Final = LINE_KEPT[0] + LINE_KEPT[1]
#: The bytes of one line a script's `puts` writes to stdout or stderr, its LF included, in one
#: write() (:func:`as_output`): PIPE_BUF, so that on a pipe no other writer's bytes come inside it,
#: and journald's stream socket keeps it whole; and journald, which cuts a line at its LineMax (48
#: KiB by default), never cuts it. A longer line is folded (by bytes: an escape is 4 to 10, any
#: other character 1 to 4).
OUTPUT_LINE: Final = 4096
#: A written line this long or longer goes on in the next: OUTPUT_LINE less the LF and what a cut
#: before a character of 4 bytes can leave out.
OUTPUT_FOLDED: Final = OUTPUT_LINE - 4


def said(thing: object, text: Callable[[object], str] = str) -> str:
    """``str(thing)`` (or ``repr``), or Python's own words when that raises: a --python file's
    exception whose ``__str__`` raises, or an object whose ``__repr__`` does, must not lose the
    report that quotes it (the report raised instead: a connection cut unanswered, a hook's
    traceback raw on stderr, a Python command's empty Tcl error). Any exception, as Python's
    traceback module does: a ``__str__`` that calls sys.exit() left the report by SystemExit (the
    MTA's connection dropped unanswered); a Ctrl-C landing just inside it is taken here too."""
    try:
        return text(thing)
    except BaseException:  # noqa: BLE001
        kind = "exception" if isinstance(thing, BaseException) else "object"
        return f"<{kind} {text.__name__}() failed>"


def failure_text(exc: BaseException) -> str:
    """What a log line or a Tcl error says a failure was: its message, else its type's name; a
    SystemExit or KeyboardInterrupt with both ("failed (3)" would say nothing)."""
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        return f"{type(exc).__name__}({said(exc)})"
    return said(exc) or type(exc).__name__


def clip(text: str) -> str:
    """``text`` as a message quotes it: whole, or its first SHOWN characters and "..."."""
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def escape(text: str) -> str:
    """``text`` (from the MTA or a script) made safe for the inside of one log line (module docstring)."""
    if isprintable(text) and "\\" not in text:  # nearly always: one pass in C, nothing built
        return text
    return "".join([_escaped(c, True) for c in text])


def as_field(text: str) -> str:
    """A value after ``key=`` in a line of such fields (the verdict line), escaped; quoted, with
    its quotes escaped, when it holds a space or a quote: else a sender such as
    ``<a" verdict=accept x="@b>`` would read as fields of its own."""
    text = escape(text)
    if " " not in text and '"' not in text:
        return text
    return quoted(text)


def quoted(escaped: str) -> str:
    """An escaped text in double quotes, its own quotes escaped (backslashes are already)."""
    return '"' + escaped.replace('"', '\\"') + '"'


def escape_lines(text: str) -> str:
    """A multi-line text (a traceback, Tcl's errorInfo) for the lines after a log line: each
    line escaped and, unless it starts with a space, indented, so that none can pass for a line."""
    return _continued([escape(line) for line in text.split("\n")], 0)


def one_line(text: str) -> str:
    """``text`` (from the MTA or a script) as one line printed on a terminal: escaped
    (:func:`escape`) and bounded as a line of a record (LINE_KEPT)."""
    return _shorter(escape(text))


def as_output(text: str, ends: bool, line: bytes = b"", done: int = 0) -> tuple[list[bytes], bytes]:
    """What a script's `puts` of ``text`` writes to stdout or stderr (the journal, under systemd):
    the whole lines, each to go out with its LF in one write() of at most :data:`OUTPUT_LINE`
    bytes, and the open line it leaves (b"" after a newline). ``line``: the open line's bytes
    held so far (`puts -nonewline`), after ``done`` bytes of it already written (a terminal's);
    ``ends``: the `puts` ends the line. Each line's controls escaped as :func:`guard` escapes
    them but tabs (a script's columns), backslashes kept, so that a printable line reads as
    written; each line after a newline inside the text indented as a continuation line, a
    newline at its end left to end it; a line too long folded (:func:`_folded`)."""
    parts = text.split("\n")
    lines = [("\t".join([_controls_escaped(piece) for piece in part.split("\t")])).encode() for part in parts]
    for i in range(1, len(lines)):
        if not lines[i].startswith(b" ") and (lines[i] or i < len(lines) - 1):  # (not the line a final LF opens)
            lines[i] = INDENT.encode() + lines[i]
    lines[0] = line + lines[0]
    whole: list[bytes] = []
    for i, data in enumerate(lines):
        pieces, rest = _folded(data, done if i == 0 else 0)
        whole.extend(pieces)
        if i < len(lines) - 1 or ends:
            whole.append(rest)
    return whole, b"" if ends else rest


def _folded(data: bytes, done: int) -> tuple[list[bytes], bytes]:
    """The pieces of a line's ``data`` (after ``done`` bytes already written on it) that fill
    whole lines, and the rest. A line of OUTPUT_FOLDED bytes or more is cut, at a character, into
    lines of OUTPUT_FOLDED to OUTPUT_LINE - 1 bytes, each after the first indented whatever it
    starts with, and the rest shorter (the indent alone, if nothing is left): so such a line
    goes on in the next past its indent, and no other does, and joining them gives the text
    back, a space at a cut or a line just that long too."""
    pieces = []
    start, width, indent = 0, done, b""
    while width + len(data) - start >= OUTPUT_FOLDED:
        end = min(start + OUTPUT_LINE - 1 - width, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # (not inside a character)
            end -= 1
        pieces.append(indent + data[start:end])
        start, width, indent = end, len(INDENT), INDENT.encode()
    return pieces, indent + data[start:]


def folded_lines(data: bytes) -> bytes:
    """Whole lines (a log record's, LF-ended) with each line of OUTPUT_FOLDED bytes or more
    folded as a script's output is (:func:`_folded`): so that each, its LF included, fits one
    write() of at most OUTPUT_LINE bytes (:func:`write_end`). A line of a record can be longer
    (800 characters of escapes of up to 10 bytes)."""
    if len(data) < OUTPUT_FOLDED:  # (nearly always: no line can be that long)
        return data
    lines = data.split(b"\n")
    if max(map(len, lines)) < OUTPUT_FOLDED:
        return data
    out: list[bytes] = []
    for line in lines:
        if len(line) < OUTPUT_FOLDED:
            out.append(line)
            continue
        pieces, rest = _folded(line, 0)
        out.extend(pieces)
        out.append(rest)
    return b"\n".join(out)


def write_end(data: bytes, start: int) -> int:
    """Where the write() of ``data`` from ``start`` ends: after as many whole lines as fit in
    OUTPUT_LINE bytes (PIPE_BUF: on a pipe, no other writer's bytes come inside them), or all of
    it; lines folded by :func:`folded_lines` always fit (a longer one is cut at OUTPUT_LINE)."""
    if len(data) - start <= OUTPUT_LINE:
        return len(data)
    end = data.rfind(b"\n", start, start + OUTPUT_LINE) + 1
    return end if end > start else start + OUTPUT_LINE


def guard(text: str) -> str:
    """A formatted record as one log line and its continuation lines: controls escaped (not
    backslashes: see the module docstring), continuation lines indented, the whole bounded."""
    if len(text) <= LONGEST and text.isprintable():
        return text
    return _continued([_shorter(line) for line in _fewer(text.split("\n"))], 1)


def _fewer(lines: list[str]) -> list[str]:
    """``lines``, or their first and last ones (LINES_KEPT) and a line saying how many were left out."""
    first, last = LINES_KEPT
    if len(lines) <= first + last:
        return lines
    return lines[:first] + [f"... ({len(lines) - first - last} lines left out) ..."] + lines[-last:]


def _shorter(line: str) -> str:
    """``line`` with its controls escaped, and its middle left out if it is too long (LINE_KEPT)."""
    if len(line) <= LONGEST:
        return _controls_escaped(line)
    head, tail = LINE_KEPT
    # an escape is 4 to 10 characters: a part of controls only is cut again (one of them split)
    start = _controls_escaped(line[:head])[:4 * head]
    end = _controls_escaped(line[-tail:])[-4 * tail:]
    return f"{start} ... ({len(line) - head - tail} characters left out) ... {end}"


def _controls_escaped(line: str) -> str:
    if line.isprintable():
        return line
    return "".join([_escaped(c, False) for c in line])


def _continued(lines: list[str], first: int) -> str:
    """Lines joined by LF, those from ``first`` on indented unless they start with a space."""
    for i in range(first, len(lines)):
        if not lines[i].startswith(" "):
            lines[i] = INDENT + lines[i]
    return "\n".join(lines)


def _escaped(c: str, backslash: bool) -> str:
    if c == "\\":
        return "\\\\" if backslash else c
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): that byte
        return f"\\x{code - 0xDC00:02x}"
    if c.isprintable():
        return c
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


class DirectSink(Protocol):
    def takes(self, logger: logging.Logger, level: int) -> bool:
        """A line at ``level`` from ``logger`` would reach this sink alone, unfiltered."""

    def write_line(self, level: int, message: str) -> None:
        """Write it as logging would have, through this sink."""


_sink: DirectSink | None = None


def set_sink(sink: DirectSink | None) -> None:
    global _sink
    _sink = sink


def info(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.info(msg, *args)``, in one call when the direct sink takes the line.

    Text from the MTA or a script among ``args`` must be escaped (:func:`escape`): the direct
    path writes the line as it is (see the module docstring)."""
    sink = _sink
    if sink is not None and sink.takes(logger, INFO):
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):  # logging reports a bad format on stderr and goes on: so do we
            logger.info(msg, *args)
            return
        # bounded as a record is (guard): a sender or reply text from the MTA or a script is escaped,
        # but may be tens of kilobytes, once a message
        sink.write_line(INFO, message if len(message) <= LONGEST else guard(message))
    else:
        logger.info(msg, *args)
