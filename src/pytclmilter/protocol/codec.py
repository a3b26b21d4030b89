"""Frames and payloads, both directions, without I/O.

A frame is ``u32 length`` (command byte + payload, big-endian), ``command``,
``payload``. This module turns payloads into the typed values of
:mod:`.events` and back. Decoding is strict: a payload that does not have
exactly the documented shape raises :class:`RemoteProtocolError`, because a
garbled packet must end that one connection, never be guessed at.

Text rule: every string on the wire is bytes; we hand it on as ``str``
decoded from UTF-8 with ``surrogateescape``, so bytes that are not valid UTF-8
become U+DC80..U+DCFF and go back out as the very same bytes.
"""

from __future__ import annotations

import struct
from typing import Callable, Final, Iterable, Iterator, Mapping

from . import events as ev
from .constants import CHUNK_SIZE, Cmd, Family, MacroStage, Reply
from .errors import LocalProtocolError, RemoteProtocolError

_U32: Final = struct.Struct("!I")
_U16: Final = struct.Struct("!H")
_HEADER: Final = struct.Struct("!Ic")
_OPTNEG: Final = struct.Struct("!III")

COMMAND_CODES: Final = frozenset(c.value for c in Cmd)
REPLY_CODES: Final = frozenset(r.value for r in Reply)


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
                return None
            self._buf, self._pos, self._partial = bytes(partial), 0, None
        buf, pos = self._buf, self._pos
        size = len(buf)
        if size - pos < 5:
            if size > pos:
                self._hold(5)
            return None
        length = (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]
        code = buf[pos + 4 : pos + 5]
        if length == 0:
            raise RemoteProtocolError("zero-length packet")
        if code not in self._codes:
            raise RemoteProtocolError(f"unknown command {_show(code)}")
        if length - 1 > self.max_payload:
            raise RemoteProtocolError(f"packet of {length - 1} bytes exceeds the limit of {self.max_payload}")
        end = pos + 4 + length
        if size < end:
            self._hold(end - pos)
            return None
        self._pos = end
        return code, buf[pos + 5 : end]


def _show(code: bytes) -> str:
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


def _no_payload(event: type[ev.Event]) -> Callable[[bytes], ev.Event]:
    # libmilter ignores stray payload on these commands; so do we.
    return lambda payload: event()


def _optneg(payload: bytes) -> ev.Event:
    if len(payload) < 12:
        raise RemoteProtocolError(f"option negotiation: {len(payload)} bytes, need 12")
    return ev.OptionNegotiation(*_OPTNEG.unpack_from(payload))


class LazyMacros(Mapping[str, str]):
    """Macro pairs decoded on first use: the MTA sends macros before every event, few are read."""

    __slots__ = ("_raw", "_decoded")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _pairs(self) -> dict[str, str]:
        if self._decoded is None:
            parts = self._raw.split(b"\0")
            if parts and parts[-1] == b"":
                parts.pop()
            # An odd name without a value is dropped, as libmilter's lookup stops there.
            self._decoded = {text(parts[i]): text(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
        return self._decoded

    @property
    def has_pairs(self) -> bool:
        """At least one name/value pair, known without decoding: a NUL before the last byte."""
        raw = self._raw
        return len(raw) > 1 and 0 in raw[:-1]  # a NUL byte; faster than find() or a bytes needle

    def __getitem__(self, name: str) -> str:
        return self._pairs()[name]

    def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
        return self._pairs().get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._pairs())

    def __len__(self) -> int:
        return len(self._pairs())

    def __repr__(self) -> str:
        return repr(self._pairs())


def _macro(payload: bytes) -> ev.Event:
    if not payload:
        raise RemoteProtocolError("macro: empty payload")
    return ev.Macro(payload[:1], LazyMacros(payload[1:]))


_FAMILIES: Final = {f.value: f for f in Family}


def _connect(payload: bytes) -> ev.Event:
    nul = payload.find(b"\0")
    if nul < 0 or nul + 1 >= len(payload):
        raise RemoteProtocolError("connect: missing host name or family")
    host = text(payload[:nul])
    family = _FAMILIES.get(payload[nul + 1 : nul + 2])  # a dict: Family(...) costs a microsecond
    if family is None:
        raise RemoteProtocolError(f"connect: unknown address family {_show(payload[nul + 1 : nul + 2])}")
    rest = payload[nul + 2 :]
    if family is Family.UNKNOWN:
        return ev.Connect(host, family)
    if len(rest) < 3:
        raise RemoteProtocolError("connect: missing port or address")
    (port,) = _U16.unpack_from(rest)
    (address,) = _exactly(rest[2:], 1, "connect address")
    return ev.Connect(host, family, port, text(address))


def _helo(payload: bytes) -> ev.Event:
    return ev.Helo(text(_exactly(payload, 1, "helo")[0]))


def _envfrom(payload: bytes) -> ev.Event:
    return ev.EnvFrom([text(p) for p in _strings(payload, "mail")])


def _envrcpt(payload: bytes) -> ev.Event:
    return ev.EnvRcpt([text(p) for p in _strings(payload, "rcpt")])


def _eom(payload: bytes) -> ev.Event:
    return ev.EndOfMessage(payload)


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


def _body(payload: bytes) -> ev.Event:
    if not payload:
        raise RemoteProtocolError("body: empty chunk")
    return ev.Body(payload)


def _unknown(payload: bytes) -> ev.Event:
    return ev.Unknown(text(_exactly(payload, 1, "unknown command")[0]))


_COMMAND_DECODERS: Final[dict[bytes, Callable[[bytes], ev.Event]]] = {
    b"O": _optneg,
    b"D": _macro,
    b"C": _connect,
    b"H": _helo,
    b"M": _envfrom,
    b"R": _envrcpt,
    b"T": _no_payload(ev.Data),
    b"U": _unknown,
    b"L": decode_header,
    b"N": _no_payload(ev.EndOfHeaders),
    b"B": _body,
    b"E": _eom,
    b"A": _no_payload(ev.Abort),
    b"Q": _no_payload(ev.Quit),
    b"K": _no_payload(ev.QuitNewConnection),
}


def decode_command(code: bytes, payload: bytes) -> ev.Event:
    """MTA command payload -> event. Raises RemoteProtocolError on anything malformed."""
    # The commands of every message are decoded by direct calls (compiled, a call through the
    # table below costs a Python-level call each); the rest through the table.
    if code == b"L":
        return decode_header(payload)
    if code == b"R":
        return _envrcpt(payload)
    if code == b"M":
        return _envfrom(payload)
    if code == b"C":
        return _connect(payload)
    if code == b"E":
        return _eom(payload)
    try:
        decoder = _COMMAND_DECODERS[code]
    except KeyError:
        raise RemoteProtocolError(f"unknown command {_show(code)}") from None
    return decoder(payload)


# ------------------------------------------------------------------ filter replies


def _z(value: str, what: str) -> bytes:
    raw = wire(value)
    if 0 in raw:  # an int needle: a bytes one goes through the buffer protocol
        raise LocalProtocolError(f"{what} must not contain NUL")
    return raw + b"\0"


def _encode_optneg(r: ev.OptionNegotiationReply) -> bytes:
    payload = _OPTNEG.pack(r.version, r.actions, r.protocol)
    for stage, names in sorted(r.macros.items()):
        payload += _U32.pack(int(stage)) + _z(names, "macro list")
    return frame(b"O", payload)


def _encode_body(r: ev.ReplaceBody) -> bytes:
    data = r.chunk
    if len(data) <= CHUNK_SIZE:
        return frame(b"b", data)
    view = memoryview(data)
    return b"".join(frame(b"b", bytes(view[i : i + CHUNK_SIZE])) for i in range(0, len(data), CHUNK_SIZE))


def _encode_rcpt(r: ev.AddRecipient) -> bytes:
    if r.args is None:
        return frame(b"+", _z(r.rcpt, "recipient"))
    return frame(b"2", _z(r.rcpt, "recipient") + _z(r.args, "ESMTP arguments"))


def _encode_indexed(code: bytes, r: ev.InsertHeader | ev.ChangeHeader) -> bytes:
    return frame(code, _U32.pack(r.index) + _z(r.name, "header name") + _z(r.value, "header value"))


def _encode_chgfrom(r: ev.ChangeFrom) -> bytes:
    payload = _z(r.sender, "sender")
    if r.args is not None:
        payload += _z(r.args, "ESMTP arguments")
    return frame(b"e", payload)


_EMPTY_FRAMES: Final = {
    ev.Continue: frame(b"c"),
    ev.Accept: frame(b"a"),
    ev.Reject: frame(b"r"),
    ev.Tempfail: frame(b"t"),
    ev.Discard: frame(b"d"),
    ev.Skip: frame(b"s"),
    ev.Progress: frame(b"p"),
    ev.Shutdown: frame(b"4"),
    ev.ConnFail: frame(b"f"),
}

_REPLY_ENCODERS: Final[dict[type, Callable[[ev.Reply], bytes]]] = {
    ev.OptionNegotiationReply: _encode_optneg,  # type: ignore[dict-item]
    ev.ReplyCode: lambda r: frame(b"y", _z(r.text, "reply text")),  # type: ignore[attr-defined]
    ev.Quarantine: lambda r: frame(b"q", _z(r.reason, "quarantine reason")),  # type: ignore[attr-defined]
    ev.AddHeader: lambda r: frame(b"h", _z(r.name, "header name") + _z(r.value, "header value")),  # type: ignore[attr-defined]
    ev.InsertHeader: lambda r: _encode_indexed(b"i", r),  # type: ignore[arg-type]
    ev.ChangeHeader: lambda r: _encode_indexed(b"m", r),  # type: ignore[arg-type]
    ev.AddRecipient: _encode_rcpt,  # type: ignore[dict-item]
    ev.DeleteRecipient: lambda r: frame(b"-", _z(r.rcpt, "recipient")),  # type: ignore[attr-defined]
    ev.ChangeFrom: _encode_chgfrom,  # type: ignore[dict-item]
    ev.ReplaceBody: _encode_body,  # type: ignore[dict-item]
}


def encode_reply(reply: ev.Reply) -> bytes:
    """Filter reply -> frame(s). ReplaceBody larger than a chunk becomes several frames."""
    fixed = _EMPTY_FRAMES.get(type(reply))
    if fixed is not None:
        return fixed
    encoder = _REPLY_ENCODERS.get(type(reply))
    if encoder is None:
        raise LocalProtocolError(f"{type(reply).__name__} is not a packet")
    try:
        return encoder(reply)
    except struct.error as exc:  # an index or flag word that does not fit its u32
        raise LocalProtocolError(f"{type(reply).__name__}: {exc}") from None


# ------------------------------------------------------------------ MTA side
# Used by the `send` client and by tests: the same shapes, the other direction.


def encode_command(event: ev.Event) -> bytes:
    """MTA command -> frame."""
    t = type(event)
    if t is ev.OptionNegotiation:
        return frame(b"O", _OPTNEG.pack(event.version, event.actions, event.protocol))  # type: ignore[attr-defined]
    if t is ev.Macro:
        pairs = b"".join(wire(k) + b"\0" + wire(v) + b"\0" for k, v in event.macros.items())  # type: ignore[attr-defined]
        return frame(b"D", event.stage + pairs)  # type: ignore[attr-defined]
    if t is ev.Connect:
        c: ev.Connect = event  # type: ignore[assignment]
        payload = wire(c.hostname) + b"\0" + c.family.value
        if c.family is not Family.UNKNOWN:
            payload += _U16.pack(c.port) + wire(c.address) + b"\0"
        return frame(b"C", payload)
    if t is ev.Helo:
        return frame(b"H", wire(event.name) + b"\0")  # type: ignore[attr-defined]
    if t in (ev.EnvFrom, ev.EnvRcpt):
        code = b"M" if t is ev.EnvFrom else b"R"
        return frame(code, b"".join(wire(a) + b"\0" for a in event.args))  # type: ignore[attr-defined]
    if t is ev.Header:
        return frame(b"L", wire(event.name) + b"\0" + wire(event.value) + b"\0")  # type: ignore[attr-defined]
    if t is ev.Body:
        return frame(b"B", event.chunk)  # type: ignore[attr-defined]
    if t is ev.EndOfMessage:
        return frame(b"E", event.chunk)  # type: ignore[attr-defined]
    if t is ev.Unknown:
        return frame(b"U", wire(event.line) + b"\0")  # type: ignore[attr-defined]
    simple = {ev.Data: b"T", ev.EndOfHeaders: b"N", ev.Abort: b"A", ev.Quit: b"Q", ev.QuitNewConnection: b"K"}
    if t in simple:
        return frame(simple[t])
    raise LocalProtocolError(f"{t.__name__} is not a command")


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


def _decode_optneg_reply(payload: bytes) -> ev.Reply:
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


def decode_reply(code: bytes, payload: bytes) -> ev.Reply:
    """Filter reply payload -> value (MTA side)."""
    empty = {v: k for k, v in _EMPTY_FRAMES.items()}
    if frame(code) in empty:
        if payload:
            raise RemoteProtocolError(f"reply {_show(code)} carries {len(payload)} stray bytes")
        return empty[frame(code)]()
    if code == b"O":
        return _decode_optneg_reply(payload)
    if code == b"y":
        return ev.ReplyCode(_reply_strings(payload, 1, 1, "reply code")[0])
    if code == b"q":
        return ev.Quarantine(_reply_strings(payload, 1, 1, "quarantine")[0])
    if code == b"h":
        return ev.AddHeader(*_reply_strings(payload, 2, 2, "add header"))
    if code == b"i":
        return ev.InsertHeader(*_indexed_header(payload, "insert header"))
    if code == b"m":
        return ev.ChangeHeader(*_indexed_header(payload, "change header"))
    if code == b"+":
        return ev.AddRecipient(_reply_strings(payload, 1, 1, "add recipient")[0])
    if code == b"2":
        parts = _reply_strings(payload, 1, 2, "add recipient")
        return ev.AddRecipient(parts[0], parts[1] if len(parts) > 1 else "")
    if code == b"-":
        return ev.DeleteRecipient(_reply_strings(payload, 1, 1, "delete recipient")[0])
    if code == b"e":
        parts = _reply_strings(payload, 1, 2, "change sender")
        return ev.ChangeFrom(parts[0], parts[1] if len(parts) > 1 else None)
    if code == b"b":
        return ev.ReplaceBody(payload)
    raise RemoteProtocolError(f"unknown reply {_show(code)}")


def split_body(data: bytes, size: int = CHUNK_SIZE) -> Iterable[bytes]:
    """Body data as MTA chunks of at most ``size`` bytes."""
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])
