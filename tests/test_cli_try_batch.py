"""``pytclmilter try`` on an archive, as a mail admin tries a rule on old mail before going live.

A directory of ``.eml`` files or an mbox (written by Python's ``mailbox``, as an MDA writes one,
``From `` lines in bodies quoted) goes through a script, one connection per message: a line per
message and a summary of verdicts; ``--compare OTHER.tcl`` lists only the messages the two
scripts treat differently. Driven through ``pexpect`` like the rest of tests/test_cli.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mailbox
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from test_cli import (BLACKLIST, DATA, GREYLIST, GREYLIST_STORE, PYTCLMILTER, ROOT, STAMP, cli,
                      without_root_privileges)
from pytclmilter.client.archive import MAX_SIZE, _read_at
from support.tclrun import child_env

import pexpect
import pytest

#: blacklist.tcl without friend@public.com: differs from the original on blacklisted-from.eml only.
LENIENT_BLACKLIST = BLACKLIST.read_text().replace("    friend@public.com\n", "")

#: A script that sends each message's body back as its new body: the digest of the replaced body
#: on the --compare line shows the bytes the script was given.
ECHO_BODY = """package require TclMilter 1.0
proc body_cb { context data } {
    append ::body($context) $data
    return SMFIS_CONTINUE
}
proc eom_cb { context } {
    $context replacebody $::body($context)
    unset ::body($context)
    return SMFIS_CONTINUE
}
milter register body body_cb
milter register eom eom_cb
milter main
"""
NOTHING = "package require TclMilter 1.0\nmilter main\n"

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


def crlf_body(raw: bytes) -> bytes:
    """The body as the MTA sends it: after the first empty line, CRLF line ends."""
    return raw.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


def replacebody(body: bytes) -> str:
    return f"replacebody ({len(body)} bytes, sha256 {hashlib.sha256(body).hexdigest()[:12]})"


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


def test_try_does_not_send_a_message_with_a_nul_byte_in_its_header_section(tmp_path: Path) -> None:
    """A NUL byte cannot be sent in a header (the protocol ends its strings with one): in a
    directory or an mbox, a message with one in its header section is not tried; one with a NUL
    in its body is sent as it is."""
    in_header = b"From: a@example.org\nTo: b@example.com\nSubject: cut\0here\n\nbody\n"
    in_body = b"From: a@example.org\nTo: b@example.com\nSubject: binary\n\nbo\0dy\n"
    d = tmp_path / "archive"
    d.mkdir()
    (d / "nul-body.eml").write_bytes(in_body)
    (d / "nul-header.eml").write_bytes(in_header)
    box = write_mbox(tmp_path / "archive.mbox", in_body, in_header)
    for source, first, second in ((d, "nul-body.eml", "nul-header.eml"), (box, "#1", "#2")):
        status, out = cli("try", str(BLACKLIST), str(source))
        assert output_lines(out) == [
            f'{first}: accept at eom, 0 modifications; from <a@example.org>, subject "binary"',
            f"{second}: error: a NUL byte in the header section",
            "summary: 2 messages: 1 accept, 1 not tried",
        ], out
        assert status == 2


def test_try_reads_crlf_messages_folded_headers_and_eml_in_any_case(tmp_path: Path) -> None:
    """A directory's *.eml files in any case (X.EML too), messages with CRLF line ends (as saved
    from an IMAP client) and headers folded with a tab are tried; a file of blank lines is an
    empty message. A folded subject is shown unfolded."""
    plain = (DATA / "plain.eml").read_bytes()
    d = tmp_path / "archive"
    d.mkdir()
    (d / "CRLF.EML").write_bytes(plain.replace(b"\n", b"\r\n"))
    (d / "blank.eml").write_bytes(b"\r\n\n \n")
    (d / "folded.eml").write_bytes(b"From: a@example.org\nTo: b@example.com,\n\tc@example.com\n"
                                   b"Subject: Lunch\n on Friday?\n\nbody\n")
    status, out = cli("try", str(BLACKLIST), str(d))
    assert output_lines(out) == [
        PLAIN.replace("plain.eml", "CRLF.EML"),
        "blank.eml: error: empty message",
        'folded.eml: accept at eom, 0 modifications; from <a@example.org>, subject "Lunch on Friday?"',
        "summary: 3 messages: 2 accept, 1 not tried",
    ], out
    assert status == 2


def test_try_compare_counts_the_entries_it_ignored_once(tmp_path: Path) -> None:
    """--compare lists the directory twice (once per script): the entries left out are counted once."""
    d = archive_dir(tmp_path, "plain.eml")
    (d / "notes.txt").write_text("not a message\n")
    status, out = cli("try", str(BLACKLIST), str(d), "--compare", str(BLACKLIST))
    assert output_lines(out) == [
        f"pytclmilter try: {d}: 1 entry ignored (only regular *.eml files directly in the directory are read; "
        "symbolic links are not followed)",
        "summary: 1 message, 0 differ",
    ], out
    assert status == 0


def test_a_file_of_a_directory_is_opened_refusing_a_link_or_a_fifo(tmp_path: Path) -> None:
    """The listing leaves out links and what is not a regular file; a name swapped after it (a
    link to a file elsewhere, a FIFO) is refused when it is opened, never read or waited on."""
    d = tmp_path / "archive"
    d.mkdir()
    (d / "link.eml").symlink_to(DATA / "plain.eml")
    os.mkfifo(d / "fifo.eml")
    dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link, fifo = _read_at(dirfd, "link.eml", MAX_SIZE), _read_at(dirfd, "fifo.eml", MAX_SIZE)
    finally:
        os.close(dirfd)
    assert (link.raw, link.error) == (b"", os.strerror(errno.ELOOP))
    assert (fifo.raw, fifo.error) == (b"", "not a regular file")


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


#: Rejects the blacklist's spammer with a reply of two lines, holds every other message.
HOLD_ALL = """package require TclMilter 1.0
proc ef {ctx from} {
    if {[string match *spammer* [lindex $from 0]]} {
        $ctx setmlreply 550 5.7.1 "go away" "and stay away"
        return SMFIS_REJECT
    }
    return SMFIS_CONTINUE
}
proc eom {ctx} { $ctx quarantine "held for review"; return SMFIS_CONTINUE }
milter register envfrom ef
milter register eom eom
milter main
"""


def test_try_batch_lines_of_a_quarantine_a_reply_of_two_lines_and_a_message_without_subject(
        tmp_path: Path) -> None:
    """A quarantine is the verdict, with its reason, not a modification (exit 0: every message was
    tried); the CRLF between the lines of a reply is escaped on its message's line; a message
    without a subject is named by its Message-ID."""
    d = archive_dir(tmp_path, "plain.eml", "blacklisted.eml")
    (d / "no-subject.eml").write_bytes(b"From: a@example.org\nTo: b@example.com\nMessage-ID: <n.1@example.org>\n"
                                       b"\nbody\n")
    script = tmp_path / "hold.tcl"
    script.write_text(HOLD_ALL)
    status, out = cli("try", str(script), str(d))
    assert output_lines(out) == [
        r'blacklisted.eml: reject at envfrom "550-5.7.1 go away\r\n550 5.7.1 and stay away", 0 modifications; '
        'from <spammer@spamdomain.com>, subject "You have won!!!"',
        'no-subject.eml: quarantine at eom "held for review", 0 modifications; from <a@example.org>, '
        "id <n.1@example.org>",
        'plain.eml: quarantine at eom "held for review", 0 modifications; from <alice@example.org>, '
        'subject "Lunch on Friday?"',
        "summary: 3 messages: 1 reject, 2 quarantine",
    ], out
    assert status == 0


#: A header longer than a milter packet (65535 bytes): the filter closes the connection.
HUGE_HEADER = b"From: a@example.org\nTo: b@example.com\nSubject: huge\nX-Big: " + b"x" * 70000 + b"\n\nbody\n"
BROKEN = r'tempfail at \w+ "milter failure: [^"]+", 0 modifications, error: .+'


def test_try_batch_whose_conversation_with_the_filter_failed_exits_2(tmp_path: Path) -> None:
    """A message whose conversation broke has its line with the error; the batch goes on and
    exits 2, as for a message that could not be tried. --compare lists it even when both scripts
    broke alike, and exits 2 too."""
    d = archive_dir(tmp_path, "plain.eml")
    (d / "huge.eml").write_bytes(HUGE_HEADER)
    status, out = cli("try", str(BLACKLIST), str(d), "--log-level", "error")  # (not its warning)
    lines = output_lines(out)
    assert re.fullmatch(rf'huge\.eml: {BROKEN}; from <a@example\.org>, subject "huge"', lines[0]), out
    assert lines[1:] == [PLAIN, "summary: 2 messages: 1 accept, 1 tempfail"], out
    assert status == 2
    status, out = cli("try", str(BLACKLIST), str(d), "--compare", str(BLACKLIST), "--log-level", "error")
    lines = output_lines(out)
    assert lines[0] == 'huge.eml: from <a@example.org>, subject "huge"', out
    assert all(re.fullmatch(rf"  {re.escape(str(BLACKLIST))}: {BROKEN}", line) for line in lines[1:3]), out
    assert re.fullmatch(r"summary: 2 messages, [01] differs?", lines[3]) and len(lines) == 4, out
    assert status == 2


def test_try_a_new_body_longer_than_a_packet_is_one_modification_of_the_whole_body(tmp_path: Path) -> None:
    """A script's new body goes out in packets of 65535 bytes: on a batch's line and in --compare
    it is one replacebody, its length and digest those of the whole body, and one message's
    report shows all of it."""
    big = (DATA / "big.eml").read_bytes()
    assert len(crlf_body(big)) > 2 * 65535
    d = archive_dir(tmp_path, "big.eml")
    echo, nothing = tmp_path / "echo.tcl", tmp_path / "nothing.tcl"
    echo.write_text(ECHO_BODY)
    nothing.write_text(NOTHING)
    status, out = cli("try", str(echo), str(d), "--compare", str(nothing))
    assert output_lines(out) == [
        'big.eml: from <carol@example.org>, subject "Quarterly report (scanned)"',
        f"  {echo}:    accept at eom, 1 modification",
        f"      {replacebody(crlf_body(big))}",
        f"  {nothing}: accept at eom, 0 modifications",
        "summary: 1 message, 1 differs",
    ], out
    assert status == 1
    # (through a pipe: a pty mangles a line this long)
    proc = subprocess.run([*PYTCLMILTER, "try", str(echo), str(DATA / "big.eml"), "--json"], env=child_env(),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = json.loads(proc.stdout)["message"]["text"].encode()
    assert text.endswith(b"\r\n\r\n" + crlf_body(big)), text[-300:]


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


def test_try_mbox_hands_every_byte_of_8bit_bodies_to_the_script(tmp_path: Path) -> None:
    """The body a script gets is the message's, byte for byte (Latin-1 included), and the quoted
    ">From " line stays as the mbox holds it."""
    latin1 = (DATA / "latin1.eml").read_bytes()
    assert re.search(rb"[\x80-\xff]", crlf_body(latin1))
    box = write_mbox(tmp_path / "archive.mbox", latin1, FROM_IN_BODY)
    echo, nothing = tmp_path / "echo.tcl", tmp_path / "nothing.tcl"
    echo.write_text(ECHO_BODY)
    nothing.write_text(NOTHING)
    status, out = cli("try", str(echo), str(box), "--compare", str(nothing))
    quoted = FROM_IN_BODY.replace(b"\nFrom now", b"\n>From now")
    assert output_lines(out) == [
        '#1: from <dominique@example.fr>, subject "Café"',
        f"  {echo}:    accept at eom, 1 modification",
        f"      {replacebody(crlf_body(latin1))}",
        f"  {nothing}: accept at eom, 0 modifications",
        '#2: from <carol@example.com>, subject "Minutes"',
        f"  {echo}:    accept at eom, 1 modification",
        f"      {replacebody(crlf_body(quoted))}",
        f"  {nothing}: accept at eom, 0 modifications",
        "summary: 2 messages, 2 differ",
    ], out
    assert status == 1


def test_try_mbox_from_standard_input(tmp_path: Path) -> None:
    box = write_mbox(tmp_path / "archive.mbox", (DATA / "plain.eml").read_bytes(),
                     (DATA / "blacklisted.eml").read_bytes())
    child = pexpect.spawn("/bin/sh", ["-c", f'exec "$@" < {box}', "sh", *PYTCLMILTER, "try", str(BLACKLIST), "-"],
                          env=child_env(None), cwd=str(ROOT), encoding="utf-8", timeout=30, echo=False, use_poll=True)
    out = child.read().replace("\r\n", "\n")
    child.close()
    assert output_lines(out)[-1] == "summary: 2 messages: 1 accept, 1 reject", out
    assert child.exitstatus == 0


def _stdout_line(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    """The next line ``proc`` prints, waiting ``timeout`` seconds at most for it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line within {timeout} s"
    return proc.stdout.readline().decode()


LUNCH = '#1: accept at eom, 0 modifications; from <alice@example.org>, subject "Lunch on Friday?"'


@pytest.fixture
def endless_stream() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``pytclmilter try ARGS -`` with its standard input a pipe the test writes and keeps open,
    as ``tail -f mbox |`` does."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*PYTCLMILTER, "try", *args, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=child_env(None), cwd=str(ROOT))
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_try_an_mbox_stream_that_stays_open_tries_each_message_once_its_end_is_known(endless_stream) -> None:
    """`tail -f mbox | pytclmilter try script.tcl -`: the stream was read to its end before any
    message was tried, so nothing was ever printed. Now a message is tried as soon as the next
    `From ` line shows where it ends, the last one at the end of the stream."""
    proc = endless_stream(str(BLACKLIST))
    assert proc.stdin is not None
    proc.stdin.write(b"From alice@example.org Fri Jan  5 12:00:00 2024\n" + (DATA / "plain.eml").read_bytes()
                     + b"\nFrom spammer@spamdomain.com Fri Jan  5 12:01:00 2024\n")
    proc.stdin.flush()
    assert _stdout_line(proc) == LUNCH + "\n"
    assert proc.poll() is None  # still reading
    out, err = proc.communicate((DATA / "blacklisted.eml").read_bytes(), timeout=30)  # (then its end)
    assert output_lines(out.decode()) == [SPAMMER.replace("blacklisted.eml", "#2"),
                                          "summary: 2 messages: 1 accept, 1 reject"], (out, err)
    assert proc.returncode == 0, err


def test_ctrl_c_on_an_mbox_stream_that_stays_open_lists_the_message_being_read(endless_stream) -> None:
    """Ctrl-C ends such a batch, the stream still open: the messages tried, the one whose end had
    not come yet as not tried, the summary (exit 2). The end of a stream cannot be waited for."""
    proc = endless_stream(str(BLACKLIST))
    assert proc.stdin is not None
    proc.stdin.write(b"From a Fri Jan  5 12:00:00 2024\n" + (DATA / "plain.eml").read_bytes()
                     + b"\nFrom b Fri Jan  5 12:01:00 2024\n" + (DATA / "blacklisted.eml").read_bytes())
    proc.stdin.flush()
    assert _stdout_line(proc) == LUNCH + "\n"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)  # (not communicate(): it would end the stream)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert output_lines(out.decode()) == ["#2: error: not tried: interrupted (SIGINT)",
                                          "summary: 2 messages: 1 accept, 1 not tried"], (out, err)
    assert err.decode().endswith("pytclmilter: interrupted (SIGINT): the messages from #2 on were not tried\n"), err
    assert proc.returncode == 2


def test_try_an_mbox_from_a_stream_is_cut_into_messages_as_from_its_file(tmp_path: Path) -> None:
    """Read as it comes, an mbox stream gives the messages it gives read from a file: no empty
    line before a `From ` line, a `From` that is no separator, CRLF line ends, an empty message,
    a message larger than --max-size, a last line without its line end."""
    plain = (DATA / "plain.eml").read_bytes()
    box = tmp_path / "odd.mbox"
    box.write_bytes(b"From a\n" + plain + b"From b\n" + plain.replace(b"\n", b"\r\n") + b"\nFrom c\n\n"
                    b"From d\n" + plain + b"Fromage\nFrom\n" + b"x" * 3000 + b"\n\nFrom e\n" + plain.rstrip())
    limit = str(len(plain) + 100)
    status, from_file = cli("try", str(BLACKLIST), str(box), "--max-size", limit)
    streamed, piped = run_in_bash(f"- < <(cat {box})", "try", str(BLACKLIST), "--max-size", limit)
    assert (streamed, output_lines(piped)) == (status, output_lines(from_file)), (from_file, piped)
    assert "#3: error: empty message" in from_file and "#4: error: larger than" in from_file, from_file
    assert output_lines(from_file)[-1] == "summary: 5 messages: 3 accept, 2 not tried", from_file


def spawn_in_bash(command: str, *args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    """``pytclmilter ARGS`` run by bash as ``"$@" COMMAND``: COMMAND may use process substitution."""
    return pexpect.spawn("bash", ["-c", f'"$@" {command}', "bash", *PYTCLMILTER, *args], env=child_env(env),
                         cwd=str(ROOT), encoding="utf-8", timeout=30, echo=False, use_poll=True)


def run_in_bash(command: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    child = spawn_in_bash(command, *args, env=env)
    out = child.read().replace("\r\n", "\n")
    child.close()
    return child.exitstatus, out


def test_try_reads_a_message_or_an_mbox_from_a_pipe_it_can_read_only_once(tmp_path: Path) -> None:
    """A process substitution or a named FIFO: try read its first bytes to tell an mbox from a
    message, then opened it again and found it empty (a message: "accepted", with nothing in it),
    or could not seek it (an mbox: a traceback)."""
    status, out = run_in_bash(f"<(cat {DATA / 'blacklisted.eml'})", "try", str(BLACKLIST))
    assert "verdict: reject at envfrom" in out and "<spammer@spamdomain.com>" in out, out
    assert status == 1
    box = write_mbox(tmp_path / "archive.mbox", (DATA / "plain.eml").read_bytes(),
                     (DATA / "blacklisted.eml").read_bytes())
    status, out = run_in_bash(f"<(cat {box})", "try", str(BLACKLIST))
    assert output_lines(out) == ['#1: accept at eom, 0 modifications; from <alice@example.org>, subject '
                                 '"Lunch on Friday?"', SPAMMER.replace("blacklisted.eml", "#2"),
                                 "summary: 2 messages: 1 accept, 1 reject"], out
    assert status == 0
    fifo = tmp_path / "message.fifo"
    os.mkfifo(fifo)
    status, out = run_in_bash(f"{fifo} & cat {box} > {fifo}; wait", "try", str(BLACKLIST))
    assert output_lines(out)[-1] == "summary: 2 messages: 1 accept, 1 reject", out
    assert status == 0


@pytest.fixture
def try_tmpdir() -> Iterator[Path]:
    """A TMPDIR short enough for try's sockets in it, removed after the test. Under tmp_path, as
    deep as pytest-xdist's workers make it (.../popen-gw0/...), try puts its directory in /tmp
    instead (workdir.py), and a test that looks for what it left in its TMPDIR sees nothing."""
    tmp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("message", ["file", "stdin"])
def test_ctrl_c_while_the_script_loads_leaves_no_temporary_directory(tmp_path: Path, message: str,
                                                                      try_tmpdir: Path) -> None:
    """Ctrl-C while the script loads ends try at once, as under tclsh: its temporary directory
    (and a copy of standard input in it) stayed in /tmp."""
    script = tmp_path / "loop.tcl"
    script.write_text("package require TclMilter\nputs looping\nwhile 1 {}\nmilter main\n")
    tmp = try_tmpdir
    source = f"< {DATA / 'plain.eml'} -" if message == "stdin" else str(DATA / "plain.eml")
    child = spawn_in_bash(source, "try", str(script), env={"TMPDIR": str(tmp)})
    try:
        child.expect("looping")
        assert len(os.listdir(tmp)) == 1  # it was there while try ran
        child.sendintr()
        child.expect(pexpect.EOF, timeout=5)
    finally:
        child.close(force=True)
    for _ in range(50):
        if not os.listdir(tmp):
            break
        time.sleep(0.1)
    assert os.listdir(tmp) == []


def test_try_batch_is_one_script_instance_with_a_connection_per_message(tmp_path: Path) -> None:
    """As behind a real MTA, the script's state carries over from one message to the next:
    greylisting with no delay refuses a triplet the first time and lets its retry through."""
    plain = (DATA / "plain.eml").read_bytes()
    box = write_mbox(tmp_path / "archive.mbox", plain, plain)
    env = {"GREYLIST_STORE": f"sqlite:{tmp_path / 'greylist.sqlite'}", "GREYLIST_DELAY": "0"}
    status, out = cli("try", *GREYLIST_STORE, str(GREYLIST), str(box), env=env)
    assert output_lines(out) == [
        '#1: tempfail at envrcpt "no recipient accepted", 0 modifications, 1 recipient rejected; '
        'from <alice@example.org>, subject "Lunch on Friday?"',
        '#2: accept at eom, 0 modifications; from <alice@example.org>, subject "Lunch on Friday?"',
        "summary: 2 messages: 1 accept, 1 tempfail",
    ], out
    assert status == 0


def test_try_batch_ends_where_the_script_stops_serving(tmp_path: Path) -> None:
    """A callback that calls `milter stop`: the message it was called for is answered (the open
    connection gets its grace), the next one finds the socket gone and the batch ends there."""
    script = tmp_path / "stopper.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "proc ef { context args } { milter stop; return SMFIS_CONTINUE }\n"
                      "milter register envfrom ef\nmilter main\n")
    plain = (DATA / "plain.eml").read_bytes()
    box = write_mbox(tmp_path / "archive.mbox", plain, plain, plain)
    status, out = cli("try", str(script), str(box))
    assert output_lines(out) == [
        '#1: accept at eom, 0 modifications; from <alice@example.org>, subject "Lunch on Friday?"',
        f"pytclmilter: {script} no longer serves ([Errno 2] No such file or directory): the messages from #2 "
        "on were not tried",
        "#2: error: not tried: the filter stopped serving",
        "#3: error: not tried: the filter stopped serving",  # (the batch ended at #2: uncounted)
        "summary: 3 messages: 1 accept, 2 not tried",
    ], out
    assert status == 2


def test_try_batch_gives_each_message_its_queue_id_and_a_malformed_one_its_reason_after_a_stop(
        tmp_path: Path) -> None:
    """Message N of a batch has queue id 4TRY followed by N in 7 digits; once the script stopped
    serving, a message that could not have been tried anyway keeps its own reason."""
    script = tmp_path / "queue-ids.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "proc eom {ctx} { puts \"seen: i=[$ctx getsymval i]\"\n"
                      "    if {[incr ::n] == 2} { milter stop }\n    return SMFIS_CONTINUE }\n"
                      "milter register eom eom\nmilter main\n")
    plain = (DATA / "plain.eml").read_bytes()
    box = write_mbox(tmp_path / "archive.mbox", plain, plain, plain, b"Shopping list\n\nmilk, eggs\n")
    status, out = cli("try", str(script), str(box))
    assert [line.strip() for line in out.splitlines() if line.startswith("seen: ")] == [
        "seen: i=4TRY0000001", "seen: i=4TRY0000002"], out
    assert [line for line in output_lines(out) if not line.startswith(("seen: ", "#1: ", "#2: "))] == [
        f"pytclmilter: {script} no longer serves ([Errno 2] No such file or directory): the messages from #3 "
        "on were not tried",
        "#3: error: not tried: the filter stopped serving",
        "#4: error: no header fields (the first line is not NAME: value)",
        "summary: 4 messages: 2 accept, 2 not tried",
    ], out
    assert status == 2


def test_try_compare_counts_a_message_the_first_script_deleted_as_not_tried(tmp_path: Path) -> None:
    """The directory is listed once per script: a file gone by the other's run (here the first
    script deletes it) is counted, as not tried."""
    d = archive_dir(tmp_path, "blacklisted.eml", "plain.eml")
    deleter = tmp_path / "deleter.tcl"
    deleter.write_text("package require TclMilter 1.0\n"
                       f"proc ef {{ctx from}} {{ file delete {{{d / 'plain.eml'}}}; return SMFIS_CONTINUE }}\n"
                       "milter register envfrom ef\nmilter main\n")
    status, out = cli("try", str(deleter), str(d), "--compare", str(deleter))
    assert output_lines(out) == ["summary: 2 messages, 0 differ, 1 not tried"], out
    assert status == 2


def test_try_serves_the_script_from_a_directory_only_its_user_may_enter(tmp_path: Path) -> None:
    script = tmp_path / "where.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "regexp {^unix:(.*)$} [milter configure -connection] -> socket\n"
                      "puts \"seen: [file attributes [file dirname $socket] -permissions]\"\n"
                      "milter main\n")
    status, out = cli("try", str(script), str(DATA / "plain.eml"))
    assert status == 0, out
    assert "seen: 040700" in out, out  # (a directory, rwx for its owner alone)


def test_try_with_a_temporary_directory_too_deep_for_a_socket_path(tmp_path: Path) -> None:
    """try serves the script on a unix socket in a directory of its own under TMPDIR; a TMPDIR
    deep enough that the socket's path passed 106 bytes failed every try with a usage error (exit
    64) about a connection the user never gave. Then the directory goes in /tmp instead."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    status, out = cli("try", str(BLACKLIST), str(DATA / "plain.eml"), env={"TMPDIR": str(deep)})
    assert (status, "verdict: accept at eom\n" in out) == (0, True), out
    assert os.listdir(deep) == []


def test_try_one_message_when_the_script_stops_serving_before_its_answer(tmp_path: Path) -> None:
    """`milter stop` at MAIL and an end-of-message callback that outlasts try's 5 s of grace: the
    milter stops before the message was answered. try says so (exit 70), with no report: there
    is no verdict to report. The milter's log says the stop's grace cut the callback short."""
    script = tmp_path / "stops.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "proc ef {ctx from} { milter stop; return SMFIS_CONTINUE }\n"
                      "proc eom {ctx} { after 7000; return SMFIS_CONTINUE }\n"
                      "milter register envfrom ef\nmilter register eom eom\nmilter main\n")
    status, out = cli("try", str(script), str(DATA / "plain.eml"))
    assert status == 70 and out.endswith(f"pytclmilter: {script} stopped serving before every message was tried\n"), out
    assert "eom callback eom failed (callback stopped after" in out and "the stop's 5 s grace was over" in out, out
    assert "verdict:" not in out, out


STOPPER = ("package require TclMilter 1.0\n"
           "proc ef { context args } { milter stop; return SMFIS_CONTINUE }\n"
           "milter register envfrom ef\nmilter main\n")
LUNCH = '#1: accept at eom, 0 modifications; from <alice@example.org>, subject "Lunch on Friday?"'


@pytest.mark.parametrize("stops", ["first", "other"])
def test_try_compare_counts_every_message_once_when_a_script_stops_serving(tmp_path: Path, stops: str) -> None:
    """When the first script stopped, the summary counted only the messages it had reached
    ("2 messages, 0 differ, 2 not tried" of 3); when the other did, the messages after it stopped
    had no line."""
    stopper, nothing = tmp_path / "stopper.tcl", tmp_path / "nothing.tcl"
    stopper.write_text(STOPPER)
    nothing.write_text(NOTHING)
    plain = (DATA / "plain.eml").read_bytes()
    box = write_mbox(tmp_path / "archive.mbox", plain, plain, plain)
    scripts = (stopper, nothing) if stops == "first" else (nothing, stopper)
    status, out = cli("try", str(scripts[0]), str(box), "--compare", str(scripts[1]))
    why = "not tried by the first script" if stops == "first" else "not tried: the filter stopped serving"
    assert output_lines(out) == [
        f"pytclmilter: {stopper} no longer serves ([Errno 2] No such file or directory): the messages from #2 "
        "on were not tried",
        f"#2: error: {why}",
        f"#3: error: {why}",
        "summary: 3 messages, 0 differ, 2 not tried",
    ], out
    assert status == 2


BUSY_AT_THE_SECOND = """package require TclMilter 1.0
proc ef { context args } {
    if {[incr ::n] == 2} { puts stderr busy; flush stderr; after 1000 }
    return SMFIS_CONTINUE
}
milter register envfrom ef
milter main
"""


@pytest.mark.parametrize("compare", [False, True], ids=["batch", "compare"])
def test_ctrl_c_during_a_batch_counts_every_message_once(tmp_path: Path, compare: bool) -> None:
    """Ctrl-C while a batch runs: the message being tried is answered, the others are listed and
    counted as not tried ("interrupted"); the summary counted only those reached, and with
    --compare the other script then ran over the whole archive all the same."""
    script, nothing = tmp_path / "busy.tcl", tmp_path / "nothing.tcl"
    script.write_text(BUSY_AT_THE_SECOND)
    nothing.write_text(NOTHING)
    plain = (DATA / "plain.eml").read_bytes()
    box = write_mbox(tmp_path / "archive.mbox", plain, plain, plain, plain)
    other = ["--compare", str(nothing)] if compare else []
    child = pexpect.spawn(PYTCLMILTER[0], [*PYTCLMILTER[1:], "try", str(script), str(box), *other],
                          env=child_env(), encoding="utf-8", timeout=30, echo=False, use_poll=True)
    child.expect("busy")
    child.sendintr()
    out = child.read().replace("\r\n", "\n")
    child.close()
    lines = [line.lstrip("^C") for line in output_lines(out)]
    not_tried = [f"#{n}: error: not tried: interrupted (SIGINT)" for n in ((1, 2, 3, 4) if compare else (3, 4))]
    note = "pytclmilter: interrupted (SIGINT): the messages from #3 on were not tried"
    if compare:
        assert lines == [note, *not_tried, "summary: 4 messages, 0 differ, 4 not tried"], out
    else:
        assert lines == [LUNCH.replace("#1", "#2"), note, *not_tried, "summary: 4 messages: 2 accept, 2 not tried"], out
    assert child.exitstatus == 2




# ============================================================================ --compare


def test_try_compare_lists_only_the_messages_whose_verdict_differs(tmp_path: Path) -> None:
    d = archive_dir(tmp_path, "plain.eml", "latin1.eml", "blacklisted.eml", "blacklisted-from.eml")
    lenient = tmp_path / "lenient.tcl"
    lenient.write_text(LENIENT_BLACKLIST)
    status, out = cli("try", str(BLACKLIST), str(d), "--compare", str(lenient))
    width = max(len(str(BLACKLIST)), len(str(lenient))) + 1  # the verdicts line up
    assert output_lines(out) == [
        'blacklisted-from.eml: from <bounces@lists.example.net>, subject "Hello old friend"',
        f"  {str(BLACKLIST) + ':':{width}} reject at eom, 0 modifications",
        f"  {str(lenient) + ':':{width}} accept at eom, 0 modifications",
        "summary: 4 messages, 1 differs",
    ], out
    assert status == 1
    status, out = cli("try", str(BLACKLIST), str(d), "--compare", str(BLACKLIST))
    assert output_lines(out) == ["summary: 4 messages, 0 differ"], out
    assert status == 0


THREAD_ID_AT_EOM = r"""
package require TclMilter 1.0
proc eom {ctx} { $ctx addheader X-Main [thread::id]; return SMFIS_CONTINUE }
milter register eom eom
milter main
"""


def test_try_compare_of_two_scripts_using_threads_says_why_the_second_cannot(tmp_path: Path) -> None:
    """Both scripts run in one process, and Thread sends to the interpreter of the first that used
    it: the second's thread:: command fails saying so (it neither crashes nor reaches the first)."""
    first, second = tmp_path / "first.tcl", tmp_path / "second.tcl"
    first.write_text(THREAD_ID_AT_EOM)
    second.write_text(THREAD_ID_AT_EOM)
    status, out = cli("try", str(first), str(DATA / "plain.eml"), "--compare", str(second))
    assert re.search(rf"  {re.escape(str(first))}: +accept at eom, 1 modification\n", out), out
    assert re.search(rf"  {re.escape(str(second))}: +tempfail at eom, 0 modifications\n", out), out
    assert "the Thread package cannot be used by this script" in out, out
    assert "(with try --compare: try each script alone)" in out, out
    assert status != 0


def test_try_compare_one_message_shows_the_header_edits_that_differ(tmp_path: Path) -> None:
    """Both sides add a header: only the edits one side made and the other did not are listed."""
    v1, v2 = tmp_path / "stamp-v1.tcl", tmp_path / "stamp-v2.tcl"
    script = STAMP.read_text()
    v1.write_text(script)
    v2.write_text(script.replace("X-Filtered-By", "X-Checked-By"))
    status, out = cli("try", str(v1), str(DATA / "plain.eml"), "--compare", str(v2))
    lines = output_lines(out)
    assert lines[0] == f'{DATA / "plain.eml"}: from <alice@example.org>, subject "Lunch on Friday?"', out
    assert lines[1] == f"  {v1}: accept at eom, 1 modification"
    assert lines[2].startswith("      addheader X-Filtered-By: Stamp on pytclmilter.localhost")
    assert lines[2].endswith(r"queue-id 4TRY0000001;\n client localhost [127.0.0.1] port 25")
    assert lines[3] == f"  {v2}: accept at eom, 1 modification"
    assert lines[4].startswith("      addheader X-Checked-By: Stamp on pytclmilter.localhost")
    assert lines[5:] == ["summary: 1 message, 1 differs"]
    assert status == 1


def test_try_compare_counts_a_modification_made_twice(tmp_path: Path) -> None:
    """A header one script adds twice and the other once: the second one is what differs."""
    twice, once = tmp_path / "twice.tcl", tmp_path / "once.tcl"
    eom = "package require TclMilter 1.0\nproc eom {ctx} {\n%s    return SMFIS_CONTINUE\n}\nmilter register eom eom\nmilter main\n"
    twice.write_text(eom % ("    $ctx addheader X-Tag yes\n" * 2))
    once.write_text(eom % "    $ctx addheader X-Tag yes\n")
    status, out = cli("try", str(twice), str(DATA / "plain.eml"), "--compare", str(once))
    assert output_lines(out) == [
        f'{DATA / "plain.eml"}: from <alice@example.org>, subject "Lunch on Friday?"',
        f"  {twice}: accept at eom, 2 modifications",
        "      addheader X-Tag: yes",
        f"  {once}:  accept at eom, 1 modification",
        "summary: 1 message, 1 differs",
    ], out
    assert status == 1


def test_try_compare_escapes_the_file_names_of_an_archive(tmp_path: Path) -> None:
    """A file name is printed escaped on every kind of line: a message that differs, one that
    could not be tried."""
    d = tmp_path / "archive"
    d.mkdir()
    (d / "evil\nsummary: 0 messages.eml").write_bytes((DATA / "blacklisted.eml").read_bytes())
    (d / "notes\x1b[2J.eml").write_text("Shopping list\n\nmilk, eggs\n")
    nothing = tmp_path / "nothing.tcl"
    nothing.write_text(NOTHING)
    status, out = cli("try", str(BLACKLIST), str(d), "--compare", str(nothing))
    width = max(len(str(BLACKLIST)), len(str(nothing))) + 1
    assert output_lines(out) == [
        r'evil\nsummary: 0 messages.eml: from <spammer@spamdomain.com>, subject "You have won!!!"',
        f"  {str(BLACKLIST) + ':':{width}} reject at envfrom, 0 modifications",
        f"  {str(nothing) + ':':{width}} accept at eom, 0 modifications",
        r"notes\x1b[2J.eml: error: no header fields (the first line is not NAME: value)",
        "summary: 2 messages, 1 differs, 1 not tried",
    ], out
    assert status == 2


def test_try_batch_usage_errors(tmp_path: Path) -> None:
    d = archive_dir(tmp_path, "plain.eml")
    status, out = cli("try", str(BLACKLIST), str(d), "--json")
    assert status == 64 and "pytclmilter try: --json reports on a single message, without --compare" in out
    missing = tmp_path / "no-such.tcl"
    status, out = cli("try", str(BLACKLIST), str(d), "--compare", str(missing))
    assert status == 66 and f'couldn\'t read file "{missing}"' in out
    assert "summary" not in out  # refused before the first script ran
    status, out = cli("try", str(BLACKLIST), str(tmp_path / "nowhere"))
    assert status == 66 and "nowhere: No such file or directory" in out
    assert os.listdir(d) == ["plain.eml"]


def test_try_compare_with_a_missing_other_script_runs_neither(tmp_path: Path) -> None:
    """OTHER.tcl is checked before SCRIPT runs over the archive (a long batch, and whatever the
    script does to its files), not found missing after."""
    d = archive_dir(tmp_path, "plain.eml")
    script = tmp_path / "loud.tcl"
    script.write_text("package require TclMilter 1.0\nputs {seen: loaded}\nmilter main\n")
    missing = tmp_path / "no-such.tcl"
    status, out = cli("try", str(script), str(d), "--compare", str(missing))
    assert status == 66 and f'couldn\'t read file "{missing}"' in out, out
    assert "seen: loaded" not in out, out


def test_try_a_directory_it_may_not_read_is_one_line_and_exit_66(tmp_path: Path) -> None:
    """A directory without read permission gave a PermissionError traceback from the batch."""
    d = archive_dir(tmp_path, "plain.eml")
    d.chmod(0)
    try:
        proc = subprocess.run(without_root_privileges(*PYTCLMILTER, "try", str(BLACKLIST), str(d)),
                              env=child_env(), capture_output=True, text=True, timeout=30)
    finally:
        d.chmod(0o700)
    assert (proc.returncode, proc.stdout, proc.stderr) == (66, "", f"pytclmilter try: {d}: Permission denied\n")


@pytest.mark.parametrize("option", ["-workers 4", "-metrics inet:{port}@127.0.0.1"])
def test_try_a_production_script_with_workers_or_metrics(tmp_path: Path, option: str) -> None:
    """A production script may set -workers (try then forked serving processes that the
    conversation never reached: it waited forever) or -metrics on the port the running daemon
    holds (`milter main` failed: "Address already in use", exit 70). try overrides both."""
    with socket.socket() as taken:  # the production daemon's metrics port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        script = tmp_path / "production.tcl"
        script.write_text("package require TclMilter 1.0\n"
                          f"milter configure {option.format(port=taken.getsockname()[1])}\n"
                          "proc ef {ctx from} { return SMFIS_REJECT }\n"
                          "milter register envfrom ef\nmilter main\n")
        status, out = cli("try", str(script), str(DATA / "plain.eml"), timeout=30)
    assert "verdict: reject at envfrom" in out, out
    assert status == 1, out


def test_try_escapes_terminal_controls_in_the_report_of_one_message(tmp_path: Path) -> None:
    """As the lines of a batch (above), the report of one message shows an untrusted message's
    control characters escaped: they reached the terminal as they were (here: set the window
    title, clear the screen), tabs and line ends excepted."""
    message = tmp_path / "evil.eml"
    message.write_bytes(b"From: mallory@example.com\r\nTo: bob@example.com\r\n"
                        b"Subject: hi\x1b]0;owned\x07\r\nX-Tab: a\tb\r\n\r\nbody\x1b[2J\r\n")
    status, out = cli("try", str(BLACKLIST), str(message))
    assert status == 0, out
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert r"header   Subject: hi\x1b]0;owned\x07 -> " in out, out
    assert "\nSubject: hi\\x1b]0;owned\\x07\nX-Tab: a\tb\n\nbody\\x1b[2J" in out, out
    # C1 controls (U+0080 to U+009F; U+009B is a CSI, as ESC [) written in UTF-8
    message.write_bytes(b"From: mallory@example.com\r\nTo: bob@example.com\r\n\r\nbody\xc2\x9b2J\xc2\x85\r\n")
    status, out = cli("try", str(BLACKLIST), str(message))
    assert status == 0, out
    assert "\x9b" not in out and "\x85" not in out, repr(out)
    assert r"body\u009b2J\u0085" in out, out


def test_try_refuses_an_endless_message_from_standard_input_at_max_size(try_tmpdir: Path) -> None:
    """`try x.tcl - < /dev/zero` copied standard input until the disk was full. A message is read
    up to --max-size bytes (Postfix's message_size_limit default, 10240000) and refused past it
    with exit 66, as an unreadable one; the copy in try's private directory is gone."""
    tmp = try_tmpdir
    status, out = run_in_bash("< /dev/zero -", "try", str(STAMP), env={"TMPDIR": str(tmp)})
    assert (status, out) == (66, "pytclmilter try: -: larger than 10240000 bytes (--max-size)\n"), out
    assert os.listdir(tmp) == []
    status, out = cli("try", str(STAMP), "/dev/zero", "--max-size", "1000")  # a device, copied too
    assert (status, out) == (66, "pytclmilter try: /dev/zero: larger than 1000 bytes (--max-size)\n"), out
    status, out = cli("send", "--connection", "inet:1@127.0.0.1", "/dev/zero")
    assert (status, out) == (66, "pytclmilter send: /dev/zero: larger than 10240000 bytes (--max-size)\n"), out


def test_try_max_size_is_the_largest_message_tried(tmp_path: Path) -> None:
    size = len((DATA / "plain.eml").read_bytes())
    status, out = cli("try", str(BLACKLIST), str(DATA / "plain.eml"), "--max-size", str(size))
    assert status == 0 and "verdict: accept at eom" in out, out
    status, out = run_in_bash(f"< {DATA / 'plain.eml'} -", "try", str(BLACKLIST), "--max-size", str(size))
    assert status == 0 and "verdict: accept at eom" in out, out
    for source in (str(DATA / "plain.eml"), f"- < {DATA / 'plain.eml'}"):
        status, out = run_in_bash(source, "try", str(BLACKLIST), "--max-size", str(size - 1))
        assert (status, out) == (66, f"pytclmilter try: {source.split()[0]}: larger than {size - 1} bytes "
                                     "(--max-size)\n"), out
    for value in ("0", "-1", "1e6", "lots"):
        status, out = cli("try", str(BLACKLIST), str(DATA / "plain.eml"), "--max-size", value)
        assert status == 64 and "argument --max-size: " in out, out


def test_try_an_archive_lists_a_message_larger_than_max_size_and_goes_on(tmp_path: Path) -> None:
    """In an mbox, from a file or a stream, and in a directory, a message larger than --max-size
    is not tried and its line says why; one of exactly that size is. A stream's oversized
    message is cut while it is copied (one of 200 KB on a single line here), not stored whole."""
    plain = (DATA / "plain.eml").read_bytes()
    padded = [plain + b"x" * 50 + b"\n", plain + b"x" * 51 + b"\n", plain + b"y" * 200_000]
    box = write_mbox(tmp_path / "archive.mbox", plain, *padded, (DATA / "blacklisted.eml").read_bytes())
    sizes = [len(m.as_bytes()) for m in mailbox.mbox(str(box))]
    limit = sizes[1]
    assert sizes[2] == limit + 1, sizes
    lunch = "accept at eom, 0 modifications; from <alice@example.org>, subject \"Lunch on Friday?\""
    too_large = f"error: larger than {limit} bytes (--max-size)"
    expected = [f"#1: {lunch}", f"#2: {lunch}", f"#3: {too_large}", f"#4: {too_large}",
                SPAMMER.replace("blacklisted.eml", "#5"), "summary: 5 messages: 2 accept, 1 reject, 2 not tried"]
    for source in (str(box), f"- < {box}", f"<(cat {box})"):
        status, out = run_in_bash(source, "try", str(BLACKLIST), "--max-size", str(limit))
        assert (status, output_lines(out)) == (2, expected), (source, out)
    d = tmp_path / "archive"
    d.mkdir()
    for n, raw in enumerate([plain, *padded], 1):
        (d / f"{n}.eml").write_bytes(raw)
    status, out = cli("try", str(BLACKLIST), str(d), "--max-size", str(len(padded[0])))
    assert (status, output_lines(out)[1:]) == (2, [
        f"2.eml: {lunch}", f"3.eml: error: larger than {len(padded[0])} bytes (--max-size)",
        f"4.eml: error: larger than {len(padded[0])} bytes (--max-size)",
        "summary: 4 messages: 2 accept, 2 not tried"]), out
