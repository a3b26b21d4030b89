"""The protocol's facts, one row per command (MTA -> filter) and one per reply (filter -> MTA).

A command's row says all there is to know about it: its code on the wire, the event it becomes
and how its payload is read and written, the state libmilter moves to, the flags that let the
filter skip it (``SMFIP_NO*``) or leave it unanswered (``SMFIP_NR_*``), the callback it runs,
the macros that come with it and which stored macros it clears. A reply's row gives its code,
its class, how it is read and written, and the action (``SMFIF_*``) the MTA must grant for it.

Nothing else in the package writes a code or pairs a command with a flag: the codec's dispatch
is here, and the session, the macro store, negotiation, the callback registry, the engine and
the MTA-side client derive the dictionaries they need from these rows when they are imported
(those on the per-packet path as ``Final`` module dictionaries, as fast as written out).

Sources: docs/protocol.md §2 (commands), §3 (replies),
§5.3 (macro slots) and §7 (states); libmilter keeps the same facts in its ``cmds[]`` table.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Callable, Final

from .codec import (
    decode_addheader, decode_addrcpt, decode_addrcpt_par, decode_body, decode_chgfrom, decode_chgheader,
    decode_connect, decode_delrcpt, decode_envfrom, decode_envrcpt, decode_eom, decode_header, decode_helo,
    decode_insheader, decode_macro, decode_optneg, decode_optneg_reply, decode_quarantine, decode_replbody,
    decode_replycode, decode_unknown, encode_addheader, encode_addrcpt, encode_args, encode_chgfrom,
    encode_chunk, encode_connect, encode_delrcpt, encode_header, encode_helo, encode_indexed_header,
    encode_macro, encode_optneg, encode_optneg_reply, encode_quarantine, encode_replbody, encode_replycode,
    encode_unknown, frame, frames, show,
)
from .constants import Action, MacroStage, Proto
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    Abort, Accept, AddHeader, AddRecipient, Body, ChangeFrom, ChangeHeader, ConnFail, Connect, Continue, Data,
    DeleteRecipient, Discard, EndOfHeaders, EndOfMessage, EnvFrom, EnvRcpt, Event, Header, Helo, InsertHeader,
    Macro, OptionNegotiation, OptionNegotiationReply, Progress, Quarantine, Quit, QuitNewConnection, Reject,
    ReplaceBody, Reply, ReplyCode, Shutdown, Skip, Tempfail, Unknown,
)

# ---------------------------------------------------------------- states


class State(enum.IntEnum):
    """libmilter's states, in its order (the skip rule depends on the order)."""

    INIT = 0
    OPTS = 1
    CONN = 2
    HELO = 3
    MAIL = 4
    RCPT = 5
    DATA = 6
    HDRS = 7
    EOHS = 8
    BODY = 9
    ENDM = 10
    QUIT = 11
    ABRT = 12
    UNKN = 13
    Q_NC = 14
    CLOSED = 15  # ours: the session is over, nothing more is read


S = State
#: The states allowed to follow each state (docs/protocol.md §7.2); a skipped state may also be
#: jumped over (FilterSession._trans_ok).
NEXT: Final[dict[State, frozenset[State]]] = {
    S.INIT: frozenset({S.OPTS}),
    S.OPTS: frozenset({S.CONN, S.UNKN}),
    S.CONN: frozenset({S.HELO, S.MAIL, S.UNKN}),
    S.HELO: frozenset({S.HELO, S.MAIL, S.UNKN}),
    S.MAIL: frozenset({S.RCPT, S.ABRT, S.UNKN}),
    S.RCPT: frozenset({S.RCPT, S.DATA, S.HDRS, S.EOHS, S.BODY, S.ENDM, S.ABRT, S.UNKN}),
    S.DATA: frozenset({S.HDRS, S.EOHS, S.ABRT}),
    S.HDRS: frozenset({S.HDRS, S.EOHS, S.ABRT}),
    S.EOHS: frozenset({S.BODY, S.ENDM, S.ABRT}),
    S.BODY: frozenset({S.BODY, S.ENDM, S.ABRT}),
    S.ENDM: frozenset({S.MAIL, S.QUIT, S.Q_NC, S.UNKN}),
    S.QUIT: frozenset(),
    S.ABRT: frozenset(),
    S.UNKN: frozenset({S.HELO, S.MAIL, S.RCPT, S.DATA, S.BODY, S.ABRT, S.UNKN, S.QUIT, S.Q_NC}),
    S.Q_NC: frozenset({S.CONN, S.UNKN}),
    S.CLOSED: frozenset(),
}


class Clears(enum.Enum):
    """Which stored macro slots a command empties when it arrives (docs/protocol.md §5.3)."""

    NOTHING = 0
    LATER = 1  # the slots of the stages after its own
    ALL = 2


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command MTA -> filter (SMFIC_*)."""

    code: bytes
    name: str  # libmilter's, without SMFIC_
    event: type[Event]
    state: State | None  # the state it moves the session to; None: MACRO changes none
    decode: Callable[[bytes], Event] | None = None  # None: no payload (stray bytes ignored, as libmilter does)
    encode: Callable[[Any], bytes] | None = None  # the MTA side (`send`, tests); None: no payload
    skip: Proto = Proto.NONE  # the filter may ask the MTA not to send it
    no_reply: Proto = Proto.NONE  # the filter may ask the MTA not to wait for its reply
    replied: bool = True  # the MTA waits for a reply (unless no_reply was negotiated)
    reject_keeps_state: bool = False  # a reject answers this command only (libmilter's CT_IGNO)
    callback: str = ""  # the callback event it runs
    args: tuple[str, ...] = ()  # the callback's arguments after the context, as TclMilter's manual names them
    macros: MacroStage | None = None  # the macro list sent before it, kept in a slot of its own
    clears: Clears = Clears.NOTHING
    message: bool = False  # part of a message's content (DATA to end of message)


COMMANDS: Final[tuple[CommandSpec, ...]] = (
    CommandSpec(b"O", "OPTNEG", OptionNegotiation, S.OPTS, decode_optneg, encode_optneg,
                callback="negotiate", args=("version", "actions", "protocol"), clears=Clears.ALL),
    CommandSpec(b"D", "MACRO", Macro, None, decode_macro, encode_macro, replied=False),
    CommandSpec(b"C", "CONNECT", Connect, S.CONN, decode_connect, encode_connect, Proto.NOCONNECT, Proto.NR_CONN,
                callback="connect", args=("hostname", "addrInfo"), macros=MacroStage.CONNECT, clears=Clears.LATER),
    CommandSpec(b"H", "HELO", Helo, S.HELO, decode_helo, encode_helo, Proto.NOHELO, Proto.NR_HELO,
                callback="helo", args=("helohost",), macros=MacroStage.HELO, clears=Clears.LATER),
    CommandSpec(b"M", "MAIL", EnvFrom, S.MAIL, decode_envfrom, encode_args, Proto.NOMAIL, Proto.NR_MAIL,
                callback="envfrom", args=("fromList",), macros=MacroStage.ENVFROM, clears=Clears.LATER),
    CommandSpec(b"R", "RCPT", EnvRcpt, S.RCPT, decode_envrcpt, encode_args, Proto.NORCPT, Proto.NR_RCPT,
                reject_keeps_state=True, callback="envrcpt", args=("rcptList",), macros=MacroStage.ENVRCPT,
                clears=Clears.LATER),
    CommandSpec(b"T", "DATA", Data, S.DATA, None, None, Proto.NODATA, Proto.NR_DATA,
                callback="data", macros=MacroStage.DATA, message=True),
    CommandSpec(b"U", "UNKNOWN", Unknown, S.UNKN, decode_unknown, encode_unknown, Proto.NOUNKNOWN, Proto.NR_UNKN,
                reject_keeps_state=True, callback="unknown", args=("line",)),
    CommandSpec(b"L", "HEADER", Header, S.HDRS, decode_header, encode_header, Proto.NOHDRS, Proto.NR_HDR,
                callback="header", args=("name", "content"), message=True),
    CommandSpec(b"N", "EOH", EndOfHeaders, S.EOHS, None, None, Proto.NOEOH, Proto.NR_EOH,
                callback="eoh", macros=MacroStage.EOH, message=True),
    CommandSpec(b"B", "BODY", Body, S.BODY, decode_body, encode_chunk, Proto.NOBODY, Proto.NR_BODY,
                callback="body", args=("block",), message=True),
    CommandSpec(b"E", "BODYEOB", EndOfMessage, S.ENDM, decode_eom, encode_chunk,
                callback="eom", macros=MacroStage.EOM, message=True),
    CommandSpec(b"A", "ABORT", Abort, S.ABRT, replied=False, callback="abort"),
    CommandSpec(b"Q", "QUIT", Quit, S.QUIT, replied=False, callback="close", clears=Clears.ALL),
    CommandSpec(b"K", "QUIT_NC", QuitNewConnection, S.Q_NC, replied=False, callback="close", clears=Clears.ALL),
)

COMMAND_CODES: Final = frozenset(c.code for c in COMMANDS)
COMMAND_OF_EVENT: Final[dict[type, CommandSpec]] = {c.event: c for c in COMMANDS}


def code_of(event: type[Event]) -> bytes:
    """The code of the command that becomes ``event``."""
    return COMMAND_OF_EVENT[event].code


def _no_payload(event: type[Event]) -> Callable[[bytes], Event]:
    return lambda payload: event()


_DECODERS: Final[dict[bytes, Callable[[bytes], Event]]] = {
    c.code: c.decode or _no_payload(c.event) for c in COMMANDS
}
_HEADER: Final = code_of(Header)
_RCPT: Final = code_of(EnvRcpt)
_MAIL: Final = code_of(EnvFrom)
_CONNECT: Final = code_of(Connect)
_EOM: Final = code_of(EndOfMessage)


def decode_command(code: bytes, payload: bytes) -> Event:
    """MTA command payload -> event. Raises RemoteProtocolError on anything malformed."""
    # The commands of every message are decoded by direct calls (compiled, a call through the
    # table costs a Python-level call each); the rest through the table.
    if code == _HEADER:
        return decode_header(payload)
    if code == _RCPT:
        return decode_envrcpt(payload)
    if code == _MAIL:
        return decode_envfrom(payload)
    if code == _CONNECT:
        return decode_connect(payload)
    if code == _EOM:
        return decode_eom(payload)
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise RemoteProtocolError(f"unknown command {show(code)}")
    return decoder(payload)


def encode_command(event: Event) -> bytes:
    """MTA command -> frame (the MTA side)."""
    spec = COMMAND_OF_EVENT.get(type(event))
    if spec is None:
        raise LocalProtocolError(f"{type(event).__name__} is not a command")
    return frame(spec.code, spec.encode(event) if spec.encode is not None else b"")


# ---------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class ReplySpec:
    """One reply or action filter -> MTA (SMFIR_*)."""

    code: bytes
    name: str  # libmilter's, without SMFIR_
    reply: type[Reply]
    decode: Callable[[bytes], Reply] | None = None  # the MTA side; None: no payload, and stray bytes are an error
    encode: Callable[[Any], bytes] | None = None  # None: no payload (the frame is built once)
    final: bool = False  # answers the pending event: the MTA stops waiting
    action: Action = Action.NONE  # the action the MTA must grant; such a reply is sent only at end of message
    chunked: bool = False  # body data: frames of at most CHUNK_SIZE bytes


REPLIES: Final[tuple[ReplySpec, ...]] = (
    ReplySpec(b"O", "OPTNEG", OptionNegotiationReply, decode_optneg_reply, encode_optneg_reply),
    ReplySpec(b"c", "CONTINUE", Continue, final=True),
    ReplySpec(b"a", "ACCEPT", Accept, final=True),
    ReplySpec(b"r", "REJECT", Reject, final=True),
    ReplySpec(b"t", "TEMPFAIL", Tempfail, final=True),
    ReplySpec(b"d", "DISCARD", Discard, final=True),
    ReplySpec(b"s", "SKIP", Skip, final=True),
    ReplySpec(b"y", "REPLYCODE", ReplyCode, decode_replycode, encode_replycode, final=True),
    ReplySpec(b"p", "PROGRESS", Progress),
    ReplySpec(b"h", "ADDHEADER", AddHeader, decode_addheader, encode_addheader, action=Action.ADDHDRS),
    ReplySpec(b"i", "INSHEADER", InsertHeader, decode_insheader, encode_indexed_header, action=Action.ADDHDRS),
    ReplySpec(b"m", "CHGHEADER", ChangeHeader, decode_chgheader, encode_indexed_header, action=Action.CHGHDRS),
    # One class, two codes: an AddRecipient with ESMTP arguments goes out as ADDRCPT_PAR (reply_spec).
    ReplySpec(b"+", "ADDRCPT", AddRecipient, decode_addrcpt, encode_addrcpt, action=Action.ADDRCPT),
    ReplySpec(b"2", "ADDRCPT_PAR", AddRecipient, decode_addrcpt_par, encode_addrcpt, action=Action.ADDRCPT_PAR),
    ReplySpec(b"-", "DELRCPT", DeleteRecipient, decode_delrcpt, encode_delrcpt, action=Action.DELRCPT),
    ReplySpec(b"e", "CHGFROM", ChangeFrom, decode_chgfrom, encode_chgfrom, action=Action.CHGFROM),
    ReplySpec(b"b", "REPLBODY", ReplaceBody, decode_replbody, encode_replbody, action=Action.CHGBODY, chunked=True),
    ReplySpec(b"q", "QUARANTINE", Quarantine, decode_quarantine, encode_quarantine, action=Action.QUARANTINE),
    ReplySpec(b"4", "SHUTDOWN", Shutdown),
    ReplySpec(b"f", "CONN_FAIL", ConnFail),
)

#: SMFIR_SETSYMLIST has no row: it is never a packet of its own (the macro lists ride in the
#: OPTNEG reply); the MTA side still reads the code, and refuses it as an unknown reply.
SETSYMLIST: Final = b"l"
REPLY_CODES: Final = frozenset(r.code for r in REPLIES) | {SETSYMLIST}
_REPLY_OF_CODE: Final = {r.code: r for r in REPLIES}
#: Reply class -> its row (the first: for AddRecipient, the one without arguments).
REPLY_OF: Final[dict[type, ReplySpec]] = {r.reply: r for r in reversed(REPLIES)}
_ADDRCPT_PAR: Final = next(r for r in REPLIES if r.action == Action.ADDRCPT_PAR)
_EMPTY_FRAMES: Final[dict[type, bytes]] = {r.reply: frame(r.code) for r in REPLIES if r.encode is None}

#: Replies that end the wait for a pending event.
FINAL_REPLIES: Final = frozenset(r.reply for r in REPLIES if r.final)


def reply_spec(reply: Reply) -> ReplySpec | None:
    """The row a reply goes out as; None for what is not a packet (NoReply)."""
    if type(reply) is AddRecipient and reply.args is not None:
        return _ADDRCPT_PAR
    return REPLY_OF.get(type(reply))


def encode_reply(reply: Reply) -> bytes:
    """Filter reply -> frame(s). ReplaceBody larger than a chunk becomes several frames."""
    fixed = _EMPTY_FRAMES.get(type(reply))
    if fixed is not None:
        return fixed
    spec = reply_spec(reply)
    if spec is None or spec.encode is None:
        raise LocalProtocolError(f"{type(reply).__name__} is not a packet")
    try:
        payload = spec.encode(reply)
    except struct.error as exc:  # an index or flag word that does not fit its u32
        raise LocalProtocolError(f"{type(reply).__name__}: {exc}") from None
    return frames(spec.code, payload) if spec.chunked else frame(spec.code, payload)


def decode_reply(code: bytes, payload: bytes) -> Reply:
    """Filter reply payload -> value (the MTA side)."""
    spec = _REPLY_OF_CODE.get(code)
    if spec is None:
        raise RemoteProtocolError(f"unknown reply {show(code)}")
    if spec.decode is not None:
        return spec.decode(payload)
    if payload:
        raise RemoteProtocolError(f"reply {show(code)} carries {len(payload)} stray bytes")
    return spec.reply()
