"""Typed values for everything that crosses the wire.

Events are what the MTA sends (SMFIC_*); replies are what the filter sends
(SMFIR_*). Text fields are ``str`` decoded from UTF-8 with the
``surrogateescape`` error handler, so any byte string survives a round trip
(see :func:`pytclmilter.protocol.codec.text`); body data stays ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from .constants import Family, MacroStage


# ---------------------------------------------------------------- MTA -> filter


class Event:
    """Base of MTA commands. ``needs_reply`` is set by the session from the negotiated flags.

    Plain classes, not dataclasses: compiled, the ``__init__`` a dataclass generates stays
    interpreted Python (a tenth of the cost of decoding a header), so each class writes its own,
    which is where its fields are named; ``__match_args__`` lists them once more, in order, for
    positional ``match`` patterns and for the ``repr`` and ``==`` below.
    """

    __match_args__: ClassVar[tuple[str, ...]] = ()
    needs_reply: bool = False  # a class default: compiled, set when the object is made, no __init__ call

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{type(self).__qualname__}({fields})"

    def __eq__(self, other: object) -> bool:
        """Same class and same fields (``needs_reply`` is the session's, not the MTA's)."""
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__match_args__)


class OptionNegotiation(Event):
    __match_args__ = ("version", "actions", "protocol")

    def __init__(self, version: int, actions: int, protocol: int) -> None:
        self.version, self.actions, self.protocol = version, actions, protocol


class Macro(Event):
    __match_args__ = ("stage", "macros")

    def __init__(self, stage: bytes, macros: Mapping[str, str]) -> None:
        self.stage = stage  # the code of the command the macros precede
        self.macros = macros


class Connect(Event):
    __match_args__ = ("hostname", "family", "port", "address")

    def __init__(self, hostname: str, family: Family, port: int = 0, address: str = "") -> None:
        self.hostname, self.family, self.port, self.address = hostname, family, port, address


class Helo(Event):
    __match_args__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class EnvFrom(Event):
    __match_args__ = ("args",)

    def __init__(self, args: list[str]) -> None:
        self.args = args  # sender as written (with <>), then ESMTP parameters


class EnvRcpt(Event):
    __match_args__ = ("args",)

    def __init__(self, args: list[str]) -> None:
        self.args = args  # recipient as written (with <>), then ESMTP parameters


class Data(Event):
    pass


class Unknown(Event):
    __match_args__ = ("line",)

    def __init__(self, line: str) -> None:
        self.line = line


class Header(Event):
    __match_args__ = ("name", "value")

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value


class EndOfHeaders(Event):
    pass


class Body(Event):
    __match_args__ = ("chunk",)

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk


class EndOfMessage(Event):
    __match_args__ = ("chunk",)

    def __init__(self, chunk: bytes = b"") -> None:
        self.chunk = chunk  # MTAs send none; libmilter treats data here as a last body chunk


class Abort(Event):
    pass


class Quit(Event):
    pass


class QuitNewConnection(Event):
    pass


class Closed(Event):
    """Not a packet: the session ended (QUIT, QUIT_NC, EOF or failure). Emitted once per SMTP session."""

    __match_args__ = ("reason",)

    def __init__(self, reason: str = "eof") -> None:
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

