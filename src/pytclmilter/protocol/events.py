"""Typed values for everything that crosses the wire.

Events are what the MTA sends (SMFIC_*); replies are what the filter sends
(SMFIR_*). Text fields are ``str`` decoded from UTF-8 with the
``surrogateescape`` error handler, so any byte string survives a round trip
(see :func:`pytclmilter.protocol.codec.text`); body data stays ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .constants import Family, MacroStage


# ---------------------------------------------------------------- MTA -> filter


# The MTA's events write their __init__ out (init=False): compiled, the one dataclasses generates
# stays interpreted Python, a tenth of the cost of decoding a header. repr and == still come from
# the dataclass.


@dataclass(slots=True, init=False)
class Event:
    """Base of MTA commands. ``needs_reply`` is set by the session from the negotiated flags."""

    needs_reply: bool = field(default=False, init=False, compare=False, repr=False)

    def __init__(self) -> None:
        self.needs_reply = False


@dataclass(slots=True, init=False)
class OptionNegotiation(Event):
    version: int
    actions: int
    protocol: int

    def __init__(self, version: int, actions: int, protocol: int) -> None:
        self.needs_reply = False
        self.version, self.actions, self.protocol = version, actions, protocol


@dataclass(slots=True, init=False)
class Macro(Event):
    stage: bytes  # the command letter the macros precede
    macros: Mapping[str, str]

    def __init__(self, stage: bytes, macros: Mapping[str, str]) -> None:
        self.needs_reply = False
        self.stage, self.macros = stage, macros


@dataclass(slots=True, init=False)
class Connect(Event):
    hostname: str
    family: Family
    port: int = 0
    address: str = ""

    def __init__(self, hostname: str, family: Family, port: int = 0, address: str = "") -> None:
        self.needs_reply = False
        self.hostname, self.family, self.port, self.address = hostname, family, port, address


@dataclass(slots=True, init=False)
class Helo(Event):
    name: str

    def __init__(self, name: str) -> None:
        self.needs_reply = False
        self.name = name


@dataclass(slots=True, init=False)
class EnvFrom(Event):
    args: list[str]  # sender as written (with <>), then ESMTP parameters

    def __init__(self, args: list[str]) -> None:
        self.needs_reply = False
        self.args = args


@dataclass(slots=True, init=False)
class EnvRcpt(Event):
    args: list[str]

    def __init__(self, args: list[str]) -> None:
        self.needs_reply = False
        self.args = args


@dataclass(slots=True, init=False)
class Data(Event):
    pass


@dataclass(slots=True, init=False)
class Unknown(Event):
    line: str

    def __init__(self, line: str) -> None:
        self.needs_reply = False
        self.line = line


@dataclass(slots=True, init=False)
class Header(Event):
    name: str
    value: str

    def __init__(self, name: str, value: str) -> None:
        self.needs_reply = False
        self.name, self.value = name, value


@dataclass(slots=True, init=False)
class EndOfHeaders(Event):
    pass


@dataclass(slots=True, init=False)
class Body(Event):
    chunk: bytes

    def __init__(self, chunk: bytes) -> None:
        self.needs_reply = False
        self.chunk = chunk


@dataclass(slots=True, init=False)
class EndOfMessage(Event):
    chunk: bytes = b""  # MTAs send none; libmilter treats data here as a last body chunk

    def __init__(self, chunk: bytes = b"") -> None:
        self.needs_reply = False
        self.chunk = chunk


@dataclass(slots=True, init=False)
class Abort(Event):
    pass


@dataclass(slots=True, init=False)
class Quit(Event):
    pass


@dataclass(slots=True, init=False)
class QuitNewConnection(Event):
    pass


@dataclass(slots=True, init=False)
class Closed(Event):
    """Not a packet: the session ended (QUIT, QUIT_NC, EOF or failure). Emitted once per SMTP session."""

    reason: str = "eof"

    def __init__(self, reason: str = "eof") -> None:
        self.needs_reply = False
        self.reason = reason


# ---------------------------------------------------------------- filter -> MTA


@dataclass(slots=True, frozen=True)
class Reply:
    """Base of everything the filter sends."""


@dataclass(slots=True, frozen=True)
class OptionNegotiationReply(Reply):
    version: int
    actions: int
    protocol: int
    macros: dict[MacroStage, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Continue(Reply):
    pass


@dataclass(slots=True, frozen=True)
class Accept(Reply):
    pass


@dataclass(slots=True, frozen=True)
class Reject(Reply):
    pass


@dataclass(slots=True, frozen=True)
class Tempfail(Reply):
    pass


@dataclass(slots=True, frozen=True)
class Discard(Reply):
    pass


@dataclass(slots=True, frozen=True)
class Skip(Reply):
    pass


@dataclass(slots=True, frozen=True)
class ReplyCode(Reply):
    text: str  # "550 5.7.1 text"; multi-line joined by CRLF


@dataclass(slots=True, frozen=True)
class NoReply(Reply):
    """Not a packet: the filter answers nothing (legal only where NR was negotiated)."""


@dataclass(slots=True, frozen=True)
class Progress(Reply):
    pass


@dataclass(slots=True, frozen=True)
class Quarantine(Reply):
    reason: str


@dataclass(slots=True, frozen=True)
class AddHeader(Reply):
    name: str
    value: str


@dataclass(slots=True, frozen=True)
class InsertHeader(Reply):
    index: int
    name: str
    value: str


@dataclass(slots=True, frozen=True)
class ChangeHeader(Reply):
    index: int
    name: str
    value: str  # empty deletes


@dataclass(slots=True, frozen=True)
class AddRecipient(Reply):
    rcpt: str
    args: str | None = None  # ESMTP parameters, space separated; uses SMFIR_ADDRCPT_PAR


@dataclass(slots=True, frozen=True)
class DeleteRecipient(Reply):
    rcpt: str


@dataclass(slots=True, frozen=True)
class ChangeFrom(Reply):
    sender: str
    args: str | None = None


@dataclass(slots=True, frozen=True)
class ReplaceBody(Reply):
    chunk: bytes  # at most the chunk size; the encoder splits larger data


@dataclass(slots=True, frozen=True)
class Shutdown(Reply):
    pass


@dataclass(slots=True, frozen=True)
class ConnFail(Reply):
    pass


#: Replies that end the wait for a pending event.
FINAL_REPLIES = (Continue, Accept, Reject, Tempfail, Discard, Skip, ReplyCode)
#: Replies allowed only in answer to end of message (with the action flag they need).
MODIFICATIONS = (
    AddHeader,
    InsertHeader,
    ChangeHeader,
    AddRecipient,
    DeleteRecipient,
    ChangeFrom,
    ReplaceBody,
    Quarantine,
)
