"""What the SMTP AUTH tests behind Postfix and Sendmail share (test_postfix_auth.py,
test_sendmail_auth.py): the scripts, the user, and sending and reading back what the macro
script saw. ``mta`` is a started PrivatePostfix or PrivateSendmail with ``sasl_users`` ALICE."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .postfix import SendResult

DATA = Path(__file__).resolve().parents[1] / "data"
#: docs/deployment.md's script: relay only for users who logged in, stamp who it was.
POLICY = DATA / "authpolicy.tcl"
#: Stamps the {auth_*} macros it sees at envfrom and eom into X-Auth-Envfrom and X-Auth-Eom.
MACROS = DATA / "authmacros.tcl"
ALICE = ("alice", "alice's secret")


def message(subject: str) -> bytes:
    return (f"From: alice@example.org\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@test>\r\n\r\nHello.\r\n").encode()


def send_all(mta: Any, sends: Mapping[str, Mapping[str, Any]]) -> dict[str, SendResult]:
    """One message per subject, sent with those ``send`` options; each must be accepted."""
    return {subject: mta.send("a@example.org", "b@example.com", message(subject), **options).check()
            for subject, options in sends.items()}


def macros_seen(mta: Any, count: int) -> dict[str, list[str]]:
    """By subject, what MACROS stamped into the ``count`` messages at the sink: its envfrom line,
    then its eom line."""
    return {m.message["Subject"]: m.headers("X-Auth-Envfrom") + m.headers("X-Auth-Eom")
            for m in mta.wait_for_sink(count)}
