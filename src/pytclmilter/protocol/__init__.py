"""Sans-I/O milter protocol core: bytes in -> events out, replies in -> bytes out.

Nothing here touches a socket, a clock or asyncio, so every rule of the
protocol can be unit-tested and fuzzed on its own.
"""

from . import events
from .codec import FrameReader, decode_command, decode_reply, encode_command, encode_reply, text, wire
from .constants import Action, Cmd, Family, MacroStage, Proto
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .macros import MacroStore
from .negotiation import Negotiated, Wants, negotiate
from .session import NEED_DATA, FilterSession, State

__all__ = [
    "events", "FrameReader", "decode_command", "decode_reply", "encode_command", "encode_reply",
    "text", "wire", "Action", "Cmd", "Family", "MacroStage", "Proto", "LocalProtocolError",
    "ProtocolError", "RemoteProtocolError", "MacroStore", "Negotiated", "Wants", "negotiate",
    "NEED_DATA", "FilterSession", "State",
]
