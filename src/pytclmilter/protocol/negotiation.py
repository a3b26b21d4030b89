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


#: The protocol bits libmilter keeps to itself (mfdef.h's SMFI_INTERNAL): the data sizes, and one
#: reserved. Its xxfi_negotiate sees only the size bit it will use, whatever the MTA set.
_INTERNAL: Final = 0x70000000


def _data_size(offered_proto: int, max_data_size: int) -> tuple[Proto, int]:
    """The data-size bit to ask for (0: none) and the largest payload it allows."""
    if max_data_size >= MDS_1M and offered_proto & Proto.MDS_1M:
        return Proto.MDS_1M, MDS_1M
    if max_data_size >= MDS_256K and offered_proto & Proto.MDS_256K:
        return Proto.MDS_256K, MDS_256K
    return Proto(0), MAX_DATA_SIZE


def shown(offer: OptionNegotiation, max_data_size: int) -> tuple[int, int, int]:
    """The offer as the negotiate callbacks get it: as libmilter's st_optionneg shows it to
    xxfi_negotiate (but for the no-reply bits it adds and bit 31, which it sign-extends:
    docs/protocol.md §4.4), so that a
    callback ported from C reads the same numbers: no flags are the version-1 masks both
    negotiate by, and of the internal bits only the data size that will be used."""
    actions = offer.actions if offer.actions else int(V1_ACTIONS)
    protocol = offer.protocol if offer.protocol else int(V1_PROTO)
    size_bit, _ = _data_size(protocol, max_data_size)
    return offer.version, actions, (protocol & ~_INTERNAL) | int(size_bit)


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
    size_bit, max_payload = _data_size(offered_proto, wants.max_data_size)
    protocol |= size_bit
    protocol &= offered_proto

    macros: dict[MacroStage, str] = {}
    if wants.macros and Action.SETSYMLIST in offered_actions and version >= 6:
        macros = dict(wants.macros)
        actions |= Action.SETSYMLIST
    else:
        actions &= ~Action.SETSYMLIST
    reply = OptionNegotiationReply(version, int(actions), int(protocol), macros)
    return Negotiated(reply, version, actions, protocol, max_payload, encode_reply(reply))
