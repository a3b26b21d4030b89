"""Frames and payloads, both directions, without I/O.

A frame is ``u32 length`` (command byte + payload, big-endian), ``command``,
``payload``. This module splits a byte stream into frames and has one function
per payload shape, turning it into the typed values of :mod:`.events` and
back; which code has which shape is :mod:`.table`'s row, which also dispatches.
Decoding is strict: a payload that does not have exactly the documented shape
raises :class:`RemoteProtocolError`, because a garbled packet must end that one
connection, never be guessed at.

Text rule: every string on the wire is bytes; we hand it on as ``str``
decoded from UTF-8 with ``surrogateescape``, so bytes that are not valid UTF-8
become U+DC80..U+DCFF and go back out as the very same bytes.
"""

from __future__ import annotations

import socket
import struct
from typing import Final, Iterable, Iterator, Mapping, TypeVar, overload

from . import events as ev
from .constants import CHUNK_SIZE, Family, MacroStage
from .errors import LocalProtocolError, RemoteProtocolError

_U32: Final = struct.Struct("!I")
_U16: Final = struct.Struct("!H")
_HEADER: Final = struct.Struct("!Ic")
_OPTNEG: Final = struct.Struct("!III")
_T = TypeVar("_T")


def text(raw: bytes) -> str:
    """Bytes from the wire as text; never raises, and :func:`wire` undoes it exactly."""
    return raw.decode("utf-8", "surrogateescape")


def wire(value: str) -> bytes:
    """Text back to wire bytes: UTF-8, with surrogate-escaped bytes restored.

    Lone surrogates that did not come from :func:`text` (U+D800..U+DC7F, U+DD00..)
    cannot be sent; they are replaced by U+FFFD rather than failing the mail.
    """
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "".join(
            ch if not (0xD800 <= ord(ch) <= 0xDFFF) or 0xDC80 <= ord(ch) <= 0xDCFF else "\ufffd" for ch in value
        ).encode("utf-8", "surrogateescape")


def frame(code: bytes, payload: bytes = b"") -> bytes:
    """One packet: length, code, payload."""
    return _HEADER.pack(len(payload) + 1, code) + payload


# ------------------------------------------------------------------ framing


class FrameReader:
    """Splits a byte stream into ``(code, payload)`` frames.

    The length is checked against ``max_payload`` before anything is buffered
    for the payload, so an oversize frame is refused, never allocated.

    Why two buffers: a read that holds only whole frames (the usual case) is
    parsed in place as ``bytes``, with no copy, its header read byte by byte
    (compiled, that is a few instructions; ``struct`` is a method call). Only a
    frame split across reads is gathered in a bytearray, which grows in
    amortised constant time however large the frame (a 1 MB body chunk arriving
    in many reads), and becomes ``bytes`` again once it is complete.
    """

    __slots__ = ("_buf", "_pos", "_partial", "_need", "max_payload", "_codes")

    def __init__(self, codes: frozenset[bytes], max_payload: int) -> None:
        self._buf = b""
        self._pos = 0
        self._partial: bytearray | None = None  # an incomplete frame, gathered across reads
        self._need = 0  # bytes _partial must hold before it is parsed again
        self.max_payload = max_payload
        self._codes = codes

    def feed(self, data: bytes) -> None:
        partial = self._partial
        if partial is not None:
            partial += data
        elif self._pos >= len(self._buf):
            self._buf, self._pos = data if type(data) is bytes else bytes(data), 0
        else:  # fed again before the frames already here were read: gather both
            self._hold(0).extend(data)

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos + (len(self._partial) if self._partial is not None else 0)

    def _hold(self, need: int) -> bytearray:
        """Move what is left of the buffer into _partial until it holds ``need`` bytes."""
        partial = self._partial = bytearray(memoryview(self._buf)[self._pos :])
        self._need = need
        self._buf, self._pos = b"", 0
        return partial

    def next_frame(self) -> tuple[bytes, bytes] | None:
        partial = self._partial
        if partial is not None:
            if len(partial) < self._need:
                if self._need == 5 and len(partial) == 4:  # a length gathered from several reads
                    self._check_length(int.from_bytes(partial, "big"))
                return None
            self._buf, self._pos, self._partial = bytes(partial), 0, None
        buf, pos = self._buf, self._pos
        size = len(buf)
        if size - pos < 5:
            if size - pos == 4:  # the length alone can be wrong: say so now, not when a 5th byte comes
                self._check_length(int.from_bytes(buf[pos : pos + 4], "big"))
            if size > pos:
                self._hold(5)
            return None
        length = (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]
        code = buf[pos + 4 : pos + 5]
        if length == 0:
            self._check_length(length)
        if code not in self._codes:
            raise RemoteProtocolError(f"unknown command {show(code)}")
        if length - 1 > self.max_payload:
            self._check_length(length)
        end = pos + 4 + length
        if size < end:
            self._hold(end - pos)
            return None
        self._pos = end
        return code, buf[pos + 5 : end]

    def _check_length(self, length: int) -> None:
        """A peer that sent a zero or oversize length and waits would otherwise hold its
        connection open until the I/O timeout, with nothing logged."""
        if length == 0:
            raise RemoteProtocolError("zero-length packet")
        if length - 1 > self.max_payload:
            raise RemoteProtocolError(f"packet of {length - 1} bytes exceeds the limit of {self.max_payload}")


def show(code: bytes) -> str:
    """A command or reply code for an error message."""
    return repr(code.decode("latin-1"))


# ------------------------------------------------------------------ payload helpers


def _strings(payload: bytes, what: str) -> list[bytes]:
    """A list of NUL-terminated strings; the payload must end in NUL."""
    if not payload or payload[-1] != 0:
        raise RemoteProtocolError(f"{what}: string not NUL-terminated")
    return payload[:-1].split(b"\0")


def _exactly(payload: bytes, count: int, what: str) -> list[bytes]:
    parts = _strings(payload, what)
    if len(parts) != count:
        raise RemoteProtocolError(f"{what}: expected {count} string(s), got {len(parts)}")
    return parts


def _z(value: str, what: str) -> bytes:
    raw = wire(value)
    if 0 in raw:  # an int needle: a bytes one goes through the buffer protocol
        raise LocalProtocolError(f"{what} must not contain NUL")
    return raw + b"\0"


def _zs(values: Iterable[str]) -> bytes:
    """Strings as the MTA writes them: each NUL-terminated (no check: the MTA side, tests)."""
    return b"".join(wire(v) + b"\0" for v in values)


# ------------------------------------------------------------------ commands: payload -> event


def decode_optneg(payload: bytes) -> ev.OptionNegotiation:
    if len(payload) < 12:
        raise RemoteProtocolError(f"option negotiation: {len(payload)} bytes, need 12")
    return ev.OptionNegotiation(*_OPTNEG.unpack_from(payload))


#: Pairs a macro packet may hold and be kept decoded for its lookups. An MTA sends a dozen; a
#: peer's 64 KiB packet of 3-byte pairs made a dict of 8 000 strings, 13 times its size, kept for
#: the session in each of seven stages (3.3 MB a connection, 170 MB for 50): such a packet is
#: searched in its bytes instead, at each lookup, keeping nothing but the packet.
KEPT_PAIRS: Final = 256


class LazyMacros(Mapping[str, str]):
    """Macro pairs decoded on first use: the MTA sends macros before every event, few are read."""

    __slots__ = ("_raw", "_decoded")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _pairs(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            parts = self._raw.split(b"\0")
            parts.pop()  # "" after the last NUL, or bytes without one: no string, as libmilter reads them
            # An odd name without a value is dropped, as libmilter's lookup stops there. Of two
            # pairs with one name the first counts, as libmilter's lookup finds it first.
            decoded = {}
            for i in range(0, len(parts) - 1, 2):
                decoded.setdefault(text(parts[i]), text(parts[i + 1]))
            if len(decoded) <= KEPT_PAIRS:
                self._decoded = decoded
        return decoded

    @property
    def has_pairs(self) -> bool:
        """At least one name/value pair, known without decoding: two NUL-terminated strings."""
        raw = self._raw
        if raw and raw[-1] == 0:  # as every MTA sends it: a NUL before the last byte suffices
            return 0 in raw[:-1]  # (faster than find() or count(): no arguments to parse, a memchr)
        return raw.count(0) >= 2  # bytes after the last NUL are no string, as libmilter reads them

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, default: str | _T, /) -> str | _T: ...
    def get(self, name: str, default: object = None) -> object:
        """dict.get on the pairs (Mapping's would go through __getitem__ and an exception)."""
        decoded = self._decoded
        raw = self._raw  # (an MTA's packet is shorter than the NULs of KEPT_PAIRS pairs: no count)
        if decoded is None and len(raw) > 2 * KEPT_PAIRS + 1 and raw.count(0) > 2 * KEPT_PAIRS + 1:
            found = _find_pair(raw, name)
            return default if found is None else text(found)
        return (decoded if decoded is not None else self._pairs()).get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._pairs())

    def __len__(self) -> int:
        return len(self._pairs())

    def __repr__(self) -> str:
        return repr(self._pairs())


def _find_pair(raw: bytes, name: str) -> bytes | None:
    """The value of the first pair called ``name`` in a packet's pairs, in one pass over the bytes
    (a match at an odd place is a value, not a name: told by the NULs before it); None if none."""
    try:
        key = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate text() never makes: no name on the wire
        return None
    if 0 in key:
        return None
    data = b"\0" + raw  # every string is preceded by a NUL: the i-th by i + 1 of them
    needle = b"\0" + key + b"\0"
    pos = nuls = 0
    while True:
        at = data.find(needle, pos)
        if at < 0:
            return None
        nuls += data.count(0, pos, at + 1)
        pos = at + 1
        if nuls % 2:  # the string after this NUL is a name
            start = at + len(needle)
            if start >= len(data):  # a last name without its value: dropped, as when decoded
                return None
            end = data.find(b"\0", start)
            return None if end < 0 else data[start:end]  # (a last value without its NUL is none)


def decode_macro(payload: bytes) -> ev.Macro:
    if not payload:
        raise RemoteProtocolError("macro: empty payload")
    return ev.Macro(payload[:1], LazyMacros(payload[1:]))


_FAMILIES: Final = {f.value: f for f in Family}


def decode_connect(payload: bytes) -> ev.Connect:
    nul = payload.find(b"\0")
    if nul < 0 or nul + 1 >= len(payload):
        raise RemoteProtocolError("connect: missing host name or family")
    host = text(payload[:nul])
    family = _FAMILIES.get(payload[nul + 1 : nul + 2])  # a dict: Family(...) costs a microsecond
    if family is None:
        raise RemoteProtocolError(f"connect: unknown address family {show(payload[nul + 1 : nul + 2])}")
    rest = payload[nul + 2 :]
    if family is Family.UNKNOWN:
        return ev.Connect(host, family)
    if len(rest) < 3:
        raise RemoteProtocolError("connect: missing port or address")
    (port,) = _U16.unpack_from(rest)
    (address,) = _exactly(rest[2:], 1, "connect address")
    return ev.Connect(host, family, port, _address(family, address))


#: The longest unix socket path libmilter copies into a sockaddr_un (sun_path, 108 bytes, its NUL).
_SUN_PATH_MAX: Final = 107


def _address(family: Family, raw: bytes) -> str:
    """The address as libmilter's filters see it: parsed into a sockaddr and printed
    (docs/protocol.md §2.1). So Sendmail's "IPv6:" tag and its uncompressed form, or IPv4's
    other spellings, reach a script as they would under libmilter; what it cannot parse ends
    the session there and here."""
    if family is Family.UNIX:
        if len(raw) > _SUN_PATH_MAX:
            raise RemoteProtocolError(f"connect: unix socket path of {len(raw)} bytes is too long")
        return text(raw)
    try:
        if family is Family.INET:
            return socket.inet_ntoa(socket.inet_aton(raw.decode("ascii")))  # libmilter's inet_aton
        if raw[:5].lower() == b"ipv6:":
            raw = raw[5:]
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, raw.decode("ascii")))
    except (OSError, ValueError):  # (UnicodeDecodeError is a ValueError)
        raise RemoteProtocolError(f"connect: {raw[:64]!r} is not an {family.name} address") from None


def decode_helo(payload: bytes) -> ev.Helo:
    return ev.Helo(text(_exactly(payload, 1, "helo")[0]))


def decode_envfrom(payload: bytes) -> ev.EnvFrom:
    return ev.EnvFrom([text(p) for p in _strings(payload, "mail")])


def decode_envrcpt(payload: bytes) -> ev.EnvRcpt:
    return ev.EnvRcpt([text(p) for p in _strings(payload, "rcpt")])


def decode_unknown(payload: bytes) -> ev.Unknown:
    return ev.Unknown(text(_exactly(payload, 1, "unknown command")[0]))


def decode_header(payload: bytes) -> ev.Header:
    """SMFIC_HEADER payload -> Header; the session's fast path for a run of headers calls it directly."""
    # The most frequent command, so the checks of _exactly are written out: decoded first, then
    # split (compiled, both are single calls; bytes methods are not). The same strings as splitting
    # first: a NUL byte is never part of a UTF-8 sequence or of an escaped byte.
    parts = text(payload).split("\0")
    if len(parts) != 3 or parts[2]:
        _exactly(payload, 2, "header")  # raises with the reason
    if not parts[0]:
        raise RemoteProtocolError("header: empty name")
    return ev.Header(parts[0], parts[1])


def decode_body(payload: bytes) -> ev.Body:
    if not payload:
        raise RemoteProtocolError("body: empty chunk")
    return ev.Body(payload)


def decode_eom(payload: bytes) -> ev.EndOfMessage:
    return ev.EndOfMessage(payload)


# ------------------------------------------------------------------ commands: event -> payload
# The MTA side (the `send` client and tests): the same shapes, the other direction.


def encode_optneg(e: ev.OptionNegotiation) -> bytes:
    return _OPTNEG.pack(e.version, e.actions, e.protocol)


def encode_macro(e: ev.Macro) -> bytes:
    return e.stage + b"".join(wire(k) + b"\0" + wire(v) + b"\0" for k, v in e.macros.items())


def encode_connect(e: ev.Connect) -> bytes:
    payload = wire(e.hostname) + b"\0" + e.family.value
    if e.family is not Family.UNKNOWN:
        payload += _U16.pack(e.port) + wire(e.address) + b"\0"
    return payload


def encode_helo(e: ev.Helo) -> bytes:
    return _zs((e.name,))


def encode_args(e: ev.EnvFrom | ev.EnvRcpt) -> bytes:
    return _zs(e.args)


def encode_unknown(e: ev.Unknown) -> bytes:
    return _zs((e.line,))


def encode_header(e: ev.Header) -> bytes:
    return _zs((e.name, e.value))


def encode_chunk(e: ev.Body | ev.EndOfMessage) -> bytes:
    return e.chunk


# ------------------------------------------------------------------ replies: reply -> payload


def encode_optneg_reply(r: ev.OptionNegotiationReply) -> bytes:
    payload = _OPTNEG.pack(r.version, r.actions, r.protocol)
    for stage, names in sorted(r.macros.items()):
        payload += _U32.pack(int(stage)) + _z(names, "macro list")
    return payload


def encode_replycode(r: ev.ReplyCode) -> bytes:
    return _z(r.text, "reply text")


def encode_quarantine(r: ev.Quarantine) -> bytes:
    return _z(r.reason, "quarantine reason")


def encode_addheader(r: ev.AddHeader) -> bytes:
    return _z(r.name, "header name") + _z(r.value, "header value")


def encode_indexed_header(r: ev.InsertHeader | ev.ChangeHeader) -> bytes:
    return _U32.pack(r.index) + _z(r.name, "header name") + _z(r.value, "header value")


def _with_args(address: bytes, args: str | None) -> bytes:
    """An address, then its ESMTP arguments (one string) when there are any."""
    return address if args is None else address + _z(args, "ESMTP arguments")


def encode_addrcpt(r: ev.AddRecipient) -> bytes:
    """Both codes: without ESMTP arguments SMFIR_ADDRCPT, with them SMFIR_ADDRCPT_PAR."""
    return _with_args(_z(r.rcpt, "recipient"), r.args)


def encode_delrcpt(r: ev.DeleteRecipient) -> bytes:
    return _z(r.rcpt, "recipient")


def encode_chgfrom(r: ev.ChangeFrom) -> bytes:
    return _with_args(_z(r.sender, "sender"), r.args)


def encode_replbody(r: ev.ReplaceBody) -> bytes:
    return r.chunk


def frames(code: bytes, data: bytes) -> bytes:
    """Body data as frames of at most CHUNK_SIZE bytes (one frame when it fits, even empty)."""
    if len(data) <= CHUNK_SIZE:
        return frame(code, data)
    view = memoryview(data)
    return b"".join(frame(code, bytes(view[i : i + CHUNK_SIZE])) for i in range(0, len(data), CHUNK_SIZE))


# ------------------------------------------------------------------ replies: payload -> reply
# The MTA side again.


def _reply_strings(payload: bytes, count_min: int, count_max: int, what: str) -> list[str]:
    parts = _strings(payload, what)
    if not count_min <= len(parts) <= count_max:
        raise RemoteProtocolError(f"{what}: expected {count_min}..{count_max} strings, got {len(parts)}")
    return [text(p) for p in parts]


def _indexed_header(payload: bytes, what: str) -> tuple[int, str, str]:
    if len(payload) < 4:
        raise RemoteProtocolError(f"{what}: missing index")
    (index,) = _U32.unpack_from(payload)
    name, value = _reply_strings(payload[4:], 2, 2, what)
    return index, name, value


def decode_optneg_reply(payload: bytes) -> ev.OptionNegotiationReply:
    if len(payload) < 12:
        raise RemoteProtocolError("option negotiation reply shorter than 12 bytes")
    version, actions, protocol = _OPTNEG.unpack_from(payload)
    macros: dict[MacroStage, str] = {}
    rest = payload[12:]
    while rest:
        if len(rest) < 5:
            raise RemoteProtocolError("option negotiation reply: truncated macro list")
        (stage,) = _U32.unpack_from(rest)
        nul = rest.find(b"\0", 4)
        if nul < 0:
            raise RemoteProtocolError("option negotiation reply: macro list not NUL-terminated")
        try:
            macros[MacroStage(stage)] = text(rest[4:nul])
        except ValueError:
            raise RemoteProtocolError(f"option negotiation reply: unknown macro stage {stage}") from None
        rest = rest[nul + 1 :]
    return ev.OptionNegotiationReply(version, actions, protocol, macros)


def decode_replycode(payload: bytes) -> ev.ReplyCode:
    return ev.ReplyCode(_reply_strings(payload, 1, 1, "reply code")[0])


def decode_quarantine(payload: bytes) -> ev.Quarantine:
    return ev.Quarantine(_reply_strings(payload, 1, 1, "quarantine")[0])


def decode_addheader(payload: bytes) -> ev.AddHeader:
    return ev.AddHeader(*_reply_strings(payload, 2, 2, "add header"))


def decode_insheader(payload: bytes) -> ev.InsertHeader:
    return ev.InsertHeader(*_indexed_header(payload, "insert header"))


def decode_chgheader(payload: bytes) -> ev.ChangeHeader:
    return ev.ChangeHeader(*_indexed_header(payload, "change header"))


def decode_addrcpt(payload: bytes) -> ev.AddRecipient:
    return ev.AddRecipient(_reply_strings(payload, 1, 1, "add recipient")[0])


def decode_addrcpt_par(payload: bytes) -> ev.AddRecipient:
    parts = _reply_strings(payload, 1, 2, "add recipient")
    return ev.AddRecipient(parts[0], parts[1] if len(parts) > 1 else "")


def decode_delrcpt(payload: bytes) -> ev.DeleteRecipient:
    return ev.DeleteRecipient(_reply_strings(payload, 1, 1, "delete recipient")[0])


def decode_chgfrom(payload: bytes) -> ev.ChangeFrom:
    parts = _reply_strings(payload, 1, 2, "change sender")
    return ev.ChangeFrom(parts[0], parts[1] if len(parts) > 1 else None)


def decode_replbody(payload: bytes) -> ev.ReplaceBody:
    return ev.ReplaceBody(payload)


def split_body(data: bytes, size: int = CHUNK_SIZE) -> Iterable[bytes]:
    """Body data as MTA chunks of at most ``size`` bytes."""
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])
