"""Sans-I/O milter protocol core: bytes in -> events out, replies in -> bytes out.

Nothing here touches a socket, a clock or asyncio, so every rule of the
protocol can be unit-tested and fuzzed on its own.
"""

from . import events
from .codec import FrameReader, text, wire
from .constants import Action, Family, MacroStage, Proto
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .macros import MacroStore
from .negotiation import Negotiated, Wants, negotiate
from .session import NEED_DATA, FilterSession
from .table import (
    COMMANDS, REPLIES, CommandSpec, ReplySpec, State, decode_command, decode_reply, encode_command, encode_reply,
)

__all__ = [
    "events", "FrameReader", "decode_command", "decode_reply", "encode_command", "encode_reply",
    "text", "wire", "Action", "Family", "MacroStage", "Proto", "LocalProtocolError",
    "ProtocolError", "RemoteProtocolError", "MacroStore", "Negotiated", "Wants", "negotiate",
    "NEED_DATA", "FilterSession", "State", "COMMANDS", "REPLIES", "CommandSpec", "ReplySpec",
]
