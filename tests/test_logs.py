"""The log handler of the subcommands: lines of one event-loop iteration in one write, none lost."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tkinter
from collections.abc import Callable
from pathlib import Path

import pytest

from pytclmilter import logline, repeats
from pytclmilter.commands.logs import STDERR_FORMAT, CoalescingStreamHandler, LeanLogRecord, LineFormatter
from pytclmilter.tcl import tclstderr
from support.postfix import free_port
from support.tclrun import ROOT_WARNING, Mta, _pytclmilter_command, child_env, tclrun_factory

PYTCLMILTER = _pytclmilter_command()
DATA = Path(__file__).parent / "data"

tclrun = pytest.fixture(tclrun_factory, name="tclrun")


class Stream(io.StringIO):
    """stderr as the handler sees it, remembering each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def make_logger(name: str) -> tuple[logging.Logger, Stream, CoalescingStreamHandler]:
    stream = Stream()
    handler = CoalescingStreamHandler(stream)
    handler.setFormatter(LineFormatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger(f"test-logs.{name}")
    logger.handlers[:] = [handler]
    logger.filters[:] = []
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream, handler


def test_lines_of_one_loop_iteration_go_out_in_one_write_after_it() -> None:
    log, stream, _ = make_logger("batch")

    async def main() -> list[str]:
        log.info("verdict accept 1")
        log.info("verdict accept 2")
        seen_inside = list(stream.writes)
        await asyncio.sleep(0)  # the loop's next iteration: the flush has run
        return seen_inside

    inside = asyncio.run(main())
    assert inside == []
    assert stream.writes == ["INFO: verdict accept 1\nINFO: verdict accept 2\n"]


def test_a_warning_goes_out_at_once_after_the_lines_before_it() -> None:
    log, stream, _ = make_logger("warning")

    async def main() -> None:
        log.info("first")
        log.warning("trouble")
        assert stream.getvalue() == "INFO: first\nWARNING: trouble\n"
        log.info("after")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert stream.getvalue() == "INFO: first\nWARNING: trouble\nINFO: after\n"


def test_outside_a_running_loop_every_line_goes_out_at_once() -> None:
    log, stream, _ = make_logger("plain")
    log.info("starting")
    assert stream.writes == ["INFO: starting\n"]
    thread = threading.Thread(target=lambda: log.debug("from a thread"))
    thread.start()
    thread.join()
    assert stream.writes == ["INFO: starting\n", "DEBUG: from a thread\n"]


def test_lines_left_by_a_loop_that_stopped_are_written_by_the_next_loop_and_by_flush() -> None:
    log, stream, handler = make_logger("stopped")
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0))
        log_in_loop = loop.run_until_complete(_log_and_stop(log, loop))
    finally:
        loop.close()
    assert log_in_loop and stream.getvalue() == ""  # the loop stopped before its flush ran

    async def later() -> None:
        log.info("next loop")
        await asyncio.sleep(0)

    asyncio.run(later())  # a new loop schedules its own flush: nothing stays behind
    assert stream.getvalue() == "INFO: left behind\nINFO: next loop\n"
    log.info("outside")
    handler.flush()
    assert stream.getvalue().endswith("INFO: outside\n")


async def _log_and_stop(log: logging.Logger, loop: asyncio.AbstractEventLoop) -> bool:
    log.info("left behind")
    loop.stop()  # run_until_complete returns before the scheduled flush
    return True


def test_the_stderr_line_is_what_the_standard_formatter_writes() -> None:
    """LineFormatter writes the `run` format out by hand (cheaper per line); the text must be the
    standard Formatter's, character for character, and tracebacks still follow the line."""
    ours, standard = LineFormatter(STDERR_FORMAT), logging.Formatter(STDERR_FORMAT)
    standard.formatTime = ours.formatTime  # the same clock text
    record = logging.LogRecord("pytclmilter", logging.INFO, "", 0, "%s: verdict %s at %s", ("conn#7", "reject", "rcpt"), None)
    record.process = 4242
    assert ours.format(record) == standard.format(record)
    assert ours.format(record).endswith(" pytclmilter[4242] INFO: conn#7: verdict reject at rcpt")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("pytclmilter", logging.ERROR, "", 0, "callback failed", (), sys.exc_info())
    failed.process = 4242
    text = ours.format(failed)
    # (continuation lines are indented: logline.guard)
    assert text.startswith(standard.formatTime(failed)) and "ERROR: callback failed\n  Traceback" in text
    assert text.rstrip().endswith("ValueError: boom")


def test_the_lean_record_is_the_standard_record_made_faster() -> None:
    """setup_logging's record factory: the same attributes and values as logging.LogRecord (the
    clock aside), and the standard record itself where a caller or a mapping argument is given."""
    from pytclmilter.commands.logs import setup_logging

    root = logging.getLogger()
    kept = list(root.handlers), root.level  # (left at INFO, later tests' caplog saw INFO records)
    setup_logging("info")
    assert logging.getLogRecordFactory() is LeanLogRecord
    try:
        args = ("conn#3", "accept", "eom")
        func = "(unknown function)"  # what Logger._log names with logging._srcfile None
        lean = logging.getLogger("pytclmilter").makeRecord("pytclmilter", logging.INFO, "(unknown file)", 0,
                                                           "%s: verdict %s at %s", args, None, func)
        standard = logging.LogRecord("pytclmilter", logging.INFO, "(unknown file)", 0, "%s: verdict %s at %s",
                                     args, None, func)
        ours, theirs = vars(lean), vars(standard)
        clock = {"created", "msecs", "relativeCreated"}
        assert set(theirs) <= set(ours) <= set(theirs) | {"taskName"}
        assert {k: v for k, v in ours.items() if k in theirs and k not in clock} == \
               {k: v for k, v in theirs.items() if k not in clock}
        assert abs(lean.relativeCreated - standard.relativeCreated) < 1000  # ms since logging started
        assert lean.getMessage() == "conn#3: verdict accept at eom"
        mapped = LeanLogRecord("x", logging.INFO, "(unknown file)", 0, "%(a)s", ({"a": 1},), None)
        assert mapped.getMessage() == "1" and mapped.args == {"a": 1}
        located = LeanLogRecord("x", logging.INFO, "/srv/filter.py", 7, "m", (), None)
        assert (located.filename, located.module, located.lineno) == ("filter.py", "filter", 7)
    finally:
        logging.setLogRecordFactory(logging.LogRecord)
        logline.set_sink(None)
        root.handlers[:], level = kept
        root.setLevel(level)


def test_a_handler_filter_still_decides() -> None:
    """The handler skips filter() only when it has no filters: one that drops lines still does."""
    log, stream, handler = make_logger("filtered")
    handler.addFilter(lambda record: "secret" not in record.getMessage())
    log.info("public")
    log.info("a secret")
    assert stream.getvalue() == "INFO: public\n"


@pytest.fixture
def run_logging(monkeypatch):
    """A logger set up as `pytclmilter run` sets up the root logger (stderr line, lean records,
    the handler as logline's sink), on a fixed clock; undone afterwards."""
    monkeypatch.setattr(time, "time", lambda: 1764676800.25)
    log, stream, handler = make_logger("direct")
    handler.setFormatter(LineFormatter(STDERR_FORMAT))
    logging.setLogRecordFactory(LeanLogRecord)
    logline.set_sink(handler)
    emitted: list[logging.LogRecord] = []
    emit = handler.emit
    handler.emit = lambda record: (emitted.append(record), emit(record))[-1]
    yield log, stream, handler, emitted
    logline.set_sink(None)
    logging.setLogRecordFactory(logging.LogRecord)


def test_a_line_handed_straight_to_the_handler_is_the_line_logging_writes(run_logging) -> None:
    """logline.info makes no record when the handler is the line's only way out: the text is
    what the same call through logging writes, and it waits for the flush like any line."""
    log, stream, handler, emitted = run_logging
    log.handlers[:] = [handler]  # (pytest adds handlers of its own for each test phase)
    assert handler.takes(log, logging.INFO)
    logline.info(log, "%s: verdict %s at %s", "conn#1", "accept", "eom")
    assert not emitted  # no record was made or emitted
    handler.addFilter(lambda record: True)  # now logging's own path
    logline.info(log, "%s: verdict %s at %s", "conn#1", "accept", "eom")
    assert len(emitted) == 1
    direct, through_logging = stream.getvalue().splitlines()
    assert direct == through_logging
    assert direct.endswith(f",250 pytclmilter[{os.getpid()}] INFO: conn#1: verdict accept at eom")

    async def in_loop() -> list[str]:
        handler.filters.clear()
        logline.info(log, "waits")
        seen = list(stream.writes)
        await asyncio.sleep(0)
        return seen

    before = list(stream.writes)
    assert asyncio.run(in_loop()) == before and stream.getvalue().endswith(" INFO: waits\n")
    logline.info(log, "%s: %d", "not a number", "x")  # a bad format: logging's own report, no exception
    assert len(emitted) == 2


def _second_handler(log: logging.Logger) -> None:
    log.addHandler(logging.StreamHandler(io.StringIO()))


def _parent_handler(log: logging.Logger) -> None:
    log.propagate = True
    assert log.parent is not None
    log.parent.addHandler(logging.StreamHandler(io.StringIO()))


@pytest.mark.parametrize("change", [
    _second_handler,
    _parent_handler,
    lambda log: log.addFilter(lambda record: True),
    lambda log: log.setLevel(logging.WARNING),
    lambda log: log.handlers[0].setLevel(logging.WARNING),
    lambda log: log.handlers[0].setFormatter(LineFormatter("%(levelname)s %(message)s")),
    lambda log: logging.setLogRecordFactory(logging.LogRecord),
], ids=["second handler", "handler up the hierarchy", "logger filter", "logger level", "handler level",
        "other format", "other record factory"])
def test_a_line_goes_through_logging_when_anything_else_could_see_it(
        run_logging, change: Callable[[logging.Logger], None]) -> None:
    log, _, handler, emitted = run_logging
    log.handlers[:] = [handler]
    assert handler.takes(log, logging.INFO)
    parent = log.parent
    kept = list(parent.handlers) if parent is not None else []
    try:
        change(log)
        assert not handler.takes(log, logging.INFO)
        logline.info(log, "routed")
        assert len(emitted) == (1 if log.isEnabledFor(logging.INFO) and handler.level <= logging.INFO else 0)
    finally:
        if parent is not None:
            parent.handlers[:] = kept


# ---------------------------------------------------------------- text from the MTA and the script

#: A whole forged verdict line, as a client host name, sender or header value could carry it
#: (CR and LF), followed by a terminal escape sequence, BEL, DEL and SOH.
FORGED = "\r\n2001-01-01 00:00:00,000 pytclmilter[1] INFO: conn#9: verdict accept at eom client=x from=<x>"
FORGED_SHOWN = r"\r\n2001-01-01 00:00:00,000 pytclmilter[1] INFO: conn#9: verdict accept at eom client=x from=<x>"
HOST = "evil" + FORGED + "\x1b[2J\x7f\x01"
HOST_SHOWN = r"evil" + FORGED_SHOWN + r"\x1b[2J\x7f\x01"
SENDER = "<reject" + FORGED + "\x1b]0;t\x07\x7f\x01@example.org>"
SENDER_SHOWN = r"<reject" + FORGED_SHOWN + r"\x1b]0;t\x07\x7f\x01@example.org>"
VALUE = "v" + FORGED + "\x1b[31m\x7f\x01\\"
VALUE_SHOWN = r"v" + FORGED_SHOWN + r"\x1b[31m\x7f\x01\\"
REPLY_SHOWN = r'reply="550 5.7.1 no\t\\ thanks"'  # other controls: refused by setreply
needs_thread = pytest.mark.skipif(not Path("/usr/lib/tcltk/x86_64-linux-gnu/thread2.8.8").exists(),
                                  reason="needs Debian's tcl-thread")
STDERR_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} pytclmilter\[\d+\] (DEBUG|INFO|WARNING|ERROR): ")

LOGGING_TCL = r"""
package require TclMilter
milter configure -name "Evil\x1b\[2J\x7fName"
proc from {ctx argv} {
    if {[string match <reject* [lindex $argv 0]]} {
        $ctx setreply 550 5.7.1 "no\t\\ thanks"
        return SMFIS_REJECT
    }
    return SMFIS_CONTINUE
}
proc rcpt {ctx argv} { return "no\0status\n2001-01-01 00:00:00,000 pytclmilter\[1\] INFO: forged" }
milter register connect {apply {{ctx host addr} { return SMFIS_CONTINUE }}}
milter register envfrom from
milter register envrcpt rcpt
milter register header {apply {{ctx name value} {
    if {$name eq "X-Bad"} { error "bad header value: $value\0" }
    return SMFIS_CONTINUE
}}}
milter main
"""


def test_mta_and_script_text_is_escaped_on_stderr(tclrun) -> None:
    """`pytclmilter run` to stderr: CR, LF, ESC, BEL, DEL and SOH in a client host name, a sender,
    a header value quoted by a Tcl error (with a NUL), a callback's result, a callback name and
    -name, and a tab in a setreply text (which refuses the others), reach the log as backslash
    escapes; Tcl's errorInfo keeps its lines,
    indented; no line of the log is anything but a line of ours or an indented continuation."""
    m = tclrun(LOGGING_TCL)
    assert m.name == r"Evil\x1b[2J\x7fName"  # the listening line (stdout)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.connect(hostname=HOST) == ("c", {})
        assert mta.helo() == "skipped"
        assert mta.event_raw("M", (SENDER + "\0").encode())[0] == "y"
        assert mta.mail("<ok@example.org>") == ("c", {})
        assert mta.rcpt("<r@example.com>") == ("c", {})
        assert mta.data() == "skipped"
        assert mta.header("X-Bad", VALUE) in ("noreply", ("c", {}))
        assert mta.eom() == [("t", b"")]  # the header callback's failure: -onerror
    m.wait_for(r"verdict tempfail at header")
    assert m.stop() == 0
    text = m.text  # (the pty's CR LF line ends made LF)
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text), [c for c in text if ord(c) < 32 and c != "\n"]
    lines = text.splitlines()
    for line in lines:
        assert STDERR_LINE.match(line) or line.startswith((" ", "pytclmilter: ")), line
    assert any(line.endswith(
        f'INFO: conn#1: verdict reject at envfrom client="{HOST_SHOWN}[192.0.2.7]" from="{SENDER_SHOWN}" {REPLY_SHOWN} gen=1')
        for line in lines), text
    assert any(line.endswith(
        r'WARNING: conn#1: envrcpt callback rcpt returned "no\x00status\n2001-01-01 00:00:00,000 '
        r'pytclmilter[1] INFO: forge..." (61 characters), not a status; treated as continue '
        "(said once a minute for this callback)")  # its start
        for line in lines), text
    error = next(i for i, line in enumerate(lines) if " ERROR: conn#1: header callback " in line)
    assert lines[error].endswith(
        r'header callback apply {{ctx name value} {\n    if {$name eq "X-Bad"} { error "bad header value: '
        r'$value\\0" }\n    return SMFIS_CONTINUE\n}} failed (bad header value: ' + VALUE_SHOWN +
        r"\x00), answering SMFIS_TEMPFAIL:"), lines[error]
    info = lines[error + 1:lines.index(next(line for line in lines[error + 1:] if not line.startswith(" ")))]
    # errorInfo: the message first, its LF (a line break to errorInfo) a line break of the log,
    # the forged line indented like every continuation line; then Tcl's own lines
    assert info[:2] == [r"  bad header value: v\r",
                        "  " + FORGED_SHOWN[4:] + r"\x1b[31m\x7f\x01\\\x00"], info
    assert info[2:4] == ["    while executing", r'  "error "bad header value: $value\\0" "'], info
    assert any(line.endswith(f"INFO: Evil\\x1b[2J\\x7fName stopped; verdicts: reject=1, tempfail=1, "
                             "callback errors=1") for line in lines), text


WARNING_HOOKS = r"""
import warnings

def setup(milter):
    @milter.register("envfrom")
    def envfrom(ctx, args):
        warnings.warn(f"odd sender {args[0]}")
"""


def test_a_python_warning_quoting_mta_text_is_a_log_line_escaped(tclrun) -> None:
    """A --python file's `warnings.warn` quoting a sender went through Python's own showwarning,
    straight to stderr (the log, under systemd): the sender's ESC, CR and LF raw, and after its LF
    a line of the sender's choosing that passed for one of the log's. FAILED before: the raw ESC
    and the forged line. Warnings are now log records of py.warnings (logs.py), escaped and
    guarded as every record is."""
    m = tclrun("package require TclMilter\nmilter main\n", python=[WARNING_HOOKS])
    forged = "2001-01-01 00:00:00,000 pytclmilter[1] INFO: forged"
    with m.mta() as mta:
        mta.negotiate()
        mta.connect()
        assert mta.mail(f"<a\x1b[31m\r\n{forged}@example.org>") == ("c", {})
    m.wait_for("odd sender")
    assert m.stop() == 0
    text = m.text
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text), [c for c in text if ord(c) < 32 and c != "\n"]
    assert not any(line.startswith(forged) for line in text.splitlines()), text
    # the warning's lines are the record's: its LF a line break, the next line indented
    assert re.search(r"WARNING: .*hooks0\.py:7: UserWarning: odd sender <a\\x1b\[31m\\r\n  " + re.escape(forged)
                     + r"@example\.org>\n  warnings\.warn", text), text


PRINT_HOOKS = r"""
import sys

def setup(milter):
    @milter.register("envfrom")
    def envfrom(ctx, args):
        print("from", args[0])
        sys.stderr.write("err: " + args[0] + "\n")
        print("built:", end=" ")
        sys.stdout.flush()
        print(args[0], end="", flush=True)
        print(" (end)")
        print("held", end="")
"""


def _hooks_served(tmp_path: Path, hooks_text: str, sender: str) -> tuple[int, int, str, str]:
    """`run` of a script that only serves, with ``hooks_text`` as its --python file, stdout and
    stderr pipes (as under systemd), given one MAIL FROM ``sender``, then stopped: its port, exit
    status, stdout and stderr."""
    script = tmp_path / "milter.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    hooks = tmp_path / "hooks.py"
    hooks.write_text(hooks_text)
    port = free_port()
    proc = subprocess.Popen([*PYTCLMILTER, "run", str(script), "--python", str(hooks), "--connection",
                             f"inet:{port}@127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env())
    read: dict[str, bytes] = {}
    reading = threading.Thread(target=lambda: read.update(zip(("out", "err"), proc.communicate(timeout=30))))
    reading.start()
    try:
        wait_listening(proc, port)
        with Mta(port) as mta:
            mta.negotiate()
            mta.connect()
            assert mta.mail(sender) == ("c", {})
    finally:
        proc.terminate()
        reading.join(30)
    return port, proc.returncode, read["out"].decode(), read["err"].decode()


def test_a_python_hooks_print_of_mta_text_cannot_forge_a_line(tmp_path) -> None:
    """A --python hook's print() and sys.stderr.write() of a sender with ESC, CR LF and a forged
    line, as under systemd (stdout and stderr pipes): each control escaped and the line after the
    LF indented, as a script's `puts` is; a line built by writes without a newline (flushed
    between) written whole; the line left open written, ended, at the stop; our own lines as
    they were. FAILED before: the raw ESC and CR, and the forged line at a line's start."""
    forged = "2001-01-01 00:00:00,000 pytclmilter[1] ERROR: forged"
    sender = f"<a\x1b[31m\x7f\r\n{forged}@example.org>"
    shown = [r"<a\x1b[31m\x7f\r", f"  {forged}@example.org>"]
    port, status, out, err = _hooks_served(tmp_path, PRINT_HOOKS, sender)
    assert status == 0
    for text in (out, err):
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text), text
        assert not any(line.startswith(forged) for line in text.splitlines()), text
    assert out.split("\n") == [f"pytclmilter: TclMilter listening on inet:{port}@127.0.0.1",
                                "from " + shown[0], shown[1], "built: " + shown[0], shown[1] + " (end)",
                                "held", ""], out
    lines = err.splitlines()
    at = lines.index("err: " + shown[0])
    assert lines[at + 1] == shown[1], err
    assert all(STDERR_LINE.match(line) for line in lines[:at] + lines[at + 2:]), err


PUTS_TCL = r"""
package require TclMilter
set child [interp create]
proc header {ctx name value} {
    puts stderr "header $name: $value"
    puts -nonewline "cols:\t"; puts -nonewline "[string length $value]\t"; puts "\u00e9\u2713 C:\\dir"
    puts -nonewline "built: "; puts -nonewline $value; puts " (end)"
    chan puts stdout "chan: $value"
    interp eval $::child [list puts "child: $value"]
    set f [open [lindex $::argv 0] a]; puts $f "file: $value"; close $f
    return SMFIS_CONTINUE
}
milter register header header
milter main
"""


def header_output(m, name: str, value: str) -> str:
    """What the running filter ``m`` wrote for one message with the header ``name: value``, once
    stopped: no control character but LF in it."""
    with m.mta() as mta:
        mta.negotiate()
        mta.connect()
        mta.mail("<a@example.org>")
        mta.rcpt("<r@example.com>")
        assert mta.header(name, value) in ("noreply", ("c", {}))
        mta.eom()
    m.wait_for("verdict accept at eom")
    assert m.stop() == 0
    text = m.text
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text), [c for c in text if ord(c) < 32 and c != "\n"]
    return text


def test_a_scripts_puts_of_mta_text_cannot_forge_a_line_or_reach_the_terminal(tclrun, tmp_path) -> None:
    """A script's `puts` to stdout and stderr (the journal under systemd) of a header value with
    CR LF, a forged line, ESC, DEL and SOH: each control escaped, the line after the LF
    indented, in `puts`, `chan puts`, a line built by `puts -nonewline` and a child
    interpreter's `puts`; tabs, backslashes and UTF-8 as written; a file gets the value raw."""
    raw = tmp_path / "raw.txt"
    m = tclrun(PUTS_TCL, args=[str(raw)])
    text = header_output(m, "X-Bad", VALUE)
    lines = text.splitlines()
    for line in lines:
        assert STDERR_LINE.match(line) or line.startswith((" ", "pytclmilter: ", "header X-Bad: ", "cols:",
                                                           "built: ", "chan: ", "child: ")), line
    value = [r"v\r", "  " + FORGED_SHOWN[4:] + "\\x1b[31m\\x7f\\x01\\"]
    for start, end in (("header X-Bad: ", ""), ("built: ", " (end)"), ("chan: ", ""), ("child: ", "")):
        at = lines.index(start + value[0])
        assert lines[at + 1] == value[1] + end, lines[at:at + 2]
    assert f"cols:\t{len(VALUE)}\t\u00e9\u2713 C:\\dir" in lines, text
    assert raw.read_bytes() == f"file: {VALUE}\n".encode()


THREADS_PUTS_TCL = r"""
package require TclMilter
package require Thread
proc header {ctx name value} {
    thread::join [thread::create -joinable [list puts stderr "thread: $value"]]
    set p [tpool::create -initcmd [list puts stderr "init: $value"]]
    tpool::wait $p [tpool::post $p [list puts "job: $value"]]
    tpool::release $p
    set nested [list thread::join [thread::create -joinable [list chan puts stderr "nested: $value"]]]
    thread::join [thread::create -joinable $nested]
    set t [thread::create]
    thread::send $t [list interp create i]
    thread::send $t [list i eval [list puts stderr "interp: $value"]]
    thread::send $t {interp create -safe s; interp share {} stderr s; s eval {interp create x; interp share {} stderr x}}
    thread::send $t [list s eval [list x eval [list puts stderr "threadsafe: $value"]]]
    set usage [thread::send $t {list [catch {puts nosuch x} e] $e [catch {puts a b c d} e] $e}]
    thread::send $t [list after 0 [list error "bgerror: $value"]]
    thread::send $t update
    thread::release $t
    interp create c
    load {} Thread c
    c eval {thread::join [thread::create -joinable {puts -nonewline stderr "cols:\t"; puts stderr "\u00e9 C:\\dir"}]}
    interp create -safe s
    interp share {} stderr s
    s eval {interp create x; interp share {} stderr x}
    s eval [list x eval [list puts stderr "safe: $value"]]
    interp delete s
    puts stderr "usage: $usage"
    return SMFIS_CONTINUE
}
milter register header header
milter main
"""


@needs_thread
@pytest.mark.parametrize("options", [(), ("--user", "nobody")], ids=["root", "user"])
def test_a_threads_puts_is_escaped_as_the_scripts(tclrun, options) -> None:
    """Each thread of the Thread package has its own standard channels and its own `puts`: the
    header value with CR LF, a forged line and ESC, written by a thread, a pool's -initcmd and
    job, a thread's thread, an interpreter in a thread and a thread of a child interpreter,
    reaches stderr escaped and indented as the script's own `puts` does, and so does an
    interpreter a safe one creates, in the script's thread and in a thread (before: Tcl's own
    `puts`, raw, once the safe ones shared stderr), and Tcl's report of an error in a thread's
    `after` handler (before: raw), as root and once
    --user has dropped privileges; Tcl's errors, tabs, UTF-8 and backslashes as under tclsh."""
    m = tclrun(THREADS_PUTS_TCL, *options)
    text = header_output(m, "X-Bad", VALUE)
    lines = text.splitlines()
    starts = ("thread: ", "init: ", "job: ", "nested: ", "interp: ", "threadsafe: ", "safe: ", "bgerror: ")
    for line in lines:
        assert STDERR_LINE.match(line) or line.startswith((" ", "pytclmilter: ", "cols:", "usage: ", *starts)), line
    for start in starts:
        at = lines.index(start + r"v\r")
        assert lines[at + 1] == "  " + FORGED_SHOWN[4:] + "\\x1b[31m\\x7f\\x01\\", lines[at:at + 2]
    assert "cols:\t\u00e9 C:\\dir" in lines, text
    assert 'usage: 1 {can not find channel named "nosuch"} 1 {wrong # args: should be ' \
           '"puts ?-nonewline? ?channelId? string"}' in lines, text


THREAD_BGERROR_TCL = r"""
package require Thread
set t [thread::create]
thread::send $t {
    proc bgerror {m} {
        puts stderr "bgerror <$m> <$::errorCode> <[lindex [split $::errorInfo \n] 0]>"
        if {[incr ::n] == 2} { return -code break }
        error "failed on [string range $m 0 2]\x1b\[2J\nERROR: forged"
    }
}
thread::send $t {after 0 {error "one\nERROR: forged one" info CODE}; after 0 {error two}; after 0 break}
thread::send $t update
thread::send $t {after 0 break; after 0 {return -code 7}}
thread::send $t update
thread::release $t
puts stderr done
"""


def _stderr_here_and_under_tclsh(tmp_path: Path, tcl: str) -> tuple[list[str], list[str]]:
    """The lines of stderr (but our log lines) of `check` on this Tcl then `milter main`, and
    those of tclsh8.6 running it alone."""
    script = tmp_path / "script.tcl"
    script.write_text("package require TclMilter\n" + tcl + "milter main\n")
    reference = tmp_path / "reference.tcl"
    reference.write_text(tcl)
    tclsh = shutil.which("tclsh8.6") or pytest.skip("no tclsh8.6")
    ref = subprocess.run([tclsh, str(reference)], capture_output=True, text=True, timeout=60)
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    return [line for line in done.stderr.splitlines() if not STDERR_LINE.match(line)], ref.stderr.splitlines()


@needs_thread
def test_a_threads_bgerror_proc_that_fails_is_reported_escaped_as_by_tcl(tmp_path) -> None:
    """A thread's own `bgerror` proc that fails, breaks (dropping the error queued after), and
    gets a `break` and a `return -code 7` of an `after` handler: it is called with the message,
    errorCode and errorInfo tclsh gives it, and Tcl's report of its failure (`bgerror failed to
    handle background error.`, the two errors) is tclsh's, escaped and indented (before: Tcl's
    own handler wrote it raw, the ESC and a forged line `ERROR: forged`)."""
    ours, tclsh = _stderr_here_and_under_tclsh(tmp_path, THREAD_BGERROR_TCL)
    expected = [re.sub(r"^ERROR", "  ERROR", line.replace("\x1b", "\\x1b")) for line in tclsh]
    assert len(expected) == 19 and ours == expected, (ours, expected)


THREAD_ERROR_STORM_TCL = r"""
package require TclMilter
package require Thread
thread::join [thread::create -joinable {
    proc tick {n} {
        if {$n} { after 1 [list tick [expr {$n - 1}]] } else { after 20 {set ::done 1} }
        error "boom $n\x1b"
    }
    after 0 {tick 300}
    vwait ::done
}]
puts stderr done
milter main
"""


@needs_thread
def test_a_threads_after_handler_failing_in_a_loop_is_reported_once_then_counted(tmp_path) -> None:
    """A thread's `after` handler that fails and reschedules itself, 301 times, without a
    `bgerror` proc: its report (Tcl's layout, escaped) is written once, and the repeats are
    counted in one log line, as the script's own thread's (before: 301 reports of 7 lines each,
    800 lines a second for a handler failing every millisecond, a flood of the journal)."""
    script = tmp_path / "storm.tcl"
    script.write_text(THREAD_ERROR_STORM_TCL)
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    lines = done.stderr.splitlines()
    assert [line for line in lines if line.startswith("boom")] == ["boom 300\\x1b"], lines[:20]
    counts = [line for line in lines if "(repeated 300 times" in line]
    assert len(counts) == 1 and STDERR_LINE.match(counts[0]), lines[-5:]
    assert "error in a thread's after or fileevent handler, reported on stderr: boom " in counts[0], counts


@needs_thread
def test_a_threads_call_of_the_report_counter_with_wrong_args_is_a_tcl_error_not_a_traceback(tmp_path) -> None:
    """::tclmilter::py::bgreported, which a thread's background error handler calls, is a
    command the thread's script can call too: with too few words each call was an internal
    error, a Python traceback in the log. Now its answer is Tcl's `wrong # args` (as {error
    message errorCode}: the commands of threads.py answer so), logged nowhere."""
    said = wrong_args_said(tmp_path, "package require Thread\nset t [thread::create]\n"
                           "puts stderr \"said: [thread::send $t {catch {::tclmilter::py::bgreported x} m; set m}]\"\n")
    assert said == ["::tclmilter::py::bgreported what message errorInfo"], said


def wrong_args_said(tmp_path: Path, tcl: str) -> list[str]:
    """What `pytclmilter check` of a script of ``tcl`` (then `milter main`) wrote on stderr as
    ``said: ANSWER`` lines, each answer Tcl's `wrong # args` of a host command ({error ...
    {TCL WRONGARGS}}): the usage it gives. Asserts that no internal error was logged."""
    return re.findall(r'^said: error \{wrong # args: should be "([^"]*)"\} \{TCL WRONGARGS\}$',
                      checked_stderr(tmp_path, tcl), re.M)


def checked_stderr(tmp_path: Path, tcl: str) -> str:
    """What `pytclmilter check` of a script of ``tcl`` (then `milter main`) wrote on stderr,
    asserting that no internal error was logged."""
    script = tmp_path / "s.tcl"
    script.write_text(f"package require TclMilter\n{tcl}milter main\n")
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    return done.stderr


# A log handler another thread holds for ever (a terminal that takes no more: its writer waits
# with the handler's lock), taken from Tcl once the thread's first error has been reported.
HOLD_THE_LOG_PY = ("import logging\nimport threading\n\n\ndef setup(milter):\n"
                   "    @milter.tcl_command('holdlog')\n    def hold(_):\n        held = threading.Event()\n\n"
                   "        def stuck():\n            for handler in logging.getLogger().handlers:\n"
                   "                handler.acquire()\n            held.set()\n            threading.Event().wait()\n\n"
                   "        threading.Thread(target=stuck, daemon=True).start()\n        held.wait()\n")
HOLD_THE_LOG_TCL = r"""
package require TclMilter
package require Thread
thread::create {
    after 0 {error boom}
    after 5 {error boom}
    after 300 {exit 3}
    vwait forever
}
after 100 {holdlog x}
vwait forever
"""


@needs_thread
def test_a_threads_exit_with_a_count_untold_and_the_log_held_still_ends_the_process(tmp_path) -> None:
    """A thread's `exit` with a failure counted and not told (its handler's second error) while
    another thread holds the log's handler: telling the count waited for that handler for ever,
    and the process never ended, where a thread's `exit` gives a held handler 2 s. Now the
    count is told only if every handler is had within those 2 s, and the process ends."""
    (tmp_path / "s.tcl").write_text(HOLD_THE_LOG_TCL)
    (tmp_path / "hold.py").write_text(HOLD_THE_LOG_PY)
    try:
        done = subprocess.run([*PYTCLMILTER, "check", "--python", str(tmp_path / "hold.py"), str(tmp_path / "s.tcl")],
                              env=child_env(), capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the thread's exit hung: {hung.stderr!r}")
    assert done.returncode == 3, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("boom")] == ["boom"], done.stderr


LONG_PUTS_TCL = r"""
package require TclMilter
proc header {ctx name value} {
    puts stderr "whole: $value"
    foreach word [split $value] { puts -nonewline stderr "$word " }
    puts stderr "(pieces)"
    thread::join [thread::create -joinable [list puts "thread: $value\x01"]]
    return SMFIS_CONTINUE
}
package require Thread
milter register header header
milter main
"""


@needs_thread
def test_a_puts_longer_than_a_journal_line_is_folded_keeping_its_text(tclrun) -> None:
    """journald cuts a line at its LineMax (48 KiB by default) and starts an entry with the
    rest: a header value of 60 000 characters ending in a forged line, written by one `puts`,
    by `puts -nonewline` word by word and by a thread, comes out in lines of at most 4 095
    bytes (4 096 with the LF: one write), those after the first indented, which joined give
    the text back."""
    value = " ".join(["a" * 999] * 60) + "ERROR: forged"
    m = tclrun(LONG_PUTS_TCL)
    lines = header_output(m, "X-Long", value).splitlines()
    assert max(len(line) for line in lines) == 4095, [len(line) for line in lines]
    for start, end in (("whole: ", ""), ("", "(pieces)"), ("thread: ", r"\x01")):
        at = next(i for i, line in enumerate(lines) if line.startswith(start + "a" * 999))
        after = next(i for i in range(at + 1, len(lines)) if not lines[i].startswith("  "))
        assert all(len(line) == 4095 for line in lines[at:after - 1]), lines[at:after]
        joined = lines[at] + "".join(line[2:] for line in lines[at + 1:after])
        assert joined == start + (value + " " if end == "(pieces)" else value) + end, (start, joined[-40:])


EDGE_PUTS_TCL = r"""
package require TclMilter
proc header {ctx name value} {
    puts stderr "edge: $value"
    puts stderr "[string range "exact: $value" 0 4091]\nafter"
    thread::join [thread::create -joinable [list puts stderr "thread: $value"]]
    return SMFIS_CONTINUE
}
package require Thread
milter register header header
milter main
"""


def unfolded(lines: list[str]) -> list[str]:
    """``lines`` as a reader joins folded ones: a line of 4 092 bytes or more (4 096 less the LF
    and the longest UTF-8 character) goes on in the next, past its two-space indent."""
    joined: list[str] = []
    folded = False
    for line in lines:
        if folded:
            joined[-1] += line[2:]
        else:
            joined.append(line)
        folded = len(line.encode()) >= 4092
    return joined


@needs_thread
def test_a_folded_line_joined_gives_its_text_back_a_space_at_a_cut_or_a_line_4092_bytes_long(tclrun) -> None:
    """A fold that cuts before spaces, a line exactly 4 092 bytes long and 2-byte characters, a
    tab and a control character folded, by the script and by a thread: no line over 4 095
    bytes, none cut inside a character, a line of 4 092 bytes or more goes on in the next, no
    other does, and joining them gives the text back character for character."""
    value = "a" * 4090 + "  ERROR: forged " + "\u00e9\t\x01" * 3000
    shown = value.replace("\x01", r"\x01")
    lines = header_output(tclrun(EDGE_PUTS_TCL), "X-Edge", value).splitlines()
    assert max(len(line.encode()) for line in lines) == 4095, [len(line.encode()) for line in lines]
    joined = unfolded(lines)
    for line in ("edge: " + shown, ("exact: " + shown)[:4092], "  after", "thread: " + shown):
        assert line in joined, (line[4080:4110], [j[4080:4110] for j in joined if j.startswith(line[:6])])
    assert joined[joined.index(("exact: " + shown)[:4092]) + 1] == "  after"


SHARED_PUTS_TCL = r"""
package require TclMilter
package require Thread
lassign $argv sender ending
# Another writer on the same descriptors: whole lines, as fast as it can.
set writer [thread::create -joinable {
    proc loop {} { for {set i 0} {$i < 20000} {incr i} { puts stderr b; puts b } }
    thread::wait
}]
thread::send -async $writer {loop; thread::exit}
fconfigure stdout -buffersize 64
for {set i 0} {$i < 200} {incr i} {
    puts stderr "from: $sender"
    puts "to: $sender"
    puts "ascii: [string repeat x 249]ERROR: forged"
    puts -nonewline stderr "built: "; puts -nonewline stderr $sender; puts stderr ""
}
thread::join $writer
puts -nonewline stderr "held: $sender"
if {$ending eq "exit"} { exit 0 }
proc connect {args} { return SMFIS_CONTINUE }
milter register connect connect
milter main
"""


def joined_output(data: bytes, other: bytes) -> list[str]:
    """Output read from a pipe as its reader joins folded lines, the ``other`` writer's lines
    left out (journald tells writers apart by their _PID; here, by their text): one of 4 092
    bytes or more (4 short of a 4 096-byte write, the longest UTF-8 character) goes on in the
    next, past its two spaces."""
    joined: list[str] = []
    folded = False
    for line in data.split(b"\n"):
        if line == other:
            continue
        text = line.decode()
        if folded:
            joined[-1] += text[2:]
        else:
            joined.append(text)
        folded = len(line) >= 4092
    return joined


@needs_thread
@pytest.mark.parametrize("ending", ["main", "exit"])
def test_puts_with_another_writer_on_the_descriptor_cannot_start_a_line_with_its_text(tmp_path, ending) -> None:
    """journald reads a stream shared by every thread and worker: a thread writes whole lines
    to stdout and stderr while the script writes a sender of 2-byte characters ending in a
    forged line, by one `puts` to each and by `puts -nonewline` pieces, and a line of ASCII on
    a stdout whose buffer is 64 bytes, into pipes. No line read starts with the sender's text
    (before: Tcl wrote each 4 096 bytes, and stderr's newline, in a write() of its own, and the
    thread's lines came between: dozens of lines began with `ERROR: forged`), and joining
    folded lines gives each line back whole; a piece left open at the end, or at `exit`, is
    still written."""
    script = tmp_path / "shared.tcl"
    script.write_text(SHARED_PUTS_TCL)
    sender = "\u00e9" * 2045 + "ERROR: forged"
    done = subprocess.run([*PYTCLMILTER, "check", str(script), "--", sender, ending], env=child_env(),
                          capture_output=True, timeout=120)
    out, err = joined_output(done.stdout, b"b"), joined_output(done.stderr, b"b")
    for line in out + err:
        assert not line.startswith(("ERROR: forged", "\u00e9")), line[:40]
    assert out.count("to: " + sender) == 200, [line[:40] for line in out][:10]
    assert out.count("ascii: " + "x" * 249 + "ERROR: forged") == 200, [line[:40] for line in out][:10]
    assert err.count("from: " + sender) == 200, [line[:40] for line in err][:10]
    assert err.count("built: " + sender) == 200, [line[:40] for line in err][:10]
    assert done.stdout.split(b"\n").count(b"b") == done.stderr.split(b"\n").count(b"b") == 20000
    assert "held: " + sender in err, err[-3:]


WIDE_ENCODING_TCL = r"""
package require TclMilter
package require Thread
tsv::set s stop 0
set t [thread::create -joinable {
    puts b
    tsv::set s started 1
    while {![tsv::get s stop]} { puts b }
}]
while {![tsv::exists s started]} { after 1 }
fconfigure stdout -encoding unicode
for {set i 0} {$i < 1000} {incr i} { puts [string repeat ab 1500] }
tsv::set s stop 1
thread::join $t
milter main
"""


@needs_thread
def test_a_line_of_ascii_on_a_two_byte_encoding_is_written_whole(tmp_path) -> None:
    """A stdout whose -encoding takes 2 bytes a character (`unicode`), 1 000 lines of 3 000
    ASCII characters while a thread writes lines on the same pipe: every line is read whole
    (before: Tcl's own `puts` took it, counting characters, and wrote its 6 002 bytes in two
    write()s, the thread's lines between: 8 to 363 of 1 000 cut in 5 runs). Such a line now
    goes through Python, in UTF-8 as every line it writes."""
    script = tmp_path / "wide.tcl"
    script.write_text(WIDE_ENCODING_TCL)
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), capture_output=True, timeout=120)
    line = "ab" * 1500 + "\n"
    whole = done.stdout.count(line.encode("utf-16-le")) + done.stdout.count(line.encode())
    assert (done.returncode, whole) == (0, 1000), done.stderr[-1000:]


CR_TRANSLATION_TCL = r"""
package require TclMilter
fconfigure stdout -translation cr
fconfigure stderr -translation crlf
puts "one"
puts stderr "two"
puts "caf\u00e9"
puts -nonewline "th"
puts "ree"
milter main
"""


def test_puts_ends_its_lines_with_lf_whatever_the_channels_translation(tmp_path) -> None:
    """`fconfigure stdout -translation cr` (or crlf on stderr): every line of the script's `puts`
    ends with LF, as the lines through Python always did, so the next line, ours or another
    writer's, starts one of its own (before: the usual ASCII line, which Tcl's own `puts` writes,
    ended with a bare CR, which ends no journal line: `one\\rcafé\\n`)."""
    script = tmp_path / "cr.tcl"
    script.write_text(CR_TRANSLATION_TCL)
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("one\ncaf\u00e9\nthree\n".encode()), done.stdout
    assert b"\r" not in done.stderr and b"two\n" in done.stderr, done.stderr


TCL_OWN_STDERR = r"""
puts -nonewline stderr "debug: a \\ b\n"
puts -nonewline stderr "    Original error: "
puts -nonewline stderr "x\n\033\[31mERROR: forged"
puts -nonewline stderr "\n"
interp create c
c eval { close stderr; after 0 {error "after close\n\033"}; update }
exec sh -c {echo exec >&2} 2>@stderr
"""


def test_what_tcl_writes_itself_on_stderr_is_escaped_the_scripts_lines_not_twice(capfd) -> None:
    """Tcl's stderr channel (tcl/tclstderr.py), in a thread of its own as the script's: a whole
    printable line, the script's usual debug line, as it is (its backslash not doubled); a line
    Tcl writes in pieces, held and written whole, its controls escaped and the lines after it
    indented; Tcl's default report of an interpreter that closed its stderr, each line indented
    (its first is the error's message); `exec ... 2>@stderr` still reaches descriptor 2."""
    _in_a_thread_of_its_own(TCL_OWN_STDERR)
    err = capfd.readouterr().err
    assert err.startswith("debug: a \\ b\n    Original error: x\n  \\x1b[31mERROR: forged\n  after close\n  \\x1b\n"
                          "    while executing\n"), err
    assert err.endswith('    ("after" script)\nexec\n'), err


def _in_a_thread_of_its_own(script: str) -> str:
    """``script``'s result, evaluated in a new thread whose stderr has tclstderr's transform."""
    done: list[str | BaseException] = []

    def run() -> None:
        try:
            tclstderr.install()
            done.append(tkinter.Tcl().eval(script))
        except BaseException as exc:  # noqa: BLE001 - told by the assertion below
            done.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert isinstance(done[0], str), done
    return done[0]


def test_stderr_with_tcls_own_reports_escaped_is_still_named_stderr(capfd) -> None:
    """The transform on the thread's stderr (tcl/tclstderr.py) made Tcl name the channel
    ``file2``: `chan names` listed it, prelude.py's `quiet` took it for a script's channel and the
    milter polled Tcl every tick for ever (test_bench_idle.py). It is `stderr`, popped too (Tcl's
    own again, raw); its pop (as its close at exit) wrote an empty indented line."""
    names = _in_a_thread_of_its_own(
        'set names [chan names]; chan pop stderr; lappend names | {*}[chan names]; puts -nonewline stderr "raw\033\n"'
        "; set names")
    assert names.split() == ["stdin", "stdout", "stderr", "|", "stdin", "stdout", "stderr"], names
    assert capfd.readouterr().err == "raw\x1b\n"



@pytest.mark.parametrize(("script", "written"), [
    ('fconfigure stderr -translation cr; puts stderr "a\\033"; puts stderr "b\\033"; '
     'fconfigure stderr -translation lf; puts stderr end', "  a\\x1b\n  b\\x1b\n  end\n"),
    ('puts -nonewline stderr "part\\033"; chan pop stderr; puts stderr after', "  part\\x1b\nafter\n"),
], ids=["translation cr", "held at the pop"])
def test_tcls_own_stderr_lines_end_where_tcl_ends_them(capfd, script: str, written: str) -> None:
    """The transform on Tcl's stderr (tcl/tclstderr.py) under `-translation cr`: each bare CR ends
    a line, as the terminal shows it (taken for a control, the whole went out as one line,
    `a\\x1b\\rb\\x1b\\rend`); a line's start it holds is written when the script pops it (or
    closes the channel: its flush), not lost."""
    _in_a_thread_of_its_own(script)
    assert capfd.readouterr().err == written


def test_a_second_host_in_a_thread_pushes_no_second_transform(capfd) -> None:
    """Each TclHost installs the transform (a reload makes one in the serving thread): a thread's
    second install does nothing, or each reload stacked one more transform and one more
    interpreter on stderr for the process's life. One `chan pop` leaves Tcl's own channel."""
    done: list[str | BaseException] = []

    def run() -> None:
        try:
            tclstderr.install()
            tclstderr.install()
            done.append(tkinter.Tcl().eval('chan pop stderr; puts -nonewline stderr "raw\\033\\n"; chan names'))
        except BaseException as exc:  # noqa: BLE001 - told by the assertion below
            done.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert done == ["stdin stdout stderr"], done
    assert capfd.readouterr().err == "raw\x1b\n"


def test_a_thread_with_an_ended_threads_ident_gets_the_transform_too(capfd) -> None:
    """tclstderr.py installed its transform once per thread ident, and Python reuses the ident of
    a thread that ended for the next one: the next thread's TclHost (an embedding program's pool,
    these tests one after another) had none, and Tcl's own reports went out raw, an ESC and all,
    on its stderr. Each thread's own is installed, whatever its ident."""
    idents: list[int] = []
    for n in range(20):  # (until an ident comes again: at once with glibc, which reuses the stack)
        def run(n: int = n) -> None:
            idents.append(threading.get_ident())
            tclstderr.install()
            tkinter.Tcl().eval(f'puts -nonewline stderr "thread {n}\\033\\n"')

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if len(set(idents)) < len(idents):
            break
    else:
        pytest.skip("no thread ident was reused")
    err = capfd.readouterr().err
    assert err == "".join(f"  thread {n}\\x1b\n" for n in range(len(idents))), err


LONE_SURROGATE_PUTS_TCL = r"""
package require TclMilter
package require Thread
set text "a[format %c 0xD800]b[format %c 0xDCE9]c"
puts "out: $text"
puts stderr "err: $text"
thread::join [thread::create -joinable [list puts "thread out: $text"]]
thread::join [thread::create -joinable [list puts stderr "thread err: $text"]]
milter main
"""


@needs_thread
def test_a_lone_surrogates_puts_is_escaped_as_the_log_escapes_it(tmp_path) -> None:
    """`puts [format %c 0xD800]`, a character with no UTF-8, beside the bytes rule's U+DCE9 (the
    byte E9): to stdout and stderr, from the script's thread and from a thread, each is written
    as our log writes it, `\\ud800` and `\\xe9` (before: a thread wrote `\\xed\\xa0\\x80`, three
    bytes no one sent, where the script's thread wrote `\\ud800`)."""
    script = tmp_path / "lone.tcl"
    script.write_text(LONE_SURROGATE_PUTS_TCL)
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    shown = r"a\ud800b\xe9c"
    assert done.stdout.splitlines()[:2] == [f"out: {shown}", f"thread out: {shown}"], done.stdout
    err = [line for line in done.stderr.splitlines() if not STDERR_LINE.match(line)]
    assert err == [f"err: {shown}", f"thread err: {shown}"], done.stderr


ENDED_THREADS_TCL = r"""
package require TclMilter
package require Thread
for {set i 0} {$i < 3} {incr i} {
    thread::join [thread::create -joinable "puts -nonewline {thread $i began: }"]
    puts stderr "thread $i ended"
}
thread::join [thread::create -joinable {puts "ERROR: forged \u00e9"}]
milter main
"""


@needs_thread
def test_a_line_a_thread_leaves_open_is_written_when_the_thread_ends(tmp_path) -> None:
    """Threads that each `puts -nonewline` a piece and end, one after the other, then a thread
    that `puts` a line: each piece is written, its line ended, as its thread ends, as Tcl's own
    channels were flushed then (before: all held until the process ended, a day later under
    systemd or never after a SIGKILL, and run together with the next thread's line on one,
    `thread 0 began: thread 1 began: thread 2 began: ERROR: forged é`, threads taking the ids
    of those that ended)."""
    script = tmp_path / "ended.tcl"
    script.write_text(ENDED_THREADS_TCL)
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
    assert done.stdout.splitlines()[:7] == [
        "thread 0 began: ", "thread 0 ended", "thread 1 began: ", "thread 1 ended", "thread 2 began: ",
        "thread 2 ended", "ERROR: forged \u00e9"], done.stdout


@needs_thread
@pytest.mark.parametrize(("held", "status"), [
    ('thread::create {puts -nonewline "held \\u00e9"; exit 5}\nafter 30000\n', 5),
    ('puts -nonewline "held \\u00e9"\nthread::join [thread::create -joinable {exit 3}]\n', 3),
], ids=["own", "scripts"])
def test_a_line_a_thread_leaves_open_is_written_at_its_exit(tmp_path, held, status) -> None:
    """A thread that `puts -nonewline` a piece and calls `exit 5`, or the script's thread's piece
    and a thread's `exit 3`: the process ends with that status, the piece written, its line
    ended (before: lost, held in memory the exit never looked at; until the fix after review,
    the script's thread's still was: Tcl's exit in a thread ran that thread's end alone)."""
    script = tmp_path / "exit.tcl"
    script.write_text(f"package require TclMilter\npackage require Thread\n{held}milter main\n")
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (status, "held \u00e9\n"), (done, done.stderr)


HELD_AT_A_STOP_TCL = r"""
package require TclMilter
puts -nonewline "held while loading \u00e9"
puts stderr "loading"
after 500
puts " (loaded)"
proc from {ctx argv} { puts -nonewline "held in a callback \u00e9"; puts stderr "in the callback"; exec sleep 30 }
milter register envfrom from
if {[lindex $argv 0] eq "loading"} { after 30000 }
milter main
"""


@pytest.mark.parametrize("stopped", ["loading", "serving"])
def test_a_stop_that_ends_the_process_at_once_writes_the_line_the_script_left_open(tmp_path, stopped) -> None:
    """SIGTERM while the script loads (`after 30000` before `milter main`: the process ends
    there, status 0), or while a callback is held in `exec sleep 30` past `--grace 1` (it ends
    5 s later, status 1): the piece the script began by `puts -nonewline` is written, its line
    ended (before: lost, the process ending by os._exit from another thread)."""
    script = tmp_path / "stop.tcl"
    script.write_text(HELD_AT_A_STOP_TCL)
    port = free_port()
    proc = subprocess.Popen([*PYTCLMILTER, "run", str(script), "--grace", "1", "--connection",
                             f"inet:{port}@127.0.0.1", "--", stopped], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env())
    assert proc.stderr is not None
    sending = [*PYTCLMILTER, "send", "-c", f"inet:{port}@127.0.0.1", str(DATA / "plain.eml")]
    held = b"in the callback\n" if stopped == "serving" else b"loading\n"
    try:
        if stopped == "serving":
            wait_listening(proc, port)
            subprocess.Popen(sending, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
        for line in iter(proc.stderr.readline, b""):  # (until the script is held where it is)
            if line == held:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == (1 if stopped == "serving" else 0), err.decode()[-1000:]
    assert out.decode().endswith(f"held {'in a callback' if stopped == 'serving' else 'while loading'} \u00e9\n"), out


COUNTED_AT_AN_END_TCL = r"""
package require TclMilter
package require Thread
proc tick {n} { if {$n} { after 1 [list tick [expr {$n - 1}]] } else { set ::done 1 }; error "boom $n" }
after 0 {tick 50}
vwait ::done
update
puts stderr ready
if {[lindex $argv 0] eq "exit"} { thread::create {exit 4} }
after 30000
milter main
"""


@needs_thread
@pytest.mark.parametrize("ended", ["exit", "stop"], ids=["a threads exit", "a stop while loading"])
def test_counts_not_told_yet_are_told_when_the_process_ends_at_once(tmp_path, ended) -> None:
    """A failing `after` loop (51 errors: one logged whole, 50 counted), then a thread's `exit 4`
    or SIGTERM while the script loads: the count is told, as the script's own `exit` and a stop
    while serving tell it (before: lost, the process ending by Tcl's exit or os._exit from
    another thread with the count still held)."""
    script = tmp_path / "counted.tcl"
    script.write_text(COUNTED_AT_AN_END_TCL)
    proc = subprocess.Popen([*PYTCLMILTER, "run", str(script), "--connection", "inet:0@127.0.0.1", "--", ended],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    assert proc.stderr is not None
    err = b""
    try:
        for line in iter(proc.stderr.readline, b""):
            err += line
            if line == b"ready\n":
                break
        if ended == "stop":
            proc.send_signal(signal.SIGTERM)
        err += proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == (4 if ended == "exit" else 0), err.decode()[-1000:]
    assert b"boom 0 (repeated 50 times since its last line with the trace" in err, err.decode()[-1000:]


CLOSED_IN_A_THREAD_TCL = r"""
package require TclMilter
package require Thread
thread::join [thread::create -joinable {close stdout; close stderr; close stdin}]
set t [thread::create {close stdout; interp create c; thread::wait}]
puts stderr "in the thread: [thread::send $t {catch {puts x} e; set e}]"
puts stderr "its interpreter: [thread::send $t {c eval {puts -nonewline {}}; c eval {fconfigure stdout -blocking}}]"
thread::release $t
set f [open [lindex $argv 0] w]
puts $f "to the file"
close $f
puts "stdout still written \u00e9"
milter main
"""


@needs_thread
def test_a_thread_that_closes_stdout_closes_its_channel_not_the_descriptor(tmp_path) -> None:
    """A thread that closes its stdout, stderr and stdin, then a file the script opens: the
    process goes on, the thread's interpreter has no stdout any more (as after `close stdout`
    in tclsh), another interpreter of that thread and the script's thread still write on
    descriptor 1 (before: Tcl closed the process's descriptors; after `close stdout` alone the
    file opened got descriptor 1, was named `file1` as the script's stdout is, and Tcl aborted,
    `Tcl_RegisterChannel: duplicate channel names`; after all three, status 1 and nothing
    written, not even the log)."""
    script = tmp_path / "closed.tcl"
    script.write_text(CLOSED_IN_A_THREAD_TCL)
    written = tmp_path / "file.txt"
    done = subprocess.run([*PYTCLMILTER, "check", str(script), "--", str(written)], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert 'in the thread: can not find channel named "stdout"\nits interpreter: 1\n' in done.stderr, done.stderr
    assert done.stdout.startswith("stdout still written \u00e9\n"), done.stdout
    assert written.read_text() == "to the file\n"


ENDING_AS_PYTHON_ENDS_TCL = r"""
package require TclMilter
package require Thread
for {set i 0} {$i < 150} {incr i} {
    thread::create "after [expr {$i * 3}]; puts -nonewline {thread $i}"
}
milter main
"""


@needs_thread
@pytest.mark.parametrize("command", ["check", "try"])
def test_threads_that_end_as_the_process_ends_cannot_crash_it(tmp_path, command) -> None:
    """150 threads that each write a piece and end, 3 ms apart, while the command ends: it exits
    0, three times out of three, its own output whole (before: a thread calling Python as it
    finalized, to write or at its end, killed the process with SIGSEGV, SIGBUS or SIGILL in 14
    `check` runs of 15, 3 `try` runs of 5). Threads still running at the end write no more."""
    script = tmp_path / "ending.tcl"
    script.write_text(ENDING_AS_PYTHON_ENDS_TCL)
    message = tmp_path / "m.eml"
    message.write_text("From: a@example.com\nSubject: s\n\nbody\n")
    words = [str(script)] if command == "check" else [str(script), str(message)]
    for _ in range(3):
        done = subprocess.run([*PYTCLMILTER, command, *words], env=child_env(), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert ("callbacks: none registered" if command == "check" else "Subject: s") in done.stdout, done.stdout
        assert all(re.fullmatch(r"thread \d+", line) for line in done.stdout.splitlines()
                   if line.startswith("thread")), done.stdout


def test_puts_returns_nothing_as_tcls_own(tmp_path) -> None:
    """`puts` returns an empty string, as Tcl's (before: `1` for a `puts -nonewline` of a
    line held, `0` or the open line's length before that)."""
    script = tmp_path / "result.tcl"
    script.write_text("package require TclMilter\n"
                      'foreach words {{-nonewline \u00e9} {-nonewline x} {\u00e9} {x} {stderr x}} {\n'
                      '    lappend results <[puts {*}$words]>\n'
                      '}\n'
                      'puts stderr "results: $results"\nmilter main\n')
    done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert "results: <> <> <> <> <>\n" in done.stderr, done.stderr


NONBLOCKING_TCL = r"""
package require TclMilter
fconfigure stdout -blocking 0
for {set i 0} {$i < 2000} {incr i} { puts "line $i \u00e9 [string repeat x 100]" }
puts stderr "printed all"
gets stdin
puts "again \u00e9"
milter main
"""


def test_puts_to_a_non_blocking_stdout_its_reader_stuck_loses_lines_counted_never_waits(tmp_path) -> None:
    """A script that made stdout non-blocking (`fconfigure stdout -blocking 0`, so as never to
    wait for its reader) `puts` 2 000 lines of 110 bytes into a pipe nobody reads: the script
    goes on (before: pytclmilter waited in select() for the reader, for ever, the milter held);
    the lines the pipe had no room for are lost, with a warning, and once the reader drained
    it, the next line is written and the count of those lost logged."""
    script = tmp_path / "nonblocking.tcl"
    script.write_text(NONBLOCKING_TCL)
    proc = subprocess.Popen([*PYTCLMILTER, "check", str(script)], env=child_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        first = proc.stderr.readline().decode() if ready else ""
        while ready and first.startswith("20"):  # (a log line of ours: the warning)
            first = proc.stderr.readline().decode()
        assert first == "printed all\n", first
        os.set_blocking(proc.stdout.fileno(), False)
        read = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(proc.stdout.fileno(), 65536):
                read += chunk
        os.set_blocking(proc.stdout.fileno(), True)
        proc.stdin.write(b"go\n")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    printed = (read + out).decode().splitlines()
    shown = [line for line in printed if line.startswith("line ")]
    assert 0 < len(shown) < 2000 and printed[len(shown)] == "again \u00e9", printed[len(shown) - 1:][:3]
    lost = re.search(r"WARNING: (\d+) lines of the script's puts to stdout were lost", err.decode())
    assert lost and int(lost[1]) == 2000 - len(shown), err.decode()[-800:]


def test_lines_a_non_blocking_stdout_lost_are_told_at_the_end_if_none_got_through_after(tmp_path) -> None:
    """The lines lost on a non-blocking stdout were counted, and the count logged when a line
    got through again: a script that wrote no more after its reader drained the pipe ended with
    the warning of the first loss alone, its count never told. Now the process's end tells it."""
    script = tmp_path / "nonblocking.tcl"
    script.write_text(NONBLOCKING_TCL.replace('puts "again \\u00e9"\n', ""))
    proc = subprocess.Popen([*PYTCLMILTER, "check", str(script)], env=child_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    try:
        began = b""
        while b"printed all" not in began and select.select([proc.stderr], [], [], 30)[0]:
            began += proc.stderr.read1(65536) or b"(the end)"
        assert b"printed all" in began, began
        out, err = proc.communicate(b"go\n", timeout=30)
    finally:
        proc.kill()
    shown = [line for line in out.decode().splitlines() if line.startswith("line ")]
    assert 0 < len(shown) < 2000, len(shown)
    lost = re.findall(r"WARNING: (\d+) lines of the script's puts to stdout were lost", err.decode())
    assert lost == [str(2000 - len(shown))], err.decode()[-800:]


#: 20 000 lines of printable ASCII, and what Tcl's channel holds then.
NONBLOCKING_ASCII_TCL = NONBLOCKING_TCL.replace("2000", "20000").replace(
    r" \u00e9 [string repeat x 100]", " [string repeat x 1000]").replace(
    '"printed all"', '"pending: [chan pending output stdout]"')


def test_ascii_puts_to_a_non_blocking_stdout_its_reader_stuck_keeps_one_line_at_most(tmp_path) -> None:
    """20 000 lines of printable ASCII (the lines Tcl's own `puts` writes) to a non-blocking
    stdout, a pipe nobody reads: Tcl's channel keeps one line at most, the others are lost,
    counted (before: Tcl kept every line the pipe had no room for, 20 MB, without a bound)."""
    script = tmp_path / "nonblocking.tcl"
    script.write_text(NONBLOCKING_ASCII_TCL)
    read, write = os.pipe()
    try:
        done = subprocess.run([*PYTCLMILTER, "check", str(script)], env=child_env(), stdin=subprocess.DEVNULL,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(read)
        os.close(write)
    pending = re.search(r"^pending: (\d+)$", done.stderr, re.M)
    assert pending and int(pending[1]) < 4096, done.stderr[-1000:]
    assert "WARNING: stdout is non-blocking (fconfigure stdout -blocking 0)" in done.stderr, done.stderr[-1000:]


WORKERS_PUTS_TCL = r"""
package require TclMilter
proc from {ctx argv} {
    set sender [lindex $argv 0]
    puts stderr "from: $sender"
    puts -nonewline stderr "built: "; puts -nonewline stderr $sender; puts stderr ""
    if {![info exists ::held]} { set ::held 1; puts -nonewline "held by [pid]" }
    return SMFIS_CONTINUE
}
milter register envfrom from
milter main
"""


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    """Until ``proc``, a `pytclmilter run` on 127.0.0.1:``port``, takes connections."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)


def test_puts_of_two_workers_on_one_pipe_cannot_start_a_line_with_the_senders_text(tmp_path) -> None:
    """--workers 2 on one stderr pipe, as under systemd, 200 messages four at a time from a
    sender of 2 000 `é` ending in `ERROR: forged`, printed by a `puts` and by `puts -nonewline`
    pieces: every line read is one of ours or starts with the script's own text, whole (before:
    the other worker's line came between two writes of one: `built: ` alone on a line, or twice
    on one, and lines that began with the sender, `<ééé`); and the line
    each worker left open on stdout is written at the stop, ended (before: the two on one
    line)."""
    script = tmp_path / "workers.tcl"
    script.write_text(WORKERS_PUTS_TCL)
    sender = "<" + "\u00e9" * 2000 + "ERROR: forged@example.org>"  # (a line in one write: no fold)
    port = free_port()
    proc = subprocess.Popen([*PYTCLMILTER, "run", str(script), "--workers", "2", "--connection",
                             f"inet:{port}@127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env())
    read: dict[str, bytes] = {}
    reading = threading.Thread(target=lambda: read.update(zip(("out", "err"), proc.communicate(timeout=90))))
    reading.start()  # (the pipes drained all along: a full one would hold the workers)
    try:
        wait_listening(proc, port)
        sent = subprocess.run([*PYTCLMILTER, "send", "-c", f"inet:{port}@127.0.0.1", "--from", sender, "--count",
                               "200", "--concurrency", "4", str(DATA / "plain.eml")],
                              capture_output=True, text=True, timeout=60, env=child_env())
        assert "verdicts: accept=200" in sent.stdout, sent.stdout + sent.stderr
    finally:
        proc.terminate()
        reading.join(60)
    out, err = read["out"], read["err"]
    lines = err.decode().split("\n")
    for line in lines:
        assert not line or STDERR_LINE.match(line) or line.startswith(("from: <", "built: <")), line[:40]
    assert lines.count("from: " + sender) == lines.count("built: " + sender) == 200, [line[:40] for line in lines]
    held = out.decode().splitlines()[1:]  # (after the listening line)
    assert 1 <= len(held) <= 2 and all(re.fullmatch(r"held by \d+", line) for line in held), held


@pytest.fixture
def syslog_socket(tmp_path, monkeypatch):
    """`pytclmilter run --syslog`'s logging set-up, with a datagram socket of the test's own as
    /dev/log; the root logger and logging's settings restored afterwards."""
    from pytclmilter.commands import logs

    path = tmp_path / "log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(path))
    root = logging.getLogger()
    kept = list(root.handlers), root.level, logging.getLogRecordFactory()
    logs.setup_logging("info", syslog=True)
    try:
        yield sock
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level, factory = kept
        root.setLevel(level)
        logging.setLogRecordFactory(factory)
        logline.set_sink(None)
        sock.close()


def test_mta_and_script_text_is_escaped_through_syslog(syslog_socket) -> None:
    """--syslog: the same escapes in each datagram (a client host name, a sender, a reply text,
    a header value in a Python exception, with a NUL), and the traceback's lines indented."""
    from pytclmilter import CONTINUE, REJECT
    from support.engine import make_milter, serving, z

    m = make_milter()

    @m.register("envfrom")
    def envfrom(ctx, args):
        if args[0].startswith("<reject"):
            ctx.setreply("550", "5.7.1", "no\t\\ thanks")
            return REJECT
        return CONTINUE

    @m.register("header")
    def header(ctx, name, value):
        raise ValueError(f"bad header value: {value}\0")

    with serving(m) as srv, srv.raw() as mta:
        assert mta.connect(host=HOST) == (b"c", b"")
        assert mta.command(b"M", z(SENDER))[0] == b"y"
        assert mta.mail("<ok@example.org>") == (b"c", b"")
        assert mta.rcpt() == (b"c", b"")
        mta.send(b"L", z("X-Bad", VALUE))  # no reply: the MTA offered SMFIP_NR_HDR
        assert mta.eom() == [(b"t", b"")]
    records = []
    while not any("stopped; verdicts" in r for r in records):
        data, _ = syslog_socket.recvfrom(65536)
        assert data.startswith(b"<") and data.endswith(b"\0")
        records.append(data[:-1].decode())
    for record in records:
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", record), record
        assert all(line.startswith(" ") for line in record.split("\n")[1:]), record
    assert f'<22>pytclmilter[{os.getpid()}]: INFO: conn#1: verdict reject at envfrom client="{HOST_SHOWN}[192.0.2.1]" ' \
           f'from="{SENDER_SHOWN}" {REPLY_SHOWN} gen=1' in records, records
    failed = next(r for r in records if "header callback" in r).split("\n")
    assert failed[0] == (f"<19>pytclmilter[{os.getpid()}]: ERROR: conn#1: header callback "
                         "test_mta_and_script_text_is_escaped_through_syslog.<locals>.header failed "
                         rf"(bad header value: {VALUE_SHOWN}\x00), answering SMFIS_TEMPFAIL:")
    assert failed[1] == "  Traceback (most recent call last):"
    # the message's LF is a line break of the traceback: the forged line is indented like the others
    assert failed[-2:] == [r"  ValueError: bad header value: v\r",
                           "  " + FORGED_SHOWN[4:] + r"\x1b[31m\x7f\x01\\\x00"], failed


def test_a_megabyte_error_reaches_syslog_cut_to_its_ends(syslog_socket) -> None:
    """A callback's error can quote what it was given (a body, a header) whole. Its record, about
    2 MB with the traceback, went to syslog as one datagram, which the kernel refuses (EMSGSIZE):
    the error was not logged at all. Now each overlong line keeps its two ends and says how much
    was left out, and the record fits a datagram."""
    from pytclmilter import CONTINUE
    from support.engine import make_milter, serving, z

    m = make_milter()

    @m.register("header")
    def header(ctx, name, value):
        raise ValueError("bad header: " + value * 100_000 + " (end)")

    with serving(m) as srv, srv.raw() as mta:
        assert mta.connect(host="mx.example.org") == (b"c", b"")
        assert mta.mail("<ok@example.org>") == (b"c", b"")
        assert mta.rcpt() == (b"c", b"")
        mta.send(b"L", z("X-Big", "0123456789"))
        assert mta.eom() == [(b"t", b"")]
    records = []
    while not any("stopped; verdicts" in r for r in records):
        data, _ = syslog_socket.recvfrom(1 << 20)
        records.append(data[:-1].decode())
    failed = next((r for r in records if "header callback" in r), None)
    assert failed is not None, [r[:200] for r in records]
    assert len(failed.encode()) < 64 * 1024, len(failed)
    first, *rest = failed.split("\n")
    left_out = 100_000 * 10 + len("bad header:  (end)")
    assert re.fullmatch(rf"<19>pytclmilter\[{os.getpid()}\]: ERROR: conn#1: header callback \S+ failed "
                        rf"\(bad header: (0123456789)+\d* \.\.\. \(\d+ characters left out\) \.\.\. \d*"
                        r"(0123456789)+ \(end\)\), answering SMFIS_TEMPFAIL:", first), first[:2000]
    assert rest[0] == "  Traceback (most recent call last):" and rest[-1].endswith("0123456789 (end)"), rest
    assert sum(int(n) for n in re.findall(r"\((\d+) characters left out\)", failed)) > 2 * (left_out - 2000)


def test_a_record_of_many_long_lines_keeps_the_first_and_the_last() -> None:
    log, stream, handler = make_logger("long")
    lines = [f"line {i} " + "y" * 5000 + f" {i} ends" for i in range(1000)]
    log.error("failed:\n%s", "\n".join(lines))
    handler.flush()
    out = stream.getvalue().rstrip("\n").split("\n")
    assert out[0] == "ERROR: failed:" and len(stream.getvalue()) < 64 * 1024
    assert re.fullmatch(r"  line 0 y+ \.\.\. \(\d+ characters left out\) \.\.\. y+ 0 ends", out[1]), out[1][:100]
    assert out[-1].startswith("  line 999 ") and out[-1].endswith(" 999 ends")
    cut = [line for line in out if "lines left out" in line]
    assert len(cut) == 1 and re.fullmatch(r"  \.\.\. \((\d+) lines left out\) \.\.\.", cut[0]), cut
    kept = [int(line.split()[1]) for line in out[1:] if line.startswith("  line ")]
    assert kept == sorted(kept) and len(kept) + int(re.findall(r"\d+", cut[0])[0]) == 1000


@pytest.mark.parametrize("text, shown", [
    ("plain <a@example.org> Ünïcödé", "plain <a@example.org> Ünïcödé"),
    ("cr\r lf\n esc\x1b nul\x00 del\x7f soh\x01 tab\t bs\\", r"cr\r lf\n esc\x1b nul\x00 del\x7f soh\x01 tab\t bs\\"),
    ("byte \udcff not UTF-8", r"byte \xff not UTF-8"),  # (as codec.text keeps it)
    ("c1 \x85 ls \u2028 bidi \u202e tag \U000e0041", r"c1 \u0085 ls \u2028 bidi \u202e tag \U000e0041"),
])
def test_the_escape_rule(text: str, shown: str) -> None:
    """logline.escape, as documented in logline's docstring: one line, unambiguous (a backslash
    is doubled), UTF-8 letters as they are."""
    assert logline.escape(text) == shown
    assert "\n" not in logline.escape(text) and logline.escape(text).isprintable()


def test_continuation_lines_are_escaped_and_indented() -> None:
    assert logline.escape_lines("boom\x1b\n    while executing\n\"x\\y\"") == \
        "  boom\\x1b\n    while executing\n  \"x\\\\y\""
    # the formatter's guard: controls escaped, backslashes left (escaped already), idempotent
    guarded = logline.guard("first\x1b\nTraceback\r\n  File \\x")
    assert guarded == "first\\x1b\n  Traceback\\r\n  File \\x" and logline.guard(guarded) == guarded


def test_both_paths_write_the_same_line_and_logging_guards_what_was_not_escaped(run_logging) -> None:
    """Escaped arguments (the contract of logline.info) give the same line on the direct path and
    through logging; a record whose call site forgot to escape (an ESC and an LF in an argument)
    is guarded by the formatter: the ESC escaped, the LF's line indented."""
    log, stream, handler, emitted = run_logging
    log.handlers[:] = [handler]
    sender = "<a\x1b[2J@x>\nINFO: forged"
    logline.info(log, "%s: from=%s", "conn#1", logline.escape(sender))
    handler.addFilter(lambda record: True)  # now logging's own path
    logline.info(log, "%s: from=%s", "conn#1", logline.escape(sender))
    log.info("%s: from=%s", "conn#1", sender)
    assert len(emitted) == 2
    lines = stream.getvalue().splitlines()
    assert lines[0] == lines[1] and lines[0].endswith(r" INFO: conn#1: from=<a\x1b[2J@x>\nINFO: forged")
    assert lines[2].endswith(r" INFO: conn#1: from=<a\x1b[2J@x>") and lines[3] == "  INFO: forged"


def test_a_verdict_line_quoting_fifty_kilobytes_is_cut_to_its_ends_on_both_paths(run_logging) -> None:
    """The direct path wrote its escaped arguments at any length: a sender or a multi-line reply
    text of tens of kilobytes made a line as long, once a message, where a record is bounded."""
    log, stream, handler, emitted = run_logging
    log.handlers[:] = [handler]
    sender = "<" + "s" * 50_000 + "@example.org>"
    logline.info(log, "%s: verdict accept at eom from=%s gen=1", "conn#1", logline.escape(sender))
    handler.addFilter(lambda record: True)  # now logging's own path
    logline.info(log, "%s: verdict accept at eom from=%s gen=1", "conn#1", logline.escape(sender))
    assert len(emitted) == 1
    direct, through_logging = stream.getvalue().splitlines()
    assert direct == through_logging and len(direct) < 1000, len(direct)
    assert re.fullmatch(r".* INFO: conn#1: verdict accept at eom from=<s+ \.\.\. \(\d+ characters left out\) "
                        r"\.\.\. s+@example\.org> gen=1", direct), direct


# `pytclmilter run` as the command line runs it, with its syslog socket (/dev/log) the test's own.
RUN_WITH_SYSLOG_AT = ("import sys; from pytclmilter.commands import logs; logs.SYSLOG_SOCKET = sys.argv[1]; "
                      "from pytclmilter.cli import main; sys.exit(main(sys.argv[2:]))")


def test_a_syslog_that_takes_no_more_lines_never_blocks_the_milter(syslog_socket, capsys) -> None:
    """A syslog daemon that stops reading (stuck on a full disk, say) fills /dev/log's queue;
    the next line's send then waited for it, and with it the event loop: measured, a filter
    behind such a syslog answered 30 messages in 40 s, each MTA connection timing out. Lines
    that find the queue full are lost and counted, as while syslog is down."""
    from pytclmilter.commands import logs

    log = logging.getLogger("pytclmilter")
    done = threading.Event()

    def flood() -> None:
        for n in range(2000):
            log.info("verdict %d", n)
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    if not done.wait(10):  # read on, so that the logging lock the flood holds is let go
        syslog_socket.settimeout(1)
        with contextlib.suppress(OSError):
            while not done.is_set():
                syslog_socket.recv(65536)
        pytest.fail("logging blocked on a syslog that does not read")
    err = capsys.readouterr().err
    assert err == (f"pytclmilter: cannot log to {logs.SYSLOG_SOCKET}: it takes no more lines (its queue is full: "
                   "is the syslog daemon stuck?); log lines are lost (and counted) until it can be reached "
                   "again\n"), err
    syslog_socket.setblocking(False)
    delivered = 0
    with contextlib.suppress(BlockingIOError):
        while syslog_socket.recv(65536):
            delivered += 1
    assert 0 < delivered < 2000
    syslog_socket.settimeout(5)
    log.info("after")
    assert syslog_socket.recv(65536).endswith(b"INFO: after\0")
    assert syslog_socket.recv(65536).endswith(
        f"WARNING: {2000 - delivered} log lines were lost while {logs.SYSLOG_SOCKET} could not be reached\0".encode())


class Reader:
    """The reading end of the filter's stderr: a stream socket as systemd's journal gives, or a
    pipe as a supervisor or log collector gives, both with small buffers."""

    def __init__(self, kind: str) -> None:
        self._fifo = ""
        if kind == "socket":
            self._sock, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.fd, self.writer = self._sock.fileno(), writer.detach()
        elif kind == "pipe":
            self.fd, self.writer = os.pipe()
            fcntl.fcntl(self.writer, 1031, 4096)  # F_SETPIPE_SZ
        else:  # a named FIFO (`2>log.fifo`), where the kernel refuses RWF_NOWAIT
            self._fifo = path = os.path.join(tempfile.mkdtemp(), "log.fifo")
            os.mkfifo(path)
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            self.writer = os.open(path, os.O_WRONLY)
            fcntl.fcntl(self.writer, 1031, 4096)  # F_SETPIPE_SZ
        os.set_blocking(self.fd, False)

    def close_writer(self) -> None:
        os.close(self.writer)

    def read(self) -> bytes:
        """What is there now."""
        got = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 65536):
                got += chunk
        return got

    def close(self) -> None:
        os.close(self.fd)
        if self._fifo:
            os.unlink(self._fifo)
            os.rmdir(os.path.dirname(self._fifo))


@pytest.mark.parametrize("kind", ["socket", "pipe", "fifo"])
def test_a_journal_that_takes_no_more_lines_never_blocks_the_milter(tmp_path, kind) -> None:
    """Under systemd, stderr is a stream socket to journald; elsewhere it may be a pipe. A reader
    that stops reading (journald stuck or slow to restart) filled it, and the next log line's
    write waited, holding the event loop and every MTA connection: 3000 messages did not pass
    in 60 s. Now the lines wait in memory and go, whole and in order, once it reads again."""
    reader = Reader(kind)
    script = tmp_path / "s.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    port = free_port()
    proc = subprocess.Popen([*PYTCLMILTER, "run", str(script), "--connection", f"inet:{port}@127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=reader.writer, env=child_env())
    reader.close_writer()

    def send(count: int) -> str:  # (pytclmilter send: its report)
        return subprocess.run([*PYTCLMILTER, "send", "-c", f"inet:{port}@127.0.0.1", "--count", str(count),
                               "--concurrency", "4", "--timeout", "5", str(DATA / "plain.eml")],
                              capture_output=True, text=True, timeout=60, env=child_env()).stdout

    got = b""
    try:
        wait_listening(proc, port)
        assert "verdicts: accept=3000" in send(3000)  # the reader reads nothing meanwhile
        deadline = time.monotonic() + 30
        while b"conn#3001: verdict" not in got and time.monotonic() < deadline:  # it reads again
            got += reader.read()
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(10)
        reader.close()
    lines = got.decode().splitlines()
    verdicts = [int(m.group(1)) for line in lines if (m := re.search(r" INFO: conn#(\d+): verdict accept", line))]
    assert sorted(verdicts) == list(range(2, 3002)), verdicts[-5:]  # every one once (conn#1: the look for the socket)
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines), "a line was cut"


def test_a_journal_socket_holds_back_a_bounded_backlog_and_counts_the_lines_lost(monkeypatch) -> None:
    """Beyond STDERR_BACKLOG, whole lines are lost (never half a line), and once the reader has
    taken what waited, the count of those lost is logged."""
    from pytclmilter.commands import logs

    monkeypatch.setattr(logs, "STDERR_BACKLOG", 3000)
    journal, stderr = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stderr.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    journal.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with journal, stderr, os.fdopen(os.dup(stderr.fileno()), "w", encoding="utf-8", errors="backslashreplace") as stream:
        handler = CoalescingStreamHandler(stream)
        assert handler.nowait is not None
        handler.setFormatter(LineFormatter(STDERR_FORMAT))
        log = logging.getLogger("test-journal")
        log.propagate = False
        log.addHandler(handler)
        try:
            for n in range(2000):
                log.warning("line %04d %s", n, "x" * 60)
            journal.setblocking(False)
            got = b""
            for _ in range(50):  # it reads again; the next line takes what waited
                with contextlib.suppress(BlockingIOError):
                    while chunk := journal.recv(65536):
                        got += chunk
                if b"were lost" in got:
                    break
                log.warning("again")
        finally:
            log.removeHandler(handler)
    lines = got.decode().splitlines()
    numbers = [int(m.group(1)) for line in lines if (m := re.search(r"WARNING: line (\d{4}) x{60}$", line))]
    assert all(re.search(r"WARNING: (line \d{4} x{60}|again|\d+ log lines were lost .*)$", line) for line in lines), lines
    assert numbers == sorted(numbers) and numbers[0] == 0
    lost = re.search(r"WARNING: (\d+) log lines were lost while stderr took no more", got.decode())
    assert lost and int(lost.group(1)) == 2000 - len(numbers), (lost, len(numbers))


def _run_with_syslog(tmp_path: Path, *args: str, stderr: str = "pipe", option: bool = True,
                     env: dict[str, str] | None = None,
                     timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``pytclmilter run ARGS --syslog`` (without the option if not ``option``) to its end, with
    /dev/log a socket of the test's own: the process and the records syslog got (without their
    NUL). ``stderr``: "pipe" (read into the process's stderr), "null" (/dev/null) or "closed"."""
    log_path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(log_path))
        proc = subprocess.run([sys.executable, "-c", RUN_WITH_SYSLOG_AT, str(log_path), "run", *args,
                               *["--syslog"] * option],
                              env=child_env(env), stdout=subprocess.PIPE, text=True, timeout=timeout,
                              stderr=subprocess.DEVNULL if stderr == "null" else subprocess.PIPE,
                              preexec_fn=(lambda: os.close(2)) if stderr == "closed" else None)
        sock.setblocking(False)
        records = []
        with contextlib.suppress(BlockingIOError):
            while True:
                records.append(sock.recv(65536)[:-1].decode())
    return proc, records


@pytest.mark.parametrize("stderr", ["closed", "null"])
def test_with_syslog_a_stderr_that_cannot_take_a_crash_dump_is_said_once(tmp_path, stderr) -> None:
    """A crash's dump (faulthandler) goes to stderr alone. With stderr closed, enabling it raised
    and run ended, exit 1, with not a line anywhere; with stderr /dev/null the dump of a crash
    would be lost and nothing said so. Now run serves, and the log says it once."""
    script = tmp_path / "s.tcl"
    script.write_text("after 300 {milter stop}\nmilter main\n")
    proc, records = _run_with_syslog(tmp_path, str(script), "--connection", "inet:0@127.0.0.1", stderr=stderr)
    assert proc.returncode == 0, (proc.stdout, records)
    why = "stderr cannot take it (sys.stderr is None); start pytclmilter with stderr open, to the journal or a file" \
        if stderr == "closed" else "stderr is /dev/null; send it to the journal or a file (2>>/var/log/pytclmilter.err)"
    warnings = [r for r in records if "WARNING" in r and ROOT_WARNING not in r]
    assert len(warnings) == 1 and warnings[0].endswith("WARNING: a crash (SIGSEGV, SIGABRT, ...) would leave no dump "
                                                       f"of where each thread was: {why}"), records
    assert "listening on" in proc.stdout


def test_with_stderr_closed_run_logs_to_syslog_and_says_why(tmp_path) -> None:
    """An init system's daemon started with stderr closed (2>&-) and no --syslog: the first log
    line raised (sys.stderr is None), and run ended, exit 1, with not a word anywhere. Now it logs
    to syslog instead, as a milter such as OpenDKIM does, its first line saying why, and serves."""
    script = tmp_path / "s.tcl"
    script.write_text("after 300 {milter stop}\nmilter main\n")
    proc, records = _run_with_syslog(tmp_path, str(script), "--connection", "inet:0@127.0.0.1", stderr="closed",
                                     option=False)
    assert proc.returncode == 0, (proc.stdout, records)
    assert "listening on" in proc.stdout
    assert records and re.fullmatch(r"<20>pytclmilter\[\d+\]: WARNING: stderr is closed: logging to syslog "
                                    rf"\({re.escape(str(tmp_path / 'log'))}, facility mail\) instead; start "
                                    r"pytclmilter with --syslog, or with stderr open \(to the journal or a file\)",
                                    records[0]), records
    assert any("TclMilter stopped; verdicts:" in r for r in records), records


def test_with_stderr_closed_and_no_syslog_run_ends_saying_why_on_stdout(tmp_path) -> None:
    """Nowhere to log at all (stderr closed, no /dev/log): run ends at once with the usage
    status and the reason on stdout, which an init script may keep; it was exit 1 and silence."""
    script = tmp_path / "s.tcl"
    script.write_text("milter main\n")
    missing = tmp_path / "no-log"
    proc = subprocess.run([sys.executable, "-c", RUN_WITH_SYSLOG_AT, str(missing), "run", str(script),
                           "--connection", "inet:0@127.0.0.1"], env=child_env(), stdout=subprocess.PIPE, text=True,
                          timeout=60, preexec_fn=lambda: os.close(2))
    assert proc.returncode == 64, proc.stdout
    assert proc.stdout == (f"pytclmilter run: stderr is closed, and syslog cannot take the log instead: {missing} "
                           "does not exist (is a syslog daemon running?)\n"), proc.stdout


@pytest.mark.parametrize("why", ["script", "usage", "hooks", "callback", "no main"])
def test_with_syslog_the_reason_run_ends_is_in_the_log_too(tmp_path, why) -> None:
    """--syslog: a start that fails (a socket it cannot make, an unknown --user) logs why, with
    errorInfo; before, the reason went to stderr alone, which an init script's daemon sends
    nowhere, and the mail log ended at the "hot path" line."""
    script = tmp_path / "s.tcl"
    script.write_text("milter register eom no_such_proc\n" * (why == "callback") + "milter main\n" * (why != "no main"))
    where = f"{tmp_path}/missing/m.sock"
    options = ["--user", "no-such-user"] if why == "usage" else []
    hooks = tmp_path / "hooks.py"
    if why == "hooks":  # a --python file whose setup raises
        hooks.write_text("def setup(milter):\n    raise RuntimeError('store\\nunreachable')\n")
        options = ["--python", str(hooks)]
    proc, records = _run_with_syslog(tmp_path, str(script), "--connection", f"unix:{where}", *options)
    pid = r"pytclmilter\[\d+\]"
    if why == "usage":
        assert proc.returncode == 64, proc.stderr
        assert any(re.fullmatch(rf'<19>{pid}: ERROR: exiting: pytclmilter run: --user: no such user '
                                r'"no-such-user"', r) for r in records), records
        return
    assert proc.returncode == 1, proc.stderr
    failed = next((r for r in records if "ERROR: exiting:" in r), None)
    if why == "hooks":
        assert failed is not None, records
        lines = failed.split("\n")
        assert re.fullmatch(rf"<19>{pid}: ERROR: exiting: pytclmilter run: --python {re.escape(str(hooks))}: "
                            r"RuntimeError: store\\nunreachable", lines[0]), lines
        assert lines[1:3] == ["  Traceback (most recent call last):", f'  File "{hooks}", line 2, in setup'], lines
        return
    assert failed is not None, records
    if why == "no main":  # the script ran to its end: nothing served, and the log says why
        assert re.fullmatch(rf"<19>{pid}: ERROR: exiting: {re.escape(str(script))}: error: the script never "
                            r"calls milter main \(nothing was served\)", failed), failed
        return
    if why == "callback":  # refused before listening, as `pytclmilter check` reports it
        assert re.fullmatch(rf'<19>{pid}: ERROR: exiting: {re.escape(str(script))}: error: eom callback '
                            r'"no_such_proc": invalid command name "no_such_proc"', failed), failed
        return
    lines = failed.split("\n")
    missing = re.escape(os.path.dirname(where))
    assert re.fullmatch(rf"<19>{pid}: ERROR: exiting: milter main: cannot listen on unix:{re.escape(where)}: "
                        rf"its directory {missing} does not exist: make it first \(owned by the --user user, "
                        rf"if any: install -d -o USER -m 0750 {missing}\)", lines[0]), lines
    assert lines[1:3] == ["    while executing", '  "milter main"'], lines  # errorInfo, indented


#: A --python file's bug that nothing in pytclmilter catches: a BaseException of its own (not an
#: Exception, not sys.exit), its message with an ESC and a line break, raised by its signal
#: handler while the loop serves (asyncio's loop lets it out of run_forever; uvloop logs it and
#: serves on). Raised by its import or setup it fails the load, by a callback it closes that
#: connection.
UNCAUGHT = """import os
import signal
import threading


class Fault(BaseException):
    pass


def fault(signum, frame):
    raise Fault("store\\x1b[31m\\ngone")


def setup(milter):
    signal.signal(signal.SIGUSR2, fault)

    def when_serving():
        if milter.running:
            os.kill(os.getpid(), signal.SIGUSR2)
        else:
            threading.Timer(0.05, when_serving).start()

    when_serving()
"""


def _logged_by_a_python_file(tmp_path: Path, script: str, hooks: str, status: int, marker: str,
                             env: dict[str, str] | None = None) -> tuple[list[str], str, list[str]]:
    """run --syslog of ``script`` with ``hooks`` as its --python file, ending with ``status``: the
    lines of the record that holds ``marker``, stderr, and every record."""
    (tmp_path / "s.tcl").write_text(script)
    (tmp_path / "hooks.py").write_text(hooks)
    proc, records = _run_with_syslog(tmp_path, str(tmp_path / "s.tcl"), "--python", str(tmp_path / "hooks.py"),
                                     "--connection", "inet:0@127.0.0.1", env=env)
    assert proc.returncode == status, proc.stderr
    record = next((r for r in records if marker in r), None)
    assert record is not None, records
    return record.split("\n"), proc.stderr, records


def test_with_syslog_an_unexpected_error_that_ends_run_is_logged_with_its_traceback(tmp_path) -> None:
    """An exception nothing handled ended run with Python's traceback on stderr alone (and its
    text unescaped): under an init script's daemon, stderr goes nowhere, and the mail log stopped
    at the "hot path" line. Now syslog gets it, escaped, its traceback indented; stderr still
    has it, and the status is still 1."""
    lines, stderr, _ = _logged_by_a_python_file(tmp_path, "milter main\n", UNCAUGHT, 1, "unexpected error",
                                                env={"PYTCLMILTER_LOOP": "asyncio"})
    hooks = tmp_path / "hooks.py"
    assert re.fullmatch(r"<19>pytclmilter\[\d+\]: ERROR: exiting: unexpected error: Fault: store\\x1b\[31m\\ngone", lines[0]), lines
    assert lines[1] == "  Traceback (most recent call last):", lines
    assert f'  File "{hooks}", line 11, in fault' in lines, lines
    assert lines[-2:] == [r"  pytclmilter_hooks_hooks.Fault: store\x1b[31m", "  gone"], lines
    assert all(line.startswith(" ") and "\x1b" not in line for line in lines[1:]), lines
    # (stderr too is a log, the journal's: its lines after the first indented as continuation lines)
    assert stderr.startswith("pytclmilter run: unexpected error\n  Traceback (most recent call last):\n"), stderr
    assert stderr.endswith("  pytclmilter_hooks_hooks.Fault: store\\x1b[31m\n  gone\n"), stderr


THREAD_DIES = ("import threading\n\n\ndef poll():\n    raise ValueError('redis\\x1b[2J down')\n\n\n"
               "def setup(milter):\n    t = threading.Thread(target=poll, name='poller')\n    t.start()\n    t.join()\n")
DEL_RAISES = ("class Handle:\n    def __del__(self):\n        raise OSError('socket\\x1b[2J gone')\n\n\n"
              "def setup(milter):\n    Handle()\n")
STR_RAISES = ("import threading\n\n\nclass Fault(Exception):\n    def __str__(self):\n"
              "        raise RuntimeError('no text')\n\n\ndef poll():\n    raise Fault()\n\n\n"
              "def setup(milter):\n    t = threading.Thread(target=poll, name='poller')\n    t.start()\n    t.join()\n")


@pytest.mark.parametrize("hooks, marker, first, last, printed", [
    (THREAD_DIES, "in thread", r"unexpected error in thread poller: ValueError: redis\\x1b\[2J down",
     r"  ValueError: redis\x1b[2J down", "Exception in thread poller:"),
    (DEL_RAISES, "ignored", r"unexpected error, ignored: Exception ignored in: <function Handle.__del__ at "
     r"0x[0-9a-f]+>: OSError: socket\\x1b\[2J gone", r"  OSError: socket\x1b[2J gone", "Exception ignored in"),
    (STR_RAISES, "in thread", r"unexpected error in thread poller: Fault: <exception str\(\) failed>",
     "  pytclmilter_hooks_hooks.Fault: <exception str() failed>", "Exception in threading.excepthook"),
], ids=["a thread dies", "an exception Python cannot raise", "its exception's __str__ raises"])
def test_with_syslog_an_error_nothing_can_raise_is_logged_with_its_traceback(tmp_path, hooks, marker, first, last,
                                                                            printed) -> None:
    """A thread of a --python file that dies of an exception, an exception in a __del__ (Python
    cannot raise it): Python's report went to stderr alone. Now syslog gets it, escaped, and
    run serves on; Python's own report, raw (the ESC as it was), is no longer printed on stderr."""
    lines, stderr, records = _logged_by_a_python_file(tmp_path, "after 300 {milter stop}\nmilter main\n", hooks, 0,
                                                      marker)
    assert re.fullmatch(r"<19>pytclmilter\[\d+\]: ERROR: " + first, lines[0]), lines
    assert lines[1] == "  Traceback (most recent call last):" and lines[-1] == last, lines
    assert any("stopped; verdicts" in r for r in records), records  # it served on, and stopped
    assert printed not in stderr and "Traceback" not in stderr and "\x1b" not in stderr, stderr


REPEATS = ("import gc\nimport threading\n\n\ndef poll(i):\n    raise ValueError(f'redis\\x1b[2J down {i}')\n\n\n"
           "class Handle:\n    def __init__(self, i):\n        self.i = i\n\n    def __del__(self):\n"
           "        raise OSError(f'socket\\x1b[2J gone {self.i}')\n\n\n"
           "def setup(milter):\n    for i in range(5):\n"
           "        t = threading.Thread(target=poll, args=(i,), name=f'poller-{i}')\n        t.start()\n        t.join()\n"
           "        Handle(i)\n        gc.collect()\n")


# A collection that starts while the repeat counts' lock is held (the sweep's tell_counts takes
# it every second) finds a cycle whose __del__ raises: as a --python file's object made per
# message may be, whenever the collector happens to run there. (The lock is looked at only to
# make that moment come at once.)
DEL_IN_THE_LOCK = ("import gc\n\nfrom pytclmilter import repeats\n\n\nclass Handle:\n    def __init__(self):\n"
                   "        self.me = self\n\n    def __del__(self):\n        raise OSError('socket gone')\n\n\n"
                   "made = []\nlock = repeats._LOCK\nheld = getattr(lock, 'locked', None) or lock._is_owned  # (Lock, RLock)\n"
                   "\n\ndef garbage(phase, info):\n"
                   "    if phase == 'start' and not made and held():\n"
                   "        made.append(1)\n        Handle()\n\n\n"
                   "def setup(milter):\n    gc.callbacks.append(garbage)\n    gc.set_threshold(1)\n")


def test_an_error_nothing_can_raise_while_repeats_are_counted_is_logged_not_a_hang(tmp_path) -> None:
    """A __del__ that raises while the collector runs inside the repeat counts' lock: the hook
    counts it under that lock, and the serving thread waited on itself for ever (no verdict,
    no stop but SIGKILL or the overdue watch). Now it is logged and run stops as asked."""
    (tmp_path / "s.tcl").write_text("after 1500 {milter stop}\nmilter main\n")
    (tmp_path / "hooks.py").write_text(DEL_IN_THE_LOCK)
    proc, _ = _run_with_syslog(tmp_path, str(tmp_path / "s.tcl"), "--python", str(tmp_path / "hooks.py"),
                               "--connection", "inet:0@127.0.0.1", option=False)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: unexpected error, ignored: Exception ignored in: <function Handle.__del__" in proc.stderr
    assert "OSError: socket gone" in proc.stderr and "TclMilter stopped" in proc.stderr, proc.stderr


@pytest.mark.parametrize("syslog", [True, False], ids=["syslog", "stderr"])
def test_an_error_nothing_can_raise_that_repeats_is_logged_whole_once_then_counted(tmp_path, syslog) -> None:
    """A --python file's thread started per message, or an object made per message whose __del__
    raises, fails again and again: each failure was a traceback of its own (and with --syslog,
    Python's raw report on stderr too). Now the first is logged whole, escaped, the repeats
    counted and told in one line; stderr, if not the log, gets nothing."""
    (tmp_path / "s.tcl").write_text("after 300 {milter stop}\nmilter main\n")
    (tmp_path / "hooks.py").write_text(REPEATS)
    proc, records = _run_with_syslog(tmp_path, str(tmp_path / "s.tcl"), "--python", str(tmp_path / "hooks.py"),
                                     "--connection", "inet:0@127.0.0.1", option=syslog)
    assert proc.returncode == 0, proc.stderr
    if syslog:
        assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr
    else:
        assert "\x1b" not in proc.stderr, proc.stderr
        records = re.split(r"\n(?=\d{4}-)", proc.stderr.rstrip("\n"))
    for what, error in ((" in thread poller", r"ValueError: redis\\x1b\[2J down"),
                        (", ignored: Exception ignored in: <function Handle.__del__", r"OSError: socket\\x1b\[2J gone")):
        mine = [r for r in records if f"unexpected error{what}" in r]
        assert len(mine) == 2, records
        assert re.search(r"ERROR: unexpected error" + re.escape(what) + r".*: " + error + r" 0\n  Traceback", mine[0]), mine
        assert all(line.startswith("  ") for line in mine[0].split("\n")[1:]), mine[0]
        assert re.search(error + r" 4 \(repeated 4 times since its last line with the trace; logged once a minute\)$",
                         mine[1]), mine[1]


@pytest.mark.parametrize("stderr", ["open", "closed"])
def test_while_syslog_cannot_be_reached_stderr_says_so_once_and_the_loss_is_counted(
        syslog_socket, tmp_path, capsys, monkeypatch, stderr) -> None:
    """--syslog with its daemon gone (restarting, stopped): one line on stderr, not logging's
    traceback of some 18 lines for every log line (a verdict line a message); the first line
    that gets through again is followed by how many were lost. With stderr closed (2>&-:
    sys.stderr is None) that one line raised AttributeError out of the logging call, ending
    whatever logged (at start, run itself): now it is left out, and the lines counted alike."""
    from pytclmilter.commands import logs

    log = logging.getLogger("pytclmilter")
    log.info("before")
    assert syslog_socket.recv(65536).endswith(b"INFO: before\0")
    syslog_socket.close()
    os.unlink(tmp_path / "log")  # the syslog daemon is gone
    if stderr == "closed":
        monkeypatch.setattr(sys, "stderr", None)
    for n in range(3):
        log.info("lost %d", n)
    err = capsys.readouterr().err
    assert err == ("" if stderr == "closed" else f"pytclmilter: cannot log to {logs.SYSLOG_SOCKET}: No such file or "
                   "directory; log lines are lost (and counted) until it can be reached again\n"), err
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as back:  # ... and back
        back.bind(str(tmp_path / "log"))
        back.settimeout(5)
        log.info("after")
        assert back.recv(65536).endswith(b"INFO: after\0")
        assert back.recv(65536).endswith(
            f"WARNING: 3 log lines were lost while {logs.SYSLOG_SOCKET} could not be reached\0".encode())
    assert capsys.readouterr().err == ""


def test_a_quote_in_a_sender_or_reply_cannot_make_fields_of_the_verdict_line(caplog):
    """The verdict line is key=value fields. A sender such as `<a" verdict=accept x="@b>` (SMTP
    allows quotes and spaces in a quoted local part) or a reply text with a quote made fields of
    its own: a log parser read `verdict=accept`. Values with a space or a quote are now quoted,
    their quotes escaped."""
    from pytclmilter import REJECT
    from support.engine import InProcessMTA, make_milter, z

    caplog.set_level(logging.INFO, logger="pytclmilter")
    m = make_milter()

    def envfrom(ctx, args):
        ctx.setreply("550", "5.7.1", 'no" verdict=accept x="y')
        return REJECT

    m.register("envfrom", envfrom)
    mta = InProcessMTA(m)
    mta.optneg()
    assert mta.connect(host="client example") == [(b"c", b"")]
    assert mta.command(b"M", z('<a" verdict=accept x="@b>'))[0][0] == b"y"
    (line,) = [r.getMessage() for r in caplog.records if " verdict " in r.getMessage()]
    assert line == (r'conn#1: verdict reject at envfrom client="client example[192.0.2.1]" '
                    r'from="<a\" verdict=accept x=\"@b>" reply="550 5.7.1 no\" verdict=accept x=\"y" gen=1'), line
    fields = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)
    assert [key for key, _ in fields] == ["client", "from", "reply", "gen"], fields


def test_a_failure_that_recurs_is_logged_whole_once_then_counted_once_a_minute() -> None:
    """repeats.Repeated, which keeps a failing `after` loop (test_tcl_runtime.py) from flooding
    the log: log the first whole, count the rest, log the count with the first one a minute on."""
    now = [100.0]
    repeated = repeats.Repeated(60.0, keep=3, clock=lambda: now[0])
    assert repeated.due("tick") == 0  # the first: logged whole
    for _ in range(46):
        now[0] += 0.05
        assert repeated.due("tick") is None  # counted
    assert repeated.due("other") == 0  # another place is its own
    now[0] = 160.5
    assert repeated.due("tick") == 46  # a minute on: logged, with the count
    now[0] += 1
    assert repeated.due("tick") is None
    now[0] += 120  # quiet for longer than a minute after a lone repeat: the count first
    assert repeated.due("tick") == 1
    now[0] += 120  # and, nothing counted since, whole again
    assert repeated.due("tick") == 0
    for place in ("a", "b", "c"):  # at most `keep` places remembered: the oldest goes
        assert repeated.due(place) == 0
    assert repeated.due("tick") == 0  # forgotten, so whole again (within its minute)
    assert repeated.due("c") is None  # still remembered


def test_a_copy_of_the_greylist_example_still_imports_repeated_from_logline() -> None:
    """The greylist example imported Repeated from logline before it had a module of its own
    (repeats.py), and users run copies of it as their --python file: that import still works."""
    from pytclmilter.logline import Repeated

    assert Repeated is repeats.Repeated


def test_a_fault_that_recurs_is_logged_whole_n_times_a_window_and_its_count_told_when_it_ends() -> None:
    """repeats.Repeated with ``whole``, as the lines of connections ended by a fault use it: the
    first ``whole`` of a place in a window logged, the rest counted; overdue() tells the count once
    the window is over even if no fault comes again (before, only the next fault told it)."""
    now = [100.0]
    repeated = repeats.Repeated(60.0, clock=lambda: now[0], whole=3)
    assert [repeated.due("garbled") for _ in range(5)] == [0, 0, 0, None, None]
    assert repeated.due("reset") == 0  # a kind of its own
    now[0] += 59
    assert repeated.overdue() == []  # the window is not over
    now[0] += 1
    assert repeated.overdue() == [("garbled", 2)]
    assert repeated.overdue() == []  # told once
    assert [repeated.due("garbled") for _ in range(4)] == [0, 0, 0, None]  # a new window
    assert repeated.overdue(ended_only=False) == [("garbled", 1)]  # at the end: whatever is counted
    now[0] += 60
    assert repeated.due("garbled") == 0  # nothing left to tell: whole


def test_counts_no_failure_came_to_carry_are_told_once_their_window_is_over_or_at_the_end() -> None:
    """repeats.tell_counts, which the server's sweep calls every second or so: a Repeated's count
    was told only by its next failure, so the last window of a failure that stopped (HAProxy's
    send-proxy fixed, a failing timer's script reloaded) was never told. Now its ``tell`` says
    it once the window is over, once, by the label of the last failure counted."""
    now = [100.0]
    said: list[tuple[str, int]] = []
    repeated = repeats.Repeated(60.0, clock=lambda: now[0], tell=lambda _r, label, count: said.append((label, count)))
    assert [repeated.due("tick", f"boom {n}") for n in range(4)] == [0, None, None, None]
    repeats.tell_counts()
    assert said == []  # its window is not over
    now[0] += 60
    repeats.tell_counts()
    repeats.tell_counts()
    assert said == [("boom 3", 3)]  # told once
    assert repeated.due("tick", "boom 4") == 0  # the next one is whole: nothing left to tell
    assert repeated.due("tick", "boom 5") is None
    repeats.tell_counts(ended_only=False)  # at a stop: whatever is counted
    assert said == [("boom 3", 3), ("boom 5", 1)]


def test_counts_of_places_forgotten_to_make_room_wait_for_at_most_keep_labels() -> None:
    """A place forgotten to make room keeps its count, by label, for the next tell_counts (about
    a second). Distinct labels that each recur, faster than that or while nothing calls it (a
    callback looping past the sweep), grew that store by one label each, without bound. At
    `keep` labels waiting, they are told at once: none lost, none held past `keep`."""
    now = [100.0]
    said: list[tuple[str, int]] = []
    repeated = repeats.Repeated(60.0, keep=3, clock=lambda: now[0], tell=lambda _r, label, count: said.append((label, count)))
    waiting = 0
    for n in range(1000):
        assert [repeated.due(f"place {n}"), repeated.due(f"place {n}")] == [0, None]
        waiting = max(waiting, len(repeated._forgotten))
    assert waiting <= 3
    assert len(said) >= 1000 - 3 - 3, len(said)  # told as they came, not at the next tell_counts
    repeats.tell_counts(ended_only=False)
    assert sorted(said) == sorted((f"place {n}", 1) for n in range(1000))


def test_a_worker_forked_while_another_thread_counts_can_count() -> None:
    """A Repeated is counted in the metrics' threads too, under one lock. A --workers fork while
    such a thread held it left the worker's copy held forever: the worker hung at its first
    fault. Now the fork waits for the lock (here held by a thread until after the fork began)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with repeats._LOCK:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    threading.Timer(0.2, release.set).start()  # (whenever it comes: the fork waits for it)
    pid = os.fork()
    if pid == 0:
        repeated = repeats.Repeated(tell=lambda _r, _label, _count: None)
        repeated.due("x")
        repeated.due("x")
        repeats.tell_counts(ended_only=False)
        os._exit(0)
    holder.join()
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung on the lock it was forked with")
        time.sleep(0.05)


def test_faults_of_one_kind_differ_only_in_the_mtas_bytes_and_numbers() -> None:
    """The kind of a fault is its message with the MTA's bytes (quoted by repr) and the numbers
    left out: a peer varying its bytes makes one kind, not one per byte value."""
    kinds = {repeats.fault_kind(f"protocol error: unknown command {chr(c)!r}") for c in range(256)}
    assert kinds == {"protocol error: unknown command '...'"}
    assert repeats.fault_kind(f"connect: {b'x' * 64 + bytes([39, 34, 92])!r} is not an INET6 address") == \
        "connect: '...' is not an INET6 address"
    assert repeats.fault_kind("packet of 9999999 bytes exceeds the limit of 65535") == \
        "packet of N bytes exceeds the limit of N"


#: A negotiate callback that asks for a macro list (whose names reach the debug line).
NEGOTIATING_TCL = r"""
package require TclMilter
proc negotiate {ctx version actions protocol} {
    $ctx setsymlist envfrom "{auth_authen} i"
    return SMFIS_CONTINUE
}
milter register negotiate negotiate
milter register envrcpt {apply {{ctx argv} { return SMFIS_CONTINUE }}}
milter main
"""


def test_the_debug_line_of_the_negotiation_names_the_flags_it_answered(tclrun) -> None:
    """--log-level debug's line of each connection's option negotiation ended in a Python repr,
    "answered OptionNegotiationReply(version=6, actions=511, protocol=...)", the flags as decimal
    numbers nothing in the manual uses. Now they are named as docs/protocol.md names them."""
    m = tclrun(NEGOTIATING_TCL, "--log-level", "debug")
    with m.mta() as mta:
        mta.negotiate_raw()
        assert mta.rcpt("<b@example.org>") == ("c", {})
    line = m.wait_for(r"DEBUG: conn#1: offered [^\n]*?\r?\n").group()
    assert line.rstrip().endswith(
        "DEBUG: conn#1: offered v6 actions 0x1ff protocol 0x1fffff; answered v6 actions ADDHDRS|CHGBODY|ADDRCPT|"
        "DELRCPT|CHGHDRS|QUARANTINE|CHGFROM|ADDRCPT_PAR|SETSYMLIST (0x1ff) protocol NOCONNECT|NOHELO|NOMAIL|"
        'NOBODY|NOHDRS|NOEOH|NOUNKNOWN|NODATA|SKIP (0x777) macro lists envfrom="{auth_authen} i"'), line
    assert m.stop() == 0


def _datagrams(sock: socket.socket) -> list[bytes]:
    """What was written to the other end of a datagram socket, one write a datagram."""
    sock.setblocking(False)
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(1 << 20))
    return got


def test_a_record_longer_than_pipe_buf_reaches_stderr_in_writes_of_whole_lines(tmp_path) -> None:
    """stderr a socket whose every write is a datagram, to see the writes: a background error
    with a long errorInfo (some 9 KB) was one write, past PIPE_BUF (4 096), inside which another
    writer's line (a thread's puts, another --workers process's log) could land on a pipe. Now
    every write is of whole lines and at most 4 096 bytes, and the lines are the record's."""
    script = tmp_path / "s.tcl"
    script.write_text('after 0 {error [string repeat "[string repeat x 700]\\n" 10]}\n'
                      "after 300 {milter stop}\nmilter main\n")
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with reader, writer:
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        proc = subprocess.run([*PYTCLMILTER, "run", str(script), "--connection", "inet:0@127.0.0.1"],
                              stderr=writer.fileno(), stdout=subprocess.PIPE, env=child_env(), timeout=60)
        writes = _datagrams(reader)
    assert proc.returncode == 0, writes
    assert all(len(w) <= 4096 and w.endswith(b"\n") for w in writes), [len(w) for w in writes]
    lines = b"".join(writes).decode().splitlines()
    start = next(i for i, line in enumerate(lines) if "ERROR: error in an event handler" in line)
    assert lines[start + 1:start + 11] == ["  " + "x" * 700] * 10, lines[start:start + 12]


@pytest.mark.parametrize("to", ["socket", "file"])
def test_a_line_longer_than_pipe_buf_is_folded_at_a_character(tmp_path, to) -> None:
    """A record's line can be longer than PIPE_BUF once escaped (780 C1 controls: 4 680 bytes;
    with 2-byte characters at a cut): it went out whole, in one write. Now it is folded as a
    script's `puts` is, on a socket or pipe each piece in a write of whole lines of at most
    4 096 bytes (a file too is folded: the same log wherever it goes), none cut inside a
    character, and joined again it gives the line back."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    target = os.dup(writer.fileno()) if to == "socket" else os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT)
    with reader, writer, os.fdopen(target, "w", encoding="utf-8") as stream:
        handler = CoalescingStreamHandler(stream)
        handler.setFormatter(LineFormatter("%(levelname)s: %(message)s"))
        log = logging.getLogger("test-fold")
        log.propagate = False
        log.addHandler(handler)
        try:
            log.error("%s", "x" + "\x85" * 680 + "é" * 10 + "\x85" * 100)
        finally:
            log.removeHandler(handler)
        writes = _datagrams(reader) if to == "socket" else [(tmp_path / "err").read_bytes()]
    if to == "socket":
        assert all(len(w) <= 4096 and w.endswith(b"\n") for w in writes), [len(w) for w in writes]
    lines = b"".join(writes).decode().splitlines()  # (a cut inside a character would not decode)
    assert len(lines) > 1 and all(line.startswith("  ") for line in lines[1:]), lines
    assert unfolded(lines) == ["ERROR: x" + "\\u0085" * 680 + "é" * 10 + "\\u0085" * 100], unfolded(lines)


THREAD_NO_BGERROR_TCL = r"""
package require Thread
set t [thread::create]
thread::send $t {after 0 break; after 0 continue; after 0 {return -code 7 x}}
thread::send $t update
thread::release $t
puts stderr done
"""


@needs_thread
def test_a_threads_after_break_without_bgerror_is_reported_as_by_tcl(tmp_path) -> None:
    """A thread's `after` handlers ending in break, continue or another code, without a
    `bgerror` proc: Tcl's report names the code (`invoked "break" outside of a loop`, `command
    returned bad code: 2`) above the handler's frame, as under tclsh (before: an empty line)."""
    ours, expected = _stderr_here_and_under_tclsh(tmp_path, THREAD_NO_BGERROR_TCL)
    assert len(expected) == 7 and ours == expected, (ours, expected)


# A collection that starts while output's lock is held (a `puts -nonewline` keeps its piece under
# it) finds a cycle whose __del__ writes with the script's `puts`, as a --python file's object that
# says goodbye may. (The lock is looked at only to make that moment come at once.)
PUTS_IN_THE_LOCK = ("import gc\n\nfrom pytclmilter.tcl import output\n\nmade = []\nfound = {}\n\n\n"
                    "class Handle:\n    def __init__(self):\n        self.me = self\n\n"
                    "    def __del__(self):\n        found['milter'].tcl('puts', 'goodbye \\u00e9')\n\n\n"
                    "lock = output._LOCK\nheld = getattr(lock, 'locked', None) or lock._is_owned  # (Lock, RLock)\n"
                    "\n\ndef garbage(phase, info):\n"
                    "    if phase == 'start' and not made and held():\n"
                    "        made.append(1)\n        Handle()\n\n\n"
                    "def setup(milter):\n    found['milter'] = milter\n    gc.callbacks.append(garbage)\n"
                    "    gc.set_threshold(1)\n")


def test_a_puts_from_a_del_while_output_holds_its_lock_is_written_not_a_hang(tmp_path) -> None:
    """A __del__ that `puts` while the collector runs inside output's lock (any allocation there
    can start a collection): the nested `puts` took the same plain Lock in the same thread, which
    waited on itself for ever. Now both lines are written and run stops as asked."""
    (tmp_path / "s.tcl").write_text('after 200 {puts -nonewline "piece "; puts "end"}\n'
                                    "after 1500 {milter stop}\nmilter main\n")
    (tmp_path / "hooks.py").write_text(PUTS_IN_THE_LOCK)
    try:
        proc, _ = _run_with_syslog(tmp_path, str(tmp_path / "s.tcl"), "--python", str(tmp_path / "hooks.py"),
                                   "--connection", "inet:0@127.0.0.1", option=False, timeout=20)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"run hung: {hung.stdout!r}")
    assert proc.returncode == 0, proc.stderr
    assert "goodbye é\n" in proc.stdout and "piece end\n" in proc.stdout, proc.stdout


def test_the_errors_kept_for_their_counts_are_bounded_by_size_not_only_by_number(tcl_host) -> None:
    """Each place of an `after` handler's error keeps a label for its count's line, up to 100
    places: the label quoted the whole message, so a script's 1 MB error strings kept 100 MB.
    Now the label's message is clipped, as a thread's handler's is: what is kept is bounded."""
    host = tcl_host
    host.child_call("eval", "for {set i 0} {$i < 30} {incr i} {\n"
                            "    proc p$i {} {error \"[string repeat x 100000] \\033\"}\n"
                            "    after 0 p$i; after 0 p$i\n}")
    for _ in range(5):
        host.service_events()
    kept = [(place, label) for repeated in (host.bgerrors.places, host.bgerrors.others)
            for place, (_, _, _, label) in repeated._places.items()]
    assert len(kept) > 10, kept  # (the places logged whole, and the cap's)
    assert sum(len(place) + len(label) for place, label in kept) < 500 * len(kept), [len(label) for _, label in kept]


def test_a_scripts_configure_of_an_option_the_command_line_set_is_said_once_an_hour(tclrun) -> None:
    """Bug: each `milter configure` of an option the command line fixed logged its "ignored" line,
    so a script that configures it per message, or in a loop, wrote a line to the daemon's log for
    every call (500 here). Now the first is said, the others counted and the count told at stop,
    as getsymval's hint is; another option has its own line."""
    m = tclrun("""
        package require TclMilter
        for {set i 0} {$i < 500} {incr i} { milter configure -grace [expr {$i % 7 + 1}] }
        milter configure -calltimeout 9
        proc eom {ctx} { return SMFIS_CONTINUE }
        milter register eom eom
        milter main
    """, "--grace", "5", "--call-timeout", "3")
    assert m.stop() == 0
    grace = [line for line in m.text.splitlines() if "milter configure -grace" in line]
    assert len(grace) == 2, m.text[-3000:]
    assert grace[0].endswith("INFO: milter configure -grace 1 ignored: --grace given on the command line "
                             "(said once an hour for this option)"), grace
    assert grace[1].endswith("INFO: milter configure -grace 3 ignored: --grace given on the command line "
                             "(said once an hour for this option; 499 more since)"), grace
    assert "INFO: milter configure -calltimeout 9 ignored: --call-timeout given on the command line " in m.text


def test_a_count_is_told_even_when_its_place_is_forgotten_for_a_new_one(tclrun) -> None:
    """Bug: a Repeated remembers ``keep`` places, and the place it forgot to make room took its
    count along, never told. getsymval's hint keeps 32 macro names for an hour: a script asking 33
    names bare (each twice, the second counted) had the first name's count lost. Now a forgotten
    place's count is told as its window's end would tell it (tell_counts: here at the stop)."""
    names = [f"m{n}" for n in range(33)]
    m = tclrun("""
        package require TclMilter
        proc helo {ctx name} {
            foreach n {%s} { $ctx getsymval $n; $ctx getsymval $n }
            return SMFIS_CONTINUE
        }
        milter register helo helo
        milter main
    """ % " ".join(names))
    with m.mta() as mta:
        mta.negotiate()
        mta.macro("H", **{"{%s}" % n: "v" for n in names})
        assert mta.helo() == ("c", {})
    assert m.stop() == 0
    counted = sorted(re.findall(r"getsymval (m\d+) found nothing.*; 1 more since\)", m.text), key=lambda n: int(n[1:]))
    assert counted == names, m.text[-3000:]


def test_a_scripts_call_of_privstarted_without_its_word_is_a_tcl_error_not_a_traceback(tmp_path) -> None:
    """::tclmilter::py::privstarted, which tclmilter.tcl calls with a connection's id, is a command
    the script can call too: without the id each call was an internal error (IndexError), a Python
    traceback in the log, so a loop of such calls flooded it. Now its answer is Tcl's `wrong # args`
    (as {error message errorCode}, as the host's commands answer), logged nowhere."""
    said = wrong_args_said(tmp_path, "for {set i 0} {$i < 50} {incr i} { catch {::tclmilter::py::privstarted} m }\n"
                                     "puts stderr \"said: $m\"\n")
    assert said == ["::tclmilter::py::privstarted connection"], said


def test_private_data_is_started_only_for_a_live_connections_id(tmp_path: Path) -> None:
    """::tclmilter::py::privstarted (and the context proc's setpriv, which calls it) took any id:
    a script calling either with ids no connection has kept each one for the process's life, in
    Python's set and in Tcl's priv array, without a bound. Now such an id is refused as a gone
    connection's context command is: `context no longer exists`, nothing kept."""
    said = checked_stderr(tmp_path, "puts stderr \"said: [::tclmilter::py::privstarted 424242]\"\n"
                                    "catch {::tclmilter::context 424243 setpriv a b} m\n"
                                    "puts stderr \"setpriv: $m, kept: [info exists ::tclmilter::priv(424243)]\"\n")
    assert "said: error {context no longer exists}" in said, said
    assert "setpriv: context no longer exists, kept: 0\n" in said, said


def test_a_scripts_call_of_the_root_file_checks_without_a_file_is_a_tcl_error_not_a_traceback(tmp_path) -> None:
    """::tclmilter::py::rootread and rootcheck, which the checking `source` and `load` call as
    root, are commands the script can call too: without a file each call was an internal error
    (IndexError), a Python traceback in the log, and a loop of them flooded it. Now Tcl's `wrong #
    args`, logged nowhere. (As root only: the tests run as root, as `run` starts.)"""
    if os.geteuid() != 0:
        pytest.skip("the checking source and load exist as root only")
    said = wrong_args_said(tmp_path, "foreach cmd {rootread rootcheck} {\n"
                                     "    for {set i 0} {$i < 20} {incr i} { set m [::tclmilter::py::$cmd] }\n"
                                     "    puts stderr \"said: $m\"\n"
                                     "}\n"
                                     "puts stderr \"said: [::tclmilter::py::rootcheck a b c]\"\n")
    assert said == ["::tclmilter::py::rootread fileName", "::tclmilter::py::rootcheck fileName ?source?",
                    "::tclmilter::py::rootcheck fileName ?source?"], said


def test_the_places_kept_for_counts_are_bounded_whatever_errorinfo_the_script_gives(tcl_host) -> None:
    """An error's place (what its count is kept by, up to 100 places) is its message's kind and
    each errorInfo frame's command name and the lines Tcl writes after it. A script gives any
    errorInfo it likes (`error msg $info`): one of 200 000 frames, or with 200 kB after a frame,
    made a place of as many characters, kept for as long as the place is. Now a place keeps the
    first and last frames only, each clipped, as its message is (a3fdfcb)."""
    host = tcl_host
    host.child_call("eval", "set long \"boom\\n    while executing\\n\\\"x\\\"\\n    ([string repeat y 200000])\"\n"
                            "set deep boom[string repeat \"\\n    invoked from within\\n\\\"z\\\"\" 200000]\n"
                            "for {set i 0} {$i < 6} {incr i} {\n"
                            "    foreach how {long deep} {\n"
                            "        proc $how$i {} [list error \"$how [string repeat k [expr {$i + 1}]]\" [set $how]]\n"
                            "        after 0 $how$i; after 0 $how$i\n"
                            "    }\n}")
    for _ in range(5):
        host.service_events()
    kept = [place for place in host.bgerrors.places._places]
    assert len(kept) >= 10, kept  # (the places logged whole)
    assert max(len(place) for place in kept) < 2000, sorted(len(place) for place in kept)


def test_the_traces_kept_to_refer_to_are_bounded_whatever_data_they_quote(caplog) -> None:
    """A failing callback's trace is logged once a minute at its place, the others referring to
    it (repeats.SameTrace, up to 100 places). The place was the whole trace less the error's own
    message: data a chained exception quotes (a sender's 60 kB header value here) made each
    failure a place of its own, kept whole, so 100 failures kept 100 such traces. Now a place is
    kept by a digest of it: the same places, a few bytes each."""
    from support.engine import InProcessMTA, make_milter, z

    m = make_milter()

    def header(ctx, name, value):
        try:
            raise KeyError(value)
        except KeyError:
            raise RuntimeError("lookup failed")  # (the KeyError, with the value, in its trace)

    m.register("header", header)
    for n in range(20):
        mta = InProcessMTA(m, conn_id=n + 1)
        mta.optneg()
        mta.connect()
        assert mta.command(b"M", z("<a@example.org>")) == [(b"c", b"")]
        mta.command(b"L", z("X-Data", f"{n}:" + "v" * 60_000))  # (its tempfail is answered at the end of headers)
    kept = list(m.shared.traces._logged)
    assert len(kept) == 20, len(kept)  # each a place of its own, as before
    assert sum(len(place) for place in kept) < 20 * 100, sum(len(place) for place in kept)
    traces = [r.getMessage() for r in caplog.records if "header callback" in r.getMessage()]
    assert len(traces) == 20 and all("KeyError" in t for t in traces), traces[:1]


@needs_thread
def test_a_scripts_call_of_output_with_wrong_words_is_a_tcl_error_not_a_traceback(tmp_path: Path) -> None:
    """::tclmilter::py::output, which the escaping `puts` calls with a channel, its text and whether
    a line is open, is a command the script (and a thread's) can call too: with fewer words, or a
    channel other than stdout or stderr, each call was an internal error (IndexError, KeyError), a
    Python traceback in the log. Now its answer is Tcl's error, logged nowhere."""
    said = wrong_args_said(tmp_path, "package require Thread\nset t [thread::create]\n"
                                     "for {set i 0} {$i < 20} {incr i} { catch {::tclmilter::py::output stdout x} m }\n"
                                     "puts stderr \"said: $m\"\n"
                                     "puts stderr \"said: [thread::send $t {catch {::tclmilter::py::output} m; set m}]\"\n"
                                     "puts stderr \"channel: [::tclmilter::py::output stdin x 0]\"\n")
    assert said == ["::tclmilter::py::output channel text open"] * 2, said


BYTES_HOOKS = r"""
import sys

# At the top of a --python file, as under systemd to see each line at once: it loaded before.
sys.stdout.reconfigure(line_buffering=True)
sys.stderr.reconfigure(errors="backslashreplace")

def setup(milter):
    @milter.register("envfrom")
    def envfrom(ctx, args):
        sys.stdout.buffer.write(b"bytes: " + args[0].encode("utf-8", "surrogateescape") + b" \xff\n")
        sys.stdout.buffer.flush()
        print("named", sys.stdout.name, sys.stderr.name, sys.stdout.mode, sys.stdout.line_buffering)
"""


def test_a_python_hooks_bytes_and_reconfigure_under_run_as_before_escaped(tmp_path) -> None:
    """A --python file that calls sys.stdout.reconfigure() at its top (line_buffering=True, as
    under systemd) loads, and a hook writing bytes to sys.stdout.buffer writes them, escaped as
    its print() is (ESC, CR LF and a byte not UTF-8); the streams' name, mode and line_buffering
    read as Python's. FAILED before: `AttributeError: 'PythonOutput' object has no attribute
    'reconfigure'` refused the start (status 1), and sys.stdout.buffer was missing too."""
    forged = "2001-01-01 00:00:00,000 pytclmilter[1] ERROR: forged"
    _, status, out, err = _hooks_served(tmp_path, BYTES_HOOKS, f"<a\x1b[31m\r\n{forged}@example.org>")
    assert status == 0, err
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out), out
    assert out.split("\n")[1:] == [r"bytes: <a\x1b[31m\r", f"  {forged}@example.org> \\xff",
                                    "named <stdout> <stderr> w True", ""], out
    assert all(STDERR_LINE.match(line) for line in err.splitlines()), err
