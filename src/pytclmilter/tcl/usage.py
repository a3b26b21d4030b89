"""Tcl-style argument errors, worded as Tcl's own C API words them.

A Tcl programmer expects ``wrong # args: should be "..."``, ``bad option
"-x": must be a, b, or c`` and ``expected integer but got "x"``.
"""

from __future__ import annotations

import re
from typing import Any, Final, Iterable, Sequence


#: The errorCode Tcl 8.6's C API sets with each kind of error (a `try ... trap {TCL WRONGARGS}`
#: matches on it); NONE where Tcl sets none, as for a message of TclMilter's own.
NONE: Final = ("NONE",)
WRONGARGS: Final = ("TCL", "WRONGARGS")
VALUE_NUMBER: Final = ("TCL", "VALUE", "NUMBER")


#: What the Python half of a command answers its Tcl proc (tclmilter.tcl): ("ok", value) or
#: ("error", message, errorCode).
Answer = tuple[Any, ...]


class TclUsageError(Exception):
    """Raised by Python-backed Tcl commands; its text becomes the Tcl error message, ``code`` its
    errorCode."""

    def __init__(self, message: str, code: tuple[str, ...] = NONE) -> None:
        super().__init__(message)
        self.code = code


#: Letters whose names start with a vowel sound ("an SMTPError", "an HTTPMessage", "a UUID").
_VOWEL_NAMED: Final = frozenset("AEFHILMNORSX")
_ACRONYM: Final = re.compile(r"[A-Z]{2}")


#: Word starts whose vowel letter is read as a consonant sound: "you" and "won".
_READ_YOU_OR_WON: Final = ("uni", "use", "usu", "uti", "ura", "eu", "one", "once")


def with_article(name: str) -> str:
    """``name`` after "a" or "an" as it is read aloud: a word by its first letter (``an object``,
    ``a set``), an acronym by its first letter's name (``a UUID``, ``an HTTPMessage``)."""
    if _ACRONYM.match(name):
        vowel = name[0] in _VOWEL_NAMED
    else:  # a vowel letter, unless read as "you" or "one" (a UserDict, a Unicode..., a OneShot)
        vowel = name[:1].lower() in ("a", "e", "i", "o", "u") and not name.lower().startswith(_READ_YOU_OR_WON)
    return ("an " if vowel else "a ") + name


def one_of(kind: str, value: str, choices: Iterable[str]) -> str:
    """Tcl_GetIndexFromObj without abbreviations: the value, or `bad KIND "value": must be ...`."""
    if value in choices:
        return value
    raise bad_choice(kind, value, choices)


def bad_choice(kind: str, value: str, choices: Iterable[str]) -> TclUsageError:
    options = sorted(choices)
    if len(options) == 1:
        listed = options[0]
    else:
        listed = ", ".join(options[:-1]) + (", or " if len(options) > 2 else " or ") + options[-1]
    return TclUsageError(f'bad {kind} "{value}": must be {listed}', ("TCL", "LOOKUP", "INDEX", kind, value))


def wrong_args(usage: str) -> TclUsageError:
    return TclUsageError(f'wrong # args: should be "{usage}"', WRONGARGS)


def count_ok(count: int, low: int, high: int | None) -> bool:
    """``low`` to ``high`` arguments (None: no upper bound)."""
    return low <= count and (high is None or count <= high)


def check_count(args: Sequence[str], low: int, high: int | None, usage: str) -> None:
    if not count_ok(len(args), low, high):
        raise wrong_args(usage)


#: An integer as Tcl 8.6 reads one (Tcl_GetIntFromObj): white space around it, a sign, then 0x
#: hex, 0o octal, 0b binary, a leading 0 octal ("012" is 10, "08" no integer), else decimal.
_TCL_INTEGER: Final = re.compile(
    r"[ \t\n\v\f\r]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|0[oO]([0-7]+)|0[bB]([01]+)|(0[0-7]*)|([1-9][0-9]*))[ \t\n\v\f\r]*")
_BASES: Final = (16, 8, 2, 8, 10)


def integer(value: Any) -> int:
    """Tcl_GetIntFromObj's reading of ``value`` (_TCL_INTEGER), in Tcl's words when it is none."""
    text = str(value)
    if text.isdigit() and text.isascii() and text[0] != "0":  # the usual case, e.g. a context id
        return int(text)
    m = _TCL_INTEGER.fullmatch(text)
    if m is None:
        raise TclUsageError(f'expected integer but got "{text}"', VALUE_NUMBER)
    for digits, base in zip(m.groups()[1:], _BASES):
        if digits is not None:
            n = int(digits, base)
            return -n if m.group(1) == "-" else n
    raise AssertionError("the pattern has one group of digits")


# Tcl_GetBoolean's words, each with the shortest prefix that is not ambiguous ("o": on or off?)
_BOOLEAN_WORDS = (("yes", 1, True), ("true", 1, True), ("on", 2, True),
                  ("no", 1, False), ("false", 1, False), ("off", 2, False))


def boolean(value: str) -> bool:
    """Tcl_GetBoolean: 0, 1, or a prefix of yes/no/true/false/on/off, any case, no spaces.

    Other integers ("2", "00") are not booleans to Tcl's option parsers (`fconfigure -blocking
    2` is an error), so they are not here either.
    """
    if value in ("0", "1"):
        return value == "1"
    word = value.lower()
    for full, shortest, meaning in _BOOLEAN_WORDS:
        if len(word) >= shortest and full.startswith(word):
            return meaning
    raise TclUsageError(f'expected boolean value but got "{value[:50]}"',  # Tcl quotes 50 at most
                        ("TCL", "VALUE", "BOOLEAN"))


#: A decimal number as Tcl 8.6 reads one (Tcl_GetDoubleFromObj): white space around it, a sign,
#: digits with a fraction or an exponent or both, or Inf/Infinity in any case. (Python's float()
#: takes "1_0" too, and not Tcl's integers, "0x10".)
_TCL_DECIMAL: Final = re.compile(
    r"[ \t\n\v\f\r]*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf(?:inity)?)[ \t\n\v\f\r]*",
    re.IGNORECASE)
#: Not a Number, which Tcl reads only to refuse it, in words of its own.
_TCL_NAN: Final = re.compile(r"[ \t\n\v\f\r]*[+-]?nan(?:\([0-9a-f]*\))?[ \t\n\v\f\r]*", re.IGNORECASE)
#: Digits after a leading 0, not all octal: Tcl reads them as an octal integer, and refuses them.
_NOT_OCTAL: Final = re.compile(r"[ \t\n\v\f\r]*[+-]?0[0-9]+[ \t\n\v\f\r]*")


def number(value: Any) -> float:
    """Tcl_GetDoubleFromObj's reading of ``value``: an integer in Tcl's forms (integer()), or a
    decimal number; in Tcl's words when it is none."""
    text = str(value)
    if _TCL_INTEGER.fullmatch(text):
        return float(integer(text))
    if _TCL_DECIMAL.fullmatch(text) and not _NOT_OCTAL.fullmatch(text):
        return float(text)
    if _TCL_NAN.fullmatch(text):
        raise TclUsageError("floating point value is Not a Number", ("TCL", "VALUE", "DOUBLE", "NAN"))
    octal = " (looks like invalid octal number)" if _NOT_OCTAL.fullmatch(text) else ""
    raise TclUsageError(f'expected floating-point number but got "{text}"{octal}', VALUE_NUMBER)
