"""The command line as a mail admin uses it: ``pytclmilter run | try | send | check``.

Every command is driven through ``pexpect`` (a pty, as a person at a
terminal), with the example filters of tclmilter/examples/ and the sample
messages of tests/data/. ``send`` is also pointed at a filter built on
Sendmail's own libmilter (tests/data/sample_milter.c), so the MTA side is not
only ever checked against our own server.

Exit statuses (docs/cli.md): try/send 0 accepted, 1 rejected, 2 tempfail,
3 discarded, 4 quarantined; 64 usage error, 66 missing input; check 0/1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import importlib.util
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pexpect
import pytest

from pytclmilter.client.load import LoadResult
from pytclmilter.client.message import Message
from pytclmilter.protocol.codec import FrameReader
from support.engine import frame, parse_frames
from support.postfix import free_port
from support.tclrun import (ROOT_WARNING, TclRun, _pytclmilter_command, child_env, children_of, link_local,
                            warnings)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tclmilter" / "examples"
DATA = Path(__file__).resolve().parent / "data"
PYTCLMILTER = _pytclmilter_command()

BLACKLIST = EXAMPLES / "blacklist.tcl"
STAMP = EXAMPLES / "stamp.tcl"
SIZEPOLICY = EXAMPLES / "sizepolicy.tcl"
RCPTREWRITE = EXAMPLES / "rcptrewrite.tcl"
GREYLIST = EXAMPLES / "greylist.tcl"
GREYLIST_STORE = ("--python", str(EXAMPLES / "greylist_store.py"))  # the greylist's triplets


# ---------------------------------------------------------------------------- helpers


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str]:
    """Run ``pytclmilter ARGS`` on a pty until it ends; (exit status, output with LF line ends)."""
    full_env = child_env(env)
    child = pexpect.spawn(PYTCLMILTER[0], [*PYTCLMILTER[1:], *map(str, args)], env=full_env, cwd=str(ROOT),
                          encoding="utf-8", codec_errors="replace", timeout=timeout, echo=False, use_poll=True)
    out = child.read()  # everything, until the command exits
    child.close()
    status = child.exitstatus if child.exitstatus is not None else -(child.signalstatus or 0)
    return status, out.replace("\r\n", "\n")


@contextlib.contextmanager
def descriptors_past_1023() -> Iterator[None]:
    """This process holding descriptors up to past 1023 meanwhile, as a test with a thousand
    clients open does: what it opens next gets a number select() cannot watch."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    held = [os.open(os.devnull, os.O_RDONLY)]
    while held[-1] < 1100:
        held.append(os.open(os.devnull, os.O_RDONLY))
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)


def test_the_tests_read_a_command_they_start_past_descriptor_1023(serve: Callable[..., TclRun]) -> None:
    """pexpect reads with select() unless told to poll, and so did the reader of a `run` under
    test: past descriptor 1023 each failed ("filedescriptor out of range in select()"), the
    reader saw the process as ended, in a test holding a thousand clients open."""
    with descriptors_past_1023():
        status, out = cli("check", str(STAMP))
        assert status == 0 and f"{STAMP}: loaded" in out, out
        m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
        assert m.stop() == 0


def json_of(output: str) -> dict[str, Any]:
    """The JSON document in an output (anything on stderr before it is ignored)."""
    start = re.search(r"^\{$", output, re.M)
    assert start, f"no JSON document in:\n{output}"
    doc, _ = json.JSONDecoder().raw_decode(output[start.start():])
    return doc


def resulting_message(output: str) -> str:
    """The part of a try/send report after ``--- resulting message ---``."""
    marker = "--- resulting message ---\n"
    assert marker in output, f"no resulting message in:\n{output}"
    return output.split(marker, 1)[1]


def headers_of(message: str) -> str:
    return message.split("\n\n", 1)[0]


def body_of(message: str) -> str:
    return message.split("\n\n", 1)[1]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., TclRun]]:
    """Start ``pytclmilter run SCRIPT OPTIONS [-- ARGS]``; waits for the listening line by default."""
    procs: list[TclRun] = []

    def start(script: Path, *options: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
              wait: bool = True) -> TclRun:
        argv = [*PYTCLMILTER, "run", str(script), *options]
        if args:
            argv += ["--", *args]
        proc = TclRun(argv, env=env, cwd=str(tmp_path))
        procs.append(proc)
        if wait:
            proc.wait_listening()
        return proc

    yield start
    for proc in procs:
        if proc.alive():
            proc.stop(signal.SIGKILL)


def world_dir() -> Path:
    """A fresh directory every user can use (for sockets of a filter that drops to nobody)."""
    path = Path(tempfile.mkdtemp(prefix="pytclmilter-cli-"))
    path.chmod(0o777)
    return path


# ============================================================================ run


def test_run_prints_listening_line_and_stops_on_ctrl_c(serve: Callable[..., TclRun]) -> None:
    m = serve(BLACKLIST, "--connection", "inet:0@127.0.0.1")
    assert m.name == "Blacklist"
    assert m.spec == f"inet:{m.port}@127.0.0.1"
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"))
    assert status == 0, out
    m.child.sendintr()  # Ctrl-C at the terminal
    m.wait_for(r"pytclmilter: interrupted, stopping")
    assert m.wait_exit() == 0
    assert "Blacklist stopped; verdicts: accept=1" in m.text


def test_run_prints_its_listening_line_whatever_the_encoding_of_stdout(serve: Callable[..., TclRun]) -> None:
    """A milter name (or socket path) that stdout's encoding lacks ended the start in a Python
    traceback (UnicodeEncodeError) right after binding, nothing served and no log line saying why.
    The character is now written as the reports write it, and the milter serves."""
    m = serve(BLACKLIST, "--connection", "inet:0@127.0.0.1", "--name", "Caf\u00e9",
              env={"PYTHONIOENCODING": "ascii"})
    assert m.name == "Caf\\xe9", m.text
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"))
    assert status == 0, out
    assert m.stop() == 0
    assert "Traceback" not in m.text, m.text


def test_run_with_an_unknown_option_is_a_usage_error() -> None:
    status, out = cli("run", str(BLACKLIST), "--no-such-option")
    assert status == 64
    assert "usage: pytclmilter run" in out
    assert "unrecognized arguments: --no-such-option" in out


@pytest.mark.parametrize("command", ["check", "run", "try"])
def test_a_script_argument_starting_with_a_dash_without_the_lone_dashes_says_where_it_goes(command: str) -> None:
    """`check s.tcl -store x` said only "unrecognized arguments: -store x", which does not tell
    that the script would get it after a lone --; docs/cli.md shows the line."""
    message = [str(DATA / "plain.eml")] if command == "try" else []
    status, out = cli(command, str(BLACKLIST), *message, "-store", "x")
    assert status == 64, out
    form = "SCRIPT.tcl MESSAGE.eml [options] -- ARGS" if command == "try" else "SCRIPT.tcl [options] -- ARGS"
    line = (f"pytclmilter {command}: error: unrecognized arguments: -store x (arguments for the script that "
            f"start with - go after a lone --: pytclmilter {command} {form})")
    assert out.endswith(line + "\n"), out
    if command == "check":
        assert line in (ROOT / "docs" / "cli.md").read_text()
        status, out = cli(command, str(BLACKLIST), "--", "-store", "x")
        assert status == 0, out


HOSTILE_ARG = b"\x1b[31mred\r\x07\xff\xc2\x9b"


@pytest.mark.parametrize("words", [
    (b"run", str(BLACKLIST).encode(), b"--bad" + HOSTILE_ARG),  # unrecognized arguments: ...
    (b"run", str(BLACKLIST).encode(), b"--c=" + HOSTILE_ARG),  # ambiguous option: --c=... could match
    (b"try", str(BLACKLIST).encode(), str(DATA / "plain.eml").encode(), b"--max-size", HOSTILE_ARG),  # a type's
    (HOSTILE_ARG,),  # invalid choice (argparse's repr)
], ids=["unrecognized", "ambiguous", "type", "command"])
def test_a_usage_error_quotes_the_command_line_escaped(words: tuple[bytes, ...]) -> None:
    """argparse's usage errors quote what was typed: "unrecognized arguments", "ambiguous option"
    and a type's own error (--max-size's) quoted it raw, an ESC, CR, BEL, a C1 CSI and a byte
    not UTF-8 as they were, on a terminal or, for run, in its log (a unit's ExecStart).
    FAILED before: the raw ESC on stderr. Now each is escaped as the other reports are."""
    done = subprocess.run([*map(os.fsencode, PYTCLMILTER), *words], capture_output=True, env=child_env(),
                          cwd=str(ROOT), timeout=30)
    assert done.returncode == 64, done
    err = done.stderr
    for raw in (b"\x1b", b"\r", b"\x07", b"\xff", b"\xc2\x9b"):
        assert raw not in err, err
    assert b"error: " in err and b"[31mred" in err, err


def synopsis_options(text: str, command: str) -> set[str]:
    """The --options of the synopsis of ``pytclmilter COMMAND`` in a page's code blocks: the block
    whose first line starts so and lists options (not the summary line of every command)."""
    blocks = re.findall(r"^```[\w-]*\n(.*?)^```", text, re.S | re.M)
    found = [b for b in blocks if b.startswith(f"pytclmilter {command} ") and re.search(r"\[--[a-z]", b.splitlines()[0])]
    assert len(found) == 1, (command, found)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", found[0]))


@pytest.mark.parametrize("command", ["run", "try", "send", "check"])
def test_the_synopses_in_the_docs_list_every_option_the_help_does(command: str) -> None:
    """docs/cli.md's synopsis of each command, and the README's of run, list every option of its
    --help: the README's left out --max-connections."""
    status, out = cli(command, "--help")
    assert status == 0, out
    usage = out.split("\n\n")[0]
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", usage))
    assert ("--log-level" in options) == (command != "send") and "--help" not in options, usage
    assert synopsis_options((ROOT / "docs" / "cli.md").read_text(), command) == options
    if command == "run":
        assert synopsis_options((ROOT / "README.md").read_text(), command) == options


def test_run_reports_the_command_line_override_of_the_scripts_connection(serve: Callable[..., TclRun]) -> None:
    m = serve(BLACKLIST, "--connection", "inet:0@127.0.0.1")
    assert re.search(r"milter configure -connection unix:/var/run/blmilter.sock ignored: "
                     r"--connection given on the command line", m.text)
    assert m.stop() == 0


def test_try_says_it_set_the_options_a_scripts_configure_cannot_change_there(tmp_path: Path) -> None:
    """try fixes -workers, -grace, -metrics and -connection itself: a script's configure of them was
    logged as "--workers given on the command line", a flag try has not, which nobody gave."""
    script = tmp_path / "w.tcl"
    script.write_text("package require TclMilter\nmilter configure -workers 4 -grace 9\n"
                      "proc eom {ctx} { return SMFIS_CONTINUE }\nmilter register eom eom\nmilter main\n")
    message = tmp_path / "m.eml"
    message.write_text("From: a@b\nSubject: x\n\nhi\n")
    status, out = cli("try", "--log-level", "info", str(script), str(message))
    assert status == 0, out
    assert "INFO: milter configure -workers 4 ignored: try sets -workers 1" in out, out
    assert "INFO: milter configure -grace 9 ignored: try sets -grace 5" in out, out
    assert "given on the command line" not in out, out


def test_run_logs_whether_its_hot_path_is_compiled(serve: Callable[..., TclRun]) -> None:
    from pytclmilter.compiled import describe  # the same install as the command under test

    m = serve(BLACKLIST, "--connection", "inet:0@127.0.0.1")
    line = re.search(r"INFO: (hot path: .*?)\r?\n", m.text)
    assert line, m.text
    assert line.group(1) == describe()
    assert m.stop() == 0


def test_run_socket_mode_sets_the_mode_of_the_unix_socket(serve: Callable[..., TclRun], tmp_path: Path) -> None:
    sock = tmp_path / "stamp.sock"
    m = serve(STAMP, "--connection", f"unix:{sock}", "--socket-mode", "0660")
    assert m.spec == f"unix:{sock}"
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    status, out = cli("send", "--connection", f"unix:{sock}", str(DATA / "plain.eml"))
    assert status == 0 and "X-Filtered-By: Stamp on" in out, out
    assert m.stop() == 0
    assert not sock.exists()  # removed at stop


@pytest.mark.parametrize("mode", ["rw-rw----", "-1", "77777", "1777", "0x1b6", ""])
def test_run_socket_mode_must_be_an_octal_file_mode(mode: str) -> None:
    """`-1` and `77777` were taken, and chmod made the socket 07777: writable by anyone."""
    status, out = cli("run", str(STAMP), "--socket-mode", mode)
    assert status == 64
    assert f'--socket-mode: "{mode}" is not an octal mode (0 to 0777)' in out, out


@pytest.mark.parametrize("args, said", [
    (("--group", "postfix"), "--group needs --user"),
    (("--user", "nosuch-user-x"), '--user: no such user "nosuch-user-x"'),
    (("--socket-mode", "1777"), '--socket-mode: "1777" is not an octal mode (0 to 0777)'),
    (("--name", " "), "--name ' ': must not be empty"),
    (("--connection", "inet:127.0.0.1:8891"), '--connection "inet:127.0.0.1:8891": port "127.0.0.1:8891" is not a number'),
    (("--workers", "0x10"), '--workers: expected decimal number but got "0x10"'),
    (("--timeout", "abc"), '--timeout: expected integer but got "abc"'),
])
def test_a_usage_error_of_run_is_its_one_line(args: tuple[str, ...], said: str) -> None:
    """cli.md: "Usage errors print one line `pytclmilter COMMAND: what is wrong`". A value the
    parser takes but run then refuses came after `INFO: hot path: ...`, a log line of a filter
    that never started, above the one that says why."""
    status, out = cli("run", str(STAMP), *args, timeout=10)
    assert status == 64, out
    assert out.startswith(f"pytclmilter run: {said}") and out.count("\n") == 1, out


@pytest.mark.parametrize("spec, ours", [("inet:127.0.0.1:8891", "inet:8891@127.0.0.1"),
                                         ("inet:[::1]:8891", "inet6:8891@[::1]")])
def test_run_refuses_postfixs_host_port_syntax_and_says_the_milters(spec: str, ours: str) -> None:
    """Postfix's inet:127.0.0.1:8891 was read as libmilter's atoi reads it: port 127 on every
    address, the unauthenticated milter open to the network while Postfix found nothing on 8891."""
    status, out = cli("run", str(STAMP), "--connection", spec)
    assert status == 64, out
    assert (f'pytclmilter run: --connection "{spec}": ' in out
            and f"(inet:HOST:PORT is Postfix's syntax; the milter's is {ours})" in out), out
    assert "listening" not in out


@pytest.mark.parametrize("spec, ours", [("8891", "inet:8891@127.0.0.1"), ("8891@localhost", "inet:8891@localhost")])
def test_run_warns_of_a_unix_socket_named_like_a_port(serve: Callable[..., TclRun], tmp_path: Path, spec: str,
                                                    ours: str) -> None:
    """`--connection 8891` (inet: forgotten) quietly made a socket file named 8891 in the current
    directory, libmilter's rule (kept), while the MTA found nothing on port 8891."""
    m = serve(STAMP, "--connection", spec)
    assert m.spec == f"unix:{tmp_path / spec}", m.text
    m.wait_for(rf'WARNING: connection "{re.escape(spec)}" is a unix socket of that name \(without inet: or inet6: '
               rf"in front, a connection is one, as in libmilter\); for TCP port 8891 write {re.escape(ours)}\r?\n",
               since=0)
    assert m.stop() == 0
    assert len([w for w in warnings(m.text) if "unix socket" in w]) == 1, m.text


@pytest.mark.parametrize("spec, ours", [("unix:8891", "inet:8891@127.0.0.1"),
                                         ("unix:localhost:8891", "inet:8891@localhost"),
                                         ("LOCAL:8891@localhost", "inet:8891@localhost")])
def test_run_warns_of_a_typed_unix_socket_named_like_a_port_without_blaming_a_missing_type(
        serve: Callable[..., TclRun], tmp_path: Path, spec: str, ours: str) -> None:
    """`--connection unix:8891` was told its spec had no inet: or inet6: "in front", as if the
    type had been left out, and its "unix:" was not shown: the warning now quotes the spec as
    written and says where the socket file went."""
    m = serve(STAMP, "--connection", spec)
    kind, path = spec.split(":", 1)
    assert m.spec == f"unix:{tmp_path / path}", m.text
    m.wait_for(rf'WARNING: connection "{re.escape(spec)}" is a unix socket \(the type {kind}: makes it one\), its '
               rf"file {re.escape(path)} in the current directory, not a TCP port; for TCP port 8891 write "
               rf"{re.escape(ours)}\r?\n", since=0)
    assert m.stop() == 0
    assert "in front" not in m.text, m.text
    assert len([w for w in warnings(m.text) if "unix socket" in w]) == 1, m.text


def test_run_says_nothing_of_a_unix_socket_with_a_path(serve: Callable[..., TclRun], tmp_path: Path) -> None:
    m = serve(STAMP, "--connection", f"unix:{tmp_path / 'milter.sock'}")
    assert m.stop() == 0
    assert warnings(m.text) == [], m.text


@pytest.mark.parametrize("spec", ["inet:0@[127.1]", "inet:0@[0x7f.0.0.1]", "inet:0@[2130706433]"])
def test_run_takes_libmilters_short_ipv4_forms_in_brackets_and_names_the_address(serve: Callable[..., TclRun],
                                                                                spec: str) -> None:
    """libmilter reads a bracketed IPv4 address with inet_addr (`[127.1]` is 127.0.0.1, as a host
    name of digits is to getaddrinfo too); it was refused, `"127.1" is not an inet address`."""
    m = serve(STAMP, "--connection", spec)
    assert m.spec == f"inet:{m.port}@127.0.0.1", m.text
    with m.mta() as mta:
        mta.negotiate()
        mta.connect()
        eom = mta.message()["eom"]
        assert any(b"X-Filtered-By" in data for _, data in eom if isinstance(data, bytes)), eom
    assert m.stop() == 0


@pytest.mark.skipif(link_local() is None, reason="no IPv6 link-local address here")
@pytest.mark.parametrize("written", ["{}", "[{}]"])
def test_run_listens_on_a_link_local_address_with_its_interface(serve: Callable[..., TclRun], written: str) -> None:
    """inet6:PORT@fe80::...%eth0 was taken, its %eth0 dropped where the name was resolved, and
    the bind failed: 'cannot listen on inet6:8891@fe80::...: Invalid argument', a link-local
    address meaning nothing without its interface. The interface is kept. In brackets the same
    address was refused, '"fe80::...%eth0" is not an inet6 address': taken the same way."""
    found = link_local()
    assert found is not None
    addr, interface = found
    m = serve(STAMP, "--connection", "inet6:0@" + written.format(f"{addr}%{interface}"))
    assert m.spec == f"inet6:{m.port}@{addr}%{interface}", m.text
    with socket.create_connection((f"{addr}%{interface}", m.port), timeout=5):
        pass
    assert m.stop() == 0


@pytest.mark.parametrize("spec", ["inet6:0@[::ffff:127.0.0.1]", "inet6:0@::ffff:127.0.0.1", "inet6:0@[::ffff:7f00:1]",
                                  "inet6:0@[::FFFF:127.0.0.1]"])
def test_run_serves_an_ipv4_mapped_address_as_libmilter_does(serve: Callable[..., TclRun], spec: str) -> None:
    """`inet6:8891@[::ffff:127.0.0.1]` failed at bind, "Invalid argument": the IPv6 socket was
    IPv6-only, which can never bind IPv4 traffic's address. libmilter leaves the socket as Linux
    makes it and serves IPv4 connections to 127.0.0.1 there; so does run now. However written,
    the listening line names it one way (`[::ffff:7f00:1]` was shown as written)."""
    m = serve(STAMP, "--connection", spec)
    assert m.spec == f"inet6:{m.port}@::ffff:127.0.0.1", m.text
    with m.mta() as mta:  # over IPv4, to 127.0.0.1
        mta.negotiate()
        mta.connect()
        eom = mta.message()["eom"]
        assert any(b"X-Filtered-By" in data for _, data in eom if isinstance(data, bytes)), eom
    assert m.stop() == 0


@pytest.mark.parametrize("spec", ["inet6:0@[0:0:0:0:0:0:0:1]", "inet6:0@[::0001]", "inet6:0@0::0:1"])
def test_run_names_an_ipv6_address_in_one_form_however_written(serve: Callable[..., TclRun], spec: str) -> None:
    """A bracketed IPv6 address was shown in the listening line as written, `inet6:8891@[0:0:0:0:0:0:0:1]`,
    where a bracketed IPv4 one is written back in dotted quads: the admin compares that line with
    the MTA's setting and with ss's output. Now in the compressed form, as an unbracketed one is."""
    m = serve(STAMP, "--connection", spec)
    assert m.spec == f"inet6:{m.port}@::1", m.text
    assert m.stop() == 0


@pytest.mark.parametrize("form", ["unix:{}/milter.sock ", "unix:{}/milter.sock\n", " {}/milter.sock",
                                  "local:{}/milter\tsock"])
def test_run_refuses_a_unix_path_with_white_space_at_an_end_or_a_control_character(form: str, tmp_path: Path) -> None:
    """A unix path is taken as written (libmilter's rule): `-connection [read $f]` (its newline)
    or a trailing space in a unit file made a socket named `milter.sock\n`, the listening line
    showed it as the path the MTA was given, and the MTA found nothing there. No one means such
    a name: it is refused, saying why."""
    status, out = cli("run", str(STAMP), "--connection", form.format(tmp_path), timeout=10)
    assert status == 64, out
    assert ("socket path with white space at an end or a control character: no MTA is told that name "
            "(libmilter would make it)\n") in out, out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--connection", "--metrics"])
def test_run_quotes_a_spec_with_a_newline_escaped_on_one_line(option: str) -> None:
    """A newline in a --connection or --metrics was printed as it was: the usage error went on over
    indented lines, where `send` (e806bda) quotes the same spec escaped, on one line."""
    status, out = cli("run", str(STAMP), "--connection", "inet:0@127.0.0.1", option, "inet:88\n91@x", timeout=10)
    assert (status, "listening" in out) == (64, False), out
    assert f'\npytclmilter run: {option} "inet:88\\n91@x": port "88\\n91" is not a number\n' in "\n" + out, out


def test_run_quotes_a_scripts_connection_with_a_newline_escaped_on_one_line(tmp_path: Path) -> None:
    """A script's `milter configure -connection "inet:88\\n91"`: its error quoted the spec as it was,
    over three lines of the script's error (Tcl's errorInfo), the spec's newline among them."""
    script = tmp_path / "newline.tcl"
    script.write_text('milter configure -connection "inet:88\\n91"\nmilter main\n')
    status, out = cli("run", str(script), timeout=10)
    assert (status, "listening" in out) == (1, False), out
    assert '\nconnection "inet:88\\n91": port "88\\n91" is not a number\n    while executing\n' in "\n" + out, out


@pytest.mark.parametrize("spec, said", [
    ("inet:8891@[127.0.0.1]:8891", '":8891" after "]" (inet:HOST:PORT is Postfix\'s syntax; the milter\'s is '
                                   'inet:8891@[127.0.0.1])'),
    ("inet:8891@[127.0.0.1]x", '"x" after "]"'),
    ("inet:8891@[::1]", '"::1" is not an inet address (IPv6: inet6:...@[::1])'),
    ("inet:8891@[127.0.0.1 x]", '"127.0.0.1 x" is not an inet address'),
    ("inet:8891@[localhost:8891]", '"localhost:8891" is not an inet address'),  # (no IPv6 address)
])
def test_run_refuses_what_follows_a_bracketed_address_and_says_why(spec: str, said: str) -> None:
    """libmilter ignores what follows "]": `inet:8891@[127.0.0.1]:8891` listened on 8891 by
    chance, `[127.0.0.1]:25` on 8891 though 25 was meant. It was refused, but as `missing "]"`."""
    status, out = cli("run", str(STAMP), "--connection", spec)
    assert status == 64, out
    assert f'pytclmilter run: --connection "{spec}": {said}\n' in out, out


@pytest.mark.parametrize("spec, said", [
    ("inet:8891@[::1]", '"::1" is not an inet address (IPv6: inet6:...@[::1])'),
    ("inet:8891@::1", 'cannot resolve "::1" for inet: Address family for hostname not supported (IPv6: '
                      'inet6:...@::1)'),
    # (with its interface: inet_pton, which told an IPv6 address, refuses a zone)
    ("inet:8891@fe80::1%lo", 'cannot resolve "fe80::1%lo" for inet: Address family for hostname not supported '
                             '(IPv6: inet6:...@fe80::1%lo)'),
    ("inet:8891@[fe80::1%lo]", '"fe80::1%lo" is not an inet address (IPv6: inet6:...@[fe80::1%lo])'),
])
def test_run_says_inet6_for_an_ipv6_address_given_to_inet_bracketed_or_not(spec: str, said: str) -> None:
    """`inet:8891@::1` said only "Address family for hostname not supported", without the hint
    the bracketed form gets: which type takes an IPv6 address."""
    status, out = cli("run", str(STAMP), "--connection", spec, timeout=10)
    assert (status, "listening" in out) == (64, False), out
    assert f'pytclmilter run: --connection "{spec}": {said}\n' in out, out


@pytest.mark.parametrize("spec, said", [
    ("inet:0@[255.255.255.255]", '"255.255.255.255" is the broadcast address'),
    ("inet:0@[0xffffffff]", '"0xffffffff" (255.255.255.255) is the broadcast address'),
    ("inet:0@255.255.255.255", '"255.255.255.255" is the broadcast address'),
    ("inet:0@4294967295", '"4294967295" (255.255.255.255) is the broadcast address'),
    ("inet6:0@[::ffff:255.255.255.255]", '"::ffff:255.255.255.255" (255.255.255.255) is the broadcast address'),
    ("inet6:0@[::ffff:ffff:ffff]", '"::ffff:ffff:ffff" (255.255.255.255) is the broadcast address'),
])
def test_run_refuses_the_broadcast_address_as_libmilter_does(serve: Callable[..., TclRun], spec: str,
                                                             said: str) -> None:
    """`inet:8891@[255.255.255.255]`, which libmilter refuses (inet_addr's error value, INADDR_NONE),
    was served: Linux binds it, and no MTA can connect there. Refused at start, as a usage error.
    Its IPv4-mapped IPv6 form failed only at bind, "Invalid argument": refused the same way."""
    m = serve(STAMP, "--connection", spec, wait=False)
    m.wait_for(r"listening on|pytclmilter run: ", 15)
    assert m.wait_exit() == 64, m.text
    assert (f'pytclmilter run: --connection "{spec}": {said}: no MTA can connect to it (libmilter '
            "refuses [255.255.255.255]: inet_addr's error value, INADDR_NONE)") in m.text, m.text
    assert "listening on" not in m.text


@pytest.mark.parametrize("spec, said", [
    ("inet:0@239.1.1.1", '"239.1.1.1"'),
    ("inet:0@[0xe0000001]", '"0xe0000001" (224.0.0.1)'),
    ("inet6:0@[::ffff:224.0.0.1]", '"::ffff:224.0.0.1"'),
    ("inet6:0@[ff05::1]", '"ff05::1"'),
])
def test_run_refuses_a_multicast_address_where_no_mta_can_connect(spec: str, said: str) -> None:
    """`inet:8891@239.1.1.1` was served: Linux binds an IPv4 multicast address for TCP and the
    filter said it listened there, but an MTA's connect is refused (Network is unreachable), as at
    the broadcast address. An IPv6 one failed at bind, "Invalid argument". Refused at start."""
    status, out = cli("run", str(STAMP), "--connection", spec, timeout=10)
    assert (status, "listening" in out) == (64, False), out
    assert (f'pytclmilter run: --connection "{spec}": {said} is a multicast address: no MTA can connect to it '
            "(TCP connects to one host's address)\n") in out, out


def test_run_binds_a_relative_unix_path_where_libmilter_would_and_names_it(serve: Callable[..., TclRun],
                                                                          tmp_path: Path) -> None:
    """A spec with no colon is a unix socket's path (libmilter's rule), relative to the current
    directory when `milter main` binds it: the script's, after its `cd`. The listening line said
    `unix:stamp.sock`, not where that was; it names the absolute path now."""
    there = tmp_path / "there"
    there.mkdir()
    script = tmp_path / "cd.tcl"
    script.write_text(f"cd {there}\n" + STAMP.read_text())
    m = serve(script, "--connection", "stamp.sock")
    assert m.spec == f"unix:{there}/stamp.sock", m.text
    assert stat.S_ISSOCK((there / "stamp.sock").lstat().st_mode)
    assert m.stop() == 0
    assert not (there / "stamp.sock").exists()


def test_run_warns_when_it_listens_on_every_address(serve: Callable[..., TclRun]) -> None:
    """libmilter's inet:PORT (a legacy script's -connection, or a host left out) listened on every
    interface without a word, though anyone who reaches the port can feed the filter mail."""
    m = serve(STAMP, "--connection", "inet:0")
    assert (f"WARNING: listening on every address (inet:{m.port}@0.0.0.0): the milter protocol has no "
            f"authentication, so anyone who reaches port {m.port} can feed this filter mail; "
            f"inet:{m.port}@127.0.0.1 listens on the loopback address only") in m.text, m.text
    assert m.stop() == 0
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
    assert m.stop() == 0
    assert "every address" not in m.text, m.text


@pytest.mark.parametrize("option, value, said", [
    ("--workers", "1025", 'expected positive integer up to 1024 but got "1025"'),
    ("--timeout", "abc", 'expected integer but got "abc"'),
    ("--on-error", "bogus", 'bad status "bogus": must be SMFIS_ACCEPT'),
    ("--max-connections", "x", 'expected integer but got "x"'),
])
def test_run_names_the_flag_whose_value_it_refuses(option: str, value: str, said: str) -> None:
    """The option's own words did not say which of the command line's values was wrong:
    `pytclmilter run: expected positive integer up to 1024 but got "1025"`."""
    status, out = cli("run", str(STAMP), option, value, "--connection", "inet:0@127.0.0.1")
    assert status == 64
    assert f"pytclmilter run: {option}: {said}" in out, out
    assert "listening" not in out


@pytest.mark.parametrize("option, value", [("--workers", "0x10"), ("--timeout", "0o10"), ("--backlog", "0b10"),
                                           ("--max-connections", " 0X1f"), ("--grace", "0x10"),
                                           ("--call-timeout", "+0x10")])
def test_run_reads_a_numeric_flag_in_decimal_and_refuses_a_radix_prefix(option: str, value: str) -> None:
    """`--workers 0x10` served with 16 workers: the flag was read by Tcl's rules for integers,
    which a command line's user does not expect (`head -n 0x10` is an error)."""
    status, out = cli("run", str(STAMP), option, value, "--connection", "inet:0@127.0.0.1", timeout=10)
    assert status == 64, out
    assert (f'pytclmilter run: {option}: expected decimal number but got "{value}" '
            "(a command-line flag is read in decimal; the script's milter configure reads Tcl's forms)") in out, out
    assert "listening" not in out


@pytest.mark.parametrize("ids, said", [
    (("--user", "\u00b2"), '--user: no such user "\u00b2"'),
    (("--user", "\u0660"), '--user: no such user "\u0660"'),
    (("--user", "nobody", "--group", "\u0660"), '--group: no such group "\u0660"'),
    (("--user", "nobody", "--group", "99999999999999999999"), '--group: no such group "99999999999999999999"'),
])
def test_run_reads_only_ascii_digits_of_user_and_group_as_ids(ids: tuple[str, ...], said: str) -> None:
    """`--user \u00b2` ended in "unexpected error: ValueError" and a traceback (str.isdigit() is
    true of it, int() refuses it), `--group 99999999999999999999` in an OverflowError, and
    `--user \u0660` (ARABIC-INDIC DIGIT ZERO) served as uid 0: no user has such a name, and a
    command line's user means digits 0-9 when naming an id."""
    status, out = cli("run", str(STAMP), *ids, "--connection", "inet:0@127.0.0.1", timeout=10)
    assert (status, "listening" in out, "Traceback" in out) == (64, False, False), out
    assert f"pytclmilter run: {said}\n" in out, out


@pytest.mark.parametrize("ids, said", [
    (("--user", "no\nERROR: forged"), '--user: no such user "no\\nERROR: forged"'),
    (("--user", "nobody", "--group", "no\nERROR: forged"), '--group: no such group "no\\nERROR: forged"'),
])
def test_run_quotes_a_user_or_group_with_a_newline_escaped_on_one_line(ids: tuple[str, ...], said: str) -> None:
    """`--user "no\\nERROR: forged"`: the usage error quoted the name as given, so its newline
    went on over an indented line, where a --connection's is quoted escaped (d29fb99)."""
    status, out = cli("run", str(STAMP), *ids, "--connection", "inet:0@127.0.0.1", timeout=10)
    assert (status, "listening" in out) == (64, False), out
    assert f"\npytclmilter run: {said}\n" in "\n" + out, out


@pytest.mark.parametrize("spec", ["inet6:8891@[fe80::1]", "inet6:8891@fe80::1"])
def test_run_refuses_a_link_local_address_without_its_interface_saying_so(spec: str) -> None:
    """`inet6:8891@fe80::1` failed at `milter main` with `cannot listen on inet6:8891@fe80::1:
    Invalid argument`, which does not say that a link-local address needs its interface."""
    status, out = cli("run", str(STAMP), "--connection", spec, timeout=10)
    assert (status, "listening" in out) == (64, False), out
    said = re.search(f'pytclmilter run: --connection "{re.escape(spec)}": "fe80::1" is a link-local address, which '
                     r"means nothing without its interface: name it, as in inet6:8891@fe80::1%(\S+) \(Linux refuses "
                     r"the bind\)\n", out)
    assert said and said.group(1) in [name for _, name in socket.if_nameindex() if name != "lo"] + ["eth0"], out


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="a network namespace of its own needs root, unshare and ip")
@pytest.mark.parametrize("interfaces, named", [(("mtabr0", "mtabr1"), "mtabr0"), ((), "eth0")])
def test_run_names_an_interface_the_host_has_in_the_link_local_hint(interfaces: tuple[str, ...], named: str) -> None:
    """The link-local hint said `%eth0` on a host that has no eth0 (ens3, enp0s25, a container's
    veth): now the host's first interface but the loopback, eth0 only where it has none. Run in
    a network namespace of its own, with bridges made for the occasion."""
    made = "".join(f"ip link add {name} type bridge && " for name in interfaces)
    got = subprocess.run(["unshare", "--net", "sh", "-c", made + 'exec "$@"', "sh", *PYTCLMILTER, "run", str(STAMP),
                          "--connection", "inet6:8825@[fe80::7]"],
                         capture_output=True, text=True, timeout=30, env=child_env(None), cwd=str(ROOT))
    assert got.returncode == 64, got.stderr
    assert ("is a link-local address, which means nothing without its interface: name it, as in "
            f"inet6:8825@fe80::7%{named} (Linux refuses the bind)\n") in got.stderr, got.stderr


#: A Python that reads an IPv4-mapped address as its IPv4 form in IPv6Address.is_link_local, as a
#: later one may (CPython has begun to for other such properties): none here does, so a
#: sitecustomize makes one.
MAPPED_AS_IPV4 = """
import ipaddress
_plain = ipaddress.IPv6Address.is_link_local
def _is_link_local(self):
    mapped = self.ipv4_mapped
    return mapped.is_link_local if mapped is not None else _plain.fget(self)
ipaddress.IPv6Address.is_link_local = property(_is_link_local)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="a network namespace of its own needs root, unshare and ip")
def test_run_serves_an_ipv4_mapped_169_254_address_as_libmilter_does(tmp_path: Path) -> None:
    """`inet6:8891@[::ffff:169.254.1.1]` is IPv4 traffic to an address of the host, which
    libmilter binds; the link-local check asked IPv6Address.is_link_local, which a Python that
    reads the mapped form as its IPv4 one answers true for: refused, "a link-local address, which
    means nothing without its interface". Served in a network namespace with that address on lo."""
    (tmp_path / "sitecustomize.py").write_text(MAPPED_AS_IPV4)
    env = child_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})
    setup = "ip link set lo up && ip addr add 169.254.1.1/16 dev lo && "
    got = subprocess.run(["unshare", "--net", "sh", "-c", setup + 'exec timeout -s TERM 3 "$@"', "sh", *PYTCLMILTER,
                          "run", str(STAMP), "--connection", "inet6:0@[::ffff:169.254.1.1]"],
                         capture_output=True, text=True, timeout=30, env=env, cwd=str(ROOT))
    assert "link-local" not in got.stderr, got.stderr
    assert re.search(r"listening on inet6:\d+@::ffff:169\.254\.1\.1\n", got.stdout + got.stderr), got.stderr


@pytest.mark.parametrize("spec", ["inet6:8891@[fe80::1%nosuch9]", "inet6:8891@fe80::1%nosuch9",
                                  "inet6:8891@[fe80::1%999]", "inet6:8891@fe80::1%999"])
def test_run_refuses_a_link_local_address_on_an_interface_there_is_not_saying_so(spec: str) -> None:
    """A zone naming no interface of the host (a typo, a renamed one): bracketed it was "not an
    inet6 address", unbracketed "cannot resolve", and as a number "a link-local address ...
    without its interface: name it", though it was named (the unknown index was dropped)."""
    status, out = cli("run", str(STAMP), "--connection", spec, timeout=10)
    assert (status, "listening" in out) == (64, False), out
    zone = spec.rpartition("%")[2].rstrip("]")
    assert (f'pytclmilter run: --connection "{spec}": "fe80::1%{zone}": no network interface "{zone}" on this '
            "host (ip link lists them)\n") in out, out
    postfix = f"{spec}:8891" if spec.endswith("]") else None  # (what follows "]" is said first)
    if postfix is not None:
        _, out = cli("run", str(STAMP), "--connection", postfix, timeout=10)
        assert f'--connection "{postfix}": ":8891" after "]" (inet:HOST:PORT is Postfix\'s syntax' in out, out


@pytest.mark.parametrize("option, value, said", [
    ("--workers", "-05", "expected positive integer up to 1024"), ("--backlog", "000", "expected positive integer"),
    ("--timeout", " -010", "expected non-negative integer")])
def test_run_quotes_a_refused_decimal_flag_as_given(option: str, value: str, said: str) -> None:
    """Read in decimal, the flag was refused as the number it became: `--workers -05` said
    `got "-5"`, `--backlog 000` `got "0"`, a value the user never typed."""
    status, out = cli("run", str(STAMP), option, value, "--connection", "inet:0@127.0.0.1", timeout=10)
    assert status == 64, out
    assert f'pytclmilter run: {option}: {said} but got "{value}"' in out, out
    assert "listening" not in out


def test_run_reads_a_leading_zero_in_decimal(serve: Callable[..., TclRun]) -> None:
    """`--workers 010` served with 8 workers (Tcl reads a leading 0 as octal), `--workers 08` was
    refused as a bad octal number: on a command line, 010 is ten."""
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1", "--workers", "010")
    m.wait_for(r"INFO: 10 workers serving inet:\d+@127\.0\.0\.1")
    assert m.stop() == 0
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1", "--workers", "08")
    m.wait_for(r"INFO: 8 workers serving inet:\d+@127\.0\.0\.1")
    assert m.stop() == 0


@pytest.mark.parametrize("name", ["", "  "])
def test_run_refuses_an_empty_name(name: str) -> None:
    """An empty --name was taken: log lines and the listening line named no milter."""
    status, out = cli("run", str(STAMP), "--name", name, "--connection", "inet:0@127.0.0.1")
    assert status == 64
    assert f"pytclmilter run: --name {name!r}: must not be empty" in out, out
    assert "listening" not in out


def test_run_says_socket_mode_is_ignored_for_an_inet_socket(serve: Callable[..., TclRun]) -> None:
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1", "--socket-mode", "0660")
    m.wait_for(r"WARNING: --socket-mode 0660 applies to a unix socket's file: inet:\d+@127\.0\.0\.1 has none "
               r"\(ignored\)", since=0)
    assert m.stop() == 0


def test_run_serves_when_stdout_is_a_pipe_nobody_reads(tmp_path: Path) -> None:
    """The listening line went to a closed pipe, and its EPIPE ended `milter main` with an error."""
    port = free_port()
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.Popen([*PYTCLMILTER, "run", str(STAMP), "--connection", f"inet:{port}@127.0.0.1"],
                            stdout=w, stderr=subprocess.PIPE, env=child_env(None), cwd=str(tmp_path))
    os.close(w)
    try:
        status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml"), timeout=20)
        for _ in range(50):  # (until it listens)
            if status == 0:
                break
            time.sleep(0.2)
            status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml"))
        assert status == 0 and "verdict: accept at eom" in out, out
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"stdout cannot be written (Broken pipe): the listening line is not printed" in err, err


def test_a_socket_mode_that_is_no_file_mode_is_refused_at_bind(tmp_path: Path) -> None:
    """The Python API's socket_mode too: the socket is never made."""
    from pytclmilter.connspec import ConnSpecError, parse
    from pytclmilter.listener import bind

    for mode in (-1, 0o7777):
        with pytest.raises(ConnSpecError, match="is no file mode"):
            bind(parse(f"unix:{tmp_path}/m.sock"), None, mode)
        assert not (tmp_path / "m.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_run_user_nobody_drops_privileges_while_serving(serve: Callable[..., TclRun]) -> None:
    nobody = pwd.getpwnam("nobody")
    sockdir = world_dir()
    try:
        sock = sockdir / "stamp.sock"
        m = serve(STAMP, "--connection", f"unix:{sock}", "--user", "nobody", "--socket-mode", "0660")
        status_lines = Path(f"/proc/{m.child.pid}/status").read_text()
        uid_line = re.search(r"^Uid:\s+(.*)$", status_lines, re.M).group(1).split()
        gid_line = re.search(r"^Gid:\s+(.*)$", status_lines, re.M).group(1).split()
        assert uid_line == [str(nobody.pw_uid)] * 4  # real, effective, saved, filesystem
        assert gid_line == [str(nobody.pw_gid)] * 4
        groups = re.search(r"^Groups:(.*)$", status_lines, re.M).group(1).split()  # type: ignore[union-attr]
        assert sorted(map(int, groups)) == sorted(set(os.getgrouplist("nobody", nobody.pw_gid))), "root's groups kept"
        st = os.stat(sock)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o660)
        m.wait_for(f"running as uid {nobody.pw_uid} gid {nobody.pw_gid}", since=0)
        # it still serves, as nobody
        status, out = cli("send", "--connection", f"unix:{sock}", str(DATA / "plain.eml"))
        assert status == 0 and "X-Filtered-By: Stamp on" in out, out
        assert m.stop() == 0
        assert not sock.exists()  # nobody could remove it: the directory is world-writable
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.parametrize("script", [STAMP, SIZEPOLICY, RCPTREWRITE, GREYLIST], ids=lambda p: p.stem)
def test_an_example_stops_cleanly_where_its_user_cannot_remove_the_socket(serve: Callable[..., TclRun],
                                                                          tmp_path: Path, script: Path) -> None:
    """The examples delete their socket after `milter main`, as the manual's does: pytclmilter has
    removed it by then, but in a directory of root's (the script's own unix:/var/run/...) the
    --user could not, and that `file delete` then failed the script at every stop, exit 1."""
    sockdir = tmp_path / "run"
    sockdir.mkdir(mode=0o755)
    sock = sockdir / "filter.sock"
    m = serve(script, *(GREYLIST_STORE if script == GREYLIST else ()), "--connection", f"unix:{sock}",
              "--user", "nobody")
    assert m.stop() == 0, m.text
    assert (f"WARNING: cannot remove socket file {sock}: Permission denied (left as a stale socket: the next "
            "start replaces it)") in m.text, m.text
    assert "error deleting" not in m.text, m.text


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_run_warns_at_start_when_its_user_cannot_read_what_a_reload_reads(serve: Callable[..., TclRun],
                                                                         tmp_path: Path) -> None:
    """The start reads the script as root, a reload as --user: a script in a directory of root's
    alone (0700) served, and only the first reload, perhaps months later, said "permission denied"."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    script = private / "stamp.tcl"
    shutil.copy(STAMP, script)
    nobody = pwd.getpwnam("nobody").pw_uid
    m = serve(script, "--connection", "inet:0@127.0.0.1", "--user", "nobody")
    m.wait_for(f"running as uid {nobody}", since=0)
    assert (f"WARNING: uid {nobody} cannot read {script} (Permission denied): a reload (SIGUSR1) reads it as "
            "this user and would fail; let it read the file and its directories") in m.text, m.text
    m.child.kill(signal.SIGUSR1)
    m.wait_for("generation 1 serves on unchanged")  # as foretold
    assert m.stop() == 0
    public = Path(tempfile.mkdtemp(prefix="pytclmilter-cli-"))  # (the tree may sit in root's home)
    try:
        public.chmod(0o755)
        shutil.copy(STAMP, public / "stamp.tcl")
        m = serve(public / "stamp.tcl", "--connection", "inet:0@127.0.0.1", "--user", "nobody")
        assert m.stop() == 0  # readable: not a word
        assert "cannot read" not in m.text, m.text
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_run_warns_at_start_when_its_user_cannot_read_a_file_the_script_sources(serve: Callable[..., TclRun]) -> None:
    """The script readable by --user, but a file it sources not (lists kept in a directory of
    root's alone): the start said nothing, and the first reload failed on that file. Its name is
    the script's text: escaped in the log line."""
    public = Path(tempfile.mkdtemp(prefix="pytclmilter-cli-"))  # (the tree may sit in root's home)
    try:
        public.chmod(0o755)
        private = public / "private"
        private.mkdir(mode=0o700)
        lists = private / "li\nsts.tcl"
        lists.write_text("set lists {}\n")
        script = public / "stamp.tcl"
        script.write_text(STAMP.read_text().replace("milter main", f"source {{{lists}}}\nmilter main", 1))
        nobody = pwd.getpwnam("nobody").pw_uid
        m = serve(script, "--connection", "inet:0@127.0.0.1", "--user", "nobody")
        m.wait_for(f"running as uid {nobody}", since=0)
        assert (f"WARNING: uid {nobody} cannot read {private}/li\\nsts.tcl (Permission denied): a reload (SIGUSR1) "
                "reads it as this user and would fail; let it read the file and its directories") in m.text, m.text
        assert f"cannot read {script}" not in m.text, m.text
        m.child.kill(signal.SIGUSR1)
        m.wait_for("generation 1 serves on unchanged")  # as foretold
        assert m.stop() == 0
    finally:
        shutil.rmtree(public, ignore_errors=True)


# Run as nobody, with no capability to change ids (as under a unit's User=nobody), but with
# CAP_DAC_OVERRIDE so that nobody may run this venv's Python (it may sit in root's home).
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "--inh-caps=+dac_override", "--ambient-caps=+dac_override"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and util-linux's setpriv to start as nobody")
def test_run_user_naming_the_unprivileged_user_it_runs_as_serves(tmp_path: Path) -> None:
    """A unit with User=nobody that keeps --user nobody: nothing to switch, so it serves; before,
    setgroups() failed and the start ended in "milter main: Operation not permitted", exit 1."""
    m = TclRun([*AS_NOBODY, *PYTCLMILTER, "run", str(STAMP), "--connection", "inet:0@127.0.0.1",
                "--user", "nobody"], cwd=str(tmp_path))
    try:
        m.wait_for(r"listening on|milter main:", 15, advance=False)
        assert "Operation not permitted" not in m.text, m.text
        m.wait_listening()
        m.wait_for("running as uid 65534 gid 65534", since=0)  # (the log line may follow the listening line)
        status, out = cli("send", "--connection", m.spec or "", str(DATA / "plain.eml"))
        assert status == 0 and "X-Filtered-By: Stamp on" in out, out
        assert m.stop() == 0
    finally:
        if m.alive():
            m.stop(signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and util-linux's setpriv to start as nobody")
def test_run_group_it_cannot_switch_to_without_root_is_a_usage_error(tmp_path: Path) -> None:
    other = grp.getgrnam("mail").gr_gid
    m = TclRun([*AS_NOBODY, *PYTCLMILTER, "run", str(STAMP), "--connection", "inet:0@127.0.0.1",
                "--user", "nobody", "--group", str(other)], cwd=str(tmp_path))
    assert m.wait_exit(15) == 64, m.text
    assert (f"pytclmilter run: --user/--group: switching to gid {other} needs root privileges (the process "
            "runs as gid 65534)") in m.text, m.text
    assert "listening on" not in m.text


def _profile_files(folder: Path) -> list[Path]:
    """The start-up files tkinter.Tk reads from $HOME, each leaving a marker if it runs."""
    markers = []
    for name in (".Tk", ".pytclmilter", ".cli"):  # the class, then the program's name
        tcl_marker, py_marker = folder / f"ran{name}.tcl", folder / f"ran{name}.py"
        (folder / f"{name}.tcl").write_text(f"close [open {tcl_marker} w]\n")
        (folder / f"{name}.py").write_text(f"open({str(py_marker)!r}, 'w').close()\n")
        markers += [tcl_marker, py_marker]
    return markers


@pytest.mark.parametrize("home", ["set", "unset"])
def test_run_reads_no_start_up_file_from_home_or_the_current_directory(tmp_path: Path, home: str) -> None:
    """tkinter.Tcl() sources .Tk.tcl and executes .Tk.py (and .pytclmilter.py) from $HOME, or from
    the current directory when HOME is unset, as under systemd: a root daemon ran them."""
    markers = _profile_files(tmp_path)
    prefix = ["env", "-u", "HOME"] if home == "unset" else []
    m = TclRun([*prefix, *PYTCLMILTER, "run", str(STAMP), "--connection", "inet:0@127.0.0.1"],
               env={"HOME": str(tmp_path)}, cwd=str(tmp_path))
    try:
        m.wait_listening()
        assert m.stop() == 0
    finally:
        if m.alive():
            m.stop(signal.SIGKILL)
    assert [p.name for p in markers if p.exists()] == []


def test_run_refuses_an_empty_host_rather_than_listen_on_every_address(tmp_path: Path) -> None:
    """`inet:8891@` (say `inet:8891@$HOST` with HOST unset) is an unknown host to libmilter; it
    listened on every address, exposing a filter without authentication to the network."""
    m = TclRun([*PYTCLMILTER, "run", str(STAMP), "--connection", "inet:0@"], cwd=str(tmp_path))
    try:
        m.wait_for(r"listening on|pytclmilter run:", 15, advance=False)
        assert "listening on" not in m.text, m.text
        assert m.wait_exit() == 64
        assert 'pytclmilter run: --connection "inet:0@": missing host after "@" (inet:PORT alone listens ' \
               "on every address)" in m.text, m.text
    finally:
        if m.alive():
            m.stop(signal.SIGKILL)


WAITS_FOR_ITS_JOB = r"""
package require TclMilter
proc eom {ctx} {
    $ctx addheader X-Waited [exec sh -c {sleep 0.1 & wait; echo yes}]
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
"""


def test_check_a_script_runs_tcl_helpers_with_info_nameofexecutable_as_under_tclsh(tmp_path: Path) -> None:
    """Tcl is started by Python here, and named Python: `exec [info nameofexecutable] helper.tcl`
    handed a Tcl script to Python. It names the tclsh of this Tcl, where TclMilter's scripts ran."""
    script = tmp_path / "helpers.tcl"
    script.write_text("package require TclMilter\n"
                      'puts "helper says [exec [info nameofexecutable] << {puts [expr {6 * 7}]}]"\n'
                      "milter main\n")
    status, out = cli("check", str(script))
    assert status == 0 and "helper says 42" in out, out


def test_try_waits_for_a_callback_as_long_as_its_call_timeout_allows(tmp_path: Path) -> None:
    """try waited a fixed 30 s for each reply: a callback of 31 s, within its -calltimeout of 45,
    showed as "milter failure: no reply from the filter within 30 s", where `run` would have
    answered the MTA (31 s: this test is slow on purpose, the old limit was 30)."""
    script = tmp_path / "slow.tcl"
    script.write_text("package require TclMilter\nmilter configure -calltimeout 45\n"
                      "proc eom {ctx} { after 31000; $ctx addheader X-Slow yes; return SMFIS_CONTINUE }\n"
                      "milter register eom eom\nmilter main\n")
    status, out = cli("try", str(script), str(DATA / "plain.eml"), timeout=90)
    assert status == 0 and "action: addheader X-Slow: yes" in out, out


def test_check_refuses_an_async_setup_in_a_python_file(tmp_path: Path) -> None:
    """Its coroutine was never awaited: a RuntimeWarning, no callback registered, exit 0, and the
    filter ran without its Python half."""
    hooks = tmp_path / "asetup.py"
    hooks.write_text("async def setup(milter):\n    milter.register('envfrom', lambda ctx, args: 'REJECT')\n")
    status, out = cli("check", str(STAMP), "--python", str(hooks))
    assert status == 64, out
    assert f"--python {hooks}: setup(milter) must be a plain function, not async" in out, out


OVER_ITS_FILE_SIZE_LIMIT = r"""
package require TclMilter
proc eom {ctx} {
    # as under tclsh: a program past `ulimit -f` is killed by SIGXFSZ (exit status 128 + 25)
    $ctx addheader X-Status [exec sh -c {ulimit -f 1; head -c 4096 /dev/zero > "$0" 2>/dev/null; echo $?} %s]
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
"""


def test_try_a_program_the_script_execs_past_its_file_size_limit_is_killed_as_under_tclsh(tmp_path: Path) -> None:
    """Python ignores SIGXFSZ, and an ignored signal stays ignored across exec: the program went on
    with "File too large" errors (status 1) where the script, written for tclsh, expects it killed."""
    script = tmp_path / "limited.tcl"
    script.write_text(OVER_ITS_FILE_SIZE_LIMIT % (tmp_path / "big"))
    status, out = cli("try", str(script), str(DATA / "plain.eml"))
    assert status == 0, out
    assert "action: addheader X-Status: 153" in out, out


def test_run_a_callback_whose_shell_waits_for_its_job_is_answered(tmp_path: Path) -> None:
    """What a callback execs inherits its signal mask; run blocked SIGCHLD (for the --workers
    supervisor) in the thread that serves too, so `sh -c {scan & wait}` waited for ever, and the
    whole milter with it: no answer, not even to SIGTERM."""
    script = tmp_path / "waits.tcl"
    script.write_text(WAITS_FOR_ITS_JOB)
    m = TclRun([*PYTCLMILTER, "run", str(script), "--connection", "inet:0@127.0.0.1"], cwd=str(tmp_path))
    try:
        m.wait_listening()
        status, out = cli("send", "--connection", m.spec or "", str(DATA / "plain.eml"), timeout=20)
        assert status == 0 and "X-Waited: yes" in out, out
        assert m.stop() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(m.child.pid, signal.SIGKILL)  # (the shell too, were it still waiting)


WAITS_BEFORE_AND_AFTER_MAIN = r"""
package require TclMilter
puts "loading: [exec sh -c {sleep 0.1 & wait; echo waited}]"
after 200 {milter stop}
milter main
puts "after main: [exec sh -c {sleep 0.1 & wait; echo waited}]"
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_a_script_whose_shell_waits_before_and_after_main_goes_on(tmp_path: Path, workers: str) -> None:
    """The script's own code, before `milter main` and after it returns, execs as under tclsh:
    SIGCHLD, blocked for the --workers supervisor, was blocked there too, and a shell's `wait`
    waited for ever: the milter never listened."""
    script = tmp_path / "waits.tcl"
    script.write_text(WAITS_BEFORE_AND_AFTER_MAIN)
    m = TclRun([*PYTCLMILTER, "run", str(script), "--connection", "inet:0@127.0.0.1", "--workers", workers],
               cwd=str(tmp_path))
    try:
        m.wait_for(r"after main: waited", 20)
        assert "loading: waited" in m.text, m.text
        assert m.wait_exit() == 0, m.text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(m.child.pid, signal.SIGKILL)  # (the shell too, were it still waiting)


def test_run_pidfile_is_written_while_serving_and_removed_at_stop(serve: Callable[..., TclRun],
                                                                  tmp_path: Path) -> None:
    pidfile = tmp_path / "stamp.pid"
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1", "--pidfile", str(pidfile))
    assert pidfile.read_text() == f"{m.child.pid}\n"
    assert m.stop() == 0
    assert not pidfile.exists()


def test_run_relative_pidfile_is_where_it_was_given_when_the_script_changes_directory(
        serve: Callable[..., TclRun], tmp_path: Path) -> None:
    """`--pidfile stamp.pid` was written when the socket was bound, relative to the directory the
    script had changed to by then (`cd /` in a daemon-style script: a root-owned /stamp.pid)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = tmp_path / "stamp.tcl"
    script.write_text(f"cd {{{elsewhere}}}\n" + STAMP.read_text())
    m = serve(script, "--connection", "inet:0@127.0.0.1", "--pidfile", "stamp.pid")
    assert (tmp_path / "stamp.pid").read_text() == f"{m.child.pid}\n"
    assert os.listdir(elsewhere) == []
    assert m.stop() == 0
    assert not (tmp_path / "stamp.pid").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_run_user_with_pidfile_in_a_root_owned_directory(serve: Callable[..., TclRun]) -> None:
    """BUG: the pid file is written after the privilege drop, so /run/NAME.pid (root's) fails.

    The usual layout -- `--user milter --pidfile /run/stamp.pid` started by root --
    ends in "milter main: Permission denied" and exit 1 before serving. Daemons
    write their pid file while still root.
    """
    sockdir = world_dir()
    piddir = Path(tempfile.mkdtemp(prefix="pytclmilter-run-"))  # like /run: root's, mode 0755
    piddir.chmod(0o755)
    try:
        pidfile = piddir / "stamp.pid"
        m = serve(STAMP, "--connection", f"unix:{sockdir / 'stamp.sock'}", "--user", "nobody",
                  "--pidfile", str(pidfile), wait=False)
        m.wait_for(r"listening on|Permission denied", 15)
        assert "Permission denied" not in m.text, m.text
        assert pidfile.read_text() == f"{m.child.pid}\n"
        assert m.stop() == 0
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(piddir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_serving_as_root_without_user_is_one_warning_naming_the_option(serve: Callable[..., TclRun]) -> None:
    """Root without --user served in silence: every callback, and every program the script
    starts, parsing strangers' mail as root. Now one warning at start says so and names --user;
    with --user, nothing."""
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
    assert m.stop() == 0
    assert m.text.count(ROOT_WARNING) == 1, m.text
    assert re.search(r"WARNING: serving as root without --user: every callback, and every program the script "
                     r"starts \(exec, open \|cmd\), runs as root, .* start with --user USER", m.text), m.text
    dropped = serve(STAMP, "--connection", "inet:0@127.0.0.1", "--user", "nobody")
    assert dropped.stop() == 0
    assert "as root" not in dropped.text, dropped.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("user", ["root", "0"])
def test_serving_as_root_with_a_user_of_uid_0_is_warned_of_too(serve: Callable[..., TclRun], user: str) -> None:
    """`--user root` (or `--user 0`) served as root in silence, as if it had dropped privileges:
    the warning came only without --user, though the risk is the same. It now says which --user
    is uid 0 and asks for another user."""
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1", "--user", user)
    assert m.stop() == 0
    assert m.text.count("WARNING: serving as root") == 1, m.text
    assert warnings(m.text) == [], m.text  # (the helper leaves this start's warning out, as the other)
    assert re.search(rf"WARNING: serving as root \(--user {user} is uid 0\): every callback, and every program "
                     r"the script starts \(exec, open \|cmd\), runs as root, .* start with --user USER, a user "
                     r"other than root", m.text), m.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("option", [("--timeout", "abc"), ("--connection", "tcp:1"), ("--workers", "100000")])
def test_a_usage_error_as_root_is_not_preceded_by_the_serving_as_root_warning(option: tuple[str, str]) -> None:
    """`run --timeout abc` as root logged "serving as root without --user" and then exited 64,
    having served nothing: the warning now comes once the options are known to be valid."""
    status, out = cli("run", str(STAMP), *option)
    assert status == 64, out
    assert ROOT_WARNING not in out and out.rstrip().splitlines()[-1].startswith("pytclmilter run: "), out


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_run_lifts_its_open_file_soft_limit_to_the_hard_limit(tmp_path: Path) -> None:
    """Started with systemd's usual soft limit, the filter would refuse connections long before
    the machine runs out; it raises the soft limit to the hard one itself."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to lift")
    m = TclRun(["prlimit", "--nofile=256:", "--", *PYTCLMILTER, "run", str(STAMP),
                "--connection", "inet:0@127.0.0.1"], cwd=str(tmp_path))
    try:
        m.wait_listening()
        limits = Path(f"/proc/{m.child.pid}/limits").read_text()
        soft, hard_seen = re.search(r"^Max open files\s+(\S+)\s+(\S+)", limits, re.M).groups()
        assert soft == hard_seen != "256", limits
        assert m.stop() == 0
    finally:
        if m.alive():
            m.stop(signal.SIGKILL)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_the_programs_a_script_starts_inherit_the_lifted_limit_and_the_documented_commands_set_it_back(
        tmp_path: Path) -> None:
    """docs/deployment.md, LimitNOFILE: a program the script starts inherits the lifted soft limit
    (nothing of pytclmilter's runs between Tcl's fork and exec); the two commands given there
    start it with 1024 again."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to lift")
    script = tmp_path / "children.tcl"
    script.write_text('package require TclMilter\n'
                      'puts "plain [exec sh -c {ulimit -Sn}]"\n'
                      'puts "prlimit [exec prlimit --nofile=1024: -- sh -c {ulimit -Sn}]"\n'
                      'puts "ulimit [exec sh -c {ulimit -Sn 1024; exec "$@"} sh sh -c {ulimit -Sn}]"\n'
                      'milter main\n')
    m = TclRun(["prlimit", "--nofile=1024:", "--", *PYTCLMILTER, "run", str(script),
                "--connection", "inet:0@127.0.0.1"], cwd=str(tmp_path))
    try:
        m.wait_listening()
        lifted = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        for line in (f"plain {lifted}", "prlimit 1024", "ulimit 1024"):
            assert re.search(rf"^{line}\r?$", m.text, re.M), (line, m.text)
        assert m.stop() == 0
    finally:
        if m.alive():
            m.stop(signal.SIGKILL)


def test_run_names_the_socket_it_cannot_create() -> None:
    """BUG: a unix socket in a missing directory fails with a bare "No such file or directory".

    The inet case names the address ("cannot listen on inet:...: address
    already in use"); the unix case should name the path the admin must fix.
    """
    status, out = cli("run", str(STAMP), "--connection", "unix:/nonexistent-dir/stamp.sock")
    assert status == 1
    assert "milter main:" in out
    assert "/nonexistent-dir/stamp.sock" in out.split("milter main:", 1)[1].splitlines()[0], out
    # and says what is missing and what to do (it said "No such file or directory": the socket's?)
    assert ("milter main: cannot listen on unix:/nonexistent-dir/stamp.sock: its directory /nonexistent-dir "
            "does not exist: make it first (owned by the --user user, if any: install -d -o USER -m 0750 "
            "/nonexistent-dir)\n") in out, out


def test_run_passes_arguments_after_double_dash_to_the_script(serve: Callable[..., TclRun]) -> None:
    m = serve(SIZEPOLICY, "--connection", "inet:0@127.0.0.1",
              args=("-maxsize", "100000", "-footer", "Scanned by SizePolicy"))
    status, out = cli("send", "--connection", m.spec, str(DATA / "big.eml"))
    assert status == 0, out
    msg = resulting_message(out)
    assert "X-Size-Policy: body removed (body of 153613 bytes over the limit of 100000)" in headers_of(msg)
    assert "more than the 100000 allowed" in body_of(msg)
    assert "report.pdf" not in msg
    assert "body     chunk 3, 22543 bytes -> continue" in out  # three blocks collected at eom
    assert m.stop() == 0


def test_run_rcptrewrite_reads_a_map_file_given_after_double_dash(serve: Callable[..., TclRun],
                                                                   tmp_path: Path) -> None:
    rewrite_map = tmp_path / "rcptrewrite.map"
    rewrite_map.write_text("# old            new ...\nBob@Example.com  robert@example.com bobby@example.net  # moved\n")
    m = serve(RCPTREWRITE, "--connection", "inet:0@127.0.0.1", args=("-map", str(rewrite_map)))
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"))
    assert status == 0, out
    assert "action: delrcpt <bob@example.com>" in out
    assert "envelope: from <alice@example.org> to <robert@example.com>, <bobby@example.net>" in out
    assert "X-Rcpt-Rewritten: <bob@example.com> -> <robert@example.com>, <bobby@example.net>" in out
    assert m.stop() == 0


def test_rcptrewrite_names_the_line_of_its_map_file_that_it_cannot_read(tmp_path: Path) -> None:
    """Bug: a map line that is no Tcl list (a quoted local part with a space, a lone brace)
    failed the load with "unmatched open brace in list" at a line of the script, naming
    neither the map file nor its line."""
    rewrite_map = tmp_path / "rcptrewrite.map"
    rewrite_map.write_text('# old new\nsales@example.com team@example.com\n"john smith"@example.com john@example.com\n')
    status, out = cli("check", str(RCPTREWRITE), "--", "-map", str(rewrite_map))
    assert status == 1
    assert (f"error: -map {rewrite_map} line 3: list element in quotes followed by \"@example.com\" instead of "
            'space: "john smith"@example.com john@example.com') in out, out


def test_run_greylist_keeps_its_state_in_sqlite_and_forgets_with_after_while_serving(
        serve: Callable[..., TclRun], tmp_path: Path) -> None:
    store = tmp_path / "greylist.sqlite"
    m = serve(GREYLIST, "--connection", "inet:0@127.0.0.1", *GREYLIST_STORE,
              args=("-store", f"sqlite:{store}", "-delay", "3600", "-interval", "1"))
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"))
    assert '-> tempfail "451 4.7.1 Greylisted, please try again in 3600 seconds"' in out, out
    ip, sender, rcpt, first, last, seen = _greylist_entry(store)
    assert (ip, sender, rcpt, seen) == ("127.0.0.1", "alice@example.org", "bob@example.com", 1)
    # the admin lets the triplet through: an older first-seen time, seen by the next message
    _greylist_sql(store, "UPDATE triplets SET first_seen = first_seen - 7200")
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"))
    assert status == 0, out
    assert "envrcpt  <bob@example.com> -> continue" in out
    # not seen for longer than -maxage: the `after` timer has the store forget it while `milter main` serves
    _greylist_sql(store, "UPDATE triplets SET last_seen = last_seen - 4000000")
    deadline = time.monotonic() + 5
    while _greylist_sql(store, "SELECT count(*) FROM triplets") != [(0,)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m.alive() and _greylist_sql(store, "SELECT count(*) FROM triplets") == [(0,)], m.text
    assert m.stop() == 0


# ============================================================================ try

STAMP_HEADER = ("X-Filtered-By: Stamp on pytclmilter.localhost (daemon pytclmilter); queue-id 4TRY0000001;\n"
                " client mail.example.net [192.0.2.7] port 25")
CLIENT = ("--client-ip", "192.0.2.7", "--client-name", "mail.example.net")


def test_try_stamp_adds_the_header_with_macros_and_client_address() -> None:
    status, out = cli("try", str(STAMP), str(DATA / "plain.eml"), *CLIENT)
    assert status == 0, out
    assert "not a status" not in out  # `return SMFIS_CONTINUE` is a status like the others
    assert "connect  mail.example.net [192.0.2.7] -> continue" in out
    assert "verdict: accept at eom" in out
    assert "envelope: from <alice@example.org> to <bob@example.com>" in out
    msg = resulting_message(out)
    assert headers_of(msg).endswith(STAMP_HEADER)
    assert body_of(msg).startswith("Hi Bob,\n\nare we still on for lunch on Friday?")


@pytest.mark.parametrize("sender, rcpt", [("<carol@example.net>", "<dave@example.com>"),
                                          ("carol@example.net", "dave@example.com")])
def test_try_sends_the_address_macros_without_angle_brackets(tmp_path: Path, sender: str, rcpt: str) -> None:
    """--from '<a@b>' put "<a@b>" in {mail_addr} (and --rcpt in {rcpt_addr}), which Postfix and
    Sendmail give as a@b: a script comparing the macro passed under try and failed behind the MTA,
    and the verdict line of a filter without an envfrom callback read from=<<a@b>>."""
    script = tmp_path / "macros.tcl"
    script.write_text(
        "package require TclMilter 1.0\n"
        "proc rcpt {ctx to} { puts \"MACROS [$ctx getsymval {{mail_addr}}]|[$ctx getsymval {{rcpt_addr}}]\"\n"
        "    return SMFIS_CONTINUE }\n"
        "milter register envrcpt rcpt\nmilter main\n")
    status, out = cli("try", str(script), str(DATA / "plain.eml"), "--from", sender, "--rcpt", rcpt)
    assert status == 0, out
    assert "MACROS carol@example.net|dave@example.com" in out, out
    assert "envfrom  <carol@example.net> -> continue" not in out  # (no envfrom callback: not asked)
    assert "envrcpt  <dave@example.com> -> continue" in out
    assert "envelope: from <carol@example.net> to <dave@example.com>" in out


def test_try_sizepolicy_replaces_the_body_of_a_message_with_an_exe() -> None:
    status, out = cli("try", str(SIZEPOLICY), str(DATA / "exe.eml"))
    assert status == 0, out
    assert "verdict: accept at eom" in out
    msg = resulting_message(out)
    head, body = headers_of(msg), body_of(msg)
    assert "Content-Type: text/plain; charset=us-ascii" in head
    assert "multipart/mixed" not in head
    assert 'X-Size-Policy: body removed (attachment "invoice.exe" is not allowed)' in head
    assert body.startswith("This message was changed by the mail system's size and attachment policy.\n")
    assert 'it carried the attachment "invoice.exe"' in body
    assert "TVqQ" not in body  # the base64 of the MZ header is gone
    assert "action: chgheader Content-Transfer-Encoding[1] delete" in out


def test_try_sizepolicy_leaves_a_plain_message_alone() -> None:
    status, out = cli("try", str(SIZEPOLICY), str(DATA / "plain.eml"))
    assert status == 0, out
    assert "action:" not in out
    original = (DATA / "plain.eml").read_text()
    assert resulting_message(out).strip() == original.strip()


def test_try_rcptrewrite_rewrites_envelope_recipients_and_sender() -> None:
    status, out = cli("try", str(RCPTREWRITE), str(DATA / "rewrite.eml"))
    assert status == 0, out
    assert "action: delrcpt <sales@example.com>" in out
    assert "action: addrcpt <team-sales@example.com>" in out
    assert "action: chgfrom <noreply@example.com>" in out
    assert "envelope: from <noreply@example.com> to <carol@example.com>, <team-sales@example.com>" in out
    head = headers_of(resulting_message(out))
    assert "X-Rcpt-Rewritten: <sales@example.com> -> <team-sales@example.com>" in head
    assert "X-Sender-Rewritten: <noreply@legacy.example.com> -> <noreply@example.com>" in head
    assert "To: Sales <sales@example.com>" in head  # headers are not the envelope


def test_try_rcptrewrite_one_address_to_several() -> None:
    status, out = cli("try", str(RCPTREWRITE), str(DATA / "plain.eml"),
                      "--rcpt", "Info@Example.com", "--rcpt", "bob@example.com")
    assert status == 0, out
    assert "action: delrcpt <Info@Example.com>" in out  # as the MTA gave it
    assert "envelope: from <alice@example.org> to <bob@example.com>, <alice@example.com>, <bob@example.com>" in out


def test_try_blacklist_rejects_a_blacklisted_envelope_sender() -> None:
    status, out = cli("try", str(BLACKLIST), str(DATA / "blacklisted.eml"))
    assert status == 1, out
    assert "envfrom  <spammer@spamdomain.com> -> reject" in out
    assert "verdict: reject at envfrom" in out
    assert "resulting message" not in out


def test_try_blacklist_rejects_a_blacklisted_from_header() -> None:
    status, out = cli("try", str(BLACKLIST), str(DATA / "blacklisted-from.eml"))
    assert status == 1, out
    assert "envfrom  <bounces@lists.example.net> -> continue" in out
    assert "header   From: friend@public.com -> (no reply expected)" in out
    # the header verdict waits for the next event the MTA waits on (no-reply headers)
    assert "verdict: reject at eom" in out


def test_try_blacklist_accepts_other_mail() -> None:
    status, out = cli("try", str(BLACKLIST), str(DATA / "plain.eml"))
    assert status == 0, out
    assert "verdict: accept at eom" in out


@pytest.mark.parametrize(
    "script, message, options, verdict, exit_status",
    [
        (STAMP, "plain.eml", CLIENT, "accept", 0),
        (SIZEPOLICY, "exe.eml", (), "accept", 0),
        (RCPTREWRITE, "rewrite.eml", (), "accept", 0),
        (BLACKLIST, "blacklisted.eml", (), "reject", 1),
        (BLACKLIST, "blacklisted-from.eml", (), "reject", 1),
    ],
    ids=["stamp", "sizepolicy", "rcptrewrite", "blacklist-envfrom", "blacklist-header"],
)
def test_try_json_has_the_same_verdict_as_the_text_report(script: Path, message: str, options: tuple[str, ...],
                                                          verdict: str, exit_status: int) -> None:
    status, out = cli("try", str(script), str(DATA / message), *options)
    assert status == exit_status
    assert f"verdict: {verdict} at " in out
    status, out = cli("try", str(script), str(DATA / message), *options, "--json")
    assert status == exit_status
    doc = json_of(out)
    assert doc["verdict"] == verdict
    assert doc["exit_status"] == exit_status
    assert doc["negotiated"]["version"] == 6
    if verdict == "accept":
        assert doc["message"]["text"].startswith("Return-Path: ")
    else:
        assert "message" not in doc


def test_try_json_stages_say_null_for_no_reply_and_no_reply_text() -> None:
    """docs/cli.md: a stage's reply is null when none was expected, its text null without one."""
    status, out = cli("try", str(BLACKLIST), str(DATA / "blacklisted-from.eml"), "--json")
    assert status == 1, out
    stages = [(s["stage"], s["reply"], s["text"]) for s in json_of(out)["stages"]]
    assert stages[0] == ("envfrom", "continue", None), stages
    assert {(reply, text) for stage, reply, text in stages if stage == "header"} == {(None, None)}, stages
    assert not any(s["failed"] for s in json_of(out)["stages"]), out
    assert stages[-1][0] == "eom" and stages[-1][1] == "reject", stages


def test_try_json_shows_the_edited_message() -> None:
    status, out = cli("try", str(STAMP), str(DATA / "plain.eml"), *CLIENT, "--json")
    assert status == 0
    doc = json_of(out)
    assert doc["stage"] == "eom"
    assert [s["stage"] for s in doc["stages"]] == ["connect", "eom"]
    assert doc["actions"] == ["addheader " + STAMP_HEADER]
    assert STAMP_HEADER.replace("\n", "\r\n") in doc["message"]["text"]
    assert doc["message"]["recipients"] == ["<bob@example.com>"]


#: Discards the blacklist's spammer; holds every other message, its envelope changed, addresses
#: given without angle brackets.
DISCARD_OR_HOLD = """package require TclMilter 1.0
proc ef {ctx from} {
    if {[string match *spammer* [lindex $from 0]]} { return SMFIS_DISCARD }
    return SMFIS_CONTINUE
}
proc eom {ctx} {
    $ctx quarantine "held for review"
    $ctx delrcpt bob@example.com
    $ctx addrcpt dave@example.com
    $ctx chgfrom carol@example.com
    return SMFIS_CONTINUE
}
milter register envfrom ef
milter register eom eom
milter main
"""


def test_try_exit_statuses_and_reports_of_a_discarded_and_a_quarantined_message(tmp_path: Path) -> None:
    """docs/cli.md: a discarded message exits 3 and is not shown; a quarantined one exits 4 and
    is shown as the MTA holds it (its reason, its envelope changes: a recipient deleted or added
    and a sender changed without angle brackets are the MTA's addresses with them)."""
    script = tmp_path / "discard-or-hold.tcl"
    script.write_text(DISCARD_OR_HOLD)
    status, out = cli("try", str(script), str(DATA / "blacklisted.eml"))
    assert status == 3, out
    assert "verdict: discard at envfrom\n" in out and "--- resulting message ---" not in out, out
    status, out = cli("try", str(script), str(DATA / "blacklisted.eml"), "--json")
    doc = json_of(out)
    assert (status, doc["verdict"], doc["exit_status"], "message" in doc) == (3, "discard", 3, False), out
    status, out = cli("try", str(script), str(DATA / "plain.eml"))
    assert status == 4, out
    assert 'verdict: quarantine at eom "held for review"\n' in out, out
    assert "envelope: from <carol@example.com> to <dave@example.com>\n" in out, out
    assert resulting_message(out).startswith("Return-Path: <alice@example.org>\n"), out
    status, out = cli("try", str(script), str(DATA / "plain.eml"), "--json")
    doc = json_of(out)
    assert (status, doc["verdict"], doc["reply"], doc["exit_status"]) == (4, "quarantine", "held for review", 4), out
    assert doc["message"]["quarantine"] == "held for review", out
    assert (doc["message"]["sender"], doc["message"]["recipients"]) == ("<carol@example.com>", ["<dave@example.com>"])


#: Deletes a recipient the envelope has and one it does not.
DELRCPT_STRANGER = """package require TclMilter 1.0
proc eom {ctx} {
    $ctx delrcpt bob@example.com
    $ctx addrcpt carol@example.com
    $ctx delrcpt nobody@example.com
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
"""


def test_try_and_send_show_a_delrcpt_of_a_recipient_the_envelope_lacks(tmp_path: Path,
                                                                       serve: Callable[..., TclRun]) -> None:
    """docs/cli.md: an action the MTA could not apply is a note of the report; a delrcpt of a
    recipient the envelope does not have was dropped silently, as if it had removed one."""
    script = tmp_path / "delrcpt.tcl"
    script.write_text(DELRCPT_STRANGER)
    note = "delrcpt nobody@example.com: no such recipient"
    tried = cli("try", str(script), str(DATA / "plain.eml"))
    assert tried[0] == 0, tried
    assert f"verdict: accept at eom\nnote: {note}\nenvelope: from <alice@example.org> to <carol@example.com>\n" \
        in tried[1], tried
    m = serve(script, "--connection", "inet:0@127.0.0.1")
    assert cli("send", "--connection", m.spec, str(DATA / "plain.eml")) == tried
    for command in (("try", str(script)), ("send", "--connection", m.spec)):
        status, out = cli(*command, str(DATA / "plain.eml"), "--json")
        doc = json_of(out)
        assert (status, doc["notes"]) == (0, [note]), out
        assert doc["message"]["recipients"] == ["<carol@example.com>"], out
    status, out = cli("try", str(STAMP), str(DATA / "plain.eml"), "--json")
    assert (status, json_of(out)["notes"]) == (0, []), out


def test_try_notes_a_message_whose_every_recipient_a_delrcpt_removed(tmp_path: Path) -> None:
    """Both MTAs answer 250 to a message whose filter deleted every recipient, and deliver it
    nowhere (docs/protocol.md §10.17); `try` reported "verdict: accept" and an envelope ending in
    "to " without a word, a lost message looking like a delivered one."""
    script = tmp_path / "delall.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "proc eom {ctx} { $ctx delrcpt <bob@example.com>; return SMFIS_CONTINUE }\n"
                      "milter register eom eom\nmilter main\n")
    note = "no recipient left: the MTA answers 250 and delivers the message nowhere"
    status, out = cli("try", str(script), str(DATA / "plain.eml"))
    assert status == 0, out
    assert f"verdict: accept at eom\nnote: {note}\nenvelope: from <alice@example.org> to \n" in out, out
    status, out = cli("try", str(script), str(DATA / "plain.eml"), "--json")
    assert (status, json_of(out)["notes"], json_of(out)["message"]["recipients"]) == (0, [note], []), out


def test_try_shows_the_headers_no_filter_changed_as_the_message_has_them(tmp_path: Path) -> None:
    """Bug: every header was shown rewritten as `Name: value`, so a tab or no space after the
    colon, or an empty value, came out altered (`Subject: \tHi`), although the MTA delivers a
    header no filter touched as it came; only added or changed ones get the MTA's one space."""
    original = b"Subject:\tHi\r\nX-A:b\r\nX-Empty:\r\nX-F:  two\r\n\tfolded \xe9\r\nFrom: a@example.org\r\n"
    (tmp_path / "m.eml").write_bytes(original + b"\r\nbody\r\n")
    status, out = cli("try", str(STAMP), str(tmp_path / "m.eml"), *CLIENT, "--json")
    assert status == 0
    message = json_of(out)["message"]["text"].encode("utf-8", "surrogateescape")
    assert message == original + STAMP_HEADER.replace("\n", "\r\n").encode() + b"\r\n\r\nbody\r\n"


def test_try_starts_the_body_at_a_line_of_the_header_section_that_is_no_field(tmp_path: Path) -> None:
    """Bug: such a line (a message cut short, a body without its empty line) was dropped, so
    neither the filter nor the report saw it. The MTAs start the body there."""
    raw = b"From: a@example.org\nSubject: cut\n<html>\n\nbody\n"
    (tmp_path / "m.eml").write_bytes(raw)
    status, out = cli("try", str(STAMP), str(tmp_path / "m.eml"), *CLIENT, "--json")
    assert status == 0
    text = json_of(out)["message"]["text"]
    assert text.startswith("From: a@example.org\r\nSubject: cut\r\nX-Filtered-By: ")
    assert text.endswith("\r\n\r\n<html>\r\n\r\nbody\r\n")
    # A single message saved with its mbox separator line (`send`; `try` reads it as an mbox):
    # the line is no part of the message, as Postfix's sendmail skips it.
    saved = Message.parse(b"From a@example.org Mon Dec  5 10:00:00 2026\n" + raw)
    assert (saved.headers, saved.body) == ([("From", "a@example.org"), ("Subject", "cut")], b"<html>\r\n\r\nbody\r\n")


def test_try_takes_the_headers_and_the_envelope_from_the_message_as_the_mta_does(tmp_path: Path) -> None:
    """A header's name and value reach the filter as the MTA sends them: blanks before the colon
    (RFC 5322's obsolete syntax) are dropped, and one space after it. Without --rcpt the
    recipients are To, Cc and Bcc, else postmaster@localhost; --from is taken without the blanks
    around it."""
    (tmp_path / "m.eml").write_bytes(b"From: alice@example.org\nSubject :  two spaces\nTo: bob@example.com\n"
                                     b"Cc: carol@example.com\nBcc: dave@example.com\n\nbody\n")
    status, out = cli("try", str(BLACKLIST), str(tmp_path / "m.eml"), "--json")
    doc = json_of(out)
    assert status == 0, out
    assert [s["detail"] for s in doc["stages"] if s["stage"] == "header"] == [
        "From: alice@example.org", "Subject:  two spaces", "To: bob@example.com", "Cc: carol@example.com",
        "Bcc: dave@example.com"], out
    assert doc["message"]["recipients"] == ["<bob@example.com>", "<carol@example.com>", "<dave@example.com>"], out
    (tmp_path / "n.eml").write_bytes(b"From: alice@example.org\nSubject: to nobody\n\nbody\n")
    status, out = cli("try", str(BLACKLIST), str(tmp_path / "n.eml"), "--from", " erin@example.org ")
    assert status == 0, out
    assert "envfrom  <erin@example.org> -> continue" in out, out
    assert "envelope: from <erin@example.org> to <postmaster@localhost>\n" in out, out


def _greylist_sql(store: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store) as db:
        return db.execute(sql).fetchall()


def _greylist_entry(store: Path) -> tuple[Any, ...]:
    rows = _greylist_sql(store, "SELECT ip, sender, rcpt, first_seen, last_seen, seen FROM triplets")
    assert len(rows) == 1, rows
    return rows[0]


def test_try_greylist_says_1_second_not_1_seconds(tmp_path: Path) -> None:
    """-delay 1 (or a retry a second before the delay ends) said "try again in 1 seconds"."""
    env = {"GREYLIST_STORE": f"sqlite:{tmp_path / 'greylist.sqlite'}", "GREYLIST_DELAY": "1"}
    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *GREYLIST_STORE, env=env)
    assert status == 2 and '-> tempfail "451 4.7.1 Greylisted, please try again in 1 second"\n' in out, out


def test_try_greylist_tempfails_first_then_accepts_once_the_delay_passed(tmp_path: Path) -> None:
    store = tmp_path / "greylist.sqlite"
    env = {"GREYLIST_STORE": f"sqlite:{store}", "GREYLIST_DELAY": "3600"}
    grey = 'envrcpt  <bob@example.com> -> tempfail "451 4.7.1 Greylisted, please try again in 3600 seconds"'

    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *GREYLIST_STORE, env=env)
    assert grey in out, out
    assert "resulting message" not in out
    ip, sender, rcpt, first, last, seen = _greylist_entry(store)
    assert (ip, sender, rcpt, seen) == ("127.0.0.1", "alice@example.org", "bob@example.com", 1)
    assert abs(first - time.time()) < 60 and last == first

    # a retry that comes too early is refused again
    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *GREYLIST_STORE, env=env)
    assert re.search(r'-> tempfail "451 4.7.1 Greylisted, please try again in 3[56]\d\d seconds"', out), out

    # the delay has passed (the admin's way to let a triplet through: an older first-seen time)
    _greylist_sql(store, "UPDATE triplets SET first_seen = first_seen - 3600")
    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *GREYLIST_STORE, env=env)
    assert status == 0, out
    assert "envrcpt  <bob@example.com> -> continue" in out
    assert "verdict: accept at eom" in out
    assert "Subject: Lunch on Friday?" in resulting_message(out)
    assert _greylist_entry(store)[5] == 3


def test_try_greylist_with_delay_zero_accepts_the_first_retry(tmp_path: Path) -> None:
    env = {"GREYLIST_STORE": f"sqlite:{tmp_path / 'greylist.sqlite'}", "GREYLIST_DELAY": "0"}
    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *GREYLIST_STORE, env=env)
    assert "-> tempfail" in out and "resulting message" not in out, out
    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *GREYLIST_STORE, env=env)
    assert status == 0, out
    assert "verdict: accept at eom" in out


def test_try_greylist_never_greylists_a_client_in_its_whitelist(tmp_path: Path) -> None:
    """The header's promise: addresses in $whitelist (client IPs or glob patterns) are never
    greylisted, and not even recorded."""
    script = tmp_path / "greylist.tcl"
    script.write_text(GREYLIST.read_text().replace("\nset whitelist {}\n", "\nset whitelist {192.0.2.* 10.1.2.3}\n"))
    store = tmp_path / "greylist.sqlite"
    env = {"GREYLIST_STORE": f"sqlite:{store}"}
    for ip, verdict in (("192.0.2.7", "accept at eom"), ("10.1.2.3", "accept at eom"),
                        ("10.1.2.4", 'tempfail at envrcpt "no recipient accepted"')):
        status, out = cli("try", str(script), str(DATA / "plain.eml"), *GREYLIST_STORE, "--client-ip", ip, env=env)
        assert f"verdict: {verdict}" in out, (ip, out)
    assert _greylist_sql(store, "SELECT ip FROM triplets") == [("10.1.2.4",)]


def test_greylist_without_its_store_module_says_how_to_run_it() -> None:
    status, out = cli("check", str(GREYLIST))
    assert status == 1
    assert "run it with --python greylist_store.py" in out, out


def test_try_passes_arguments_after_double_dash_to_the_script(tmp_path: Path) -> None:
    """BUG: `try` sets the script's argv to {} and drops what follows `--`.

    The environment says "delay 3600" and points at another store, the
    arguments say "-store ... -delay 0": the arguments must win, as with `run`.
    """
    store = tmp_path / "args.sqlite"
    env = {"GREYLIST_STORE": f"sqlite:{tmp_path / 'env.sqlite'}", "GREYLIST_DELAY": "3600"}
    args = (*GREYLIST_STORE, "--", "-store", f"sqlite:{store}", "-delay", "0")
    cli("try", str(GREYLIST), str(DATA / "plain.eml"), *args, env=env)
    assert store.exists(), "the -store argument was not seen by the script"
    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *args, env=env)
    assert status == 0, out
    assert "verdict: accept at eom" in out


def test_try_tempfail_of_every_recipient_is_a_tempfail(tmp_path: Path) -> None:
    """BUG: when every recipient got a 4xx, the report says "reject" and exits 1.

    The SMTP client got 451 for each RCPT TO and will try again later: that is
    a temporary failure (exit 2), not a rejection (exit 1).
    """
    env = {"GREYLIST_STORE": f"sqlite:{tmp_path / 'greylist.sqlite'}"}
    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *GREYLIST_STORE, env=env)
    assert "-> tempfail" in out
    assert "verdict: tempfail at envrcpt" in out, out
    assert status == 2
    status, out = cli("try", str(GREYLIST), str(DATA / "plain.eml"), *GREYLIST_STORE, "--json", env=env)
    assert json_of(out)["verdict"] == "tempfail"


def test_try_a_message_whose_recipients_got_4xx_and_5xx_is_a_tempfail(tmp_path: Path) -> None:
    """docs/cli.md: with no recipient left, the verdict is a tempfail if any of them got a 4xx
    (the client will try again), whichever came last; a reject when all got 5xx."""
    script = tmp_path / "refuse.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "proc rc {ctx rcpt} {\n"
                      "    if {[string match *bob* [lindex $rcpt 0]]} { return SMFIS_TEMPFAIL }\n"
                      "    return SMFIS_REJECT\n"
                      "}\nmilter register envrcpt rc\nmilter main\n")
    status, out = cli("try", str(script), str(DATA / "plain.eml"), "--rcpt", "bob@example.com",
                      "--rcpt", "carol@example.com")
    assert (status, 'verdict: tempfail at envrcpt "no recipient accepted"\n' in out) == (2, True), out
    status, out = cli("try", str(script), str(DATA / "plain.eml"), "--rcpt", "carol@example.com",
                      "--rcpt", "dave@example.com")
    assert (status, 'verdict: reject at envrcpt "all recipients rejected"\n' in out) == (1, True), out


def test_try_applies_header_indexes_and_names_as_postfix_does(tmp_path: Path) -> None:
    """The message `try` shows is the one Postfix would deliver (client/apply.py): chgheader
    matches the name in any case and takes index 0 as 1, deleting a header that is not there
    adds nothing, and insheader's index counts the headers before the new one."""
    script = tmp_path / "headers.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "proc eom {ctx} {\n"
                      "    $ctx chgheader subject 0 new\n"
                      "    $ctx chgheader X-Missing {}\n"
                      "    $ctx insheader X-Ins 1 ins\n"
                      "    return SMFIS_CONTINUE\n"
                      "}\nmilter register eom eom\nmilter main\n")
    (tmp_path / "m.eml").write_bytes(b"From: a@example.org\r\nSubject: old\r\nTo: b@example.com\r\n\r\nbody\r\n")
    status, out = cli("try", str(script), str(tmp_path / "m.eml"), "--json")
    assert status == 0, out
    assert json_of(out)["message"]["text"] == (
        "From: a@example.org\r\nX-Ins: ins\r\nSubject: new\r\nTo: b@example.com\r\n\r\nbody\r\n")


def test_try_drops_a_recipient_rejected_at_rcpt_from_the_envelope(tmp_path: Path) -> None:
    """Postfix drops a recipient the filter rejects at RCPT; the report listed it in the envelope
    of the accepted message all the same (text and --json)."""
    script = tmp_path / "no-carol.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "proc rc {ctx rcpt} {\n"
                      "    if {[string match *carol* [lindex $rcpt 0]]} { return SMFIS_REJECT }\n"
                      "    return SMFIS_CONTINUE\n"
                      "}\nmilter register envrcpt rc\nmilter main\n")
    rcpts = ("--rcpt", "bob@example.com", "--rcpt", "carol@example.com", "--rcpt", "dave@example.com")
    status, out = cli("try", str(script), str(DATA / "plain.eml"), *rcpts)
    assert status == 0, out
    assert "recipient carol@example.com rejected: reject" in out, out
    assert "envelope: from <alice@example.org> to <bob@example.com>, <dave@example.com>\n" in out, out
    status, out = cli("try", str(script), str(DATA / "plain.eml"), *rcpts, "--json")
    doc = json_of(out)
    assert doc["message"]["recipients"] == ["<bob@example.com>", "<dave@example.com>"], out
    assert doc["rejected_recipients"] == {"carol@example.com": "reject"}


def test_try_accept_at_rcpt_accepts_the_message_without_sending_the_filter_more(tmp_path: Path) -> None:
    """SMFIS_ACCEPT at RCPT accepts the message as far as the filter goes: no more callbacks
    (the manual), and Postfix sends the filter no more events of it. `try` went on sending the
    rest of the message: the eom callback ran and its header was reported as added, and with a
    header callback the filter (back in HELO, as libmilter) refused the headers as a protocol
    error, reported as "tempfail at eoh: milter failure" (exit 2)."""
    script = tmp_path / "accept-dave.tcl"
    script.write_text("package require TclMilter 1.0\n"
                      "proc rc {ctx rcpt} {\n"
                      "    switch -glob -- [lindex $rcpt 0] { *carol* { return SMFIS_REJECT } *dave* { return SMFIS_ACCEPT } }\n"
                      "    return SMFIS_CONTINUE\n"
                      "}\nproc eom {ctx} { $ctx addheader X-Seen yes; return SMFIS_CONTINUE }\n"
                      "milter register envrcpt rc\nmilter register eom eom\nmilter main\n")
    rcpts = ("--rcpt", "bob@example.com", "--rcpt", "carol@example.com", "--rcpt", "dave@example.com",
             "--rcpt", "erin@example.com")
    status, out = cli("try", str(script), str(DATA / "plain.eml"), *rcpts)
    assert status == 0, out
    assert "verdict: accept at envrcpt\n" in out and "milter failure" not in out, out
    assert "erin" not in out.split("envelope:")[0], out  # not sent to the filter
    assert ("envelope: from <alice@example.org> to <bob@example.com>, <dave@example.com>, <erin@example.com>\n"
            in out), out
    assert "X-Seen" not in out, out
    status, out = cli("try", str(script), str(DATA / "plain.eml"), *rcpts, "--json")
    doc = json_of(out)
    assert (status, doc["verdict"], doc["stage"]) == (0, "accept", "envrcpt"), out
    assert doc["rejected_recipients"] == {"carol@example.com": "reject"}, out


def test_try_prints_8bit_messages_on_a_strict_utf8_terminal() -> None:
    """BUG: with a UTF-8 locale (e.g. LANG=en_US.UTF-8) Python's stdout is strict,
    and the report of a message with 8-bit bytes dies with UnicodeEncodeError.
    PYTHONIOENCODING=utf-8 gives the same strict stdout on any machine.
    """
    env = {"PYTHONIOENCODING": "utf-8"}
    status, out = cli("try", str(BLACKLIST), str(DATA / "latin1.eml"), "--json", env=env)
    assert "Traceback" not in out, out
    assert status == 0
    assert json_of(out)["verdict"] == "accept"


@pytest.mark.parametrize("command", ["try", "send"])
def test_reports_print_on_a_terminal_whose_encoding_lacks_a_character(command: str, tmp_path: Path,
                                                                      serve: Callable[..., TclRun]) -> None:
    """A snowman in a header or a recipient, on a Latin-1 terminal: the report ended in a
    UnicodeEncodeError traceback, as text and as JSON. Text shows it as \\u2603, JSON is ASCII."""
    message = tmp_path / "snow.eml"
    message.write_bytes("From: alice@example.org\nTo: bob@example.com\nSubject: Caf\u00e9\n"
                        "X-Weather: \u2603\n\nsnow\n".encode())
    where = [str(STAMP), str(message)] if command == "try" else [
        "--connection", serve(STAMP, "--connection", "inet:0@127.0.0.1").spec, str(message)]
    latin1 = {"PYTHONIOENCODING": "iso8859-1"}
    status, out = cli(command, *where, "--rcpt", "snow\u2603@example.com", env=latin1)
    assert status == 0, out
    assert "\nX-Weather: \\u2603\n" in out and "to <snow\\u2603@example.com>" in out, out
    status, out = cli(command, *where, "--rcpt", "snow\u2603@example.com", "--json", env=latin1)
    assert status == 0 and out.isascii(), out
    doc = json_of(out)
    assert doc["message"]["recipients"] == ["<snow\u2603@example.com>"]
    assert "X-Weather: \u2603\r\n" in doc["message"]["text"] and "Subject: Caf\u00e9\r\n" in doc["message"]["text"]


def test_try_and_check_a_script_that_ends_with_exit(tmp_path: Path) -> None:
    """BUG: a script ending in `exit` (usual for tclsh scripts) makes try and check print nothing.

    tkinter has no `exit`; pytclmilter's ends the process at once, so `try`
    never prints its report (and its exit status is the script's, not the
    verdict's) and `check` exits 0 without checking anything.
    """
    script = tmp_path / "ends-with-exit.tcl"
    script.write_text(
        "package require TclMilter 1.0\n"
        "proc eom_cb { context } {\n"
        "    $context addheader X-Seen yes\n"
        "    return SMFIS_CONTINUE\n"
        "}\n"
        "milter register eom eom_cb\n"
        "milter main\n"
        "exit 0\n"
    )
    status, out = cli("try", str(script), str(DATA / "plain.eml"))
    assert "verdict: accept at eom" in out, out
    assert "X-Seen: yes" in out
    assert status == 0
    status, out = cli("check", str(script))
    assert "eom       tcl    eom_cb" in out, out
    assert status == 0


def test_try_and_check_a_script_that_exits_before_milter_main(tmp_path: Path) -> None:
    """A script whose top level calls `exit 3` before `milter main`: run ends there with status 3,
    as tclsh. check said "loaded", listed the callbacks and added "the script never calls milter
    main", try "never called milter main": as if the file had been cut short. Now both say where
    it calls exit and what run does then; check exits 1 (errors found), try 70."""
    script = tmp_path / "exits-early.tcl"
    script.write_text("package require TclMilter 1.0\nproc bye {} { exit 3 }\nbye\nmilter main\n")
    said = "the script calls exit 3 before milter main (run ends there, status 3, serving nothing)"
    status, out = cli("run", str(script))
    assert status == 3 and "error" not in out, out
    status, out = cli("try", str(script), str(DATA / "plain.eml"))
    assert (status, out) == (70, f"pytclmilter: {script}: {said}\n"), out
    assert cli("check", str(script)) == (1, f"{script}:3: error: {said}\n")


@pytest.mark.parametrize("text", ["", "package require TclMilter\nproc eom {ctx} {\n    return SMFIS_CONTINUE\n}\n"])
def test_run_of_a_script_that_never_calls_milter_main_says_so_and_fails(tmp_path: Path, text: str) -> None:
    """A script that ends without calling `milter main` (here empty, or cut short before it, as
    a file being rewritten is) served nothing: run exited 0 with nothing after the hot path line,
    a clean stop to a service manager. Now it says why, as check does, and exits 1."""
    script = tmp_path / "cut.tcl"
    script.write_text(text)
    status, out = cli("run", str(script), "--connection", "inet:0@127.0.0.1")
    assert status == 1, out
    assert f"{script}: error: the script never calls milter main (nothing was served)\n" in out, out
    assert "listening on" not in out, out


def test_run_that_crashes_while_starting_says_where(tmp_path: Path) -> None:
    """A crash while starting (here a --python file's C call, as an extension's bug would) ended
    run with not a word after the hot path line: now stderr says which fatal error and where
    (faulthandler), and the status is still the signal's."""
    script = tmp_path / "s.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    hooks = tmp_path / "crashes.py"
    hooks.write_text("import ctypes\n\n\ndef setup(milter):\n    ctypes.string_at(0)\n")
    status, out = cli("run", str(script), "--python", str(hooks), "--connection", "inet:0@127.0.0.1")
    assert status == -signal.SIGSEGV, out
    assert "Fatal Python error: Segmentation fault" in out, out
    assert f'File "{hooks}", line 5 in setup' in out, out


def test_check_names_the_file_and_line_of_an_error_in_a_file_the_script_sources(tmp_path: Path) -> None:
    """The error's own file and line: check named the script's `source` line (the outermost frame
    of errorInfo), which holds no error, though it said it names the innermost."""
    (tmp_path / "lib.tcl").write_text("proc helper {} {}\nset x [expr {1 +}]\n")
    script = tmp_path / "main.tcl"
    script.write_text("package require TclMilter 1.0\nsource [file join [file dirname [info script]] lib.tcl]\n"
                      "milter main\n")
    status, out = cli("check", str(script))
    assert status == 1, out
    assert out.startswith(f"{tmp_path / 'lib.tcl'}:2: error: missing operand"), out


def test_try_help_shows_script_arguments_and_the_envelope_defaults() -> None:
    """`try --help` did not show that the script's arguments go after --, nor what --client-ip,
    --client-name and --helo are and default to."""
    status, out = cli("try", "--help", env={"COLUMNS": "100"})
    assert status == 0, out
    usage = out.split("\n\n")[0]
    assert usage.startswith("usage: pytclmilter try ") and usage.endswith(" script MESSAGE.eml [-- ARGS...]"), out
    help_of = {m.group(1): " ".join(m.group(2).split())
               for m in re.finditer(r"^  (--[\w-]+) [A-Z]+ +(.*(?:\n {20,}.*)*)", out, re.M)}
    assert help_of["--client-ip"] == ("client address in the connect event; IPv6 if it has a colon "
                                      "(default: 127.0.0.1)"), out
    assert help_of["--client-name"] == "client host name in the connect event (default: localhost)", out
    assert help_of["--helo"] == "HELO/EHLO argument (default: localhost)", out
    assert "ARGS: arguments for the script (its argv), after --" in out


@pytest.mark.parametrize("command,default", [("run", "info"), ("try", "warning"), ("check", "warning")])
def test_every_help_says_its_log_level_default_and_send_takes_standard_input(command: str, default: str) -> None:
    """`run --help` and `check --help` printed --log-level bare, whose defaults differ (cli.md's
    tables); `send --help` called MESSAGE "the message file", though `-` reads standard input."""
    status, out = cli(command, "--help", env={"COLUMNS": "100"})
    assert status == 0, out
    level = re.search(r"^  --log-level \{[a-z,]+\}\n((?: {20,}.*\n)+)", out, re.M)
    assert level and " ".join(level.group(1).split()).endswith(f"(default: {default})"), out
    status, out = cli("send", "--help", env={"COLUMNS": "100"})
    assert re.search(r"^  MESSAGE.eml +the message file, or - for standard input$", out, re.M), out


def test_try_usage_errors() -> None:
    status, out = cli("try", str(STAMP), str(DATA / "no-such.eml"))
    assert status == 66 and "no-such.eml: No such file or directory" in out
    status, out = cli("try", str(EXAMPLES / "no-such.tcl"), str(DATA / "plain.eml"))
    assert status == 66 and 'couldn\'t read file' in out
    status, out = cli("try", str(STAMP), str(DATA / "plain.eml"), "--macro", "novalue")
    assert status == 64 and '--macro "novalue": must be NAME=VALUE' in out
    status, out = cli("try", str(STAMP), str(DATA / "plain.eml"), "--client-ip", "999.1.1.1")
    assert status == 64 and '--client-ip "999.1.1.1": not an IPv4 or IPv6 address' in out, out
    status, out = cli("try", str(STAMP), str(DATA / "plain.eml"), "--client-ip", "fe80::1%eth0")
    assert status == 64 and '--client-ip "fe80::1%eth0": a scoped address is not one an MTA sends' in out, out
    status, out = cli("try", str(STAMP), str(DATA / "plain.eml"), "--macro", "{}=x")
    assert status == 64 and '--macro "{}=x": must be NAME=VALUE' in out
    # the MTA sends long names in braces, and getsymval finds nothing else: a name never sent
    status, out = cli("try", str(STAMP), str(DATA / "plain.eml"), "--macro", "auth_authen=alice")
    assert status == 64 and ('--macro "auth_authen=alice": a name longer than one letter is sent in braces, '
                             "as the MTA sends it: --macro '{auth_authen}=alice'") in out, out


SHOWS_MACROS = r"""
package require TclMilter
proc connect {ctx host addr} {
    puts "j=[$ctx getsymval j] {j}=[$ctx getsymval {{j}}] daemon_name=[$ctx getsymval {{daemon_name}}]"
    return SMFIS_CONTINUE
}
milter register connect connect
milter main
"""


@pytest.mark.parametrize("given", ["j=mx.mine", "{j}=mx.mine"])
def test_try_a_macro_given_in_either_form_replaces_the_default(tmp_path: Path, given: str) -> None:
    """`{j}` and `j` are one macro to getsymval (as to smfi_getsymval); `--macro '{j}=x'` was sent
    beside the default `j`, and `getsymval j` still gave the default."""
    script = tmp_path / "shows.tcl"
    script.write_text(SHOWS_MACROS)
    status, out = cli("try", str(script), str(DATA / "plain.eml"), "--macro", given)
    assert status == 0, out
    assert "j=mx.mine {j}=mx.mine daemon_name=pytclmilter" in out, out


@pytest.mark.parametrize("command", ["run", "check", "try"])
def test_a_script_that_cannot_be_read_is_named_with_the_reason_tclsh_gives(command: str, tmp_path: Path) -> None:
    """Every path that was not a regular file was "no such file or directory", a directory too,
    which sends an admin looking for a typo; tclsh says why (and a FIFO would block a reader)."""
    fifo = tmp_path / "filter.fifo"
    os.mkfifo(fifo)
    message = [str(DATA / "plain.eml")] if command == "try" else []
    for path, reason in [(tmp_path / "missing.tcl", "no such file or directory"),
                         (tmp_path, "illegal operation on a directory"),
                         (STAMP / "x.tcl", "not a directory"),
                         (fifo, "not a regular file")]:
        status, out = cli(command, str(path), *message)
        assert status == 66 and f'pytclmilter {command}: couldn\'t read file "{path}": {reason}\n' in out, out


def without_root_privileges(*command: str) -> list[str]:
    """``command`` as root without the capabilities that pass over file permissions (setpriv)."""
    if os.geteuid() != 0:
        return list(command)
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's permission override")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


@pytest.mark.parametrize("command", ["run", "check", "try", "try --compare"])
def test_a_script_without_read_permission_is_missing_input_exit_66(command: str, tmp_path: Path) -> None:
    """cli.md: a script "missing or unreadable" is exit 66; one without read permission passed the
    check and failed in Tcl's `source` instead, a script error: exit 1 (run, check) or 70 (try),
    which for try reads as "the script raised a Tcl error"."""
    script = tmp_path / "filter.tcl"
    script.write_text(STAMP.read_text())
    script.chmod(0)
    args = {"run": [str(script), "--connection", "inet:0@127.0.0.1"], "check": [str(script)],
            "try": [str(script), str(DATA / "plain.eml")],
            "try --compare": [str(STAMP), str(DATA / "plain.eml"), "--compare", str(script)]}[command]
    proc = subprocess.run(without_root_privileges(*PYTCLMILTER, command.split()[0], *args),
                          env=child_env(), capture_output=True, text=True, timeout=30)
    cmd = command.split()[0]
    assert (proc.returncode, proc.stdout) == (66, ""), (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.endswith(f'pytclmilter {cmd}: couldn\'t read file "{script}": permission denied\n'), proc.stderr


@pytest.mark.parametrize("command", ["check", "try"])
def test_ctrl_c_stops_a_script_that_loops_while_loading_as_tclsh_does(command: str, tmp_path: Path) -> None:
    """Python's SIGINT handler runs only once Tcl returns: a script that looped before its
    `milter main` (a typo in a loop's condition) ignored Ctrl-C, and only kill ended it.
    (run: test_run_a_stop_signal_while_the_script_loads_is_logged_and_a_stop)"""
    script = tmp_path / "loop.tcl"
    script.write_text("package require TclMilter\nputs looping\nwhile 1 {}\nmilter main\n")
    extra = ["--connection", "inet:0@127.0.0.1"] if command == "run" else []
    message = [str(DATA / "plain.eml")] if command == "try" else []
    child = pexpect.spawn(PYTCLMILTER[0], [*PYTCLMILTER[1:], command, str(script), *message, *extra],
                          env=child_env(), encoding="utf-8", timeout=10, use_poll=True)
    try:
        child.expect("looping")
        time.sleep(0.3)
        child.sendintr()
        child.expect(pexpect.EOF, timeout=5)
        child.close()
        assert child.signalstatus == signal.SIGINT, (child.exitstatus, child.signalstatus)
    finally:
        if child.isalive():
            child.terminate(force=True)


@pytest.mark.parametrize("command", ["check", "try"])
def test_ctrl_c_while_the_interpreter_is_made_ends_the_process_as_tclsh_does(command: str, tmp_path: Path) -> None:
    """Making the interpreter (`package require TclMilter`) reads every pkgIndex.tcl on auto_path
    (TCLLIBPATH: tcllib's, a site's). A Ctrl-C meanwhile reached Python's handler, whose
    KeyboardInterrupt came out of the next Python command Tcl called: an error that Tcl's
    package scan ignored (the process went on and said "loaded", exit 0), or an empty TclError's
    traceback, exit 1. Now it ends the process, as a Ctrl-C while the script loads does."""
    slow = tmp_path / "lib"
    slow.mkdir()
    (slow / "pkgIndex.tcl").write_text("puts stderr scanned\nflush stderr\ngets stdin\n")  # (waits for EOF)
    script = tmp_path / "ok.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    message = [str(DATA / "plain.eml")] if command == "try" else []
    with subprocess.Popen([*PYTCLMILTER, command, str(script), *message], env=child_env({"TCLLIBPATH": str(slow)}),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None and proc.stderr.readline() == "scanned\n"
            proc.send_signal(signal.SIGINT)  # (while Tcl waits in the gets: stdin is still open)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGINT, (proc.returncode, out, err)
    assert "Traceback" not in err and "loaded" not in out, (out, err)


STOP_WHILE_LOADING = {
    "after": "package require TclMilter\nputs loading\nafter 20000\nmilter main\n",
    "loop": "package require TclMilter\nputs loading\nwhile 1 {}\nmilter main\n",
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("waits", ["after", "loop"])
def test_run_a_stop_signal_while_the_script_loads_is_logged_and_a_stop(
        tmp_path: Path, waits: str, sig: signal.Signals, workers: str) -> None:
    """`systemctl stop` while a script still loads (an `after 5000` or a long loop before its
    `milter main`): Python's handlers run only once Tcl returns, so the signal's default action
    ended the process, with not a word in the log and a status no stop has (143, 130, 129). Now
    one line says what the stop interrupted and the status is a stop's, 0 (docs/cli.md)."""
    script = tmp_path / "slow.tcl"
    script.write_text(STOP_WHILE_LOADING[waits])
    m = TclRun([*PYTCLMILTER, "run", str(script), "--connection", "inet:0@127.0.0.1", "--workers", workers],
               cwd=str(tmp_path))
    try:
        m.wait_for("loading")
        time.sleep(0.3)  # (into the after or the loop)
        assert m.stop(sig) == 0, m.text
        assert re.search(rf"WARNING: stopped by {sig.name} while loading {re.escape(str(script))}\n", m.text), m.text
        assert "listening on" not in m.text, m.text
    finally:
        m.kill()


def test_run_a_stop_signal_after_milter_main_returned_is_logged_and_the_pidfile_removed(tmp_path: Path) -> None:
    """The same once `milter main` returned and the script goes on (a cleanup that takes a while):
    a second SIGTERM ended the process by its default action, and left the pid file behind."""
    script = tmp_path / "slow.tcl"
    script.write_text("package require TclMilter\nmilter main\nputs {after main}\nafter 20000\n")
    pidfile = tmp_path / "m.pid"
    m = TclRun([*PYTCLMILTER, "run", str(script), "--connection", "inet:0@127.0.0.1", "--pidfile", str(pidfile)],
               cwd=str(tmp_path))
    try:
        m.wait_listening()
        m.child.kill(signal.SIGTERM)
        m.wait_for("after main")
        assert pidfile.exists()
        assert m.stop(signal.SIGTERM) == 0, m.text
        assert re.search(rf"WARNING: stopped by SIGTERM while running {re.escape(str(script))} after its milter "
                         r"main\n", m.text), m.text
        assert not pidfile.exists()
    finally:
        m.kill()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (to hold bind() for a while)")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_a_stop_signal_between_the_load_and_serving_is_a_stop(tmp_path: Path, workers: str) -> None:
    """Between the end of the load and the server's handlers (the socket being bound) a stop
    signal had its default action: the process ended with status 143 and not a word in the log.
    strace holds bind() for 3 s, so that the SIGTERM lands there: now it is logged and the milter
    stops as a stop does (exit 0)."""
    script = tmp_path / "ready.tcl"
    script.write_text("package require TclMilter\nputs ready; flush stdout\nmilter main\n")
    m = TclRun(["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=bind", "-e",
                "inject=bind:delay_exit=3000000", *PYTCLMILTER, "run", str(script),
                "--connection", f"unix:{tmp_path / 'milter.sock'}", "--workers", workers], cwd=str(tmp_path))
    try:
        m.wait_for(r"\nready\r*\n")
        time.sleep(0.5)  # (into the bind, 3 s long)
        (milter,) = children_of(m.child.pid)
        os.kill(milter, signal.SIGTERM)
        assert m.wait_exit(timeout=20) == 0, m.text
        assert "INFO: received SIGTERM: stopping" in m.text, m.text
        assert not (tmp_path / "milter.sock").exists()
    finally:
        m.kill()


@pytest.mark.parametrize("command", ["run", "check", "try"])
def test_a_python_file_that_cannot_be_read_is_named_with_the_reason(command: str, tmp_path: Path) -> None:
    """--python said "no such file" of a directory, a FIFO and a path through a file alike."""
    fifo = tmp_path / "hooks.fifo"
    os.mkfifo(fifo)
    message = [str(DATA / "plain.eml")] if command == "try" else []
    for path, reason in [(tmp_path / "missing.py", "no such file or directory"), (tmp_path, "is a directory"),
                         (STAMP / "x.py", "not a directory"), (fifo, "not a regular file")]:
        status, out = cli(command, str(STAMP), *message, "--python", str(path))
        assert status == 66 and f"pytclmilter {command}: --python {path}: {reason}\n" in out, out


@pytest.mark.parametrize(("command", "where"), [("run", "loading"), ("check", "loading"), ("try", "loading"),
                                               ("run", "after main")])  # (check and try stop at main)
def test_a_script_error_ends_its_trace_at_the_script_as_tclsh_does(command: str, where: str, tmp_path: Path) -> None:
    """The errorInfo of an error in the script's own code went on with the frames of how we run
    it (`source` in a coroutine, `interp eval filter`): names an admin finds nowhere in the script."""
    script = tmp_path / "failing.tcl"
    before, after = ("p", "") if where == "loading" else ("", "p")
    script.write_text("package require TclMilter\n"
                      "proc p {} {error \"no such list\"}\n"
                      "milter configure -connection inet:0@127.0.0.1\n"
                      f"{before}\n"
                      "after 200 {milter stop}\n"
                      "milter main\n"
                      f"{after}\n")
    message = [str(DATA / "plain.eml")] if command == "try" else []
    status, out = cli(command, str(script), *message)
    line = 4 if where == "loading" else 7
    quoted = "  "  # (continuation lines indented: run's stderr is its log, check's and try's may be captured)
    assert status in (1, 70) and out.rstrip().endswith(
        f'{quoted}"error "no such list""\n    (procedure "p" line 1)\n    invoked from within\n{quoted}"p"\n'
        f'    (file "{script}" line {line})'), out


def test_run_prints_the_error_that_ends_its_start_with_controls_escaped(tmp_path: Path) -> None:
    """The errorInfo of a script error that ends run is printed as tclsh prints it, but the
    script's text went out raw: an escape sequence reached the terminal (or journal), a CR wrote
    over the line. Now its controls are escaped; the layout stays tclsh's."""
    script = tmp_path / "esc.tcl"
    script.write_text('package require TclMilter\nerror "bad\\x1b\\[2Jname\\rERROR: forged"\nmilter main\n')
    status, out = cli("run", str(script), "--connection", "inet:0@127.0.0.1")
    assert status == 1, out
    assert "\x1b" not in out and "\r" not in out, repr(out)
    assert "bad\\x1b[2Jname\\rERROR: forged\n    while executing\n" in out, out


@pytest.mark.parametrize("command", ["run", "check", "try"])
def test_the_lines_of_a_script_error_that_could_pass_for_log_lines_are_indented(command: str, tmp_path: Path) -> None:
    """A script error at start, its message with a newline, was printed in tclsh's layout: its
    second line `ERROR: forged"` began a line of stderr, which is run's log (the journal shows it
    as a line of its own), and for check and try what CI and cron mail capture. Now each command
    indents every line after the first that does not start with a space, as the log's
    continuation lines (check and try kept tclsh's layout until a fix)."""
    script = tmp_path / "nl.tcl"
    script.write_text('package require TclMilter\nerror "no file x\\nERROR: forged"\nmilter main\n')
    status, out = cli(command, str(script), *([str(DATA / "plain.eml")] if command == "try" else []))
    assert status in (1, 70), out
    assert not re.search(r"^ERROR: forged", out, re.M), out
    info = out[out.index("no file x\n"):].rstrip("\n").split("\n")
    tclsh = ["no file x", "ERROR: forged", "    while executing", '"error "no file x\\nERROR: forged""',
             f'    (file "{script}" line 2)']
    assert info == [tclsh[0]] + [line if line.startswith(" ") else "  " + line for line in tclsh[1:]], info
    if command == "check":  # (its errorInfo below the line that says where: indented from the first line on)
        assert f"{script}:2: error: no file x\\nERROR: forged\n  no file x\n" in out, out


def test_run_indents_a_python_files_traceback(tmp_path: Path) -> None:
    """A --python file's failure was printed by run as Python prints a traceback: its
    exception's message, quoting what the file read, could start a line of run's log."""
    script = tmp_path / "ok.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def setup(milter):\n    raise ValueError('bad\\nERROR: forged')\n")
    status, out = cli("run", str(script), "--python", str(hooks), "--connection", "inet:0@127.0.0.1")
    assert status == 1, out
    assert f"pytclmilter run: --python {hooks}: ValueError: bad\\nERROR: forged\n  Traceback" in out, out
    assert "\n  ValueError: bad\n  ERROR: forged\n" in out, out


def test_run_reports_a_python_files_sys_exit_of_a_value_whose_repr_raises(tmp_path: Path) -> None:
    """setup() calling sys.exit(value) is reported with the value's repr, which raised: the
    report itself failed, and run printed an unexpected error of its own instead."""
    script = tmp_path / "ok.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    hooks = tmp_path / "hooks.py"
    hooks.write_text("import sys\n\nclass Code:\n    def __repr__(self):\n        raise RuntimeError\n\n"
                     "def setup(milter):\n    sys.exit(Code())\n")
    status, out = cli("run", str(script), "--python", str(hooks), "--connection", "inet:0@127.0.0.1")
    assert status == 1, out
    assert (f"pytclmilter run: --python {hooks}: called sys.exit(<object repr() failed>) while loading; "
            "a --python file cannot end pytclmilter") in out, out


@pytest.mark.parametrize("command", ["check", "try"])
def test_check_and_try_print_a_script_error_with_controls_escaped(command: str, tmp_path: Path) -> None:
    """check and try printed a script error's message and errorInfo as they were: an escape
    sequence reached the terminal, a CR wrote over the line. Now as run prints them."""
    script = tmp_path / "esc.tcl"
    script.write_text('package require TclMilter\nerror "bad\\x1b\\[2Jname\\rERROR: forged"\nmilter main\n')
    status, out = cli(command, str(script), *([str(DATA / "plain.eml")] if command == "try" else []))
    assert status in (1, 70), out
    assert "\x1b" not in out and "\r" not in out, repr(out)
    assert "bad\\x1b[2Jname\\rERROR: forged\n    while executing\n" in out, out
    if command == "check":
        assert out.startswith(f"{script}:2: error: bad\\x1b[2Jname\\rERROR: forged\n"), out


@pytest.mark.parametrize(("command", "end"), [("run", "error boom"), ("check", "error boom"), ("check", "exit 3"),
                                             ("try", "error boom"), ("try", "exit 3")])
def test_a_failed_load_prints_what_the_script_wrote_first(command: str, end: str, tmp_path: Path) -> None:
    """A line the script left open (`puts -nonewline`) before failing was written after the
    error and its errorInfo, as if written once run, check or try had reported; and after an
    `exit`, check's or try's line ran on into it. What the script wrote comes first, then what
    is said of it."""
    script = tmp_path / "held.tcl"
    script.write_text(f"package require TclMilter\nputs -nonewline stderr held\n{end}\nmilter main\n")
    status, out = cli(command, str(script), *([str(DATA / "plain.eml")] if command == "try" else []))
    said = {"check": f"{script}:3: error: ", "run": "boom\n",
            "try": "boom\n" if end == "error boom" else f"pytclmilter: {script}: "}[command]
    out = re.sub(r"\A(\d{4}-\d\d-\d\d .*\n)+", "", out) if command == "run" else out  # (after the log's lines)
    assert status in (1, 70) and out.startswith(f"held\n{said}"), out


def test_check_lists_a_callbacks_name_with_controls_escaped(tmp_path: Path) -> None:
    """check listed a callback by its name as the script registered it, and its problem too:
    raw, an ESC in the name reached the terminal."""
    script = tmp_path / "name.tcl"
    script.write_text('package require TclMilter\nmilter register eom "no\\x1b\\[2Jproc"\nmilter main\n')
    status, out = cli("check", str(script))
    assert status == 1 and "\x1b" not in out, repr(out)
    assert "  eom       tcl    no\\x1b[2Jproc\n" in out, out
    assert f'{script}: error: eom callback "no\\x1b[2Jproc": invalid command name "no\\x1b[2Jproc"' in out, out


@pytest.mark.parametrize("command", ["run", "check", "try"])
def test_a_huge_script_error_is_printed_bounded(command: str, tmp_path: Path) -> None:
    """A script failing at its start with a 10 MB message, 300 procedures deep, had its errorInfo
    printed whole (20 MB and 900 lines, the message twice). Now as a log record is bounded: each
    line's two ends, the first 40 and the last 10 lines, each cut saying what it left out."""
    script = tmp_path / "huge.tcl"
    script.write_text("package require TclMilter\n"
                      "proc p {n} { if {$n} { p [expr {$n - 1}] } else { error [string repeat x 10000000] } }\n"
                      "p 300\nmilter main\n")
    args = {"run": ["--connection", "inet:0@127.0.0.1"], "check": [], "try": [str(DATA / "plain.eml")]}[command]
    status, out = cli(command, str(script), *args, timeout=120)
    assert status in (1, 70), out[-2000:]
    assert len(out) < 20_000, len(out)
    assert f"x ... ({10_000_000 - 800} characters left out) ... x" in out, out
    indent = "  "  # (continuation lines, every command)
    assert re.search(rf"\n{indent}\.\.\. \(\d+ lines left out\) \.\.\.\n", out), out
    assert out.rstrip().endswith(f'    (file "{script}" line 3)'), out


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_huge_callback_name_is_printed_bounded(command: str, tmp_path: Path) -> None:
    """A callback registered by a name of a megabyte that names no command: the line saying
    so was printed whole (twice the name, and by check in the callbacks' list too)."""
    script = tmp_path / "name.tcl"
    script.write_text("package require TclMilter\nmilter register eom [string repeat x 1000000]\n"
                      "milter configure -connection inet:0@127.0.0.1\nmilter main\n")
    status, out = cli(command, str(script))
    assert status == 1 and len(out) < 20_000, len(out)
    assert re.search(r"^\S+name.tcl: error: eom callback \"x+ \.\.\. \(\d+ characters left out\) \.\.\. x+\"$",
                     out, re.M), out


def test_a_python_files_failure_is_printed_with_controls_escaped(tmp_path: Path) -> None:
    """The traceback of a --python file's failing setup() (its exception quoting what it read)
    was printed raw below its escaped first line: an ESC reached the terminal."""
    script = tmp_path / "ok.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def setup(milter):\n    raise ValueError('bad\\x1b[2J entry')\n")
    status, out = cli("check", str(script), "--python", str(hooks))
    assert status == 1 and "\x1b" not in out, repr(out)
    assert "\n  ValueError: bad\\x1b[2J entry\n" in out, out  # (indented, as run prints it)


def test_a_usage_error_prints_a_file_name_with_controls_escaped(tmp_path: Path) -> None:
    """A message file's name (as a shell's glob gave it) was printed raw in the usage error."""
    script = tmp_path / "ok.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    status, out = cli("try", str(script), str(tmp_path / "no\x1b[2J.eml"))
    assert status == 66 and "\x1b" not in out, repr(out)
    assert f"pytclmilter try: {tmp_path}/no\\x1b[2J.eml: No such file or directory\n" in out, out


@pytest.mark.parametrize("command", ["check", "try", "send"])
def test_a_usage_error_indents_a_file_names_newline_as_run_does(command: str, tmp_path: Path) -> None:
    """check, try and send printed a usage error with only its controls escaped, a newline in a
    file's name raw: `INFO: forged` began a line of its own on stderr (what CI and cron mail
    capture), where run's, its log, indents it. Now every command prints it as run does."""
    script = tmp_path / "ok.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    missing = str(tmp_path / "no\nINFO: forged")
    args = {"check": [missing], "try": [str(script), missing],
            "send": ["--connection", "inet:1@127.0.0.1", missing]}[command]
    status, out = cli(command, *args)
    assert status == 66, out
    assert not re.search(r"^INFO: forged", out, re.M), out
    assert "\n  INFO: forged" in out, out


@pytest.mark.parametrize("command", ["run", "check"])
def test_without_a_script_usage_names_the_script_alone(command: str) -> None:
    """The script's arguments are optional; the usage error listed them as required too."""
    status, out = cli(command)
    assert status == 64 and out.endswith(f"pytclmilter {command}: error: the following arguments are required: "
                                         "script\n"), out


# ============================================================================ send


def test_send_to_a_running_filter_gives_the_same_report_as_try(serve: Callable[..., TclRun]) -> None:
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
    tried = cli("try", str(STAMP), str(DATA / "plain.eml"), *CLIENT)
    sent = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), *CLIENT)
    assert sent == tried
    assert sent[0] == 0 and STAMP_HEADER in sent[1]
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), *CLIENT, "--json")
    assert status == 0 and json_of(out)["verdict"] == "accept"
    m.wait_for(r"conn#\d+: verdict accept at eom client=mail.example.net\[192.0.2.7\] from=")
    assert m.stop() == 0


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed")
def test_a_conversation_cut_before_its_first_packet_is_a_failed_outcome_on_uvloop(tmp_path: Path) -> None:
    """`try` converses on the milter's loop, uvloop's when installed. A Ctrl-C that stopped the
    milter between the client's connect and the accept reset the connection, and uvloop's
    closed transport raised RuntimeError at the first write: a traceback and exit 1. The
    conversation now fails as on any broken connection (tempfail, "the connection ... was lost")."""
    import uvloop

    from pytclmilter.client.conversation import converse
    from pytclmilter.client.load import connect
    from pytclmilter.client.message import Envelope
    from pytclmilter.connspec import parse

    path = tmp_path / "m.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    async def cut() -> Any:
        reader, writer = await connect(parse(f"unix:{path}"))  # queued, never accepted
        listener.close()  # as the milter's stop closes its socket: the connection is reset
        for _ in range(1000):  # (uvloop closes the transport when it reads the reset)
            if writer.is_closing():
                break
            await asyncio.sleep(0.01)
        assert writer.is_closing()
        return await converse(reader, writer, Envelope("<a@example.org>", ["<b@example.org>"]),
                              Message.parse(b"Subject: x\r\n\r\nhi\r\n"))

    outcome = uvloop.run(cut())
    assert (outcome.verdict, outcome.error) == (
        "tempfail", "the connection to the filter was lost while sending (at option negotiation)"), outcome


def test_run_logs_the_sender_of_a_verdict_when_the_script_has_no_envfrom_callback(
        serve: Callable[..., TclRun]) -> None:
    """BUG: the verdict log line says from=- unless an envfrom callback is registered.

    Without one the MTA is asked not to send MAIL FROM (SMFIP_NOMAIL), but the
    sender still arrives in the {mail_addr} macro (Postfix's milter_mail_macros
    default, and what `send` sends); the README promises the sender in this line.
    """
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), *CLIENT)
    assert status == 0, out
    line = m.wait_for(r"conn#\d+: verdict accept at eom .*").group(0)
    assert "from=<alice@example.org>" in line or "from=alice@example.org" in line, line
    # A bounce: Postfix sends {mail_addr} empty for MAIL FROM:<>, which read as "no sender" (from=-)
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), "--from", "<>", *CLIENT)
    assert status == 0, out
    line = m.wait_for(r"conn#2: verdict accept at eom .*").group(0)
    assert "from=<> " in line, line
    assert m.stop() == 0


def test_send_keeps_8bit_bytes_through_replacebody(serve: Callable[..., TclRun]) -> None:
    m = serve(SIZEPOLICY, "--connection", "inet:0@127.0.0.1", args=("-footer", "Scanned by SizePolicy"))
    status, out = cli("send", "--connection", m.spec, str(DATA / "latin1.eml"))
    assert status == 0, out
    original = (DATA / "latin1.eml").read_bytes().split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
    footer = b"\r\n-- \r\nScanned by SizePolicy\r\n"
    assert f"action: replacebody ({len(original + footer)} bytes)" in out
    body = body_of(resulting_message(out))
    assert body == "Un caf\\xe9 cr\\xe8me, s'il vous pla\\xeet.\n\n-- \nScanned by SizePolicy\n"
    assert m.stop() == 0


def test_send_reads_the_message_from_standard_input_given_as_dash(serve: Callable[..., TclRun]) -> None:
    """Bug: `try` reads `-` as standard input, `send` (whose MESSAGE is "that of try") said `-: No
    such file or directory`, exit 66, to `pytclmilter send -c SPEC - < mail.eml`; and with
    standard input closed `try -` read whatever file had descriptor 0 since."""
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
    piped = subprocess.run([*PYTCLMILTER, "send", "--connection", m.spec, "-", *CLIENT],
                           input=(DATA / "plain.eml").read_bytes(), capture_output=True, timeout=30, env=child_env())
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), *CLIENT)
    assert (piped.returncode, piped.stdout.decode().replace("\r\n", "\n")) == (0, out), piped.stderr
    assert STAMP_HEADER in out
    # Standard input closed at start: descriptor 0 may since be one of pytclmilter's files, whose
    # bytes `try` took for the message (an empty one, accepted, exit 0).
    for command in (["send", "--connection", m.spec], ["try", str(STAMP)]):
        closed = subprocess.run([*PYTCLMILTER, *command, "-"], preexec_fn=lambda: os.close(0),
                                capture_output=True, text=True, timeout=30, env=child_env())
        assert (closed.returncode, closed.stdout) == (66, ""), (command, closed)
        assert closed.stderr == f"pytclmilter {command[0]}: -: standard input is closed\n"
    assert m.stop() == 0


def test_send_rejected_sender_against_a_running_filter(serve: Callable[..., TclRun]) -> None:
    m = serve(BLACKLIST, "--connection", "inet:0@127.0.0.1")
    status, out = cli("send", "--connection", m.spec, str(DATA / "blacklisted.eml"))
    assert status == 1
    assert "verdict: reject at envfrom" in out
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), "--from", "Friend@Public.com")
    assert status == 0, out  # the blacklist compares exactly, as the manual's example does
    assert m.stop() == 0


def test_send_count_and_concurrency_print_a_load_summary(serve: Callable[..., TclRun]) -> None:
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), "--count", "200",
                      "--concurrency", "8")
    assert status == 0, out
    assert re.search(r"^messages: 200 in \d+\.\d\d s = \d+ messages/s$", out, re.M), out
    lat = re.search(r"^latency ms: p50 (\d+\.\d\d)  p90 (\d+\.\d\d)  p99 (\d+\.\d\d)  max (\d+\.\d\d)$", out, re.M)
    assert lat, out
    p50, p90, p99, top = map(float, lat.groups())
    assert 0 < p50 <= p90 <= p99 <= top
    assert re.search(r"^verdicts: accept=200$", out, re.M)
    assert "errors:" not in out
    assert m.stop() == 0
    assert "verdicts: accept=200, callback errors=0" in m.text


def test_send_concurrency_above_the_count_costs_nothing_more(serve: Callable[..., TclRun]) -> None:
    """Bug: --concurrency made that many workers whatever --count: `--count 2 --concurrency
    3000000` held 3 GB and took 60 s to send two messages."""
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), "--count", "2",
                      "--concurrency", "1000000", timeout=15)
    assert status == 0, out
    assert re.search(r"^verdicts: accept=2$", out, re.M), out
    assert m.stop() == 0


def test_send_count_with_json_prints_the_load_summary_as_json(serve: Callable[..., TclRun]) -> None:
    """--json with --count printed the text summary: a script reading it got no JSON."""
    m = serve(STAMP, "--connection", "inet:0@127.0.0.1")
    status, out = cli("send", "--connection", m.spec, str(DATA / "plain.eml"), "--count", "20", "--json")
    assert status == 0, out
    doc = json_of(out)
    assert (doc["messages"], doc["verdicts"], doc["errors"], doc["exit_status"]) == (20, {"accept": 20}, {}, 0), out
    assert doc["seconds"] > 0 and doc["messages_per_second"] > 0
    lat = doc["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat
    assert m.stop() == 0
    port = free_port()
    status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml"), "--count", "3",
                      "--json")
    doc = json_of(out)
    assert (status, doc["exit_status"], doc["verdicts"]) == (1, 1, {"tempfail": 3}), out
    [(error, times)] = doc["errors"].items()
    assert error.startswith(f"cannot connect to inet:{port}@127.0.0.1") and times == 3, out


def test_send_load_summary_percentiles_and_most_frequent_errors() -> None:
    """The summary's figures (client/load.py): percentiles by nearest rank over the latencies, the
    five most frequent errors on the text line, all of them most frequent first in JSON."""
    result = LoadResult(10, 3.0, latencies=[n / 1000 for n in range(10, 0, -1)],
                        verdicts=Counter({"tempfail": 8, "accept": 2}),
                        errors=Counter({f"error {n}": n for n in range(1, 7)}))
    assert result.summary().splitlines() == [
        "messages: 10 in 3.00 s = 3 messages/s",
        "latency ms: p50 5.00  p90 9.00  p99 10.00  max 10.00",
        "verdicts: accept=2, tempfail=8",
        "errors: 6x error 6; 5x error 5; 4x error 4; 3x error 3; 2x error 2",
    ]
    doc = result.as_dict()
    assert doc["latency_ms"] == {"p50": 5.0, "p90": 9.0, "p99": 10.0, "max": 10.0}
    assert list(doc["errors"].items()) == [(f"error {n}", n) for n in range(6, 0, -1)]
    assert list(doc["verdicts"]) == ["accept", "tempfail"]
    assert (doc["messages_per_second"], doc["seconds"]) == (3.3, 3.0)


def test_send_load_summary_errors_cannot_forge_a_line_or_reach_the_terminal() -> None:
    """The summary's error texts were printed as they were, while send's other lines escape what
    they quote: a --connection with a newline and an ESC (or an error quoting a peer's reply
    text) printed an ESC sequence and a line "messages: 999 ..." of its own."""
    forged = "unix:/nonexistent/x\u009b7m\u0085messages: 999 in 0.00 s"  # (C0 controls: refused, below)
    status, out = cli("send", "--connection", forged, str(DATA / "plain.eml"), "--count", "2")
    assert status == 1 and "\u009b" not in out and "\u0085" not in out, out
    lines = [line for line in out.splitlines() if line.startswith(("messages:", "errors:"))]
    assert len(lines) == 2 and lines[0].startswith("messages: 2 in "), out
    assert lines[1].startswith("errors: 2x cannot connect to unix:/nonexistent/x\\u009b7m\\u0085messages: 999 in 0.00 s: "), out
    # A path with a newline or ESC is refused (connspec.py), in a line that quotes it escaped.
    status, out = cli("send", "--connection", "unix:/nonexistent/x\x1b[7m\nmessages: 999 in 0.00 s",
                      str(DATA / "plain.eml"), "--count", "2")
    assert status == 64 and "\x1b" not in out and len(out.strip().splitlines()) == 1, out
    assert 'connection "unix:/nonexistent/x\\x1b[7m\\nmessages: 999 in 0.00 s": socket path with' in out, out
    result = LoadResult(1, 1.0, latencies=[0.001], verdicts=Counter({"tempfail": 1}),
                        errors=Counter({"reply text 'no\x1b[2J'\r\nverdicts: accept=1": 1}))
    assert result.summary().splitlines()[3:] == ["errors: 1x reply text 'no\\x1b[2J'\\r\\nverdicts: accept=1"]


def test_send_to_nothing_is_a_tempfail_with_the_reason() -> None:
    port = free_port()
    status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml"))
    assert status == 2
    assert f"error: cannot connect to inet:{port}@127.0.0.1" in out
    assert "verdict: tempfail" in out
    status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml"), "--json")
    doc = json_of(out)
    assert (status, doc["verdict"], doc["exit_status"]) == (2, "tempfail", 2), out
    assert doc["error"].startswith(f"cannot connect to inet:{port}@127.0.0.1: "), out
    # no stage was reached (the text's "at -") and nothing negotiated: null, not "" and version 0
    assert (doc["stage"], doc["negotiated"], doc["stages"]) == (None, None, []), out


def test_send_usage_errors() -> None:
    status, out = cli("send", str(DATA / "plain.eml"))
    assert status == 64 and "the following arguments are required: --connection" in out
    status, out = cli("send", "--connection", "tcp:25@localhost", str(DATA / "plain.eml"))
    assert status == 64 and 'unknown socket type "tcp"' in out
    status, out = cli("send", "--connection", "inet:25@127.0.0.1", str(DATA / "plain.eml"), "--count", "0")
    assert status == 64 and "--count and --concurrency must be at least 1" in out
    status, out = cli("send", "--connection", "inet:25@127.0.0.1", str(DATA / "plain.eml"), "--count", "2",
                      "--concurrency", "0")
    assert status == 64 and "--count and --concurrency must be at least 1" in out, out
    # (0 timed out every wait at once, and said "cannot connect to ...:" with no reason)
    status, out = cli("send", "--connection", "inet:25@127.0.0.1", str(DATA / "plain.eml"), "--timeout", "0")
    assert status == 64 and "--timeout 0: must be more than 0 seconds" in out, out
    # (it was accepted, and changed nothing: send has no log of its own)
    status, out = cli("send", "--connection", "inet:25@127.0.0.1", str(DATA / "plain.eml"), "--log-level", "debug")
    assert status == 64 and out == ("pytclmilter send: --log-level: send has no log lines to choose from (the "
                                    "milter it talks to logs in its own log; the report shows the conversation): "
                                    "it is an option of run, try and check\n"), out


def test_send_to_a_filter_that_never_answers_says_where_it_waited() -> None:
    """It said only "error: TimeoutError"."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", "--timeout", "0.5", str(DATA / "plain.eml"))
    assert status == 2
    assert "error: no reply from the filter within 0.5 s (waiting at option negotiation)" in out, out


@contextlib.contextmanager
def fake_filter(serve: Callable[[socket.socket], None]) -> Iterator[int]:
    """A filter on a loopback port (yielded) that serves one connection with ``serve``, in a
    thread, until send gives up and closes (OSError)."""
    def accept(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                serve(conn)
            except OSError:
                pass

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        thread = threading.Thread(target=accept, args=(listener,), daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        thread.join(10)


def test_send_gives_a_filter_that_trickles_its_reply_the_timeout_for_the_whole_reply() -> None:
    """Bug: --timeout bounded each read, not each reply: a filter sending its reply a byte at a
    time, each within the timeout, held `send --timeout 1` for as long as it liked (a 17-byte
    reply over 5 s was taken, and a session of such replies took 48 s)."""
    reply = struct.pack(">I", 13) + b"O" + struct.pack(">III", 6, 0, 0)

    def trickle(conn: socket.socket) -> None:
        conn.recv(1024)
        for byte in reply:
            conn.sendall(bytes([byte]))
            time.sleep(0.3)

    with fake_filter(trickle) as port:
        status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", "--timeout", "1", str(DATA / "plain.eml"))
    assert status == 2
    assert "error: no reply from the filter within 1 s (waiting at option negotiation)" in out, out


def test_send_to_a_filter_that_sends_modifications_without_end_stops_at_a_bound() -> None:
    """Bug: `send` kept every action a filter sent at end of message: one that sent addheader
    without end, each at once (no timeout fires), grew send's memory without end (600 MB in 15 s)
    and the conversation never ended. Now past what a message may hold (the milter's own bound,
    100 000 modifications) it fails, tempfail, as a broken filter does."""
    def frame(code: bytes, data: bytes = b"") -> bytes:
        return struct.pack(">I", len(data) + 1) + code + data

    flood = frame(b"h", b"X-Flood\0" + b"v" * 100 + b"\0") * 1000

    def endless(conn: socket.socket) -> None:
        frames = FrameReader(frozenset(bytes([c]) for c in range(256)), 65535)
        while data := conn.recv(65536):
            frames.feed(data)
            while (got := frames.next_frame()) is not None:
                code = got[0]
                if code == b"O":
                    conn.sendall(frame(b"O", struct.pack(">III", 6, 0x1FF, 0)))
                elif code == b"E":
                    while True:
                        conn.sendall(flood)
                elif code not in (b"D", b"A", b"Q"):
                    conn.sendall(frame(b"c"))

    with fake_filter(endless) as port:
        sent = subprocess.run([*PYTCLMILTER, "send", "--connection", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml")],
                              capture_output=True, text=True, timeout=60, env=child_env())  # (100 000 lines: no pty)
    status, out = sent.returncode, sent.stdout
    assert status == 2, out[-2000:]
    assert ("error: the filter sent more than 100000 modifications at end of message, more than a message may "
            "have (a loop in the filter?)") in out, out[-2000:]


def test_send_gives_up_on_a_filter_that_takes_no_more_data_within_the_timeout(tmp_path: Path) -> None:
    """Bug: --timeout bounded the replies only. A filter that asked for no replies to body chunks
    (SMFIP_NR_BODY) and then read nothing more held `send --timeout 1` for ever once the socket's
    buffers were full (a 5 MB body), as a stuck filter behind Postfix is cut by
    milter_command_timeout, which counts the sending too."""
    big = tmp_path / "big.eml"
    big.write_bytes(b"From: a@example.org\nTo: b@example.org\nSubject: big\n\n" + b"x" * 998 + b"\n" * 5000
                    + (b"y" * 998 + b"\n") * 5000)
    done = threading.Event()

    def stops_reading(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            def packet() -> bytes:
                size = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))[0]
                return conn.recv(size, socket.MSG_WAITALL)

            packet()  # option negotiation: no replies to body chunks
            conn.sendall(struct.pack(">I", 13) + b"O" + struct.pack(">III", 6, 0x1FF, 0x80000))
            while (command := packet()[:1]) != b"B":
                if command != b"D":  # (macros have no reply)
                    conn.sendall(struct.pack(">I", 1) + b"c")
            done.wait(30)  # reads nothing more

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=stops_reading, args=(listener,), daemon=True).start()
        port = listener.getsockname()[1]
        started = time.monotonic()
        status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", "--timeout", "1", str(big), timeout=20)
        done.set()
    assert status == 2, out
    assert "error: the filter took no more data within 1 s (sending at body)" in out, out
    assert time.monotonic() - started < 10



#: A filter process: it prints its port, asks for the protocol flags PROTO and answers continue to
#: every command before RCPT (no macros: they need no reply); what it does at RCPT follows.
UP_TO_RCPT = """
import os, socket, struct, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
def packet():
    size = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))[0]
    return conn.recv(size, socket.MSG_WAITALL)
packet()
conn.sendall(struct.pack(">I", 13) + b"O" + struct.pack(">III", 6, 0x1FF, PROTO))
while (command := packet()[:1]) != b"R":
    if command != b"D":
        conn.sendall(b"\\0\\0\\0\\1c")
"""

#: One that asks for no headers and no DATA (so send writes their macros without waiting for a
#: reply, as to any filter without such callbacks), answers up to RCPT, then dies.
DIES_AFTER_RCPT = UP_TO_RCPT.replace("PROTO", "0x220") + """
conn.sendall(b"\\0\\0\\0\\1c")
os._exit(0)
"""


def sent_to(filter_source: str, msg: Path) -> tuple[int, str]:
    """`send` of ``msg`` to a filter process running ``filter_source`` (which prints its port),
    which must end with status 0: send's status and output."""
    with subprocess.Popen([sys.executable, "-c", filter_source], stdout=subprocess.PIPE, text=True) as filt:
        assert filt.stdout is not None
        port = filt.stdout.readline().strip()
        status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", str(msg))
        assert filt.wait(10) == 0
    return status, out


def test_send_to_a_filter_that_dies_while_it_sends_says_the_connection_was_lost(tmp_path: Path) -> None:
    """A filter (or a HAProxy before it) that died while send wrote what needs no reply (a
    message's headers to a filter that asked for none): asyncio dropped each write after the
    first that failed, and from the fifth on printed "WARNING: socket.send() raised exception."
    once per write, unexplained, hundreds of lines before the report. Now one error line says
    the connection was lost, after what, the report shows what was answered, and the exit
    status is 2, as for a filter that closes the connection."""
    msg = tmp_path / "many.eml"
    msg.write_bytes(b"From: a@example.org\nTo: b@example.org\nSubject: x\n"
                    + b"".join(b"X-H%d: v\n" % i for i in range(200)) + b"\nhi\n")
    status, out = sent_to(DIES_AFTER_RCPT, msg)
    assert status == 2, out
    assert "socket.send()" not in out and "WARNING" not in out, out
    assert "envrcpt  <b@example.org> -> continue\n" in out, out
    # Where the filter's end came before send had written the headers, the writes failed (the
    # case of the flood); where it came later, on a loaded machine, the headers had gone into the
    # socket's buffers and the loss is seen waiting for end of headers' reply: one line either way.
    assert re.findall(r"^error: .*", out, re.M) in (
        ["error: the connection to the filter was lost while sending (after envrcpt)"],
        ["error: the connection to the filter was lost while reading its reply (after eoh)"]), out


#: One that, at RCPT, sends the first bytes of a reply and resets the connection (SO_LINGER 0: a
#: close sends an RST), as a filter killed mid-answer can.
RESETS_AT_RCPT = UP_TO_RCPT.replace("PROTO", "0") + """
conn.sendall(b"\\0\\0")
conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
conn.close()
"""


def test_send_to_a_filter_that_resets_mid_answer_says_the_connection_was_lost(tmp_path: Path) -> None:
    """A filter that reset the connection while send waited for its reply: the error was the
    OS's words, `[Errno 104] Connection reset by peer`, where the same loss while sending says
    "the connection to the filter was lost while sending (after STAGE)" (952a0ec). It now says
    so in the same form, after the last event sent."""
    with subprocess.Popen([sys.executable, "-c", RESETS_AT_RCPT], stdout=subprocess.PIPE, text=True) as filt:
        assert filt.stdout is not None
        port = filt.stdout.readline().strip()
        status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml"))
        assert filt.wait(10) == 0
    assert status == 2, out
    assert "envfrom  <" in out and "-> continue\n" in out, out
    assert re.findall(r"^error: .*", out, re.M) == [
        "error: the connection to the filter was lost while reading its reply (after envrcpt)"], out


#: The same, asking no reply to end of headers and body chunks either (SMFIP_NR_EOH, NR_BODY),
#: its receive buffer small: it dies a moment after RCPT, while send still writes a large body,
#: left unread, so its end resets the connection where the other's closed it.
RESETS_WHILE_SENT = (DIES_AFTER_RCPT.replace("0x220", "0xC0220")
                     .replace("listener.listen()", "listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, "
                              "4096)\nlistener.listen()")
                     .replace("os._exit(0)", "import time\ntime.sleep(0.5)\nos._exit(0)"))


def test_send_to_a_filter_that_resets_while_it_sends_says_the_connection_was_lost(tmp_path: Path) -> None:
    """A filter that died while send wrote a body too large for the socket's buffers, its data
    unread (a reset, with its errno): the error was Python's bare "[Errno 104] Connection reset
    by peer", naming no stage, where one that died with the buffers empty was "lost while
    sending (after envrcpt)". Now both are that line, the reset's reason after it."""
    msg = tmp_path / "large.eml"
    msg.write_bytes(b"From: a@example.org\nTo: b@example.org\nSubject: x\n\n" + b"x" * 75 * 100_000 + b"\n")
    status, out = sent_to(RESETS_WHILE_SENT, msg)
    assert status == 2, out
    assert re.findall(r"^error: .*", out, re.M) == [
        "error: the connection to the filter was lost while sending (after body): Connection reset by peer"], out


def test_send_to_an_inet6_spec_without_a_host_connects_to_the_ipv6_loopback() -> None:
    """`inet6:PORT` without a host is the IPv6 loopback, ::1 (as `inet:PORT` is 127.0.0.1)."""
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as silent:  # queues, never answers
        port = silent.getsockname()[1]
        status, out = cli("send", "--connection", f"inet6:{port}", "--timeout", "0.5", str(DATA / "plain.eml"))
    assert status == 2
    assert "error: no reply from the filter within 0.5 s (waiting at option negotiation)" in out, out


def test_send_to_a_filter_whose_listen_queue_is_full_cannot_connect() -> None:
    """A filter that accepts no more connections (its listen queue full, its SYNs dropped): the
    connection attempt ends at --timeout, said in those words (asyncio's TimeoutError has none)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(0)
        port = busy.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]
        try:
            for sock in queued:
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", port))
            status, out = cli("send", "--connection", f"inet:{port}@127.0.0.1", "--timeout", "0.5",
                              str(DATA / "plain.eml"))
        finally:
            for sock in queued:
                sock.close()
    assert status == 2
    assert f"error: cannot connect to inet:{port}@127.0.0.1: no answer within 0.5 s\nverdict: tempfail at -\n" in out, out


def test_send_to_a_unix_socket_whose_listen_queue_is_full_says_so(tmp_path: Path) -> None:
    """A unix socket whose listen queue is full refuses a connection at once (EAGAIN), and Postfix
    says so ("Resource temporarily unavailable"). asyncio took it for a connection under way, and
    `send` reported "tempfail at negotiate" with "[Errno 22] Invalid argument", as if a filter
    had been reached and had broken the protocol."""
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(str(path))
        busy.listen(0)
        queued: list[socket.socket] = []
        try:
            while True:  # until the queue is full
                sock = socket.socket(socket.AF_UNIX)
                queued.append(sock)
                sock.setblocking(False)
                try:
                    sock.connect(str(path))
                except BlockingIOError:
                    break
            status, out = cli("send", "--connection", f"unix:{path}", "--timeout", "5", str(DATA / "plain.eml"))
        finally:
            for sock in queued:
                sock.close()
    assert status == 2
    assert (f"error: cannot connect to unix:{path}: [Errno 11] Resource temporarily unavailable\n"
            "verdict: tempfail at -\n") in out, out


def test_send_count_prints_its_progress_on_stderr_and_the_summary_alone_on_stdout() -> None:
    """Progress is for the person watching; standard output carries the summary alone, so that
    `send --count N --json | jq` reads one document."""
    port = free_port()
    proc = subprocess.run([*PYTCLMILTER, "send", "--connection", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml"),
                           "--count", "3", "--json"], env=child_env(None), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["verdicts"] == {"tempfail": 3}, proc.stdout
    assert re.search(r"3/3 messages, \d+ messages/s\n$", proc.stderr), repr(proc.stderr)


def test_run_names_the_metrics_option_in_its_errors() -> None:
    """A bad --metrics spec was reported as `connection "inet:abc@127.0.0.1": ...`."""
    status, out = cli("run", str(STAMP), "--connection", "inet:0@127.0.0.1", "--metrics", "inet:abc@127.0.0.1")
    assert status == 64 and 'pytclmilter run: --metrics "inet:abc@127.0.0.1": unknown service "abc"' in out, out


@contextlib.contextmanager
def scripted_milter(answers: dict[bytes, list[bytes]]) -> Iterator[str]:
    """A milter that answers each command with the replies ``answers`` gives, each its code and
    its payload (continue otherwise), whatever they are: a filter that misbehaves. Serves one
    connection; its spec."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            buf = b""
            while data := conn.recv(65536):
                frames, buf = parse_frames(buf + data)
                for code, _payload in frames:
                    if code == b"O":  # version 6, the actions offered, no protocol flag
                        conn.sendall(frame(b"O", struct.pack("!III", 6, 0x1FF, 0)))
                    elif code not in (b"D", b"A", b"Q", b"K"):
                        conn.sendall(b"".join(frame(r[:1], r[1:]) for r in answers.get(code, [b"c"])))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"inet:{listener.getsockname()[1]}@127.0.0.1"
    finally:
        listener.close()
        thread.join(10)


def test_send_takes_skip_outside_the_body_as_postfix_does() -> None:
    """Postfix takes SKIP at any event as continue, and sends no more events of that kind until
    another kind comes (milter8.c; docs/protocol.md §8). Before, `send` took a SKIP at RCPT for a
    rejected recipient and reported "reject at envrcpt: all recipients rejected" (exit 1) for a
    message Postfix accepts, and a SKIP at a header ended the message without end of message."""
    with scripted_milter({b"R": [b"s"], b"L": [b"s"]}) as spec:
        status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"), "--json")
    doc = json_of(out)
    assert (status, doc["verdict"], doc["stage"], doc["rejected_recipients"]) == (0, "accept", "eom", {}), out
    stages = [(s["stage"], s["reply"]) for s in doc["stages"]]
    assert stages[3:] == [("envrcpt", "skip"), ("data", "continue"), ("header", "skip"), ("eoh", "continue"),
                          ("body", "continue"), ("eom", "continue")], stages


def test_send_reports_a_reply_that_is_no_action_at_end_of_message_as_a_failure() -> None:
    """At end of message Postfix takes actions, then one final reply; anything else (here
    SMFIR_SHUTDOWN) is a failure, and the message is not accepted. Before, `send` listed it as
    an action and reported "accept at eom" with exit status 0."""
    with scripted_milter({b"E": [b"4", b"c"]}) as spec:
        status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"))
    assert status == 2, out
    assert "verdict: tempfail" in out and "Shutdown sent at eom: neither a final reply nor an action" in out, out


@pytest.mark.parametrize("answer", [b"4", b"h"], ids=["shutdown", "malformed-header"])
def test_send_names_the_stage_a_conversation_broke_at(answer: bytes) -> None:
    """A filter that breaks the conversation while the MTA waits at end of message: the report said
    `eom -> (no reply expected)` and `verdict: tempfail at -`, as if eom had not been waited for."""
    with scripted_milter({b"E": [answer]}) as spec:
        status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"))
    assert status == 2, out
    assert "\neom      -> (no reply: failed)\n" in out, out
    assert re.search(r'^verdict: tempfail at eom "milter failure: ', out, re.M), out
    with scripted_milter({b"E": [answer]}) as spec:
        status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"), "--json")
    doc = json_of(out)
    assert (status, doc["stage"]) == (2, "eom"), out
    # the JSON tells the failed stage from one not answered as the text does: it said reply null alone
    assert [(s["stage"], s["reply"], s["failed"]) for s in doc["stages"]][-2:] == [
        ("body", "continue", False), ("eom", None, True)], out


def test_send_counts_the_progress_packets_of_a_stage() -> None:
    with scripted_milter({b"E": [b"p", b"p", b"c"]}) as spec:
        status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"))
    assert status == 0, out
    assert "\neom      -> continue [2 progress]\n" in out, out
    with scripted_milter({b"E": [b"p", b"c"]}) as spec:
        status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"), "--json")
    assert [s["progress"] for s in json_of(out)["stages"] if s["stage"] == "eom"] == [1], out


def test_send_reports_every_action_with_its_arguments_and_the_envelope_escaped() -> None:
    """An inserted header with its index, ESMTP arguments of a new recipient and sender, and a
    sender with a control character: escaped on the envelope line too."""
    actions = [b"i" + struct.pack("!I", 1) + b"X-Ins\0ins\0", b"2<carol@example.com>\0NOTIFY=NEVER\0",
               b"e<evil\x1b[2J@example.org>\0SIZE=100\0", b"c"]
    with scripted_milter({b"E": actions}) as spec:
        status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"))
    assert status == 0, out
    assert "\x1b" not in out, repr(out)
    assert ("           action: insheader at 1 X-Ins: ins\n"
            "           action: addrcpt <carol@example.com> NOTIFY=NEVER\n"
            "           action: chgfrom <evil\\x1b[2J@example.org> SIZE=100\n") in out, out
    assert "envelope: from <evil\\x1b[2J@example.org> to <bob@example.com>, <carol@example.com>\n" in out, out


def test_send_verdicts_postfix_takes_at_helo_at_rcpt_and_at_end_of_message() -> None:
    """A reject at HELO ends the session there (exit 1); a discard at RCPT discards the message
    (exit 3), not one recipient; a SKIP at end of message is a continue: accepted (exit 0); a
    reply code that is not 4xx or 5xx is a temporary failure (exit 2)."""
    cases = [({b"H": [b"r"]}, 1, "reject at helo"), ({b"R": [b"d"]}, 3, "discard at envrcpt"),
             ({b"E": [b"s"]}, 0, "accept at eom"),
             # a reply code that is neither 4xx nor 5xx (Postfix: "malformed reply") rejects nothing
             ({b"M": [b"y250 2.0.0 fine\0"]}, 2, 'tempfail at envfrom "250 2.0.0 fine"')]
    for answers, expected, verdict in cases:
        with scripted_milter(answers) as spec:
            status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"))
        assert (status, f"\nverdict: {verdict}\n" in out) == (expected, True), out
        assert "recipient" not in out, out
    assert "envfrom" not in out.split("helo", 1)[0], out


def test_send_reports_an_action_before_end_of_message_as_a_failure() -> None:
    """Modifications come at end of message only; one sent earlier is a failure (Postfix: an
    unexpected filter response), not an action."""
    with scripted_milter({b"M": [b"hX-Early\0yes\0", b"c"]}) as spec:
        status, out = cli("send", "--connection", spec, str(DATA / "plain.eml"))
    assert status == 2, out
    assert 'verdict: tempfail at envfrom "milter failure: AddHeader sent at envfrom, outside end of message"' in out, out


def test_send_says_at_which_stage_it_waited_for_a_reply_in_vain() -> None:
    with scripted_milter({b"E": []}) as spec:
        status, out = cli("send", "--connection", spec, "--timeout", "0.5", str(DATA / "plain.eml"))
    assert status == 2, out
    assert "error: no reply from the filter within 0.5 s (waiting at eom)\n" in out, out


#: What a script sees of the session: the macros of a stage it skipped, the queue id at RCPT,
#: the client's address, and the QUIT that ends the session.
SESSION_SEEN = """package require TclMilter 1.0
proc ef {ctx from} { puts "seen: envfrom _=[$ctx getsymval _] daemon=[$ctx getsymval {{daemon_name}}]"; return SMFIS_CONTINUE }
proc rc {ctx rcpt} { puts "seen: envrcpt i=[$ctx getsymval i]"; return SMFIS_CONTINUE }
proc cl {ctx} { puts "seen: close"; return SMFIS_CONTINUE }
milter register envfrom ef
milter register envrcpt rc
milter register close cl
milter main
"""


def test_try_sends_the_macros_and_events_postfix_sends(tmp_path: Path) -> None:
    """The connect macros reach a script that skips CONNECT (both MTAs send a skipped stage's
    macros), `i` comes with RCPT, and the session ends with QUIT; an address with a colon is sent
    as IPv6, with port 25."""
    script = tmp_path / "session.tcl"
    script.write_text(SESSION_SEEN)
    status, out = cli("try", str(script), str(DATA / "plain.eml"), "--client-ip", "2001:db8::7", "--log-level", "debug")
    assert status == 0, out
    seen = [line for line in out.splitlines() if line.startswith("seen: ")]
    assert seen == ["seen: envfrom _=localhost [2001:db8::7] daemon=pytclmilter", "seen: envrcpt i=4TRY0000001",
                    "seen: close"], out
    assert "conn#1: closed (quit)" in out, out  # (its debug line; "closed (eof)" without QUIT)
    (tmp_path / "connect.tcl").write_text(
        "package require TclMilter 1.0\n"
        "proc cn {ctx host addr} { puts \"seen: connect $host {$addr}\"; return SMFIS_CONTINUE }\n"
        "milter register connect cn\nmilter main\n")
    status, out = cli("try", str(tmp_path / "connect.tcl"), str(DATA / "plain.eml"), "--client-ip", "2001:db8::7")
    assert status == 0, out
    assert "seen: connect localhost {family inet6 address 2001:db8::7 port 25}" in out, out


def test_send_shows_the_filters_text_without_controls_that_could_forge_a_line() -> None:
    """What a filter sends (a reply text, a header it adds) reaches the report with its control
    characters escaped, as logs and `try` on an archive write them: it can neither start a line
    of its own (a forged verdict) nor send escape sequences to the terminal. Before, it was
    printed as it came. A folded header value keeps its line breaks."""
    header = b"hX-Note\0hidden\x1b]0;owned\x07\x1b[2J\n\tfolded\0"
    shown_header = r"X-Note: hidden\x1b]0;owned\x07\x1b[2J" + "\n\tfolded"
    reject = b"y550 5.7.1 no\r\nverdict: accept at eom\x1b[8m\0"
    outputs = []
    for final in (reject, b"c"):
        with scripted_milter({b"E": [header, final]}) as spec:
            outputs.append(cli("send", "--connection", spec, str(DATA / "plain.eml")))
    (rejected, out_rejected), (accepted, out_accepted) = outputs
    for out in (out_rejected, out_accepted):
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out), repr(out)
        assert f"action: addheader {shown_header}" in out, out
    assert rejected == 1 and not re.search(r"^verdict: accept", out_rejected, re.M), out_rejected
    assert r'verdict: reject at eom "550 5.7.1 no\r\nverdict: accept at eom\x1b[8m"' in out_rejected
    assert accepted == 0 and "\n" + shown_header + "\n" in resulting_message(out_accepted), out_accepted


# ---------------------------------------------------------------------------- a libmilter filter


@pytest.fixture(scope="module")
def sample_milter_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/data/sample_milter.c built with gcc against Debian's libmilter."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (apt-get install gcc): cannot build the libmilter sample filter")
    if not Path("/usr/include/libmilter/mfapi.h").exists():
        pytest.skip("libmilter headers missing (apt-get install libmilter-dev): cannot build the sample filter")
    exe = tmp_path_factory.mktemp("libmilter") / "sample_milter"
    build = subprocess.run([gcc, "-Wall", "-o", str(exe), str(DATA / "sample_milter.c"), "-lmilter", "-lpthread"],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"gcc failed:\n{build.stderr}"
    return exe


@pytest.fixture
def sample_milter(sample_milter_binary: Path) -> Iterator[str]:
    """The libmilter filter serving on a free port; its connection spec."""
    spec = f"inet:{free_port()}@127.0.0.1"
    child = pexpect.spawn(str(sample_milter_binary), [spec, "spammer@spamdomain.com"], encoding="utf-8", timeout=10,
                          use_poll=True)
    try:
        child.expect(r"sample_milter: listening on \S+")
        yield spec
    finally:
        child.kill(signal.SIGKILL)  # libmilter polls its stop flag only every 5 s
        child.close(force=True)


def test_send_to_a_libmilter_filter_reports_its_header(sample_milter: str) -> None:
    status, out = cli("send", "--connection", sample_milter, str(DATA / "plain.eml"))
    assert status == 0, out
    assert "action: addheader X-Sample-Milter: yes" in out
    assert headers_of(resulting_message(out)).endswith("X-Sample-Milter: yes")
    status, out = cli("send", "--connection", sample_milter, str(DATA / "plain.eml"), "--json")
    doc = json_of(out)
    assert doc["verdict"] == "accept"
    # libmilter without a negotiate callback asks for exactly its flags and skips the stages it lacks
    assert doc["negotiated"]["actions"] == "0x1"
    assert [s["stage"] for s in doc["stages"]] == ["envfrom", "eom"]


def test_send_to_a_libmilter_filter_reports_its_reject(sample_milter: str) -> None:
    status, out = cli("send", "--connection", sample_milter, str(DATA / "blacklisted.eml"))
    assert status == 1
    assert 'envfrom  <spammer@spamdomain.com> -> reject "550 5.7.1 Sender rejected by sample_milter"' in out
    assert 'verdict: reject at envfrom "550 5.7.1 Sender rejected by sample_milter"' in out


# ============================================================================ check


def test_check_reports_a_syntax_error_with_file_and_line(tmp_path: Path) -> None:
    script = tmp_path / "broken.tcl"
    script.write_text(
        "package require TclMilter 1.0\n"
        "\n"
        "proc eom_cb { context } {\n"
        "    if {[$context getsymval i] == \"\"} {\n"
        "        return SMFIS_TEMPFAIL\n"
        "    \n"  # the if's closing brace is missing
        "    return SMFIS_CONTINUE\n"
        "}\n"
        "milter register eom eom_cb\n"
        "milter main\n"
    )
    status, out = cli("check", str(script))
    assert status == 1
    assert f"{script}:3: error: missing close-brace" in out


def test_check_reports_a_command_after_milter_main_that_never_ends(tmp_path: Path) -> None:
    """Tcl reads a file a command at a time: a missing close-brace after `milter main` (the tail
    that deletes the socket, edited) loaded and served, check said "loaded", exit 0, and the script
    failed at the stop, exit 1 (systemd's Restart=on-failure restarted a filter told to stop)."""
    script = tmp_path / "tail.tcl"
    script.write_text(
        "package require TclMilter 1.0\n"
        "proc eom_cb { context } { return SMFIS_CONTINUE }  ;# a {brace} in a comment is no command\n"
        "milter register eom eom_cb\n"
        "milter main\n"
        "if {[regexp {^unix:(.+)$} [milter configure -connection] -> path]} {\n"
        "    file delete $path\n"  # the if's closing brace is missing
    )
    status, out = cli("check", str(script))
    assert status == 1, out
    assert out.endswith(f"{script}:5: error: this command never ends (a missing close-brace, bracket or quote): "
                        "the script fails there when milter main returns, at stop\n"), out
    script.write_text(script.read_text() + "}\n")
    status, out = cli("check", str(script))
    assert status == 0, out


def test_check_reports_a_command_that_never_ends_after_milter_main_in_a_sourced_file(tmp_path: Path) -> None:
    """`milter main` called by a file the script sources (a shared library of the site's): that
    file's rest runs when it returns, and a missing close-brace there failed at the stop, exit 1,
    while check said "loaded", exit 0 (it read the script alone). And a file with CR line ends
    (old Mac), which `source` reads as LF, had its unfinished command put on line 1; a script run
    by a relative name that did `cd` before its `milter main` was not scanned at all."""
    lib = tmp_path / "serve.tcl"
    lib.write_text("milter main\nif {[info exists cleanup]} {\n    eval $cleanup\n")
    script = tmp_path / "main.tcl"
    script.write_text("package require TclMilter 1.0\nproc eom_cb { context } { return SMFIS_CONTINUE }\n"
                      "milter register eom eom_cb\nsource [file join [file dirname [info script]] serve.tcl]\n")
    status, out = cli("check", str(script))
    assert status == 1, out
    assert out.endswith(f"{lib}:2: error: this command never ends (a missing close-brace, bracket or quote): "
                        "the script fails there when milter main returns, at stop\n"), out
    lib.write_text(lib.read_text() + "}\n")
    assert cli("check", str(script))[0] == 0
    script.write_bytes(b"package require TclMilter 1.0\rmilter main\rif {1} {\r    puts done\r")
    status, out = cli("check", str(script))
    assert status == 1, out
    assert f"{script}:3: error: this command never ends" in out, out
    script.write_text("package require TclMilter 1.0\ncd /\nmilter main\nif {1} {\n")  # (by a relative name)
    status, out = cli("check", os.path.relpath(script, ROOT))
    assert status == 1 and ":4: error: this command never ends" in out, out


@pytest.mark.parametrize("tail", ["milter main\nreturn\n\nUsage: {the draft of a text\n",
                                  "milter main; exit 0\nif {1} {\n",
                                  "milter main\n  ::return -code ok ;# the end\nproc x {} {\n",
                                  "return\nmilter main\nif {1} {\n"])
def test_check_reads_no_further_than_a_top_level_return_or_exit(tmp_path: Path, tail: str) -> None:
    """Tcl's `source` stops at a top-level `return` and `exit` ends the process: what follows (a
    script's notes, a draft) is never read, and the script runs and stops well. Check reported its
    first unfinished command as one that "never ends", exit 1 (and so a reload refused it)."""
    script = tmp_path / "ends.tcl"
    script.write_text("package require TclMilter 1.0\nproc eom_cb { context } { return SMFIS_CONTINUE }\n"
                      f"milter register eom eom_cb\n{tail}")
    status, out = cli("check", str(script))
    assert "never ends" not in out, out
    if tail.startswith("return"):  # (before milter main: that, and that alone, is reported)
        assert status == 1 and out.endswith(f"{script}: error: the script never calls milter main\n"), out
    else:
        assert status == 0 and "ends.tcl: loaded" in out, out


@pytest.mark.parametrize("tail", ["if {0} { return }\n", "# return\n", "set x {return}; puts return\n",
                                  "puts \"a;return\"\n"])
def test_check_still_reports_what_never_ends_after_a_return_that_is_not_the_files(tmp_path: Path,
                                                                                    tail: str) -> None:
    """A `return` in a body, a comment or a word does not end the file: what never ends after it
    is still reported."""
    script = tmp_path / "ends.tcl"
    script.write_text(f"package require TclMilter 1.0\nmilter main\n{tail}if {{1}} {{\n")
    status, out = cli("check", str(script))
    assert status == 1 and f"{script}:{3 + tail.count(chr(10))}: error: this command never ends" in out, out


def test_check_reports_a_callback_with_the_wrong_number_of_arguments(tmp_path: Path) -> None:
    script = tmp_path / "arity.tcl"
    script.write_text(
        "package require TclMilter 1.0\n"
        "proc hdr { context name } { return SMFIS_CONTINUE }\n"
        "proc conn { context hostname addrInfo extra } { return SMFIS_CONTINUE }\n"
        "milter register header hdr\n"
        "milter register connect conn\n"
        "milter main\n"
    )
    status, out = cli("check", str(script))
    assert status == 1
    assert ('error: header callback "hdr" does not accept the 3 arguments the event passes '
            "(context name content)") in out
    assert ('error: connect callback "conn" does not accept the 3 arguments the event passes '
            "(context hostname addrInfo)") in out


def test_check_counts_default_arguments_args_and_the_words_a_callback_is_registered_with(tmp_path: Path) -> None:
    """A proc's arguments with defaults are optional, `args` takes any number, and the words
    registered with the proc's name (`milter register envrcpt {rc tag}`) come first."""
    fine = tmp_path / "fine.tcl"
    fine.write_text("package require TclMilter 1.0\n"
                    "proc hdr {ctx name value {extra x}} { return SMFIS_CONTINUE }\n"
                    "proc body {ctx args} { return SMFIS_CONTINUE }\n"
                    "proc rc {tag ctx rcpt} { return SMFIS_CONTINUE }\n"
                    "milter register header hdr\nmilter register body body\nmilter register envrcpt {rc T}\n"
                    "milter register eom {body x y}\nmilter main\n")
    status, out = cli("check", str(fine))
    assert status == 0 and "error" not in out, out
    assert "  envrcpt   tcl    rc T\n" in out, out
    broken = tmp_path / "broken.tcl"
    broken.write_text("package require TclMilter 1.0\n"
                      "proc rc {tag ctx} { return SMFIS_CONTINUE }\n"
                      "proc eom {ctx a {b 1} args} { return SMFIS_CONTINUE }\n"
                      "milter register envrcpt {rc T}\nmilter register eom eom\nmilter main\n")
    status, out = cli("check", str(broken))
    assert status == 1, out
    assert (f'{broken}: error: envrcpt callback "rc T" does not accept the 2 arguments the event passes '
            "(context rcptList)") in out, out
    assert (f'{broken}: error: eom callback "eom" does not accept the 1 argument the event passes (context)'
            in out), out


def _arity_cases() -> list[tuple[str, Any, bool]]:
    """(event, callable, whether it takes what the event passes)."""
    async def eom(ctx, extra):  # one too many
        pass

    def eoh(ctx, *, strict):  # a keyword the engine never passes
        pass

    def hdr(ctx, name):  # no content
        pass

    def with_db(f):  # a decorator that gives the function more than the engine does
        @functools.wraps(f)
        def wrapper(ctx, *args):
            return f(ctx, "db", *args)
        return wrapper

    @with_db
    def envfrom(ctx, db, args):
        pass

    return [
        ("envfrom", lambda ctx: None, False),  # no fromList
        ("header", hdr, False),
        ("eom", eom, False),
        ("eoh", eoh, False),
        ("envrcpt", lambda ctx, args, *more: None, True),
        ("helo", functools.partial(lambda tag, ctx, name: None, "t"), True),
        ("close", type("Closer", (), {"__call__": lambda self, ctx: None})(), True),
        ("body", lambda ctx, block, extra=None: None, True),
        ("connect", max, True),  # no signature to read: it checks its arguments itself
        ("connect", print, True),  # a builtin with a signature: *args
        ("envfrom", envfrom, True),  # checked as called (the wrapper), not as what it wraps
    ]


@pytest.mark.parametrize("event, func, fits", _arity_cases())
def test_a_python_callback_that_cannot_take_its_events_arguments_is_refused_at_register(event, func, fits):
    """It was registered, passed check, and failed with a TypeError at every message (tempfailed
    by -onerror). Refused at once, as a callable that is not callable is."""
    from pytclmilter import Milter

    m = Milter("arity")
    if fits:
        m.register(event, func)
        assert len(m.registry.chain(event)) == 1
        return
    with pytest.raises(TypeError, match=rf'^register {event}: ".+" does not accept the \d arguments? the event '
                                        r"passes \(context"):
        m.register(event, func)
    assert not m.registry.chain(event)


def test_check_reports_a_python_callback_that_cannot_take_its_events_arguments(tmp_path: Path) -> None:
    script = tmp_path / "hooked.tcl"
    script.write_text("package require TclMilter 1.0\nmilter main\n")
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def setup(milter):\n    milter.register('header', lambda ctx, name: None)\n")
    status, out = cli("check", str(script), "--python", str(hooks))
    assert status == 1
    assert ('TypeError: register header: "setup.<locals>.<lambda>" does not accept the 3 arguments the event '
            "passes (context name content)") in out, out


def test_check_reports_a_missing_proc_and_a_missing_milter_main(tmp_path: Path) -> None:
    script = tmp_path / "incomplete.tcl"
    script.write_text("package require TclMilter 1.0\nmilter register eom no_such_proc\n")
    status, out = cli("check", str(script))
    assert status == 1
    assert 'error: eom callback "no_such_proc": invalid command name "no_such_proc"' in out
    assert "error: the script never calls milter main" in out


@pytest.mark.parametrize(
    "script, callbacks, skipped",
    [
        (BLACKLIST, ["envfrom   tcl    bl_envfrom", "header    tcl    bl_header"],
         "noconnect, nohelo, norcpt, nobody, noeoh, nounknown, nodata"),
        (STAMP, ["connect   tcl    stamp_connect", "eom       tcl    stamp_eom"],
         "nohelo, nomail, norcpt, nobody, nohdrs, noeoh, nounknown, nodata"),
        (SIZEPOLICY, ["envfrom   tcl    sp_envfrom", "header    tcl    sp_header", "body      tcl    sp_body",
                      "eom       tcl    sp_eom", "abort     tcl    sp_abort"],
         "noconnect, nohelo, norcpt, noeoh, nounknown, nodata"),
        (RCPTREWRITE, ["envfrom   tcl    rw_envfrom", "envrcpt   tcl    rw_envrcpt", "eom       tcl    rw_eom",
                       "abort     tcl    rw_abort"],
         "noconnect, nohelo, nobody, nohdrs, noeoh, nounknown, nodata"),
        (GREYLIST, ["connect   tcl    gl_connect", "envfrom   tcl    gl_envfrom", "envrcpt   tcl    gl_envrcpt"],
         "nohelo, nobody, nohdrs, noeoh, nounknown, nodata"),
    ],
    ids=lambda v: v.stem if isinstance(v, Path) else None,
)
def test_check_reports_callbacks_and_negotiation_of_every_example(script: Path, callbacks: list[str],
                                                                  skipped: str, tmp_path: Path) -> None:
    # greylist's store: away from /var/lib (and opened by no check: it opens at the first message)
    hooks = GREYLIST_STORE if script == GREYLIST else ()
    status, out = cli("check", str(script), *hooks, env={"GREYLIST_STORE": f"sqlite:{tmp_path / 'g.db'}"})
    assert status == 0, out
    assert f"{script}: loaded" in out
    listed = re.findall(r"^  (\w+ +tcl +\w+)$", out, re.M)
    assert listed == callbacks
    assert "negotiation (to an MTA offering everything):" in out
    assert re.search(r"^  version 6, actions 0xff, protocol 0x[0-9a-f]+$", out, re.M)
    assert f"skipped stages: {skipped}" in out
    assert "actions: ADDHDRS, CHGBODY, ADDRCPT, DELRCPT, CHGHDRS, QUARANTINE, CHGFROM, ADDRCPT_PAR" in out
    assert "error" not in out
    assert not (tmp_path / "g.db").exists()  # check serves nothing and changes nothing


def test_try_loads_a_hooks_file_that_defines_a_dataclass(tmp_path: Path) -> None:
    """A --python file is a module like any other: @dataclass (which looks its module up in
    sys.modules) works in it, also with postponed annotations."""
    hooks = tmp_path / "hooks.py"
    hooks.write_text("from __future__ import annotations\n"
                     "from dataclasses import dataclass\n\n\n"
                     "@dataclass\nclass Seen:\n    sender: str\n\n\n"
                     "def setup(milter):\n"
                     "    @milter.register('envfrom')\n"
                     "    def envfrom(ctx, args):\n"
                     "        ctx.setpriv('seen', Seen(args[0]))\n")
    status, out = cli("try", "--python", str(hooks), EXAMPLES / "blacklist.tcl", DATA / "plain.eml")
    assert status == 0, out
    assert "verdict: accept" in out, out


def test_check_and_run_find_a_callback_proc_kept_in_an_autoloaded_library(tmp_path: Path) -> None:
    """Tcl libraries of TclMilter's day were often kept as a tclIndex on auto_path: the proc exists
    once its first call loads it. check, and run at `milter main`, must not call it missing
    (run refuses to serve a missing callback)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    # (its loading would hold a reload: check reads the index, it does not load the library)
    (lib / "mylib.tcl").write_text("proc lib_from {ctx args} { return SMFIS_CONTINUE }\nafter 8000\n")
    (lib / "tclIndex").write_text("# Tcl autoload index file, version 2.0\n"  # as auto_mkindex writes it
                                  "set auto_index(lib_from) [list source [file join $dir mylib.tcl]]\n")
    script = tmp_path / "autoloaded.tcl"
    script.write_text("package require TclMilter\nlappend auto_path [file join [file dirname [info script]] lib]\n"
                      "milter register envfrom lib_from\nmilter main\n")
    started = time.monotonic()
    status, out = cli("check", str(script))
    assert status == 0, out
    assert "envfrom   tcl    lib_from" in out
    assert time.monotonic() - started < 6  # the library was not loaded


def test_check_and_run_take_a_callback_the_scripts_own_unknown_serves(tmp_path: Path) -> None:
    """A script may serve commands through its own `unknown` (a dispatcher): the command does not
    exist until called. run refused such a script at start as missing its callback."""
    script = tmp_path / "dispatch.tcl"
    script.write_text("package require TclMilter\n"
                      "rename unknown _tcl_unknown\n"
                      "proc unknown {cmd args} {\n"
                      "    if {[string match cb_* $cmd]} { return SMFIS_CONTINUE }\n"
                      "    uplevel 1 [list _tcl_unknown $cmd {*}$args]\n"
                      "}\n"
                      "milter register envfrom cb_from\nmilter main\n")
    status, out = cli("check", str(script))
    assert status == 0, out
    assert "envfrom   tcl    cb_from" in out


#: A timer failing over and over while the script loads, then the script's end: a Tcl error, or `exit`.
FAILING_WHILE_LOADING = r"""
package require TclMilter
proc tick {} { after 1 tick; error "boom [incr ::n]" }
after 1 tick
after 300 {set done 1}
vwait done
END
"""


@pytest.mark.parametrize(("command", "end", "status"), [
    ("try", 'error "load failed"', 70),
    ("check", 'error "load failed"', 1),
    ("run", "exit 3", 3),
])
def test_a_count_of_failures_not_logged_one_by_one_is_told_when_the_command_ends(
        tmp_path: Path, command: str, end: str, status: int) -> None:
    """A timer failing once a millisecond is logged once with its trace, the rest counted and told
    once a minute or when `milter main` stops. A script that ended before it served (a Tcl error,
    `exit`) never told the count: ``try``, ``check`` and ``run`` ended with the first line only."""
    script = tmp_path / "failing.tcl"
    script.write_text(FAILING_WHILE_LOADING.replace("END", end))
    args = [str(DATA / "plain.eml")] if command == "try" else []
    got, out = cli(command, str(script), *args)
    assert got == status, out
    assert out.count("ERROR: error in an event handler of the script (after, fileevent): boom ") == 2, out
    told = re.search(r"ERROR: error in an event handler of the script \(after, fileevent\): boom (\d+) \(repeated "
                     r"(\d+) times since its last line with the trace; logged once a minute\)\n", out)
    assert told and int(told.group(2)) == int(told.group(1)) - 1 > 10, out


#: 300 failures carrying data: a timer rescheduled with the number in its script, and a thread
#: sending `error` with an address and a long text in its message.
ERRORS_WITH_DATA = r"""
package require TclMilter
package require Thread
set main [thread::id]
thread::create [list apply {{main} {
    for {set i 0} {$i < 300} {incr i} {
        thread::send -async $main [list error "no such user <u$i@example.org>\n[string repeat x 200]"]
    }
    thread::send -async $main {set ::sent 1}
}} $main]
vwait ::sent
proc tick {} {
    if {[incr ::n] > 300} { set ::done 1; return }
    after 0 [list expr "$::n/0"]
    after 0 tick
}
after 0 tick
vwait ::done
update
exit 0
"""


def test_errors_no_caller_gets_are_bounded_whatever_data_they_carry(tmp_path: Path) -> None:
    """Each failure was a place of its own, logged whole with its trace: the errorInfo's command
    quotes the data (`after 0 [list expr $n/0]`; an `error` given a long message, which the
    frame cuts at 150 characters): 300 of each. Now the timer's are one place, one line and a
    count; the thread's, whose messages differ, ten lines a minute and a count."""
    script = tmp_path / "data.tcl"
    script.write_text(ERRORS_WITH_DATA)
    got, out = cli("run", str(script))
    assert got == 0, out
    timer = "ERROR: error in an event handler of the script (after, fileevent): divide by zero"
    assert out.count(timer) == 2, out
    assert f"{timer} (repeated 299 times since its last line with the trace; logged once a minute)\n" in out, out
    thread = re.compile(r"ERROR: error in thread tid0x[0-9a-f]+ \(thread::send -async, or the thread's own script\): "
                        r"no such user <u(\d+)@example.org>\\nx{200}(.*)\n")
    lines = thread.findall(out)
    assert lines == [(str(i), "") for i in range(10)], out
    # The count's line quotes the last error clipped, as it keeps it (a3fdfcb: bounded by size).
    told = re.findall(r"ERROR: error in thread tid0x[0-9a-f]+ \(thread::send -async, or the thread's own script\): "
                      r"no such user <u299@example.org>\\nx+\.\.\. \(the last of 290 errors not logged: at most 10 a "
                      r"minute are logged with their trace\)\n", out)
    assert len(told) == 1 and len(told[0]) < 400, out


ELEVEN_PLACES = r"""
for {set i 1} {$i <= 11} {incr i} { proc p$i {} { error boom }; after 0 p$i }
after 0 p11
after 0 p11
after 0 p11
after 10 {set ::done 1}
vwait ::done
exit 0
"""


def test_an_error_never_logged_with_its_trace_is_not_told_as_repeated_since_it(tmp_path: Path) -> None:
    """Eleven timers fail at eleven places within the minute; the eleventh, over the ten logged
    with their trace, fails three more times. Its first failure was not logged (the cap), yet
    its place counted it as logged: the end said it was "repeated 3 times since its last line
    with the trace", a line that never came, and "the last of 1 errors not logged" for four.
    Now its failures are all the cap's count: four not logged, told in one line."""
    script = tmp_path / "eleven.tcl"
    script.write_text(ELEVEN_PLACES)
    got, out = cli("run", str(script))
    assert got == 0, out
    assert out.count('(procedure "p') == 10, out  # ten traces, p1 to p10
    assert "since its last line with the trace" not in out, out
    assert out.endswith("ERROR: error in an event handler of the script (after, fileevent): boom (the last of 4 errors "
                        "not logged: at most 10 a minute are logged with their trace)\n"), out


BREAKING_HANDLERS = r"""
package require TclMilter
after 0 break
after 0 {return -code 7}
update
proc bgerror {message} { puts stderr "bgerror <$message> <[lindex [split $::errorInfo \n] 0]>" }
after 0 continue
update
milter main
"""


def test_an_event_handlers_break_is_named_as_tcl_names_it(tmp_path: Path) -> None:
    """An `after` handler's break, continue or `return -code 7`: the log, and a bgerror proc,
    get Tcl's `invoked "break" outside of a loop` (tclsh's words) where they got an empty
    message ("event handler of the script (after, fileevent): ", a bgerror proc's `<>`)."""
    script = tmp_path / "breaking.tcl"
    script.write_text(BREAKING_HANDLERS)
    got, out = cli("check", str(script))
    assert got == 0, out
    prefix = "ERROR: error in an event handler of the script (after, fileevent): "
    assert f'{prefix}invoked "break" outside of a loop\n' in out, out
    assert f"{prefix}command returned bad code: 2\n" in out, out
    assert 'bgerror <invoked "continue" outside of a loop> <invoked "continue" outside of a loop>' in out, out


BREAKING_BGERROR = r"""
package require TclMilter
proc bgerror {message} { puts stderr "bgerror <$message>"; return -code break }
after 0 {error one}
after 0 {error two}
update
puts stderr "updated"
milter main
"""


def test_a_bgerror_procs_break_drops_the_errors_queued_after_as_tcls(tmp_path: Path) -> None:
    """A script's `bgerror` proc that breaks: Tcl drops the background errors queued after the
    one it handled (tclsh prints `bgerror <one>` alone), and so does the milter (prelude.py's
    bghandle answers 1, its interpreter's handler breaks); nothing goes to the log either."""
    script = tmp_path / "breaking.tcl"
    script.write_text(BREAKING_BGERROR)
    got, out = cli("check", str(script))
    assert got == 0, out
    assert "bgerror <one>\nupdated\n" in out, out
    assert "two" not in out and "ERROR" not in out, out
