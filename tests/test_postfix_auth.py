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

pytestmark = pytest.mark.postfix

ALICE = ("alice", "alice's secret")

# A long macro name keeps its braces in the value: {{auth_authen}} in Tcl (tcl-reference.md).
SCRIPT = r"""
package require TclMilter 1.0
milter configure -name AuthPolicy

proc auth_envfrom { context fromList } {
    if {[$context getsymval {{auth_authen}}] eq ""} {
        $context setreply 550 5.7.1 "log in first: this server relays only for its users"
        return SMFIS_REJECT
    }
    return SMFIS_CONTINUE
}

proc auth_eom { context } {
    set value "[$context getsymval {{auth_authen}}] with [$context getsymval {{auth_type}}]"
    set author [$context getsymval {{auth_author}}]
    if {$author ne ""} {
        append value " for $author"
    }
    $context addheader X-Authenticated-User $value
    return SMFIS_CONTINUE
}

milter register envfrom auth_envfrom
milter register eom auth_eom
milter main
"""


def message(subject: str) -> bytes:
    return (f"From: alice@example.org\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@test>\r\n\r\nHello.\r\n").encode()


@pytest.fixture
def auth_policy(tmp_path: Path) -> Iterator[str]:
    """The script above under `pytclmilter run`; yields Postfix's address for it."""
    script = tmp_path / "authpolicy.tcl"
    script.write_text(SCRIPT)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pytclmilter.cli", "run", str(script), "--connection", "inet:0@127.0.0.1"],
        cwd=str(tmp_path), encoding="utf-8", timeout=20,
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
