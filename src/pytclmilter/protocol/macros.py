"""Macro storage with libmilter's semantics (docs/protocol.md §5.3).

One slot per stage letter; a new SMFIC_MACRO replaces its slot wholesale;
commands clear the slots of later stages; ABORT clears nothing, so stale
values stay visible exactly as a libmilter filter would see them.
"""

from __future__ import annotations

from typing import Final, Mapping

from .codec import LazyMacros
from .table import COMMANDS, Clears

#: The stages libmilter stores (named by the code of the command the macros precede), in protocol
#: order: the commands with a macro list of their own (SMFIM_*), by the state they enter.
_ORDER: Final = tuple(c.code for c in sorted(COMMANDS, key=lambda c: c.state or 0) if c.macros is not None)
#: Lookup order of smfi_getsymval: latest stage first.
_LOOKUP: Final = _ORDER[::-1]
#: Which slots a command clears when it arrives (its own slot was just filled).
_CLEARS: Final = {c.code: _ORDER[_ORDER.index(c.code) + 1 :] for c in COMMANDS if c.clears is Clears.LATER}
_CLEARS_ALL: Final = frozenset(c.code for c in COMMANDS if c.clears is Clears.ALL)
#: Macro packets for other stages are ignored, as libmilter does.
STORED_STAGES: Final = frozenset(_ORDER)


def letter_of(name: str) -> str:
    """``name`` without the braces of a one-letter name: smfi_getsymval takes ``{i}`` and ``i``
    for one macro (:meth:`MacroStore.get`), so a client that sends one must not send the other."""
    return name[1] if len(name) == 3 and name[0] == "{" and name[2] == "}" else name


def _first_of(slot: Mapping[str, str], name: str, alt: str) -> str:
    """Which of two names a stage's packet has first (libmilter walks the pairs in order and takes
    the first that matches either form of a one-letter name)."""
    return next(key for key in slot if key == name or key == alt)


class MacroStore:
    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[bytes, Mapping[str, str]] = {}

    def define(self, stage: bytes, macros: Mapping[str, str]) -> None:
        """Store a macro packet; other stage letters and empty packets are ignored, as libmilter does."""
        has_pairs = getattr(macros, "has_pairs", None)  # a LazyMacros answers without decoding
        if (has_pairs if has_pairs is not None else macros) and stage in STORED_STAGES:
            self._slots[stage] = macros

    def define_raw(self, payload: bytes) -> None:
        """Store an SMFIC_MACRO payload (stage letter, then pairs) as it came; decoded when looked up.

        The MTA sends macros before nearly every command and filters read few of them, so this
        is the per-packet path: no decoding, no event object.
        """
        stage = payload[:1]
        if stage in STORED_STAGES:
            macros = LazyMacros(payload[1:])
            if macros.has_pairs:
                self._slots[stage] = macros

    def command(self, code: bytes) -> None:
        """Apply the clearing rule of an arriving command."""
        later = _CLEARS.get(code)
        if later is not None:
            slots = self._slots
            if slots:
                for stage in later:
                    if stage in slots:
                        del slots[stage]
        elif code in _CLEARS_ALL:
            self._slots.clear()

    def clear(self) -> None:
        """Forget every slot (QUIT_NC's clearing, which the session applies after the close callback)."""
        self._slots.clear()

    def get(self, name: str) -> str | None:
        """smfi_getsymval: ``i`` also finds ``{i}`` and the reverse, whichever pair of the stage
        comes first; long names only exactly."""
        alt = None
        if len(name) == 1:
            alt = "{" + name + "}"
        elif len(name) == 3 and name[0] == "{" and name[2] == "}":
            alt = name[1]
        slots = self._slots
        for stage in _LOOKUP:
            slot = slots.get(stage)
            if slot is None:
                continue
            value = slot.get(name)
            if alt is not None:
                other = slot.get(alt)
                if other is not None and (value is None or _first_of(slot, name, alt) == alt):
                    value = other
            if value is not None:
                return value
        return None

    def all(self) -> dict[str, str]:
        """Every visible macro, later stages winning (for reports and debugging)."""
        merged: dict[str, str] = {}
        for stage in reversed(_LOOKUP):
            merged.update(self._slots.get(stage, {}))
        return merged
