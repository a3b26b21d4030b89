"""Any byte string survives a trip through Tcl string operations (the README's bytes rule)."""

from __future__ import annotations

import random
import subprocess
import sys
import tkinter
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pytclmilter.compiled import compiled_modules
from pytclmilter.protocol.codec import text, wire
from pytclmilter.tcl.strings import (ascii_text_python, from_tcl, tcl_to_wire, tcl_to_wire_python, to_tcl,
                                     wire_to_tcl, wire_to_tcl_python)

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


def test_a_nul_in_ascii_text_survives_tcls_case_commands() -> None:
    """A value from Python (setpriv, a Python command's result) with a NUL and nothing but ASCII:
    handed to Tcl as it is, Tcl keeps a raw NUL byte, and `string toupper` ends the text there."""
    assert from_tcl(str(TK.call("string", "toupper", to_tcl("a\0b")))) == "A\0B"


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


# The C module (_tclbytes.c, built with the mypyc modules) and the pure-Python functions it
# replaces must give the same bytes for any input, Tcl's form or not: the pure install runs the
# latter. Pieces that each take a different turn in either, joined and cut anywhere (a character
# split between two MTA blocks); many EDs take the Python functions' many-escapes way.
PIECES = [b"\x00", b"a", b"\xc0\x80", b"\xc0", b"\x80", b"\xbf", b"\xff", b"\xf5", b"\xed", b"\xed\xb2", b"\xed\xb3",
          b"\xed\xb2\x80", b"\xed\xb3\xbf", b"\xed\xa0\x80", b"\xed\xb0\x80", b"\xed\xaf\xbf\xed\xbf\xbf",
          b"\xed\x9f\xbf", "é".encode(), "€".encode(), "😀".encode(), b"\xe0\x80\x80", b"\xe0\xa0",
          b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\xc1\xbf", b"\xe2\x82"]
JOINED = st.lists(st.sampled_from(PIECES), max_size=400).map(b"".join)


def native() -> Any:
    try:
        from pytclmilter.tcl import _tclbytes
    except ImportError:
        if compiled_modules():
            raise  # a compiled build without it would convert 8-bit bodies at a fraction of the speed
        pytest.skip("the pure-Python install has no C module (setup.py)")
    return _tclbytes


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=400), JOINED), st.integers(min_value=0, max_value=8),
       st.integers(min_value=0, max_value=8))
# Python's many-escapes way once read these as C0 (its second replace matched across the first's)
@example(b"\xed\xb3\xed\xb2\x80" * 20, 0, 0)
@example(b"\xed\xed\xb2\xb3\x80" * 20, 0, 0)
def test_the_c_conversions_give_the_python_ones_bytes(data: bytes, head: int, tail: int) -> None:
    c = native()
    data = data[head:len(data) - tail]
    assert c.wire_to_tcl(data) == wire_to_tcl_python(data) == to_tcl(text(data)).encode("utf-8", "surrogateescape")
    assert c.tcl_to_wire(data) == tcl_to_wire_python(data)
    assert c.tcl_to_wire(c.wire_to_tcl(data)) == data
    assert c.ascii_text(data) == ascii_text_python(data)


def test_ascii_text_takes_ascii_without_nul_only() -> None:
    c = native()
    for n in range(0, 20):
        plain = bytes(0x20 + (i * 7) % 0x5F for i in range(n))  # ASCII without NUL, every length up to 19
        assert c.ascii_text(plain) == ascii_text_python(plain) == plain.decode("ascii")
        for i in range(n):  # one other byte at each position: the 8-byte and the byte-wise parts
            for other in (b"\0", b"\x80", b"\xff"):
                assert c.ascii_text(plain[:i] + other + plain[i + 1:]) is None


def test_the_c_conversions_of_long_values() -> None:
    c = native()
    rng = random.Random(3)
    for data in (rng.randbytes(1 << 20), "Grüße, Köln 😀\r\n".encode() * 50000, bytes(range(256)) * 4000,
                 "Grüße, Köln".encode("latin-1") * 50000, b"plain ascii\r\n" * 50000):
        tcl = c.wire_to_tcl(data)
        assert tcl == wire_to_tcl_python(data)
        assert c.tcl_to_wire(tcl) == tcl_to_wire_python(tcl) == data
    ascii_text = b"plain ascii\r\n" * 50000
    assert c.wire_to_tcl(ascii_text) is ascii_text and c.tcl_to_wire(ascii_text) is ascii_text  # no copy


def test_tcl_changes_the_case_of_text_beyond_u_ffff_without_crashing() -> None:
    """Tcl 8.6 keeps such a character as a surrogate pair: given its 4-byte UTF-8 (as tkinter
    passes a str, or as identity bytes), `string tolower` crashed the process. In a child, so a
    crash is a failure here, not the end of the test run."""
    code = """if 1:
        import sys, tkinter
        from pytclmilter.protocol.codec import text, wire
        from pytclmilter.tcl.strings import from_tcl, tcl_to_wire, to_tcl, wire_to_tcl
        tk = tkinter.Tcl().tk
        data = "Gr\\u00fce \\U0001F600 \\U0010FFFF@X.org".encode() + bytes([255])
        lower = wire(from_tcl(str(tk.call("string", "tolower", to_tcl(text(data))))))
        tk.eval("proc up {b} {encoding convertto identity [string toupper [encoding convertfrom identity $b]]}")
        upper = tcl_to_wire(tk.call("up", wire_to_tcl(data)))
        print(repr((lower, upper)))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(("gr\u00fce \U0001F600 \U0010FFFF@x.org".encode() + b"\xff",
                                       "GR\u00dcE \U0001F600 \U0010FFFF@X.ORG".encode() + b"\xff"))
