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


@dataclass(slots=True)
class Event:
    """Base of MTA commands. ``needs_reply`` is set by the session from the negotiated flags."""

    needs_reply: bool = field(default=False, init=False, compare=False, repr=False)


@dataclass(slots=True)
class OptionNegotiation(Event):
    version: int
    actions: int
    protocol: int


@dataclass(slots=True)
class Macro(Event):
    stage: bytes  # the command letter the macros precede
    macros: Mapping[str, str]


@dataclass(slots=True)
class Connect(Event):
    hostname: str
    family: Family
    port: int = 0
    address: str = ""


@dataclass(slots=True)
class Helo(Event):
    name: str


@dataclass(slots=True)
class EnvFrom(Event):
    args: list[str]  # sender as written (with <>), then ESMTP parameters


@dataclass(slots=True)
class EnvRcpt(Event):
    args: list[str]


@dataclass(slots=True)
class Data(Event):
    pass


@dataclass(slots=True)
class Unknown(Event):
    line: str


@dataclass(slots=True)
class Header(Event):
    name: str
    value: str


@dataclass(slots=True)
class EndOfHeaders(Event):
    pass


@dataclass(slots=True)
class Body(Event):
    chunk: bytes


@dataclass(slots=True)
class EndOfMessage(Event):
    chunk: bytes = b""  # MTAs send none; libmilter treats data here as a last body chunk


@dataclass(slots=True)
class Abort(Event):
    pass


@dataclass(slots=True)
class Quit(Event):
    pass


@dataclass(slots=True)
class QuitNewConnection(Event):
    pass


@dataclass(slots=True)
class Closed(Event):
    """Not a packet: the session ended (QUIT, QUIT_NC, EOF or failure). Emitted once per SMTP session."""

    reason: str = "eof"


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
