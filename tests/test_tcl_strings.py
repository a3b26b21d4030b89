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
# The text stays in Tcl (::kept) from the bytes to the bytes: passed through Python as a str it
# would come back as tkinter writes it, not as Tcl keeps it.
TK.eval(
    """proc keep {a b how} {
        set s [encoding convertfrom identity $a][encoding convertfrom identity $b]
        switch -- $how {
            churned { set s [churn $s ""] }
            rebuilt { string length $s; set s [string range $s 0 end] }
        }
        set ::kept $s
    }
    proc kept_bytes {} { encoding convertto identity $::kept }"""
)
HOW = ["joined", "churned", "rebuilt"]  # rebuilt from its characters: a character beyond U+FFFF
                                         # is then written as a CESU-8 surrogate pair


def through_tcl(first: bytes, second: bytes, how: str) -> tuple[bytes, bytes]:
    """The two as one Tcl string: (tkinter's str of it, the old way, to wire; tcl_to_wire of its bytes)."""
    text_of = TK.call("keep", wire_to_tcl(first), wire_to_tcl(second), how)
    return wire(from_tcl(str(text_of))), tcl_to_wire(TK.call("kept_bytes"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300), st.sampled_from(HOW))
def test_byte_level_conversions_agree_with_the_str_path(data: bytes, cut: int, how: str) -> None:
    assert wire_to_tcl(data) == to_tcl(text(data)).encode("utf-8", "surrogateescape")
    cut = min(cut, len(data))
    assert through_tcl(data[:cut], data[cut:], how) == (data, data)


def test_byte_level_conversions_of_long_values_few_or_many_escapes() -> None:
    """UTF-8 text cut between two MTA blocks (a few escaped bytes), Latin-1 text (many), characters
    beyond U+FFFF that Tcl rewrote as surrogate pairs, NULs."""
    utf8 = "Grüße, naïve café 😀 € ".encode() * 3000
    cases = [utf8[1:-1], utf8[5:-2] + "Köln".encode("latin-1"), "Köln, ça va? ".encode("latin-1") * 3000,
             b"\0" + utf8 + b"\xc0\x80\xed\xa0\x80\xff", bytes(range(256)) * 300,
             b"x" * 30000 + "😀 Hangul 한".encode() + b"\xff\xed" + b"y" * 30000]
    for data in cases:
        assert wire_to_tcl(data) == to_tcl(text(data)).encode("utf-8", "surrogateescape")
        for how in HOW:
            assert through_tcl(data[:7], data[7:], how) == (data, data)
