"""What a filter's text and arguments must be before they may go on the wire, and their size there.

The checks every modification and setsymlist run (a header's name and value, an index, an
address, ESMTP arguments, macro names, a quarantine reason), the bytes of each packet they make,
and MilterError, which they raise: apart from context.py so that replies.py and the context both
build on them without knowing each other, and so that the context holds only what a callback
does to its message. A refused string is quoted escaped and clipped (:func:`shown`).
"""

from __future__ import annotations

import re
from typing import Final

from .logline import clip, escape, isprintable


class MilterError(ValueError):
    """A filter asked for something the protocol or the stage does not allow."""


#: RFC 5322 3.6.8 field-name: printable US-ASCII but colon (33-57, 59-126), so no UTF-8 either.
#: libmilter has no length limit of its own for a name (smfi_header in smfi.c checks only that it
#: is not empty): the whole packet must fit, as for every modification (see Context._granted).
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
#: In a header value: any C0 control but tab, and DEL (LF is allowed only to fold a line).
_VALUE_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_FOLD: Final = re.compile(r"\r?\n(?=[ \t])")
#: What must not be left once folds are LF + white space: a control but tab, or an LF that does not fold.
_NOT_FOLDING: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|\n(?![ \t])")
#: In an address, ESMTP arguments or a quarantine reason (one line of text): any C0 control, DEL.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
#: A macro name of more than one character, as the MTAs know it: ``{daemon_name}``.
_BRACED_MACRO: Final = re.compile(r"\{[^{}]+\}\Z")


def shown(text: str) -> str:
    """A refused string as an error message quotes it: its start only, escaped (logline.escape),
    so that the message stays one short line wherever it is printed or logged."""
    return escape(clip(text))


def wire_size(text: str) -> int:
    """Bytes of ``text`` on the wire; a MilterError where it cannot be sent (:func:`sendable`)."""
    return len(text) if text.isascii() else len(sendable(text))


def sendable(text: str) -> bytes:
    """``text`` as wire bytes (codec.wire), or a MilterError for a surrogate that is no escaped
    byte (U+DC80..U+DCFF): it has no UTF-8, and codec.wire would send U+FFFD in its place, the
    mail silently altered. Every modification's text is measured, so this is the one check."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise MilterError(f'"{shown(text)}" holds U+{ord(text[exc.start]):04X}, a surrogate that is no byte '
                          "(those are U+DC80..U+DCFF): it has no UTF-8 to send") from None


def check_name(command: str, *names: object) -> None:
    """A TypeError at the call for a name or text that is no str, as the compiled build gives: the
    pure source failed deep inside with an AttributeError (``'int' object has no attribute ...``)."""
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{command}: str expected; got {type(name).__name__}")


def check_header(what: str, name: str, value: str) -> str:
    """Validate a header for the method ``what``; returns the value with folding normalised to
    bare LF. A name or value that is no str failed in the pure source with "descriptor
    'isprintable' for 'str' objects doesn't apply to a 'int' object" (one isinstance each, inline:
    once a message; the compiled build refuses it at the call, in mypyc's words)."""
    if not (isinstance(name, str) and isinstance(value, str)):
        check_name(what, name, value)
    if not _HEADER_NAME.match(name):
        raise MilterError(f'invalid header name "{shown(name)}": must be printable ASCII, without colon or space')
    if isprintable(value) or _VALUE_CONTROL.search(value) is None:  # nearly always (isprintable: no regex call)
        return value
    value = _FOLD.sub("\n", value)
    bad = _NOT_FOLDING.search(value)
    if bad is not None:
        char = bad.group()[0]
        if char == "\r" or char == "\n":
            raise MilterError(f'invalid value for header "{shown(name)}": CR and LF are allowed only to fold a line')
        raise MilterError(f'invalid value for header "{shown(name)}": control character {escape(char)} '
                          "(tabs are allowed, and a newline only to fold a line)")
    return value


#: The largest header index both MTAs read as the number it is: Sendmail reads the field as a
#: signed 32-bit int (milter.c), so 4294967295 arrives as -1 and means the first header.
_WIRE_INDEX_MAX: Final = 0x7FFFFFFF


def check_index(index: int) -> int:
    """The index to send: one above 2147483647 is past any message's last header, and is sent as
    2147483647, which means just that to Sendmail too (it would take the bigger one as negative)."""
    if not isinstance(index, int):  # a float passed the range test, then failed the whole message at eom
        raise TypeError(f"header index: int expected; got {type(index).__name__}")
    if not 0 <= index <= 0xFFFFFFFF:  # the protocol's u32
        raise MilterError(f"bad index {index}: must be 0 to 4294967295")
    return min(index, _WIRE_INDEX_MAX)


def check_address(address: str, what: str = "address") -> str:
    if not address or _CONTROL.search(address):
        raise MilterError(f'invalid {what} "{shown(address)}": must be non-empty, '
                          "without CR, LF, NUL or other control characters")
    return address


def check_args(args: str | None) -> str | None:
    """The ESMTP arguments to send; None for none, also for "" or blanks (``[lrange $from 1 end]``
    of a MAIL without arguments): Sendmail takes an argument field, even an empty one, as new
    MAIL arguments, drops the client's (BODY, ENVID, RET) and relays an empty ``AUTH=``."""
    if args is None:
        return None
    if _CONTROL.search(args):
        raise MilterError("invalid ESMTP arguments: no CR, LF, NUL or other control characters")
    return args if args.strip() else None


def check_reason(reason: str) -> str:
    """A quarantine reason: one line of text, as the MTA logs and keeps it."""
    if not reason or _CONTROL.search(reason):
        raise MilterError("quarantine needs a non-empty reason without CR, LF, NUL or other control characters")
    return reason


def header_size(name: str, value: str, index: int) -> int:
    """Data bytes of a header packet: [u32 index,] name NUL value NUL (the name is ASCII)."""
    return index + len(name) + wire_size(value) + 2


def strings_size(first: str, second: str | None = None) -> int:
    """Data bytes of a packet of one or two NUL-terminated strings."""
    return wire_size(first) + 1 + (0 if second is None else wire_size(second) + 1)


def optneg_size(lists: list[str]) -> int:
    """Data bytes of the option negotiation reply carrying these macro lists: three u32, then
    each list as a u32 stage and a NUL-terminated string. It is sent before any MDS bit applies,
    so it must fit the protocol's 65535 bytes (libmilter's mi_wr_cmd refuses to send more)."""
    return 12 + sum(4 + wire_size(names) + 1 for names in lists)


def macro_list(names: list[str]) -> str:
    """setsymlist's names as the list sent: separated by spaces, no control character, and a
    name longer than one letter in braces, the only way the MTAs know it: asked for bare,
    Sendmail sends the macro of its first letter under that name (``daemon_name`` gets ``$d``,
    a date) and Postfix sends nothing. Tcl's ``list`` drops the braces of ``{daemon_name}``, or
    doubles them (``{{daemon_name}}``): the list is a string of names separated by spaces."""
    joined = " ".join(names)
    if _CONTROL.search(joined):
        raise MilterError(f'invalid macro list "{shown(joined)}": no NUL or other control characters')
    for name in names:
        if len(name) > 1 and _BRACED_MACRO.match(name) is None:
            braced = "{" + shown(name.strip("{}")) + "}"
            raise MilterError(f'invalid macro name "{shown(name)}": a name longer than one character '
                              f"is written in one pair of braces, {braced}")
    return joined


def macro_names(stage: object, macros: object) -> list[str]:
    """setsymlist's names, split; a TypeError for a stage or a list of the wrong type, which the
    pure source took (a float stage as its int, a list of numbers as their text)."""
    if not isinstance(stage, (int, str)):
        raise TypeError(f"setsymlist: int or str expected; got {type(stage).__name__}")
    if isinstance(macros, str):
        return macros.split()
    if not isinstance(macros, (list, tuple)):
        raise TypeError(f"setsymlist: str or a list of str expected; got {type(macros).__name__}")
    check_name("setsymlist", *macros)
    return list(macros)
