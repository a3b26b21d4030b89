"""SMTP AUTH seen by a TclMilter script: a real client logs in to a real Postfix, and the script
reads who did it from the {auth_*} macros, as mail admins use them ("relay only for users who
logged in", "stamp the user into a header"). The macros come with MAIL FROM in Postfix's default
milter_mail_macros (docs/deployment.md); getsymval at eom finds them there (docs/protocol.md 5.3).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

from support.sasl import ALICE, MACROS, POLICY, macros_seen, message, send_all
from support.tclrun import tclrun_factory

pytestmark = pytest.mark.postfix

milter = pytest.fixture(tclrun_factory, name="milter")


@pytest.fixture
def auth_policy(tmp_path: Path) -> Iterator[str]:
    """The policy script under `pytclmilter run`; yields Postfix's address for it."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pytclmilter.cli", "run", str(POLICY), "--connection", "inet:0@127.0.0.1"],
        cwd=str(tmp_path), encoding="utf-8", timeout=20, use_poll=True
    )
    child.expect(r"AuthPolicy listening on inet:(\d+)@127\.0\.0\.1")
    yield f"inet:127.0.0.1:{child.match.group(1)}"
    child.kill(15)
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0, child.before


def test_the_script_stamps_the_logged_in_user_and_rejects_anonymous_senders(postfix, auth_policy) -> None:
    pf = postfix(milter=auth_policy, sasl_users=dict([ALICE]))
    assert pf.postconf("milter_mail_macros").split()[1:4] == ["{auth_type}", "{auth_authen}", "{auth_author}"]

    anonymous = pf.send("alice@example.org", "b@example.com", message("anonymous"))
    logged_in = pf.send("alice@example.org", "b@example.com", message("logged in"), login=ALICE)
    on_behalf = pf.send("boss@example.org", "b@example.com", message("on behalf"), login=ALICE,
                        mail_options=["AUTH=<boss@example.org>"])

    assert str(anonymous.mail) == "550 5.7.1 log in first: this server relays only for its users", anonymous
    assert not anonymous.accepted
    assert logged_in.accepted and on_behalf.accepted, (logged_in, on_behalf)
    delivered = {m.message["Subject"]: m for m in pf.wait_for_sink(2)}
    assert delivered["logged in"].headers("X-Authenticated-User") == ["alice with PLAIN"]
    # {auth_author} is MAIL FROM's AUTH= parameter as the client wrote it, brackets and all.
    assert delivered["on behalf"].headers("X-Authenticated-User") == ["alice with PLAIN for <boss@example.org>"]
    assert set(delivered) == {"logged in", "on behalf"}


def test_a_milter_mail_macros_without_the_auth_macros_hides_the_login(postfix, auth_policy) -> None:
    """The pitfall deployment.md warns of: a main.cf list replaces the default one, so a user who
    logged in looks anonymous to the script and is refused."""
    pf = postfix(milter=auth_policy, sasl_users=dict([ALICE]),
                 settings={"milter_mail_macros": "i {mail_addr}"})
    result = pf.send("alice@example.org", "b@example.com", message("logged in"), login=ALICE)
    assert result.auth is not None and result.auth.code == 235, result
    assert str(result.mail) == "550 5.7.1 log in first: this server relays only for its users", result


def test_auth_author_is_the_clients_claim_not_a_login(postfix, milter) -> None:
    """{auth_author} is MAIL FROM's AUTH= as written, also from a client that did not log in or
    whose login failed, so a script keys on {auth_authen}; AUTH=<> leaves it empty; Postfix has no
    {auth_ssf} (test_sendmail_auth.py: Sendmail's differences)."""
    run = milter(MACROS)
    pf = postfix(milter=f"inet:127.0.0.1:{run.port}", sasl_users=dict([ALICE]))
    results = send_all(pf, {
        "anonymous": {"mail_options": ["AUTH=<boss@example.org>"]},
        "failed": {"failed_login": ALICE[0], "mail_options": ["AUTH=<alice@example.org>"]},
        "logged in": {"login": ALICE, "mechanism": "LOGIN", "mail_options": ["AUTH=<>"]},
    })
    failed = results["failed"].failed_auth
    assert failed is not None and failed.code == 535, results["failed"]
    assert macros_seen(pf, 3) == {
        "anonymous": ["auth_authen=; auth_type=; auth_author=<boss@example.org>; auth_ssf="] * 2,
        "failed": ["auth_authen=; auth_type=; auth_author=<alice@example.org>; auth_ssf="] * 2,
        "logged in": ["auth_authen=alice; auth_type=LOGIN; auth_author=; auth_ssf="] * 2,
    }


def test_a_filters_envfrom_list_without_the_auth_macros_hides_the_login(postfix, milter) -> None:
    """A list asked for with setsymlist replaces milter_mail_macros for that filter."""
    run = milter(MACROS, env={"ENVFROM_MACROS": "i {mail_addr}"})
    pf = postfix(milter=f"inet:127.0.0.1:{run.port}", sasl_users=dict([ALICE]))
    send_all(pf, {"logged in": {"login": ALICE}})
    assert macros_seen(pf, 1) == {"logged in": ["auth_authen=; auth_type=; auth_author=; auth_ssf="] * 2}


def test_a_sasl_local_domain_is_appended_to_the_login(postfix, milter) -> None:
    """With smtpd_sasl_local_domain set, Cyrus (given it as the user realm) qualifies a login
    without a realm, and {auth_authen} is then ``user@domain``, not the name the client typed: a
    script that compares it with a list of users must list them so (docs/deployment.md)."""
    run = milter(MACROS)
    pf = postfix(milter=f"inet:127.0.0.1:{run.port}", sasl_users=dict([ALICE]),
                 settings={"smtpd_sasl_local_domain": "$myhostname"})  # the realm the sasldb holds alice in
    send_all(pf, {"logged in": {"login": ALICE}})
    assert macros_seen(pf, 1) == {
        "logged in": ["auth_authen=alice@harness.test; auth_type=PLAIN; auth_author=; auth_ssf="] * 2}
