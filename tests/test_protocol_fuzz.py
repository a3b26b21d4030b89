"""Property tests of the protocol core: garbage in never means anything but ProtocolError out.

* Arbitrary bytes (pure noise, valid frames, well-framed garbage payloads,
  lying length fields), split at arbitrary points and fed to a FilterSession
  that answers every event with a legal reply, only ever raise
  RemoteProtocolError, and the session can always be torn down afterwards.
* A valid Postfix-like command stream yields the same events and the same
  reply bytes whatever the split points.
* Memory stays bounded: the frame reader refuses an oversize frame from its
  five header bytes and never holds more than one maximum frame it waits for.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings, strategies as st

from pytclmilter.protocol import (
    Action,
    FilterSession,
    FrameReader,
    LocalProtocolError,
    NEED_DATA,
    Proto,
    ProtocolError,
    RemoteProtocolError,
    Wants,
    decode_reply,
    encode_command,
    negotiate,
    table,
    text,
)
from pytclmilter.protocol import events as ev
from pytclmilter.protocol.constants import Family
from pytclmilter.protocol.negotiation import EVENT_FLAGS

FUZZ = settings(max_examples=200, deadline=None)

# ---------------------------------------------------------------- helpers


def raw_frame(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload) + 1) + code + payload


def parse_replies(data: bytes) -> list[ev.Reply]:
    out, i = [], 0
    while i < len(data):
        (length,) = struct.unpack_from("!I", data, i)
        out.append(decode_reply(data[i + 4 : i + 5], data[i + 5 : i + 4 + length]))
        i += 4 + length
    assert i == len(data)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]


wire_text = st.binary(max_size=12).map(lambda b: text(b.replace(b"\0", b"")))
nonempty_text = st.binary(min_size=1, max_size=12).map(lambda b: text(b.replace(b"\0", b"_")))


def valid_commands() -> st.SearchStrategy[ev.Event]:
    return st.one_of(
        st.builds(ev.OptionNegotiation, st.integers(0, 8), st.integers(0, 0x3FF), st.integers(0, 2**32 - 1)),
        st.builds(ev.Macro, st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E", b"U", b"Z"]),
                  st.dictionaries(nonempty_text, wire_text, max_size=3)),
        # (addresses as libc prints them: the decoder parses and prints them so, docs/protocol.md §2.1)
        st.builds(ev.Connect, wire_text, st.just(Family.INET), st.integers(0, 65535), st.ip_addresses(v=4).map(str)),
        st.builds(ev.Connect, wire_text, st.just(Family.INET6), st.integers(0, 65535),
                  st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed))),
        st.builds(ev.Connect, wire_text, st.just(Family.UNIX), st.integers(0, 65535), wire_text),
        st.builds(ev.Connect, wire_text, st.just(Family.UNKNOWN)),
        st.builds(ev.Helo, wire_text),
        st.builds(ev.EnvFrom, st.lists(wire_text, min_size=1, max_size=3)),
        st.builds(ev.EnvRcpt, st.lists(wire_text, min_size=1, max_size=3)),
        st.builds(ev.Header, nonempty_text, wire_text),
        st.builds(ev.Body, st.binary(min_size=1, max_size=30)),
        st.builds(ev.EndOfMessage, st.binary(max_size=5)),
        st.builds(ev.Unknown, wire_text),
        *(st.builds(t) for t in (ev.Data, ev.EndOfHeaders, ev.Abort, ev.Quit, ev.QuitNewConnection)),
    )


CODES = [bytes([c]) for c in b"ABCDEHKLMNOQRTU"]


def chunks() -> st.SearchStrategy[bytes]:
    """Pieces of an input stream: valid frames, well-framed junk, lying headers and raw noise."""
    return st.one_of(
        valid_commands().map(encode_command),
        st.builds(raw_frame, st.sampled_from(CODES), st.binary(max_size=40)),
        st.builds(lambda n, c: struct.pack("!I", n) + c, st.one_of(st.integers(0, 70), st.sampled_from(
            [65536, 65537, 2**31, 2**32 - 1])), st.sampled_from(CODES + [b"\0", b"z", b"c"])),
        st.binary(max_size=20),
    )


OPTNEG = encode_command(ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF))

wants_strategy = st.builds(
    Wants,
    events=st.frozensets(st.sampled_from(sorted(EVENT_FLAGS))),
    no_reply=st.frozensets(st.sampled_from(sorted(EVENT_FLAGS))),
    actions=st.integers(0, 0x1FF).map(Action),
)

MODIFICATIONS: list[tuple[ev.Reply, Action]] = [
    (ev.AddHeader("X-Fuzz", "1"), Action.ADDHDRS),
    (ev.InsertHeader(0, "X-Top", "1"), Action.ADDHDRS),
    (ev.ChangeHeader(2**32 - 1, "Subject", ""), Action.CHGHDRS),
    (ev.AddRecipient("<n@x>"), Action.ADDRCPT),
    (ev.AddRecipient("<n@x>", "NOTIFY=NEVER"), Action.ADDRCPT_PAR),
    (ev.DeleteRecipient("<o@x>"), Action.DELRCPT),
    (ev.ChangeFrom("<s@x>", None), Action.CHGFROM),
    (ev.ReplaceBody(b""), Action.CHGBODY),
    (ev.ReplaceBody(b"x" * 70000), Action.CHGBODY),
    (ev.Quarantine("fuzz"), Action.QUARANTINE),
]


def legal_answers(s: FilterSession, event: ev.Event, data: st.DataObject) -> list[ev.Reply]:
    """A reply docs/protocol.md §3 allows for this event, chosen by hypothesis."""
    t = type(event)
    finals: list[ev.Reply] = [ev.Continue(), ev.Accept(), ev.Reject(), ev.Tempfail(), ev.ReplyCode("550 5.7.1 no")]
    if t not in (ev.Connect, ev.Helo):
        finals.append(ev.Discard())
    if t is ev.Body and s.negotiated.protocol & Proto.SKIP:
        finals.append(ev.Skip())
    out: list[ev.Reply] = []
    if data.draw(st.booleans(), label="progress"):
        out.append(ev.Progress())
    if t is ev.EndOfMessage:
        allowed = [m for m, flag in MODIFICATIONS if s.negotiated.actions & flag]
        if allowed:
            out += data.draw(st.lists(st.sampled_from(allowed), max_size=3), label="mods")
    out.append(data.draw(st.sampled_from(finals), label="final"))
    return out


def drive(s: FilterSession, pieces: list[bytes], data: st.DataObject, wants: Wants | None) -> tuple[list[ev.Event], bytes, bool]:
    """Feed pieces then EOF, answering everything legally. Returns (events, output, failed)."""
    events: list[ev.Event] = []
    out = b""
    for piece in [*pieces, b""]:
        s.receive_data(piece)
        while True:
            try:
                event = s.next_event()
            except RemoteProtocolError:
                return events, out, True
            if event is NEED_DATA:
                break
            events.append(event)
            assert event.needs_reply == (s.pending is event)
            if not event.needs_reply:
                assert s.send(ev.NoReply()) == b""
                continue
            if type(event) is ev.OptionNegotiation:
                try:
                    n = negotiate(event, wants or Wants())
                except RemoteProtocolError:
                    events += s.fail_negotiation()
                    return events, out, True
                out += s.accept_negotiation(n)
                continue
            for reply in legal_answers(s, event, data):
                out += s.send(reply)
            assert s.pending is None
    return events, out, False


# ---------------------------------------------------------------- arbitrary input


soups = st.builds(lambda first, pieces: (OPTNEG if first else b"") + b"".join(pieces),
                  st.booleans(), st.lists(chunks(), max_size=12))


@FUZZ
@given(st.one_of(soups, st.deferred(lambda: mutated_streams())), st.lists(st.integers(0, 1500), max_size=12),
       st.one_of(st.none(), wants_strategy), st.data())
def test_arbitrary_input_only_raises_protocol_errors(stream: bytes, cuts: list[int], wants: Wants | None,
                                                     data: st.DataObject) -> None:
    s = FilterSession()
    try:
        events, out, failed = drive(s, split(stream, cuts), data, wants)
    except ProtocolError as exc:  # pragma: no cover - shown in the failure message
        raise AssertionError(f"a legal answer was refused or a non-remote error escaped: {exc!r}") from exc
    parse_replies(out)  # whatever went out is well-formed for an MTA
    # However it ended, tearing the session down works and gives at most one more Closed.
    closing = s.teardown("protocol error" if failed else "eof")
    assert all(type(e) in (ev.Abort, ev.Closed) for e in closing)
    assert [type(e) for e in closing].count(ev.Closed) <= 1
    if not failed:  # the EOF was read: the session already said Closed, teardown adds nothing
        assert ev.Closed in [type(e) for e in events] and closing == []
    assert s.teardown("again") == []


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20))
def test_pure_noise_after_negotiation_only_raises_remote_errors(noise: bytes, cuts: list[int]) -> None:
    s = FilterSession()
    s.receive_data(OPTNEG)
    s.accept_negotiation(negotiate(s.next_event(), Wants()))
    try:
        for piece in [*split(noise, cuts), b""]:
            s.receive_data(piece)
            while (event := s.next_event()) is not NEED_DATA:
                if event.needs_reply:
                    s.send(ev.Continue())
    except RemoteProtocolError:
        pass
    s.teardown("protocol error")


@FUZZ
@given(st.sampled_from(CODES), st.binary(max_size=80))
def test_any_payload_for_any_command_decodes_or_raises_remote_error(code: bytes, payload: bytes) -> None:
    try:
        event = table.decode_command(code, payload)
    except RemoteProtocolError:
        return
    assert isinstance(event, ev.Event)


@FUZZ
@given(st.sampled_from([bytes([c]) for c in b"+-24abcdefhilmpqrsty"] + [b"O", b"x"]), st.binary(max_size=60))
def test_mta_side_reply_decoder_only_raises_remote_errors(code: bytes, payload: bytes) -> None:
    try:
        reply = decode_reply(code, payload)
    except RemoteProtocolError:
        return
    assert isinstance(reply, ev.Reply)


# ---------------------------------------------------------------- valid streams, any split


@st.composite
def postfix_streams(draw: st.DrawFn) -> tuple[list[ev.Event], list[ev.Event]]:
    """A valid connection as Postfix sends it, and the events the filter must see."""
    sent: list[ev.Event] = []
    seen: list[ev.Event] = []

    def both(*events: ev.Event) -> None:
        sent.extend(events)
        seen.extend(events)

    both(ev.Macro(b"C", draw(st.dictionaries(nonempty_text, wire_text, max_size=2))),
         ev.Connect(draw(wire_text), Family.INET, draw(st.integers(0, 65535)), "192.0.2.1"))
    if draw(st.booleans()):
        both(ev.Macro(b"H", {}), ev.Helo(draw(wire_text)))
    for _ in range(draw(st.integers(0, 3))):
        both(ev.Macro(b"M", {}), ev.EnvFrom([draw(wire_text)]))
        for _ in range(draw(st.integers(1, 3))):
            both(ev.Macro(b"R", {"{rcpt_addr}": draw(wire_text)}), ev.EnvRcpt([draw(wire_text)]))
        if draw(st.booleans()):
            both(ev.Unknown(draw(wire_text)))
            both(ev.EnvRcpt([draw(wire_text)]))
        both(ev.Macro(b"T", {}), ev.Data())
        for _ in range(draw(st.integers(0, 3))):
            both(ev.Macro(b"L", {"i": "Q"}), ev.Header(draw(nonempty_text), draw(wire_text)))
        both(ev.Macro(b"N", {}), ev.EndOfHeaders())
        for _ in range(draw(st.integers(0, 3))):
            both(ev.Macro(b"B", {}), ev.Body(draw(st.binary(min_size=1, max_size=40))))
        both(ev.Macro(b"E", {}), ev.EndOfMessage())
        sent.append(ev.Abort())  # Postfix's ABORT after every message: dropped silently
    if draw(st.booleans()):
        sent.append(ev.Quit())
        seen.append(ev.Closed("quit"))
    else:
        seen.append(ev.Closed("eof"))
    return sent, seen


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A valid Postfix stream (after OPTNEG) with commands dropped, repeated, swapped or junk inserted,
    and a few bytes overwritten: deep into a session before it goes wrong."""
    sent, _ = draw(postfix_streams())
    frames = [encode_command(e) for e in sent]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "repeat", "swap", "insert"]))
        i = draw(st.integers(0, len(frames) - 1))
        if op == "drop":
            del frames[i]
        elif op == "repeat":
            frames.insert(i, frames[i])
        elif op == "swap" and i + 1 < len(frames):
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
        else:
            frames.insert(i, draw(chunks()))
        if not frames:
            break
    data = bytearray(OPTNEG + b"".join(frames))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(len(OPTNEG), len(data) - 1)) if len(data) > len(OPTNEG) else None
        if i is not None:
            data[i] = draw(st.integers(0, 255))
    return bytes(data)


def _answer_all(s: FilterSession, data: bytes, cuts: list[int]) -> tuple[list[ev.Event], bytes]:
    events: list[ev.Event] = []
    out = b""
    for piece in [*split(data, cuts), b""]:
        s.receive_data(piece)
        while (event := s.next_event()) is not NEED_DATA:
            events.append(event)
            if event.needs_reply:
                if type(event) is ev.EndOfMessage:
                    out += s.send(ev.AddHeader("X-Seen", str(len(events))))
                out += s.send(ev.Continue())
    return events, out


@settings(max_examples=60, deadline=None)
@given(postfix_streams(), st.lists(st.integers(0, 2000), max_size=25))
def test_valid_stream_gives_the_same_events_whatever_the_split(stream: tuple[list[ev.Event], list[ev.Event]],
                                                               cuts: list[int]) -> None:
    sent, expected = stream
    data = b"".join(encode_command(e) for e in sent)

    def fresh() -> FilterSession:
        s = FilterSession()
        s.receive_data(OPTNEG)
        s.accept_negotiation(negotiate(s.next_event(), Wants()))
        return s

    whole_events, whole_out = _answer_all(fresh(), data, [])
    split_events, split_out = _answer_all(fresh(), data, cuts)
    bytewise_events, bytewise_out = _answer_all(fresh(), data, list(range(0, len(data), 7)))
    assert whole_events == expected
    assert split_events == bytewise_events == whole_events
    assert [e.needs_reply for e in split_events] == [e.needs_reply for e in whole_events]
    assert split_out == bytewise_out == whole_out
    # One reply per event that waits for one, plus the header added at each end of message.
    assert len(parse_replies(whole_out)) == sum(e.needs_reply for e in whole_events) + sum(
        type(e) is ev.EndOfMessage for e in whole_events)
    assert all(e.needs_reply for e in whole_events if type(e) not in (ev.Macro, ev.Closed))


@FUZZ
@given(st.lists(valid_commands(), max_size=10), st.lists(st.integers(0, 500), max_size=15))
def test_frames_decode_the_same_whatever_the_split(commands: list[ev.Event], cuts: list[int]) -> None:
    data = b"".join(encode_command(e) for e in commands)
    results = []
    for c in ([], cuts, list(range(len(data)))):
        reader = FrameReader(table.COMMAND_CODES, 65535)
        got = []
        for piece in split(data, c):
            reader.feed(piece)
            while (item := reader.next_frame()) is not None:
                got.append(table.decode_command(*item))
        assert reader.pending == 0
        results.append(got)
    assert results[0] == results[1] == results[2] == commands


# ---------------------------------------------------------------- bounded memory


@FUZZ
@given(st.integers(1, 64), st.lists(st.one_of(
    st.builds(lambda n, c, body: struct.pack("!I", n) + c + body, st.integers(0, 140), st.sampled_from(CODES),
              st.binary(max_size=140)),
    st.binary(max_size=30)), max_size=10), st.lists(st.integers(0, 1500), max_size=20))
def test_reader_never_holds_more_than_one_allowed_frame(max_payload: int, pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    reader = FrameReader(table.COMMAND_CODES, max_payload)
    for piece in split(stream, cuts):
        reader.feed(piece)
        try:
            while (item := reader.next_frame()) is not None:
                assert len(item[1]) <= max_payload
        except RemoteProtocolError:
            # Refused without waiting for its payload: of the refused frame, at most a partial
            # header was buffered before this piece arrived.
            assert reader.pending < len(piece) + 5
            return
        # Waiting for a frame: it is one that fits (header + at most max_payload).
        assert reader.pending < 5 + max_payload


@settings(max_examples=50, deadline=None)
@given(st.integers(65536, 2**32 - 2), st.sampled_from([b"B", b"L", b"M", b"C"]))
def test_session_refuses_an_oversize_frame_as_soon_as_its_header_is_in(length: int, code: bytes) -> None:
    s = FilterSession()
    s.receive_data(OPTNEG)
    s.accept_negotiation(negotiate(s.next_event(), Wants()))
    header = struct.pack("!I", length + 1) + code
    for i in range(3):
        s.receive_data(header[i : i + 1])
        assert s.next_event() is NEED_DATA
    s.receive_data(header[3:4])  # the length is whole, gathered from four reads: its code is not waited for
    try:
        s.next_event()
    except RemoteProtocolError:
        return
    raise AssertionError("an oversize frame was not refused from its header")


def test_local_protocol_error_is_a_protocol_error() -> None:
    assert issubclass(LocalProtocolError, ProtocolError) and issubclass(RemoteProtocolError, ProtocolError)
