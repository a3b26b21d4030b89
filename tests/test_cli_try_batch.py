"""``pytclmilter try`` on an archive, as a mail admin tries a rule on old mail before going live.

A directory of ``.eml`` files or an mbox (written by Python's ``mailbox``, as an MDA writes one,
``From `` lines in bodies quoted) goes through a script, one connection per message: a line per
message and a summary of verdicts. Driven through ``pexpect`` like the rest of tests/test_cli.py.
"""

from __future__ import annotations

import mailbox
import os
from pathlib import Path

from test_cli import BLACKLIST, DATA, GREYLIST, PYTCLMILTER, ROOT, cli
from support.tclrun import child_env

import pexpect

#: A message whose body has a line starting with "From " (an mbox writer quotes it as ">From ").
FROM_IN_BODY = (b"From: Carol <carol@example.com>\nTo: bob@example.com\nSubject: Minutes\n"
                b"Message-ID: <minutes.1@example.com>\n\nHello Bob,\n\nFrom now on we meet on Mondays.\n"
                b"\nCarol\n")

PLAIN = 'plain.eml: accept at eom, 0 modifications; from <alice@example.org>, subject "Lunch on Friday?"'
LATIN1 = 'latin1.eml: accept at eom, 0 modifications; from <dominique@example.fr>, subject "Café"'
SPAMMER = ('blacklisted.eml: reject at envfrom, 0 modifications; from <spammer@spamdomain.com>, '
           'subject "You have won!!!"')


def archive_dir(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "archive"
    d.mkdir()
    for name in names:
        (d / name).write_bytes((DATA / name).read_bytes())
    return d


def write_mbox(path: Path, *messages: bytes) -> Path:
    box = mailbox.mbox(str(path))
    for raw in messages:
        box.add(raw)
    box.close()
    return path


def output_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line]


# ============================================================================ a directory


def test_try_directory_prints_a_line_per_message_in_name_order_and_a_summary(tmp_path: Path) -> None:
    d = archive_dir(tmp_path, "plain.eml", "latin1.eml", "blacklisted.eml")
    (d / "notes.txt").write_text("not a message\n")
    (d / "older").mkdir()
    (d / "older" / "old.eml").write_bytes((DATA / "plain.eml").read_bytes())
    (d / "outside.eml").symlink_to(DATA / "blacklisted-from.eml")  # not followed
    status, out = cli("try", str(BLACKLIST), str(d))
    assert output_lines(out) == [
        SPAMMER,
        LATIN1,
        PLAIN,
        f"pytclmilter try: {d}: 3 entries ignored (only regular *.eml files directly in the directory "
        "are read; symbolic links are not followed)",
        "summary: 3 messages: 2 accept, 1 reject",
    ], out
    assert status == 0


def test_try_directory_reports_a_malformed_message_on_its_line_and_goes_on(tmp_path: Path) -> None:
    d = archive_dir(tmp_path, "plain.eml", "blacklisted.eml")
    (d / "a-notes.eml").write_text("Shopping list\n\nmilk, eggs\n")
    (d / "b-empty.eml").write_bytes(b"")
    (d / "c-truncated.eml").write_bytes(b"From: x@example.com\nSubject: cut\n<html>\n\nbody\n")
    status, out = cli("try", str(BLACKLIST), str(d))
    assert output_lines(out) == [
        "a-notes.eml: error: no header fields (the first line is not NAME: value)",
        "b-empty.eml: error: empty message",
        SPAMMER,
        "c-truncated.eml: error: line 3 of the header section is not a header field",
        PLAIN,
        "summary: 5 messages: 1 accept, 1 reject, 3 not tried",
    ], out
    assert status == 2


def test_try_escapes_what_an_archive_puts_on_a_line(tmp_path: Path) -> None:
    """A subject (decoded from RFC 2047) or a file name from an archive cannot start a line of
    its own or reach the terminal as an escape sequence."""
    d = tmp_path / "archive"
    d.mkdir()
    (d / "evil\nsummary: 0 messages.eml").write_bytes(
        b"From: mallory@example.com\nTo: bob@example.com\n"
        b"Subject: =?utf-8?q?hi=0Asummary:_99_messages=1B[2J?=\n\nx\n")
    status, out = cli("try", str(BLACKLIST), str(d))
    assert output_lines(out) == [
        r'evil\nsummary: 0 messages.eml: accept at eom, 0 modifications; from <mallory@example.com>, '
        r'subject "hi\nsummary: 99 messages\x1b[2J"',
        "summary: 1 message: 1 accept",
    ], out
    assert status == 0


# ============================================================================ an mbox


def test_try_mbox_with_a_from_line_in_a_body(tmp_path: Path) -> None:
    box = write_mbox(tmp_path / "archive.mbox", (DATA / "plain.eml").read_bytes(),
                     FROM_IN_BODY, (DATA / "latin1.eml").read_bytes(), (DATA / "blacklisted.eml").read_bytes())
    assert b"\n>From now on" in box.read_bytes()  # as an MDA writes it
    status, out = cli("try", str(BLACKLIST), str(box))
    assert output_lines(out) == [
        '#1: accept at eom, 0 modifications; from <alice@example.org>, subject "Lunch on Friday?"',
        '#2: accept at eom, 0 modifications; from <carol@example.com>, subject "Minutes"',
        '#3: accept at eom, 0 modifications; from <dominique@example.fr>, subject "Café"',
        '#4: reject at envfrom, 0 modifications; from <spammer@spamdomain.com>, subject "You have won!!!"',
        "summary: 4 messages: 3 accept, 1 reject",
    ], out
    assert status == 0


def test_try_mbox_from_standard_input(tmp_path: Path) -> None:
    box = write_mbox(tmp_path / "archive.mbox", (DATA / "plain.eml").read_bytes(),
                     (DATA / "blacklisted.eml").read_bytes())
    child = pexpect.spawn("/bin/sh", ["-c", f'exec "$@" < {box}', "sh", *PYTCLMILTER, "try", str(BLACKLIST), "-"],
                          env=child_env(None), cwd=str(ROOT), encoding="utf-8", timeout=30, echo=False)
    out = child.read().replace("\r\n", "\n")
    child.close()
    assert output_lines(out)[-1] == "summary: 2 messages: 1 accept, 1 reject", out
    assert child.exitstatus == 0


def test_try_batch_is_one_script_instance_with_a_connection_per_message(tmp_path: Path) -> None:
    """As behind a real MTA, the script's state carries over from one message to the next:
    greylisting with no delay refuses a triplet the first time and lets its retry through."""
    plain = (DATA / "plain.eml").read_bytes()
    box = write_mbox(tmp_path / "archive.mbox", plain, plain)
    env = {"GREYLIST_STATE": str(tmp_path / "greylist.db"), "GREYLIST_DELAY": "0"}
    status, out = cli("try", str(GREYLIST), str(box), env=env)
    assert output_lines(out) == [
        '#1: tempfail at envrcpt "no recipient accepted", 0 modifications, 1 recipient rejected; '
        'from <alice@example.org>, subject "Lunch on Friday?"',
        '#2: accept at eom, 0 modifications; from <alice@example.org>, subject "Lunch on Friday?"',
        "summary: 2 messages: 1 accept, 1 tempfail",
    ], out
    assert status == 0


def test_try_batch_usage_errors(tmp_path: Path) -> None:
    d = archive_dir(tmp_path, "plain.eml")
    status, out = cli("try", str(BLACKLIST), str(d), "--json")
    assert status == 64 and "pytclmilter try: --json reports on a single message" in out
    status, out = cli("try", str(BLACKLIST), str(tmp_path / "nowhere"))
    assert status == 66 and "nowhere: No such file or directory" in out
    assert os.listdir(d) == ["plain.eml"]
