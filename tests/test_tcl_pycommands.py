"""Tcl commands written in Python: ``milter.tcl_command`` in a ``--python`` hooks file.

Scripts run under ``pytclmilter run`` (tests/support/tclrun.py) and an independent MTA-side client
talks to them; ``try`` and ``check`` are driven through pexpect. What is checked is what a script
writer sees: the command's results as Tcl values, bytes that survive the trip byte for byte, Tcl
errors a script can ``catch``, the log line of an uncaught one, Tcl's ``wrong # args`` message,
the callback time limit, and the commands in every ``--workers`` process.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest

from support.tclrun import TCL_HELPERS, _pytclmilter_command, child_env, ok, tclrun_factory, z

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def cli(*args: str, timeout: float = 30) -> tuple[int, str]:
    """``pytclmilter ARGS`` on a pty until it ends: (exit status, output with LF line ends)."""
    command = _pytclmilter_command()
    child = pexpect.spawn(command[0], [*command[1:], *args], env=child_env(), cwd=str(ROOT), encoding="utf-8",
                          codec_errors="replace", timeout=timeout, echo=False, use_poll=True)
    out = child.read()
    child.close()
    return child.exitstatus if child.exitstatus is not None else -(child.signalstatus or 0), out.replace("\r\n", "\n")


def logged(m, pattern: str, count: int = 1, timeout: float = 10.0) -> None:
    """Wait until the log (LF line ends) holds ``count`` matches of a multi-line pattern."""
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, m.text)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not seen {count} time(s) in:\n{m.text}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------- values


VALUES_HOOKS = r'''
from pytclmilter import REJECT


def setup(milter):
    store = {}

    @milter.tcl_command("greydb")
    def greydb(key, value=None):
        if value is None:
            return store.get(key)
        store[key] = value
        return len(store)

    @milter.tcl_command("pyargs")
    def pyargs(*args):
        print("PYARGS", ascii(args), flush=True)
        return list(args)

    def values():
        return {"list": [1, "two words", ["x", "y z"], ()], "true": True, "false": False, "none": None,
                "float": 1.5, "big": 2 ** 70, "bytes": b"caf\xc3\xa9 \xe9", "status": REJECT,
                "tuple": ("a", {"k": "v"})}

    milter.tcl_command("pyvalues", values)
    milter.tcl_command("pyset", lambda: {1, 2})
    milter.tcl_command("pybuffers", lambda: [bytearray(b"ab"), memoryview(b"cd")])  # as bytes are
    milter.tcl_command("pyobject", object)
    milter.tcl_command("pyellipsis", lambda: ...)
    milter.tcl_command("pyuuid", lambda: __import__("uuid").UUID(int=0))
    milter.tcl_command("pyhttp", lambda: __import__("http.client").client.HTTPMessage())
'''


def test_arguments_arrive_as_strings_and_results_become_tcl_values(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        T set      {greydb k "v w"}
        T get      {greydb k}
        T missing  {greydb nope}
        T args     {llength [pyargs a "b c" {} 7]}
        set v [pyvalues]
        T keys     {dict keys $v}
        T list     {dict get $v list}
        T nested   {lindex [dict get $v list] 2 1}
        T empty    {llength [lindex [dict get $v list] 3]}
        T true     {dict get $v true}
        T false    {dict get $v false}
        T none     {string length [dict get $v none]}
        T float    {expr {[dict get $v float] * 2}}
        T big      {dict get $v big}
        T bytes    {list [string length [dict get $v bytes]] [string range [dict get $v bytes] 0 3] [scan [string index [dict get $v bytes] end] %c]}
        T status   {dict get $v status}
        T tuple    {dict get [lindex [dict get $v tuple] 1] k}
        T set2     {pyset}
        T buffers  {pybuffers}
        T object   {pyobject}
        T ellipsis {pyellipsis}
        T uuid     {pyuuid}
        T http     {pyhttp}
        exit 0
    """, python=[VALUES_HOOKS], connection=None, wait=False)
    assert m.wait_exit() == 0, m.output
    r = m.results()
    assert r["set"] == "OK 1"
    assert r["get"] == "OK v w"
    assert r["missing"] == "OK "  # None: the empty string
    assert "PYARGS ('a', 'b c', '', '7')" in m.text  # every word a str, as Tcl has no other type
    assert r["args"] == "OK 4"
    assert r["keys"] == "OK list true false none float big bytes status tuple"
    assert r["list"] == "OK 1 {two words} {x {y z}} {}"
    assert r["nested"] == "OK y z"
    assert r["empty"] == "OK 0"
    assert (r["true"], r["false"], r["none"]) == ("OK 1", "OK 0", "OK 0")
    assert r["float"] == "OK 3.0"
    assert r["big"] == f"OK {2 ** 70}"
    # bytes are text under the bytes rule: valid UTF-8 decoded, the lone 0xE9 as U+DCE9
    assert r["bytes"] == f"OK 6 café {0xDCE9}"
    assert r["status"] == "OK SMFIS_REJECT"
    assert r["tuple"] == "OK v"
    assert r["buffers"] == "OK ab cd"
    assert r["set2"] == ("ERR pyset: a set has no Tcl form (return str, int, float, bool, bytes, None, "
                         "or a list, tuple or dict of them)")
    # the article as the type's name is read: a word by its first letter, an acronym by its letter's name
    assert r["object"].startswith("ERR pyobject: an object has no Tcl form (")
    assert r["ellipsis"].startswith("ERR pyellipsis: an ellipsis has no Tcl form (")
    assert r["uuid"].startswith("ERR pyuuid: a UUID has no Tcl form (")
    assert r["http"].startswith("ERR pyhttp: an HTTPMessage has no Tcl form (")


ECHO_HOOKS = r'''
def setup(milter):
    @milter.tcl_command("pyecho")
    def pyecho(value):
        print("PYECHO", ascii(value), flush=True)
        return value

    @milter.tcl_command("pybytes")
    def pybytes(value):
        return value.encode("utf-8", "surrogateescape")  # bytes: back as the same text
'''

RAW = b"caf\xc3\xa9 \xe9\xff \xed\xb2\x80 \xc0\x80 end"  # UTF-8, Latin-1, a CESU-8 look-alike, overlong NUL


def raw_header_then_eom(m, raw: bytes) -> list[tuple[str, bytes]]:
    """A message whose header X-Raw is these bytes: the end of message's reply, once the milter
    has stopped cleanly."""
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.mail("<a@example.org>"))
        assert ok(mta.event_raw("L", z("X-Raw", raw)))
        assert ok(mta.eoh())
        reply = mta.eom()
    assert m.stop() == 0
    return reply


def test_8bit_bytes_round_trip_through_a_python_command(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc hdr {ctx name value} {
            if {$name eq "X-Raw"} { $ctx setpriv raw [pyecho $value] }
            return SMFIS_CONTINUE
        }
        proc eom {ctx} {
            $ctx addheader X-Echo [$ctx getpriv raw]
            $ctx addheader X-Bytes [pybytes [$ctx getpriv raw]]
            $ctx addheader X-Length [string length [pyecho [$ctx getpriv raw]]]
            return SMFIS_CONTINUE
        }
        milter register header hdr
        milter register eom eom
        milter main
    """, python=[ECHO_HOOKS])
    reply = raw_header_then_eom(m, RAW)
    expected = RAW.decode("utf-8", "surrogateescape")
    assert f"PYECHO {ascii(expected)}" in m.text  # the function sees the bytes rule's str
    assert reply == [("h", z("X-Echo", RAW)), ("h", z("X-Bytes", RAW)),
                     ("h", z("X-Length", str(len(expected)))), ("c", b"")]


LONE_HOOKS = r"""
import json


def setup(milter):
    lone = json.loads('"x\\ud800"')  # half a surrogate pair, as JSON may hold one
    milter.tcl_command("pylone", lambda: lone)
    milter.tcl_command("pylonelist", lambda: ["a", lone])

    @milter.tcl_command("pylonerror")
    def pylonerror():
        raise ValueError(lone)
"""


LONE_SCRIPT = r"""
    package require TclMilter
    proc eom {ctx} {
        catch {pylonerror} err
        set lengths "[string length [pylone]] [string length [lindex [pylonelist] 1]] [string length $err]"
        $ctx addheader X-Lengths $lengths
        return SMFIS_CONTINUE
    }
    milter register eom eom
    milter main
"""


def test_a_lone_surrogate_in_a_python_commands_result_is_one_tcl_character(tclrun):
    """A str with a surrogate outside the bytes rule's U+DC80..U+DCFF (JSON's "\\ud800", a lone
    half of a pair) went to tkinter as it was: its UTF-8 encoding failed inside the answer's
    tuple, which tkinter does not check, and the milter died of a segmentation fault. Tcl 8.6
    keeps such a character as its CESU-8 bytes: it is sent so, one character, in a result, in a
    list and in an error's message alike."""
    m = tclrun(LONE_SCRIPT, python=[LONE_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.mail("<a@example.org>"))
        reply = mta.eom()
    assert reply == [("h", z("X-Lengths", "2 2 2")), ("c", b"")]
    assert m.stop() == 0


LONE_ARGS_HOOKS = r"""
def setup(milter):
    @milter.register("eom")
    def eom(ctx):
        print("PRIV", ascii(ctx.getpriv("lone")), ascii(ctx.getpriv("raw")), flush=True)
        print("PRIVS", ascii(sorted(ctx.getpriv().items())), flush=True)
        print("TCL", ascii(ctx.tcl("format", "a%cb", 0xD800)), flush=True)
"""

#: The wire's bytes ED A0 80: not UTF-8 (the encoding of U+D800 that UTF-8 forbids), three bytes.
RAW_SURROGATE = b"a\xed\xa0\x80b"


def test_a_lone_surrogate_of_the_scripts_reaches_python_as_one_character_every_way(tclrun):
    """The script's `[format %c 0xD800]` is one character: a Python command got it as "\\ud800",
    as documented, but the same text read from Python as private data (getpriv, whole or one
    name) or as ctx.tcl's result came as "\\udced\\udca0\\udc80", three bytes the wire never had.
    The wire's own bytes ED A0 80 stay three escaped bytes every way, and go out as they came."""
    m = tclrun(r"""
        package require TclMilter
        proc hdr {ctx name value} {
            $ctx setpriv raw [pyecho $value]
            $ctx setpriv lone [pyecho "a[format %c 0xD800]b"]
            return SMFIS_CONTINUE
        }
        proc eom {ctx} {
            $ctx addheader X-Length [string length [$ctx getpriv lone]]
            $ctx addheader X-Raw [$ctx getpriv raw]
            return SMFIS_CONTINUE
        }
        milter register header hdr
        milter register eom eom
        milter main
    """, python=[ECHO_HOOKS, LONE_ARGS_HOOKS])
    reply = raw_header_then_eom(m, RAW_SURROGATE)
    lone, raw = "a\ud800b", RAW_SURROGATE.decode("utf-8", "surrogateescape")
    assert f"PYECHO {ascii(lone)}" in m.text and f"PYECHO {ascii(raw)}" in m.text, m.text
    assert f"PRIV {ascii(lone)} {ascii(raw)}" in m.text
    assert f"PRIVS {ascii(sorted({'lone': lone, 'raw': raw}.items()))}" in m.text
    assert f"TCL {ascii(lone)}" in m.text
    assert reply == [("h", z("X-Length", "3")), ("h", z("X-Raw", RAW_SURROGATE)), ("c", b"")]


# ---------------------------------------------------------------------------- errors


ERROR_HOOKS = r'''
def setup(milter):
    @milter.tcl_command("boom")
    def boom(message):
        raise LookupError(message)

    @milter.tcl_command("blank")
    def blank():
        raise RuntimeError()

    @milter.tcl_command("leave")
    def leave():
        import sys
        sys.exit(3)
'''


def reply(text: str) -> dict[str, str]:
    """A 550 5.7.1 reply as miltertest decodes it."""
    return {"smtpcode": "550", "space": " ", "text": f"5.7.1 {text}"}


def test_a_python_exception_is_a_tcl_error_the_script_can_catch(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        T plain    {boom "no such key"}
        T code     {catch {boom "no such key"} m o; dict get $o -errorcode}
        T trap     {try { boom x } trap {PYTHON LookupError} {msg} { set r "trapped $msg" }}
        T blank    {blank}
        T leave    {catch leave m o; list $m [dict get $o -errorcode]}
        proc p {} { boom "from a proc" }
        catch p m o
        puts "INFO<<[string map {\n |} [dict get $o -errorinfo]]>>"  ;# (one line: see tcl-reference, puts)
        proc from {ctx list} {
            if {[catch {boom "unknown sender [lindex $list 0]"} m]} {
                $ctx setreply 550 5.7.1 "caught: $m"
                return SMFIS_REJECT
            }
            return SMFIS_CONTINUE
        }
        milter register envfrom from
        milter main
    """, python=[ERROR_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == ("y", reply("caught: unknown sender <a@example.org>"))
        assert mta.mail("<b@example.org>") == ("y", reply("caught: unknown sender <b@example.org>"))
    assert m.stop() == 0
    r = m.results()
    assert r["plain"] == "ERR no such key"
    assert r["code"] == "OK PYTHON LookupError {no such key}"
    assert r["trap"] == "OK trapped x"
    assert r["blank"] == "ERR RuntimeError"  # no message: the exception's name
    # sys.exit() in a command (or a library it calls) is an error like another: the script catches
    # it (before, it passed through Tcl and failed the callback, or ended the load, from outside)
    assert r["leave"] == "OK SystemExit(3) {PYTHON SystemExit SystemExit(3)}"
    info = re.search(r"INFO<<(.*?)>>", m.text, re.S).group(1)
    lines = info.split("|")
    assert lines[0] == "from a proc"
    assert lines[1] == "Traceback (most recent call last):"
    assert re.match(r'  File ".*hooks0\.py", line 5, in boom$', lines[2]), lines
    assert lines[3] == "    raise LookupError(message)"
    assert lines[4] == "LookupError: from a proc"
    assert lines[5:] == ["    invoked from within", '"boom "from a proc" "', '    (procedure "p" line 1)',
                         "    invoked from within", '"p"']


PLAIN_ERROR_HOOKS = r"""
from pytclmilter import TclError


def setup(milter):
    @milter.tcl_command("setting")
    def setting(value):
        if not value.isdigit():
            raise TclError(f'setting: must be a number, not "{value}"', error_code=("MYAPP", "SETTING"))
        return int(value)

    @milter.tcl_command("plainly")
    def plainly():
        raise TclError("no code given")

    @milter.tcl_command("passes")
    def passes():
        return milter.tcl("fails")  # its TclError not caught: the Tcl error goes on up
"""

PLAIN_ERROR_SCRIPT = TCL_HELPERS + r"""
package require TclMilter
proc fails {} { error "no such key" "" {MYAPP NOTFOUND} }
proc info1 {script} { catch {uplevel 1 $script} m o; string map {\n |} [dict get $o -errorinfo] }
T good     {setting 42}
T code     {catch {setting abc} m o; list $m [dict get $o -errorcode]}
T info     {info1 {setting abc}}
T none     {catch plainly m o; list $m [dict get $o -errorcode]}
T passes   {catch passes m o; list $m [dict get $o -errorcode]}
T passinfo {info1 passes}
setting abc
milter main
"""


def test_a_python_command_raising_tclerror_gives_a_plain_tcl_error_without_a_traceback(tmp_path: Path):
    """A command rejecting what the script gave it (an admin's typo in a setting) had no way to
    fail as a Tcl command does: any exception came with the Python traceback in errorInfo, and
    `check` and `run` showed a typo as a crash of the command. Raised as pytclmilter.TclError it
    is Tcl's error: the message, errorCode as given (NONE by default), errorInfo the message and
    Tcl's frames; a TclError from milter.tcl let through keeps the Tcl stack it came with, and
    then the command's own line that called the proc."""
    script, hooks = tmp_path / "plain.tcl", tmp_path / "hooks.py"
    script.write_text(PLAIN_ERROR_SCRIPT)
    hooks.write_text(PLAIN_ERROR_HOOKS)
    message = 'setting: must be a number, not "abc"'
    for command in ("check", "run"):
        status, out = cli(command, str(script), "--python", str(hooks),
                          *(["--connection", f"unix:{tmp_path}/x.sock"] if command == "run" else []))
        assert status == 1, out
        results = dict(line.split("\t")[1:] for line in out.splitlines() if line.startswith("R\t"))
        passed_through = results.pop("passinfo", "")
        assert "Traceback" not in out and "hooks.py" not in out.replace(passed_through, ""), out
        assert passed_through == (
            'OK no such key|    while executing|"error "no such key" "" {MYAPP NOTFOUND} "|'
            '    (procedure "fails" line 1)|    invoked from within|"fails"|    (in Python, going up through)|'
            f'  File "{hooks}", line 18, in passes|'
            '    return milter.tcl("fails")  # its TclError not caught: the Tcl error goes on up|'
            '    invoked from within|"passes"|    ("uplevel" body line 1)|    invoked from within|'
            '"uplevel 1 $script"'), out
        assert results == {
            "good": "OK 42",
            "code": f"OK {{{message}}} {{MYAPP SETTING}}",
            "info": f'OK {message}|    invoked from within|"setting abc"|    ("uplevel" body line 1)|'
                    '    invoked from within|"uplevel 1 $script"',
            "none": "OK {no code given} NONE",
            "passes": "OK {no such key} {MYAPP NOTFOUND}",
        }, out
        line = PLAIN_ERROR_SCRIPT.splitlines().index("setting abc") + 1
        frames = ["    invoked from within", '"setting abc"', f'    (file "{script}" line {line})']
        # the log's form, for both: the lines after the first indented, as far as they are not already
        assert "\n".join([message, *(f if f.startswith(" ") else "  " + f for f in frames)]) in out, out
        if command == "check":
            assert f"{script}:{line}: error: {message}\n  {message}\n" in out, out  # (below its line)


def results_to_helo(tclrun, hooks: str, at_load: str, at_helo: str) -> tuple[Any, dict[str, str]]:
    """Run ``at_load`` as the script loads and ``at_helo`` in its helo callback (``T`` lines, see
    TCL_HELPERS), with the hooks file; one session up to HELO, a stop; the run and its results."""
    m = tclrun(TCL_HELPERS + "package require TclMilter\n" + at_load + "\nproc helo {ctx name} {\n" + at_helo
               + "\nreturn SMFIS_CONTINUE\n}\nmilter register helo helo\nmilter main\n", python=[hooks])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.connect() == ("c", {})
        assert mta.helo() == ("c", {})
    assert m.stop() == 0
    return m, m.results()


UNSHOWABLE_HOOKS = '''
class Unshowable(Exception):
    def __str__(self):
        raise RuntimeError("str exploded")


class Opaque:
    def __str__(self):
        raise RuntimeError("objstr exploded")


def setup(milter):
    @milter.tcl_command("boom")
    def boom():
        raise Unshowable()

    @milter.register("connect")
    def connect(ctx, hostname, addrinfo):
        ctx.setpriv("opaque", Opaque())
'''


def test_an_exception_or_private_data_whose_str_raises_is_a_tcl_error_that_says_so(tclrun):
    """Bug: a Python command raising an exception whose __str__ raises gave the script an empty
    error, errorCode NONE and no traceback (tkinter kept the second exception to itself); private
    data whose __str__ raises was an "internal error" logged with pytclmilter's frames."""
    m, r = results_to_helo(tclrun, UNSHOWABLE_HOOKS, r"""
        T code  {catch {boom} m o; list $m [dict get $o -errorcode]}
        T info  {catch {boom} m o; string match "*raise Unshowable()*" [dict get $o -errorinfo]}
    """, "T opaque {$ctx getpriv opaque}")
    why = "<exception str() failed>"
    assert r["code"] == f"OK {{{why}}} {{PYTHON Unshowable {{{why}}}}}"
    assert r["info"] == "OK 1"
    assert r["opaque"] == ('ERR private data "opaque": an Opaque whose str() failed (RuntimeError: objstr '
                           'exploded)')
    assert "internal error" not in m.text and "Traceback" not in m.text


NESTING_HOOKS = '''
def setup(milter):
    @milter.tcl_command("nested")
    def nested(levels, kind="list"):
        value = "x"
        for _ in range(int(levels)):
            value = [value] if kind == "list" else {"k": value}
        return value

    @milter.tcl_command("itself")
    def itself():
        loop = []
        loop.append(loop)
        return loop

    @milter.tcl_command("again")
    def again():
        return milter.tcl("again")

    @milter.register("connect")
    def connect(ctx, hostname, addrinfo):
        loop = {}
        loop["me"] = loop
        ctx.setpriv("loop", loop)
'''


def test_a_result_nested_too_deep_or_without_end_is_a_tcl_error_that_says_so(tclrun):
    """A result nested deeper than Python's recursion limit allowed (about 450 levels), or a
    list that contains itself, raised RecursionError inside tkinter's call of the command:
    tkinter keeps such an exception to itself, and the script got an empty error, errorCode
    NONE; a command calling itself through milter.tcl ended in a bare "TclError". Read with
    getpriv, such private data was an "internal error" with a traceback of a thousand lines."""
    m, r = results_to_helo(tclrun, NESTING_HOOKS, r"""
        T list100  {string length [nested 100]}
        T dict100  {dict size [nested 100 dict]}
        T list101  {nested 101}
        T code     {catch {nested 500} m o; dict get $o -errorcode}
        T itself   {itself}
        T again    {again}
    """, "T loop {$ctx getpriv loop}")
    deep = "a list nested deeper than 100 levels (or one that contains itself) has no Tcl form"
    assert r["list100"] == "OK 1"
    assert r["dict100"] == "OK 1"
    assert r["list101"] == f"ERR nested: {deep}"
    assert r["code"] == f"OK PYTHON ValueError {{nested: {deep}}}"
    assert r["itself"] == f"ERR itself: {deep}"
    assert r["again"].startswith("ERR maximum recursion depth exceeded"), r["again"]
    assert r["loop"] == ('ERR private data "loop": a dict nested deeper than 100 levels (or one that '
                         'contains itself) has no Tcl form')
    assert "internal error" not in m.text and "Traceback" not in m.text


def test_an_uncaught_python_exception_in_a_callback_is_logged_and_answered_with_onerror(tclrun):
    m = tclrun(r"""
        package require TclMilter
        milter configure -onerror SMFIS_REJECT
        proc from {ctx list} { boom "bad \x1b\[1m sender\nFAKE: line" }
        milter register envfrom from
        milter main
    """, python=[ERROR_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == ("r", {})  # -onerror SMFIS_REJECT
        # The Python traceback, then Tcl's errorInfo: every line indented under the log line (or
        # starting with a space already), control characters escaped: no line passes for a log line
        logged(m, r"ERROR: conn#1: envfrom callback from failed \(bad \\x1b\[1m sender\\nFAKE: line\), "
                  r"answering SMFIS_REJECT:\n"
                  r"  bad \\x1b\[1m sender\n  FAKE: line\n  Traceback \(most recent call last\):\n"
                  r'  File ".*hooks0\.py", line 5, in boom\n    raise LookupError\(message\)\n'
                  r"  LookupError: bad \\x1b\[1m sender\n  FAKE: line\n    invoked from within\n"
                  r'  "boom "bad .*FAKE: line" "\n    \(procedure "from" line 1\)\n')
        assert mta.mail("<b@example.org>") == ("r", {})  # the same connection goes on
    assert m.stop() == 0
    assert "\nFAKE: line" not in m.text


FAULT_HOOKS = r'''
import asyncio


class Fault(BaseException):
    """Not an Exception: a library's own root class, as GeneratorExit is Python's."""


def setup(milter):
    @milter.tcl_command("fault")
    def fault(message):
        raise Fault(message)

    @milter.register("connect")
    def connect(ctx, hostname, addr):
        if hostname == "bad.example.net":
            raise Fault("sync \x1b[1m fault")

    @milter.register("envfrom")
    async def envfrom(ctx, args):
        await asyncio.sleep(0)
        if args[0] == "<async@example.org>":
            raise Fault("async fault")
'''


def test_a_base_exception_that_is_no_exception_fails_as_an_exception_does(tclrun):
    """A callback or a Python command raising a BaseException of its own (not an Exception)
    failed as any other: logged with its traceback, counted, answered with -onerror; a command's
    a Tcl error with its message. Before, a sync callback's broke the connection ("Fatal error on
    transport", no answer, callback errors=0), an async one's was never answered, and a command's
    was a Tcl error with an empty message."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        milter configure -onerror SMFIS_REJECT
        T caught {catch {fault "no way"} m o; list $m [dict get $o -errorcode]}
        proc rcpt {ctx list} { fault "from Tcl" }
        milter register envrcpt rcpt
        milter main
    """, python=[FAULT_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.connect(hostname="bad.example.net") == ("r", {})
    logged(m, r"ERROR: conn#1: connect callback setup\.<locals>\.connect failed \(sync \\x1b\[1m fault\), answering SMFIS_REJECT:\n"
              r"  Traceback \(most recent call last\):\n(  .*\n)*?"
              r'    raise Fault\("sync \\\\x1b\[1m fault"\)\n  \S+\.Fault: sync \\x1b\[1m fault\n')
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect())
        assert mta.mail("<async@example.org>") == ("r", {})
        logged(m, r"ERROR: conn#2: envfrom callback setup\.<locals>\.envfrom failed \(async fault\), answering SMFIS_REJECT:\n"
                  r"(  .*\n)*?  \S+\.Fault: async fault\n")
        assert ok(mta.mail("<a@example.org>"))  # the connection goes on
        assert mta.rcpt("<b@example.org>") == ("r", {})
        logged(m, r"ERROR: conn#2: envrcpt callback rcpt failed \(from Tcl\), answering SMFIS_REJECT:\n"
                  r"  from Tcl\n  Traceback \(most recent call last\):\n(  .*\n)*?  \S+\.Fault: from Tcl\n")
    assert m.stop() == 0
    assert m.results()["caught"] == "OK {no way} {PYTHON Fault {no way}}"
    assert "callback errors=3" in m.text
    assert "Fatal error" not in m.text and "never retrieved" not in m.text


NO_TEXT_HOOKS = r'''
class Fault(Exception):
    def __str__(self):
        raise RuntimeError("no text")


def setup(milter):
    @milter.register("connect")
    def connect(ctx, hostname, addr):
        raise Fault()
'''


def test_an_exception_whose_str_raises_fails_as_any_other(tclrun):
    """A --python callback's exception whose __str__ raises cut the connection with no answer
    ("Fatal error on transport", callback errors=0: the MTA's default action). Now it fails as
    any other, with Python's own words for the text (a Python command's: the test above)."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        milter configure -onerror SMFIS_REJECT
        milter main
    """, python=[NO_TEXT_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.connect() == ("r", {})
    logged(m, r"ERROR: conn#1: connect callback setup\.<locals>\.connect failed \(<exception str\(\) failed>\), "
              r"answering SMFIS_REJECT:\n")
    assert m.stop() == 0
    assert "callback errors=1" in m.text and "Fatal error" not in m.text


ARITY_HOOKS = r'''
def setup(milter):
    milter.tcl_command("two", lambda a, b: a + b)
    milter.tcl_command("greydb", lambda key, value=None: key)
    milter.tcl_command("first", lambda first, *rest: first)
    milter.tcl_command("anyargs", lambda *args: len(args))
    milter.tcl_command("values", lambda *values: len(values))
    milter.tcl_command("nothing", lambda: "nothing")
    milter.tcl_command("::ns::qualified", lambda x, **kw: x)
    milter.tcl_command("pylen", len)  # a positional-only parameter: len(obj, /)
    milter.tcl_command("pymax", max)  # no signature Python can read: any number, max counts them itself
'''


def test_a_wrong_number_of_arguments_reads_as_tcls_own_message(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        T two       {two a}
        T two3      {two a b c}
        T two-ok    {two a b}
        T greydb    {greydb}
        T greydb3   {greydb a b c}
        T first     {first}
        T first-ok  {first a b c d}
        T any       {anyargs}
        T values    {values 1 2}
        T nothing   {nothing x}
        T qualified {::ns::qualified}
        T len       {pylen}
        T len-ok    {pylen abcd}
        T max-ok    {pymax b c a}
        T max       {pymax}
        T code      {catch {two} m o; dict get $o -errorcode}
        exit 0
    """, python=[ARITY_HOOKS], connection=None, wait=False)
    assert m.wait_exit() == 0, m.output
    r = m.results()
    assert r["two"] == r["two3"] == 'ERR wrong # args: should be "two a b"'
    assert r["two-ok"] == "OK ab"
    assert r["greydb"] == r["greydb3"] == 'ERR wrong # args: should be "greydb key ?value?"'
    assert r["first"] == 'ERR wrong # args: should be "first first ?rest ...?"'
    assert r["first-ok"] == "OK a"
    assert r["any"] == "OK 0"
    assert r["values"] == "OK 2"
    assert r["nothing"] == 'ERR wrong # args: should be "nothing"'
    assert r["qualified"] == 'ERR wrong # args: should be "::ns::qualified x"'
    assert r["len"] == 'ERR wrong # args: should be "pylen obj"'
    assert r["len-ok"] == "OK 4"
    assert r["max-ok"] == "OK c"
    assert r["max"] == "ERR max expected at least 1 argument, got 0"  # Python's own message
    assert r["code"] == "OK TCL WRONGARGS"


# ---------------------------------------------------------------------------- time limit


SLOW_HOOKS = r'''
import os
import time


def setup(milter):
    @milter.tcl_command("slow")
    def slow(seconds):
        time.sleep(float(seconds))
        return "done"

    @milter.tcl_command("cslow")
    def cslow(seconds):
        os.system(f"sleep {seconds}")  # C code: Python's signal handler runs only once it is back
        return "done"
'''

SLOW_SCRIPT = TCL_HELPERS + r"""
package require TclMilter
milter configure -calltimeout 1 -onerror SMFIS_REJECT
T load {slow 1.2}
proc from {ctx list} {
    switch -- [lindex $list 0] {
        <sleep@example.org> { slow 30 }
        <catch@example.org> { while 1 { catch { slow 30 } } }
        <c@example.org>     { cslow 2 }
        <ok@example.org>    { slow 0.5 }
    }
    return SMFIS_CONTINUE
}
milter register envfrom from
milter main
"""


def test_the_time_limit_stops_a_python_command_that_blocks(tclrun):
    m = tclrun(SLOW_SCRIPT, python=[SLOW_HOOKS])
    assert m.results()["load"] == "OK done"  # before milter main the script runs unbounded
    with m.mta() as mta:
        mta.negotiate()
        for count, case in enumerate(("sleep", "catch"), 1):
            t0 = time.monotonic()
            assert mta.mail(f"<{case}@example.org>") == ("r", {}), case  # -onerror SMFIS_REJECT
            assert 0.9 <= time.monotonic() - t0 <= 4.0
            # Tcl's errorInfo, then where the Python command was when it was stopped
            logged(m, r"envfrom callback from failed \(callback stopped after 1 s \(-calltimeout\)\), "
                      r"answering SMFIS_REJECT:\n  time limit exceeded\n(.*\n)*?"
                      r'  "slow 30 "\n    \(procedure "from" line \d\)\n(.*\n)*?'
                      r"  Python command slow stopped at the time limit in:\n"
                      r'  File ".*hooks0\.py", line 9, in slow\n    time\.sleep\(float\(seconds\)\)\n', count)
            t0 = time.monotonic()
            assert mta.mail("<ok@example.org>") == ("c", {})  # the next callback has its own second
            assert time.monotonic() - t0 >= 0.5
        # C code that does not come back to Python: stopped as soon as it is back, logged as late
        t0 = time.monotonic()
        assert mta.mail("<c@example.org>") == ("r", {})
        assert 1.9 <= time.monotonic() - t0 <= 5.0
        logged(m, r"envfrom callback from failed \(callback stopped after 1 s \(-calltimeout\)\)", 3)
        logged(m, r"WARNING: conn#1: envfrom callback from took 2\.\d s, over the 1 s call timeout")
        assert mta.mail("<ok@example.org>") == ("c", {})
    assert m.stop() == 0


MARK_HOOKS = r'''
def setup(milter):
    milter.tcl_command("mark", lambda word: print("MARK", word, flush=True))
'''


def test_a_python_command_called_after_the_time_ran_out_does_not_run(tclrun):
    """Tcl looks at its time limit only every few commands, so a callback that spent its time in
    C code (``exec``) can still call a Python command: that command is not run (its side effects,
    a database write, would happen for a message already answered with -onerror), and the callback
    ends at the limit as any other."""
    m = tclrun(r"""
        package require TclMilter
        milter configure -calltimeout 1 -onerror SMFIS_REJECT
        proc from {ctx list} {
            if {[lindex $list 0] eq "<late@example.org>"} { exec sleep 1.3 }
            # (Tcl looks at the clock every tenth command or so: one of these runs before it does)
            foreach i {1 2 3 4 5 6 7 8 9 10 11 12} { mark "[lindex $list 0] $i" }
            return SMFIS_CONTINUE
        }
        milter register envfrom from
        milter main
    """, python=[MARK_HOOKS])
    late_then_ok(m, r"envfrom callback from failed \(callback stopped after 1 s \(-calltimeout\)\)")
    logged(m, r"MARK <ok@example\.org> 12")
    assert "MARK <late@example.org>" not in m.text, m.text


def late_then_ok(m, failed: str) -> None:
    """<late@example.org> answered as -onerror says (SMFIS_REJECT), its callback's line ``failed``
    logged; then <ok@example.org> served as usual, and the milter stopped."""
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<late@example.org>") == ("r", {})
        logged(m, failed)
        assert mta.mail("<ok@example.org>") == ("c", {})
    assert m.stop() == 0


# ---------------------------------------------------------------------------- workers


PID_HOOKS = r'''
import os
import time


def setup(milter):
    milter.tcl_command("pypid", os.getpid)
    milter.tcl_command("hold", lambda seconds: time.sleep(float(seconds)))
'''


def test_every_worker_has_the_commands(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc from {ctx list} {
            if {[lindex $list 0] eq "<hold@example.org>"} { hold 2 }
            return SMFIS_CONTINUE
        }
        proc eom {ctx} { $ctx addheader X-Worker "[pypid] [pid]"; return SMFIS_CONTINUE }
        milter register envfrom from
        milter register eom eom
        milter main
    """, "--workers", "2", python=[PID_HOOKS])
    m.wait_for("2 workers serving")
    results: dict[str, list] = {}

    def message(sender: str) -> None:
        with m.mta() as mta:
            mta.negotiate()
            results[sender] = mta.message(sender=sender)["eom"]

    # While one worker is held in a Python command, the other one must take the next connection.
    held = threading.Thread(target=message, args=("<hold@example.org>",))
    held.start()
    time.sleep(0.5)
    message("<free@example.org>")
    held.join(10)
    assert m.stop() == 0
    pids = set()
    for sender in ("<hold@example.org>", "<free@example.org>"):
        (code, header), final = results[sender]
        assert code == "h" and final == ("c", b"")
        py_pid, tcl_pid = header.split(b"\0")[1].split()
        assert py_pid == tcl_pid  # the command ran in the worker that served the connection
        pids.add(py_pid)
    assert len(pids) == 2


# ---------------------------------------------------------------------------- try and check


TRY_HOOKS = r'''
def setup(milter):
    seen = []

    @milter.tcl_command("remember")
    def remember(word):
        seen.append(word)
        return len(seen)

    milter.tcl_command("recall", lambda: seen)
'''

TRY_SCRIPT = r"""
package require TclMilter
remember load-time
proc from {ctx list} { remember [lindex $list 0]; return SMFIS_CONTINUE }
proc eom {ctx} { $ctx addheader X-Seen [join [recall] ", "]; return SMFIS_CONTINUE }
milter register envfrom from
milter register eom eom
milter main
"""


def test_try_and_check_run_a_script_with_python_commands(tmp_path: Path):
    script, hooks = tmp_path / "cmds.tcl", tmp_path / "hooks.py"
    script.write_text(TRY_SCRIPT)
    hooks.write_text(TRY_HOOKS)
    status, out = cli("try", str(script), str(DATA / "plain.eml"), "--python", str(hooks))
    assert status == 0, out
    assert "X-Seen: load-time, <alice@example.org>" in out
    status, out = cli("check", str(script), "--python", str(hooks))
    assert status == 0, out
    assert "python commands:\n  remember word\n  recall\n" in out
    assert "error" not in out
    status, out = cli("try", str(script), str(DATA / "plain.eml"))  # without the hooks file
    assert status == 70, out
    assert 'invalid command name "remember"' in out


def test_check_reports_a_python_error_at_load_time_with_file_and_line(tmp_path: Path):
    script, hooks = tmp_path / "broken.tcl", tmp_path / "hooks.py"
    script.write_text("package require TclMilter\n\nopenstore /nonexistent/dir/x.db\nmilter main\n")
    hooks.write_text("def setup(milter):\n"
                     "    milter.tcl_command('openstore', lambda path: open(path, 'w'))\n")
    status, out = cli("check", str(script), "--python", str(hooks))
    assert status == 1, out
    assert (f"{script}:3: error: [Errno 2] No such file or directory: '/nonexistent/dir/x.db'") in out
    assert "FileNotFoundError" in out  # the Python traceback in errorInfo


_EXITED = ("called sys.exit({}) while loading; a --python file cannot end pytclmilter (raise an exception "
           "to fail the load)")


def test_a_python_file_that_fails_to_load_is_reported_by_file_with_its_traceback(tmp_path: Path):
    """An import error or a setup() that raises names the file, shows the traceback from the
    file on (not pytclmilter's frames), and exits as the table of cli.md says: not with exit 1,
    which means "rejected" to a caller of `try`."""
    script = tmp_path / "s.tcl"
    script.write_text("package require TclMilter\nmilter main\n")
    broken = {
        "imports.py": ("import no_such_module_here\ndef setup(milter):\n    pass\n",
                       "ModuleNotFoundError: No module named 'no_such_module_here'", "line 1, in <module>"),
        "setup.py": ("def setup(milter):\n    raise RuntimeError('store\\nunreachable')\n",
                     "RuntimeError: store\\nunreachable", "line 2, in setup"),
        # sys.exit(3) ended the command silently with 3, which try reports as "discarded"
        "exits.py": ("import sys\ndef setup(milter):\n    sys.exit(3)\n", _EXITED.format(3), "line 3, in setup"),
        "exits_at_import.py": ("import sys\nsys.exit()\n", _EXITED.format(None), "line 2, in <module>"),
        # neither an Exception nor sys.exit(): "unexpected error", pytclmilter's frames first
        "base.py": ("class Stop(BaseException):\n    pass\ndef setup(milter):\n    raise Stop('no store')\n",
                    "Stop: no store", "line 4, in setup"),
        "generator_exit.py": ("raise GeneratorExit\ndef setup(milter):\n    pass\n", "GeneratorExit: ",
                              "line 1, in <module>"),
        # an exception whose __str__ raises: "unexpected error: RuntimeError", pytclmilter's frames
        "unshowable.py": ("class Unshowable(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\n"
                          "def setup(milter):\n    raise Unshowable()\n",
                          "Unshowable: <exception str() failed>", "line 5, in setup"),
    }
    for name, (source, message, where) in broken.items():
        hooks = tmp_path / name
        hooks.write_text(source)
        for command, args, expected in (("try", [str(DATA / "plain.eml")], 70), ("check", [], 1), ("run", [], 1)):
            status, out = cli(command, str(script), *args, "--python", str(hooks),
                              *(["--connection", f"unix:{tmp_path}/x.sock"] if command == "run" else []))
            assert status == expected, (command, name, out)
            assert f"pytclmilter {command}: --python {hooks}: {message}\n" in out, out
            assert f'File "{hooks}", {where}' in out, out
            assert "common.py" not in out and "cli.py" not in out, out


# ---------------------------------------------------------------------------- the API


def test_names_and_functions_tcl_cannot_use_are_refused_when_defined(tcl_host):
    host = tcl_host
    milter = host.milter

    async def coroutine(x):
        return x

    def keyword_only(x, *, y):
        return x

    class AsyncCall:
        async def __call__(self, x):
            return x

    def rest_then_keyword_only(*words, sep):  # the check once skipped what follows *words
        return sep.join(words)

    refused = {
        "set": (lambda: milter.tcl_command("set", len), 'tcl_command: "set" is already a Tcl command'),
        "milter": (lambda: milter.tcl_command("milter", len), 'tcl_command: "milter" is pytclmilter\'s own command'),
        "ns": (lambda: milter.tcl_command("::tclmilter::x", len), "is pytclmilter's own command"),
        "empty": (lambda: milter.tcl_command("", len), "must be a non-empty string"),
        "blank": (lambda: milter.tcl_command(" \t", len), "tcl_command: bad command name ' \\t': must be a non-empty "
                                                          "string"),
        "exit": (lambda: milter.tcl_command("exit", len), 'tcl_command: "exit" is pytclmilter\'s own command'),
        "async": (lambda: milter.tcl_command("co", coroutine), "a Tcl command cannot be async"),
        # (an object whose __call__ is async was taken, and every call failed: "a coroutine has no Tcl form")
        "async-call": (lambda: milter.tcl_command("co2", AsyncCall()), "a Tcl command cannot be async"),
        "kwonly": (lambda: milter.tcl_command("kw", keyword_only), "keyword-only parameter 'y' has no default"),
        "rest-kwonly": (lambda: milter.tcl_command("kw2", rest_then_keyword_only),
                        "keyword-only parameter 'sep' has no default"),
        "callable": (lambda: milter.tcl_command("nc", 3), "is not callable"),
    }
    for name, (define, message) in refused.items():
        with pytest.raises(ValueError) as info:
            define()
        assert message in str(info.value), name

    @milter.tcl_command("later")
    def later(word):
        return word.upper()

    assert later("x") == "X"  # the decorator gives the function back
    assert host.child_call("later", "defined after the interpreter") == "DEFINED AFTER THE INTERPRETER"
    with pytest.raises(ValueError, match='"later" is already defined'):
        milter.tcl_command("later", str)
    assert [c.name for c in milter.tcl_commands] == ["later"]


# ---------------------------------------------------------------------------- Python calls Tcl


CALLS_SCRIPT = r"""
package require TclMilter
proc is_blacklisted {addr} { expr {[string match *@spam.example> $addr] ? 1 : 0} }
proc listed {args} { return [list one "two words" {} {*}$args] }
proc echo {value} { return "<$value>" }
proc priv_of {ctx name} { $ctx getpriv $name }
proc fails {what} { error "no $what here" "" {MYAPP NOTFOUND} }
proc eom {ctx} { $ctx addheader X-Tcl-Eom yes; return SMFIS_CONTINUE }
proc outer {value} { return [py_outer $value] }
proc inner {value} { return "inner($value)" }
milter register eom eom
milter main
"""

CALLS_HOOKS = r'''
from pytclmilter import CONTINUE, REJECT, TclError


def setup(milter):
    @milter.register("envfrom")
    def envfrom(ctx, args):
        if ctx.tcl("is_blacklisted", args[0]) == "1":
            return REJECT
        ctx.setpriv("sender", args[0])
        return CONTINUE

    @milter.register("header")
    def header(ctx, name, value):
        if name == "X-Raw":
            ctx.setpriv("echo", ctx.tcl("echo", value))

    @milter.tcl_command("py_outer")
    def py_outer(value):
        return milter.tcl("inner", value)  # outside a connection's context: the milter's variant

    @milter.register("eom")
    def eom(ctx):
        ctx.addheader("X-List", "|".join(ctx.tcl_list("listed", "x y", 7)))
        ctx.addheader("X-Empty", str(ctx.tcl_list("list")))
        ctx.addheader("X-Priv", ctx.tcl("priv_of", ctx, "sender"))  # a context: its context command
        ctx.addheader("X-Echo", ctx.getpriv("echo"))
        ctx.addheader("X-Nested", ctx.tcl("outer", "v"))
        # a context in a list too (it was refused: "a Context has no Tcl form (return ...)")
        ctx.addheader("X-In-List", ctx.tcl("lindex", [ctx, "x"], 0).replace(ctx.tcl("string", "cat", ctx), "ctx"))
        try:
            ctx.tcl("list", object())
        except TypeError as exc:
            ctx.addheader("X-Refused", str(exc)[:46])
        try:
            ctx.tcl("fails", "key")
        except TclError as exc:
            print("ERRORINFO<<" + exc.error_info + ">>", flush=True)
            ctx.addheader("X-Error", f"{exc.message} / {' '.join(exc.error_code)}")
        if ctx.getpriv("sender") == "<uncaught@example.org>":
            ctx.tcl("fails", "luck")
'''


CODES_HOOKS = r"""
from pytclmilter import CONTINUE, TclError

CALLS = {"proc break": ("breaks",), "proc continue": ("continues",), "proc code 6": ("code6",),
         "proc return": ("returns",), "proc error": ("errs",), "break": ("return", "-code", "break", "X"),
         "code 6": ("return", "-code", "6", "Y"), "return": ("return", "-code", "return", "Z")}


def setup(milter):
    def said(where, call):
        for name, words in CALLS.items():
            try:
                result = f"ok {call(*words)!r}"
            except TclError as exc:
                result = f"error {exc.message} / {' '.join(exc.error_code)}"
            print(f"CODE {where} {name}: {result}", flush=True)

    @milter.register("envfrom")
    def envfrom(ctx, args):
        said("callback", ctx.tcl)
        said("callback-list", ctx.tcl_list)
        return CONTINUE

    @milter.tcl_command("pysaid")
    def pysaid():
        said("command", milter.tcl)
        said("command-list", milter.tcl_list)
"""


def test_a_break_from_milter_tcl_in_a_python_command_is_an_error_as_from_a_callback(tclrun):
    """ctx.tcl and milter.tcl run the command at the script's global level, as a callback runs,
    where Tcl makes a break, continue or other code an error: so it did from a Python callback,
    but from a Python command, called inside a Tcl callback, `return -code break X` came back as
    the result "X", and a proc's `return -code 6 Y` as "Y": no error, the code went on."""
    m = tclrun(r"""
        package require TclMilter
        proc breaks {} { return -code break X }
        proc continues {} { continue }
        proc code6 {} { return -code 6 Y }
        proc returns {} { return -code return Z }
        proc errs {} { return -code error -errorcode {MY CODE} oops }
        proc helo {ctx host} { pysaid; return SMFIS_CONTINUE }
        milter register helo helo
        milter main
    """, python=[CODES_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.helo("mx.example"))
        assert ok(mta.mail("<a@example.org>"))
    assert m.stop() == 0
    said = dict(re.findall(r"CODE (\S+ [^:]+): (.*)", m.text))
    for kind in ("", "-list"):
        for name in ("proc break", "proc continue", "proc code 6", "proc return", "proc error", "break", "code 6",
                     "return"):
            assert said[f"command{kind} {name}"] == said[f"callback{kind} {name}"], (kind, name, said)
    assert said["command break"].startswith('error invoked "break" outside of a loop'), said
    assert said["command proc code 6"].startswith("error command returned bad code: 6"), said
    assert said["command return"] == "ok 'Z'" and said["command-list return"] == "ok ['Z']", said


def test_python_callbacks_call_the_scripts_procs(tclrun):
    m = tclrun(CALLS_SCRIPT, python=[CALLS_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<x@spam.example>") == ("r", {})
        assert ok(mta.mail("<a@example.org>"))
        assert ok(mta.rcpt("<b@example.com>"))
        assert ok(mta.event_raw("L", z("X-Raw", RAW)))
        assert ok(mta.eoh())
        reply = mta.eom()
        assert mta.mail("<uncaught@example.org>") == ("c", {})
        assert ok(mta.rcpt("<b@example.com>"))
        assert mta.eom() == [("t", b"")]  # -onerror: tempfail
    assert m.stop() == 0
    assert reply == [("h", z("X-List", "one|two words||x y|7")), ("h", z("X-Empty", "[]")),
                     ("h", z("X-Priv", "<a@example.org>")), ("h", z("X-Echo", b"<" + RAW + b">")),
                     ("h", z("X-Nested", "inner(v)")), ("h", z("X-In-List", "ctx")),
                     ("h", z("X-Refused", "an object has no Tcl form (pass a context, str")),
                     ("h", z("X-Error", "no key here / MYAPP NOTFOUND")),
                     ("h", z("X-Tcl-Eom", "yes")), ("c", b"")]
    # errorInfo is the script's, without the frames of the call itself (printed by the hook: its
    # lines after the first that start with no space indented, as run writes a print's lines)
    info = re.search(r"ERRORINFO<<(.*?)>>", m.text, re.S).group(1)
    assert info.split("\n") == ["no key here", "    while executing", '  "error "no $what here" "" {MYAPP NOTFOUND} "',
                                '    (procedure "fails" line 1)', "    invoked from within", '  "fails key"']
    # Uncaught, the Tcl error fails the Python callback: its traceback, then Tcl's errorInfo
    logged(m, r"ERROR: conn#1: eom callback setup\.<locals>\.eom failed \(no luck here\), answering SMFIS_TEMPFAIL:\n"
              r"  Traceback \(most recent call last\):\n(.*\n)*?"
              r'    ctx\.tcl\("fails", "luck"\)\n(.*\n)*?'
              r"  pytclmilter\.scripting\.TclError: no luck here\n  Tcl errorInfo:\n  no luck here\n"
              r"    while executing\n(.*\n)*?"
              r'  "fails luck"\n')


LOOP_HOOKS = r'''
import asyncio
import time


def setup(milter):
    milter.tcl_command("slow", lambda seconds: time.sleep(float(seconds)))

    @milter.register("envfrom")
    def plain(ctx, args):
        if args[0] == "<plain@example.org>":
            ctx.tcl("spin")
        elif args[0] == "<nested@example.org>":
            ctx.tcl("callslow")  # Python -> Tcl -> Python, all within this callback's time
        elif args[0] == "<vwait@example.org>":
            ctx.tcl("waitforever")  # Tcl reports the limit inside vwait in its own words
        elif args[0] == "<late@example.org>":
            time.sleep(0.7)
            ctx.tcl("spin")  # the 0.3 s this callback has left, not a second of its own

    @milter.register("envfrom")
    async def later(ctx, args):
        if args[0] == "<async@example.org>":
            await asyncio.sleep(0.1)
            ctx.tcl("spin")
'''


def test_tcl_run_from_a_python_callback_is_held_to_the_callbacks_time_limit(tclrun):
    m = tclrun(r"""
        package require TclMilter
        milter configure -calltimeout 1 -onerror SMFIS_REJECT
        proc spin {} { while 1 { catch { while 1 {} } } }
        proc callslow {} { while 1 { catch { slow 30 } } }
        proc waitforever {} { vwait ::never }
        proc from {ctx list} { return SMFIS_CONTINUE }
        milter register envfrom from
        milter main
    """, python=[LOOP_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        for count, case in enumerate(("plain", "async", "nested", "vwait", "late"), 1):
            t0 = time.monotonic()
            assert mta.mail(f"<{case}@example.org>") == ("r", {}), case
            assert 0.9 <= time.monotonic() - t0 <= (1.45 if case == "late" else 4.0), case
            logged(m, r"envfrom callback setup\.<locals>\.(plain|later) failed \(callback stopped after 1 s "
                      r"\(call_timeout\)", count)
            assert mta.mail("<ok@example.org>") == ("c", {})  # Tcl and Python callbacks run again
    assert m.stop() == 0
    # the nested case: where the Python command was, under the callback's own traceback
    logged(m, r'  ctx\.tcl\("callslow"\)(.*\n)*?  Python command slow stopped at the time limit in:\n'
              r'  File ".*hooks0\.py", line 7, in <lambda>\n')
    # and only there: the cases after it were stopped in Tcl code alone
    assert m.text.count("Python command slow stopped") == 1, m.text
    # under the traceback, where the Tcl code was when it was stopped
    logged(m, r'  pytclmilter\.limits\.CallbackTimeout: callback stopped after 1 s \(call_timeout\), in Tcl code\n'
              r'  Tcl errorInfo:\n  time limit exceeded\n(.*\n)*?    \(procedure "spin" line 1\)\n', 3)


def test_tcl_calls_need_a_script_and_the_milters_thread(tcl_host):
    from pytclmilter import Context, Milter
    from pytclmilter.protocol.macros import MacroStore
    for no_script in (Milter(), Context(1, MacroStore())):
        with pytest.raises(RuntimeError, match="no Tcl script runs with this milter"):
            no_script.tcl("set", "x")
    host = tcl_host
    assert host.milter.tcl("set", "x", "caf\udce9") == "caf\udce9"
    assert host.milter.tcl_list("list", "a b", "c") == ["a b", "c"]
    for call in (host.milter.tcl, host.milter.tcl_list):
        with pytest.raises(TypeError, match="^ctx.tcl needs a command name$"):
            call()
    failed: list[BaseException] = []
    thread = threading.Thread(target=lambda: failed.append(pytest.raises(RuntimeError, host.milter.tcl, "set", "x")))
    thread.start()
    thread.join()
    assert "on the milter's thread only" in str(failed[0].value)


def test_tcl_run_before_the_milter_serves_has_no_time_limit(tcl_host):
    """At load time (a hooks file's setup, the script's own code) nothing is a callback, and Tcl
    run from Python is not held to -calltimeout (docs/python-api.md), as the script itself is not."""
    host = tcl_host
    host.child_call("package", "require", "TclMilter")
    host.child_call("milter", "configure", "-calltimeout", "1")
    host.child_call("proc", "busy", "", "set t [clock milliseconds]\n"
                    "while {[clock milliseconds] - $t < 1300} {}\nreturn done")
    t0 = time.monotonic()
    assert host.milter.tcl("busy") == "done"
    assert time.monotonic() - t0 >= 1.2


@pytest.mark.parametrize("name, shown", [
    ("object", "an object"), ("set", "a set"), ("UUID", "a UUID"), ("HTTPMessage", "an HTTPMessage"),
    ("UnboundLocalError", "an UnboundLocalError"), ("UserDict", "a UserDict"), ("Unicode", "a Unicode"),
    ("OneShot", "a OneShot"),
])
def test_the_article_of_a_type_name_is_the_one_it_is_read_with(name, shown):
    """The "has no Tcl form" message names the type with its article; it said "an UserDict"."""
    from pytclmilter.tcl.usage import with_article

    assert with_article(name) == shown


LATE_HOOKS = r'''
def setup(milter):
    milter.tcl_command("mark", lambda *words: print("MARK", len(words), flush=True))

    @milter.register("envfrom")
    def late(ctx, args):
        if args[0] == "<late@example.org>":
            ctx.tcl("late")  # Python -> Tcl -> Python: the Python limit holds the Python command
'''


def test_a_python_command_entered_after_the_time_ran_out_cannot_be_caught(tclrun):
    """Python's limit stops the command by an exception raised where Python runs next: when the
    time ran out in Tcl's C code (`exec`; a long argument being converted), that is the command's
    runner, outside the command, and its CallbackTimeout became a Tcl error (an empty one) that
    the script's `catch` took, running on past -calltimeout. Now the callback ends at the limit
    as for any callback over it: no catch can keep it going."""
    m = tclrun(r"""
        package require TclMilter
        milter configure -calltimeout 1 -onerror SMFIS_REJECT
        proc late {} {
            exec sleep 1.3
            foreach i {1 2 3 4 5 6 7 8 9 10 11 12} { catch { mark [string repeat x 100000] $i } ::caught($i) }
        }
        proc from {ctx list} {
            # (a catch sets its variable without running a command: Tcl's limit cannot come first)
            if {[info exists ::caught]} { puts "[string toupper caught] [array get ::caught]" }
            return SMFIS_CONTINUE
        }
        milter register envfrom from
        milter main
    """, python=[LATE_HOOKS])
    late_then_ok(m, r"envfrom callback setup\.<locals>\.late failed \(callback stopped after 1 s \(call_timeout\)")
    assert "CAUGHT" not in m.text and "MARK" not in m.text, m.text


LONE_BACK_SCRIPT = r"""
package require TclMilter
proc lone {} { return a[format %c 0xD800]b }
proc from {ctx args} { $ctx setpriv lone [lone]; $ctx setpriv byte [encoding convertfrom identity \xed\xb3\xbf]; return SMFIS_CONTINUE }
milter register envfrom from
milter main
"""

LONE_BACK_HOOKS = r"""
from pytclmilter import CONTINUE, MilterError


def setup(milter):
    @milter.register("eom")
    def eom(ctx):
        for name, value in (("priv", ctx.getpriv("lone")), ("all", ctx.getpriv()["lone"]), ("tcl", ctx.tcl("lone")),
                            ("list", ctx.tcl_list("list", ctx.tcl("lone"))[0]), ("byte", ctx.getpriv("byte"))):
            try:
                ctx.addheader("X-" + name, value)
                print(f"LONE {name} sent {ascii(value)}", flush=True)
            except MilterError as exc:
                print(f"LONE {name} refused {ascii(value)}: {exc}", flush=True)
        return CONTINUE
"""


def test_a_lone_surrogate_of_the_script_reaches_python_as_its_character_and_is_not_sent(tclrun):
    """Bug: Tcl keeps [format %c 0xD800] as its CESU-8 bytes, and what Python read of the script's
    text as bytes (private data, ctx.tcl and ctx.tcl_list results) made each of those three bytes
    an escaped byte: ctx.addheader sent ED A0 80, no UTF-8 and not the script's character, where
    the script's own addheader of it is refused (25294e9). Now Python gets "\\ud800", as a Python
    command's argument does, and sending it is refused; an escaped byte (U+DCFF) is still its byte."""
    m = tclrun(LONE_BACK_SCRIPT, python=[LONE_BACK_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.mail("<a@example.org>"))
        reply = mta.eom()
    assert m.stop() == 0
    assert reply == [("h", b"X-byte\0\xff\0"), ("c", b"")], (reply, m.text[-3000:])
    for name in ("priv", "all", "tcl", "list"):
        assert f"LONE {name} refused 'a\\ud800b': \"a\\ud800b\" holds U+D800, a surrogate" in m.text, m.text[-3000:]
