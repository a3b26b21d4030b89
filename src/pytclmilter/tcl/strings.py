"""Strings across the tkinter boundary without losing a byte.

Our rule (README, "Bytes and text"): wire bytes become ``str`` decoded from
UTF-8 with ``surrogateescape``, so a byte that is not valid UTF-8 is the
character U+DC80+byte. tkinter, however, hands a ``str`` to Tcl as its
``surrogateescape`` UTF-8 encoding, i.e. such a character arrives in Tcl as
the raw invalid byte, which Tcl reads leniently (``C0 80`` even becomes NUL)
and rewrites as soon as it regenerates the string. So before a string goes
to Tcl we write each U+DC80..U+DCFF as the three bytes of its CESU-8 form
(what Tcl 8.6 itself uses for a surrogate code unit) and NUL as ``C0 80``
(Tcl's own NUL), both of which Tcl keeps through any string operation; on
the way back tkinter gives those three bytes to us as three escapes, which
we join again. The fast path (ASCII text) costs one ``isascii`` call.

Large values (body blocks, the body a script hands to ``replacebody``, private
data read from Python) do not go through ``str`` at all: :func:`wire_to_tcl`
gives the bytes Tcl keeps for the text of wire bytes, which Tcl takes as they
are with ``encoding convertfrom identity``, and :func:`tcl_to_wire` turns the
bytes ``encoding convertto identity`` gives back into wire bytes. Each is one
pass in C (``_tclbytes.c``, built with the mypyc modules); where that is not
built, :func:`wire_to_tcl_python` and :func:`tcl_to_wire_python` give the same
bytes in a few passes of Python's codecs and ``bytes.replace`` (C loops, but
the codecs take their error path for each byte that is not UTF-8).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Final

from ..checks import MilterError
from ..protocol.codec import text, wire

# Surrogates are written with chr(): mypyc refuses them in string literals (tcl/ is compiled).
_ED = chr(0xDCED)  # the escaped byte ED that starts a CESU-8 surrogate
_TO_TCL = re.compile(f"[\x00{chr(0xD800)}-{chr(0xDFFF)}]")
# Any surrogate Tcl keeps (ED A0..BF xx): the bytes rule's escapes (ED B2|B3 xx) and the others,
# which must reach Python as the character they are in Tcl, so that sending one is refused.
_FROM_TCL = re.compile(f"{_ED}([{chr(0xDCA0)}-{chr(0xDCBF)}])([{chr(0xDC80)}-{chr(0xDCBF)}])")
_BYTE_ESCAPE = re.compile(f"{_ED}([{chr(0xDCB2)}{chr(0xDCB3)}])([{chr(0xDC80)}-{chr(0xDCBF)}])")  # escapes only
_CESU_PAIR = re.compile(f"{_ED}([{chr(0xDCA0)}-{chr(0xDCAF)}])([{chr(0xDC80)}-{chr(0xDCBF)}])"
                        f"{_ED}([{chr(0xDCB0)}-{chr(0xDCBF)}])([{chr(0xDC80)}-{chr(0xDCBF)}])")
_TCL_NUL: Final = b"\xc0\x80"
# A character beyond U+FFFF: Tcl 8.6 keeps it as a CESU-8 surrogate pair, and its case commands
# (string tolower, toupper, totitle) crash the process on the 4-byte UTF-8 form.
_ASTRAL = re.compile(f"[{chr(0x10000)}-{chr(0x10FFFF)}]")
_FOUR_BYTES: Final = re.compile(b"[\xf0-\xf4][\x80-\xbf]{3}")
_HIGH_SURROGATE: Final = re.compile(b"\xed[\xa0-\xaf]")  # how Tcl begins a CESU-8 surrogate pair
# A surrogate Tcl keeps that is no escape (ED B2|B3 xx), then one that is not in a pair either.
_NOT_ESCAPE: Final = re.compile(b"\xed[\xa0-\xb1\xb4-\xbf]")
_LONE_CESU: Final = re.compile(b"\xed[\xa0-\xaf][\x80-\xbf](?!\xed[\xb0-\xbf])"
                               b"|(?<!\xed[\xa0-\xaf][\x80-\xbf])\xed[\xb0\xb1\xb4-\xbf][\x80-\xbf]")
# An escaped byte ED B2|B3 xx after every byte was written as its Latin-1 character in UTF-8:
# ED -> C3 AD, B2 -> C2 B2, xx (80..BF) -> C2 xx. What replaces it is the lead byte that, with
# the xx left behind, is the UTF-8 of the character whose Latin-1 byte is the escaped byte.
_ESCAPED_80_BF: Final = b"\xc3\xad\xc2\xb2\xc2"
_ESCAPED_C0_FF: Final = b"\xc3\xad\xc2\xb3\xc2"
# The second replace would also match where the first one's C2 follows an ED B3 or an ED that is
# no escape (ED B3 + ED B2 80, ED + ED B2 B3 + 80). Tcl never keeps such bytes (an ED it writes
# begins a character), but a script's `encoding convertfrom identity` can: the slow way then.
_ED_ED: Final = b"\xed\xed"
_ED_B3_ED: Final = b"\xed\xb3\xed"


def _join(m: re.Match[str]) -> str:
    return chr(0xD000 | ((ord(m.group(1)) & 0x3F) << 6) | (ord(m.group(2)) & 0x3F))


def to_tcl(value: str) -> str:
    """A str as tkinter must be given it so that Tcl holds exactly our characters.

    ``surrogatepass`` writes each U+DC80..U+DCFF as its CESU-8 bytes, which ``surrogateescape``
    then reads back as three escapes, each of which tkinter sends as that byte: C loops only.
    A character beyond U+FFFF goes as its surrogate pair, in CESU-8 too, as Tcl itself keeps it,
    and so does any other surrogate (JSON's lone "\\ud800"): tkinter cannot encode one, and
    where it fails inside a tuple (an answer's) it does not check, and the process crashes.
    """
    if value.isascii() and "\x00" not in value:
        return value
    if _TO_TCL.search(value) is None and _ASTRAL.search(value) is None:  # plain text: as it is
        return value
    return _ASTRAL.sub(_split_pair, value).encode("utf-8", "surrogatepass").replace(b"\0", _TCL_NUL).decode("utf-8", "surrogateescape")


def _split_pair(m: re.Match[str]) -> str:
    """A character beyond U+FFFF as its UTF-16 surrogate pair (two characters)."""
    code = ord(m.group(0)) - 0x10000
    return chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF))


def _pair_bytes(m: re.Match[bytes]) -> bytes:
    """The UTF-8 of a character beyond U+FFFF as the CESU-8 of its surrogate pair."""
    return _ASTRAL.sub(_split_pair, m.group(0).decode("utf-8")).encode("utf-8", "surrogatepass")


def from_tcl(value: str) -> str:
    """A str tkinter gave us from Tcl, with our escaped bytes restored, and any other surrogate
    (``[format %c 0xD800]``, left by tkinter as the escapes of its CESU-8) the one character it
    is in Tcl: sent to the MTA, its bytes would be no UTF-8, and context refuses it instead."""
    if value.isascii() or _ED not in value:
        return value
    return _FROM_TCL.sub(_join, value)


def wire_to_tcl_python(data: bytes) -> bytes:
    """The bytes Tcl keeps for the text of these wire bytes (``encoding convertfrom identity``).

    Valid UTF-8 is kept as it is; each other byte becomes its U+DC80+byte character, which Tcl
    writes in CESU-8 (ED B2|B3 xx), and NUL becomes C0 80, Tcl's own NUL: the same bytes as
    ``to_tcl(text(data))`` handed to tkinter.
    """
    if not data.isascii():
        data = _escape_invalid(data)
        if _FOUR_BYTES.search(data) is not None:  # (only valid UTF-8 is left 4 bytes long)
            data = _FOUR_BYTES.sub(_pair_bytes, data)
    return data.replace(b"\0", _TCL_NUL) if b"\0" in data else data


def _escape_invalid(data: bytes) -> bytes:
    """Valid UTF-8 kept, every other byte in CESU-8 (``surrogatepass`` writes them so)."""
    # UTF-8 text cut into the MTA's 64 KB blocks is invalid only at the ends: the rest of a
    # character that began in the block before, the start of one that the next block ends.
    head = 0
    while head < 3 and head < len(data) and 0x80 <= data[head] < 0xC0:
        head += 1
    end = len(data) - _cut_off(data)
    try:
        str(memoryview(data)[head:end], "utf-8")
    except UnicodeDecodeError:  # not UTF-8 text: each invalid byte escaped by the codecs
        return data.decode("utf-8", "surrogateescape").encode("utf-8", "surrogatepass")
    if head == 0 and end == len(data):
        return data
    return _escaped(data[:head]) + data[head:end] + _escaped(data[end:])


def _cut_off(data: bytes) -> int:
    """How many bytes at the end begin a character that the data does not complete (0 to 3)."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if byte >= 0xC0:  # a lead byte: the character needs 2, 3 or 4 bytes
            return back if back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4) else 0
        if byte < 0x80:
            return 0
    return 0


def _escaped(data: bytes) -> bytes:
    return data.decode("utf-8", "surrogateescape").encode("utf-8", "surrogatepass")


def tcl_to_wire_python(data: bytes) -> bytes:
    """Wire bytes for the text Tcl keeps in these bytes (``encoding convertto identity``).

    The inverse of :func:`wire_to_tcl_python`, and for any Tcl string without a lone surrogate
    (:func:`tcl_body_to_wire` refuses one; this keeps its CESU-8, as the C function does) the same
    bytes as ``wire(from_tcl(...))`` of what tkinter makes of it: C0 80 is NUL, each escaped byte
    (ED B2|B3 xx) becomes that byte, everything else is kept.
    """
    if b"\xc0" in data:  # (memchr: searching for both bytes at once is fifty times slower)
        data = data.replace(_TCL_NUL, b"\0")
    if b"\xed" not in data:  # no escaped byte: text as it is
        return data
    # A few escaped bytes (UTF-8 text cut between two MTA blocks): one step each is cheaper than
    # passes over all the bytes; split stops counting at that many.
    few = max(16, len(data) >> 12)
    parts = data.split(b"\xed", few)
    if len(parts) <= few:
        unescaped = _unescape(parts)
        if unescaped is not None:
            return unescaped
    elif _HIGH_SURROGATE.search(data) is None and _ED_ED not in data and _ED_B3_ED not in data:
        # Every byte as its Latin-1 character in UTF-8, each escaped byte rewritten as the
        # character of its byte, and back: what was not an escaped byte comes out as it went in.
        data = data.decode("latin-1").encode("utf-8")
        data = data.replace(_ESCAPED_80_BF, b"\xc2").replace(_ESCAPED_C0_FF, b"\xc3")
        return data.decode("utf-8").encode("latin-1")
    # A character beyond U+FFFF that Tcl rewrote as a surrogate pair: tkinter joins those pairs,
    # so this follows tkinter's way exactly (one regex call per pair and escaped byte).
    # (Only the escapes joined: a lone surrogate stays its CESU-8 bytes, as the C function keeps it.)
    return wire(_BYTE_ESCAPE.sub(_join, _CESU_PAIR.sub(_join_pair, data.decode("utf-8", "surrogateescape"))))


def tcl_body_to_wire(data: bytes) -> bytes:
    """:func:`tcl_to_wire` of a new body, refused (MilterError) where it holds a surrogate that
    is neither an escaped byte nor half of a pair: tcl_to_wire would send its CESU-8 bytes, no
    UTF-8, as context refuses it in text. One memchr for a body without ED, one search else."""
    if b"\xed" in data and _NOT_ESCAPE.search(data) is not None:
        lone = _LONE_CESU.search(data)
        if lone is not None:
            code = 0xD000 | ((lone[0][1] & 0x3F) << 6) | (lone[0][2] & 0x3F)
            raise MilterError(f"replacebody: the new body holds U+{code:04X}, a surrogate that is no byte "
                              "(those are U+DC80..U+DCFF): it has no UTF-8 to send")
    return tcl_to_wire(data)


def tcl_to_text(data: bytes) -> str:
    """The ``str`` of the text Tcl keeps in these bytes (``encoding convertto identity``), as
    :func:`from_tcl` gives it of what tkinter makes of the same text: ``text(tcl_to_wire(data))``,
    but for a surrogate that is neither an escaped byte nor half of a pair (``[format %c
    0xD800]``), which is that one character, not the three escaped bytes of its CESU-8 (wire
    bytes ED A0 80 that no MTA sent, and that context would send). One memchr without ED."""
    if b"\xed" not in data or _NOT_ESCAPE.search(data) is None or _LONE_CESU.search(data) is None:
        return text(tcl_to_wire(data))
    escaped = data.replace(_TCL_NUL, b"\0").decode("utf-8", "surrogateescape")
    return _FROM_TCL.sub(_join, _CESU_PAIR.sub(_join_pair, escaped))


def _unescape(parts: list[bytes]) -> bytes | None:
    """The bytes split at each ED joined again, ED B2 xx as the byte xx and ED B3 xx as xx + 40;
    None if an ED begins a CESU-8 surrogate pair (ED A0..AF)."""
    out: list[bytes | memoryview] = [parts[0]]
    for part in parts[1:]:
        second = part[0] if part else 0
        if (second == 0xB2 or second == 0xB3) and len(part) > 1 and 0x80 <= part[1] < 0xC0:
            out.append(bytes((part[1] + (second - 0xB2) * 0x40,)))
            out.append(memoryview(part)[2:])
        elif 0xA0 <= second < 0xB0:
            return None
        else:
            out.append(b"\xed")
            out.append(part)
    return b"".join(out)


def _join_pair(m: re.Match[str]) -> str:
    """A CESU-8 surrogate pair, read as escapes, joined into its character (as tkinter does)."""
    high = 0xD000 | ((ord(m.group(1)) & 0x3F) << 6) | (ord(m.group(2)) & 0x3F)
    low = 0xD000 | ((ord(m.group(3)) & 0x3F) << 6) | (ord(m.group(4)) & 0x3F)
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))


def ascii_text_python(data: bytes) -> str | None:
    """The text of bytes that are ASCII without NUL (Tcl takes it as it is); None for others."""
    return data.decode("ascii") if data.isascii() and b"\0" not in data else None


def _native() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes], Callable[[bytes], str | None]]:
    """The C functions of ``_tclbytes`` where they are built, else the Python ones."""
    try:
        from . import _tclbytes
    except ImportError:  # an editable or PYTCLMILTER_PURE=1 install, or no C compiler
        return wire_to_tcl_python, tcl_to_wire_python, ascii_text_python
    return _tclbytes.wire_to_tcl, _tclbytes.tcl_to_wire, _tclbytes.ascii_text


wire_to_tcl, tcl_to_wire, ascii_text = _native()


def deep_to_tcl(value: Any) -> Any:
    """Convert a result for Tcl: strings, and strings inside tuples and lists."""
    if isinstance(value, str):
        return to_tcl(value)
    if isinstance(value, (tuple, list)):
        return tuple(deep_to_tcl(v) for v in value)
    return value
