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
"""

from __future__ import annotations

import re
from typing import Any

# Surrogates are written with chr(): mypyc refuses them in string literals (tcl/ is compiled).
_ED = chr(0xDCED)  # the escaped byte ED that starts a CESU-8 surrogate
_TO_TCL = re.compile(f"[\x00{chr(0xDC80)}-{chr(0xDCFF)}]")
_FROM_TCL = re.compile(f"{_ED}([{chr(0xDCB2)}{chr(0xDCB3)}])([{chr(0xDC80)}-{chr(0xDCBF)}])")
_NUL_FOR_TCL = chr(0xDCC0) + chr(0xDC80)  # the bytes C0 80: Tcl's NUL


def _cesu(m: re.Match[str]) -> str:
    cp = ord(m.group())
    if cp == 0:
        return _NUL_FOR_TCL
    return _ED + chr(0xDC80 | ((cp >> 6) & 0x3F)) + chr(0xDC80 | (cp & 0x3F))


def _join(m: re.Match[str]) -> str:
    return chr(0xD000 | ((ord(m.group(1)) & 0x3F) << 6) | (ord(m.group(2)) & 0x3F))


def to_tcl(value: str) -> str:
    """A str as tkinter must be given it so that Tcl holds exactly our characters."""
    if value.isascii() and "\x00" not in value:
        return value
    return _TO_TCL.sub(_cesu, value)


def from_tcl(value: str) -> str:
    """A str tkinter gave us from Tcl, with our escaped bytes restored."""
    if value.isascii() or _ED not in value:
        return value
    return _FROM_TCL.sub(_join, value)


def deep_to_tcl(value: Any) -> Any:
    """Convert a result for Tcl: strings, and strings inside tuples and lists."""
    if isinstance(value, str):
        return to_tcl(value)
    if isinstance(value, (tuple, list)):
        return tuple(deep_to_tcl(v) for v in value)
    return value
