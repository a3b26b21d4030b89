"""The public Python API seen from the MTA's side of a real socket.

Every test starts a real :class:`pytclmilter.Milter` in a background thread
(``support.engine.serving``) and plays the MTA, either with the PyPI
``miltertest`` client or with the hand-written raw client ``RawMTA`` where
miltertest cannot go. Expected behaviour comes from
docs/protocol.md (cited by section, "docs/protocol.md §x").
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import re
import struct
import sys
import threading
import warnings
from typing import Any, Callable

import pytest
from hypothesis import given, settings, strategies as st
from miltertest import constants as K

from pytclmilter import (
    ACCEPT,
    CONTINUE,
    DISCARD,
    NOREPLY,
    Hooks,
    REJECT,
    SKIP,
    TEMPFAIL,
    MilterError,
    Status,
)
from pytclmilter.compiled import compiled_modules
from support.engine import (
    ALL_ACTIONS,
    ALL_NR,
    ALL_PROTO,
    CHUNK,
    F_ADDHDRS,
    F_SETSYMLIST,
    MilterThread,
    OFFERS,
    P_NOCONNECT,
    P_NOMAIL,
    P_NR_HDR,
    P_NR_MAIL,
    P_SKIP,
    SKIP_BITS,
    make_milter,
    serving,
    wait_for,
    z,
)

LOG = "pytclmilter"


def all_callbacks(m, calls: list, skip: tuple[str, ...] = ()) -> None:
    """Register a recording callback (answering continue) for every message event."""
    for event in ("connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh", "body", "eom", "abort", "close"):
        if event in skip:
            continue

        def cb(ctx, *args, _event=event):
            calls.append((_event,) + args)
            return CONTINUE

        m.register(event, cb)


# ====================================================================== negotiation (docs/protocol.md §4)


def test_negotiation_skips_events_without_callbacks():
    m = make_milter()
    m.register("envfrom", lambda ctx, args: CONTINUE)
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        version, actions, protocol, macros = mta.optneg(6, ALL_ACTIONS, ALL_PROTO)
    assert version == 6
    assert actions & ~ALL_ACTIONS == 0 and protocol & ~ALL_PROTO == 0, "must be a subset of the offer"
    for event, bit in SKIP_BITS.items():
        if event == "envfrom":
            assert not protocol & bit, "MAIL has a callback: must not be skipped"
        else:
            assert protocol & bit, f"no {event} callback: its skip bit must be requested"
    assert protocol & ALL_NR == 0, "no header callback: no no-reply bit"
    assert macros == {}


def test_nr_hdr_requested_only_with_a_header_callback_and_when_offered():
    m = make_milter()
    m.register("header", lambda ctx, name, value: CONTINUE)
    with serving(m) as srv:
        with srv.raw(negotiate=False) as mta:
            _, _, protocol, _ = mta.optneg(6, ALL_ACTIONS, ALL_PROTO)
            assert protocol & P_NR_HDR
            assert not protocol & SKIP_BITS["header"]
        with srv.raw(negotiate=False) as mta:
            _, _, protocol, _ = mta.optneg(6, ALL_ACTIONS, ALL_PROTO & ~P_NR_HDR)
            assert not protocol & P_NR_HDR, "NR_HDR not offered: must not be requested"


def test_headers_stream_without_replies_when_nr_hdr_negotiated():
    m = make_milter()
    seen = []
    m.register("header", lambda ctx, name, value: seen.append((name, value)))
    m.register("eoh", lambda ctx: CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.negotiated[2] & P_NR_HDR
        mta.send(b"L", z("Subject", "hi"))
        mta.send(b"L", z("X-Folded", "a\n\tb"))
        assert mta.command(b"N") == (b"c", b""), "the first frame after streamed headers is the EOH reply"
    assert seen == [("Subject", "hi"), ("X-Folded", "a\n\tb")]


def test_a_callback_registered_later_is_negotiated_by_the_next_connection():
    m = make_milter()
    m.register("envfrom", lambda ctx, args: CONTINUE)
    seen = []
    with serving(m) as srv:
        with srv.raw() as first:
            assert first.negotiated[2] & P_NOCONNECT
        m.register("connect", lambda ctx, host, info: seen.append((host, info)) or REJECT)
        with srv.raw() as second:
            assert not second.negotiated[2] & P_NOCONNECT
            assert second.connect("mx.example", b"4", 2525, "198.51.100.7") == (b"r", b"")
    assert seen == [("mx.example", {"family": "inet", "address": "198.51.100.7", "port": 2525})]


def test_registering_what_cannot_be_called_is_refused_at_once_not_at_every_message():
    """Bug: register("eom", CONTINUE) (a result where the function was meant) was accepted; every
    message then failed with "'Status' object is not callable" and was answered tempfail, and a
    reload that brought such a file went live instead of being refused."""
    m = make_milter()
    for wrong in (CONTINUE, "eom", 42):
        with pytest.raises(TypeError, match=f"register eom: {re.escape(repr(wrong))} is not callable"):
            m.register("eom", wrong)
    assert m.registry.registered() == {}


def test_an_async_negotiate_callback_is_refused_at_once_and_an_awaitable_logged_once(caplog):
    """Bug: an `async def` negotiate callback was taken (check listed it), then every connection
    logged "the negotiate callback must not be async" as an ERROR: a line per connection, for
    ever. Now register refuses it; a plain function that returns an awaitable there (which only
    a call can tell) is said once a minute, as a result that is no status is."""
    caplog.set_level(logging.INFO, logger=LOG)
    here = "test_an_async_negotiate_callback_is_refused_at_once_and_an_awaitable_logged_once"
    m = make_milter()

    async def neg(ctx, version, actions, protocol):
        return CONTINUE

    with pytest.raises(TypeError) as raised:
        m.register("negotiate", neg)
    assert str(raised.value) == ('register negotiate: "' + neg.__qualname__ + '" is async, and the option '
                                 "negotiation is answered at once: make it a plain function")
    m.register("negotiate", lambda ctx, version, actions, protocol: neg(ctx, version, actions, protocol))
    with serving(m) as srv:
        for _ in range(3):
            with srv.raw() as mta:
                assert mta.mail()[0] == b"c"
    lines = [r.getMessage() for r in caplog.records if "must not be async" in r.getMessage()]
    assert [line.replace(f"{here}.<locals>.", "") for line in lines] == [
        "conn#1: the negotiate callback <lambda> must not be async; treated as continue (said once "
                     "a minute for this callback)"], lines


def test_registering_for_an_event_that_does_not_exist_names_the_events():
    """A misspelt event (the decorator form too) is refused with the list to choose from, as
    Tcl's ``milter register`` refuses it, not with a KeyError from inside the registry."""
    from pytclmilter.callbacks import EVENTS

    m = make_milter()
    listed = ", ".join(EVENTS[:-1]) + ", or " + EVENTS[-1]
    for register in (lambda: m.register("envform", lambda ctx, args: CONTINUE), lambda: m.register("envform")):
        with pytest.raises(ValueError, match=f'^bad event "envform": must be {re.escape(listed)}$'):
            register()
    assert m.registry.registered() == {}


@pytest.mark.parametrize("version", [2, 3, 4, 5, 6])
def test_mtas_offering_versions_2_to_6_are_served(version):
    m = make_milter()
    calls: list = []
    all_callbacks(m, calls)
    offered_actions, offered_proto = OFFERS[version]
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        v, actions, protocol, _ = mta.optneg(version, offered_actions, offered_proto)
        assert v == version
        assert actions & ~offered_actions == 0
        assert protocol & ~offered_proto == 0
        mta.envelope()
        if version >= 4:
            assert mta.command(b"T") == (b"c", b"")
        mta.send(b"L", z("Subject", "v%d" % version))
        if not protocol & P_NR_HDR:
            assert mta.reply() == (b"c", b"")
        assert mta.eoh() == (b"c", b"")
        assert mta.body(b"hello\r\n") == (b"c", b"")
        assert mta.eom() == [(b"c", b"")]
        mta.quit()
        mta.expect_eof()
    names = [c[0] for c in calls]
    expected = ["connect", "helo", "envfrom", "envrcpt"] + (["data"] if version >= 4 else [])
    expected += ["header", "eoh", "body", "eom", "close"]
    assert names == expected


def test_zero_offers_mean_version_1_masks():
    m = make_milter()
    m.register("envfrom", lambda ctx, args: CONTINUE)
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        _, actions, protocol, _ = mta.optneg(6, 0, 0)
    assert actions & ~0x0F == 0  # docs/protocol.md §4.4 step 2
    assert protocol & ~0x3F == 0


def test_version_1_mta_is_refused_and_close_runs_once():
    m = make_milter()
    closed = []
    m.register("close", lambda ctx: closed.append(ctx.name))
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        mta.send(b"O", struct.pack("!III", 1, ALL_ACTIONS, ALL_PROTO))
        mta.expect_eof()
        wait_for(lambda: closed)
    assert len(closed) == 1


@pytest.mark.parametrize("version", [0, 1, 2**31, 2**32 - 1])
def test_a_version_libmilter_refuses_fails_before_the_negotiate_callback(caplog, version):
    """libmilter refuses a version below 2, and one of 2**31 and above, which it reads as a
    negative signed number, before it calls xxfi_negotiate (docs/protocol.md §4.4 step 1).
    Before, the negotiate callbacks ran for such an offer (and 2**31 and above was served as 6)."""
    caplog.set_level(logging.WARNING, logger=LOG)
    m = make_milter()
    calls: list[str] = []
    m.register("negotiate", lambda ctx, v, a, p: calls.append("negotiate") or CONTINUE)
    m.register("close", lambda ctx: calls.append("close"))
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        mta.send(b"O", struct.pack("!III", version, ALL_ACTIONS, ALL_PROTO))
        mta.expect_eof()
        wait_for(lambda: calls)
    assert calls == ["close"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"failed: MTA offers protocol version {version}; 2 to 2147483647 is needed"), warnings


def test_the_largest_version_libmilter_reads_is_answered_with_6():
    m = make_milter()
    offers: list[int] = []
    m.register("negotiate", lambda ctx, v, a, p: offers.append(v) or CONTINUE)
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        version, _, _, _ = mta.optneg(2**31 - 1, ALL_ACTIONS, ALL_PROTO)
    assert version == 6 and offers == [2**31 - 1]


@pytest.mark.parametrize("max_data_size, offer, shown", [
    (65535, (6, 0, 0), (6, 0x0F, 0x3F)),  # no flags: the version-1 masks, as negotiated
    (65535, (6, 0x1FF, 0x301FFFFF), (6, 0x1FF, 0x1FFFFF)),  # MDS bits offered, none used: neither
    (65535, (6, 0x1FF, 0xC04FFFFF), (6, 0x1FF, 0x804FFFFF)),  # SMFIP_TEST and an unknown bit kept
    (1048575, (6, 0x1FF, 0x301FFFFF), (6, 0x1FF, 0x201FFFFF)),  # the size that will be used: 1M
    (262143, (6, 0x1FF, 0x301FFFFF), (6, 0x1FF, 0x101FFFFF)),
])
def test_the_negotiate_callback_is_shown_the_offer_as_libmilter_shows_it(max_data_size, offer, shown):
    """The callback got the MTA's three numbers as sent: 0 for an offer of no flags, where
    libmilter's st_optionneg shows xxfi_negotiate the version-1 masks (0x0F, 0x3F) that both
    negotiate by, and its internal bits (0x70000000) whatever the MTA set there, where libmilter
    shows only the data-size bit of the size that will be used (none of a filter that asks for
    none). Not shown, as before: the no-reply bits libmilter adds (docs/protocol.md §4.4)."""
    m = make_milter(max_data_size=max_data_size)
    offers: list[tuple[int, int, int]] = []
    m.register("negotiate", lambda ctx, v, a, p: offers.append((v, a, p)) or CONTINUE)
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        mta.optneg(*offer)
    assert offers == [shown]


def test_setsymlist_in_negotiate_rides_in_the_optneg_reply():
    m = make_milter()

    def negotiate(ctx, version, actions, protocol):
        ctx.setsymlist("connect", "j  {daemon_name}")
        ctx.setsymlist(5, "{msg_id}")
        ctx.setsymlist("envfrom", ["i", "{mail_addr}"])  # a list too (a str was required: TypeError)
        return CONTINUE

    m.register("negotiate", negotiate)
    with serving(m) as srv:
        with srv.raw(negotiate=False) as mta:
            _, actions, _, macros = mta.optneg(6, ALL_ACTIONS, ALL_PROTO)
            assert actions & F_SETSYMLIST
            assert macros == {0: b"j {daemon_name}", 5: b"{msg_id}", 2: b"i {mail_addr}"}
        with srv.raw(negotiate=False) as mta:  # not offered: no list, no flag
            _, actions, _, macros = mta.optneg(6, ALL_ACTIONS & ~F_SETSYMLIST, ALL_PROTO)
            assert macros == {} and not actions & F_SETSYMLIST


def test_setsymlist_refuses_a_list_the_reply_could_not_carry_at_the_call(caplog):
    """A macro list goes out NUL-terminated in the OPTNEG reply, which must fit 65535 bytes
    (docs/protocol.md §1.2, §5.2). Before, setsymlist took a NUL and any length: with a NUL the
    reply could not be encoded, asyncio logged a "Fatal error on transport" traceback and the
    MTA saw the connection closed; 80 000 bytes of names went out as an 80 016-byte reply, over
    the protocol's limit (libmilter refuses to send it). Now both fail at the call, which the
    callback can catch."""
    caplog.set_level(logging.INFO, logger="pytclmilter")
    m = make_milter()
    refused: list[str] = []

    def negotiate(ctx, version, actions, protocol):
        for stage, names in (("connect", "j\0{daemon_name}"), ("helo", "x " * 40000)):
            try:
                ctx.setsymlist(stage, names)
            except MilterError as exc:
                refused.append(str(exc))
        ctx.setsymlist("envfrom", "i")
        return CONTINUE

    m.register("negotiate", negotiate)
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        _, actions, _, macros = mta.optneg(6, ALL_ACTIONS, ALL_PROTO)
        assert macros == {2: b"i"} and actions & F_SETSYMLIST
        assert mta.connect() == (b"c", b"")
    assert len(refused) == 2, refused
    assert "no NUL or other control characters" in refused[0]
    assert "option negotiation reply of 80016 bytes, more than the 65535" in refused[1]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ====================================================================== statuses (docs/protocol.md §8)


@pytest.mark.parametrize(
    "status, wire",
    [
        (CONTINUE, "c"),
        (REJECT, "r"),
        (DISCARD, "d"),
        (ACCEPT, "a"),
        (TEMPFAIL, "t"),
        ("SMFIS_REJECT", "r"),
        ("SMFIS_TEMPFAIL", "t"),
        ("accept", "a"),
        (None, "c"),
        (NOREPLY, "c"),  # the MTA waits for a reply: continue is sent, never a hang (docs/protocol.md §4.6)
        (SKIP, "c"),  # SKIP outside the body means nothing
    ],
)
def test_every_status_at_rcpt(status, wire):
    m = make_milter()
    m.register("envrcpt", lambda ctx, args: status)
    with serving(m) as srv:
        conn = srv.mt()
        # envrcpt is the only callback: C, H, M are skipped by negotiation, R follows the envelope
        reply = conn.send_get(K.SMFIC_RCPT, args=["<b@example.com>"])
        assert reply[0] == wire
        conn.sock.close()


def test_status_at_eom_via_miltertest():
    m = make_milter()
    answers = iter([ACCEPT, "SMFIS_DISCARD", TEMPFAIL, None, REJECT])
    m.register("envfrom", lambda ctx, args: CONTINUE)
    m.register("eom", lambda ctx: next(answers))
    with serving(m) as srv:
        conn = srv.mt()
        got = []
        for _ in range(5):
            conn.send(K.SMFIC_MAIL, args=["<a@example.org>"])
            got.append([r[0] for r in conn.send_eom()])
        assert got == [["a"], ["d"], ["t"], ["c"], ["r"]]


def test_every_message_is_filtered_when_mail_is_skipped():
    """A content filter (body + eom only) negotiates NOMAIL, so the MTA sends no M between messages
    (Sendmail sends no ABORT after EOM either, docs/protocol.md §7.5/§10.1): the second message of the session
    must still reach the callbacks, not be passed through because the first one got a verdict."""
    m = make_milter()
    bodies = []

    def body(ctx, chunk):
        bodies.append(chunk)
        return CONTINUE

    m.register("body", body)
    m.register("eom", lambda ctx: REJECT if b"spam" in bodies[-1] else CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.negotiated[2] & P_NOMAIL
        assert mta.body(b"spam\r\n") == (b"c", b"")
        assert mta.eom() == [(b"r", b"")]
        assert mta.body(b"more spam\r\n") == (b"c", b"")
        assert mta.eom() == [(b"r", b"")], "second message of the session was not filtered"
    assert bodies == [b"spam\r\n", b"more spam\r\n"]


def test_a_message_after_one_decided_before_its_end_is_filtered_without_mail_or_abort():
    """Sendmail's order for a content filter (no envfrom: NOMAIL; headers under NR_HDR): a header
    verdict answered at the body chunk ends the message for Sendmail, which sends no end of
    message and no ABORT for it (its filter never reached its "in message" state: that takes a
    reply to MAIL), only the next message's macros, `D M` first (docs/protocol.md §10.1). The
    next message's headers, body and end of message must reach the callbacks all the same."""
    m = make_milter()
    calls = []

    def header(ctx, name, value):
        calls.append(f"header {value}")
        return REJECT if value == "spam" else CONTINUE

    m.register("header", header)
    m.register("body", lambda ctx, chunk: calls.append("body") or CONTINUE)
    m.register("eom", lambda ctx: calls.append("eom") or ACCEPT)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.negotiated[2] & (P_NOMAIL | P_NR_HDR) == P_NOMAIL | P_NR_HDR
        for subject, answers in (("spam", [b"r"]), ("ham", [b"c", b"a"])):
            mta.macro("M", {"{mail_addr}": f"{subject}@example.org", "i": ""})
            mta.macro("R", {"{rcpt_addr}": "rcpt@example.com"})
            mta.send(b"L", z("Subject", subject))  # no reply: NR_HDR
            got = [mta.body(b"text\r\n")[0]]
            if got == [b"c"]:
                got += [r[0] for r in mta.eom()]
            assert got == answers, subject
    assert calls == ["header spam", "header ham", "body", "eom"]


def test_a_message_reset_without_abort_under_nr_mail_gets_its_abort_callbacks_first():
    """Sendmail's order under NR_MAIL (an abort callback, no envfrom: MAIL without a reply):
    its filter counts as in a message only after a reply to MAIL, so RSET sends it nothing and
    the next message begins with `D M`, `M` straight after the last RCPT. The abort callbacks of
    the reset message run before the next message's callbacks, which see only their own private
    data (docs/protocol.md §7.3, §10.1), as libmilter's out-of-order rule has it."""
    m = make_milter()
    calls = []

    def envrcpt(ctx, args):
        ctx.setpriv("rcpts", (ctx.getpriv("rcpts") if "rcpts" in ctx.getpriv() else []) + args[:1])
        calls.append(f"envrcpt {args[0]}")

    def abort(ctx):
        calls.append(f"abort {ctx.getpriv('rcpts')}")
        ctx.unsetpriv("rcpts")

    m.register("envrcpt", envrcpt)
    m.register("abort", abort)
    m.register("eom", lambda ctx: calls.append(f"eom {ctx.getpriv('rcpts')}") or CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.negotiated[2] & (P_NOMAIL | P_NR_MAIL) == P_NR_MAIL
        for rcpt in ("<reset@example.com>", "<kept@example.com>"):
            mta.macro("M", {"{mail_addr}": "a@example.org"})
            mta.send(b"M", z("<a@example.org>"))  # no reply
            assert mta.rcpt(rcpt) == (b"c", b"")
        assert mta.eom() == [(b"c", b"")]
    assert calls == ["envrcpt <reset@example.com>", "abort ['<reset@example.com>']",
                     "envrcpt <kept@example.com>", "eom ['<kept@example.com>']"]


def test_skip_in_body_sends_s_when_offered_and_stops_body_callbacks():
    m = make_milter()
    chunks = []

    def body(ctx, chunk):
        chunks.append(chunk)
        return SKIP

    m.register("body", body)
    m.register("eom", lambda ctx: CONTINUE)
    with serving(m) as srv:
        with srv.raw() as mta:
            assert mta.negotiated[2] & P_SKIP
            assert mta.body(b"one\r\n") == (b"s", b"")
            assert mta.eom() == [(b"c", b"")]
        chunks.clear()
        with srv.raw(protocol=ALL_PROTO & ~P_SKIP) as mta:  # an MTA that cannot skip
            assert not mta.negotiated[2] & P_SKIP
            assert mta.body(b"one\r\n") == (b"c", b"")
            assert mta.body(b"two\r\n") == (b"c", b"")
            assert mta.eom() == [(b"c", b"")]
    assert chunks == [b"one\r\n"], "after SKIP the body callback is not called again for that message"


def test_discard_at_connect_is_sent_as_continue():
    m = make_milter()
    m.register("connect", lambda ctx, host, info: DISCARD)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.connect() == (b"c", b"")  # docs/protocol.md §3: d only for message-level events


def test_chain_runs_in_registration_order_and_first_non_continue_answers():
    m = make_milter()
    order = []
    m.register("envrcpt", lambda ctx, args: order.append(1))
    m.register("envrcpt", lambda ctx, args: order.append(2) or "SMFIS_CONTINUE")

    @m.register("envrcpt")
    def third(ctx, args):
        order.append(3)
        return REJECT if args[0] == "<bad@example.com>" else CONTINUE

    m.register("envrcpt", lambda ctx, args: order.append(4) or TEMPFAIL)
    m.register("envrcpt", lambda ctx, args: order.append(5))
    with serving(m) as srv:
        conn = srv.mt()
        assert conn.send_get(K.SMFIC_RCPT, args=["<bad@example.com>"])[0] == "r"
        assert order == [1, 2, 3]
        order.clear()
        assert conn.send_get(K.SMFIC_RCPT, args=["<ok@example.com>"])[0] == "t"
        assert order == [1, 2, 3, 4]


def test_async_callbacks_are_awaited_in_chain_order():
    m = make_milter()
    order = []

    async def slow_continue(ctx, args):
        await asyncio.sleep(0.01)
        order.append("async1")
        return CONTINUE

    def sync(ctx, args):
        order.append("sync")

    async def slow_reject(ctx, args):
        await asyncio.sleep(0.01)
        order.append("async2")
        return "SMFIS_REJECT"

    for cb in (slow_continue, sync, slow_reject, sync):
        m.register("envrcpt", cb)
    with serving(m) as srv:
        conn = srv.mt()
        assert conn.send_get(K.SMFIC_RCPT, args=["<b@example.com>"])[0] == "r"
    assert order == ["async1", "sync", "async2"]


def test_a_slow_async_callback_does_not_stall_another_connection():
    m = make_milter()
    gate = threading.Event()
    entered = threading.Event()

    async def envrcpt(ctx, args):
        if args[0] == "<slow@example.com>":
            entered.set()
            for _ in range(500):  # bounded: at most 5 s
                if gate.is_set():
                    break
                await asyncio.sleep(0.01)
            return REJECT
        return ACCEPT

    m.register("envrcpt", envrcpt)
    with serving(m) as srv, srv.raw() as slow, srv.raw() as fast:
        slow.send(b"R", z("<slow@example.com>"))
        assert entered.wait(5)
        assert fast.rcpt("<fast@example.com>") == (b"a", b"")  # answered while the other one waits
        assert fast.rcpt("<fast2@example.com>") == (b"a", b"")
        gate.set()
        assert slow.reply() == (b"r", b"")


def test_header_verdict_is_deferred_to_the_next_reply_with_nr_hdr():
    m = make_milter()
    seen = []

    def header(ctx, name, value):
        seen.append(name)
        return REJECT if name == "X-Spam" else CONTINUE

    m.register("header", header)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.negotiated[2] & P_NR_HDR
        mta.send(b"L", z("Subject", "hi"))
        mta.send(b"L", z("X-Spam", "yes"))
        mta.send(b"L", z("X-After", "1"))
        # no EOH callback (NOEOH), no body callback (NOBODY): EOM carries the verdict
        assert mta.eom() == [(b"r", b"")]
    assert seen == ["Subject", "X-Spam"], "no header callback after the deciding one"


def test_async_header_callback_with_nr_hdr_defers_its_verdict():
    m = make_milter()
    seen = []

    async def header(ctx, name, value):
        await asyncio.sleep(0.01)
        seen.append(name)
        return "SMFIS_TEMPFAIL" if name == "X-Bad" else None

    m.register("header", header)
    m.register("eoh", lambda ctx: seen.append("eoh") or CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        for name in ("A", "X-Bad", "B"):
            mta.send(b"L", z(name, "v"))
        assert mta.command(b"N") == (b"t", b"")
    assert seen == ["A", "X-Bad"], "neither later headers nor eoh are called after the verdict"


# ====================================================================== replies (docs/protocol.md §6.5)


def test_setreply_is_sent_only_with_a_matching_verdict_and_kept_until_then():
    m = make_milter()
    rcpt_answers = iter([TEMPFAIL, REJECT, REJECT])

    def envfrom(ctx, args):
        ctx.setreply("550", "5.7.1", "Go away")
        return CONTINUE

    m.register("envfrom", envfrom)
    m.register("envrcpt", lambda ctx, args: next(rcpt_answers))
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail() == (b"c", b"")  # stored text is not sent with continue
        assert mta.rcpt() == (b"t", b"")  # 5xx text does not go with tempfail
        assert mta.rcpt() == (b"y", z("550 5.7.1 Go away"))
        assert mta.rcpt() == (b"r", b""), "the text is used once"


def test_setreply_survives_abort_and_a_new_message():
    m = make_milter()
    answers = iter([CONTINUE, REJECT])

    def envfrom(ctx, args):
        if args[0] == "<first@example.org>":
            ctx.setreply("451", "4.7.1", "Later")
        return CONTINUE

    m.register("envfrom", envfrom)
    m.register("envrcpt", lambda ctx, args: next(answers) if args[0] != "<t@example.com>" else TEMPFAIL)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail("<first@example.org>") == (b"c", b"")
        assert mta.rcpt() == (b"c", b"")
        mta.abort()
        assert mta.mail("<second@example.org>") == (b"c", b"")
        assert mta.rcpt() == (b"r", b""), "4xx text is not used for a reject, and kept"
        assert mta.rcpt("<t@example.com>") == (b"y", z("451 4.7.1 Later"))


@pytest.mark.parametrize(
    "args, text",
    [
        (("550", "5.7.1", "No such user"), "550 5.7.1 No such user"),
        (("550", None, "No such user"), "550 No such user"),
        (("550", "5.7.1", None), "550 5.7.1"),
        (("550",), "550 "),
        (("421", "4.3.2", "Shutting down"), "421 4.3.2 Shutting down"),
    ],
)
def test_setreply_text_forms(args, text):
    m = make_milter()

    def envrcpt(ctx, rcpt):
        ctx.setreply(*args)
        return REJECT if args[0][0] == "5" else TEMPFAIL

    m.register("envrcpt", envrcpt)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.rcpt() == (b"y", z(text))


def test_setmlreply_multi_line():
    m = make_milter()
    def envfrom(ctx, args):
        if args[0] == "<t@example.org>":
            ctx.setmlreply("452", None, "only")
            return TEMPFAIL
        return CONTINUE

    m.register("envfrom", envfrom)
    m.register("envrcpt", lambda ctx, args: ctx.setmlreply("550", "5.7.1", "first", "second", "third") or REJECT)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail("<t@example.org>") == (b"y", z("452 4.0.0 only")), "no xcode: 4.0.0"
        assert mta.mail("<a@example.org>") == (b"c", b"")
        assert mta.rcpt() == (b"y", z("550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third"))


@pytest.mark.parametrize(
    "call",
    [
        lambda ctx: ctx.setreply("250", None, "ok"),
        lambda ctx: ctx.setreply("55", None, "short"),
        lambda ctx: ctx.setreply("5500", None, "long"),
        lambda ctx: ctx.setreply("550", "5.7", "bad xcode"),
        lambda ctx: ctx.setreply("550", "5.7.1 x", "bad xcode"),
        lambda ctx: ctx.setreply("550", "5.7.1", "line\r\nbreak"),
        lambda ctx: ctx.setreply("550", "5.7.1", "bare\nLF"),
        lambda ctx: ctx.setreply("550", "5.7.1", "an \x1b[2J escape"),
        lambda ctx: ctx.setreply("550", "5.7.1", "x" * 981),
        lambda ctx: ctx.setmlreply("550", "5.7.1", *["l"] * 33),
        lambda ctx: ctx.setmlreply("550", "5.7.1"),
        lambda ctx: ctx.setmlreply("550", "5.7.1", "ok", "bad\rline"),
        lambda ctx: ctx.setmlreply("650", None, "ok"),
    ],
    ids=["rcode-2xx", "rcode-short", "rcode-long", "xcode-short", "xcode-trailing", "crlf", "lf", "esc", "too-long",
         "33-lines", "no-lines", "ml-cr", "ml-rcode"],
)
def test_reply_validation_errors_are_raised_in_the_callback(call):
    m = make_milter()
    errors = []

    def envrcpt(ctx, args):
        try:
            call(ctx)
        except MilterError as exc:
            errors.append(str(exc))
        return REJECT

    m.register("envrcpt", envrcpt)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.rcpt() == (b"r", b""), "a refused text is not stored"
    assert len(errors) == 1 and errors[0]


MODIFICATIONS = {
    "addheader": lambda ctx: ctx.addheader("X-A", "1"),
    "chgheader": lambda ctx: ctx.chgheader("X-A", "1", 1),
    "insheader": lambda ctx: ctx.insheader("X-A", "1", 0),
    "addrcpt": lambda ctx: ctx.addrcpt("<c@example.com>"),
    "delrcpt": lambda ctx: ctx.delrcpt("<b@example.com>"),
    "chgfrom": lambda ctx: ctx.chgfrom("<x@example.org>"),
    "replacebody": lambda ctx: ctx.replacebody(b"new\r\n"),
    "quarantine": lambda ctx: ctx.quarantine("suspicious"),
}


@pytest.mark.parametrize("name", sorted(MODIFICATIONS))
def test_modifications_outside_eom_raise_a_clear_error(name):
    """The error says where the call was made: in another callback, or in none (a context kept
    past its callbacks, called from a thread or a task of the filter's own)."""
    m = make_milter()
    errors, kept = [], []

    def envrcpt(ctx, args):
        kept.append(ctx)
        try:
            MODIFICATIONS[name](ctx)
        except MilterError as exc:
            errors.append(str(exc))
        return CONTINUE

    m.register("envrcpt", envrcpt)
    m.register("eom", lambda ctx: CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.rcpt() == (b"c", b"")
        assert mta.eom() == [(b"c", b"")], "nothing collected outside eom is sent later"
    assert errors == [f"{name} is allowed only in the eom callback (called in envrcpt)"]
    with pytest.raises(MilterError, match=rf"^{name} is allowed only in the eom callback \(called in no callback\)$"):
        MODIFICATIONS[name](kept[0])


# ====================================================================== end of message actions (docs/protocol.md §3, §6)


def test_all_eom_actions_arrive_before_the_final_reply_in_one_write():
    m = make_milter()

    def eom(ctx):
        ctx.addheader("X-Added", "yes")
        ctx.insheader("X-Inserted", "first", 0)
        ctx.chgheader("Subject", "changed", 2)
        ctx.addrcpt("<plain@example.com>")
        ctx.addrcpt("<par@example.com>", "NOTIFY=NEVER")
        ctx.delrcpt("<b@example.com>")
        ctx.chgfrom("<new@example.org>", "RET=HDRS")
        ctx.replacebody(b"new body\r\n")
        ctx.quarantine("held for review")
        return CONTINUE

    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.negotiated[1] & 0xFF == 0xFF, "every action offered is granted"
        mta.send(b"E")
        frames = mta.burst()
        if frames[-1][0] != b"c":  # not everything in one segment: still all must arrive, in order
            frames += mta.until_final()
        assert frames[-1] == (b"c", b""), "the final reply comes last"
    by_code = {code: payload for code, payload in frames[:-1]}
    assert sorted(by_code) == sorted([b"h", b"i", b"m", b"+", b"2", b"-", b"e", b"b", b"q"])
    assert len(frames) == 10
    assert by_code[b"h"] == z("X-Added", "yes")
    assert by_code[b"i"] == struct.pack("!I", 0) + z("X-Inserted", "first")
    assert by_code[b"m"] == struct.pack("!I", 2) + z("Subject", "changed")
    assert by_code[b"+"] == z("<plain@example.com>")
    assert by_code[b"2"] == z("<par@example.com>", "NOTIFY=NEVER")
    assert by_code[b"-"] == z("<b@example.com>")
    assert by_code[b"e"] == z("<new@example.org>", "RET=HDRS")
    assert by_code[b"b"] == b"new body\r\n"
    assert by_code[b"q"] == z("held for review")
    # add/ins/chg come in call order
    codes = [c for c, _ in frames]
    assert codes.index(b"h") < codes.index(b"i") < codes.index(b"m")


def test_eom_actions_in_one_recv():
    """The modifications and the final reply are written together (one write on the socket)."""
    m = make_milter()

    def eom(ctx):
        ctx.addheader("X-A", "1")
        ctx.addheader("X-B", "2")
        ctx.chgfrom("<n@example.org>")
        return ACCEPT

    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        mta.send(b"E")
        frames = mta.burst()
    assert [c for c, _ in frames] == [b"h", b"h", b"e", b"a"]
    assert frames[2] == (b"e", z("<n@example.org>"))


def test_chgheader_with_empty_value_deletes():
    m = make_milter()
    m.register("eom", lambda ctx: ctx.chgheader("X-Old", "", 1) or CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.eom() == [(b"m", struct.pack("!I", 1) + z("X-Old", "")), (b"c", b"")]


def test_chgheader_and_insheader_without_an_index_use_the_documented_defaults():
    """docs/python-api.md: chgheader(name, value, index=1), insheader(name, value, index=0): the
    first header of that name, and the top of the header section, as the MTA is told."""
    m = make_milter()
    m.register("eom", lambda ctx: ctx.chgheader("Subject", "new") or ctx.insheader("X-Top", "1") or CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.eom() == [(b"m", struct.pack("!I", 1) + z("Subject", "new")),
                             (b"i", struct.pack("!I", 0) + z("X-Top", "1")), (b"c", b"")]


def test_actions_are_dropped_when_eom_rejects():
    m = make_milter()

    def eom(ctx):
        ctx.addheader("X-A", "1")
        ctx.replacebody(b"x")
        return REJECT

    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.eom() == [(b"r", b"")]


def test_action_not_granted_by_the_mta_gives_tempfail_and_nothing_else(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()

    def eom(ctx):
        ctx.addheader("X-A", "1")
        ctx.chgheader("Subject", "x")
        return CONTINUE

    m.register("eom", eom)
    with serving(m) as srv, srv.raw(actions=F_ADDHDRS) as mta:
        assert mta.negotiated[1] == F_ADDHDRS
        assert mta.eom() == [(b"t", b"")], "no half-applied modifications"
    assert any(r.levelno >= logging.ERROR and "CHGHDRS" in r.getMessage() for r in caplog.records)


def test_replacebody_larger_than_a_chunk_is_split_and_reassembles_exactly():
    m = make_milter()
    new_body = os.urandom(200_000)

    def eom(ctx):
        ctx.replacebody(new_body[:150_000])
        ctx.replacebody(new_body[150_000:])  # calls add up, as in libmilter
        return CONTINUE

    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        frames = mta.eom()
    assert frames[-1] == (b"c", b"")
    parts = frames[:-1]
    assert all(code == b"b" for code, _ in parts)
    assert all(0 < len(p) <= CHUNK for _, p in parts)
    assert len(parts) == 4  # ceil(200000 / 65535)
    assert b"".join(p for _, p in parts) == new_body


def test_replacebody_of_a_number_or_a_list_is_a_type_error_not_a_body_of_nuls(caplog):
    """Bug: bytes(5) is five NULs: ctx.replacebody(5) replaced the body with them, and
    replacebody(True) with one, where the docs promise a TypeError at the call."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()
    refused = []

    def eom(ctx):
        for wrong in (5, True, [104, 105]):
            try:
                ctx.replacebody(wrong)
            except TypeError as exc:
                refused.append(str(exc))
        ctx.replacebody(bytearray(b"kept"))
        ctx.replacebody(5)  # uncaught: the callback fails

    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.eom() == [(b"t", b"")]  # no body packet: the failed callback's changes are dropped
    assert refused == [f"replacebody: bytes or str expected; got {t}" for t in ("int", "bool", "list")]
    assert any("failed (replacebody: bytes or str expected; got int)" in r.getMessage() for r in caplog.records)


def test_a_header_index_that_is_no_int_is_a_type_error_at_the_call_not_a_tempfail_at_eom():
    """Bug: a float index passed the range check, and at end of message the packet could not be
    made: the whole message was answered tempfail, whatever the callback did about it."""
    m = make_milter()
    refused = []

    def eom(ctx):
        ctx.addheader("X-Kept", "yes")
        for call in (lambda: ctx.chgheader("Subject", "x", 1.5), lambda: ctx.insheader("X-A", "x", 2.0)):
            try:
                call()
            except TypeError as exc:
                refused.append(str(exc))

    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.eom() == [(b"h", z("X-Kept", "yes")), (b"c", b"")]
    # (the compiled build refuses it at the call too, in mypyc's words: "int object expected; got float")
    assert len(refused) == 2 and all(r.endswith("expected; got float") for r in refused), refused


def type_errors_at_envfrom(*calls: Callable[[Any], object]) -> tuple[Any, list[str]]:
    """Make each call with an envfrom callback's context, which then rejects: the MTA's answer,
    and the TypeErrors' messages."""
    m = make_milter()
    refused = []

    def envfrom(ctx, args):
        for call in calls:
            try:
                call(ctx)
            except TypeError as exc:
                refused.append(str(exc))
        return REJECT

    m.register("envfrom", envfrom)
    with serving(m) as srv, srv.raw() as mta:
        return mta.mail("<a@example.org>"), refused


def test_a_private_data_name_that_is_no_str_is_a_type_error_in_either_build():
    """The pure-Python source failed deep inside with AttributeError ('int' object has no
    attribute 'isascii') where the docs promise a TypeError at the call, as the compiled build gives."""
    _, refused = type_errors_at_envfrom(lambda ctx: ctx.setpriv(1, "x"), lambda ctx: ctx.getpriv(1),
                                        lambda ctx: ctx.unsetpriv(5))
    assert len(refused) == 3 and all(r.endswith("expected; got int") for r in refused), refused


def test_a_reply_text_or_code_that_is_no_str_is_a_type_error_in_either_build():
    """The pure-Python source failed deep inside setmlreply and setreply with AttributeError
    ('int' object has no attribute 'isascii') for a line that was no str, where the docs promise
    a TypeError at the call, as the compiled build gives; and the reply is left unset."""
    answer, refused = type_errors_at_envfrom(
        lambda ctx: ctx.setmlreply("550", "5.7.1", "first", 2), lambda ctx: ctx.setmlreply("550", None, b"x"),
        lambda ctx: ctx.setmlreply(550, None, "x"), lambda ctx: ctx.setmlreply("550", 571, "x"),
        lambda ctx: ctx.setreply("550", "5.7.1", 3), lambda ctx: ctx.setreply("550", None, b"x"))
    assert answer == (b"r", b""), answer  # no reply text was set (before: the callback failed, tempfail)
    assert len(refused) == 6 and all(re.search(r"expected; got (int|bytes)$", r) for r in refused), refused


def _refused_as(ours: str, mypyc: str) -> str:
    """A TypeError's message at a Context call: ours from the pure-Python source; the compiled
    build checks an annotated argument before the method runs, in mypyc's words."""
    return mypyc if "pytclmilter.context" in compiled_modules() else ours


WRONG_TYPES: list[tuple[Callable[[Any], object], str, str]] = [
    (lambda ctx: ctx.addheader(1, "v"), "addheader: str expected; got int", "str object expected; got int"),
    (lambda ctx: ctx.addheader("X-A", b"v"), "addheader: str expected; got bytes", "str object expected; got bytes"),
    (lambda ctx: ctx.chgheader("Subject", 5), "chgheader: str expected; got int", "str object expected; got int"),
    (lambda ctx: ctx.insheader(None, "v"), "insheader: str expected; got NoneType",
     "str object expected; got None"),
    (lambda ctx: ctx.addrcpt(b"<b@example.org>"), "addrcpt: str expected; got bytes",
     "str object expected; got bytes"),
    (lambda ctx: ctx.addrcpt("<b@example.org>", 5), "addrcpt: str expected; got int",
     "str or None object expected; got int"),
    (lambda ctx: ctx.delrcpt(1), "delrcpt: str expected; got int", "str object expected; got int"),
    (lambda ctx: ctx.chgfrom("<a@example.org>", b"X=1"), "chgfrom: str expected; got bytes",
     "str or None object expected; got bytes"),
    (lambda ctx: ctx.quarantine(7), "quarantine: str expected; got int", "str object expected; got int"),
    (lambda ctx: ctx.getsymval(1), "getsymval: str expected; got int", "str object expected; got int"),
    (lambda ctx: ctx.setsymlist(1.5, "i"), "setsymlist: int or str expected; got float",
     "union[int, str] object expected; got float"),
    (lambda ctx: ctx.setsymlist("eom", 1), "setsymlist: str or a list of str expected; got int",
     "setsymlist: str or a list of str expected; got int"),
    (lambda ctx: ctx.setsymlist("eom", ["i", 2]), "setsymlist: str expected; got int",
     "setsymlist: str expected; got int"),
]


def test_a_context_method_given_the_wrong_type_says_which_and_what_it_takes(caplog):
    """The pure-Python source refused a wrong type deep inside, in words that named neither the
    method nor the argument (addheader(1, ...): "expected string or bytes-like object, got
    'int'", a bytes value: "descriptor 'isprintable' for 'str' objects doesn't apply to a
    'bytes' object", getsymval(1): "object of type 'int' has no len()"), or took it
    (setsymlist(1.5) as stage 1, a list of ints as names). Now "addheader: str expected; got
    int", as setreply says, before anything is done; the message keeps only what was right."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()
    refused = []

    def eom(ctx):
        for call, _, _ in WRONG_TYPES:
            try:
                call(ctx)
            except TypeError as exc:
                refused.append(str(exc))
        ctx.addheader("X-Kept", "yes")
        ctx.addheader(b"X-Bad", "v")  # uncaught: the callback fails, its changes dropped

    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.eom() == [(b"t", b"")]
    assert refused == [_refused_as(ours, mypyc) for _, ours, mypyc in WRONG_TYPES]
    failed = _refused_as("addheader: str expected; got bytes", "str object expected; got bytes")
    assert any(f"failed ({failed})" in r.getMessage() for r in caplog.records), caplog.records


def test_eight_bit_body_bytes_reach_the_callback_and_come_back_byte_exact():
    m = make_milter()
    chunks_in = [
        b"\x00\x01\xff\xfe binary\r\n",
        b"latin-1 caf\xe9 and invalid utf-8 \xc3\x28 \xed\xa0\x80\r\n",
        bytes(range(256)) * 300,  # larger than a chunk would be if sent whole: 76800 bytes, sent in two
        b"\xf0\x9f\x93\xa7 utf-8 emoji\r\n\x00",
    ]
    received = []

    def body(ctx, chunk):
        received.append(chunk)
        return CONTINUE

    def eom(ctx):
        ctx.replacebody(b"".join(received))
        return CONTINUE

    m.register("body", body)
    m.register("eom", eom)
    sent = []
    with serving(m) as srv, srv.raw() as mta:
        for chunk in chunks_in:
            for i in range(0, len(chunk), CHUNK):
                piece = chunk[i : i + CHUNK]
                sent.append(piece)
                assert mta.body(piece) == (b"c", b"")
        frames = mta.eom()
    assert all(isinstance(c, bytes) for c in received)
    assert received == sent
    assert frames[-1] == (b"c", b"")
    assert b"".join(p for code, p in frames[:-1] if code == b"b") == b"".join(chunks_in)


def test_eom_carrying_data_is_given_to_the_body_callback_with_one_reply():
    m = make_milter()
    received = []
    m.register("body", lambda ctx, chunk: received.append(chunk) or REJECT)
    m.register("eom", lambda ctx: CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        mta.send(b"E", b"tail \xff\r\n")
        assert mta.until_final() == [(b"r", b"")]
        assert mta.is_open(0.1)  # and no second reply follows
        assert mta.buf == b""
    assert received == [b"tail \xff\r\n"]


def test_quarantine_then_final_reply():
    m = make_milter()
    m.register("eom", lambda ctx: ctx.quarantine("virus found") or DISCARD)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.eom() == [(b"q", z("virus found")), (b"d", b"")]


# ====================================================================== macros (docs/protocol.md §5)


def test_getsymval_with_libmilter_semantics():
    m = make_milter()
    seen = {}

    def look(ctx, stage, *names):
        seen[stage] = {n: ctx.getsymval(n) for n in names}

    names = ("j", "{j}", "daemon_name", "{daemon_name}", "i", "{i}", "{mail_addr}", "{rcpt_addr}", "{x}", "x")
    m.register("connect", lambda ctx, host, info: look(ctx, "connect", *names))
    m.register("envfrom", lambda ctx, args: look(ctx, "envfrom:" + args[0], *names))
    m.register("envrcpt", lambda ctx, args: look(ctx, "envrcpt:" + args[0], *names))
    m.register("eom", lambda ctx: look(ctx, "eom", *names))
    with serving(m) as srv, srv.raw() as mta:
        mta.macro("C", {"j": "mx.example", "{daemon_name}": "smtpd", "{x}": "braced"})
        assert mta.connect()[0] == b"c"
        mta.macro("M", {"{i}": "QID1", "{mail_addr}": "a@example.org"})
        assert mta.mail("<a@example.org>")[0] == b"c"
        mta.macro("R", {"{rcpt_addr}": "b@example.com"})
        assert mta.rcpt("<b@example.com>")[0] == b"c"
        mta.macro("R", {})  # an empty D keeps the previous recipient's values
        mta.macro("L", {"i": "ignored"})  # stages libmilter does not store: ignored, never answered
        assert mta.rcpt("<c@example.com>")[0] == b"c"
        mta.macro("E", {"i": "QID1-eom"})
        assert mta.eom() == [(b"c", b"")]
        mta.abort()  # ABORT clears nothing
        mta.macro("M", {"{mail_addr}": "second@example.org"})  # replaces the M slot wholesale
        assert mta.mail("<second@example.org>")[0] == b"c"
    c = seen["connect"]
    assert c["j"] == c["{j}"] == "mx.example"
    assert c["daemon_name"] is None, "long names match only exactly"
    assert c["{daemon_name}"] == "smtpd"
    assert c["x"] == c["{x}"] == "braced"
    assert c["{i}"] is None
    f = seen["envfrom:<a@example.org>"]
    assert f["i"] == f["{i}"] == "QID1" and f["{mail_addr}"] == "a@example.org" and f["j"] == "mx.example"
    assert seen["envrcpt:<b@example.com>"]["{rcpt_addr}"] == "b@example.com"
    assert seen["envrcpt:<c@example.com>"]["{rcpt_addr}"] == "b@example.com"
    e = seen["eom"]
    assert e["i"] == "QID1-eom", "the latest stage wins"
    assert e["{rcpt_addr}"] == "b@example.com" and e["{mail_addr}"] == "a@example.org"
    s = seen["envfrom:<second@example.org>"]
    assert s["{mail_addr}"] == "second@example.org"
    assert s["{i}"] is None, "the new M packet replaced the whole slot"
    assert s["{rcpt_addr}"] is None, "MAIL clears the later slots"
    assert s["j"] == "mx.example", "connection macros persist"


def test_macros_sent_before_option_negotiation_are_dropped_by_it():
    """libmilter's OPTNEG clears every macro slot (docs/protocol.md §5.3); before, macros a peer
    sent ahead of it stayed visible to the session's callbacks."""
    m = make_milter()
    seen: list[str | None] = []
    m.register("connect", lambda ctx, host, info: seen.append(ctx.getsymval("j")))
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        mta.macro("C", {"j": "early.example"})
        mta.optneg()
        assert mta.connect()[0] == b"c"  # (no macros of its own: none sent, or none with a value)
    assert seen == [None]


# ====================================================================== private data


def test_private_data_is_per_connection():
    m = make_milter()
    seen = {}

    def envfrom(ctx, args):
        ctx.setpriv("sender", args[0])
        ctx.setpriv("count", ctx.getpriv("count", 0) + 1)
        ctx.setpriv("tmp.a", 1)
        ctx.setpriv("tmp.b", 2)
        return CONTINUE

    def eom(ctx):
        ctx.unsetpriv("tmp.*")
        seen[ctx.getpriv("sender")] = ctx.getpriv()
        return CONTINUE

    m.register("envfrom", envfrom)
    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as one, srv.raw() as two:
        assert one.mail("<one@example.org>")[0] == b"c"
        assert two.mail("<two@example.org>")[0] == b"c"
        assert one.eom() == [(b"c", b"")]
        assert two.eom() == [(b"c", b"")]
        assert two.mail("<two@example.org>")[0] == b"c"  # second message: data persists
        assert two.eom() == [(b"c", b"")]
    assert seen["<one@example.org>"] == {"sender": "<one@example.org>", "count": 1}
    assert seen["<two@example.org>"] == {"sender": "<two@example.org>", "count": 2}


PRIV_NAMES = ["tmp.a", "abc", "a*", "bx", "yx", "x]a", "end\\", "[x]", "^", "a", "a[", "-", "]", "a-b"]


def tcls_string_match(pattern: str, names: list[str]) -> list[str]:
    """The names Tcl's own ``string match`` matches (an interpreter made and freed here)."""
    from tkinter import Tcl

    tcl = Tcl()
    return [n for n in names if tcl.getboolean(tcl.call("string", "match", pattern, n))]


@pytest.mark.parametrize("pattern", ["tmp.*", "[ab]*", "x][ab]", "[a-c]x", "[z-x]x", "\\[x]", "a\\*", "[^a]",
                                     "end\\", "[]a]", "[]", "[ab", "*[", "a[-]*", "[a-]*", "*-*", "?"])
def test_unsetpriv_removes_the_names_tcls_string_match_matches(pattern):
    """docs/tcl-reference.md: unsetpriv's pattern follows ``string match``, which the script's
    own half of the data is matched with. A class that opens with ``]`` (matching nothing in Tcl)
    was a Python re.error at the call, and a trailing backslash matched itself where Tcl
    matches nothing."""
    gone = tcls_string_match(pattern, PRIV_NAMES)
    m = make_milter()
    left = []

    def envfrom(ctx, args):
        for name in PRIV_NAMES:
            ctx.setpriv(name, 1)
        ctx.unsetpriv(pattern)
        left.append(sorted(ctx.getpriv()))
        return CONTINUE

    m.register("envfrom", envfrom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail()[0] == b"c"
    assert left == [sorted(set(PRIV_NAMES) - set(gone))]


@settings(max_examples=300, deadline=None)
@given(st.text("ab*?[]-\\^", max_size=8), st.lists(st.text("ab[]-\\^*?", max_size=5), max_size=6))
def test_unsetpriv_patterns_match_as_in_tcl_whatever_they_are(pattern, names):
    from pytclmilter.tclmatch import unset_matching

    priv = dict.fromkeys(names, 1)
    unset_matching(priv, pattern)
    assert sorted(priv) == sorted(set(names) - set(tcls_string_match(pattern, names)))


def test_a_context_shows_its_connection_and_stage():
    """What a filter's own log line or a traceback shows of a context (repr)."""
    m = make_milter()
    kept = []
    m.register("envfrom", lambda ctx, args: kept.append(ctx) or kept.append(repr(ctx)) or CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail()[0] == b"c"
    assert kept[1:] == ["<Context conn#1 stage=envfrom>"]
    assert repr(kept[0]) == "<Context conn#1 stage=->"


def test_getpriv_missing_raises_keyerror_without_default():
    m = make_milter()
    out = []

    def envfrom(ctx, args):
        with pytest.raises(KeyError):
            ctx.getpriv("absent")
        out.append(ctx.getpriv("absent", "dflt"))
        return CONTINUE

    m.register("envfrom", envfrom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail()[0] == b"c"
    assert out == ["dflt"]


def test_private_data_calls_return_and_copy_as_documented():
    """python-api.md: setpriv returns the value and setpriv(name) reads it; getpriv() is a copy
    of all (changing it changes nothing); unsetpriv() without a pattern removes all."""
    m = make_milter()
    out = []

    def envfrom(ctx, args):
        out.append(ctx.setpriv("a", [1]))
        out.append(ctx.setpriv("a"))
        ctx.setpriv("b", 2)
        copy = ctx.getpriv()
        copy["c"] = 3
        del copy["b"]
        out.append(sorted(ctx.getpriv()))
        ctx.unsetpriv()
        out.append(ctx.getpriv())
        return CONTINUE

    m.register("envfrom", envfrom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail()[0] == b"c"
    assert out == [[1], [1], ["a", "b"], {}]


# ====================================================================== callback errors


def test_a_long_result_that_is_no_status_is_logged_by_its_start_not_whole(caplog):
    """Bug: a body callback written as a lambda around ctx.setpriv (which returns the value) returns
    the body so far; its warning quoted it whole for every block: the log grew with the square of
    the message size and held the mail's content. Now as a Tcl callback's result is quoted."""
    caplog.set_level(logging.INFO, logger=LOG)
    here = "test_a_long_result_that_is_no_status_is_logged_by_its_start_not_whole"
    m = make_milter()
    m.register("body", lambda ctx, chunk: ctx.setpriv("body", ctx.getpriv("body", b"") + chunk))
    m.register("envrcpt", lambda ctx, args: "short")
    with serving(m) as srv, srv.raw() as mta:
        assert mta.rcpt() == (b"c", b"")
        for _ in range(3):
            assert mta.body(b"secret " * 9_000) == (b"c", b"")
    warnings = [r.getMessage().replace(f"{here}.<locals>.", "") for r in caplog.records if r.levelno == logging.WARNING]
    once = "(said once a minute for this callback)"
    assert warnings[0] == f"conn#1: envrcpt callback <lambda> returned 'short', not a status; treated as continue {once}"
    start = repr(b"secret " * 9)[:60]
    assert warnings[1:] == [f"conn#1: body callback <lambda> returned {start}... (63000 bytes), not a status; "
                            f"treated as continue {once}"]  # (the next two blocks: within the minute)


def test_a_failing_callback_is_logged_with_traceback_and_answered_tempfail(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()

    def envrcpt(ctx, args):
        raise RuntimeError("boom in envrcpt")

    m.register("envrcpt", envrcpt)
    after = []
    m.register("envrcpt", lambda ctx, args: after.append(1))
    with serving(m) as srv, srv.raw() as mta:
        assert mta.rcpt() == (b"t", b"")
        assert mta.rcpt() == (b"t", b""), "the connection goes on"
    assert after == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    text = errors[0].getMessage()
    assert "Traceback" in text and "RuntimeError: boom in envrcpt" in text and "envrcpt" in text
    assert m.stats.errors == 2


class _EqualsNothing:
    """A result such as a pandas Series: comparing it raises."""

    def __eq__(self, other):
        raise ValueError("The truth value of a Series is ambiguous")

    __hash__ = object.__hash__


class _NoRepr:
    def __repr__(self):
        raise RuntimeError("repr exploded")


class _NoStr(Exception):
    def __str__(self):
        raise RuntimeError("str exploded")


@pytest.mark.parametrize("is_async", [False, True])
def test_a_result_or_exception_that_cannot_be_shown_is_answered_not_a_dropped_connection(caplog, is_async):
    """Bug: a callback result whose == raises (a pandas Series), or whose repr raises, or an
    exception whose str() raises, escaped the engine: asyncio's "Fatal error on transport", the
    connection closed unanswered. Now the result is no status (continue, with the warning) and
    the exception a failure answered with on_error, each logged by its type."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()

    def envfrom(ctx, args):
        return _NoRepr()

    def envrcpt(ctx, args):
        if args[0] == "<str@example.com>":
            raise _NoStr()
        return _EqualsNothing()

    def run_async(func):
        async def wrapper(ctx, args):
            await asyncio.sleep(0)
            return func(ctx, args)
        return wrapper

    m.register("envfrom", run_async(envfrom) if is_async else envfrom)
    m.register("envrcpt", run_async(envrcpt) if is_async else envrcpt)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail() == (b"c", b"")
        assert mta.rcpt("<eq@example.com>") == (b"c", b"")
        assert mta.rcpt("<str@example.com>") == (b"t", b"")
        assert mta.rcpt("<eq@example.com>") == (b"c", b""), "the connection goes on"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("Fatal error" in t for t in lines), lines
    assert any("_EqualsNothing object at 0x" in t and "not a status" in t for t in lines), lines
    assert any("returned <object repr() failed>, not a status" in t
               for t in lines), lines
    failed = [t for t in lines if "failed (<exception str() failed>), answering "
              "SMFIS_TEMPFAIL" in t]
    assert len(failed) == 1 and "raise _NoStr()" in failed[0], lines


class _StrExits(Exception):
    def __str__(self):
        raise SystemExit("str exits")


def test_an_exception_whose_str_raises_system_exit_is_answered_not_a_dropped_connection(caplog):
    """Bug: an exception whose __str__ raised SystemExit (a BaseException: logline.said caught
    Exception only) escaped the engine's report of the failure: the connection closed unanswered
    (`closed (error: str exits)`). Python's own traceback module names any such failure; now the
    failure is answered with on_error, its text Python's words, and the connection goes on."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()

    def envrcpt(ctx, args):
        raise _StrExits()

    m.register("envrcpt", envrcpt)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail() == (b"c", b"")
        assert mta.rcpt("<one@example.com>") == (b"t", b"")
        assert mta.rcpt("<two@example.com>") == (b"t", b""), "the connection goes on"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("failed (<exception str() failed>), answering SMFIS_TEMPFAIL" in t for t in lines) == 2, lines


@pytest.mark.parametrize("call_timeout", [0, 30.0])
def test_an_async_callback_whose_await_is_cancelled_fails_and_the_connection_goes_on(caplog, call_timeout):
    """Bug: a CancelledError out of an async callback (it awaited a task that something else
    cancelled) escaped the engine: the connection stayed paused for ever, nothing logged."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter(call_timeout=call_timeout)

    async def envrcpt(ctx, args):
        if args[0] == "<ok@example.com>":
            return REJECT
        lookup = asyncio.ensure_future(asyncio.sleep(60))  # e.g. a shared lookup, cancelled elsewhere
        asyncio.get_running_loop().call_soon(lookup.cancel)
        await lookup

    m.register("envrcpt", envrcpt)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.rcpt("<b@example.com>") == (b"t", b"")
        assert mta.rcpt("<ok@example.com>") == (b"r", b""), "the connection goes on"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "envrcpt callback" in errors[0], errors
    assert "failed (CancelledError), answering SMFIS_TEMPFAIL" in errors[0]
    assert "in envrcpt\n" in errors[0] and "await lookup" in errors[0]  # where it was


@pytest.mark.parametrize("on_error, wire", [(REJECT, b"r"), ("SMFIS_CONTINUE", b"c"), ("ACCEPT", b"a")])
def test_on_error_sets_the_answer_for_failing_callbacks(caplog, on_error, wire):
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter(on_error=on_error)

    async def envfrom(ctx, args):
        await asyncio.sleep(0)
        if args[0] == "<boom@example.org>":
            raise ValueError("async boom")
        return CONTINUE

    m.register("envfrom", envfrom)
    m.register("envrcpt", lambda ctx, args: 1 / 0)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail("<boom@example.org>") == (wire, b"")
        mta.abort()
        assert mta.mail("<ok@example.org>") == (b"c", b"")
        assert mta.rcpt() == (wire, b"")
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("ValueError: async boom" in t for t in messages)
    assert any("ZeroDivisionError" in t for t in messages)


def test_unknown_on_error_value_is_refused():
    with pytest.raises(ValueError):
        make_milter(on_error="SMFIS_MAYBE")


def test_settings_are_one_value_that_each_change_replaces():
    """The documented attributes read the milter's Settings; assigning one makes a new value and
    leaves the old one as it was."""
    m = make_milter(name="api", call_timeout=5)
    before = m.settings
    assert (before.name, before.call_timeout, before.workers, m.call_timeout) == ("api", 5, 1, 5)
    m.workers = 3
    m.on_error = "SMFIS_CONTINUE"
    assert (m.workers, m.on_error, m.settings.workers, m.settings.on_error) == (3, CONTINUE, 3, CONTINUE)
    assert (before.workers, before.on_error) == (1, TEMPFAIL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.settings.grace = 1
    m.settings = dataclasses.replace(m.settings, name="renamed")
    assert m.name == "renamed"


def test_a_milter_made_without_arguments_has_the_documented_defaults():
    """The signature docs/python-api.md shows, and the defaults it names for the other attributes."""
    from pytclmilter import Milter

    m = Milter()
    assert (m.name, m.connection, m.timeout, m.backlog, m.on_error, m.grace, m.socket_mode, m.max_data_size,
            m.call_timeout) == ("pytclmilter", "unix:/var/run/tclmilter.sock", 7210, None, TEMPFAIL, 30.0, None,
                                65535, 60.0)
    assert (m.socket_owner, m.workers, m.metrics, m.dry_run) == (None, 1, "", False)


def test_workers_backlog_and_tick_interval_below_their_least_are_refused():
    """No worker or a listen queue of 0 would serve nothing; a negative tick spins the loop. A
    backlog listen() cannot take was taken, and run() ended in "OverflowError: signed integer is
    greater than maximum". Each is named alone: "workers 0 and backlog None: must be 1 or more"
    named a backlog nobody gave."""
    m = make_milter()
    for option, value, message in [("workers", 0, "workers 0: must be 1 or more"),
                                   ("backlog", 0, "backlog 0: must be 1 or more"),
                                   ("backlog", 2**31, "backlog 2147483648: more than 2147483647, the most listen() "
                                                      "takes (the kernel caps it at net.core.somaxconn)"),
                                   ("tick_interval", -0.5, "tick_interval -0.5: must be a number of seconds, 0 or "
                                                           "more")]:
        with pytest.raises(ValueError) as raised:
            setattr(m, option, value)
        assert str(raised.value) == message
    m.socket_mode = 0  # a mode (nobody but root may connect), as documented: 0 to 0o777
    assert m.socket_mode == 0


@pytest.mark.parametrize("field, value", [("listening", 5), ("context_created", "log"), ("tick", 0.5),
                                          ("listening", None)])
def test_a_hook_that_is_not_callable_is_refused_when_given(field, value):
    """Bug: Hooks took anything: listening=5 ended run() in a traceback ("'int' object is not
    callable"), context_created="log" failed every connection, tick=0.5 was never called."""
    with pytest.raises(TypeError) as raised:
        Hooks(**{field: value})
    assert str(raised.value) == f"Hooks {field} must be callable (or left out), not {value!r}"
    assert Hooks(reload=None, tick=None).tick is None  # (their defaults: no reload, no tick)


def test_a_hook_whose_repr_raises_is_refused_as_any_other():
    """The refusal quoted the value with repr(): an object whose __repr__ raises (a proxy, a
    half-made object) raised that instead of the TypeError that names the field."""

    class Unshowable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    with pytest.raises(TypeError) as raised:
        Hooks(tick=Unshowable())
    assert str(raised.value) == "Hooks tick must be callable (or left out), not <object repr() failed>"


def test_hooks_given_at_construction_are_called_by_the_server_and_the_connection():
    seen: list[tuple[str, str]] = []
    hooks = Hooks(listening=lambda spec: seen.append(("listening", str(spec))),
                  context_created=lambda ctx: seen.append(("created", ctx.name)),
                  context_closed=lambda ctx: seen.append(("closed", ctx.name)))
    m = make_milter(hooks=hooks)
    m.register("envfrom", lambda ctx, args: CONTINUE)
    with serving(m) as srv:
        with srv.raw() as mta:
            assert mta.mail() == (b"c", b"")
        wait_for(lambda: len(seen) == 3)
    assert seen == [("listening", str(srv.spec)), ("created", "conn#1"), ("closed", "conn#1")]
    assert m.hooks is hooks


def test_abort_from_a_callback_ends_run_at_once_and_cuts_the_open_sessions():
    """abort() closed the listener and cut the sessions, but serve() went on waiting for a stop:
    run() never returned, and the milter claimed to be running with nothing left to serve."""
    m = make_milter(grace=600.0)  # no grace is waited for: a wait would fail the join below
    m.register("envfrom", lambda ctx, args: m.abort())
    srv = MilterThread(m).start()
    with srv.raw() as idle, srv.raw() as mta:
        assert idle.connect() == (b"c", b"")
        mta.send(b"M", z("<a@example.org>"))
        mta.expect_eof()
        idle.expect_eof()
        srv.join()
    assert srv.error is None
    assert not m.running


class _Fault(BaseException):
    """A library's own root class, beside Exception."""


@pytest.mark.parametrize("error", [RuntimeError, _Fault])
def test_a_context_hook_that_raises_is_logged_and_the_connection_is_served(caplog, error):
    """Bug: a context_created hook that raised left the MTA waiting for its negotiation reply with
    the socket open; one in context_closed left the connection half torn down. Both reached only
    asyncio's own log, unescaped. (A BaseException that is no Exception did, until it was
    caught as the others.)"""
    caplog.set_level(logging.INFO, logger=LOG)

    def created(ctx):
        raise error("no db\nhandle")

    closed = []

    def gone(ctx):
        closed.append(ctx.name)
        sys.exit(2)  # (a library's exit, too, must not end the milter)

    m = make_milter(hooks=Hooks(context_created=created, context_closed=gone))
    m.register("envfrom", lambda ctx, args: REJECT)
    with serving(m) as srv:
        for _ in range(2):
            with srv.raw() as mta:
                assert mta.mail() == (b"r", b"")
                mta.quit()
                mta.expect_eof()
        wait_for(lambda: len(closed) == 2)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    prefix = "test_a_context_hook_that_raises_is_logged_and_the_connection_is_served.<locals>."
    assert [e.split(" failed (")[0] for e in errors] == [
        f"conn#{n}: the {hook} hook {prefix}{func}"
        for n in (1, 2) for hook, func in (("context_created", "created"), ("context_closed", "gone"))
    ], errors
    assert "failed (no db\\nhandle):\n  Traceback" in errors[0]  # one line, then the indented traceback
    assert "hook" in errors[1] and "failed (SystemExit(2)):\n  Traceback" in errors[1], errors[1]
    assert m.running is False


def test_abort_and_close_callbacks_on_eof_inside_a_message():
    m = make_milter()
    calls = []
    m.register("envfrom", lambda ctx, args: CONTINUE)
    m.register("abort", lambda ctx: calls.append("abort"))
    m.register("close", lambda ctx: calls.append("close"))
    with serving(m) as srv:
        with srv.raw() as mta:
            assert mta.mail()[0] == b"c"
        wait_for(lambda: "close" in calls)
        with srv.raw() as mta:  # a clean QUIT: close only
            mta.quit()
            mta.expect_eof()
        wait_for(lambda: calls.count("close") == 2)
    assert calls == ["abort", "close", "close"]


def test_status_enum_values_are_libmilters():
    assert [int(s) for s in (CONTINUE, REJECT, DISCARD, ACCEPT, TEMPFAIL, NOREPLY, SKIP)] == [0, 1, 2, 3, 4, 7, 8]
    assert Status.REJECT.smfis == "SMFIS_REJECT"


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_a_routine_end_is_logged_at_debug_and_an_error_end_at_info(caplog, level):
    """An MTA's QUIT is routine (debug: the verdict line said what mattered); a broken packet is not."""
    caplog.set_level(level, logger=LOG)
    m = make_milter()
    m.register("envfrom", lambda ctx, args: CONTINUE)
    with serving(m) as srv:
        with srv.raw() as mta:
            mta.quit()
            mta.expect_eof()
        with srv.raw() as mta:
            mta.sock.sendall(b"\0\0\0\x01Z")  # an unknown command: the connection is dropped
            mta.expect_eof()
        wait_for(lambda: sum("closed (" in r.getMessage() for r in caplog.records) >= (2 if level == logging.DEBUG else 1))
    closed = [(r.levelno, r.getMessage().split(": ", 1)[1]) for r in caplog.records if "closed (" in r.getMessage()]
    routine = [c for c in closed if c[1] == "closed (quit)"]
    errors = [c for c in closed if c[1] != "closed (quit)"]
    assert routine == ([(logging.DEBUG, "closed (quit)")] if level == logging.DEBUG else [])
    assert len(errors) == 1 and errors[0][0] == logging.INFO, closed


def test_an_async_negotiate_callback_is_refused_and_closed_without_a_warning(caplog):
    """negotiate is answered at once (python-api.md: "must not be async", treated as continue).
    Its coroutine, and the engine's own around it, were dropped unstarted: Python warned
    "coroutine ... was never awaited" on stderr for every connection."""
    m = make_milter()

    async def negotiate(ctx, version, actions, protocol):
        return CONTINUE

    m.register("negotiate", lambda ctx, *offer: negotiate(ctx, *offer))  # (an async def is refused: test above)
    m.register("envfrom", lambda ctx, args: CONTINUE)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with serving(m) as srv, srv.raw() as mta:
            assert mta.command(b"M", z("<a@example.org>")) == (b"c", b"")
        gc.collect()
    assert [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)] == []
    assert "must not be async; treated as continue" in caplog.text


@pytest.mark.parametrize("setting, value", [("on_error", None), ("on_error", ""), ("call_timeout", -1),
                                            ("grace", float("nan")), ("timeout", -5),
                                            ("socket_mode", 0o4777)])
def test_settings_the_command_line_refuses_are_refused_by_the_api_too(setting, value):
    """on_error=None became "continue" (a failing callback let every message through), a
    negative call_timeout stopped every callback at once, and chmod takes 0o4777 (a setuid,
    world-writable socket file): the CLI and Tcl refuse them all."""
    with pytest.raises(ValueError):
        make_milter(**{setting: value})
    m = make_milter()
    with pytest.raises(ValueError):
        setattr(m, setting, value)


def _leave(kind: str) -> None:
    """sys.exit(3), or a KeyboardInterrupt."""
    if kind == "exit":
        sys.exit(3)
    raise KeyboardInterrupt


def _exits(kind: str, how: str):
    """A callback that ends in sys.exit(3) or KeyboardInterrupt, sync or async."""
    if how == "sync":
        return lambda ctx, args: _leave(kind) if args[0] == "<bye@example.org>" else CONTINUE

    async def envfrom(ctx, args):
        await asyncio.sleep(0)
        if args[0] == "<bye@example.org>":
            _leave(kind)
        return CONTINUE

    return envfrom


@pytest.mark.parametrize("timeout", [0, 5], ids=["no-limit", "limit"])
@pytest.mark.parametrize("how", ["sync", "async"])
@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_sys_exit_in_a_python_callback_is_a_failure_not_the_milters_end(caplog, kind, how, timeout):
    """A Python callback (or a library it calls) that runs sys.exit() or raises KeyboardInterrupt
    failed, like one that raises anything else: logged with its traceback, answered with
    on_error, and the milter serves on. Before, a sync one broke the connection ("Fatal error on
    transport", the MTA waiting for its reply), and an async one ended the whole milter with
    exit code 3 and nothing logged."""
    caplog.set_level(logging.INFO, logger="pytclmilter")
    m = make_milter(call_timeout=timeout)
    m.register("envfrom", _exits(kind, how))
    with serving(m) as srv, srv.raw() as mta:
        assert mta.connect() == (b"c", b"")
        assert mta.mail("<bye@example.org>") == (b"t", b"")
        assert mta.mail("<next@example.org>") == (b"c", b"")
        with srv.raw() as other:
            assert other.connect() == (b"c", b"")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    shown = "SystemExit(3)" if kind == "exit" else "KeyboardInterrupt()"
    assert len(errors) == 1 and "envfrom callback" in errors[0], errors
    assert f"failed ({shown}), answering SMFIS_TEMPFAIL" in errors[0], errors
    assert "_leave" in errors[0]  # the traceback, down to where it was raised


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_sys_exit_in_the_tick_hook_is_a_failure_not_the_milters_end(caplog, kind):
    """A tick hook that runs sys.exit() ended run() (SystemExit out of the serving loop) where the
    other hooks' failures are logged and serving goes on: now the tick's are too."""
    caplog.set_level(logging.INFO, logger="pytclmilter")
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 1:
            _leave(kind)

    m = make_milter(hooks=Hooks(tick=tick))
    with serving(m) as srv:
        wait_for(lambda: len(ticks) >= 3)
        with srv.raw() as mta:
            assert mta.connect() == (b"c", b"")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "the host's event tick failed" in errors[0], errors
    assert any("_leave" in (r.exc_text or "") for r in caplog.records), "its traceback"


@pytest.mark.parametrize("option, value, error, message", [
    ("on_error", NOREPLY, ValueError, "on_error <Status.NOREPLY: 7>: must be one of SMFIS_TEMPFAIL, SMFIS_CONTINUE, "
                                      "SMFIS_ACCEPT, SMFIS_REJECT, SMFIS_DISCARD (a Status or its name)"),
    ("on_error", "SMFIS_SKIP", ValueError, "on_error 'SMFIS_SKIP': must be one of SMFIS_TEMPFAIL, "),
    ("on_error", "SMFIS_MAYBE", ValueError, "on_error 'SMFIS_MAYBE': must be one of "),
    ("socket_mode", 0o17777, ValueError, "socket_mode 0o17777: must be a file mode from 0o0 to 0o777, such as 0o660"),
    ("socket_mode", -1, ValueError, "socket_mode -0o1: must be a file mode from 0o0 to 0o777"),
    ("socket_mode", "0660", TypeError, "socket_mode must be a file mode such as 0o660, or None, not '0660'"),
    ("hooks", 5, TypeError, "hooks must be a pytclmilter.Hooks, or None, not 5"),
    ("timeout", "abc", TypeError, "timeout must be a number of seconds, not 'abc'"),
    ("call_timeout", True, TypeError, "call_timeout must be a number of seconds, not True"),
    ("backlog", 1.5, TypeError, "backlog must be a positive integer, or None, not 1.5"),
    ("name", " ", ValueError, "name must not be empty, not ' '"),
    ("max_connections", -1, ValueError, "max_connections -1: must be 0 (no limit) or more"),
    ("max_connections", 2.5, TypeError, "max_connections must be an integer, 0 (no limit) or more, not 2.5"),
])
def test_the_api_names_a_bad_option_and_what_it_takes(option, value, error, message):
    """NOREPLY, SKIP, 0o17777 and hooks=5 were taken (a failing callback answered SKIP at any stage,
    the socket became setuid and world-writable, the first connection raised AttributeError);
    timeout="abc" failed inside a comparison, or in mypyc's words when compiled."""
    with pytest.raises(error) as raised:
        make_milter(**{option: value})
    assert str(raised.value).startswith(message), str(raised.value)
    if option != "hooks":
        m = make_milter()
        with pytest.raises(error) as raised:
            setattr(m, option, value)
        assert str(raised.value).startswith(message), str(raised.value)


@pytest.mark.parametrize("owner", [(0,), ("root", "root"), (0, 0, 0), (True, 0)])
def test_a_socket_owner_that_is_not_a_uid_and_gid_is_named_when_set(owner):
    """Only its being a tuple was checked: the rest failed in mypyc's words ("tuple[int, int] or
    None object expected; got tuple[int]") or, pure, when the socket was made."""
    m = make_milter()
    with pytest.raises(TypeError) as raised:
        m.socket_owner = owner
    assert str(raised.value) == f"socket_owner must be a (uid, gid) tuple, or None, not {owner!r}"
    m.socket_owner = (0, 0)
    assert m.socket_owner == (0, 0)


@pytest.mark.parametrize("owner", [(-5, 0), (0, 2**32 - 1), (2**40, 0)])
def test_a_socket_owner_no_system_has_is_refused_when_set(owner, tmp_path):
    """Any pair of ints was taken, and run() ended in a traceback once it had bound the socket:
    "OverflowError: uid is less than minimum" from the chown."""
    m = make_milter(connection=f"unix:{tmp_path}/m.sock")
    with pytest.raises(ValueError) as raised:
        m.socket_owner = owner
    assert str(raised.value) == (f"socket_owner {owner!r}: each id must be -1 (kept as it is) or from 0 to "
                                 "4294967294")
    m.socket_owner = (-1, 0)
    assert m.socket_owner == (-1, 0)


@pytest.mark.parametrize("spec, message", [
    ("bogus", 'metrics "bogus": must be inet:PORT@HOST or inet6:PORT@HOST (HTTP over TCP)'),
    ("inet:9101", 'metrics "inet:9101": needs the address to listen on, such as inet:9101@127.0.0.1'),
    ("inet:x@127.0.0.1", 'metrics "inet:x@127.0.0.1": unknown service "x"'),
])
def test_a_metrics_spec_that_cannot_be_served_is_refused_when_set(spec, message):
    """It was taken, and failed only when run() bound the endpoint."""
    m = make_milter()
    with pytest.raises(ValueError) as raised:
        m.metrics = spec
    assert str(raised.value) == message
    with pytest.raises(TypeError, match="metrics must be inet:PORT@HOST, or \"\" for none, not 9101"):
        setattr(m, "metrics", 9101)
    m.metrics = "inet:0@127.0.0.1"
    assert m.metrics == "inet:0@127.0.0.1"


@pytest.mark.parametrize("spec, message", [
    ("foo:bar", 'connection "foo:bar": unknown socket type "foo": must be unix, local, inet or inet6'),
    ("inet:99999@127.0.0.1", 'connection "inet:99999@127.0.0.1": port 99999 out of range'),
    ("inet:8899@", 'connection "inet:8899@": missing host after "@"'),
    ("", "empty connection spec"),
])
def test_a_connection_spec_that_cannot_be_served_is_refused_when_given_or_set(spec, message):
    """It was taken, by Milter() and by assignment, and failed only when run() bound the socket
    (python-api.md: each option is checked when given or assigned; Tcl's configure refused it)."""
    with pytest.raises(ValueError) as raised:
        make_milter(connection=spec)
    assert str(raised.value).startswith(message), str(raised.value)
    m = make_milter()
    before = m.connection
    with pytest.raises(ValueError) as raised:
        m.connection = spec
    assert str(raised.value).startswith(message), str(raised.value)
    assert m.connection == before
    m.connection = "inet:0@127.0.0.1"
    assert m.connection == "inet:0@127.0.0.1"


def test_reload_error_is_exported_and_names_the_python_settings():
    """It was only in pytclmilter.milter, and said "-connection, -workers cannot change without a
    restart" in the command line's spelling."""
    import pytclmilter

    assert "ReloadError" in pytclmilter.__all__
    m = make_milter()
    new = make_milter()
    new.workers = 2
    with pytest.raises(pytclmilter.ReloadError) as raised:
        m.reload(new)
    assert str(raised.value) == "only a restart can change workers (serving 1, new 2)"
    assert raised.value.settings == ("workers",)
    # Not a Milter (a Hooks.reload that passes what it built around one): it said
    # "AttributeError: 'Settings' object has no attribute 'settings'"
    with pytest.raises(TypeError) as wrong:
        m.reload(new.settings)
    assert str(wrong.value) == "reload: a pytclmilter.Milter expected; got Settings"


@pytest.mark.parametrize("end", ["eof", "quit"])
def test_an_async_abort_callback_runs_before_the_close_callbacks_and_the_contexts_end(end):
    """docs/protocol.md §7.5: the abort callbacks, then the close callbacks, once. An async abort
    callback was started and not waited for: it ran after the close callbacks and after the
    context had ended (context_closed), where its private data was gone."""
    seen = []

    def ended(ctx):
        seen.append("context ended")

    m = make_milter(hooks=Hooks(context_closed=ended))
    m.register("envfrom", lambda ctx, args: ctx.setpriv("from", args[0]))

    @m.register("abort")
    async def abort(ctx):
        await asyncio.sleep(0.2)
        seen.append(f"abort {ctx.getpriv('from')}")

    m.register("close", lambda ctx: seen.append("close"))
    with serving(m) as srv:
        with srv.raw() as mta:
            assert mta.connect() == (b"c", b"")
            assert mta.mail("<a@example.org>") == (b"c", b"")
            if end == "quit":
                mta.quit()
        wait_for(lambda: len(seen) == 3)
    assert seen == ["abort <a@example.org>", "close", "context ended"]


def test_a_session_cut_while_an_async_callback_runs_ends_it_before_its_close_callbacks():
    """When a stop's grace (or a reload's) ran out during an async callback, the session's close
    callbacks and its context's end ran beside it, and the callback went on afterwards on a
    context already ended (after a reload: for up to call_timeout, its private data gone, a
    script's interpreter maybe deleted). It is cancelled now, and they come after it."""
    seen = []
    m = make_milter(grace=0.1, hooks=Hooks(context_closed=lambda ctx: seen.append("context ended")))

    @m.register("eom")
    async def eom(ctx):
        seen.append("eom")
        try:
            await asyncio.Event().wait()  # never set: only the cut ends it
        except asyncio.CancelledError:
            seen.append("eom cancelled")
            raise

    m.register("close", lambda ctx: seen.append("close"))
    with serving(m) as srv, srv.raw() as mta:
        mta.envelope()
        mta.send(b"E")
        wait_for(lambda: seen == ["eom"])
        m.stop()
        mta.expect_eof()
        srv.join()
    assert seen == ["eom", "eom cancelled", "close", "context ended"]


def test_workers_beyond_the_cap_are_refused() -> None:
    """Milter(workers=...) is bounded as `-workers` is: each worker is a process of its own."""
    from pytclmilter import Milter

    m = Milter()
    with pytest.raises(ValueError, match="workers 100000: must be at most 1024"):
        m.workers = 100000
    m.workers = 1024
    with pytest.raises(ValueError, match="workers 1025: must be at most 1024"):
        m.workers = 1025
    assert m.workers == 1024
