"""Helpers for integration tests that talk to a real running :class:`~pytclmilter.Milter`.

* :class:`MilterThread` / :func:`serving` run a Milter's blocking ``run()`` in a
  background thread on ``inet:0@127.0.0.1`` (or any spec, e.g. a unix socket in
  a tmp dir), wait until it listens and stop it afterwards, with bounded waits.
* :class:`RawMTA` is a tiny MTA-side client that writes and reads milter frames
  by hand, written from the protocol description (docs/protocol.md), not
  from ``pytclmilter.protocol``: the tests must not check our codec with our
  codec.  It is used where the PyPI ``miltertest`` client cannot go (8-bit
  bodies, macro lists in the OPTNEG reply, ``q`` before the final reply,
  garbled packets, "one write" checks).
* :func:`mt_client` gives a negotiated ``miltertest.MilterConnection``.
* :class:`InProcessMTA` drives a ``ConnectionEngine`` in process, with no socket and no
  event loop (unless a test brings one): :class:`FakeLink` stands in for the server's
  connection, and the same hand-built frames go in as bytes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterator

import miltertest

# ---------------------------------------------------------------- protocol numbers (docs/protocol.md §2-§4)

VERSION = 6
ALL_ACTIONS = 0x1FF
ALL_PROTO = 0x1FFFFF
MAX_PAYLOAD = 65535
CHUNK = 65535

# action flags (SMFIF_*)
F_ADDHDRS, F_CHGBODY, F_ADDRCPT, F_DELRCPT = 0x001, 0x002, 0x004, 0x008
F_CHGHDRS, F_QUARANTINE, F_CHGFROM, F_ADDRCPT_PAR, F_SETSYMLIST = 0x010, 0x020, 0x040, 0x080, 0x100

# protocol flags (SMFIP_*)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
P_HDR_LEADSPC = 0x100000
SKIP_BITS = {
    "connect": P_NOCONNECT, "helo": P_NOHELO, "envfrom": P_NOMAIL, "envrcpt": P_NORCPT,
    "body": P_NOBODY, "header": P_NOHDRS, "eoh": P_NOEOH, "unknown": P_NOUNKNOWN, "data": P_NODATA,
}
ALL_NR = P_NR_HDR | P_NR_CONN | P_NR_HELO | P_NR_MAIL | P_NR_RCPT | P_NR_DATA | P_NR_UNKN | P_NR_EOH | P_NR_BODY

#: What an MTA of each version offers (Postfix configured with milter_protocol = 2, 3, 4; 5 and 6 full).
OFFERS = {
    2: (0x3F, 0x7F),
    3: (0x3F, 0x17F),
    4: (0x3F, 0x37F),
    5: (ALL_ACTIONS, ALL_PROTO),
    6: (ALL_ACTIONS, ALL_PROTO),
}

#: Replies that end the filter's answer to an event (docs/protocol.md §6.1; `s` only for body chunks).
FINAL = frozenset(b"cartdys")
EMPTY_REPLIES = frozenset(b"cartdsp")

WAIT = 5.0  # default bound for every wait in these helpers


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it is truthy (returns its value) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


# ---------------------------------------------------------------- running a Milter in a thread


def socket_address(spec: Any) -> tuple[int, Any]:
    """(family, address) to connect to the ConnSpec a Milter reports in ``listening``."""
    if spec.family == "unix":
        return socket.AF_UNIX, spec.path
    if spec.family == "inet":
        return socket.AF_INET, (spec.host or "127.0.0.1", spec.port)
    return socket.AF_INET6, (spec.host or "::1", spec.port)


class MilterThread:
    """``milter.run()`` in a daemon thread; ``start`` waits until it listens."""

    def __init__(self, milter: Any) -> None:
        self.milter = milter
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="milter", daemon=True)
        self.spec: Any = None

    def _main(self) -> None:
        try:
            self.milter.run()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    def start(self, timeout: float = WAIT) -> "MilterThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while self.milter.listening is None:
            if not self.thread.is_alive():
                raise AssertionError(f"milter stopped before it listened: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError("milter did not start listening in time")
            time.sleep(0.005)
        self.spec = self.milter.listening
        return self

    @property
    def address(self) -> tuple[int, Any]:
        return socket_address(self.spec)

    def connect(self, timeout: float = WAIT) -> socket.socket:
        family, addr = self.address
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(addr)
        return sock

    def raw(self, **optneg: Any) -> "RawMTA":
        """A connected RawMTA; negotiated unless ``negotiate=False``."""
        negotiate = optneg.pop("negotiate", True)
        mta = RawMTA(self.connect())
        if negotiate:
            mta.optneg(**optneg)
        return mta

    def mt(self, **optneg: Any) -> miltertest.MilterConnection:
        return mt_client(self.connect(), **optneg)

    def join(self, timeout: float = WAIT) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"milter.run() did not return within {timeout}s")

    def stop(self, timeout: float = WAIT) -> None:
        self.milter.stop()
        self.join(timeout)

    def __enter__(self) -> "MilterThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.thread.is_alive():
            self.stop(timeout=self.milter.grace + WAIT)


@contextlib.contextmanager
def serving(milter: Any) -> Iterator[MilterThread]:
    """Run ``milter`` in a background thread for the duration of the block."""
    with MilterThread(milter) as mt:
        yield mt
    if mt.error is not None:
        raise mt.error


def mt_client(sock: socket.socket, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTO) -> miltertest.MilterConnection:
    """A miltertest MTA connection after option negotiation."""
    conn = miltertest.MilterConnection(sock)
    conn.optneg_mta(actions=actions, protocol=protocol)
    return conn


# ---------------------------------------------------------------- a raw MTA client written from docs/protocol.md

_LEN = struct.Struct("!I")


def frame(code: bytes | str, payload: bytes = b"") -> bytes:
    """One packet: u32 length (command byte + payload, big-endian), command, payload (docs/protocol.md §1.1)."""
    if isinstance(code, str):
        code = code.encode()
    assert len(code) == 1
    return _LEN.pack(len(payload) + 1) + code + payload


def z(*strings: str | bytes) -> bytes:
    """NUL-terminated strings, concatenated."""
    return b"".join((s.encode() if isinstance(s, str) else s) + b"\0" for s in strings)


def parse_frames(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Split ``data`` into complete frames; returns them and the incomplete rest."""
    out = []
    while len(data) >= 5:
        (length,) = _LEN.unpack_from(data)
        assert length >= 1, f"reply frame with length {length}"
        if len(data) < 4 + length:
            break
        out.append((data[4:5], data[5 : 4 + length]))
        data = data[4 + length :]
    return out, data


def strings(payload: bytes) -> list[bytes]:
    """A reply payload made of NUL-terminated strings (must end in NUL)."""
    assert payload.endswith(b"\0"), f"not NUL-terminated: {payload!r}"
    return payload[:-1].split(b"\0")


class RawMTA:
    """The MTA side of one milter connection, frame by frame."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.negotiated: tuple[int, int, int, dict[int, bytes]] | None = None

    # -- bytes
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, code: bytes | str, payload: bytes = b"") -> None:
        self.sock.sendall(frame(code, payload))

    def _fill(self, timeout: float) -> bool:
        """Read once; False on EOF."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            return False
        self.buf += data
        return True

    def recv_frame(self, timeout: float = WAIT) -> tuple[bytes, bytes]:
        """The next frame (code, payload); raises EOFError at end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            frames, _ = parse_frames(self.buf)
            if frames:
                code, payload = frames[0]
                self.buf = self.buf[5 + len(payload) :]
                return code, payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete frame within {timeout}s (have {self.buf[:40]!r})")
            if not self._fill(left):
                raise EOFError(f"connection closed (pending {self.buf[:40]!r})")

    def reply(self, timeout: float = WAIT, progress: list[int] | None = None) -> tuple[bytes, bytes]:
        """The next frame that is not SMFIR_PROGRESS (``p`` frames are counted in ``progress``)."""
        while True:
            code, payload = self.recv_frame(timeout)
            if code == b"p":
                assert payload == b"", "progress carries no payload"
                if progress is not None:
                    progress.append(1)
                continue
            return code, payload

    def until_final(self, timeout: float = WAIT) -> list[tuple[bytes, bytes]]:
        """Frames up to and including the final reply (modifications, q and p before it)."""
        out = []
        while True:
            code, payload = self.recv_frame(timeout)
            out.append((code, payload))
            if code[0] in FINAL and code != b"s":
                return out

    def burst(self, timeout: float = WAIT) -> list[tuple[bytes, bytes]]:
        """Frames in the first recv() once data is there (to check "sent in one write")."""
        assert not self.buf
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "nothing arrived"
        data = self.sock.recv(1 << 20)
        frames, rest = parse_frames(data)
        self.buf = rest
        return frames

    def expect_eof(self, timeout: float = WAIT) -> float:
        """Wait until the filter closes the connection; returns the seconds waited. Unread frames fail."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection still open after {timeout}s")
            try:
                if not self._fill(left):
                    break
            except socket.timeout:
                continue
        return time.monotonic() - start

    def is_open(self, timeout: float = 0.2) -> bool:
        """True if no EOF arrives within ``timeout`` (data that arrives is kept)."""
        try:
            return self._fill(timeout)
        except (socket.timeout, TimeoutError):
            return True

    def close(self) -> None:
        self.sock.close()

    # -- commands (docs/protocol.md §2)
    def optneg(self, version: int = VERSION, actions: int | None = None, protocol: int | None = None) -> tuple[int, int, int, dict[int, bytes]]:
        default_actions, default_proto = OFFERS.get(version, (ALL_ACTIONS, ALL_PROTO))
        actions = default_actions if actions is None else actions
        protocol = default_proto if protocol is None else protocol
        self.send(b"O", struct.pack("!III", version, actions, protocol))
        code, payload = self.recv_frame()
        assert code == b"O", f"OPTNEG answered with {code!r}"
        assert len(payload) >= 12
        v, a, p = struct.unpack_from("!III", payload)
        macros: dict[int, bytes] = {}
        rest = payload[12:]
        while rest:
            (stage,) = struct.unpack_from("!I", rest)
            nul = rest.index(b"\0", 4)
            macros[stage] = rest[4:nul]
            rest = rest[nul + 1 :]
        self.negotiated = (v, a, p, macros)
        return self.negotiated

    def command(self, code: bytes | str, payload: bytes = b"", timeout: float = WAIT) -> tuple[bytes, bytes]:
        """Send a command and return its (non-progress) reply."""
        self.send(code, payload)
        return self.reply(timeout)

    @staticmethod
    def connect_payload(host: str = "client.example", family: bytes = b"4", port: int = 4321,
                        address: str = "192.0.2.1") -> bytes:
        payload = z(host) + family
        if family != b"U":
            payload += struct.pack("!H", port) + z(address)
        return payload

    def connect(self, host: str = "client.example", family: bytes = b"4", port: int = 4321,
                address: str = "192.0.2.1") -> tuple[bytes, bytes]:
        return self.command(b"C", self.connect_payload(host, family, port, address))

    def helo(self, name: str = "client.example") -> tuple[bytes, bytes]:
        return self.command(b"H", z(name))

    def mail(self, *args: str) -> tuple[bytes, bytes]:
        return self.command(b"M", z(*(args or ("<a@example.org>",))))

    def rcpt(self, *args: str) -> tuple[bytes, bytes]:
        return self.command(b"R", z(*(args or ("<b@example.com>",))))

    def header(self, name: str | bytes, value: str | bytes) -> tuple[bytes, bytes]:
        return self.command(b"L", z(name, value))

    def eoh(self) -> tuple[bytes, bytes]:
        return self.command(b"N")

    def body(self, chunk: bytes) -> tuple[bytes, bytes]:
        return self.command(b"B", chunk)

    def macro(self, stage: bytes | str, pairs: dict[str, str]) -> None:
        if isinstance(stage, str):
            stage = stage.encode()
        self.send(b"D", stage + b"".join(z(k, v) for k, v in pairs.items()))

    def eom(self, timeout: float = WAIT) -> list[tuple[bytes, bytes]]:
        self.send(b"E")
        return self.until_final(timeout)

    def abort(self) -> None:
        self.send(b"A")

    def quit(self) -> None:
        self.send(b"Q")

    def envelope(self) -> None:
        """C, H, M, R each answered with continue."""
        for reply in (self.connect(), self.helo(), self.mail(), self.rcpt()):
            assert reply == (b"c", b""), reply

    def __enter__(self) -> "RawMTA":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_milter(**kwargs: Any) -> Any:
    """A Milter on an ephemeral localhost port with a short grace period (override with kwargs)."""
    from pytclmilter import Milter

    kwargs.setdefault("connection", "inet:0@127.0.0.1")
    kwargs.setdefault("grace", 1.0)
    return Milter(**kwargs)


# ---------------------------------------------------------------- a ConnectionEngine in process


class FakeLink:
    """The engine's ``Link`` (pytclmilter.engine.Link) without a socket: keeps what is written,
    records pausing and closing."""

    blocked = False
    peer = "the test"
    proxied = False

    def __init__(self) -> None:
        self.data = b""
        self.paused = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def touch(self) -> None:
        pass


class InProcessMTA:
    """The MTA side of one ``ConnectionEngine`` fed directly: frames in, reply frames out.

    Replies are read from what the engine wrote to its :class:`FakeLink`; each reply is
    returned once (``replies`` takes the frames written since the last call).
    """

    def __init__(self, milter: Any, conn_id: int = 1) -> None:
        from pytclmilter.engine import ConnectionEngine

        self.link = FakeLink()
        self.engine = ConnectionEngine(milter.shared, conn_id, self.link)
        self._taken = 0

    def send(self, code: bytes | str, payload: bytes = b"") -> None:
        self.engine.data_received(frame(code, payload))

    def replies(self) -> list[tuple[bytes, bytes]]:
        frames, rest = parse_frames(self.link.data[self._taken :])
        self._taken = len(self.link.data) - len(rest)
        return frames

    def command(self, code: bytes | str, payload: bytes = b"") -> list[tuple[bytes, bytes]]:
        """Send a command; the frames the engine wrote in answer (none for a no-reply event)."""
        self.send(code, payload)
        return self.replies()

    def optneg(self, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTO) -> int:
        """Negotiate; the protocol flags the filter asked for."""
        ((code, payload),) = self.command(b"O", struct.pack("!III", VERSION, actions, protocol))
        assert code == b"O", code
        return struct.unpack_from("!III", payload)[2]

    def connect(self, host: str = "client.example") -> list[tuple[bytes, bytes]]:
        return self.command(b"C", RawMTA.connect_payload(host))
