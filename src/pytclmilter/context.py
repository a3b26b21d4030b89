"""The per-connection context handed to every callback, Python or Tcl.

Method names are TclMilter's (``getpriv``, ``addheader`` ...). What a filter
asks for is validated here, so a bad reply code or header name is a clear
error in the callback that made it and never a malformed packet on the wire.
Modifications are collected and written together with the final reply.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Final, Protocol

from .protocol import events as ev
from .protocol.codec import wire
from .protocol.constants import MacroStage
from .protocol.macros import MacroStore


class MilterError(ValueError):
    """A filter asked for something the protocol or the stage does not allow."""


_MISSING: Final[Any] = object()
_RCODE: Final = re.compile(r"[45][0-9][0-9]\Z")
_XCODE: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e\x80-\U0010ffff]+\Z")
_FOLD: Final = re.compile(r"\r?\n(?=[ \t])")
_BARE_LF: Final = re.compile(r"\n(?![ \t])")
_LONE_PERCENT: Final = re.compile(r"(?<!%)%(?:%%)*(?!%)")
MAX_REPLY_LINE: Final = 980
MAX_REPLY_LINES: Final = 32


def tcl_glob(pattern: str) -> re.Pattern[str]:
    """Tcl ``string match`` pattern as a regex (``*``, ``?``, ``[a-z]``, backslash escapes)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\").replace("^", "\\^")
                out.append("[" + body + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.S)


def unset_matching(priv: dict[str, Any], pattern: str | None) -> None:
    """Remove the names matching the Tcl glob pattern; all without a pattern."""
    if pattern is None:
        priv.clear()
        return
    rx = tcl_glob(pattern)
    for key in [k for k in priv if rx.match(k)]:
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


def check_header(name: str, value: str) -> str:
    """Validate a header; returns the value with folding normalised to bare LF."""
    if not _HEADER_NAME.match(name):
        raise MilterError(f'invalid header name "{name}": must be printable, without colon or space')
    if "\n" not in value and "\r" not in value and "\0" not in value:  # one line: nothing to check
        return value
    value = _FOLD.sub("\n", value)
    if "\r" in value or _BARE_LF.search(value) or "\0" in value:
        raise MilterError(f'invalid value for header "{name}": CR and LF are allowed only to fold a line')
    return value


def check_index(index: int) -> int:
    if not 0 <= index <= 0xFFFFFFFF:
        raise MilterError(f"bad index {index}: must be 0 to 4294967295")
    return index


def check_address(address: str, what: str = "address") -> str:
    if not address or any(c in address for c in "\r\n\0"):
        raise MilterError(f'invalid {what} "{address}": must be non-empty, without CR, LF or NUL')
    return address


def check_args(args: str | None) -> str | None:
    if args is not None and any(c in args for c in "\r\n\0"):
        raise MilterError("invalid ESMTP arguments: no CR, LF or NUL")
    return args


def _reply_line(text: str) -> str:
    if len(text) > MAX_REPLY_LINE:
        raise MilterError(f"reply text longer than {MAX_REPLY_LINE} characters")
    if "\r" in text or "\n" in text or "\0" in text:
        raise MilterError("reply text must not contain CR, LF or NUL")
    if _LONE_PERCENT.search(text):
        # Sendmail formats replies printf-style and Postfix drops a lone %: write %% for a percent sign.
        raise MilterError(f'reply text "{text}": a lone % must be written %%')
    return text


def _check_codes(rcode: str, xcode: str | None) -> None:
    if not _RCODE.match(rcode):
        raise MilterError(f'invalid reply code "{rcode}": must be 4xx or 5xx')
    if xcode and not _XCODE.match(xcode):
        raise MilterError(f'invalid extended code "{xcode}": must be like 5.7.1')
    if xcode and xcode[0] != rcode[0]:
        raise MilterError(f'extended code "{xcode}" does not match reply code "{rcode}"')


def build_reply(rcode: str, xcode: str | None = None, message: str | None = None) -> str:
    """smfi_setreply's text: ``550 5.7.1 msg``, ``550 msg``, ``550 5.7.1``, ``550 ``."""
    _check_codes(rcode, xcode)
    text = rcode + " "
    if xcode:
        text += xcode
        if message is not None:
            text += " " + _reply_line(message)
    elif message is not None:
        text += _reply_line(message)
    return text


def build_mlreply(rcode: str, xcode: str | None, lines: list[str]) -> str:
    """smfi_setmlreply's text: lines joined by CRLF, all but the last with a hyphen."""
    _check_codes(rcode, xcode)
    if not 1 <= len(lines) <= MAX_REPLY_LINES:
        raise MilterError(f"a multi-line reply needs 1 to {MAX_REPLY_LINES} lines, got {len(lines)}")
    xcode = xcode or f"{rcode[0]}.0.0"
    last = len(lines) - 1
    return "\r\n".join(f"{rcode}{'-' if i < last else ' '}{xcode} {_reply_line(t)}" for i, t in enumerate(lines))


class Context:
    """One MTA connection as the callbacks see it; private data lives as long as the connection."""

    __slots__ = (
        "id",
        "name",
        "stage",
        "macros",
        "priv",
        "reply_text",
        "actions",
        "body",
        "symlists",
        "_progress",
        "tcl_command",
        "script_priv",
    )

    def __init__(self, conn_id: int, macros: MacroStore, progress: Callable[[], None] | None = None) -> None:
        self.id = conn_id
        self.name = f"conn#{conn_id}"
        self.stage = ""
        self.macros = macros
        self.priv: dict[str, Any] = {}
        self.reply_text: str | None = None
        self.actions: list[ev.Reply] = []
        self.body: list[bytes] | None = None
        self.symlists: dict[MacroStage, str] = {}
        self._progress = progress
        self.tcl_command = ""
        self.script_priv: ScriptPrivate | None = None

    def __repr__(self) -> str:
        return f"<Context {self.name} stage={self.stage or '-'}>"

    # ------------------------------------------------------------ data access

    def getpriv(self, name: str | None = None, default: Any = _MISSING) -> Any:
        """One private value (KeyError if absent and no default), or a dict of all."""
        script = self.script_priv
        if name is None:
            return dict(self.priv) if script is None else {**self.priv, **script.items(self.id)}
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
        self.priv[name] = value
        if self.script_priv is not None:
            self.script_priv.drop(self.id, name)
        return value

    def unsetpriv(self, pattern: str | None = None) -> None:
        """Remove private data whose name matches the Tcl glob pattern; all without a pattern."""
        unset_matching(self.priv, pattern)
        if self.script_priv is not None:
            self.script_priv.unset(self.id, pattern)

    def getsymval(self, symbol: str) -> str | None:
        return self.macros.get(symbol)

    def setreply(self, rcode: str, xcode: str | None = None, message: str | None = None) -> None:
        self.reply_text = build_reply(rcode, xcode, message)

    def setmlreply(self, rcode: str, xcode: str | None, *lines: str) -> None:
        self.reply_text = build_mlreply(rcode, xcode, list(lines))

    def setsymlist(self, stage: int | str, macros: str) -> None:
        """Ask for these macros at a stage; only inside the negotiate callback."""
        self._require("negotiate", "setsymlist")
        try:
            st = MacroStage[stage.upper()] if isinstance(stage, str) and not stage.isdigit() else MacroStage(int(stage))
        except (KeyError, ValueError):
            raise MilterError(
                f'bad stage "{stage}": must be 0-6 or connect, helo, envfrom, envrcpt, data, eom, eoh'
            ) from None
        if st in self.symlists:
            raise MilterError(f"the macro list for {st.name.lower()} was already set")
        self.symlists[st] = " ".join(macros.split())

    # ------------------------------------------------------------ modifications (eom only)

    def _require(self, stage: str, what: str) -> None:
        if self.stage != stage:
            where = f"the {stage} callback"
            raise MilterError(f"{what} is allowed only in {where} (called in {self.stage or 'no callback'})")

    def _act(self, what: str, action: ev.Reply) -> None:
        self._require("eom", what)
        self.actions.append(action)

    def addheader(self, name: str, value: str) -> None:
        self._act("addheader", ev.AddHeader(name, check_header(name, value)))

    def chgheader(self, name: str, value: str, index: int = 1) -> None:
        """Change the index-th header of that name; an empty value deletes it."""
        self._act("chgheader", ev.ChangeHeader(check_index(index), name, check_header(name, value)))

    def insheader(self, name: str, value: str, index: int = 0) -> None:
        self._act("insheader", ev.InsertHeader(check_index(index), name, check_header(name, value)))

    def addrcpt(self, rcpt: str, args: str | None = None) -> None:
        self._act("addrcpt", ev.AddRecipient(check_address(rcpt, "recipient"), check_args(args)))

    def delrcpt(self, rcpt: str) -> None:
        self._act("delrcpt", ev.DeleteRecipient(check_address(rcpt, "recipient")))

    def chgfrom(self, sender: str, args: str | None = None) -> None:
        self._act("chgfrom", ev.ChangeFrom(check_address(sender, "sender"), check_args(args)))

    def replacebody(self, data: bytes | str) -> None:
        """Append to the new body (calls add up, as in libmilter); str is sent as UTF-8."""
        self._require("eom", "replacebody")
        raw = wire(data) if isinstance(data, str) else bytes(data)
        if self.body is None:
            self.body = []
        self.body.append(raw)

    def quarantine(self, reason: str) -> None:
        if not reason or "\0" in reason:
            raise MilterError("quarantine needs a non-empty reason without NUL")
        self._act("quarantine", ev.Quarantine(reason))

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
        return out

    def drop_actions(self) -> None:
        self.actions = []
        self.body = None

    def detach(self) -> None:
        """The connection is over: progress() does nothing from now on. This also breaks the
        engine <-> context reference cycle, so a closed connection is freed at once by reference
        counting instead of waiting for the cyclic garbage collector (18 objects per connection)."""
        self._progress = None
