"""Numbers of the milter protocol, version 6 (names as in libmilter's mfdef.h).

Only numbers, flag words and family bytes live here; see ``docs/protocol.md`` §2-§4 for their
meaning. Codes, and which command goes with which flag, are the rows of
:mod:`.table`.
"""

from __future__ import annotations

import enum

PROTOCOL_VERSION = 6
MIN_MTA_VERSION = 2
#: libmilter reads the version as a signed 32-bit number: above this it is negative, so too old.
MAX_MTA_VERSION = 0x7FFFFFFF

LEN_BYTES = 4
OPTLEN = 12
CHUNK_SIZE = 65535
#: Default maximum *payload* (command byte excluded): a full 65535-byte body
#: chunk arrives with a length field of 65536.
MAX_DATA_SIZE = 65535
MDS_256K = 262143
MDS_1M = 1048575


class Family(bytes, enum.Enum):
    """Address family byte of SMFIC_CONNECT (SMFIA_*)."""

    UNKNOWN = b"U"
    UNIX = b"L"
    INET = b"4"
    INET6 = b"6"


class Action(enum.IntFlag):
    """What the filter may do at end of message (SMFIF_*)."""

    NONE = 0
    ADDHDRS = 0x001
    CHGBODY = 0x002
    ADDRCPT = 0x004
    DELRCPT = 0x008
    CHGHDRS = 0x010
    QUARANTINE = 0x020
    CHGFROM = 0x040
    ADDRCPT_PAR = 0x080
    SETSYMLIST = 0x100


ALL_ACTIONS = Action(0x1FF)
V1_ACTIONS = Action(0x0F)


class Proto(enum.IntFlag):
    """Protocol flags (SMFIP_*): skip bits, no-reply bits and the rest."""

    NONE = 0
    NOCONNECT = 0x1
    NOHELO = 0x2
    NOMAIL = 0x4
    NORCPT = 0x8
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000


V1_PROTO = Proto(0x3F)
ALL_PROTO = Proto(0x1FFFFF)


def flag_names(flags: Action | Proto) -> list[str]:
    """The names of ``flags``' bits, as docs/protocol.md §4.2-§4.3 gives them, lowest bit first;
    bits that have none as one hex number last (a log line says what was asked, in words)."""
    kind = type(flags)
    names = [f.name for f in kind if f.value and f.name and f in flags]
    rest = int(flags) & ~sum(f.value for f in kind)
    return names + [f"0x{rest:x}"] if rest else names


class MacroStage(enum.IntEnum):
    """Stage numbers of macro lists in the OPTNEG reply (SMFIM_*), not in protocol order."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6

