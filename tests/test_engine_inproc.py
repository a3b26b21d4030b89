"""The engine driven in process: ``ConnectionEngine`` fed hand-built frames through a fake Link.

No socket and no server, so each test sees exactly which bytes the engine writes for each
command (an empty list: nothing written, as for an event the MTA does not wait on) and which
callbacks ran. Frames come from ``support.engine`` (built from docs/protocol.md, not
with pytclmilter's codec); what is checked is what the MTA and the log would see.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pytclmilter import ACCEPT, CONTINUE, DISCARD, NOREPLY, REJECT, SKIP, TEMPFAIL
from support.engine import ALL_ACTIONS, ALL_PROTO, P_NOCONNECT, P_NR_HDR, P_SKIP, InProcessMTA, RawMTA, frame, make_milter, z

LOG = "pytclmilter"
C = [(b"c", b"")]  # continue
EVENTS = ("connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh", "body", "eom")


def recording(m: Any, calls: list, **answers: Any) -> None:
    """A callback for every message event that records its call and answers ``answers[event]``
    (a status, or a function of the arguments), continue by default."""
    for event in EVENTS:

        def cb(ctx: Any, *args: Any, _event: str = event) -> Any:
            calls.append((_event,) + args)
            answer = answers.get(_event, CONTINUE)
            return answer(*args) if callable(answer) else answer

        m.register(event, cb)


def envelope(mta: InProcessMTA) -> None:
    """CONNECT, HELO, MAIL, RCPT, DATA, each answered continue."""
    assert mta.connect() == C
    assert mta.command(b"H", z("client.example")) == C
    assert mta.command(b"M", z("<a@example.org>")) == C
    assert mta.command(b"R", z("<b@example.com>")) == C
    assert mta.command(b"T") == C


def messages(caplog: Any, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_a_header_verdict_without_reply_answers_the_next_reply(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m, calls = make_milter(), []
    recording(m, calls, header=lambda name, value: REJECT if name == "X-Bad" else CONTINUE)
    mta = InProcessMTA(m)
    assert mta.optneg() & P_NR_HDR
    envelope(mta)
    assert mta.command(b"L", z("From", "a@example.org")) == []  # no reply: NR_HDR
    assert mta.command(b"L", z("X-Bad", "yes")) == []  # its verdict waits ...
    assert mta.command(b"L", z("Subject", "hi")) == []
    assert mta.command(b"N") == [(b"r", b"")]  # ... for the next event the MTA waits on
    assert [c[1] for c in calls if c[0] == "header"] == ["From", "X-Bad"]
    assert ("eoh",) not in calls
    assert any("verdict reject at header (answered at eoh)" in t for t in messages(caplog, logging.INFO))
    # the next message is filtered afresh
    calls.clear()
    assert mta.command(b"M", z("<a@example.org>")) == C
    assert mta.command(b"R", z("<b@example.com>")) == C
    assert mta.command(b"T") == C
    assert mta.command(b"L", z("Subject", "hi")) == []
    assert mta.command(b"N") == C
    assert mta.command(b"E") == C
    assert [c[0] for c in calls] == ["envfrom", "envrcpt", "data", "header", "eoh", "eom"]


def test_a_skip_at_a_header_without_reply_keeps_nothing_back():
    """SKIP means something in the body only: at a header the MTA does not wait on it decides
    nothing, so the later headers' callbacks still run and end of headers is answered by its own."""
    m, calls = make_milter(), []
    recording(m, calls, header=lambda name, value: SKIP if name == "From" else CONTINUE, eoh=REJECT)
    mta = InProcessMTA(m)
    assert mta.optneg() & P_NR_HDR
    envelope(mta)
    assert mta.command(b"L", z("From", "a@example.org")) == []
    assert mta.command(b"L", z("Subject", "hi")) == []
    assert mta.command(b"N") == [(b"r", b"")]
    assert [c[1] for c in calls if c[0] == "header"] == ["From", "Subject"]
    assert ("eoh",) in calls


def test_a_negotiate_callback_may_answer_accept():
    """docs/python-api.md: negotiate returns CONTINUE or ACCEPT; either lets the session go on."""
    m, calls = make_milter(), []
    m.register("negotiate", lambda ctx, version, actions, protocol: ACCEPT)
    recording(m, calls, envfrom=REJECT)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect() == C
    assert mta.command(b"M", z("<a@example.org>")) == [(b"r", b"")]


def test_a_changed_max_data_size_is_negotiated_by_the_next_connection():
    """The negotiation is computed once per offer and callbacks; the size limit is part of it."""
    mds_1m = 0x20000000
    m = make_milter()
    m.register("eom", lambda ctx: CONTINUE)
    assert not InProcessMTA(m).optneg(protocol=ALL_PROTO | mds_1m) & mds_1m
    m.max_data_size = 1048575
    assert InProcessMTA(m, 2).optneg(protocol=ALL_PROTO | mds_1m) & mds_1m


def test_an_unregistered_callback_is_no_longer_negotiated():
    """The negotiation is cached per set of callbacks: removing one is a new set, whose event the
    next connection asks the MTA to skip."""
    m = make_milter()
    m.register("eom", lambda ctx: CONTINUE)

    def connect(ctx, host, info):
        return CONTINUE

    m.register("connect", connect)
    assert not InProcessMTA(m).optneg() & P_NOCONNECT
    assert m.unregister("connect", connect)
    assert InProcessMTA(m, 2).optneg() & P_NOCONNECT


def test_offers_varied_by_a_peer_do_not_grow_what_the_process_keeps():
    """The negotiation is cached by the MTA's offer, whose words a peer chooses freely (bits no
    action has): 5 000 connections each offering other ones kept 2.3 MB after they closed, and
    a peer could go on as long as it liked. The cache is bounded (256 offers)."""
    import gc
    import tracemalloc

    m = make_milter()
    m.register("eom", lambda ctx: CONTINUE)
    InProcessMTA(m).optneg()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5000):
            mta = InProcessMTA(m, i + 2)
            assert mta.optneg(actions=ALL_ACTIONS | (i + 1) << 12) & P_SKIP
            mta.send(b"Q")
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 500_000, kept


def test_a_reject_at_connect_decides_the_whole_connection(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m, calls = make_milter(), []
    recording(m, calls, connect=REJECT)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect() == [(b"r", b"")]
    assert mta.command(b"H", z("client.example")) == C
    for _ in range(2):  # two messages: no callback of either runs
        assert mta.command(b"M", z("<a@example.org>")) == C
        assert mta.command(b"R", z("<b@example.com>")) == C
        assert mta.command(b"T") == C
        assert mta.command(b"L", z("Subject", "hi")) == []
        assert mta.command(b"N") == C
        assert mta.command(b"B", b"body\r\n") == C
        assert mta.command(b"E") == C
    assert [c[0] for c in calls] == ["connect"]
    verdicts = [t for t in messages(caplog, logging.INFO) if " verdict " in t]
    assert len(verdicts) == 1 and "verdict reject at connect" in verdicts[0], verdicts


def test_skip_in_body_with_smfip_skip_is_sent_and_ends_the_body_callbacks():
    m, calls = make_milter(), []
    recording(m, calls, body=SKIP)
    mta = InProcessMTA(m)
    assert mta.optneg() & P_SKIP
    envelope(mta)
    assert mta.command(b"N") == C
    assert mta.command(b"B", b"one\r\n") == [(b"s", b"")]
    assert mta.command(b"E") == C
    assert [c for c in calls if c[0] in ("body", "eom")] == [("body", b"one\r\n"), ("eom",)]


def test_skip_in_body_without_smfip_skip_is_sent_as_continue_and_ends_the_body_callbacks():
    m, calls = make_milter(), []
    recording(m, calls, body=SKIP)
    mta = InProcessMTA(m)
    assert not mta.optneg(protocol=ALL_PROTO & ~P_SKIP) & P_SKIP  # an MTA that cannot skip
    envelope(mta)
    assert mta.command(b"N") == C
    assert mta.command(b"B", b"one\r\n") == C
    assert mta.command(b"B", b"two\r\n") == C  # the MTA goes on sending: no callback
    assert mta.command(b"E") == C
    assert [c for c in calls if c[0] in ("body", "eom")] == [("body", b"one\r\n"), ("eom",)]
    # the next message's body reaches the callback again
    calls.clear()
    envelope_again = [mta.command(b"M", z("<a@example.org>")), mta.command(b"R", z("<b@example.com>")),
                      mta.command(b"T"), mta.command(b"N"), mta.command(b"B", b"three\r\n")]
    assert envelope_again == [C] * 5
    assert ("body", b"three\r\n") in calls


def test_an_async_callback_pauses_only_its_own_connection():
    m, calls = make_milter(), []

    async def envfrom(ctx: Any, args: list) -> Any:
        calls.append(("envfrom", ctx.id))
        if args[0] == "<slow@example.org>":
            await gate.wait()
        return CONTINUE

    def envrcpt(ctx: Any, args: list) -> Any:
        calls.append(("envrcpt", ctx.id))
        return CONTINUE

    m.register("envfrom", envfrom)
    m.register("envrcpt", envrcpt)

    async def answered(mta: InProcessMTA, frames: int) -> list:
        """Let the event loop run until ``mta`` got ``frames`` reply frames (bounded)."""
        for _ in range(200):
            if mta.link.data.count(b"\0\0\0\x01c") >= frames:
                break
            await asyncio.sleep(0)
        return mta.replies()

    async def scenario() -> None:
        slow, other = InProcessMTA(m, 1), InProcessMTA(m, 2)
        slow.optneg()
        other.optneg()
        assert slow.command(b"M", z("<slow@example.org>")) == []
        assert not slow.link.paused  # still read, to notice an MTA that goes away meanwhile
        assert slow.command(b"R", z("<b@example.com>")) == []  # held until envfrom is answered
        # meanwhile the other connection is served (its envfrom is async too, and completes)
        assert other.command(b"M", z("<fast@example.org>")) == []
        assert await answered(other, 1) == C
        assert other.command(b"R", z("<b@example.com>")) == C
        assert not other.link.paused
        assert slow.replies() == []
        assert calls == [("envfrom", 1), ("envfrom", 2), ("envrcpt", 2)]
        for _ in range(200):  # a peer that pipelines on: no longer read once 4 KiB wait
            slow.send(b"R", z("<b@example.com>"))
        assert slow.link.paused and slow.replies() == []
        assert calls == [("envfrom", 1), ("envfrom", 2), ("envrcpt", 2)]
        gate.set()
        assert await answered(slow, 202) == C * 202  # envfrom's answer, then the held RCPTs'
        assert not slow.link.paused
        assert calls == [("envfrom", 1), ("envfrom", 2), ("envrcpt", 2)] + [("envrcpt", 1)] * 201

    gate = asyncio.Event()
    asyncio.run(scenario())


def test_abort_and_close_callbacks_all_run_and_their_results_are_ignored(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m, calls = make_milter(), []
    recording(m, calls)

    def failing_abort(ctx: Any) -> Any:
        calls.append(("abort", 1))
        raise RuntimeError("abort went wrong")

    for event, answers in (("abort", [REJECT, "bogus"]), ("close", [TEMPFAIL, "bogus", 42])):
        if event == "abort":
            m.register("abort", failing_abort)
        for i, answer in enumerate(answers, 2):

            def cb(ctx: Any, _event: str = event, _i: int = i, _answer: Any = answer) -> Any:
                calls.append((_event, _i))
                return _answer

            m.register(event, cb)
    mta = InProcessMTA(m)
    mta.optneg()
    envelope(mta)
    calls.clear()
    assert mta.command(b"A") == []  # ABORT is never answered
    assert calls == [("abort", 1), ("abort", 2), ("abort", 3)]
    assert mta.command(b"M", z("<a@example.org>")) == C  # REJECT at abort decided nothing
    calls.clear()
    assert mta.command(b"Q") == []  # inside a message: abort, then close
    assert calls == [("abort", 1), ("abort", 2), ("abort", 3), ("close", 2), ("close", 3), ("close", 4)]
    assert mta.link.closed
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 2, errors
    assert all("abort callback " in e and ".failing_abort failed (abort went wrong)" in e for e in errors)
    assert not [t for t in messages(caplog, logging.WARNING) if "not a status" in t]
    assert not [t for t in messages(caplog, logging.INFO) if " verdict " in t]


def test_a_callback_that_raises_is_answered_with_on_error(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter(on_error="SMFIS_REJECT")

    def envfrom(ctx: Any, args: list) -> Any:
        raise ValueError("no such sender")

    m.register("envfrom", envfrom)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.command(b"M", z("<a@example.org>")) == [(b"r", b"")]
    (error,) = messages(caplog, logging.ERROR)
    assert "envfrom callback" in error and "envfrom failed (no such sender), answering SMFIS_REJECT:" in error
    assert "ValueError: no such sender" in error  # the traceback
    assert m.stats.errors == 1


def test_a_callback_returning_no_status_is_answered_continue_with_a_warning(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()

    def envrcpt(ctx: Any, args: list) -> Any:
        return "bogus"

    m.register("envrcpt", envrcpt)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.command(b"R", z("<b@example.com>")) == C
    (warning,) = messages(caplog, logging.WARNING)
    assert "envrcpt callback" in warning and "returned 'bogus', not a status; treated as continue" in warning
    assert m.stats.errors == 0


@pytest.mark.parametrize("result, reply, warned", [
    ("", C, False),  # an empty result (a Tcl proc without return gives one): continue, no warning
    (" smfis_reject\n", [(b"r", b"")], False),  # a name, in any case, with blanks around it
    (True, C, True),  # not 1 (reject): a bool is no status
])
def test_loose_results_are_read_as_documented(caplog, result, reply, warned):
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()
    m.register("envrcpt", lambda ctx, args: result)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.command(b"R", z("<b@example.com>")) == reply
    assert bool(messages(caplog, logging.WARNING)) == warned, messages(caplog, logging.WARNING)


@pytest.mark.parametrize("status", [SKIP, NOREPLY], ids=["skip", "noreply"])
def test_an_eom_answer_sent_as_continue_keeps_its_modifications(caplog, status):
    """SKIP and NOREPLY mean nothing at end of message, where the MTA waits: the engine sends
    continue, and the MTA accepts the message. Its modifications must go with it, as with
    libmilter (which writes each one at its call). Before, they were dropped: the MTA got a
    bare `c` and the message went through without the header the eom callback added, while the
    log said only "sending continue" (docs/protocol.md §6.1, §8)."""
    caplog.set_level(logging.WARNING, logger=LOG)
    m = make_milter()

    def eom(ctx):
        ctx.addheader("X-Scanned", "yes")
        return status

    m.register("eom", eom)
    mta = InProcessMTA(m)
    mta.optneg()
    envelope(mta)
    assert mta.command(b"E") == [(b"h", z("X-Scanned", "yes")), (b"c", b"")]
    (warning,) = messages(caplog, logging.WARNING)
    assert "sending continue" in warning


def test_a_new_session_after_quit_nc_starts_with_nothing_decided():
    """QUIT_NC keeps the connection for a new SMTP session (ref: SMFIC_QUIT_NC). A message verdict
    of the old session must not hold in the new one. (Failed before the engine's verdict state was
    one value: a MAIL rejected before an UNKNOWN and QUIT_NC kept the new session's connect
    callback from running.)"""
    m, calls = make_milter(), []
    recording(m, calls, envfrom=REJECT)
    m.register("unknown", lambda ctx, line: calls.append(("unknown", line)))
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect() == C
    assert mta.command(b"M", z("<a@example.org>")) == [(b"r", b"")]
    assert mta.command(b"U", z("NOOP")) == C
    assert mta.command(b"K") == []  # never answered
    calls.clear()
    assert mta.connect() == C
    assert mta.command(b"H", z("client.example")) == C
    assert [c[0] for c in calls] == ["connect", "helo"]


@pytest.mark.parametrize("stage, status", [("connect", DISCARD), ("helo", DISCARD), ("connect", NOREPLY),
                                           ("envfrom", NOREPLY), ("envfrom", SKIP), ("header", SKIP),
                                           ("eoh", SKIP)])
def test_a_status_sent_as_continue_decides_nothing(caplog, stage, status):
    """A status the MTA cannot get where it waits goes out as `c` (docs/protocol.md §8): the MTA
    then filters on, so must the milter. Before, the engine decided on the callback's word: a
    DISCARD at connect was logged as a verdict and no later callback of the connection ran, a
    NOREPLY at MAIL silently skipped the message's callbacks and its eom modifications, and a
    SKIP before the body skipped the body callbacks."""
    caplog.set_level(logging.INFO, logger=LOG)
    m, calls = make_milter(), []
    recording(m, calls, **{stage: status})

    def eom(ctx):
        ctx.addheader("X-Scanned", "yes")

    m.register("eom", eom)
    mta = InProcessMTA(m)
    mta.optneg(protocol=ALL_PROTO & ~P_NR_HDR)  # every header waits for its reply
    envelope(mta)
    assert mta.command(b"L", z("Subject", "hi")) == C
    assert mta.command(b"N") == C
    assert mta.command(b"B", b"body\r\n") == C
    assert mta.command(b"E") == [(b"h", z("X-Scanned", "yes")), (b"c", b"")]
    assert [c[0] for c in calls] == list(EVENTS)
    assert "sending continue" in " ".join(messages(caplog, logging.WARNING))
    verdicts = [t for t in messages(caplog, logging.INFO) if " verdict " in t]
    assert len(verdicts) == 1 and "verdict accept at eom" in verdicts[0], verdicts


def test_quit_nc_forgets_the_sessions_private_data_and_sender(caplog):
    """The SMTP session after QUIT_NC may be another client's: what the filter kept with setpriv
    for the first must not reach it, nor must the first sender appear in its verdict line."""
    caplog.set_level(logging.INFO, logger=LOG)
    m, seen = make_milter(), []
    m.register("envfrom", lambda ctx, *a: ctx.setpriv("who", "first"))
    m.register("connect", lambda ctx, *a: seen.append(ctx.getpriv("who", None)) or CONTINUE)
    m.register("helo", lambda ctx, helo: REJECT if helo == "second.example" else CONTINUE)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect() == C
    assert mta.command(b"H", z("client.example")) == C
    assert mta.command(b"M", z("<first@example.org>")) == C
    assert mta.command(b"E") == C
    assert mta.command(b"K") == []
    assert mta.connect() == C
    assert mta.command(b"H", z("second.example")) == [(b"r", b"")]
    assert seen == [None, None]
    (verdict,) = [t for t in messages(caplog, logging.INFO) if "verdict reject" in t]
    assert "first@example.org" not in verdict and "from=-" in verdict, verdict


def test_quit_nc_forgets_a_reply_text_its_session_set_and_did_not_use():
    """A reply set in one session and never sent (its callback answered continue) must not be
    the text of a reject in the session after QUIT_NC, which may be another client's."""
    m = make_milter()

    def envfrom(ctx, args):
        ctx.setreply("550", "5.7.1", "meant for the first client")
        return CONTINUE

    m.register("connect", lambda ctx, *a: CONTINUE)
    m.register("envfrom", envfrom)
    m.register("helo", lambda ctx, helo: REJECT if helo == "second.example" else CONTINUE)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect() == C
    assert mta.command(b"M", z("<first@example.org>")) == C
    assert mta.command(b"E") == C
    assert mta.command(b"K") == []
    assert mta.connect() == C
    assert mta.command(b"H", z("second.example")) == [(b"r", b"")]


@pytest.mark.parametrize("family, address, port", [(b"L", "/var/run/smtpd", 0), (b"4", "192.0.2.7", 4321),
                                                  (b"6", "2001:db8::7", 4321)])
def test_a_unix_client_has_port_0_whatever_the_connect_carried(family: bytes, address: str, port: int) -> None:
    """The connect callbacks got the port field of a unix client's CONNECT (an MTA may put any
    number there); libmilter hands filters a unix address as a sockaddr_un, which has none, and
    the addrInfo of docs/tcl-reference.md has 0 for unix."""
    m, seen = make_milter(), []
    m.register("connect", lambda ctx, host, info: seen.append(info) or CONTINUE)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.command(b"C", RawMTA.connect_payload("client.example", family, 4321, address)) == C
    assert seen == [{"family": {b"L": "unix", b"4": "inet", b"6": "inet6"}[family], "address": address, "port": port}]


def test_a_session_after_quit_nc_without_its_connect_does_not_name_the_previous_client(caplog):
    """A session after QUIT_NC whose CONNECT is skipped (no connect callback) is maybe another
    client's: its verdict line named the client of the session before (from its CONNECT)."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()
    m.register("envfrom", lambda ctx, args: REJECT if args[0] == "<b@example.org>" else CONTINUE)
    m.register("eom", lambda ctx: CONTINUE)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect(host="first.example") == C
    assert mta.command(b"M", z("<a@example.org>")) == C
    assert mta.command(b"E") == C
    assert mta.command(b"K") == []
    assert mta.command(b"M", z("<b@example.org>")) == [(b"r", b"")]
    first, second = [t for t in messages(caplog, logging.INFO) if " verdict " in t]
    assert "client=first.example[192.0.2.1]" in first, first
    assert "first.example" not in second and "client=-" in second, second


@pytest.mark.parametrize("end", [b"Q", b""])
def test_each_session_after_quit_nc_gets_its_close_callback_without_connect_callbacks(end):
    """Without a connect callback the MTA skips CONNECT (SMFIP_NOCONNECT), so the second SMTP
    session on a connection after QUIT_NC begins at HELO: its QUIT or EOF ran no close callback,
    and a filter's per-session cleanup (counters, files, private data) never ran for it."""
    m, closed = make_milter(), []
    m.register("helo", lambda ctx, helo: ctx.setpriv("helo", helo) and CONTINUE)
    m.register("close", lambda ctx: closed.append(ctx.getpriv("helo", None)) or CONTINUE)
    mta = InProcessMTA(m)
    mta.optneg()
    for helo in ("first.example", "second.example"):
        assert mta.command(b"H", z(helo)) == C
        assert mta.command(b"M", z("<a@example.org>")) == C
        assert mta.command(b"R", z("<b@example.org>")) == C
        assert mta.command(b"E") == C
        if helo == "first.example":
            assert mta.command(b"K") == []
    if end:
        mta.send(end)
    else:
        mta.engine.connection_lost()
    assert closed == ["first.example", "second.example"]


def test_a_connection_verdict_ends_with_its_session_at_quit_nc_without_connect_callbacks(caplog):
    """Without a connect callback the MTA skips CONNECT (SMFIP_NOCONNECT), and the engine's state
    for the session went back to undecided only at CONNECT: a reject at HELO of one session left
    the next session, after QUIT_NC, answered continue without callbacks (its mail unfiltered)."""
    caplog.set_level(logging.INFO, logger=LOG)
    m, calls = make_milter(), []
    m.register("helo", lambda ctx, helo: calls.append(helo) or (REJECT if helo == "bad.example" else CONTINUE))
    m.register("envfrom", lambda ctx, args: calls.append(args[0]) or REJECT)
    m.register("unknown", lambda ctx, line: CONTINUE)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.command(b"H", z("bad.example")) == [(b"r", b"")]
    assert mta.command(b"U", z("NOOP")) == C  # (QUIT_NC counts after UNKNOWN or end of message)
    assert mta.command(b"K") == []
    assert mta.command(b"H", z("good.example")) == C
    assert mta.command(b"M", z("<a@example.org>")) == [(b"r", b"")]
    assert calls == ["bad.example", "good.example", "<a@example.org>"]


def test_a_discard_at_rcpt_is_the_whole_messages_verdict(caplog):
    """DISCARD at RCPT discards the whole message (docs/protocol.md §8): the message's later
    callbacks do not run, and no second verdict is logged for it."""
    caplog.set_level(logging.INFO, logger=LOG)
    m, calls = make_milter(), []
    recording(m, calls, envrcpt=lambda args: DISCARD if args[0] == "<drop@example.com>" else CONTINUE,
              eom=REJECT)
    mta = InProcessMTA(m)
    mta.optneg(protocol=ALL_PROTO & ~P_NR_HDR)
    assert mta.connect() == C
    assert mta.command(b"M", z("<a@example.org>")) == C
    assert mta.command(b"R", z("<drop@example.com>")) == [(b"d", b"")]
    assert mta.command(b"R", z("<b@example.com>")) == C
    assert mta.command(b"T") == C
    assert mta.command(b"L", z("Subject", "hi")) == C
    assert mta.command(b"N") == C
    assert mta.command(b"E") == C
    assert [c[0] for c in calls] == ["connect", "envfrom", "envrcpt"]
    verdicts = [t for t in messages(caplog, logging.INFO) if " verdict " in t]
    assert len(verdicts) == 1 and "verdict discard at envrcpt" in verdicts[0], verdicts


def test_after_a_verdict_at_mail_a_new_ehlo_and_an_unknown_command_run_their_callbacks():
    """A verdict at MAIL is the message's, not the connection's. Postfix's ABORT after it is
    ignored (the session is back in HELO) and Sendmail sends none, so the engine kept answering
    a second EHLO and an unknown command continue without their callbacks: a script that rejects
    ``EHLO bad.example`` let it through, as shown behind Postfix 3.7."""
    m, calls = make_milter(), []
    m.register("helo", lambda ctx, helo: calls.append(helo) or (REJECT if helo == "bad.example" else CONTINUE))
    m.register("envfrom", lambda ctx, args: calls.append(args[0]) or REJECT)
    m.register("unknown", lambda ctx, line: calls.append(line) or CONTINUE)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect() == C
    assert mta.command(b"H", z("client.example")) == C
    assert mta.command(b"M", z("<spam@example.org>")) == [(b"r", b"")]
    assert mta.command(b"A") == []  # Postfix's; ignored after the reject
    assert mta.command(b"U", z("XFOO bar")) == C
    assert mta.command(b"H", z("bad.example")) == [(b"r", b"")]
    assert calls == ["client.example", "<spam@example.org>", "XFOO bar", "bad.example"]


def test_an_accept_at_data_still_leaves_the_next_ehlo_to_its_callback():
    m, calls = make_milter(), []
    recording(m, calls, data=ACCEPT)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect() == C
    assert mta.command(b"H", z("client.example")) == C
    assert mta.command(b"M", z("<a@example.org>")) == C
    assert mta.command(b"R", z("<b@example.com>")) == C
    assert mta.command(b"T") == [(b"a", b"")]
    assert mta.command(b"H", z("again.example")) == C
    assert [c[0] for c in calls] == ["connect", "helo", "envfrom", "envrcpt", "data", "helo"]


def test_a_message_without_headers_reaches_eom_without_an_abort():
    """Postfix sends no header for a message that has none (it hides its own Received:). With
    header and data callbacks but none for eoh (NOEOH), DATA was followed by the body,
    which libmilter's table refuses: the abort callbacks ran, and the connection was closed as
    a protocol error (Postfix tempfailed the message, and the rest of the session)."""
    m, calls = make_milter(), []
    for event in ("envfrom", "envrcpt", "data", "header", "body", "eom", "abort"):
        m.register(event, lambda ctx, *args, _event=event: calls.append(_event) or CONTINUE)
    mta = InProcessMTA(m)
    mta.optneg()
    envelope(mta)
    assert mta.command(b"B", b"no headers\r\n") == C
    assert mta.command(b"E") == C
    assert calls == ["envfrom", "envrcpt", "data", "body", "eom"]
    assert not mta.link.closed


def test_aborts_faster_than_an_async_abort_callback_are_held_back_not_queued_without_bound():
    """A peer sending MAIL and ABORT in a loop to a filter whose async abort callback is slow
    (a network call): each ABORT queued one more task behind the running one, all answered at
    once, so the peer could queue as many as it sent (17 MB for 20 000, and a RecursionError
    when the loop cancelled the chain at stop). Now at _QUIET_QUEUE queued runs the connection
    waits, its socket not read, until one has run; then it goes on, and every abort runs."""
    from pytclmilter.engine import _QUIET_QUEUE

    m, aborts = make_milter(), []
    m.register("envfrom", lambda ctx, args: CONTINUE)

    @m.register("abort")
    async def abort(ctx: Any) -> None:
        aborts.append(ctx.id)
        await gate.wait()

    sent = 1000

    async def scenario() -> None:
        mta = InProcessMTA(m)
        mta.optneg()
        assert mta.connect() == C
        mta.engine.data_received((frame(b"M", z("<a@example.org>")) + frame(b"A")) * sent)
        for _ in range(10):  # the running abort callback awaits the gate: nothing moves on
            await asyncio.sleep(0)
        assert mta.link.paused
        assert aborts == [1]
        assert len(mta.replies()) == _QUIET_QUEUE + 1  # (the first ABORT's run is not queued)
        # the first run, the queued ones, the running callback under wait_for, this one
        assert len(asyncio.all_tasks()) <= _QUIET_QUEUE + 3
        gate.set()
        for _ in range(100 * sent):
            if len(aborts) == sent:
                break
            await asyncio.sleep(0)
        assert len(aborts) == sent
        assert len(mta.replies()) == sent - _QUIET_QUEUE - 1
        assert not mta.link.paused and not mta.engine.busy

    gate = asyncio.Event()
    asyncio.run(scenario())


def test_postfixs_abort_after_a_finished_message_runs_no_abort_callback_without_envfrom():
    """docs/protocol.md §7.5: the manual's abort callback "is not invoked if message transmission
    is completed", yet Postfix sends ABORT after every message. A filter with an abort callback
    and none for MAIL must still be sent MAIL, or the skip rule makes that ABORT legal after HELO
    and the abort callback runs for every delivered message. The MTA here sends only the events
    the filter did not ask to skip, as Postfix does."""
    from support.engine import P_NOMAIL

    m, calls = make_milter(), []
    m.register("eom", lambda ctx: calls.append("eom") or CONTINUE)
    m.register("abort", lambda ctx: calls.append("abort"))
    mta = InProcessMTA(m)
    asked = mta.optneg()
    if not asked & P_NOMAIL:
        mta.command(b"M", z("<a@example.org>"))
    assert mta.command(b"E") == C
    mta.command(b"A")  # Postfix's ABORT after the message it delivered
    assert calls == ["eom"]


def test_the_mail_asked_for_an_abort_callback_alone_waits_for_no_reply():
    """The MAIL that an abort callback needs (above) is asked for without a reply where the MTA
    allows it: nobody listens to it, so the MTA need not wait on it, nor does it get one."""
    from support.engine import P_NOMAIL, P_NR_MAIL

    m = make_milter()
    m.register("eom", lambda ctx: CONTINUE)
    m.register("abort", lambda ctx: None)
    mta = InProcessMTA(m)
    asked = mta.optneg()
    assert not asked & P_NOMAIL and asked & P_NR_MAIL
    assert mta.command(b"M", z("<a@example.org>")) == []
    assert mta.command(b"E") == C


def test_the_verdict_line_names_the_client_from_its_macro_when_connect_is_skipped(caplog):
    """docs/troubleshooting.md: `verdict reject at envfrom client="localhost [127.0.0.1]" ...`.
    Without a connect callback the MTA sends no CONNECT, but its macros still arrive: the
    verdict line names the client by the `_` macro, not as "-"."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()
    m.register("envfrom", lambda ctx, args: REJECT)
    mta = InProcessMTA(m)
    mta.optneg()
    mta.send(b"D", b"C" + z("_", "localhost [127.0.0.1]"))
    assert mta.command(b"M", z("<spammer@example.com>")) == [(b"r", b"")]
    verdicts = [t for t in messages(caplog, logging.INFO) if "verdict" in t]
    assert verdicts == ['conn#1: verdict reject at envfrom client="localhost [127.0.0.1]" '
                        "from=<spammer@example.com> gen=1"], verdicts


@pytest.mark.parametrize("mail_addr, shown", [("", "from=<>"), ("bounce@example.org", "from=<bounce@example.org>")])
def test_the_verdict_line_names_the_sender_from_its_macro_when_mail_is_skipped(caplog, mail_addr, shown):
    """Without an envfrom callback the MTA sends no MAIL; the sender comes from {mail_addr}, in
    angle brackets as MAIL gives it, and Postfix's "" for a bounce is <>, not "-"."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()
    m.register("envrcpt", lambda ctx, args: REJECT)
    mta = InProcessMTA(m)
    mta.optneg()
    mta.send(b"D", b"M" + z("{mail_addr}", mail_addr))
    assert mta.command(b"R", z("<postmaster@example.com>")) == [(b"r", b"")]
    (verdict,) = [t for t in messages(caplog, logging.INFO) if "verdict" in t]
    assert f" {shown} " in verdict, verdict
