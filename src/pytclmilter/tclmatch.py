"""Tcl's ``string match`` in Python, for the private-data patterns of ``unsetpriv``.

Apart from context.py because it is a matcher, not a part of the context: the Tcl bridge
(tcl/context_cmd.py) unsets the Python half of the private data with the same rules, and Tcl's
own ``string match`` is what a script expects of the pattern, so it is written here once.
"""

from __future__ import annotations

from typing import Any


def _glob_step(pattern: str, at: int, char: str) -> int | None:
    """Where Tcl's ``string match`` goes on in ``pattern`` after matching ``char`` at ``at`` (not
    a ``*``), or None where it fails: Tcl_StringCaseMatch's rules, followed to the letter."""
    end = len(pattern)
    if at >= end:
        return None
    p = pattern[at]
    if p == "?":
        return at + 1
    if p == "\\":  # escapes the next character; a trailing one matches nothing
        return at + 2 if at + 1 < end and pattern[at + 1] == char else None
    if p != "[":
        return at + 1 if p == char else None
    at += 1
    while True:  # ranges in either order; "]" or the end before a match fails
        if at >= end or pattern[at] == "]":
            return None
        first, at = pattern[at], at + 1
        if at < end and pattern[at] == "-":
            if at + 1 >= end:
                return None
            last, at = pattern[at + 1], at + 2
            if min(first, last) <= char <= max(first, last):
                break
        elif first == char:
            break
    close = pattern.find("]", at)  # the rest of the class; an unclosed one ends the pattern
    return end if close < 0 else close + 1


def _glob_closure(pattern: str, states: set[int]) -> set[int]:
    """The states with each ``*`` also matching nothing."""
    out = set(states)
    for at in states:
        while at < len(pattern) and pattern[at] == "*":
            at += 1
            out.add(at)
    return out


def tcl_match(pattern: str, text: str) -> bool:
    """Tcl's ``string match``, as the script's half of the private data is matched (a regular
    expression made of the pattern differed: ``[z-a]`` or ``[]a]`` raised, a trailing backslash
    matched). Every position of the pattern is followed at once, so no pattern backtracks."""
    states = _glob_closure(pattern, {0})
    for char in text:
        following: set[int] = set()
        for at in states:
            if at < len(pattern) and pattern[at] == "*":
                following.add(at)
            else:
                step = _glob_step(pattern, at, char)
                if step is not None:
                    following.add(step)
        if not following:
            return False
        states = _glob_closure(pattern, following)
    return len(pattern) in states


def unset_matching(priv: dict[str, Any], pattern: str | None) -> None:
    """Remove the names matching the Tcl glob pattern; all without a pattern."""
    if pattern is None:
        priv.clear()
        return
    for key in [k for k in priv if tcl_match(pattern, k)]:
        del priv[key]
