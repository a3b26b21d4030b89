"""The per-connection context handed to every callback, Python or Tcl.

Method names are TclMilter's (``getpriv``, ``addheader`` ...). What a filter
asks for is validated at the call, so a bad reply code or header name is a clear
error in the callback that made it and never a malformed packet on the wire:
the text itself by checks.py (control characters, header names that are not
RFC 5322 field names, packet sizes) and replies.py (reply codes and text); here,
what depends on the connection: the stage, a modification whose action the MTA
did not grant, or whose packet would be larger than the MTA accepts, and the
bounds of one message's modifications. Modifications are collected and written
together with the final reply. Private-data patterns are Tcl's (tclmatch.py).
"""

from __future__ import annotations

from typing import Any, Callable, Final, Protocol, Sequence

from .checks import (MilterError, check_address, check_args, check_header, check_index, check_name, check_reason,
                     header_size, macro_list, macro_names, optneg_size, sendable, shown, strings_size)
from .protocol import events as ev
from .protocol.constants import MAX_DATA_SIZE, Action, MacroStage
from .protocol.macros import MacroStore
from .protocol.session import FilterSession
from .replies import build_mlreply, build_reply
from .tclmatch import unset_matching

_MISSING: Final[Any] = object()

#: What one message's modifications may queue until its end of message is answered. A script's
#: loop (``while 1 {$ctx addheader X-A $v}``) queued 150 MB a second until -calltimeout (60 s by
#: default) stopped it, and the process ran out of memory first; now the call that would pass a
#: bound fails (a Tcl error, a MilterError), so the callback fails and the message gets
#: -onerror (tempfail by default). Far above what real mail needs: a new body of 1 GiB (MTAs'
#: message size limits are tens of MB: Postfix's is 10 MB by default), 100 000 header, recipient
#: and sender changes (Sendmail keeps 32 KB of headers by default).
MAX_CHANGES: Final = 100_000
MAX_QUEUED: Final = 1 << 30


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


_ADDHDRS: Final = int(Action.ADDHDRS)
_CHGHDRS: Final = int(Action.CHGHDRS)
_ADDRCPT: Final = int(Action.ADDRCPT)
_ADDRCPT_PAR: Final = int(Action.ADDRCPT_PAR)
_DELRCPT: Final = int(Action.DELRCPT)
_CHGFROM: Final = int(Action.CHGFROM)
_CHGBODY: Final = int(Action.CHGBODY)
_QUARANTINE: Final = int(Action.QUARANTINE)


def _given(*values: object) -> list[object]:
    """The optional arguments given (not None), for check_name."""
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
        check_name("getpriv", name)
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
        check_name("setpriv", name)
        self.priv[name] = value
        if self.script_priv is not None:
            self.script_priv.drop(self.id, name)
        return value

    def unsetpriv(self, pattern: str | None = None) -> None:
        """Remove private data whose name matches the Tcl glob pattern; all without a pattern."""
        if pattern is not None:
            check_name("unsetpriv", pattern)
        unset_matching(self.priv, pattern)
        if self.script_priv is not None:
            self.script_priv.unset(self.id, pattern)

    def getsymval(self, symbol: str) -> str | None:
        if not isinstance(symbol, str):  # (the pure source: "object of type 'int' has no len()")
            check_name("getsymval", symbol)
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
        check_name("setreply", rcode, *_given(xcode, message))
        self.reply_text = build_reply(rcode, xcode, message)

    def setmlreply(self, rcode: str, xcode: str | None, *lines: str) -> None:
        check_name("setmlreply", rcode, *_given(xcode), *lines)
        self.reply_text = build_mlreply(rcode, xcode, list(lines))

    def setsymlist(self, stage: int | str, macros: str | Sequence[str]) -> None:
        """Ask for these macros at a stage (names separated by spaces, or a list of names); only
        inside the negotiate callback."""
        listed = macro_names(stage, macros)
        self._require("negotiate", "setsymlist")
        try:
            st = MacroStage[stage.upper()] if isinstance(stage, str) and not stage.isdigit() else MacroStage(int(stage))
        except (KeyError, ValueError):
            raise MilterError(
                f'bad stage "{shown(str(stage))}": must be 0-6 or connect, helo, envfrom, envrcpt, data, eom, eoh'
            ) from None
        if st in self.symlists:
            raise MilterError(f"the macro list for {st.name.lower()} was already set")
        names = macro_list(listed)
        size = optneg_size([*self.symlists.values(), names])
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
        self._act("addheader", ev.AddHeader(name, value), _ADDHDRS, header_size(name, value, 0))

    def chgheader(self, name: str, value: str, index: int = 1) -> None:
        """Change the index-th header of that name; an empty value deletes it."""
        value = check_header("chgheader", name, value)
        self._act("chgheader", ev.ChangeHeader(check_index(index), name, value), _CHGHDRS,
                  header_size(name, value, 4))

    def insheader(self, name: str, value: str, index: int = 0) -> None:
        value = check_header("insheader", name, value)
        self._act("insheader", ev.InsertHeader(check_index(index), name, value), _ADDHDRS,
                  header_size(name, value, 4))

    def addrcpt(self, rcpt: str, args: str | None = None) -> None:
        check_name("addrcpt", rcpt, *_given(args))
        args = check_args(args)
        action = ev.AddRecipient(check_address(rcpt, "recipient"), args)
        self._act("addrcpt", action, _ADDRCPT if args is None else _ADDRCPT_PAR, strings_size(rcpt, args))

    def delrcpt(self, rcpt: str) -> None:
        check_name("delrcpt", rcpt)
        self._act("delrcpt", ev.DeleteRecipient(check_address(rcpt, "recipient")), _DELRCPT, strings_size(rcpt))

    def chgfrom(self, sender: str, args: str | None = None) -> None:
        check_name("chgfrom", sender, *_given(args))
        args = check_args(args)
        action = ev.ChangeFrom(check_address(sender, "sender"), args)
        self._act("chgfrom", action, _CHGFROM, strings_size(sender, args))

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
        check_name("quarantine", reason)
        self._act("quarantine", ev.Quarantine(check_reason(reason)), _QUARANTINE, strings_size(reason))

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
