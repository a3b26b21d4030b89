"""SMTP reply text as smfi_setreply and smfi_setmlreply build it, checked as the MTAs read it.

Apart from context.py because a reply is text with rules of its own (codes, their classes, an
extended code given twice, controls, a lone %, libmilter's line and line-count limits), which
setreply and setmlreply only store. The wire size of a line and MilterError come from checks.py,
below it.
"""

from __future__ import annotations

import re
from typing import Final

from .checks import MilterError, shown, wire_size
from .logline import escape

#: A reply code (RFC 5321 4.2): a milter may only refuse, temporarily or for good.
_RCODE: Final = re.compile(r"[45][0-9][0-9]\Z")
#: An extended code (RFC 3463): class.subject.detail.
_XCODE: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
#: An extended code that opens a text given without one (``setreply 550 "5.7.1 go away"``).
_LEADING_XCODE: Final = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |\Z)")
#: In a reply text: any C0 control but tab, DEL, and the C1 controls, which reach the SMTP client's
#: terminal as they are (U+009B is ESC [ to a terminal that takes C1 in UTF-8, as xterm does; U+0085
#: is a line break to some).
_REPLY_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
#: A % not doubled, which Sendmail's printf-style formatting and Postfix would not send as it is.
_LONE_PERCENT: Final = re.compile(r"(?<!%)%(?:%%)*(?!%)")
#: libmilter's MAXREPLYLEN (bytes, as its strlen counts) and MAXREPLIES (smfi.c). 32 lines of 980
#: bytes with their codes make 32 KB at most: a reply always fits the smallest packet size (65535).
MAX_REPLY_LINE: Final = 980
MAX_REPLY_LINES: Final = 32


def _reply_line(text: str) -> str:
    """One line of reply text as it may go out. Postfix 3.7 and Sendmail 8.17 pass a control
    character in it on to the SMTP client as it is (an ESC reaches the client's terminal and
    logs), so any but the tab RFC 5321 allows is refused (C1's too), not only the CR, LF and NUL
    libmilter refuses."""
    if wire_size(text) > MAX_REPLY_LINE:
        raise MilterError(f"reply text longer than {MAX_REPLY_LINE} bytes")
    bad = _REPLY_CONTROL.search(text)
    if bad is not None:
        raise MilterError("reply text must not contain CR, LF, NUL or other control characters "
                          f"({escape(bad.group())})")
    if _LONE_PERCENT.search(text):
        # Sendmail formats replies printf-style and Postfix drops a lone %: write %% for a percent sign.
        raise MilterError(f'reply text "{shown(text)}": a lone % must be written %%')
    return text


def _check_codes(rcode: str, xcode: str | None) -> None:
    if not _RCODE.match(rcode):
        raise MilterError(f'invalid reply code "{shown(rcode)}": must be 4xx or 5xx')
    if xcode and not _XCODE.match(xcode):
        raise MilterError(f'invalid extended code "{shown(xcode)}": must be like 5.7.1')
    if xcode and xcode[0] != rcode[0]:
        raise MilterError(f'extended code "{xcode}" does not match reply code "{rcode}"')


def _opening_code(text: str) -> str | None:
    """The extended code a text opens with (followed by a space or nothing), if any."""
    found = _LEADING_XCODE.match(text)
    return found.group(1) if found else None


def _check_bare_text(rcode: str, message: str) -> None:
    """A text given without an extended code follows the reply code, where the MTAs look for one:
    Postfix 3.7 calls ``550 4 apples`` malformed (a digit after the code other than its first) and
    answers the client 451 4.3.5. So a leading digit must open a whole extended code of the class."""
    if not message or message[0] not in "0123456789":
        return
    opening = _opening_code(message)
    if opening is None:
        raise MilterError(f'reply text "{shown(message)}" starts with a digit, which MTAs read as an extended '
                          f'code: give the extended code too, like {rcode[0]}.0.0')
    _check_codes(rcode, opening)


def _after_code(xcode: str, text: str) -> str:
    """The text without an opening extended code that repeats ``xcode``: libmilter would put both
    (``550 5.7.1 5.7.1 go away``) and both MTAs pass that on, where the script meant one code."""
    opening = _opening_code(text)
    if opening is None:
        return text
    if opening != xcode:
        raise MilterError(f'reply text "{shown(text)}" opens with the extended code {opening}, '
                          f"but the reply's is {xcode}: give one")
    return text[len(opening) + 1:]


def build_reply(rcode: str, xcode: str | None = None, message: str | None = None) -> str:
    """smfi_setreply's text: ``550 5.7.1 msg``, ``550 msg``, ``550 5.7.1``, ``550 ``."""
    _check_codes(rcode, xcode)
    text = rcode + " "
    if xcode:
        text += xcode
        if message is not None:
            text += " " + _reply_line(_after_code(xcode, message))
    elif message is not None:
        _check_bare_text(rcode, message)
        text += _reply_line(message)
    return text


def build_mlreply(rcode: str, xcode: str | None, lines: list[str]) -> str:
    """smfi_setmlreply's text: lines joined by CRLF, all but the last with a hyphen. Without an
    xcode, the one the first line opens with, else 4.0.0 or 5.0.0 (libmilter always the latter)."""
    _check_codes(rcode, xcode)
    if not 1 <= len(lines) <= MAX_REPLY_LINES:
        raise MilterError(f"a multi-line reply needs 1 to {MAX_REPLY_LINES} lines, got {len(lines)}")
    if not xcode:
        xcode = _opening_code(lines[0]) or f"{rcode[0]}.0.0"
        _check_codes(rcode, xcode)
    last = len(lines) - 1
    return "\r\n".join(f"{rcode}{'-' if i < last else ' '}{xcode} {_reply_line(_after_code(xcode, t))}"
                       for i, t in enumerate(lines))
