"""The per-connection context handed to every callback, Python or Tcl.

Method names are TclMilter's (``getpriv``, ``addheader`` ...). What a filter
asks for is validated here, so a bad reply code or header name is a clear
error in the callback that made it and never a malformed packet on the wire:
control characters, header names that are not RFC 5322 field names, a
modification whose action the MTA did not grant, or whose packet would be
larger than the MTA accepts. Modifications are collected and written together
with the final reply.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Final, Protocol, Sequence

from .logline import clip, escape, isprintable
from .protocol import events as ev
from .protocol.constants import MAX_DATA_SIZE, Action, MacroStage
from .protocol.macros import MacroStore
from .protocol.session import FilterSession


class MilterError(ValueError):
    """A filter asked for something the protocol or the stage does not allow."""


_MISSING: Final[Any] = object()
_RCODE: Final = re.compile(r"[45][0-9][0-9]\Z")
_XCODE: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
#: An extended code that opens a text given without one (``setreply 550 "5.7.1 go away"``).
_LEADING_XCODE: Final = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |\Z)")
#: RFC 5322 3.6.8 field-name: printable US-ASCII but colon (33-57, 59-126), so no UTF-8 either.
#: libmilter has no length limit of its own for a name (smfi_header in smfi.c checks only that it
#: is not empty): the whole packet must fit, as for every modification (see Context._granted).
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
#: In a header value: any C0 control but tab, and DEL (LF is allowed only to fold a line).
_VALUE_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: In a reply text: those, and the C1 controls, which reach the SMTP client's terminal as they are
#: (U+009B is ESC [ to a terminal that takes C1 in UTF-8, as xterm does; U+0085 is a line break to some).
_REPLY_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_FOLD: Final = re.compile(r"\r?\n(?=[ \t])")
#: What must not be left once folds are LF + white space: a control but tab, or an LF that does not fold.
_NOT_FOLDING: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|\n(?![ \t])")
#: In an address, ESMTP arguments or a quarantine reason (one line of text): any C0 control, DEL.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
#: A macro name of more than one character, as the MTAs know it: ``{daemon_name}``.
_BRACED_MACRO: Final = re.compile(r"\{[^{}]+\}\Z")
_LONE_PERCENT: Final = re.compile(r"(?<!%)%(?:%%)*(?!%)")
#: libmilter's MAXREPLYLEN (bytes, as its strlen counts) and MAXREPLIES (smfi.c). 32 lines of 980
#: bytes with their codes make 32 KB at most: a reply always fits the smallest packet size (65535).
MAX_REPLY_LINE: Final = 980
MAX_REPLY_LINES: Final = 32


#: What one message's modifications may queue until its end of message is answered. A script's
#: loop (``while 1 {$ctx addheader X-A $v}``) queued 150 MB a second until -calltimeout (60 s by
#: default) stopped it, and the process ran out of memory first; now the call that would pass a
#: bound fails (a Tcl error, a MilterError), so the callback fails and the message gets
#: -onerror (tempfail by default). Far above what real mail needs: a new body of 1 GiB (MTAs'
#: message size limits are tens of MB: Postfix's is 10 MB by default), 100 000 header, recipient
#: and sender changes (Sendmail keeps 32 KB of headers by default).
MAX_CHANGES: Final = 100_000
MAX_QUEUED: Final = 1 << 30


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


def unset_matching(priv: dict[str, Any], pattern: str | None) -> None:
    """Remove the names matching the Tcl glob pattern; all without a pattern."""
    if pattern is None:
        priv.clear()
        return
    for key in [k for k in priv if tcl_match(pattern, k)]:
        del priv[key]


class ScriptPrivate(Protocol):
    """Private data that a script interpreter keeps as its own values (tcl/priv.py).

    A Tcl script's setpriv stays in Tcl, so a body collected block by block is never copied
    across; the context's own dict holds what Python sets. Reads look here first, and a Python
    setpriv removes the name here, so the latest write wins whichever side made it.
    """

    def get(self, conn_id: int, name: str) -> Any:
        """The value, as Python sees it; KeyError if the script has not set it."""

    def items(self, conn_id: int) -> dict[str, Any]: ...

    def drop(self, conn_id: int, name: str) -> None: ...

    def unset(self, conn_id: int, pattern: str | None) -> None: ...


class ScriptCalls(Protocol):
    """Calls into the script a host runs (tcl/pycommands.py), for ``ctx.tcl`` and ``milter.tcl``."""

    def call(self, words: tuple[Any, ...]) -> str:
        """Run the command ``words``; its result as text, TclError for a Tcl error."""

    def call_list(self, words: tuple[Any, ...]) -> list[str]:
        """The same, its result split as a Tcl list."""


#: What ctx.tcl and milter.tcl say where no script is hosted (a Milter of a Python program).
NO_SCRIPT: Final = "no Tcl script runs with this milter (ctx.tcl and milter.tcl need pytclmilter run, try or check)"


def hosted(script: ScriptCalls | None) -> ScriptCalls:
    """The script ctx.tcl and milter.tcl call into; RuntimeError where none is hosted."""
    if script is None:
        raise RuntimeError(NO_SCRIPT)
    return script


def check_header(what: str, name: str, value: str) -> str:
    """Validate a header for the method ``what``; returns the value with folding normalised to
    bare LF. A name or value that is no str failed in the pure source with "descriptor
    'isprintable' for 'str' objects doesn't apply to a 'int' object" (one isinstance each, inline:
    once a message; the compiled build refuses it at the call, in mypyc's words)."""
    if not (isinstance(name, str) and isinstance(value, str)):
        _check_name(what, name, value)
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


_ADDHDRS: Final = int(Action.ADDHDRS)
_CHGHDRS: Final = int(Action.CHGHDRS)
_ADDRCPT: Final = int(Action.ADDRCPT)
_ADDRCPT_PAR: Final = int(Action.ADDRCPT_PAR)
_DELRCPT: Final = int(Action.DELRCPT)
_CHGFROM: Final = int(Action.CHGFROM)
_CHGBODY: Final = int(Action.CHGBODY)
_QUARANTINE: Final = int(Action.QUARANTINE)


def _header_size(name: str, value: str, index: int) -> int:
    """Data bytes of a header packet: [u32 index,] name NUL value NUL (the name is ASCII)."""
    return index + len(name) + wire_size(value) + 2


def _strings_size(first: str, second: str | None = None) -> int:
    """Data bytes of a packet of one or two NUL-terminated strings."""
    return wire_size(first) + 1 + (0 if second is None else wire_size(second) + 1)


def _optneg_size(lists: list[str]) -> int:
    """Data bytes of the option negotiation reply carrying these macro lists: three u32, then
    each list as a u32 stage and a NUL-terminated string. It is sent before any MDS bit applies,
    so it must fit the protocol's 65535 bytes (libmilter's mi_wr_cmd refuses to send more)."""
    return 12 + sum(4 + wire_size(names) + 1 for names in lists)


def _check_macro_names(names: list[str]) -> None:
    """A macro name longer than one letter is known to the MTAs only in braces: asked for bare,
    Sendmail sends the macro of its first letter under that name (``daemon_name`` gets ``$d``,
    a date) and Postfix sends nothing. Tcl's ``list`` drops the braces of ``{daemon_name}``, or
    doubles them (``{{daemon_name}}``): the list is a string of names separated by spaces."""
    for name in names:
        if len(name) > 1 and _BRACED_MACRO.match(name) is None:
            braced = "{" + shown(name.strip("{}")) + "}"
            raise MilterError(f'invalid macro name "{shown(name)}": a name longer than one character '
                              f"is written in one pair of braces, {braced}")


def _check_name(command: str, *names: object) -> None:
    """A TypeError at the call for a name or text that is no str, as the compiled build gives: the
    pure source failed deep inside with an AttributeError (``'int' object has no attribute ...``)."""
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{command}: str expected; got {type(name).__name__}")


def _macro_names(stage: object, macros: object) -> list[str]:
    """setsymlist's names, split; a TypeError for a stage or a list of the wrong type, which the
    pure source took (a float stage as its int, a list of numbers as their text)."""
    if not isinstance(stage, (int, str)):
        raise TypeError(f"setsymlist: int or str expected; got {type(stage).__name__}")
    if isinstance(macros, str):
        return macros.split()
    if not isinstance(macros, (list, tuple)):
        raise TypeError(f"setsymlist: str or a list of str expected; got {type(macros).__name__}")
    _check_name("setsymlist", *macros)
    return list(macros)


def _given(*values: object) -> list[object]:
    """The optional arguments given (not None), for _check_name."""
    return [v for v in values if v is not None]


class Context:
    """One MTA connection as the callbacks see it; private data lives as long as its SMTP session."""

    __slots__ = (
        "id",
        "name",
        "stage",
        "macros",
        "priv",
        "reply_text",
        "actions",
        "body",
        "queued",
        "symlists",
        "_progress",
        "host_data",
        "session",
        "script_priv",
        "script",
    )

    def __init__(self, conn_id: int, macros: MacroStore, progress: Callable[[], None] | None = None,
                 session: FilterSession | None = None) -> None:
        self.id = conn_id
        self.name = f"conn#{conn_id}"
        self.stage = ""
        self.macros = macros
        self.priv: dict[str, Any] = {}
        self.reply_text: str | None = None
        self.actions: list[ev.Reply] = []
        self.body: list[bytes] | None = None
        self.queued = 0  # bytes of data in actions and body (MAX_QUEUED)
        self.symlists: dict[MacroStage, str] = {}
        self._progress = progress
        #: The host's own per-connection value, set by its context_created hook and read at
        #: every callback (hence a slot, not a look-up in a table of the host's).
        self.host_data: Any = None
        #: The connection's protocol state: what the MTA granted and its packet size, checked at
        #: each modification (None: a context without a connection grants all, 65535 bytes).
        self.session = session
        self.script_priv: ScriptPrivate | None = None
        #: The script's procs, when a host runs one (set by the Tcl bridge): ctx.tcl.
        self.script: ScriptCalls | None = None

    def __repr__(self) -> str:
        return f"<Context {self.name} stage={self.stage or '-'}>"

    # ------------------------------------------------------------ data access

    def getpriv(self, name: str | None = None, default: Any = _MISSING) -> Any:
        """One private value (KeyError if absent and no default), or a dict of all."""
        script = self.script_priv
        if name is None:
            return dict(self.priv) if script is None else {**self.priv, **script.items(self.id)}
        _check_name("getpriv", name)
        if script is not None:
            try:
                return script.get(self.id, name)
            except KeyError:
                pass
        try:
            return self.priv[name]
        except KeyError:
            if default is _MISSING:
                raise KeyError(name) from None
            return default

    def setpriv(self, name: str, value: Any = _MISSING) -> Any:
        if value is _MISSING:
            return self.getpriv(name)
        _check_name("setpriv", name)
        self.priv[name] = value
        if self.script_priv is not None:
            self.script_priv.drop(self.id, name)
        return value

    def unsetpriv(self, pattern: str | None = None) -> None:
        """Remove private data whose name matches the Tcl glob pattern; all without a pattern."""
        if pattern is not None:
            _check_name("unsetpriv", pattern)
        unset_matching(self.priv, pattern)
        if self.script_priv is not None:
            self.script_priv.unset(self.id, pattern)

    def getsymval(self, symbol: str) -> str | None:
        if not isinstance(symbol, str):  # (the pure source: "object of type 'int' has no len()")
            _check_name("getsymval", symbol)
        return self.macros.get(symbol)

    def tcl(self, *words: Any) -> str:
        """Run a command of the Tcl script (``ctx.tcl("is_blacklisted", addr)``) and return its
        result as text; a Tcl error raises :class:`~pytclmilter.scripting.TclError`. A context
        among the words is passed as the script's context command."""
        return hosted(self.script).call(words)

    def tcl_list(self, *words: Any) -> list[str]:
        """:meth:`tcl`, its result split as a Tcl list."""
        return hosted(self.script).call_list(words)

    def setreply(self, rcode: str, xcode: str | None = None, message: str | None = None) -> None:
        _check_name("setreply", rcode, *_given(xcode, message))
        self.reply_text = build_reply(rcode, xcode, message)

    def setmlreply(self, rcode: str, xcode: str | None, *lines: str) -> None:
        _check_name("setmlreply", rcode, *_given(xcode), *lines)
        self.reply_text = build_mlreply(rcode, xcode, list(lines))

    def setsymlist(self, stage: int | str, macros: str | Sequence[str]) -> None:
        """Ask for these macros at a stage (names separated by spaces, or a list of names); only
        inside the negotiate callback."""
        listed = _macro_names(stage, macros)
        self._require("negotiate", "setsymlist")
        try:
            st = MacroStage[stage.upper()] if isinstance(stage, str) and not stage.isdigit() else MacroStage(int(stage))
        except (KeyError, ValueError):
            raise MilterError(
                f'bad stage "{shown(str(stage))}": must be 0-6 or connect, helo, envfrom, envrcpt, data, eom, eoh'
            ) from None
        if st in self.symlists:
            raise MilterError(f"the macro list for {st.name.lower()} was already set")
        names = " ".join(listed)
        if _CONTROL.search(names):
            raise MilterError(f'invalid macro list "{shown(names)}": no NUL or other control characters')
        _check_macro_names(listed)
        size = _optneg_size([*self.symlists.values(), names])
        if size > MAX_DATA_SIZE:
            raise MilterError(f"setsymlist: the macro lists make an option negotiation reply of {size} bytes, "
                              f"more than the {MAX_DATA_SIZE} the MTA accepts")
        self.symlists[st] = names

    # ------------------------------------------------------------ modifications (eom only)

    def _require(self, stage: str, what: str) -> None:
        if self.stage != stage:
            where = f"the {stage} callback"
            raise MilterError(f"{what} is allowed only in {where} (called in {self.stage or 'no callback'})")

    def _granted(self, what: str, flag: int, size: int = 0) -> None:
        """The MTA granted ``flag`` in option negotiation, and a packet of ``size`` bytes of data
        fits the size it accepts: as libmilter, refused at the call, not at end of message.

        libmilter's mi_wr_cmd (comm.c) refuses to write a packet larger than MILTER_CHUNK_SIZE
        (the call fails, nothing is sent), and Sendmail closes the connection on one larger than
        its maximum data size; that size is the one negotiated (65535 unless an MDS bit was).
        """
        session = self.session
        if session is None:
            limit = MAX_DATA_SIZE
        else:
            negotiated = session.negotiated
            if not (negotiated.reply.actions & flag):  # (the reply's plain int: int(Action) is a call)
                raise MilterError(f"{what} needs the SMFIF_{Action(flag).name} action, which the MTA "
                                  "did not grant in option negotiation")
            limit = negotiated.max_payload
        if size > limit:
            raise MilterError(f"{what}: a packet of {size} bytes of data, more than the {limit} the MTA accepts")

    def _act(self, what: str, action: ev.Reply, flag: int, size: int) -> None:
        self._require("eom", what)
        self._granted(what, flag, size)
        if len(self.actions) >= MAX_CHANGES:
            raise MilterError(f"{what}: this message has {MAX_CHANGES} modifications already, the most one may "
                              "have (a loop in the script?)")
        self._queue(what, size)
        self.actions.append(action)

    def _queue(self, what: str, size: int) -> None:
        """Count ``size`` bytes more for this message's modifications, unless past MAX_QUEUED."""
        if self.queued + size > MAX_QUEUED:
            raise MilterError(f"{what}: this message's modifications would pass {MAX_QUEUED >> 20} MiB, the most "
                              f"they may hold ({self.queued} bytes queued already; a loop in the script?)")
        self.queued += size

    def addheader(self, name: str, value: str) -> None:
        value = check_header("addheader", name, value)
        self._act("addheader", ev.AddHeader(name, value), _ADDHDRS, _header_size(name, value, 0))

    def chgheader(self, name: str, value: str, index: int = 1) -> None:
        """Change the index-th header of that name; an empty value deletes it."""
        value = check_header("chgheader", name, value)
        self._act("chgheader", ev.ChangeHeader(check_index(index), name, value), _CHGHDRS,
                  _header_size(name, value, 4))

    def insheader(self, name: str, value: str, index: int = 0) -> None:
        value = check_header("insheader", name, value)
        self._act("insheader", ev.InsertHeader(check_index(index), name, value), _ADDHDRS,
                  _header_size(name, value, 4))

    def addrcpt(self, rcpt: str, args: str | None = None) -> None:
        _check_name("addrcpt", rcpt, *_given(args))
        args = check_args(args)
        action = ev.AddRecipient(check_address(rcpt, "recipient"), args)
        self._act("addrcpt", action, _ADDRCPT if args is None else _ADDRCPT_PAR, _strings_size(rcpt, args))

    def delrcpt(self, rcpt: str) -> None:
        _check_name("delrcpt", rcpt)
        self._act("delrcpt", ev.DeleteRecipient(check_address(rcpt, "recipient")), _DELRCPT, _strings_size(rcpt))

    def chgfrom(self, sender: str, args: str | None = None) -> None:
        _check_name("chgfrom", sender, *_given(args))
        args = check_args(args)
        action = ev.ChangeFrom(check_address(sender, "sender"), args)
        self._act("chgfrom", action, _CHGFROM, _strings_size(sender, args))

    def replacebody(self, data: object) -> None:
        """Append to the new body (calls add up, as in libmilter): bytes, bytearray or memoryview,
        or str sent as UTF-8. Any size: it goes out in packets of 65535 bytes. (``object``: the
        check below refuses other types, so both builds say the same; the compiled one would
        check an exact annotation first, in its own words, and refuse bytearray.)"""
        self._require("eom", "replacebody")
        self._granted("replacebody", _CHGBODY)
        if isinstance(data, str):
            raw = sendable(data)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
        else:  # bytes() of an int is that many NULs, of a list of ints those bytes: never a body
            raise TypeError(f"replacebody: bytes or str expected; got {type(data).__name__}")
        self._queue("replacebody", len(raw))
        if self.body is None:
            self.body = []
        self.body.append(raw)

    def quarantine(self, reason: str) -> None:
        _check_name("quarantine", reason)
        if not reason or _CONTROL.search(reason):
            raise MilterError("quarantine needs a non-empty reason without CR, LF, NUL or other control characters")
        self._act("quarantine", ev.Quarantine(reason), _QUARANTINE, _strings_size(reason))

    def progress(self) -> None:
        """Tell the MTA we are still working; also restarts our own I/O timeout."""
        if self._progress is not None:
            self._progress()

    # ------------------------------------------------------------ engine side

    def take_actions(self) -> list[ev.Reply]:
        """Modifications in order, the new body (one contiguous run, as Postfix requires) last."""
        out = self.actions
        if self.body is not None:
            out.append(ev.ReplaceBody(b"".join(self.body)))
        self.actions = []
        self.body = None
        self.queued = 0
        return out

    def drop_actions(self) -> None:
        self.actions = []
        self.body = None
        self.queued = 0

    def detach(self) -> None:
        """The connection is over: progress() does nothing from now on. This also breaks the
        engine <-> context reference cycle, so a closed connection is freed at once by reference
        counting instead of waiting for the cyclic garbage collector (18 objects per connection)."""
        self._progress = None
