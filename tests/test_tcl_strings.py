"""Any byte string survives a trip through Tcl string operations (the README's bytes rule)."""

from __future__ import annotations

import tkinter

from hypothesis import given, settings
from hypothesis import strategies as st

from pytclmilter.protocol.codec import text, wire
from pytclmilter.tcl.strings import from_tcl, tcl_to_wire, to_tcl, wire_to_tcl

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


# Large values skip str: Tcl takes wire_to_tcl's bytes with `encoding convertfrom identity` and gives
# back what tcl_to_wire reads with `encoding convertto identity`; both must agree with the str path.
TK.eval("proc text_of {bytes} { encoding convertfrom identity $bytes }")
TK.eval("proc bytes_of {text} { encoding convertto identity $text }")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300), st.booleans())
def test_byte_level_conversions_agree_with_the_str_path(data: bytes, cut: int, churn: bool) -> None:
    assert wire_to_tcl(data) == to_tcl(text(data)).encode("utf-8", "surrogateescape")
    cut = min(cut, len(data))
    a, b = TK.call("text_of", wire_to_tcl(data[:cut])), TK.call("text_of", wire_to_tcl(data[cut:]))
    joined = TK.call("churn", a, b) if churn else TK.call("string", "cat", a, b)
    assert tcl_to_wire(TK.call("bytes_of", joined)) == wire(from_tcl(str(joined))) == data


def test_byte_level_conversions_of_long_values_few_or_many_escapes() -> None:
    """UTF-8 text cut between two MTA blocks (a few escaped bytes), Latin-1 text (many), a character
    beyond U+FFFF that a Tcl string operation rewrote as a surrogate pair, NULs."""
    utf8 = "Grüße, naïve café 😀 € ".encode() * 3000
    cases = [utf8[1:-1], utf8[5:-2] + "Köln".encode("latin-1"), "Köln, ça va? ".encode("latin-1") * 3000,
             b"\0" + utf8 + b"\xc0\x80\xed\xa0\x80\xff", bytes(range(256)) * 300]
    for data in cases:
        assert wire_to_tcl(data) == to_tcl(text(data)).encode("utf-8", "surrogateescape")
        for tcl in (TK.call("text_of", wire_to_tcl(data)), TK.call("churn", TK.call("text_of", wire_to_tcl(data)), "")):
            assert tcl_to_wire(TK.call("bytes_of", tcl)) == wire(from_tcl(str(tcl))) == data
