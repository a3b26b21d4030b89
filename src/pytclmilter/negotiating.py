"""A connection's option negotiation, as the engine answers it: the answer to an MTA's offer for
the callbacks registered now, computed once per combination, and its debug line's text.

Every connection of an MTA makes the same offer, and the callbacks rarely change, so the engine's
negotiation is a dictionary lookup on the per-connection path (docs/protocol.md §4.4).
"""

from __future__ import annotations

from typing import Any, Final

from .callbacks import Registry
from .logline import as_field
from .protocol.constants import Action, MacroStage, Proto, flag_names
from .protocol.events import OptionNegotiation, OptionNegotiationReply
from .protocol.negotiation import Negotiated, negotiate

#: negotiate() results by (registry generation, offer, size limit, macro lists): see answer_for.
_NEGOTIATED: Final[dict[tuple[Any, ...], Negotiated]] = {}


def answer_for(registry: Registry, offer: OptionNegotiation, max_data_size: int,
               symlists: dict[MacroStage, str]) -> Negotiated:
    """negotiate() for this offer and the callbacks registered now, computed once per combination:
    the registry's generation, the offer, the packet size limit and the context's macro lists."""
    key = (registry.generation, offer.version, offer.actions, offer.protocol,
           max_data_size, tuple(symlists.items()))
    answer = _NEGOTIATED.get(key)
    if answer is None:
        wants = registry.wants()
        wants.max_data_size = max_data_size
        wants.macros = dict(symlists)
        answer = negotiate(offer, wants)
        if len(_NEGOTIATED) >= 256:  # bounded: callbacks changing all the time must not grow it
            _NEGOTIATED.clear()
        _NEGOTIATED[key] = answer
    return answer


def answer_text(reply: OptionNegotiationReply) -> str:
    """The option negotiation's answer in the debug line: its flags by name (docs/protocol.md
    §4.2-§4.3), each number in hex too; the macro lists of a negotiate callback's setsymlist."""
    actions, protocol = Action(reply.actions), Proto(reply.protocol)
    text = (f"v{reply.version} actions {'|'.join(flag_names(actions)) or 'none'} (0x{reply.actions:x}) "
            f"protocol {'|'.join(flag_names(protocol)) or 'none'} (0x{reply.protocol:x})")
    lists = [f"{MacroStage(stage).name.lower()}={as_field(names)}" for stage, names in reply.macros.items()]
    return " ".join([text, "macro lists", *lists]) if lists else text
