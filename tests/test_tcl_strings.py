"""Any byte string survives a trip through Tcl string operations (the README's bytes rule)."""

from __future__ import annotations

import tkinter

from hypothesis import given, settings
from hypothesis import strategies as st

from pytclmilter.protocol.codec import text, wire
from pytclmilter.tcl.strings import from_tcl, to_tcl

TK = tkinter.Tcl().tk
TK.eval(
    """proc churn {a b} {
        # operations that make Tcl rebuild its string representation
        set s [string range "$a$b" 0 end]
        append s ""
        set s [string map {zzq zzq} $s]
        return [join [split $s ""] ""]
    }"""
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_bytes_survive_tcl_string_operations_split_anywhere(data: bytes, cut: int) -> None:
    cut = min(cut, len(data))
    result = TK.call("churn", to_tcl(text(data[:cut])), to_tcl(text(data[cut:])))
    assert wire(from_tcl(str(result))) == data


def test_tcl_counts_characters_not_escapes() -> None:
    assert TK.call("string", "length", to_tcl(text(b"\xff\x00\xc0\x80caf\xc3\xa9"))) == 8


def test_script_text_goes_out_as_utf8() -> None:
    assert wire(from_tcl(str(TK.call("format", "%s", "Grüße 😀")))) == "Grüße 😀".encode()
