"""Option negotiation: what we ask the MTA for, computed per connection.

Differs from libmilter on purpose in two ways (docs/protocol.md §4.4): we
also ask for no-reply (NR) bits where the filter said it can do without
replies, and for SKIP, both only where the MTA offers them. Everything we
request is a subset of the offer, so no MTA has a reason to hang up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .constants import (
    MAX_DATA_SIZE,
    MDS_1M,
    MDS_256K,
    PROTOCOL_VERSION,
    ALL_ACTIONS,
    Action,
    MacroStage,
    Proto,
    V1_ACTIONS,
    V1_PROTO,
    MIN_MTA_VERSION,
    MAX_MTA_VERSION,
)
from .errors import RemoteProtocolError
from .events import OptionNegotiation, OptionNegotiationReply
from .table import COMMANDS, encode_reply

#: Callback event name -> (skip bit, no-reply bit) of its command; eom, abort and close have neither.
EVENT_FLAGS: Final[dict[str, tuple[Proto, Proto]]] = {c.callback: (c.skip, c.no_reply) for c in COMMANDS if c.skip}



@dataclass(slots=True)
class Wants:
    """What the filter needs, derived from the callbacks registered right now."""

    events: frozenset[str] = frozenset(EVENT_FLAGS)
    no_reply: frozenset[str] = frozenset()
    actions: Action = ALL_ACTIONS
    macros: dict[MacroStage, str] = field(default_factory=dict)
    max_data_size: int = MAX_DATA_SIZE


@dataclass(slots=True, frozen=True)
class Negotiated:
    """The outcome: the reply to send and the parameters both sides now share."""

    reply: OptionNegotiationReply
    version: int
    actions: Action
    protocol: Proto
    max_payload: int
    #: ``reply`` as bytes, encoded once: every connection of an MTA gets the same answer.
    wire: bytes = field(default=b"", compare=False, repr=False)


DEFAULT: Final = Negotiated(OptionNegotiationReply(PROTOCOL_VERSION, 0, 0), PROTOCOL_VERSION, Action(0), Proto(0), MAX_DATA_SIZE)


def check_offer(offer: OptionNegotiation) -> None:
    """Raise RemoteProtocolError for a version libmilter refuses: below 2, or 2**31 and above,
    which its signed reading makes negative (docs/protocol.md §4.4 step 1). Checked before the
    negotiate callbacks run, as libmilter checks before xxfi_negotiate."""
    if not MIN_MTA_VERSION <= offer.version <= MAX_MTA_VERSION:
        raise RemoteProtocolError(
            f"MTA offers protocol version {offer.version}; 2 to {MAX_MTA_VERSION} is needed")


def negotiate(offer: OptionNegotiation, wants: Wants) -> Negotiated:
    """Compute our OPTNEG reply. Raises RemoteProtocolError for a version check_offer refuses."""
    check_offer(offer)
    version = min(PROTOCOL_VERSION, offer.version)
    offered_actions = Action(offer.actions & ALL_ACTIONS) if offer.actions else V1_ACTIONS
    # An int, not a Proto: Python keeps each flag value it makes for good, and the word is the
    # peer's, a new one on each connection if it likes. What we ask is a subset of our own bits.
    offered_proto = offer.protocol if offer.protocol else int(V1_PROTO)

    actions = offered_actions & wants.actions
    protocol = Proto(0)
    for name, (skip, nr) in EVENT_FLAGS.items():
        if name not in wants.events:
            protocol |= skip
        elif name in wants.no_reply:
            protocol |= nr
    protocol |= Proto.SKIP
    max_payload = MAX_DATA_SIZE
    if wants.max_data_size >= MDS_1M and offered_proto & Proto.MDS_1M:
        protocol |= Proto.MDS_1M
        max_payload = MDS_1M
    elif wants.max_data_size >= MDS_256K and offered_proto & Proto.MDS_256K:
        protocol |= Proto.MDS_256K
        max_payload = MDS_256K
    protocol &= offered_proto

    macros: dict[MacroStage, str] = {}
    if wants.macros and Action.SETSYMLIST in offered_actions and version >= 6:
        macros = dict(wants.macros)
        actions |= Action.SETSYMLIST
    else:
        actions &= ~Action.SETSYMLIST
    reply = OptionNegotiationReply(version, int(actions), int(protocol), macros)
    return Negotiated(reply, version, actions, protocol, max_payload, encode_reply(reply))
