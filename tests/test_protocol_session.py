"""The filter-side state machine, driven the way an MTA drives it.

Reference: docs/protocol.md §4.4 (negotiation), §5.3 (macros),
§7 (state table, out-of-order commands, per-reply state changes, ABORT/QUIT/
QUIT_NC) and §3/§6.1 (which reply is legal when). Every test feeds MTA bytes and
checks what a user of the core sees: events from ``next_event``, bytes from
``send``, and the errors raised.
"""

from __future__ import annotations

import itertools
import struct
from typing import Callable, Iterable

import pytest
from hypothesis import given, settings, strategies as st

from pytclmilter.protocol import (
    Action,
    FilterSession,
    LocalProtocolError,
    MacroStage,
    MacroStore,
    NEED_DATA,
    Proto,
    RemoteProtocolError,
    State,
    Wants,
    decode_reply,
    encode_command,
    negotiate,
)
from pytclmilter.protocol import events as ev
from pytclmilter.protocol.constants import MDS_256K, Family
from pytclmilter.protocol.negotiation import EVENT_FLAGS

# ---------------------------------------------------------------- helpers

POSTFIX_OFFER = ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF)
ALL_EVENTS = frozenset(EVENT_FLAGS)

CONNECT = ev.Connect("client.example", Family.INET, 40000, "192.0.2.7")
HELO = ev.Helo("client.example")
MAIL = ev.EnvFrom(["<a@example.org>", "SIZE=100"])
RCPT = ev.EnvRcpt(["<b@example.com>"])
RCPT2 = ev.EnvRcpt(["<c@example.com>"])
DATA = ev.Data()
HEADER = ev.Header("Subject", "hello")
EOH = ev.EndOfHeaders()
BODY = ev.Body(b"hello\r\n")
EOM = ev.EndOfMessage()


def parse_frames(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 0
    while i < len(data):
        (length,) = struct.unpack_from("!I", data, i)
        out.append((data[i + 4 : i + 5], data[i + 5 : i + 4 + length]))
        i += 4 + length
    assert i == len(data)
    return out


def replies(data: bytes) -> list[ev.Reply]:
    """What an MTA reads from the bytes the session produced."""
    return [decode_reply(code, payload) for code, payload in parse_frames(data)]


def cmds(*events: ev.Event) -> bytes:
    return b"".join(encode_command(e) for e in events)


def start(wants: Wants | None = None, offer: ev.OptionNegotiation = POSTFIX_OFFER, **kw: int) -> FilterSession:
    """A session that has answered the MTA's option negotiation."""
    s = FilterSession(**kw)
    s.receive_data(encode_command(offer))
    event = s.next_event()
    assert event == offer and event.needs_reply and s.pending is event
    out = s.accept_negotiation(negotiate(offer, wants or Wants()))
    assert [type(r) for r in replies(out)] == [ev.OptionNegotiationReply]
    assert s.pending is None
    return s


Answer = Callable[[ev.Event], "ev.Reply | list[ev.Reply]"]


def run(s: FilterSession, data: bytes = b"", answer: Answer = lambda e: ev.Continue(),
        limit: int = 1000) -> tuple[list[ev.Event], bytes]:
    """Feed bytes, then take events until NEED_DATA, answering those that wait for a reply."""
    if data:
        s.receive_data(data)
    events: list[ev.Event] = []
    out = b""
    for _ in range(limit):
        event = s.next_event()
        if event is NEED_DATA:
            return events, out
        events.append(event)
        assert (s.pending is event) == event.needs_reply, event
        if event.needs_reply:
            answers = answer(event)
            for reply in answers if isinstance(answers, list) else [answers]:
                out += s.send(reply)
            assert s.pending is None
    raise AssertionError("the session never asked for more data")


def step(s: FilterSession, event: ev.Event, reply: ev.Reply = ev.Continue()) -> bytes:
    """Feed one command that needs a reply, check it comes out alone, answer it."""
    s.receive_data(encode_command(event))
    got = s.next_event()
    assert got == event and got.needs_reply and s.pending is got
    return s.send(reply)


def types(events: Iterable[object]) -> list[type]:
    return [type(e) for e in events]


def drain_after_close(s: FilterSession) -> list[ev.Event]:
    """Whatever the session still hands out once it said Closed (should be nothing)."""
    out: list[ev.Event] = []
    for _ in range(10):
        event = s.next_event()
        if event is NEED_DATA:
            break
        out.append(event)
        if event.needs_reply:
            s.send(ev.Continue())
    return out


def in_message(wants: Wants | None = None, offer: ev.OptionNegotiation = POSTFIX_OFFER) -> FilterSession:
    """Negotiated, connected, HELO, MAIL and one RCPT answered with Continue."""
    s = start(wants, offer)
    for e in (CONNECT, HELO, MAIL, RCPT):
        assert step(s, e) == b"\x00\x00\x00\x01c"
    return s


def at_eom(wants: Wants | None = None, offer: ev.OptionNegotiation = POSTFIX_OFFER) -> FilterSession:
    """A session whose pending event is end of message."""
    s = in_message(wants, offer)
    for e in (HEADER, EOH, BODY):
        step(s, e)
    s.receive_data(encode_command(EOM))
    assert s.next_event() == EOM and type(s.pending) is ev.EndOfMessage
    return s


# ---------------------------------------------------------------- full Postfix-like sessions


def postfix_message(queue_id: str, rcpts: list[str], headers: list[tuple[str, str]], chunks: list[bytes]) -> list[ev.Event]:
    """One message the way Postfix 3.7 sends it: a D before every event, A after it."""
    out: list[ev.Event] = [
        ev.Macro(b"M", {"{mail_addr}": "a@example.org"}), ev.EnvFrom(["<a@example.org>"]),
    ]
    for r in rcpts:
        out += [ev.Macro(b"R", {"i": queue_id, "{rcpt_addr}": r}), ev.EnvRcpt([f"<{r}>"])]
    out += [ev.Macro(b"T", {"i": queue_id}), ev.Data()]
    for name, value in headers:
        out += [ev.Macro(b"L", {"i": queue_id}), ev.Header(name, value)]
    out += [ev.Macro(b"N", {"i": queue_id}), ev.EndOfHeaders()]
    for chunk in chunks:
        out += [ev.Macro(b"B", {"i": queue_id}), ev.Body(chunk)]
    out += [ev.Macro(b"E", {"i": queue_id}), ev.EndOfMessage(), ev.Abort()]
    return out


POSTFIX_CONNECTION = [
    ev.Macro(b"C", {"j": "mx.example", "{daemon_name}": "smtpd", "_": "client [192.0.2.7]"}), CONNECT,
    ev.Macro(b"H", {}), ev.Helo("client.example"),
    *postfix_message("4F1", ["b@example.com", "c@example.com"], [("From", "a"), ("Subject", "one")],
                     [b"x" * 65535, b"tail\r\n"]),
    *postfix_message("4F2", ["d@example.com"], [("Subject", "two")], [b"second\r\n"]),
    ev.Quit(),
]


def test_postfix_session_event_sequence_and_replies() -> None:
    s = start()
    seen_macros: dict[str, str | None] = {}

    def answer(e: ev.Event) -> ev.Reply:
        if type(e) is ev.EndOfMessage:
            seen_macros["eom_i"] = s.macros.get("i")
            seen_macros["eom_rcpt"] = s.macros.get("{rcpt_addr}")
            seen_macros["eom_daemon"] = s.macros.get("{daemon_name}")
        return ev.Continue()

    events, out = run(s, cmds(*POSTFIX_CONNECTION), answer)
    # Every command comes out as its event, except the post-EOM ABORTs, which libmilter ignores.
    expected = [e for e in POSTFIX_CONNECTION if type(e) not in (ev.Abort, ev.Quit)] + [ev.Closed("quit")]
    assert events == expected
    assert s.ignored == 2
    needing = [e for e in events if e.needs_reply]
    assert types(needing) == [t for t in types(expected) if t not in (ev.Macro, ev.Closed)]
    assert replies(out) == [ev.Continue()] * len(needing)
    assert seen_macros == {"eom_i": "4F2", "eom_rcpt": "d@example.com", "eom_daemon": "smtpd"}
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    assert s.next_event() is NEED_DATA  # Closed came once, EOF after QUIT adds nothing


def test_postfix_session_with_streamed_headers_no_reply() -> None:
    """With NR_HDR (and NR_BODY) Postfix streams headers; the session asks for no reply."""
    s = start(Wants(no_reply=frozenset({"header", "body"})))
    assert s.negotiated.protocol & (Proto.NR_HDR | Proto.NR_BODY) == Proto.NR_HDR | Proto.NR_BODY
    events, out = run(s, cmds(*POSTFIX_CONNECTION))
    headers = [e for e in events if type(e) in (ev.Header, ev.Body)]
    assert headers and not any(e.needs_reply for e in headers)
    assert all(e.needs_reply for e in events if type(e) in (ev.Connect, ev.EnvRcpt, ev.EndOfMessage))
    assert len(replies(out)) == sum(e.needs_reply for e in events)
    assert s.send(ev.NoReply()) == b""


def test_macros_arrive_before_every_event_including_l_and_b_stages() -> None:
    s = start()
    seen: list[tuple[str, str | None, str | None]] = []

    def answer(e: ev.Event) -> ev.Reply:
        seen.append((type(e).__name__, s.macros.get("i"), s.macros.get("{rcpt_addr}")))
        return ev.Continue()

    events, _ = run(s, cmds(*POSTFIX_CONNECTION[:-1]), answer)
    stages = [e.stage for e in events if type(e) is ev.Macro]
    assert stages == [e.stage for e in POSTFIX_CONNECTION if type(e) is ev.Macro]
    assert b"L" in stages and b"B" in stages
    # Each macro packet comes out right before the event it precedes.
    for i, e in enumerate(events[:-1]):
        if type(e) is ev.Macro:
            assert type(events[i + 1]) is not ev.Macro
    # The i macro is that of the message being processed, at every stage from RCPT on.
    assert ("EnvFrom", None, None) in seen
    assert ("EnvRcpt", "4F1", "b@example.com") in seen
    assert ("EndOfMessage", "4F1", "c@example.com") in seen
    # The second MAIL (with its own D M) clears the recipient and later slots: no stale i from 4F1.
    assert ("EnvFrom", None, None) in seen[seen.index(("EndOfMessage", "4F1", "c@example.com")):]
    assert ("EndOfMessage", "4F2", "d@example.com") in seen


def test_closed_comes_exactly_once_after_quit() -> None:
    s = in_message()
    events, out = run(s, cmds(ev.Quit(), ev.Quit(), CONNECT))
    assert events == [ev.Abort(), ev.Closed("quit")]  # QUIT inside a message: abort first
    assert out == b""
    s.receive_data(b"")
    assert s.next_event() is NEED_DATA
    assert s.teardown("eof") == []


# ---------------------------------------------------------------- EOF without QUIT


EOF_CASES = [
    ("after optneg", [], [ev.Closed("eof")]),
    ("after connect", [CONNECT], [ev.Closed("eof")]),
    ("after helo", [CONNECT, HELO], [ev.Closed("eof")]),
    ("after mail", [CONNECT, HELO, MAIL], [ev.Abort(), ev.Closed("eof")]),
    ("after rcpt", [CONNECT, MAIL, RCPT], [ev.Abort(), ev.Closed("eof")]),
    ("after data", [CONNECT, MAIL, RCPT, DATA], [ev.Abort(), ev.Closed("eof")]),
    ("after header", [CONNECT, MAIL, RCPT, HEADER], [ev.Abort(), ev.Closed("eof")]),
    ("after eoh", [CONNECT, MAIL, RCPT, EOH], [ev.Abort(), ev.Closed("eof")]),
    ("after body", [CONNECT, MAIL, RCPT, EOH, BODY], [ev.Abort(), ev.Closed("eof")]),
    ("after eom", [CONNECT, MAIL, RCPT, EOH, BODY, EOM], [ev.Closed("eof")]),
    ("after eom and abort", [CONNECT, MAIL, RCPT, EOH, EOM, ev.Abort()], [ev.Closed("eof")]),
    ("after abort", [CONNECT, MAIL, RCPT, ev.Abort()], [ev.Closed("eof")]),
    ("after unknown", [CONNECT, ev.Unknown("XYZZY")], [ev.Closed("eof")]),
]


@pytest.mark.parametrize("name, before, after", EOF_CASES, ids=[c[0] for c in EOF_CASES])
def test_eof_without_quit_aborts_only_inside_a_message(name: str, before: list[ev.Event], after: list[ev.Event]) -> None:
    s = start()
    events, _ = run(s, cmds(*before))
    assert [e for e in events if type(e) is not ev.Abort] == [e for e in before if type(e) is not ev.Abort]
    s.receive_data(b"")
    events, out = run(s)
    assert events == after
    assert out == b""
    assert s.next_event() is NEED_DATA
    assert s.teardown("eof") == []  # a late teardown (e.g. the socket's own close) adds nothing


def test_eof_before_any_negotiation_still_closes_once() -> None:
    s = FilterSession()
    s.receive_data(b"")
    assert run(s)[0] == [ev.Closed("eof")]


def test_teardown_for_a_timeout_aborts_and_closes_once() -> None:
    s = in_message()
    assert s.teardown("timeout") == [ev.Abort(), ev.Closed("timeout")]
    assert s.teardown("timeout") == []
    s.receive_data(cmds(RCPT))
    assert s.next_event() is NEED_DATA


def test_eof_inside_a_packet_is_an_error_and_the_message_is_still_aborted() -> None:
    """libmilter on EOF/read error inside a transaction: xxfi_abort, then xxfi_close (1.3, 7.5)."""
    s = in_message()
    s.receive_data(cmds(RCPT2)[:7])  # half a packet, then the MTA goes away
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    after = s.teardown("protocol error") + drain_after_close(s)
    assert after == [ev.Abort(), ev.Closed("protocol error")]


def test_teardown_hands_out_nothing_after_closed() -> None:
    """An event still queued in the session must not come out after Closed (here the EOM of an E with data)."""
    s = in_message()
    s.receive_data(cmds(EOH, ev.EndOfMessage(b"last chunk")))
    assert s.next_event() == EOH
    s.send(ev.Continue())
    assert s.next_event() == ev.Body(b"last chunk")  # carried by EOM: no reply of its own
    assert s.pending is None
    closing = s.teardown("timeout")
    # The filter saw a chunk of this message but never its end: the message is aborted, then closed.
    assert closing == [ev.Abort(), ev.Closed("timeout")]
    assert drain_after_close(s) == []
    assert s.pending is None


def test_teardown_while_a_fallback_event_is_queued_keeps_the_abort_and_nothing_after_closed() -> None:
    s = in_message()
    s.receive_data(cmds(HELO))  # HELO inside a message: abort, then HELO is processed from HELO
    assert s.next_event() == ev.Abort()
    closing = s.teardown("stop")
    assert closing == [ev.Closed("stop")]
    assert drain_after_close(s) == []  # the queued Helo must not come out after Closed


# ---------------------------------------------------------------- state table (7.2) and out-of-order (7.3)


def test_libmilter_state_table() -> None:
    """From each state, the allowed successor is processed without an abort."""
    S = State
    table = {
        S.CONN: {S.HELO, S.MAIL, S.UNKN},
        S.HELO: {S.HELO, S.MAIL, S.UNKN},
        S.MAIL: {S.RCPT, S.ABRT, S.UNKN},
        S.RCPT: {S.RCPT, S.DATA, S.HDRS, S.EOHS, S.BODY, S.ENDM, S.ABRT, S.UNKN},
        S.DATA: {S.HDRS, S.EOHS, S.ABRT},
        S.HDRS: {S.HDRS, S.EOHS, S.ABRT},
        S.EOHS: {S.BODY, S.ENDM, S.ABRT},
        S.BODY: {S.BODY, S.ENDM, S.ABRT},
        S.ENDM: {S.MAIL, S.QUIT, S.Q_NC, S.UNKN},
        S.UNKN: {S.HELO, S.MAIL, S.RCPT, S.DATA, S.BODY, S.ABRT, S.UNKN, S.QUIT, S.Q_NC},
    }
    reach = {  # commands that bring a fresh session into each state
        S.CONN: [CONNECT], S.HELO: [CONNECT, HELO], S.MAIL: [CONNECT, MAIL], S.RCPT: [CONNECT, MAIL, RCPT],
        S.DATA: [CONNECT, MAIL, RCPT, DATA], S.HDRS: [CONNECT, MAIL, RCPT, HEADER],
        S.EOHS: [CONNECT, MAIL, RCPT, EOH], S.BODY: [CONNECT, MAIL, RCPT, EOH, BODY],
        S.ENDM: [CONNECT, MAIL, RCPT, EOM], S.UNKN: [CONNECT, ev.Unknown("X")],
    }
    command_of = {S.HELO: HELO, S.MAIL: MAIL, S.RCPT: RCPT, S.DATA: DATA, S.HDRS: HEADER, S.EOHS: EOH,
                  S.BODY: BODY, S.ENDM: EOM, S.ABRT: ev.Abort(), S.UNKN: ev.Unknown("Y"),
                  S.QUIT: ev.Quit(), S.Q_NC: ev.QuitNewConnection()}
    for old, allowed in table.items():
        for new in allowed:
            s = start()
            run(s, cmds(*reach[old]))
            assert s.state is old
            events, _ = run(s, cmds(command_of[new]))
            expected = {S.QUIT: [ev.Closed("quit")], S.Q_NC: [ev.Closed("quit_nc")]}.get(new, [command_of[new]])
            assert events == expected, (old, new)
            assert s.ignored == 0
            assert s.state is (new if new is not S.QUIT else State.CLOSED)


def test_optneg_then_connect_or_unknown() -> None:
    s = start()
    assert run(s, cmds(ev.Unknown("EHLO?")))[0] == [ev.Unknown("EHLO?")]
    s = start()
    assert run(s, cmds(CONNECT))[0] == [CONNECT]


def test_out_of_order_mail_inside_a_message_aborts_then_processes() -> None:
    s = in_message()
    events, out = run(s, cmds(MAIL, RCPT2))
    assert events == [ev.Abort(), MAIL, RCPT2]
    assert replies(out) == [ev.Continue(), ev.Continue()]
    assert s.state is State.RCPT


def test_helo_inside_a_message_aborts_then_is_processed_from_helo() -> None:
    s = in_message()
    events, _ = run(s, cmds(ev.Helo("again")))
    assert events == [ev.Abort(), ev.Helo("again")]
    assert s.state is State.HELO


def test_out_of_order_command_needing_a_reply_is_an_error_after_the_abort() -> None:
    """N right after M: libmilter calls abort, then drops N silently; we refuse it (documented deviation)."""
    s = start()
    for e in (CONNECT, MAIL):
        step(s, e)
    s.receive_data(cmds(EOH))
    observed: list[ev.Event] = []
    with pytest.raises(RemoteProtocolError):
        while (e := s.next_event()) is not NEED_DATA:
            observed.append(e)
    observed += s.teardown("protocol error") + drain_after_close(s)
    # The filter must still learn that the message was aborted, once, before the close.
    assert observed == [ev.Abort(), ev.Closed("protocol error")]


def test_rcpt_without_mail_outside_a_message_is_refused_without_abort() -> None:
    s = start()
    step(s, CONNECT)
    s.receive_data(cmds(RCPT))
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    assert s.teardown("protocol error") == [ev.Closed("protocol error")]


@pytest.mark.parametrize("bad", [EOM, BODY, EOH, HEADER, DATA, CONNECT, POSTFIX_OFFER])
def test_commands_not_allowed_from_helo_are_refused(bad: ev.Event) -> None:
    s = start()
    for e in (CONNECT, HELO):
        step(s, e)
    s.receive_data(encode_command(bad))
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_a_header_out_of_order_without_a_reply_is_dropped_silently() -> None:
    """Under NR_HDR the MTA waits for no reply to a header, so one out of order is dropped, as
    libmilter drops it (and as ABORT or QUIT_NC out of order are, §7.3); it ended the session,
    as for a command the MTA waits on."""
    s = start(Wants(no_reply=frozenset({"header"})))
    assert s.negotiated.protocol & Proto.NR_HDR
    run(s, cmds(CONNECT, HELO))
    events, out = run(s, cmds(HEADER, HEADER))
    assert events == [] and out == b"" and s.ignored == 2
    assert run(s, cmds(MAIL))[0] == [MAIL]


def test_second_option_negotiation_is_refused() -> None:
    s = start()
    s.receive_data(encode_command(POSTFIX_OFFER))
    with pytest.raises(RemoteProtocolError):
        s.next_event()


@pytest.mark.parametrize("prefix", [[CONNECT], [CONNECT, HELO], [CONNECT, MAIL, RCPT, EOM]],
                         ids=["after connect", "after helo", "after eom"])
def test_abort_not_allowed_is_dropped_silently(prefix: list[ev.Event]) -> None:
    s = start()
    run(s, cmds(*prefix))
    events, out = run(s, cmds(ev.Abort(), ev.Abort()))
    assert events == [] and out == b""
    assert s.ignored == 2
    assert run(s, cmds(MAIL))[0] == [MAIL]  # the next message starts normally


def test_quit_nc_not_allowed_is_dropped_silently_and_the_next_connect_is_refused() -> None:
    s = start()
    for e in (CONNECT, HELO):
        step(s, e)
    events, out = run(s, cmds(ev.QuitNewConnection()))
    assert events == [] and out == b"" and s.ignored == 1
    s.receive_data(cmds(CONNECT))
    with pytest.raises(RemoteProtocolError):  # libmilter ignores it silently; we end the connection
        s.next_event()


def test_quit_nc_inside_a_message_aborts_it_and_is_dropped_as_libmilter_does() -> None:
    # Debian's libmilter, checked with tests/support/difffilter.c: the abort callback at the K, no
    # close callback, the K and the C after it dropped (the MTA waits on the C until its timeout).
    s = in_message()
    events, out = run(s, cmds(HEADER, ev.QuitNewConnection()))
    assert events == [HEADER, ev.Abort()] and out == b"\x00\x00\x00\x01c" and s.ignored == 1
    s.receive_data(cmds(CONNECT))
    with pytest.raises(RemoteProtocolError, match="not allowed after HELO"):  # we end the connection
        s.next_event()


def test_abort_inside_a_message_is_delivered_and_a_new_message_follows() -> None:
    s = in_message()
    events, out = run(s, cmds(ev.Abort(), MAIL, RCPT, EOM, ev.Abort()))
    assert events == [ev.Abort(), MAIL, RCPT, EOM]
    assert out == b"\x00\x00\x00\x01c" * 3
    assert s.ignored == 1


def test_unknown_may_occur_inside_a_message_and_rcpt_follows() -> None:
    s = start()
    events, _ = run(s, cmds(CONNECT, MAIL, ev.Unknown("XCMD"), RCPT, DATA, EOH, EOM))
    assert events == [CONNECT, MAIL, ev.Unknown("XCMD"), RCPT, DATA, EOH, EOM]


@pytest.mark.parametrize("rest", [[HEADER, EOH, BODY, EOM], [EOH, EOM], [BODY, EOM], [EOM]],
                         ids=["header", "eoh", "body", "eom"])
def test_unknown_between_rcpt_and_content_without_data(rest: list[ev.Event]) -> None:
    # Postfix and Sendmail pass a client's unknown command on in the middle of a transaction;
    # without a data callback (NODATA) the message content follows it with no T in between.
    s = start(Wants(events=ALL_EVENTS - {"data"}))
    assert s.negotiated.protocol & Proto.NODATA
    events, _ = run(s, cmds(CONNECT, HELO, MAIL, RCPT, ev.Unknown("XFOO"), ev.Unknown("XBAR"), *rest))
    assert events == [CONNECT, HELO, MAIL, RCPT, ev.Unknown("XFOO"), ev.Unknown("XBAR"), *rest]
    assert s.ignored == 0


def test_unknown_outside_a_message_still_does_not_admit_its_content() -> None:
    s = start(Wants(events=ALL_EVENTS - {"data"}))
    run(s, cmds(CONNECT, HELO, ev.Unknown("XFOO")))
    s.receive_data(cmds(EOH))
    with pytest.raises(RemoteProtocolError):
        s.next_event()


LEAVING_AFTER_UNKNOWN = [
    ("helo", [HELO, ev.Abort()], [ev.Abort(), HELO]),  # Postfix: EHLO, then its ABORT (ignored)
    ("mail", [MAIL], [ev.Abort(), MAIL]),
    ("quit_nc", [ev.QuitNewConnection()], [ev.Abort(), ev.Closed("quit_nc")]),
    ("quit", [ev.Quit()], [ev.Abort(), ev.Closed("quit")]),
    ("eof", [], [ev.Abort(), ev.Closed("eof")]),
]


@pytest.mark.parametrize("name, rest, after", LEAVING_AFTER_UNKNOWN, ids=[c[0] for c in LEAVING_AFTER_UNKNOWN])
def test_a_message_left_after_an_unknown_command_is_aborted(name: str, rest: list[ev.Event],
                                                            after: list[ev.Event]) -> None:
    # The message is still open after UNKNOWN (its content may follow): a command that leaves
    # it, allowed by UNKN's row, aborted nothing, and its abort callbacks never ran.
    s = start()
    events, _ = run(s, cmds(CONNECT, HELO, MAIL, RCPT, ev.Unknown("XFOO"), *rest))
    if not rest:
        s.receive_data(b"")
        events += run(s)[0]
    assert events == [CONNECT, HELO, MAIL, RCPT, ev.Unknown("XFOO"), *after]


def test_an_abort_after_an_unknown_command_inside_a_message_is_delivered_once() -> None:
    s = start()
    events, _ = run(s, cmds(CONNECT, HELO, MAIL, RCPT, ev.Unknown("XFOO"), ev.Abort(), HELO, ev.Quit()))
    assert events == [CONNECT, HELO, MAIL, RCPT, ev.Unknown("XFOO"), ev.Abort(), HELO, ev.Closed("quit")]


def test_eom_carrying_data_delivers_a_body_chunk_and_one_reply() -> None:
    s = in_message()
    events, out = run(s, cmds(EOH, ev.EndOfMessage(b"tail")), lambda e: ev.Accept() if type(e) is ev.EndOfMessage
                      else ev.Continue())
    assert events == [EOH, ev.Body(b"tail"), ev.EndOfMessage()]
    assert [e.needs_reply for e in events] == [True, False, True]
    assert replies(out) == [ev.Continue(), ev.Accept()]


def test_an_out_of_order_command_left_unanswered_still_ends_the_message() -> None:
    """A header after the end of headers, under NR_HDR, is out of order and ignored (libmilter
    ignores what it cannot answer), yet it ends the message as any out-of-order command does:
    the abort, then the session is after HELO, so a body chunk that follows is out of order too
    and closes the connection, instead of being taken as the aborted message's."""
    s = in_message(Wants(no_reply=frozenset({"header"})))
    run(s, cmds(DATA, HEADER, EOH))
    events, out = run(s, cmds(HEADER))
    assert events == [ev.Abort()] and out == b"" and s.ignored == 1
    s.receive_data(cmds(BODY))
    with pytest.raises(RemoteProtocolError, match="^command 'B' is not allowed after HELO$"):
        s.next_event()


# ---------------------------------------------------------------- skip rule


def test_nomail_makes_post_eom_abort_legal() -> None:
    wants = Wants(events=ALL_EVENTS - {"envfrom"})
    s = start(wants)
    assert s.negotiated.protocol & Proto.NOMAIL
    # Both MTAs still send the D for M; Postfix honours NOMAIL and sends no M.
    events, _ = run(s, cmds(CONNECT, HELO, ev.Macro(b"M", {"i": "1"}), RCPT, EOH, EOM, ev.Abort()))
    assert types(events) == [ev.Connect, ev.Helo, ev.Macro, ev.EnvRcpt, ev.EndOfHeaders, ev.EndOfMessage, ev.Abort]
    assert s.ignored == 0


def test_without_nomail_post_eom_abort_is_dropped() -> None:
    s = start()
    events, _ = run(s, cmds(CONNECT, HELO, MAIL, RCPT, EOH, EOM, ev.Abort()))
    assert ev.Abort() not in events and s.ignored == 1


def test_skip_bits_count_only_when_negotiated() -> None:
    # The filter does not want envfrom, but the MTA does not offer NOMAIL: nothing may be jumped over.
    offer = ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF & ~int(Proto.NOMAIL))
    s = start(Wants(events=ALL_EVENTS - {"envfrom"}), offer)
    assert not s.negotiated.protocol & Proto.NOMAIL
    s.receive_data(cmds(CONNECT))
    run(s)
    s.receive_data(cmds(RCPT))
    with pytest.raises(RemoteProtocolError):
        s.next_event()


@pytest.mark.parametrize("rest", [[BODY, EOM], [EOM]], ids=["body", "eom"])
def test_a_message_without_headers_after_data_with_noeoh(rest: list[ev.Event]) -> None:
    # Postfix hides its own Received:, so a message without headers sends none; with a header
    # callback (no NOHDRS) but no eoh callback (NOEOH), DATA is followed by the body.
    s = start(Wants(events=ALL_EVENTS - {"eoh"}))
    assert not s.negotiated.protocol & Proto.NOHDRS and s.negotiated.protocol & Proto.NOEOH
    events, _ = run(s, cmds(CONNECT, HELO, MAIL, RCPT, DATA, *rest))
    assert events == [CONNECT, HELO, MAIL, RCPT, DATA, *rest]  # no Abort in between


def test_without_noeoh_data_is_still_followed_by_eoh() -> None:
    s = start(Wants(events=ALL_EVENTS))
    run(s, cmds(CONNECT, HELO, MAIL, RCPT, DATA))
    s.receive_data(cmds(BODY))
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_noeoh_allows_headers_then_body() -> None:
    s = start(Wants(events=ALL_EVENTS - {"eoh"}))
    events, _ = run(s, cmds(CONNECT, MAIL, RCPT, HEADER, BODY, EOM))
    assert events == [CONNECT, MAIL, RCPT, HEADER, BODY, EOM]


def test_without_noeoh_headers_then_body_is_out_of_order() -> None:
    s = start()
    run(s, cmds(CONNECT, MAIL, RCPT, HEADER))
    s.receive_data(cmds(BODY))
    with pytest.raises(RemoteProtocolError):
        while s.next_event() is not NEED_DATA:
            pass


def test_nohelo_and_nomail_allow_connect_then_rcpt() -> None:
    s = start(Wants(events=ALL_EVENTS - {"helo", "envfrom"}))
    events, _ = run(s, cmds(CONNECT, RCPT, EOM))
    assert events == [CONNECT, RCPT, EOM]


# ---------------------------------------------------------------- per-reply state changes (7.4)


@pytest.mark.parametrize("reply", [ev.Reject(), ev.Tempfail(), ev.Discard(), ev.ReplyCode("550 5.1.1 no such user")])
def test_refusing_a_recipient_keeps_the_transaction(reply: ev.Reply) -> None:
    s = in_message()
    assert replies(step(s, RCPT2, reply)) == [reply]
    assert s.state is State.RCPT
    events, out = run(s, cmds(RCPT, DATA, HEADER, EOH, BODY, EOM, ev.Abort()))
    assert events == [RCPT, DATA, HEADER, EOH, BODY, EOM]
    assert len(replies(out)) == 6 and s.ignored == 1


@pytest.mark.parametrize("reply", [ev.Reject(), ev.Tempfail(), ev.ReplyCode("550 5.7.1 go away")])
def test_rejecting_mail_returns_to_helo_and_the_following_abort_is_ignored(reply: ev.Reply) -> None:
    s = start()
    step(s, CONNECT)
    assert replies(step(s, MAIL, reply)) == [reply]
    assert s.state is State.HELO
    events, _ = run(s, cmds(ev.Abort(), MAIL, RCPT))
    assert events == [MAIL, RCPT]
    assert s.ignored == 1


ACCEPT_CASES = [
    ([CONNECT, MAIL], RCPT), ([CONNECT, MAIL, RCPT], DATA), ([CONNECT, MAIL, RCPT], HEADER),
    ([CONNECT, MAIL, RCPT], EOH), ([CONNECT, MAIL, RCPT, EOH], BODY),
]


@pytest.mark.parametrize("prefix, at", ACCEPT_CASES, ids=[type(a).__name__ for _, a in ACCEPT_CASES])
def test_accept_during_a_message_ends_the_message(prefix: list[ev.Event], at: ev.Event) -> None:
    s = start()
    run(s, cmds(*prefix))
    assert replies(step(s, at, ev.Accept())) == [ev.Accept()]
    assert s.state is State.HELO and not s.in_transaction
    s.receive_data(b"")
    assert run(s)[0] == [ev.Closed("eof")]  # no abort: the message is over for the filter


def test_accept_at_connect_keeps_the_connection_usable() -> None:
    s = start()
    step(s, CONNECT, ev.Accept())
    assert s.state is State.HELO
    assert run(s, cmds(HELO))[0] == [HELO]


def test_unknown_rejected_keeps_state() -> None:
    s = start()
    step(s, CONNECT)
    step(s, ev.Unknown("X"), ev.Reject())
    assert s.state is State.UNKN


def test_continue_and_skip_keep_state() -> None:
    s = in_message()
    step(s, EOH)
    assert step(s, BODY, ev.Skip()) == b"\x00\x00\x00\x01s"
    assert s.state is State.BODY
    assert run(s, cmds(EOM), lambda e: ev.Continue())[0] == [EOM]


def test_reject_at_eom_then_abort_is_ignored() -> None:
    s = at_eom()
    assert s.send(ev.Reject()) == b"\x00\x00\x00\x01r"
    assert run(s, cmds(ev.Abort()))[0] == []
    assert s.ignored == 1


# ---------------------------------------------------------------- QUIT_NC


def test_quit_nc_closes_the_smtp_session_and_the_next_connect_needs_no_optneg() -> None:
    s = start(Wants(actions=Action.ADDHDRS))
    first, _ = run(s, cmds(ev.Macro(b"C", {"j": "mx", "{daemon_name}": "smtpd"}), CONNECT,
                          ev.Macro(b"H", {"{tls_version}": "TLSv1.3"}), HELO,
                          ev.Macro(b"M", {"{mail_addr}": "a"}), MAIL, RCPT, EOM, ev.QuitNewConnection()))
    assert first[-1] == ev.Closed("quit_nc")
    assert types(first).count(ev.Closed) == 1
    # Next SMTP session: C directly, without macros of its own.
    events, out = run(s, cmds(CONNECT))
    assert events == [CONNECT]
    for name in ("j", "{daemon_name}", "{tls_version}", "{mail_addr}"):
        assert s.macros.get(name) is None, name
    assert s.macros.all() == {}
    assert replies(out) == [ev.Continue()]
    # Options negotiated on the first session still hold.
    run(s, cmds(MAIL, RCPT))
    s.receive_data(cmds(EOM))
    assert s.next_event() == EOM
    assert replies(s.send(ev.AddHeader("X-Second", "yes"))) == [ev.AddHeader("X-Second", "yes")]
    with pytest.raises(LocalProtocolError):
        s.send(ev.ChangeFrom("<x>"))
    s.send(ev.Continue())
    s.receive_data(b"")
    assert run(s)[0] == [ev.Closed("eof")]  # each SMTP session gets exactly one Closed


def test_eof_right_after_quit_nc_adds_no_second_closed() -> None:
    s = start()
    events, _ = run(s, cmds(CONNECT, MAIL, RCPT, EOM, ev.QuitNewConnection()))
    assert events[-1] == ev.Closed("quit_nc")
    s.receive_data(b"")
    assert run(s)[0] == []
    assert s.teardown("eof") == []


@pytest.mark.parametrize("end", [ev.Quit(), None])
def test_a_session_after_quit_nc_whose_connect_is_skipped_gets_its_own_closed(end: ev.Event | None) -> None:
    """Without a connect callback (SMFIP_NOCONNECT) the next session after QUIT_NC starts at HELO
    or MAIL: its QUIT or EOF must still run the close callback (libmilter's QUIT does), or the
    filter's per-session cleanup never runs for it."""
    s = start(Wants(events=ALL_EVENTS - {"connect"}))
    first, _ = run(s, cmds(HELO, MAIL, RCPT, EOM, ev.QuitNewConnection()))
    assert first[-1] == ev.Closed("quit_nc")
    events, _ = run(s, cmds(HELO, MAIL, RCPT, EOM) + (cmds(end) if end is not None else b""))
    if end is None:
        s.receive_data(b"")
        events += run(s)[0]
    assert events == [HELO, MAIL, RCPT, EOM, ev.Closed("quit" if end is not None else "eof")]


def test_quit_right_after_quit_nc_adds_no_second_closed() -> None:
    s = start(Wants(events=ALL_EVENTS - {"connect"}))
    events, _ = run(s, cmds(HELO, MAIL, RCPT, EOM, ev.QuitNewConnection(), ev.Quit()))
    assert events == [HELO, MAIL, RCPT, EOM, ev.Closed("quit_nc")]
    assert s.ended == "quit"


def test_quit_nc_after_unknown_is_accepted() -> None:
    s = start()
    events, _ = run(s, cmds(CONNECT, ev.Unknown("X"), ev.QuitNewConnection(), CONNECT))
    assert events == [CONNECT, ev.Unknown("X"), ev.Closed("quit_nc"), CONNECT]


def test_the_smtp_session_after_quit_nc_keeps_its_own_macros() -> None:
    """QUIT_NC clears the macros once, at the next command: the next session's own, sent after
    it, stay visible to its later callbacks as they arrive."""
    s = start()
    run(s, cmds(ev.Macro(b"C", {"j": "mx"}), CONNECT, HELO, MAIL, RCPT, EOM, ev.QuitNewConnection()))
    seen: list[tuple[str, str | None, str | None]] = []

    def look(e: ev.Event) -> ev.Reply:
        seen.append((type(e).__name__, s.macros.get("j"), s.macros.get("{tls_version}")))
        return ev.Continue()

    run(s, cmds(ev.Macro(b"C", {"j": "mx2"}), CONNECT, ev.Macro(b"H", {"{tls_version}": "TLSv1.3"}), HELO, MAIL),
        look)
    assert seen == [("Connect", "mx2", None), ("Helo", "mx2", "TLSv1.3"), ("EnvFrom", "mx2", "TLSv1.3")]


# ---------------------------------------------------------------- macros (5.3)


def test_macro_slot_is_replaced_wholesale() -> None:
    s = start()
    run(s, cmds(ev.Macro(b"C", {"j": "one", "v": "Postfix"}), CONNECT))
    assert (s.macros.get("j"), s.macros.get("v")) == ("one", "Postfix")
    m = MacroStore()
    m.define(b"C", {"j": "one", "v": "Postfix"})
    m.define(b"C", {"j": "two"})
    assert (m.get("j"), m.get("v")) == ("two", None)


def test_empty_or_foreign_macro_packets_are_ignored_for_storage() -> None:
    s = start()
    run(s, cmds(CONNECT, MAIL, ev.Macro(b"R", {"{rcpt_addr}": "b"}), RCPT))
    events, _ = run(s, cmds(ev.Macro(b"R", {}), RCPT2, ev.Macro(b"L", {"x-l": "1"}), HEADER,
                            ev.Macro(b"B", {"x-b": "1"}), ev.Macro(b"U", {"x-u": "1"})))
    assert [e for e in events if type(e) is ev.Macro] == [ev.Macro(b"R", {}), ev.Macro(b"L", {"x-l": "1"}),
                                                          ev.Macro(b"B", {"x-b": "1"}), ev.Macro(b"U", {"x-u": "1"})]
    assert s.macros.get("{rcpt_addr}") == "b"  # the empty D R left the previous recipient's values
    assert s.macros.get("x-l") is s.macros.get("x-b") is s.macros.get("x-u") is None


@pytest.mark.parametrize(
    "command, cleared",
    [(b"C", "HMRTNE"), (b"H", "MRTNE"), (b"M", "RTNE"), (b"R", "TNE"), (b"T", ""), (b"L", ""), (b"N", ""),
     (b"B", ""), (b"E", ""), (b"A", ""), (b"U", ""), (b"K", "CHMRTNE"), (b"Q", "CHMRTNE")],
)
def test_clearing_rules(command: bytes, cleared: str) -> None:
    m = MacroStore()
    for stage in b"CHMRTNE":
        m.define(bytes([stage]), {f"{{s{chr(stage)}}}": chr(stage)})
    m.command(command)
    for stage in "CHMRTNE":
        expected = None if stage in cleared else stage
        assert m.get(f"{{s{stage}}}") == expected, (command, stage)


def test_abort_clears_nothing_and_mail_macros_stay_visible_until_replaced() -> None:
    s = start()
    run(s, cmds(CONNECT, ev.Macro(b"M", {"{auth_authen}": "alice", "{mail_addr}": "a"}), MAIL,
                ev.Macro(b"R", {"{rcpt_addr}": "b"}), RCPT, ev.Macro(b"E", {"{msg_id}": "<1@x>"}), EOM))
    events, _ = run(s, cmds(ev.Abort()))
    assert events == []
    for name, value in (("{auth_authen}", "alice"), ("{rcpt_addr}", "b"), ("{msg_id}", "<1@x>")):
        assert s.macros.get(name) == value
    # Inside a message, ABORT is delivered and still clears nothing.
    s2 = in_message()
    run(s2, cmds(ev.Macro(b"T", {"i": "Q1"}), DATA))
    assert run(s2, cmds(ev.Abort()))[0] == [ev.Abort()]
    assert s2.macros.get("i") == "Q1"


def test_new_mail_clears_recipient_and_later_slots_only() -> None:
    s = start()
    run(s, cmds(ev.Macro(b"C", {"j": "mx"}), CONNECT, ev.Macro(b"H", {"{cipher}": "AES"}), HELO,
                ev.Macro(b"M", {"{mail_addr}": "a"}), MAIL, ev.Macro(b"R", {"{rcpt_addr}": "b"}), RCPT,
                ev.Macro(b"E", {"i": "Q1"}), EOM, ev.Abort(), MAIL))
    assert s.macros.get("j") == "mx" and s.macros.get("{cipher}") == "AES"
    assert s.macros.get("{mail_addr}") == "a"  # no new D M: the old slot stays
    assert s.macros.get("{rcpt_addr}") is None and s.macros.get("i") is None


def test_a_mail_that_aborted_a_message_clears_the_macros_once_not_again_in_the_next_message() -> None:
    """An out-of-order MAIL clears the recipient's and later macros when it is delivered, after
    the abort it queued. The next events to come out of the queue (the body chunk an EOM
    carries, then the EOM) belong to the next message, whose macros stay visible to them."""
    s = in_message()
    run(s, cmds(MAIL, ev.Macro(b"R", {"{rcpt_addr}": "c"}), RCPT2, DATA, EOH, ev.Macro(b"E", {"i": "Q2"})))
    seen: list[tuple[str, str | None, str | None]] = []

    def look(e: ev.Event) -> ev.Reply:
        seen.append((type(e).__name__, s.macros.get("{rcpt_addr}"), s.macros.get("i")))
        return ev.Continue()

    events, _ = run(s, cmds(ev.EndOfMessage(b"tail")), look)
    assert events == [ev.Body(b"tail"), EOM]
    assert seen == [("EndOfMessage", "c", "Q2")]
    assert (s.macros.get("{rcpt_addr}"), s.macros.get("i")) == ("c", "Q2")


_STAGE_LETTERS = st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"N", b"E", b"L", b"B", b"U", b"Q"])
_MACRO_TEXT = st.text(alphabet="ij{}_ab\x00é", max_size=4).map(lambda t: t.encode("utf-8"))
_RAW_MACRO = st.builds(lambda stage, parts: stage + b"".join(p + b"\0" for p in parts),
                       _STAGE_LETTERS, st.lists(_MACRO_TEXT, max_size=5))
_MACRO_FRAME = st.one_of(_RAW_MACRO, _RAW_MACRO.map(lambda raw: raw[:-1] if len(raw) > 1 else raw))
_FLOW = [CONNECT, HELO, MAIL, RCPT, RCPT2, DATA, HEADER, EOH, BODY, EOM, ev.Abort(), MAIL, RCPT, EOM]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_MACRO_FRAME, max_size=2), min_size=len(_FLOW), max_size=len(_FLOW)))
def test_macros_stored_without_events_match_the_event_path(macro_frames: list[list[bytes]]) -> None:
    """The engine's fast path (emit_macros=False: raw payloads, no Macro events) keeps exactly the
    values the event path keeps, after every command, whatever the packets look like."""
    names = ["i", "{i}", "j", "{j}", "_", "a", "{a}", "ab", "", "é"]
    with_events, without = start(), start(emit_macros=False)
    for event, frames in zip(_FLOW, macro_frames):
        data = b"".join(struct.pack("!I", len(f) + 1) + b"D" + f for f in frames) + cmds(event)
        seen, _ = run(with_events, data)
        run(without, data)
        assert [type(e) for e in seen if type(e) is ev.Macro] == [ev.Macro] * len(frames)
        assert with_events.macros.all() == without.macros.all()
        assert [with_events.macros.get(n) for n in names] == [without.macros.get(n) for n in names]


def test_lookup_order_is_latest_stage_first() -> None:
    order = "ENTRMHC"
    for n in range(1, 8):
        for stages in itertools.combinations("CHMRTNE", n):
            m = MacroStore()
            for stage in stages:
                m.define(stage.encode(), {"x": stage})
            expected = next(st for st in order if st in stages)
            assert m.get("x") == expected, stages
            assert m.all()["x"] == expected


def test_single_letter_names_match_their_braced_form_and_back() -> None:
    m = MacroStore()
    m.define(b"C", {"{j}": "braced", "_": "client", "{daemon_name}": "smtpd"})
    m.define(b"M", {"i": "bare"})
    assert m.get("j") == "braced"
    assert m.get("{i}") == "bare"
    assert m.get("i") == "bare"
    assert m.get("{_}") == "client"
    assert m.get("daemon_name") is None  # long names match only exactly
    assert m.get("{daemon_name}") == "smtpd"
    assert m.get("{daemon_name") is None
    # The latest stage wins even when it holds the other spelling.
    m.define(b"R", {"{i}": "from-rcpt"})
    assert m.get("i") == "from-rcpt"


@pytest.mark.parametrize("before", [(), (ev.Unknown("XFOO"),)])
@pytest.mark.parametrize("command", [HELO, MAIL])
def test_the_abort_of_a_message_a_command_interrupts_sees_the_message_macros(
        before: tuple[ev.Event, ...], command: ev.Event) -> None:
    """HELO or MAIL in the middle of a message (Postfix sends such a HELO), also after an unknown
    command there, first aborts it, and libmilter's abort callback still sees the message's
    macros: the command clears them when it is handled. Here the clearing came before the abort
    was delivered, so the abort callbacks saw no {rcpt_addr}."""
    s = in_message()
    run(s, cmds(ev.Macro(b"R", {"{rcpt_addr}": "b@example.com"}), RCPT, *before))
    s.receive_data(cmds(command))
    assert type(s.next_event()) is ev.Abort
    assert s.macros.get("{rcpt_addr}") == "b@example.com"
    assert type(s.next_event()) is not ev.Abort
    assert s.macros.get("{rcpt_addr}") is None


@pytest.mark.parametrize("emit_macros", [True, False])
def test_the_first_pair_of_a_packet_that_names_a_macro_wins(emit_macros: bool) -> None:
    """libmilter walks a stage's pairs in order and takes the first whose name is the one asked
    for or, for a one-letter macro, its other form. Here the exact spelling won wherever it stood,
    and of two pairs with one name the last: `i` and `{i}` in one packet gave each its own value."""
    s = start(emit_macros=emit_macros)
    packet = b"C" + b"".join(p + b"\0" for p in (b"{j}", b"first", b"j", b"second", b"v", b"one", b"v", b"two"))
    run(s, struct.pack("!I", len(packet) + 1) + b"D" + packet + cmds(CONNECT))
    assert [s.macros.get(name) for name in ("j", "{j}", "v")] == ["first", "first", "one"]


# ---------------------------------------------------------------- negotiation (4.4)


@pytest.mark.parametrize("version", [2, 3, 4, 5, 6])
def test_offered_versions_2_to_6_are_answered_with_the_same_version(version: int) -> None:
    n = negotiate(ev.OptionNegotiation(version, 0x1FF, 0x1FFFFF), Wants())
    assert n.reply.version == n.version == version


def test_newer_mta_version_is_answered_with_6() -> None:
    assert negotiate(ev.OptionNegotiation(7, 0x1FF, 0x1FFFFF), Wants()).reply.version == 6


@pytest.mark.parametrize("version", [0, 1])
def test_mta_version_below_2_fails(version: int) -> None:
    with pytest.raises(RemoteProtocolError):
        negotiate(ev.OptionNegotiation(version, 0x1FF, 0x1FFFFF), Wants())


def test_fail_negotiation_closes_once() -> None:
    s = FilterSession()
    s.receive_data(encode_command(ev.OptionNegotiation(1, 0, 0)))
    offer = s.next_event()
    with pytest.raises(RemoteProtocolError):
        negotiate(offer, Wants())
    assert s.fail_negotiation() == [ev.Closed("negotiation")]
    assert s.pending is None
    assert run(s, cmds(CONNECT))[0] == []


def test_zero_actions_mean_v1_actions_and_zero_protocol_means_v1_protocol() -> None:
    n = negotiate(ev.OptionNegotiation(6, 0, 0), Wants(events=frozenset(), no_reply=frozenset()))
    assert n.reply.actions == 0x0F
    assert n.reply.protocol == 0x3F  # every skip bit a v1 MTA knows, nothing more
    n = negotiate(ev.OptionNegotiation(2, 0, 0), Wants())
    assert n.reply.actions == 0x0F and n.reply.protocol == 0


def test_reference_example_reply() -> None:
    """docs/protocol.md §4.4: libmilter answers (6, 0x11, 0x300); we also ask for SKIP when offered."""
    wants = Wants(events=ALL_EVENTS - {"data", "unknown"}, actions=Action.ADDHDRS | Action.CHGHDRS)
    n = negotiate(ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF), wants)
    assert (n.reply.version, n.reply.actions, n.reply.protocol) == (6, 0x11, 0x300 | 0x400)
    n = negotiate(ev.OptionNegotiation(6, 0x1FF, 0x3F), wants)
    assert n.reply.protocol == 0


def test_reply_is_what_the_session_sends() -> None:
    s = FilterSession()
    s.receive_data(encode_command(POSTFIX_OFFER))
    offer = s.next_event()
    wants = Wants(actions=Action.ADDHDRS, macros={MacroStage.CONNECT: "j {daemon_name}"})
    n = negotiate(offer, wants)
    out = s.accept_negotiation(n)
    assert replies(out) == [n.reply]
    assert n.reply.macros == {MacroStage.CONNECT: "j {daemon_name}"}
    assert n.reply.actions == Action.ADDHDRS | Action.SETSYMLIST


def test_nr_bits_only_when_offered() -> None:
    wants = Wants(no_reply=frozenset({"header", "body", "connect"}))
    n = negotiate(ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF), wants)
    assert Proto(n.reply.protocol) & (Proto.NR_HDR | Proto.NR_BODY | Proto.NR_CONN) == (
        Proto.NR_HDR | Proto.NR_BODY | Proto.NR_CONN)
    n = negotiate(ev.OptionNegotiation(6, 0x1FF, 0xFF), wants)  # NR_HDR (0x80) offered, the others not
    assert Proto(n.reply.protocol) & (Proto.NR_HDR | Proto.NR_BODY | Proto.NR_CONN) == Proto.NR_HDR
    # And the session then expects a reply where the MTA did not grant silence.
    s = start(wants, ev.OptionNegotiation(6, 0x1FF, 0xFF))
    events, _ = run(s, cmds(CONNECT, MAIL, RCPT, HEADER, EOH, BODY, EOM))
    assert [type(e) for e in events if not e.needs_reply] == [ev.Header]


def test_macro_lists_only_when_setsymlist_offered_and_asked() -> None:
    lists = {MacroStage.EOM: "i {msg_id}"}
    assert negotiate(POSTFIX_OFFER, Wants(macros=lists)).reply.macros == lists
    no_offer = ev.OptionNegotiation(6, 0xFF, 0x1FFFFF)
    n = negotiate(no_offer, Wants(macros=lists))
    assert n.reply.macros == {} and not n.reply.actions & Action.SETSYMLIST
    n = negotiate(POSTFIX_OFFER, Wants(macros={}))
    assert n.reply.macros == {} and not n.reply.actions & Action.SETSYMLIST


def test_larger_data_size_is_negotiated_and_enforced() -> None:
    offer = ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF | int(Proto.MDS_256K))
    s = start(Wants(max_data_size=MDS_256K), offer)
    assert s.negotiated.protocol & Proto.MDS_256K and s.negotiated.max_payload == MDS_256K
    run(s, cmds(CONNECT, MAIL, RCPT))
    value = "v" * (MDS_256K - len("X-Big") - 2)
    events, _ = run(s, cmds(ev.Header("X-Big", value)))
    assert events == [ev.Header("X-Big", value)]
    s.receive_data(cmds(ev.Header("X-Big", value + "v")))
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    # Without the offer, the default limit stays.
    n = negotiate(POSTFIX_OFFER, Wants(max_data_size=MDS_256K))
    assert not n.protocol & (Proto.MDS_256K | Proto.MDS_1M) and n.max_payload == 65535


offers = st.builds(ev.OptionNegotiation, st.integers(2, 12), st.integers(0, 2**32 - 1),
                   st.integers(0, 2**32 - 1))
wants_strategy = st.builds(
    Wants,
    events=st.frozensets(st.sampled_from(sorted(EVENT_FLAGS))),
    no_reply=st.frozensets(st.sampled_from(sorted(EVENT_FLAGS))),
    actions=st.integers(0, 0x1FF).map(Action),
    macros=st.dictionaries(st.sampled_from(list(MacroStage)), st.sampled_from(["", "i", "j {daemon_name}"]),
                           max_size=3),
    max_data_size=st.sampled_from([65535, 262143, 1048575]),
)


@settings(max_examples=300, deadline=None)
@given(offers, wants_strategy)
def test_requested_bits_are_always_a_subset_of_the_offer(offer: ev.OptionNegotiation, wants: Wants) -> None:
    n = negotiate(offer, wants)
    reply = n.reply
    offered_actions = offer.actions or 0x0F
    offered_proto = offer.protocol or 0x3F
    assert reply.version == min(6, offer.version)
    assert reply.actions & ~offered_actions == 0
    assert reply.protocol & ~offered_proto == 0
    assert (reply.version, reply.actions, reply.protocol) == (n.version, int(n.actions), int(n.protocol))
    for name, (skip, nr) in EVENT_FLAGS.items():
        if name in wants.events:
            assert not reply.protocol & skip, name  # never suppress an event the filter handles
        if reply.protocol & nr:
            assert name in wants.no_reply and name in wants.events and offered_proto & nr
        elif name in wants.no_reply and name in wants.events:
            assert not offered_proto & nr
    assert not reply.protocol & (Proto.RCPT_REJ | Proto.HDR_LEADSPC)
    if reply.macros:
        assert offered_actions & Action.SETSYMLIST and reply.version >= 6 and reply.macros == wants.macros
        assert reply.actions & Action.SETSYMLIST
    else:
        assert not reply.actions & Action.SETSYMLIST
    assert n.max_payload == {0: 65535, int(Proto.MDS_256K): 262143, int(Proto.MDS_1M): 1048575}[
        reply.protocol & int(Proto.MDS_256K | Proto.MDS_1M)]


# ---------------------------------------------------------------- reply legality of send()


MODIFICATIONS = [
    (ev.AddHeader("X-A", "1"), Action.ADDHDRS),
    (ev.InsertHeader(0, "X-A", "1"), Action.ADDHDRS),
    (ev.ChangeHeader(1, "Subject", "new"), Action.CHGHDRS),
    (ev.AddRecipient("<n@x>"), Action.ADDRCPT),
    (ev.AddRecipient("<n@x>", "NOTIFY=NEVER"), Action.ADDRCPT_PAR),
    (ev.DeleteRecipient("<b@example.com>"), Action.DELRCPT),
    (ev.ChangeFrom("<s@x>"), Action.CHGFROM),
    (ev.ChangeFrom("<s@x>", "RET=HDRS"), Action.CHGFROM),
    (ev.ReplaceBody(b"new body\r\n"), Action.CHGBODY),
    (ev.Quarantine("suspicious"), Action.QUARANTINE),
]


@pytest.mark.parametrize("mod, flag", MODIFICATIONS, ids=[type(m).__name__ for m, _ in MODIFICATIONS])
def test_modification_needs_its_granted_action_flag(mod: ev.Reply, flag: Action) -> None:
    s = at_eom(Wants(actions=Action(0x1FF) & ~flag))
    with pytest.raises(LocalProtocolError):
        s.send(mod)
    assert replies(s.send(ev.Continue())) == [ev.Continue()]  # nothing was sent, EOM still answerable
    s = at_eom(Wants(actions=flag))
    assert replies(s.send(mod)) == [mod]
    assert type(s.pending) is ev.EndOfMessage  # a modification is not the final reply
    assert replies(s.send(ev.Accept())) == [ev.Accept()]


@pytest.mark.parametrize("mod, flag", MODIFICATIONS, ids=[type(m).__name__ for m, _ in MODIFICATIONS])
def test_modification_not_offered_by_the_mta_is_refused(mod: ev.Reply, flag: Action) -> None:
    s = at_eom(Wants(), ev.OptionNegotiation(6, 0x1FF & ~int(flag), 0x1FFFFF))
    with pytest.raises(LocalProtocolError):
        s.send(mod)


NOT_EOM_CASES = [
    ([], CONNECT), ([CONNECT], HELO), ([CONNECT], MAIL), ([CONNECT, MAIL], RCPT), ([CONNECT, MAIL, RCPT], DATA),
    ([CONNECT], ev.Unknown("X")), ([CONNECT, MAIL, RCPT], HEADER), ([CONNECT, MAIL, RCPT], EOH),
    ([CONNECT, MAIL, RCPT, EOH], BODY),
]


@pytest.mark.parametrize("prefix, at", NOT_EOM_CASES, ids=[type(a).__name__ for _, a in NOT_EOM_CASES])
def test_modifications_only_at_end_of_message(prefix: list[ev.Event], at: ev.Event) -> None:
    s = start()
    run(s, cmds(*prefix))
    s.receive_data(encode_command(at))
    assert s.next_event() == at
    for mod, _ in MODIFICATIONS:
        with pytest.raises(LocalProtocolError):
            s.send(mod)
    assert s.pending == at
    assert s.send(ev.Continue()) == b"\x00\x00\x00\x01c"


def test_modifications_then_final_reply_at_eom() -> None:
    s = at_eom()
    out = b"".join(s.send(m) for m, _ in MODIFICATIONS) + s.send(ev.Continue())
    assert replies(out) == [m for m, _ in MODIFICATIONS] + [ev.Continue()]
    assert s.pending is None
    with pytest.raises(LocalProtocolError):
        s.send(ev.AddHeader("X-Late", "1"))


def test_skip_only_for_a_body_chunk_with_skip_negotiated() -> None:
    s = in_message()
    step(s, EOH)
    s.receive_data(cmds(BODY))
    s.next_event()
    assert s.send(ev.Skip()) == b"\x00\x00\x00\x01s"
    # Not offered by the MTA:
    s = in_message(offer=ev.OptionNegotiation(6, 0x1FF, 0x1FFFFF & ~int(Proto.SKIP)))
    step(s, EOH)
    s.receive_data(cmds(BODY))
    s.next_event()
    with pytest.raises(LocalProtocolError):
        s.send(ev.Skip())
    # Not a body chunk:
    for prefix, at in [*NOT_EOM_CASES[:-1], ([CONNECT, MAIL, RCPT], EOM)]:
        s = start()
        run(s, cmds(*prefix))
        s.receive_data(encode_command(at))
        s.next_event()
        with pytest.raises(LocalProtocolError):
            s.send(ev.Skip())


def test_discard_refused_at_connect_and_helo_but_fine_in_a_message() -> None:
    s = start()
    s.receive_data(cmds(CONNECT))
    s.next_event()
    with pytest.raises(LocalProtocolError):
        s.send(ev.Discard())
    s.send(ev.Continue())
    s.receive_data(cmds(HELO))
    s.next_event()
    with pytest.raises(LocalProtocolError):
        s.send(ev.Discard())
    s.send(ev.Continue())
    for prefix, at in (([CONNECT], MAIL), ([CONNECT, MAIL], RCPT), ([CONNECT, MAIL, RCPT], EOM)):
        s2 = start()
        run(s2, cmds(*prefix))
        assert step(s2, at, ev.Discard()) == b"\x00\x00\x00\x01d"


def test_no_reply_when_nothing_is_pending() -> None:
    s = FilterSession()
    with pytest.raises(LocalProtocolError):
        s.send(ev.Continue())
    s = start()
    for reply in (ev.Continue(), ev.Accept(), ev.Reject(), ev.Tempfail(), ev.ReplyCode("550 x"), ev.AddHeader("a", "b")):
        with pytest.raises(LocalProtocolError):
            s.send(reply)
    step(s, CONNECT)
    with pytest.raises(LocalProtocolError):  # a second reply to the same event
        s.send(ev.Continue())
    run(s, cmds(MAIL, RCPT, ev.Abort()))
    with pytest.raises(LocalProtocolError):  # ABORT is never answered
        s.send(ev.Continue())


def test_the_option_negotiation_is_answered_by_accept_negotiation_only() -> None:
    s = FilterSession()
    s.receive_data(encode_command(POSTFIX_OFFER))
    assert s.next_event() == POSTFIX_OFFER
    reply = negotiate(POSTFIX_OFFER, Wants()).reply
    with pytest.raises(LocalProtocolError, match=r"^use accept_negotiation\(\) for the option negotiation reply$"):
        s.send(reply)
    with pytest.raises(LocalProtocolError, match="^option negotiation needs its own reply$"):
        s.send(ev.Continue())
    assert replies(s.accept_negotiation(negotiate(POSTFIX_OFFER, Wants()))) == [reply]


def test_next_event_refuses_to_move_on_while_a_reply_is_owed() -> None:
    s = start()
    s.receive_data(cmds(CONNECT, HELO))
    assert s.next_event() == CONNECT
    with pytest.raises(LocalProtocolError):
        s.next_event()
    s.send(ev.Continue())
    assert s.next_event() == HELO


def test_noreply_only_for_no_reply_events() -> None:
    s = start(Wants(no_reply=frozenset({"header"})))
    run(s, cmds(CONNECT, MAIL, RCPT))
    s.receive_data(cmds(HEADER, EOH))
    header = s.next_event()
    assert header == HEADER and not header.needs_reply and s.pending is None
    assert s.send(ev.NoReply()) == b""
    with pytest.raises(LocalProtocolError):
        s.send(ev.Continue())  # the MTA does not read a reply for it
    assert s.next_event() == EOH and s.pending == EOH
    with pytest.raises(LocalProtocolError):
        s.send(ev.NoReply())
    assert s.send(ev.Continue()) == b"\x00\x00\x00\x01c"


def test_progress_only_while_a_reply_is_awaited() -> None:
    s = at_eom()
    assert s.send(ev.Progress()) == b"\x00\x00\x00\x01p"
    assert s.send(ev.Progress()) == b"\x00\x00\x00\x01p"
    assert type(s.pending) is ev.EndOfMessage  # progress is not an answer
    s.send(ev.Continue())
    assert s.send(ev.Progress()) == b""  # nothing awaited: nothing goes out
    s = start(Wants(no_reply=frozenset({"header"})))
    run(s, cmds(CONNECT, MAIL, RCPT, HEADER))
    assert s.send(ev.Progress()) == b""


def test_progress_is_not_sent_while_the_mta_waits_for_the_negotiation_reply() -> None:
    """Postfix ("unexpected reply in initial handshake") and Sendmail accept only `O` here."""
    s = FilterSession()
    s.receive_data(encode_command(POSTFIX_OFFER))
    s.next_event()
    try:
        out = s.send(ev.Progress())
    except LocalProtocolError:
        out = b""
    assert out == b""
    assert replies(s.accept_negotiation(negotiate(POSTFIX_OFFER, Wants())))[0].version == 6


def test_negotiation_reply_goes_through_accept_negotiation_only() -> None:
    s = FilterSession()
    s.receive_data(encode_command(POSTFIX_OFFER))
    s.next_event()
    n = negotiate(POSTFIX_OFFER, Wants())
    for reply in (n.reply, ev.Continue(), ev.Reject(), ev.AddHeader("a", "b")):
        with pytest.raises(LocalProtocolError):
            s.send(reply)
    s.accept_negotiation(n)
    with pytest.raises(LocalProtocolError):
        s.accept_negotiation(n)


@pytest.mark.parametrize("reply", [ev.Shutdown(), ev.ConnFail()])
def test_replies_libmilter_never_produces_are_refused(reply: ev.Reply) -> None:
    s = in_message()
    s.receive_data(cmds(RCPT2))
    s.next_event()
    with pytest.raises(LocalProtocolError):
        s.send(reply)


@pytest.mark.parametrize("index", [-1, 2**32])
@pytest.mark.parametrize("kind", [ev.ChangeHeader, ev.InsertHeader])
def test_header_index_outside_u32_is_a_local_protocol_error(kind: type, index: int) -> None:
    """The core's only exceptions are ProtocolErrors; an index that does not fit the wire is refused."""
    s = at_eom()
    with pytest.raises(LocalProtocolError):
        s.send(kind(index, "Subject", "x"))
    assert s.send(ev.Continue()) == b"\x00\x00\x00\x01c"


def test_final_replies_encode_as_the_reference_says() -> None:
    for reply, code in ((ev.Continue(), b"c"), (ev.Accept(), b"a"), (ev.Reject(), b"r"), (ev.Tempfail(), b"t")):
        s = in_message()
        assert step(s, RCPT2, reply) == b"\x00\x00\x00\x01" + code
    s = in_message()
    assert step(s, RCPT2, ev.ReplyCode("550 5.1.1 nope")) == b"\x00\x00\x00\x10y550 5.1.1 nope\0"
