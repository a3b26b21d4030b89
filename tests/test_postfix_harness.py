"""Tests of the private-Postfix test harness itself (tests/support/postfix.py).

They pin down what the harness promises other integration tests: mail reaches
the sink unchanged apart from Postfix's Received header, milter actions are
visible at the SMTP client, at the sink and in the queue, and every instance
is cleaned up.  The milters here are deliberately tiny pymilter programs, run
in a spawned process each: libmilter keeps process-global state, so a second
``runmilter`` in one process is not possible.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:  # rootdir on sys.path (python -m pytest) or tests/ itself (rootdir-less)
    from tests.support.postfix import (
        PrivatePostfix,
        free_port,
        postfix_factory,
        wait_for_listener,
        wait_until,
    )
except ImportError:  # pragma: no cover - depends on how pytest was started
    from support.postfix import (
        PrivatePostfix,
        free_port,
        postfix_factory,
        wait_for_listener,
        wait_until,
    )

pytestmark = pytest.mark.postfix

postfix = pytest.fixture(postfix_factory, name="postfix")

MakePostfix = Callable[..., PrivatePostfix]

MESSAGE = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: Someone <someone@example.com>\r\n"
    b"Subject: harness test\r\n"
    b"Date: Tue, 01 Jan 2030 00:00:00 +0000\r\n"
    b"Message-ID: <harness-1@example.org>\r\n"
    b"X-Folded: first part\r\n"
    b"\tsecond part\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n"
    b"trailing  spaces  \r\n"
    b"last line\r\n"
)


# --------------------------------------------------------------------------
# tiny milters (run in a child process)
# --------------------------------------------------------------------------


def _milter_main(behaviour: str, libmilter_socket: str) -> None:
    """Child process: run a pymilter with the given ``behaviour``.

    "tag":        reject MAIL FROM <bad@example.com> with 550 5.7.1, add
                  ``X-Harness: yes`` at end of message.
    "quarantine": quarantine every message (Postfix puts it on hold).
    """
    import Milter  # only the child needs it

    class HarnessMilter(Milter.Base):
        def envfrom(self, mailfrom: str, *params: str) -> Any:
            if behaviour == "tag" and mailfrom.strip("<>").lower() == "bad@example.com":
                self.setreply("550", "5.7.1", "harness rejects this sender")
                return Milter.REJECT
            return Milter.CONTINUE

        def eom(self) -> Any:
            if behaviour == "tag":
                self.addheader("X-Harness", "yes")
            elif behaviour == "quarantine":
                self.quarantine("held by harness test")
            return Milter.ACCEPT

    os.umask(0)  # a unix socket must be connectable by user postfix
    Milter.factory = HarnessMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.QUARANTINE)
    Milter.runmilter("harness", libmilter_socket, timeout=30)


@pytest.fixture
def run_milter() -> Iterator[Callable[[str, str], None]]:
    """Start tiny milters on Postfix-style addresses; stop them at teardown.

    Note the two syntaxes: Postfix says ``inet:HOST:PORT``, libmilter says
    ``inet:PORT@HOST``; ``unix:PATH`` is the same for both.
    """
    try:
        import Milter  # noqa: F401  (only probing; the children import it)
    except ImportError as exc:  # also when libmilter.so itself is missing
        pytest.skip(f"pymilter (built against libmilter) not importable: {exc}")
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []

    def start(behaviour: str, postfix_address: str) -> None:
        kind, _, rest = postfix_address.partition(":")
        if kind == "inet":
            host, _, port = rest.rpartition(":")
            lib_address = f"inet:{port}@{host}"
        else:
            lib_address = postfix_address
        proc = ctx.Process(target=_milter_main, args=(behaviour, lib_address), daemon=True)
        proc.start()
        procs.append(proc)

        def alive() -> None:  # fail fast on e.g. an import error in the child
            if not proc.is_alive():
                raise RuntimeError(f"milter exited with {proc.exitcode}")

        wait_for_listener(postfix_address, timeout=15, alive=alive)

    yield start
    for proc in procs:
        # libmilter notices SIGTERM only every 5 s (its select() timeout);
        # these throw-away milters hold no state worth a graceful stop.
        proc.kill()
        proc.join(10)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_without_milter_message_arrives_byte_exact(postfix: MakePostfix) -> None:
    pf = postfix()
    assert pf.postconf("smtpd_milters") == ""

    result = pf.send("sender@example.org", ["someone@example.com"], MESSAGE)

    assert result.accepted, result
    assert result.mail is not None and result.mail.code == 250
    assert result.rcpt["someone@example.com"].code == 250
    assert result.queue_id
    (msg,) = pf.wait_for_sink(1)
    assert msg.mail_from == "sender@example.org"
    assert msg.recipients == ["someone@example.com"]
    assert msg.client_addr == "127.0.0.1"
    # The only change is one Received header prepended by Postfix, so the
    # original headers and body follow it byte for byte.
    assert msg.data.endswith(MESSAGE)
    prefix = msg.data[: -len(MESSAGE)]
    assert prefix.startswith(b"Received: from client.example (")
    assert f"with ESMTP id {result.queue_id}".encode() in prefix
    assert [line[:1] for line in prefix.split(b"\r\n")[1:-1]] == [b"\t", b"\t"]
    assert msg.body == b"Hello.\n.a line that starts with a dot\n\ntrailing  spaces  \nlast line\n"
    assert msg.message["Subject"] == "harness test"
    assert msg.headers("X-Folded") == ["first part\n\tsecond part"]
    assert pf.queue() == []
    pf.wait_for_log(rf"{result.queue_id}: to=<someone@example\.com>.*status=sent")


def test_milter_adds_header_and_rejects_sender(
    postfix: MakePostfix, run_milter: Callable[[str, str], None]
) -> None:
    address = f"inet:127.0.0.1:{free_port()}"
    run_milter("tag", address)
    pf = postfix(milter=address)

    bad = pf.send("bad@example.com", ["someone@example.com"], MESSAGE)
    assert not bad.accepted
    assert bad.stage == "mail"
    assert bad.mail is not None and bad.mail.code == 550, bad
    assert bad.mail.permanent
    assert "5.7.1 harness rejects this sender" in bad.mail.text
    assert bad.rcpt == {} and bad.data is None
    # The same, step by step, through a raw smtplib session.
    with pf.smtp_session() as smtp:
        assert smtp.ehlo("client.example")[0] == 250
        code, text = smtp.mail("bad@example.com")
        assert (code, text) == (550, b"5.7.1 harness rejects this sender")
        assert smtp.mail("good@example.com")[0] == 250

    good = pf.send("good@example.com", ["someone@example.com", "other@example.net"], MESSAGE)
    assert good.accepted, good
    (msg,) = pf.wait_for_sink(1)
    assert msg.mail_from == "good@example.com"
    assert msg.recipients == ["someone@example.com", "other@example.net"]
    assert msg.headers("X-Harness") == ["yes"]
    assert msg.body == MESSAGE.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n")
    pf.wait_for_log(r"milter-reject: MAIL from \S+: 550 5\.7\.1 harness rejects this sender")


def test_quarantined_message_is_held_then_released(
    postfix: MakePostfix, run_milter: Callable[[str, str], None]
) -> None:
    # A unix-socket milter: its path comes from the not yet started instance.
    pf = postfix(start=False)
    pf.milter = f"unix:{pf.socket_path()}"
    run_milter("quarantine", pf.milter)
    pf.start()

    result = pf.send("sender@example.org", "someone@example.com", MESSAGE)

    assert result.accepted, result
    (rec,) = pf.wait_for_queue("hold", 1)
    assert rec["queue_id"] == result.queue_id
    assert rec["sender"] == "sender@example.org"
    assert [r["address"] for r in rec["recipients"]] == ["someone@example.com"]
    pf.wait_for_log(rf"{result.queue_id}: milter-hold: END-OF-MESSAGE .*triggers HOLD action")
    assert pf.sink_messages() == []

    # Releasing it shows that held mail is otherwise intact.
    pf.postsuper("-H", result.queue_id or "")
    pf.flush()
    (msg,) = pf.wait_for_sink(1)
    assert msg.data.endswith(MESSAGE)
    wait_until(lambda: pf.queue() == [], 10, interval=0.1)


def test_unreachable_milter_tempfails_by_default(postfix: MakePostfix) -> None:
    pf = postfix(milter=f"inet:127.0.0.1:{free_port()}")  # nobody listens there

    result = pf.send("sender@example.org", ["someone@example.com"], MESSAGE)

    assert not result.accepted
    assert result.final is not None and result.final.temporary, result
    pf.wait_for_log(r"warning: connect to Milter service inet:127\.0\.0\.1:\d+: Connection refused")
    assert pf.sink_messages() == []


def test_sasl_users_log_in_with_auth_plain(postfix: MakePostfix) -> None:
    """The instance offers SMTP AUTH against its own users: a right password is accepted and
    logged as Postfix's sasl_username, a wrong one is refused before MAIL, no login still
    relays (127.0.0.1 is in mynetworks, so policy is left to the milter under test)."""
    pf = postfix(sasl_users={"alice": "alice's secret"})
    with pf.smtp_session() as smtp:
        assert b"AUTH PLAIN LOGIN" in smtp.ehlo("client.example")[1]

    wrong = pf.send("a@example.org", "b@example.com", MESSAGE, login=("alice", "guess"))
    right = pf.send("a@example.org", "b@example.com", MESSAGE, login=("alice", "alice's secret"))
    anonymous = pf.send("a@example.org", "b@example.com", MESSAGE)

    assert wrong.stage == "auth" and str(wrong.auth).startswith("535 5.7.8"), wrong
    assert wrong.mail is None and not wrong.accepted
    assert right.auth is not None and right.auth.code == 235 and right.accepted, right
    assert anonymous.auth is None and anonymous.accepted, anonymous
    pf.wait_for_log(rf"{right.queue_id}: client=localhost\[127\.0\.0\.1\], sasl_method=PLAIN, sasl_username=alice$")
    assert len(pf.wait_for_sink(2)) == 2


def test_instances_are_isolated_and_cleaned_up(postfix: MakePostfix) -> None:
    first = postfix()
    second = postfix(settings={"myhostname": "second.test"})
    assert first.root != second.root
    assert {first.smtpd_port, first.sink_port}.isdisjoint({second.smtpd_port, second.sink_port})

    assert second.send("a@example.org", "b@example.com", MESSAGE).accepted
    (msg,) = second.wait_for_sink(1)
    assert b"by second.test (Postfix)" in msg.header_bytes
    assert first.sink_messages() == []

    root = first.root
    first.close()
    assert not root.exists()
    assert not first.running
    first.close()  # idempotent


def test_context_manager_cleans_up_after_failure() -> None:
    with pytest.raises(ZeroDivisionError), PrivatePostfix() as pf:
        pid_file = pf.queue_dir / "pid" / "master.pid"
        master = int(pid_file.read_text().split()[0])
        root: Path = pf.root
        raise ZeroDivisionError("a failing test body")
    assert not root.exists()
    assert not _alive(master)


def _alive(pid: int) -> bool:
    """A zombie counts as dead (orphans may not be reaped in containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"
