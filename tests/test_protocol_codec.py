"""Wire format of the milter protocol core: frames, payloads, replies, the text rule.

Everything is checked against docs/protocol.md (§1-§3, §4.1, §6.3):
exact byte layouts for a few packets, round trips for every command and every
reply, and the framing limits (65535-byte payload accepted with length 65536,
65536 refused before it is buffered, zero length and unknown commands refused).
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pytclmilter.protocol import (
    Action,
    FilterSession,
    FrameReader,
    LocalProtocolError,
    MacroStage,
    NEED_DATA,
    RemoteProtocolError,
    Wants,
    codec,
    decode_command,
    decode_reply,
    encode_command,
    encode_reply,
    negotiate,
    table,
    text,
    wire,
)
from pytclmilter.protocol import events as ev
from pytclmilter.protocol.constants import CHUNK_SIZE, MAX_DATA_SIZE, Family

FAST = settings(max_examples=150, deadline=None)

# ---------------------------------------------------------------- independent helpers


def raw_frame(code: bytes, payload: bytes = b"") -> bytes:
    """The layout of docs/protocol.md §1.1, written out independently of the codec."""
    return struct.pack("!I", len(payload) + 1) + code + payload


def parse_frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split bytes into (code, payload) by the layout of docs/protocol.md §1.1; all bytes must be used."""
    out = []
    i = 0
    while i < len(data):
        assert len(data) - i >= 5, "truncated frame header"
        (length,) = struct.unpack_from("!I", data, i)
        assert length >= 1
        assert len(data) - i >= 4 + length, "truncated frame"
        out.append((data[i + 4 : i + 5], data[i + 5 : i + 4 + length]))
        i += 4 + length
    return out


def one_frame(data: bytes) -> tuple[bytes, bytes]:
    frames = parse_frames(data)
    assert len(frames) == 1, frames
    return frames[0]


def roundtrip_command(event: ev.Event) -> ev.Event:
    code, payload = one_frame(encode_command(event))
    return decode_command(code, payload)


def roundtrip_reply(reply: ev.Reply) -> list[ev.Reply]:
    return [decode_reply(code, payload) for code, payload in parse_frames(encode_reply(reply))]


# ---------------------------------------------------------------- strategies

# Text that can travel in a NUL-terminated string: any bytes but NUL, as the core sees them.
wire_text = st.binary(max_size=40).map(lambda b: text(b.replace(b"\0", b"")))
nonempty_wire_text = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"x")).map(text)
u32 = st.integers(0, 2**32 - 1)


def commands() -> st.SearchStrategy[ev.Event]:
    """Every MTA command with arbitrary (valid) content."""
    return st.one_of(
        st.builds(ev.OptionNegotiation, u32, u32, u32),
        st.builds(
            ev.Macro,
            st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E", b"U"]),
            st.dictionaries(nonempty_wire_text, wire_text, max_size=4),
        ),
        st.builds(ev.Connect, wire_text, st.just(Family.UNKNOWN)),
        st.builds(ev.Connect, wire_text, st.just(Family.INET), st.integers(0, 65535),
                  st.ip_addresses(v=4).map(str)),
        st.builds(ev.Connect, wire_text, st.just(Family.INET6), st.integers(0, 65535),
                  st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed))),  # (libc's form)
        st.builds(ev.Connect, wire_text, st.just(Family.UNIX), st.integers(0, 65535),
                  wire_text.filter(lambda path: len(wire(path)) < 108)),
        st.builds(ev.Helo, wire_text),
        st.builds(ev.EnvFrom, st.lists(wire_text, min_size=1, max_size=4)),
        st.builds(ev.EnvRcpt, st.lists(wire_text, min_size=1, max_size=4)),
        st.builds(ev.Data),
        st.builds(ev.Unknown, wire_text),
        st.builds(ev.Header, nonempty_wire_text, wire_text),
        st.builds(ev.EndOfHeaders),
        st.builds(ev.Body, st.binary(min_size=1, max_size=300)),
        st.builds(ev.EndOfMessage, st.binary(max_size=50)),
        st.builds(ev.Abort),
        st.builds(ev.Quit),
        st.builds(ev.QuitNewConnection),
    )


def replies() -> st.SearchStrategy[ev.Reply]:
    """Every filter reply that is a packet (body within one chunk)."""
    return st.one_of(
        st.builds(
            ev.OptionNegotiationReply,
            u32,
            u32,
            u32,
            st.dictionaries(st.sampled_from(list(MacroStage)), wire_text, max_size=7),
        ),
        *(st.builds(t) for t in (ev.Continue, ev.Accept, ev.Reject, ev.Tempfail, ev.Discard, ev.Skip,
                                 ev.Progress, ev.Shutdown, ev.ConnFail)),
        st.builds(ev.ReplyCode, wire_text),
        st.builds(ev.Quarantine, wire_text),
        st.builds(ev.AddHeader, wire_text, wire_text),
        st.builds(ev.InsertHeader, u32, wire_text, wire_text),
        st.builds(ev.ChangeHeader, u32, wire_text, wire_text),
        st.builds(ev.AddRecipient, wire_text),
        st.builds(ev.AddRecipient, wire_text, wire_text),
        st.builds(ev.DeleteRecipient, wire_text),
        st.builds(ev.ChangeFrom, wire_text),
        st.builds(ev.ChangeFrom, wire_text, wire_text),
        st.builds(ev.ReplaceBody, st.binary(max_size=300)),
    )


# ---------------------------------------------------------------- commands: exact layouts


def test_connect_ipv4_layout_matches_reference() -> None:
    event = ev.Connect("mx.example", Family.INET, 25, "192.0.2.1")
    payload = b"mx.example\0" + b"4" + b"\x00\x19" + b"192.0.2.1\0"
    assert len(payload) == 24
    assert encode_command(event) == b"\x00\x00\x00\x19" + b"C" + payload
    assert decode_command(b"C", payload) == event


def test_connect_ipv6_unix_and_unknown_layouts() -> None:
    v6 = b"[2001:db8::1]\0" + b"6" + struct.pack("!H", 54321) + b"2001:db8::1\0"
    assert decode_command(b"C", v6) == ev.Connect("[2001:db8::1]", Family.INET6, 54321, "2001:db8::1")
    unix = b"localhost\0L\x00\x00/run/smtpd.sock\0"
    assert decode_command(b"C", unix) == ev.Connect("localhost", Family.UNIX, 0, "/run/smtpd.sock")
    # Family U: hostname and family byte only, no port, no address.
    assert encode_command(ev.Connect("localhost", Family.UNKNOWN)) == raw_frame(b"C", b"localhost\0U")
    unknown = decode_command(b"C", b"localhost\0U")
    assert unknown == ev.Connect("localhost", Family.UNKNOWN)
    assert (unknown.port, unknown.address) == (0, "")


@pytest.mark.parametrize("family, sent, seen", [
    (b"6", b"IPv6:2001:db8::1", "2001:db8::1"),  # Sendmail tags IPv6 addresses
    (b"6", b"IPv6:2001:db8:0:0:0:0:0:1", "2001:db8::1"),  # ... uncompressed without UseCompressedIPv6Addresses
    (b"6", b"ipv6:::1", "::1"),
    (b"6", b"2001:DB8::A", "2001:db8::a"),
    (b"6", b"::ffff:192.0.2.7", "::ffff:192.0.2.7"),
    (b"4", b"192.0.2.007", "192.0.2.7"),
    (b"4", b"127.1", "127.0.0.1"),
    (b"4", b"0x7f.0.0.1", "127.0.0.1"),
])
def test_connect_address_is_seen_as_libmilter_prints_it(family: bytes, sent: bytes, seen: str) -> None:
    """docs/protocol.md §2.1: libmilter parses the address into a sockaddr (inet_aton, inet_pton after
    an "IPv6:" tag) and its filters print that: a script sees the same address text behind any MTA."""
    payload = b"client.example\0" + family + b"\x00\x19" + sent + b"\0"
    assert decode_command(b"C", payload).address == seen


@pytest.mark.parametrize("family, sent", [
    (b"4", b"192.0.2.300"), (b"4", b""), (b"4", b"2001:db8::1"), (b"6", b"192.0.2.7"), (b"6", b"fe80::1%eth0"),
    (b"6", b""), (b"L", b"/" + b"p" * 107),
])
def test_connect_address_libmilter_cannot_parse_is_refused(family: bytes, sent: bytes) -> None:
    """docs/protocol.md §1.3, §2.1: an address that is no address of its family (or a unix path
    longer than a sockaddr_un holds) ends the session in libmilter; in pytclmilter too."""
    with pytest.raises(RemoteProtocolError, match="connect"):
        decode_command(b"C", b"client.example\0" + family + b"\x00\x19" + sent + b"\0")


def test_optneg_command_layout() -> None:
    event = ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF)
    assert encode_command(event) == b"\x00\x00\x00\x0d" + b"O" + b"\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff"
    assert roundtrip_command(event) == event


def test_macro_layout_is_stage_letter_then_pairs() -> None:
    event = ev.Macro(b"C", {"j": "mx.example", "{daemon_name}": "smtpd"})
    assert encode_command(event) == raw_frame(b"D", b"Cj\0mx.example\0{daemon_name}\0smtpd\0")
    assert roundtrip_command(event) == event
    # Postfix sends a D for every event even with no values: just the stage letter.
    assert decode_command(b"D", b"L") == ev.Macro(b"L", {})


@given(st.binary(max_size=12).map(lambda b: b.replace(b"\1", b"\0")))
def test_macro_packet_has_pairs_exactly_when_a_pair_decodes(raw: bytes) -> None:
    """The store decides from the raw bytes alone whether a D packet replaces its slot (an empty one
    does not): that must be the very answer decoding would give."""
    macros = codec.LazyMacros(raw)
    assert macros.has_pairs == bool(dict(macros))


_WORDS = st.sampled_from([b"", b"a", b"{a}", b"b", b"a\xff", b"\xc3\xa9"])


@given(st.lists(_WORDS, max_size=12), st.lists(_WORDS, max_size=12), st.booleans(),
       st.sampled_from(["a", "{a}", "b", "", "a\udcff", "\xe9", "zz"]))
def test_a_packet_too_big_to_keep_decoded_answers_as_decoding_would(head: list[bytes], tail: list[bytes],
                                                                      closed: bool, name: str) -> None:
    """Past KEPT_PAIRS pairs a lookup searches the bytes (nothing decoded is kept): the first
    pair of the name wins, a name-like value is no name, a last name without a value is none,
    and so is a last value without its NUL."""
    filler = [b"f%d" % i for i in range(2 * codec.KEPT_PAIRS + 4)]
    raw = b"\0".join(head + filler + tail) + (b"\0" if closed else b"")
    parts = raw.split(b"\0")
    parts.pop()  # what follows the last NUL is no string (libmilter's reading)
    expected: dict[str, str] = {}
    for i in range(0, len(parts) - 1, 2):
        expected.setdefault(codec.text(parts[i]), codec.text(parts[i + 1]))
    assert codec.LazyMacros(raw).get(name) == expected.get(name)


def test_envelope_and_header_layouts() -> None:
    assert encode_command(ev.EnvFrom(["<a@b>", "SIZE=10", "BODY=8BITMIME"])) == raw_frame(
        b"M", b"<a@b>\0SIZE=10\0BODY=8BITMIME\0"
    )
    assert encode_command(ev.EnvRcpt(["<>"])) == raw_frame(b"R", b"<>\0")
    assert encode_command(ev.Header("Subject", "hi\n\tthere")) == raw_frame(b"L", b"Subject\0hi\n\tthere\0")
    assert encode_command(ev.Helo("client.example")) == raw_frame(b"H", b"client.example\0")
    assert encode_command(ev.Unknown("XFOO bar")) == raw_frame(b"U", b"XFOO bar\0")


@pytest.mark.parametrize(
    "event, code",
    [(ev.Data(), b"T"), (ev.EndOfHeaders(), b"N"), (ev.Abort(), b"A"), (ev.Quit(), b"Q"),
     (ev.QuitNewConnection(), b"K"), (ev.EndOfMessage(), b"E")],
)
def test_commands_without_payload_have_length_one(event: ev.Event, code: bytes) -> None:
    assert encode_command(event) == b"\x00\x00\x00\x01" + code
    assert roundtrip_command(event) == event


def test_body_is_raw_bytes_and_may_contain_nul() -> None:
    chunk = b"line\0with NUL\r\n\xff\xfe"
    assert encode_command(ev.Body(chunk)) == raw_frame(b"B", chunk)
    assert roundtrip_command(ev.Body(chunk)) == ev.Body(chunk)


def test_eom_with_data_decodes_as_eom_carrying_the_chunk() -> None:
    assert decode_command(b"E", b"last") == ev.EndOfMessage(b"last")
    assert decode_command(b"E", b"") == ev.EndOfMessage()


# ---------------------------------------------------------------- commands: round trips


EXAMPLE_COMMANDS = {
    b"O": ev.OptionNegotiation(2, 0, 0),
    b"D": ev.Macro(b"M", {"i": "4F2A1", "{mail_addr}": "a@b"}),
    b"C": ev.Connect("host", Family.INET6, 587, "::1"),
    b"H": ev.Helo("helo.example"),
    b"M": ev.EnvFrom(["<a@b>", "SIZE=1"]),
    b"R": ev.EnvRcpt(["<c@d>", "NOTIFY=NEVER"]),
    b"T": ev.Data(),
    b"U": ev.Unknown("HELP"),
    b"L": ev.Header("From", "a@b"),
    b"N": ev.EndOfHeaders(),
    b"B": ev.Body(b"hello\r\n"),
    b"E": ev.EndOfMessage(),
    b"A": ev.Abort(),
    b"Q": ev.Quit(),
    b"K": ev.QuitNewConnection(),
}


@pytest.mark.parametrize("code", sorted(EXAMPLE_COMMANDS))
def test_every_command_round_trips(code: bytes) -> None:
    event = EXAMPLE_COMMANDS[code]
    got_code, payload = one_frame(encode_command(event))
    assert got_code == code
    assert decode_command(got_code, payload) == event


def test_example_commands_cover_every_command_letter() -> None:
    assert set(EXAMPLE_COMMANDS) == set(b"ODCHMRTULNBEAQK"[i : i + 1] for i in range(15))


UNEQUAL_TWINS = [
    (ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF), ev.OptionNegotiation(6, 0x1FF, 0x1FFFFE)),
    (ev.Macro(b"M", {"i": "1"}), ev.Macro(b"R", {"i": "1"})),
    (ev.Connect("host", Family.INET, 25, "192.0.2.1"), ev.Connect("host", Family.INET, 26, "192.0.2.1")),
    (ev.Helo("a.example"), ev.Helo("b.example")),
    (ev.EnvFrom(["<a@b>"]), ev.EnvFrom(["<a@b>", "SIZE=1"])),
    (ev.EnvRcpt(["<a@b>"]), ev.EnvRcpt(["<c@d>"])),
    (ev.Unknown("HELP"), ev.Unknown("NOOP")),
    (ev.Header("From", "a@b"), ev.Header("From", "c@d")),
    (ev.Body(b"hello\r\n"), ev.Body(b"hullo\r\n")),
    (ev.EndOfMessage(b"tail"), ev.EndOfMessage()),
]


@pytest.mark.parametrize("one, other", UNEQUAL_TWINS, ids=[type(t[0]).__name__ for t in UNEQUAL_TWINS])
def test_events_differing_in_one_field_are_unequal_and_shown_apart(one: ev.Event, other: ev.Event) -> None:
    """The round trips compare events with ==: were events of a class all equal, they would
    pass whatever the codec decoded, and a failure's repr would not show which field differs."""
    assert one != other and repr(one) != repr(other)
    assert one == decode_command(*one_frame(encode_command(one)))


def test_an_events_repr_names_its_fields() -> None:
    assert repr(ev.Helo("a.example")) == "Helo(name='a.example')"
    assert repr(ev.Header("From", "a@b")) == "Header(name='From', value='a@b')"


@FAST
@given(commands())
def test_any_command_round_trips(event: ev.Event) -> None:
    assert roundtrip_command(event) == event


# ---------------------------------------------------------------- commands: refused input


@pytest.mark.parametrize("code", [b"C", b"H", b"L", b"M", b"R", b"B", b"D", b"O", b"U"])
def test_commands_that_need_a_payload_refuse_an_empty_one(code: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_command(code, b"")


@pytest.mark.parametrize(
    "code, payload",
    [
        (b"O", b"\x00" * 11),  # OPTNEG shorter than 12 bytes
        (b"C", b"hostonly\0"),  # no family byte
        (b"C", b"host"),  # host name not terminated
        (b"C", b"host\0X\x00\x19addr\0"),  # unknown family
        (b"C", b"host\x004\x00\x19"),  # no address
        (b"C", b"host\x004\x00\x19addr"),  # address not NUL-terminated
        (b"C", b"host\x004\x00\x19a\0b\0"),  # two addresses
        (b"H", b"helo"),  # HELO without trailing NUL
        (b"H", b"a\0b\0"),
        (b"M", b"<a@b>"),  # list not NUL-terminated
        (b"R", b"<a@b>\0SIZE"),
        (b"L", b"Subject\0"),  # one string only
        (b"L", b"Subject\0v\0extra\0"),  # three strings
        (b"L", b"\0value\0"),  # empty header name
        (b"U", b"HELP"),
    ],
)
def test_malformed_payloads_are_remote_protocol_errors(code: bytes, payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_command(code, payload)


@pytest.mark.parametrize("payload, shown", [(b"host\0X\x00\x19addr\0", "'X'"), (b"host\0\x07", "'\\x07'")])
def test_an_unknown_address_family_is_named_escaped_in_the_error(payload: bytes, shown: str) -> None:
    """The WARNING line that closes the connection says which family byte the MTA sent."""
    with pytest.raises(RemoteProtocolError) as refused:
        decode_command(b"C", payload)
    assert str(refused.value) == f"connect: unknown address family {shown}"


@pytest.mark.parametrize("code", [b"\x00", b"\x1f", b"Z", b"c", b"a", b"P", b"\xff", b"4"])
def test_unknown_command_letters_are_refused(code: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_command(code, b"")
    reader = FrameReader(table.COMMAND_CODES, MAX_DATA_SIZE)
    reader.feed(raw_frame(code, b"xyz\0"))
    with pytest.raises(RemoteProtocolError):
        reader.next_frame()


def test_unknown_command_is_refused_by_the_session_from_its_header() -> None:
    s = FilterSession()
    s.receive_data(b"\x00\x00\x00\x10Z")  # header only: 15 payload bytes announced, none sent
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_zero_length_packet_is_refused() -> None:
    reader = FrameReader(table.COMMAND_CODES, MAX_DATA_SIZE)
    reader.feed(b"\x00\x00\x00\x00Q")
    with pytest.raises(RemoteProtocolError):
        reader.next_frame()
    s = FilterSession()
    s.receive_data(b"\x00\x00\x00\x00O")
    with pytest.raises(RemoteProtocolError):
        s.next_event()


# ---------------------------------------------------------------- framing limits


def _session_in_body() -> FilterSession:
    """A negotiated session whose next command may be a body chunk."""
    s = FilterSession()
    s.receive_data(encode_command(ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF)))
    s.accept_negotiation(negotiate(s.next_event(), Wants()))
    for cmd in (ev.Connect("h", Family.INET, 25, "192.0.2.1"), ev.EnvFrom(["<a@b>"]), ev.EnvRcpt(["<c@d>"]),
                ev.EndOfHeaders()):
        s.receive_data(encode_command(cmd))
        assert s.next_event() == cmd
        assert s.send(ev.Continue()) == raw_frame(b"c")
    return s


def test_full_body_chunk_arrives_with_length_65536_and_is_accepted() -> None:
    chunk = bytes(range(256)) * 255 + b"x" * 255
    assert len(chunk) == CHUNK_SIZE == 65535
    data = encode_command(ev.Body(chunk))
    assert data[:4] == b"\x00\x01\x00\x00"  # 65536 = command byte + 65535
    reader = FrameReader(table.COMMAND_CODES, MAX_DATA_SIZE)
    reader.feed(data)
    assert reader.next_frame() == (b"B", chunk)
    s = _session_in_body()
    s.receive_data(data)
    assert s.next_event() == ev.Body(chunk)


def test_payload_of_65536_is_refused_before_it_is_buffered() -> None:
    header = b"\x00\x01\x00\x01B"  # length 65537: payload 65536
    reader = FrameReader(table.COMMAND_CODES, MAX_DATA_SIZE)
    reader.feed(header)
    with pytest.raises(RemoteProtocolError):
        reader.next_frame()
    assert reader.pending == 5  # nothing of the payload was needed to refuse it
    s = _session_in_body()
    s.receive_data(header)  # the session refuses it from the five header bytes alone
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_oversize_length_is_refused_even_when_huge() -> None:
    reader = FrameReader(table.COMMAND_CODES, MAX_DATA_SIZE)
    reader.feed(b"\xff\xff\xff\xffL")
    with pytest.raises(RemoteProtocolError):
        reader.next_frame()


def test_partial_frames_wait_for_more_data() -> None:
    data = encode_command(ev.Helo("x.example"))
    reader = FrameReader(table.COMMAND_CODES, MAX_DATA_SIZE)
    for i in range(len(data) - 1):
        reader.feed(data[i : i + 1])
        assert reader.next_frame() is None
    reader.feed(data[-1:])
    assert reader.next_frame() == (b"H", b"x.example\0")
    assert reader.pending == 0
    assert reader.next_frame() is None


@FAST
@given(st.lists(commands(), max_size=8), st.data())
def test_frame_reader_splits_any_stream_at_any_point(events: list[ev.Event], data: st.DataObject) -> None:
    stream = b"".join(encode_command(e) for e in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader(table.COMMAND_CODES, MAX_DATA_SIZE)
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(stream[prev:cut])
        prev = cut
        while (item := reader.next_frame()) is not None:
            got.append(decode_command(*item))
    assert got == events
    assert reader.pending == 0


# ---------------------------------------------------------------- replies: exact layouts


@pytest.mark.parametrize(
    "reply, code",
    [(ev.Continue(), b"c"), (ev.Accept(), b"a"), (ev.Reject(), b"r"), (ev.Tempfail(), b"t"),
     (ev.Discard(), b"d"), (ev.Skip(), b"s"), (ev.Progress(), b"p"), (ev.Shutdown(), b"4"),
     (ev.ConnFail(), b"f")],
)
def test_empty_replies_have_no_payload(reply: ev.Reply, code: bytes) -> None:
    assert encode_reply(reply) == b"\x00\x00\x00\x01" + code
    assert decode_reply(code, b"") == reply
    # Postfix errors on stray payload after a no-data reply; so does the MTA-side decoder.
    with pytest.raises(RemoteProtocolError):
        decode_reply(code, b"\0")


@pytest.mark.parametrize(
    "reply, expected",
    [
        (ev.ReplyCode("550 5.7.1 no"), raw_frame(b"y", b"550 5.7.1 no\0")),
        (ev.Quarantine("spam"), raw_frame(b"q", b"spam\0")),
        (ev.AddHeader("X-A", "1"), raw_frame(b"h", b"X-A\x001\0")),
        (ev.InsertHeader(3, "X-A", "1"), raw_frame(b"i", b"\x00\x00\x00\x03X-A\x001\0")),
        (ev.ChangeHeader(1, "Subject", ""), raw_frame(b"m", b"\x00\x00\x00\x01Subject\0\0")),
        (ev.AddRecipient("<x@y>"), raw_frame(b"+", b"<x@y>\0")),
        (ev.AddRecipient("<x@y>", "NOTIFY=NEVER ORCPT=rfc822;x@y"),
         raw_frame(b"2", b"<x@y>\0NOTIFY=NEVER ORCPT=rfc822;x@y\0")),
        (ev.DeleteRecipient("<x@y>"), raw_frame(b"-", b"<x@y>\0")),
        (ev.ChangeFrom("<s@t>"), raw_frame(b"e", b"<s@t>\0")),  # no args: only the address string
        (ev.ChangeFrom("<s@t>", "RET=HDRS"), raw_frame(b"e", b"<s@t>\0RET=HDRS\0")),
        (ev.ReplaceBody(b"new\r\n"), raw_frame(b"b", b"new\r\n")),
    ],
)
def test_reply_layouts_match_reference(reply: ev.Reply, expected: bytes) -> None:
    assert encode_reply(reply) == expected
    assert roundtrip_reply(reply) == [reply]


def test_optneg_reply_without_macro_lists_is_twelve_bytes() -> None:
    reply = ev.OptionNegotiationReply(6, 0x11, 0x300)
    assert encode_reply(reply) == b"\x00\x00\x00\x0dO" + struct.pack("!III", 6, 0x11, 0x300)
    assert roundtrip_reply(reply) == [reply]


def test_optneg_reply_with_macro_lists_appends_stage_records() -> None:
    reply = ev.OptionNegotiationReply(
        6, 0x1FF, 0, {MacroStage.EOM: "i {msg_id}", MacroStage.CONNECT: "j {daemon_name}", MacroStage.EOH: ""}
    )
    payload = (
        struct.pack("!III", 6, 0x1FF, 0)
        + struct.pack("!I", 0) + b"j {daemon_name}\0"
        + struct.pack("!I", 5) + b"i {msg_id}\0"
        + struct.pack("!I", 6) + b"\0"  # "" means "send none"
    )
    assert encode_reply(reply) == raw_frame(b"O", payload)
    assert roundtrip_reply(reply) == [reply]


def test_optneg_reply_decoder_refuses_garbled_macro_records() -> None:
    base = struct.pack("!III", 6, 0, 0)
    for bad in (base[:11], base + b"\x00\x00\x00", base + struct.pack("!I", 1) + b"j",
                base + struct.pack("!I", 9) + b"j\0"):
        with pytest.raises(RemoteProtocolError):
            decode_reply(b"O", bad)


EXAMPLE_REPLIES = {
    b"+": ev.AddRecipient("<r@x>"),
    b"-": ev.DeleteRecipient("<r@x>"),
    b"2": ev.AddRecipient("<r@x>", "NOTIFY=SUCCESS"),
    b"4": ev.Shutdown(),
    b"a": ev.Accept(),
    b"b": ev.ReplaceBody(b"body\r\n"),
    b"c": ev.Continue(),
    b"d": ev.Discard(),
    b"e": ev.ChangeFrom("<s@x>", "ENVID=1"),
    b"f": ev.ConnFail(),
    b"h": ev.AddHeader("X-Spam", "yes"),
    b"i": ev.InsertHeader(0, "X-First", "1"),
    b"m": ev.ChangeHeader(2, "Received", ""),
    b"p": ev.Progress(),
    b"q": ev.Quarantine("held"),
    b"r": ev.Reject(),
    b"s": ev.Skip(),
    b"t": ev.Tempfail(),
    b"y": ev.ReplyCode("451 4.7.1 later"),
    b"O": ev.OptionNegotiationReply(6, 0x1FF, 0x400, {MacroStage.ENVRCPT: "{rcpt_addr}"}),
}


@pytest.mark.parametrize("code", sorted(EXAMPLE_REPLIES))
def test_every_reply_round_trips(code: bytes) -> None:
    reply = EXAMPLE_REPLIES[code]
    got_code, payload = one_frame(encode_reply(reply))
    assert got_code == code
    assert decode_reply(got_code, payload) == reply


def test_setsymlist_is_never_a_packet() -> None:
    # `l` exists only as the SETSYMLIST action bit; macro lists ride in the OPTNEG reply.
    with pytest.raises(RemoteProtocolError):
        decode_reply(b"l", b"")
    with pytest.raises(LocalProtocolError):
        encode_reply(ev.NoReply())


@FAST
@given(replies())
def test_any_reply_round_trips(reply: ev.Reply) -> None:
    assert roundtrip_reply(reply) == [reply]


def test_nul_inside_a_reply_string_is_a_local_error() -> None:
    for reply in (ev.ReplyCode("550 a\0b"), ev.AddHeader("X\0", "v"), ev.AddHeader("X", "v\0"),
                  ev.AddRecipient("<a>", "X=\0"), ev.ChangeFrom("<a\0>"), ev.Quarantine("\0"),
                  ev.OptionNegotiationReply(6, 0, 0, {MacroStage.HELO: "a\0b"})):
        with pytest.raises(LocalProtocolError):
            encode_reply(reply)


def test_unknown_reply_codes_are_refused_by_the_mta_side_decoder() -> None:
    for code in (b"x", b"C", b"\0", b"l"):
        with pytest.raises(RemoteProtocolError):
            decode_reply(code, b"")


# ---------------------------------------------------------------- ReplaceBody chunking


def test_replace_body_of_exactly_one_chunk_is_one_packet() -> None:
    data = b"a" * CHUNK_SIZE
    frames = parse_frames(encode_reply(ev.ReplaceBody(data)))
    assert frames == [(b"b", data)]


def test_replace_body_over_65535_bytes_is_split_into_chunks() -> None:
    data = bytes(i % 251 for i in range(2 * CHUNK_SIZE + 10))
    frames = parse_frames(encode_reply(ev.ReplaceBody(data)))
    assert [code for code, _ in frames] == [b"b", b"b", b"b"]
    assert [len(p) for _, p in frames] == [CHUNK_SIZE, CHUNK_SIZE, 10]
    assert b"".join(p for _, p in frames) == data


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE, 3 * CHUNK_SIZE - 1]),
       st.binary(min_size=1, max_size=8))
def test_replace_body_chunks_are_full_except_the_last(size: int, fill: bytes) -> None:
    data = (fill * (size // len(fill) + 1))[:size]
    frames = parse_frames(encode_reply(ev.ReplaceBody(data)))
    assert all(code == b"b" for code, _ in frames)
    sizes = [len(p) for _, p in frames]
    assert all(n == CHUNK_SIZE for n in sizes[:-1]) and 0 < sizes[-1] <= CHUNK_SIZE
    assert len(frames) == -(-size // CHUNK_SIZE)
    assert b"".join(p for _, p in frames) == data


def test_empty_replacement_body_is_one_zero_length_packet() -> None:
    assert encode_reply(ev.ReplaceBody(b"")) == b"\x00\x00\x00\x01b"
    assert roundtrip_reply(ev.ReplaceBody(b"")) == [ev.ReplaceBody(b"")]


# ---------------------------------------------------------------- the text rule


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_survive_text_then_wire(raw: bytes) -> None:
    as_text = text(raw)
    assert isinstance(as_text, str)
    assert wire(as_text) == raw


@FAST
@given(st.binary(max_size=200), st.data())
def test_bytes_split_anywhere_survive_text_then_wire(raw: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    assert b"".join(pieces) == raw
    assert wire("".join(text(p) for p in pieces)) == raw
    assert b"".join(wire(text(p)) for p in pieces) == raw


@FAST
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=50))
def test_wire_never_raises_and_keeps_ordinary_text(value: str) -> None:
    out = wire(value)
    assert isinstance(out, bytes)
    if not any("\ud800" <= c <= "\udfff" for c in value):
        assert out == value.encode("utf-8")
        assert text(out) == value


def test_lone_surrogates_not_from_text_become_replacement_characters() -> None:
    assert wire("a\ud800b") == "a\ufffdb".encode()
    assert wire("\udc80\ud800") == b"\x80" + "\ufffd".encode()  # an escaped byte stays a byte


def test_non_utf8_header_bytes_travel_unchanged_through_the_codec() -> None:
    payload = b"Subject\0caf\xe9 \xff\xfe =?x?=\0"
    header = decode_command(b"L", payload)
    assert isinstance(header, ev.Header)
    assert encode_command(header) == raw_frame(b"L", payload)
    # ... and a filter that echoes the value back sends the very same bytes.
    assert encode_reply(ev.AddHeader("X-Copy", header.value)) == raw_frame(b"h", b"X-Copy\0caf\xe9 \xff\xfe =?x?=\0")


def test_session_reads_a_frame_split_into_single_bytes() -> None:
    s = FilterSession()
    data = encode_command(ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF))
    for i in range(len(data) - 1):
        s.receive_data(data[i : i + 1])
        assert s.next_event() is NEED_DATA
    s.receive_data(data[-1:])
    assert s.next_event() == ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF)


def test_action_flags_of_the_reference() -> None:
    assert [int(a) for a in (Action.ADDHDRS, Action.CHGBODY, Action.ADDRCPT, Action.DELRCPT, Action.CHGHDRS,
                             Action.QUARANTINE, Action.CHGFROM, Action.ADDRCPT_PAR, Action.SETSYMLIST)] == [
        0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100]
