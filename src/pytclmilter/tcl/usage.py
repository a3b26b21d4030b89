"""Tcl-style argument errors, worded as Tcl's own C API words them.

A Tcl programmer expects ``wrong # args: should be "..."``, ``bad option
"-x": must be a, b, or c`` and ``expected integer but got "x"``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence


class TclUsageError(Exception):
    """Raised by Python-backed Tcl commands; its text becomes the Tcl error message."""


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
    return TclUsageError(f'bad {kind} "{value}": must be {listed}')


def wrong_args(usage: str) -> TclUsageError:
    return TclUsageError(f'wrong # args: should be "{usage}"')


def count_ok(count: int, low: int, high: int | None) -> bool:
    """``low`` to ``high`` arguments (None: no upper bound)."""
    return low <= count and (high is None or count <= high)


def check_count(args: Sequence[str], low: int, high: int | None, usage: str) -> None:
    if not count_ok(len(args), low, high):
        raise wrong_args(usage)


def integer(value: Any) -> int:
    if type(value) is str and value.isdigit() and value.isascii():  # the usual case, e.g. a context id
        return int(value)
    try:
        return int(str(value).strip(), 0) if str(value).strip()[:2].lower() in ("0x", "0o", "0b") else int(value)
    except (TypeError, ValueError):
        raise TclUsageError(f'expected integer but got "{value}"') from None


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
    raise TclUsageError(f'expected boolean value but got "{value[:50]}"')  # Tcl quotes 50 at most


def number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TclUsageError(f'expected floating-point number but got "{value}"') from None
