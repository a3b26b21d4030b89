"""Callback return codes (libmilter's SMFIS_*) and how loose values map onto them."""

from __future__ import annotations

import enum
from typing import Final


class Status(enum.IntEnum):
    CONTINUE = 0
    REJECT = 1
    DISCARD = 2
    ACCEPT = 3
    TEMPFAIL = 4
    NOREPLY = 7
    SKIP = 8

    @property
    def smfis(self) -> str:
        return "SMFIS_" + self.name


CONTINUE = Status.CONTINUE
REJECT = Status.REJECT
DISCARD = Status.DISCARD
ACCEPT = Status.ACCEPT
TEMPFAIL = Status.TEMPFAIL
NOREPLY = Status.NOREPLY
SKIP = Status.SKIP

_BY_NAME: Final = {s.name: s for s in Status} | {s.smfis: s for s in Status}
_BY_VALUE: Final = {int(s): s for s in Status}

#: What a failing callback may answer (on_error, -onerror): SKIP and NOREPLY are answers to one
#: stage only (a body chunk; an event the MTA expects no reply to), not to any failure.
ERROR_ANSWERS: Final = (TEMPFAIL, CONTINUE, ACCEPT, REJECT, DISCARD)


def parse_status(value: object) -> Status | None:
    """A callback's result as a Status; ``None`` and ``""`` mean continue; unknown -> None.

    Accepts Status members, their integer values, and the names ``CONTINUE`` or
    ``SMFIS_CONTINUE`` (any case). Only ints and strs are compared, by their base class's
    methods: a result whose ``==`` raises (a pandas Series) is no status, not a failure.
    """
    if value is None:
        return CONTINUE
    if isinstance(value, Status):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return _BY_VALUE.get(int.__index__(value))
    if isinstance(value, str):
        text = str.__str__(value)
        return CONTINUE if not text else _BY_NAME.get(text.strip().upper())
    return None


def status_names() -> list[str]:
    return [s.smfis for s in Status]
