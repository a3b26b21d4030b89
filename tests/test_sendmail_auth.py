"""SMTP AUTH seen by a TclMilter script behind Sendmail, TclMilter's home MTA: a client logs in to
a private Sendmail with Cyrus SASL (tests/support/sendmail.py [S7]) and the script reads who did
it from the {auth_*} macros, as test_postfix_auth.py does behind Postfix. Sendmail's default
envfrom macros (Milter.macros.envfrom) carry them, with {auth_ssf}; what differs from Postfix is
asserted here and documented in docs/deployment.md and docs/tcl-reference.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.sasl import ALICE, MACROS, POLICY, macros_seen, message, send_all
from support.sendmail import PrivateSendmail, milter_socket_path, sasl_missing, sendmail_factory
from support.tclrun import tclrun_factory

pytestmark = pytest.mark.sendmail

# Sendmail puts the address between a MAIL reply's status code and the script's text.
LOG_IN_FIRST = "550 5.7.1 <alice@example.org>... log in first: this server relays only for its users"

sendmail = pytest.fixture(sendmail_factory, name="sendmail")
milter = pytest.fixture(tclrun_factory, name="milter")
# Not below the temp dir: see the DontBlameSendmail test in test_sendmail_e2e.py.
socket_path = pytest.fixture(milter_socket_path, name="socket_path")


@pytest.fixture(autouse=True)
def _sasl() -> None:
    missing = sasl_missing()
    if missing is not None:
        pytest.skip(missing)


def started(sendmail, milter, socket_path: Path, script: Path, *, env: dict[str, str] | None = None,
            mc: tuple[str, ...] = ()) -> PrivateSendmail:
    milter(script, connection=f"unix:{socket_path}", env=env)
    return sendmail(f"unix:{socket_path}", sasl_users=dict([ALICE]), mc=mc).start()


def test_the_script_stamps_the_logged_in_user_and_rejects_anonymous_senders(
        sendmail, milter, socket_path: Path) -> None:
    sm = started(sendmail, milter, socket_path, POLICY)
    anonymous = sm.send("alice@example.org", "b@example.com", message("anonymous"))
    logged_in = sm.send("alice@example.org", "b@example.com", message("logged in"), login=ALICE)
    on_behalf = sm.send("boss@example.org", "b@example.com", message("on behalf"), login=ALICE,
                        mail_options=["AUTH=<boss@example.org>"])
    after_failure = sm.send("alice@example.org", "b@example.com", message("failed"), failed_login=ALICE[0])

    assert "AUTH PLAIN LOGIN" in str(anonymous.ehlo), anonymous
    assert str(anonymous.mail) == LOG_IN_FIRST, anonymous
    # A failed AUTH leaves {auth_authen} empty.
    assert after_failure.failed_auth is not None and after_failure.failed_auth.code == 535, after_failure
    assert str(after_failure.mail) == LOG_IN_FIRST, after_failure
    assert logged_in.accepted and on_behalf.accepted, (logged_in, on_behalf)
    delivered = {m.message["Subject"]: m for m in sm.wait_for_sink(2)}
    assert delivered["logged in"].headers("X-Authenticated-User") == ["alice with PLAIN"]
    # Sendmail's trust_auth ruleset does not let alice act as boss: it relays AUTH=<>, yet the
    # script sees the AUTH= parameter as the client wrote it.
    assert delivered["on behalf"].headers("X-Authenticated-User") == ["alice with PLAIN for <boss@example.org>"]
    assert delivered["on behalf"].mail_args == "<boss@example.org> AUTH=<>"
    assert set(delivered) == {"logged in", "on behalf"}


def test_what_the_auth_macros_hold(sendmail, milter, socket_path: Path) -> None:
    """{auth_author} is the client's claim, also without a login; AUTH=<> gives "<>" (Postfix:
    ""); the mechanism of the login that succeeded after a failed one; {auth_ssf} 0 without TLS."""
    sm = started(sendmail, milter, socket_path, MACROS)
    results = send_all(sm, {
        "anonymous": {"mail_options": ["AUTH=<boss@example.org>"]},
        "empty author": {"login": ALICE, "mail_options": ["AUTH=<>"]},
        "second try": {"failed_login": ALICE[0], "login": ALICE, "mechanism": "LOGIN"},
    })
    failed = results["second try"].failed_auth
    assert failed is not None and failed.code == 535, results["second try"]
    assert macros_seen(sm, 3) == {
        "anonymous": ["auth_authen=; auth_type=; auth_author=<boss@example.org>; auth_ssf="] * 2,
        "empty author": ["auth_authen=alice; auth_type=PLAIN; auth_author=<>; auth_ssf=0"] * 2,
        "second try": ["auth_authen=alice; auth_type=LOGIN; auth_author=; auth_ssf=0"] * 2,
    }


NO_AUTH = "auth_authen=; auth_type=; auth_author=; auth_ssf="


@pytest.mark.parametrize(("env", "mc", "expected"), [
    # The filter's own envfrom list replaces Sendmail's: without them, nothing is sent.
    ({"ENVFROM_MACROS": "i {mail_addr}"}, (), NO_AUTH),
    # Milter.macros.envfrom set in the .mc replaces Sendmail's default list, as in Postfix.
    ({}, ("define(`confMILTER_MACROS_ENVFROM', `i, {mail_addr}')",), NO_AUTH),
    # ... and the filter's list still gets them.
    ({"ENVFROM_MACROS": "{auth_authen} {auth_type}"}, ("define(`confMILTER_MACROS_ENVFROM', `i, {mail_addr}')",),
     "auth_authen=alice; auth_type=PLAIN; auth_author=; auth_ssf="),
])
def test_sendmail_sends_the_auth_macros_only_when_its_envfrom_list_names_them(
        sendmail, milter, socket_path: Path, env: dict[str, str], mc: tuple[str, ...], expected: str) -> None:
    sm = started(sendmail, milter, socket_path, MACROS, env=env, mc=mc)
    send_all(sm, {"logged in": {"login": ALICE}})
    assert macros_seen(sm, 1) == {"logged in": [expected] * 2}
