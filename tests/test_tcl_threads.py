"""Thread package workers talking to the script's thread: what they send is evaluated in the
script's own interpreter, as under tclsh.

Each script is also run by the real ``tclsh`` (Debian's tclsh8.6, with the Thread package), minus
the milter parts, as the reference: the ``R`` lines both print must be the same.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from support.tclrun import Mta, TclRun, spawn, tclrun_factory
from test_tcl_runtime import LOW_GROWTH_THRESHOLDS, _connections

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

TCLSH = shutil.which("tclsh8.6") or shutil.which("tclsh")

# R reports a value on one line (newlines and tabs of errorInfo shown as | and >).
REPORT = r"""
proc R {key value} { puts "R\t$key\t[string map [list \n | \t >] $value]" }
"""


def _results(text: str) -> dict[str, str]:
    """The R lines as a dict, thread handles (``tid0x7f...``) made comparable."""
    out = {}
    for line in re.sub(r"\r+\n", "\n", text).splitlines():
        if line.startswith("R\t"):
            _, key, value = line.split("\t", 2)
            out[key] = re.sub(r"tid0x[0-9a-f]+", "tidN", value)
    return out


def _tclsh(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    if TCLSH is None:
        pytest.skip("no tclsh to compare with (Debian: apt-get install tcl8.6 tcl-thread)")
    path = tmp_path / "reference.tcl"
    path.write_text(textwrap.dedent(script), encoding="utf-8")
    return subprocess.run([TCLSH, str(path)], capture_output=True, text=True, timeout=60, check=False)


def _both(tmp_path: Path, script: str) -> tuple[dict[str, str], dict[str, str], subprocess.CompletedProcess[str], TclRun]:
    """The same script (no milter parts) under tclsh and under ``pytclmilter run``."""
    ref = _tclsh(tmp_path, script)
    run = spawn(tmp_path, script, wait=False)
    try:
        assert run.wait_exit(30) == ref.returncode == 0, (ref.stderr, run.output)
    finally:
        run.kill()
    return _results(ref.stdout), _results(run.output), ref, run


def test_async_send_from_a_worker_ends_the_scripts_vwait_before_main(tmp_path):
    """A worker's `thread::send -async $main {set ::flag done}` sets the script's variable, so
    `vwait ::flag` returns; an error in an async script is logged, where tclsh prints it raw."""
    script = REPORT + r"""
        package require Thread
        set main [thread::id]
        thread::create [list apply {{main} {
            thread::send -async $main {error "async boom"}
            thread::send -async $main {set ::flag done}
        }} $main]
        after 5000 {set ::flag "timed out"}
        vwait ::flag
        R flag $::flag
        update  ;# (the error, reported to the script's thread, is logged when its event loop runs)
        exit 0
    """
    ref, ours, tclsh, run = _both(tmp_path, script)
    assert ref == {"flag": "done"}
    assert ours == ref
    assert re.search(r'Error from thread tid0x[0-9a-f]+\nasync boom\n    while executing\n"error "async boom""',
                     tclsh.stderr), tclsh.stderr
    assert re.search(r'ERROR: error in thread tid0x[0-9a-f]+ \(thread::send -async, or the thread\'s own script\): '
                     r'async boom\n  async boom\n    while executing\n  "error "async boom""', run.text), run.text


THREAD_ERRORS = r"""
    package require TclMilter
    package require Thread
    set main [thread::id]
    thread::create [list apply {{main} {
        thread::send -async $main [list error "from <a\x1b\[2J@b>\nERROR: forged line"]
        for {set i 0} {$i < 300} {incr i} {
            thread::send -async $main "set ::x {boom $i} \[nosuch\]"
        }
        thread::send -async $main {set ::sent 1}
    }} $main]
    vwait ::sent
    set t [thread::create -joinable {expr {"the thread's own script" / 0}}]
    thread::join $t
    after 100 {milter stop}
    milter main
"""


def test_errors_in_threads_are_logged_escaped_and_a_flood_counted(tmp_path):
    """Errors no caller gets back (an -async send's, a thread's own script's): Thread printed
    each on stderr as `Error from thread tid0x...` and the raw errorInfo, so an MTA's text in
    the message forged a journal line and 300 failures printed 1200 lines. Now each is logged
    as an event handler's error is: escaped, one line and its errorInfo indented, the same
    failure again counted, its count told at stop."""
    run = spawn(tmp_path, THREAD_ERRORS, wait=False)
    try:
        assert run.wait_exit(30) == 0, run.output
    finally:
        run.kill()
    text = run.text
    what = r"ERROR: error in thread tid0x[0-9a-f]+ \(thread::send -async, or the thread's own script\): "
    assert re.search(what + r"from <a\\x1b\[2J@b>\\nERROR: forged line\n  from <a\\x1b\[2J@b>\n"
                     r"  ERROR: forged line\n    while executing\n", text), text
    assert "\x1b" not in text and "\nERROR: forged" not in text and "Error from thread" not in text, text
    assert re.search(what + 'invalid command name "nosuch"\n  invalid command name "nosuch"\n    while executing\n'
                     '  "nosuch"\n    invoked from within\n  "set ::x {boom 0} \\[nosuch\\]"\n', text), text
    assert re.search(what + 'invalid command name "nosuch" \\(repeated 299 times since its last line with the '
                     'trace; logged once a minute\\)\n', text), text
    assert re.search(what + r'can\'t use non-numeric string as operand of "/"\n  can\'t use non-numeric string as '
                     r'operand of "/"\n    while executing\n  "expr \{"the thread\'s own script" / 0\}"\n', text), text
    assert text.count("invalid command name") == 3, text  # (the first line, its errorInfo's, the count's)


def test_sync_send_to_the_main_thread_returns_its_result_from_the_scripts_interpreter(tmp_path):
    """`thread::send $main` (sync, and with -head) runs in the script's interpreter, with its procs
    and globals, and returns the result; `thread::id` in the script is the thread workers reach."""
    script = REPORT + r"""
        package require Thread
        set main [thread::id]
        set ::greeting hello
        proc note {x} { lappend ::notes $x; return "noted $x" }
        set w [thread::create -joinable [list apply {{main} {
            set r [list [thread::send $main {expr 6*7}]]
            lappend r [thread::send $main {note $::greeting}]
            lappend r [thread::send -head $main {set ::head first}]
            thread::send -async $main [list set ::report $r]
        }} $main]]
        after 5000 {set ::report "timed out"}
        vwait ::report
        R report $::report
        R notes $::notes
        R head $::head
        thread::join $w
        exit 0
    """
    ref, ours, _, _ = _both(tmp_path, script)
    assert ref == {"report": "42 {noted hello} first", "notes": "hello", "head": "first"}
    assert ours == ref


def test_error_in_a_sync_send_reaches_the_worker_as_in_tclsh(tmp_path):
    """An error in the script's interpreter comes back to the worker's `thread::send` with its
    message, errorCode and errorInfo; an unknown command is the script's, not the host's."""
    script = REPORT + r"""
        package require Thread
        set main [thread::id]
        proc fail {} { error boom {} {MY CODE} }
        set w [thread::create -joinable [list apply {{main} {
            set code [catch {thread::send $main fail} msg opts]
            set r [list $code $msg [dict get $opts -errorcode] [dict get $opts -errorinfo]]
            lappend r [catch {thread::send $main {nosuchcmd 1}} msg] $msg
            thread::send -async $main [list set ::report $r]
        }} $main]]
        after 5000 {set ::report "timed out"}
        vwait ::report
        foreach k {code msg errorcode errorinfo code2 msg2} v $::report { R $k $v }
        thread::join $w
        exit 0
    """
    ref, ours, _, _ = _both(tmp_path, script)
    assert ref["code"] == "1" and ref["msg"] == "boom" and ref["errorcode"] == "{MY CODE}"  # Thread wraps it in a list
    assert ref["errorinfo"].startswith('boom|    while executing|"error boom {} {MY CODE} "|    (procedure "fail"')
    assert ref["errorinfo"].endswith('invoked from within|"thread::send $main fail"')
    assert ref["code2"] == "1" and ref["msg2"] == 'invalid command name "nosuchcmd"'
    assert ours == ref


# The part shared by the serving test and its tclsh reference: a worker that sends async, then
# sync (the main thread must serve it while it waits), then async again, and ends.
WORKER = REPORT + r"""
    package require Thread
    proc done {answer} { set ::answer $answer; R answer $answer }
    proc start_worker {} {
        thread::create [list apply {{main} {
            thread::send -async $main {set ::seen yes}
            set r [thread::send $main {expr 6*7}]
            thread::send -async $main [list done $r]
        }} [thread::id]]
    }
"""


def test_worker_sends_are_served_while_main_runs(tclrun, tmp_path):
    """While `milter main` serves, a worker started by a callback reaches the script's
    interpreter with async and sync sends, also the one it sends just before it ends; the
    eom callback reads the variables they set."""
    ref = _tclsh(tmp_path, WORKER + r"""
        start_worker
        after 5000 {set ::answer "timed out"}
        vwait ::answer
        R seen $::seen
        exit 0
    """)
    assert _results(ref.stdout) == {"answer": "42", "seen": "yes"}
    m = tclrun(WORKER + r"""
        package require TclMilter
        proc helo {ctx host} { start_worker; return SMFIS_CONTINUE }
        proc eom {ctx} {
            $ctx setreply 550 5.7.1 "seen=[set ::seen] answer=[set ::answer]"
            return SMFIS_REJECT
        }
        milter register helo helo
        milter register eom eom
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("c", {})
        m.wait_for(r"R\tanswer\t42\r*\n")  # printed by `done`, run in the main thread
        steps = mta.message()
        assert steps["eom"] == [("y", b"550 5.7.1 seen=yes answer=42\0")]
    assert m.stop() == 0


@pytest.mark.parametrize("loaded", ["at the top", "in the callback"])
def test_vwait_in_a_callback_gets_a_workers_send(tclrun, loaded):
    """Also where the script loads Thread only in the callback, after the event loop has ticked
    while it was quiet: Thread sends to the first interpreter of the thread that used it, so the
    idle check must not touch Thread before the script does (a worker's send was lost)."""
    top, inner = ("package require Thread", "") if loaded == "at the top" else ("", "package require Thread")
    m = tclrun(REPORT + r"""
        package require TclMilter
        TOP
        proc helo {ctx host} {
            INNER
            thread::create [list thread::send -async [thread::id] {set ::flag done}]
            after 5000 {set ::flag "timed out"}
            vwait ::flag
            $ctx setreply 550 5.7.1 "flag=$::flag"
            return SMFIS_REJECT
        }
        milter register helo helo
        milter main
    """.replace("TOP", top).replace("INNER", inner))
    with m.mta() as mta:
        mta.negotiate()
        time.sleep(0.2)  # idle ticks (every 20 ms) before the script's first use of Thread
        assert mta.helo() == ("y", {"smtpcode": "550", "space": " ", "text": "5.7.1 flag=done"})
    assert m.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_send_from_a_worker_that_has_ended_is_still_served(tclrun, workers):
    """A worker that sends and ends at once may be gone before the event loop next looks for a
    second thread: its message waits in the queue all the same and must be served (also in a
    process forked by --workers)."""
    m = tclrun(REPORT + r"""
        package require TclMilter
        package require Thread
        proc helo {ctx host} {
            thread::create [list thread::send -async [thread::id] {set ::seen yes; R seen yes}]
            return SMFIS_CONTINUE
        }
        proc eom {ctx} {
            $ctx setreply 550 5.7.1 "seen=[set ::seen]"
            return SMFIS_REJECT
        }
        milter register helo helo
        milter register eom eom
        milter main
    """, "--workers", workers)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("c", {})
        m.wait_for(r"R\tseen\tyes\r*\n")
        assert mta.message()["eom"] == [("y", b"550 5.7.1 seen=yes\0")]
    assert m.stop() == 0


def test_threads_started_before_main_with_workers_fail_loudly(tclrun):
    """--workers forks at `milter main` and a fork keeps no thread: a script's thread would be
    missing in the workers (a sync send to it would hang one for good), so `milter main` says so."""
    m = tclrun(r"""
        package require TclMilter
        package require Thread
        set w [thread::create {proc hi {} {return hello}; thread::wait}]
        proc helo {ctx host} { $ctx setreply 550 5.7.1 [thread::send $::w hi]; return SMFIS_REJECT }
        milter register helo helo
        milter main
    """, "--workers", "2", wait=False)
    assert m.wait_exit() == 1
    assert ("milter main: -workers 2 forks the serving processes and a fork keeps no thread, so the script's "
            "1 other thread(s) would not be in them: start threads in callbacks, or serve with -workers 1") in m.text
    assert "listening on" not in m.text


_POOL_IN_CALLBACK = r"""
    package require TclMilter
    package require Thread
    %s
    set ::pool [tpool::create -minworkers %d]
    proc helo {ctx host} {
        set job [tpool::post $::pool {expr {6 * 7}}]
        tpool::wait $::pool $job
        $ctx setreply 550 5.7.1 "got [tpool::get $::pool $job]"
        return SMFIS_REJECT
    }
    milter register helo helo
    milter main
"""
_UNLISTED = ("milter main: -workers 2 forks the serving processes and a fork keeps no thread, so %d thread(s) of "
             "this process that `thread::names` does not list would not be in them: a thread pool's workers")
#: Before the pool, or not: an event waited for starts Tcl's notifier thread, which is not counted.
_WAITED = pytest.mark.parametrize("waited", ["", "after 10 {set ::x 1}; vwait ::x"], ids=["", "notifier"])


@_WAITED
def test_a_pool_with_workers_made_before_main_with_workers_fails_loudly(tclrun, waited):
    """A pool's workers are threads that `thread::names` does not list: forked, the pool believed
    its two workers idle without them, and each --workers worker's first `tpool::wait` waited
    for ever in C (no -calltimeout stops it; the stop ended it past the grace, exit status 1).
    Now `milter main` counts the process's threads (/proc/self/task) and refuses the fork."""
    m = tclrun(_POOL_IN_CALLBACK % (waited, 2), "--workers", "2", wait=False)
    assert m.wait_exit() == 1
    assert _UNLISTED % 2 in m.text, m.text
    assert "create the pool in a callback (the first that needs it), or with -minworkers 0" in m.text
    assert "listening on" not in m.text


@_WAITED
def test_a_pool_without_workers_made_before_main_serves_in_each_worker(tclrun, waited):
    """`tpool::create -minworkers 0` starts no thread: each forked worker's pool starts its own
    on its first post, so it is not refused (nor is Tcl's notifier thread, which every serving
    process has), and the job's result comes back in both workers."""
    m = tclrun(_POOL_IN_CALLBACK % (waited, 0), "--workers", "2")
    for _ in range(4):  # (the kernel hands them to either worker)
        with m.mta() as mta:
            mta.negotiate()
            assert mta.helo() == ("y", {"smtpcode": "550", "space": " ", "text": "5.7.1 got 42"})
    assert m.stop() == 0


#: A _tkinter built into the interpreter has no file; one that links Tcl statically may export
#: none of its functions: a library by the file's name then lacks Tcl_SetServiceMode.
_TKINTER_BUILDS = pytest.mark.parametrize("build", [
    "del _tkinter.__file__",
    "_tkinter.__file__ = ctypes.util.find_library('m')",
], ids=["built-in", "static"])


@_TKINTER_BUILDS
@_WAITED
def test_the_threads_are_told_apart_whatever_build_of_tkinter(tclrun, build, waited):
    """Telling Tcl's notifier thread apart called Tcl_SetServiceMode by the name of _tkinter's
    file: where _tkinter is built in, or links Tcl without exporting it, `milter main` with
    --workers 2 failed with a Python traceback ("internal error"). Now the notifier is then taken
    for one of the threads: the script serves, and a pool's workers are still refused (counted
    one too few where the notifier was not running)."""
    python = f"import ctypes.util, _tkinter\n{build}\ndef setup(milter):\n    pass\n"
    m = tclrun(_POOL_IN_CALLBACK % (waited, 0), "--workers", "2", python=[python])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("y", {"smtpcode": "550", "space": " ", "text": "5.7.1 got 42"})
    assert m.stop() == 0
    assert "internal error" not in m.text, m.text
    m = tclrun(_POOL_IN_CALLBACK % (waited, 2), "--workers", "2", wait=False, python=[python])
    assert m.wait_exit() == 1
    assert _UNLISTED % (2 if waited else 1) in m.text, m.text


def test_a_thread_python_does_not_know_of_with_workers_fails_loudly(tclrun):
    """A thread a --python file's C code starts (here faulthandler's watchdog) is neither in
    `threading` nor in `thread::names`: it would not be in the forked workers either."""
    m = tclrun("package require TclMilter\nmilter main\n", "--workers", "2", wait=False, python=["""
        import faulthandler

        def setup(milter):
            faulthandler.dump_traceback_later(3600)
    """])
    assert m.wait_exit() == 1
    assert _UNLISTED % 1 in m.text, m.text


@pytest.mark.parametrize("made, told, absent", [
    ("thread::create {thread::wait}", r"the script runs (\d+) threads of the Thread package besides its own: a "
     r"thread made at every", "`thread::release`"),
    # (no pool's worker is in thread::names: a pool's workers are bounded, its pools are not)
    ("tpool::create -minworkers 1 -maxworkers 1", r"the script has (\d+) thread pools of the Thread package "
     r"\(tpool::create\): a pool made at every", "`tpool::release`"),
], ids=["threads", "pools"])
def test_threads_made_at_every_connection_are_told_once_past_the_threshold(tclrun, made, told, absent):
    """A thread made at every connection and never ended (304 threads after 300 connections),
    or a pool (`tpool::create`, whose workers `thread::names` does not list), grew without a
    word until memory or descriptors ran out. Now one warning when they reach the threshold (3
    here, 64 threads or 16 pools by default), then none until their number doubles."""
    m = tclrun(r"""
        package require TclMilter
        package require Thread
        proc connect {ctx host addr} { %s; return SMFIS_CONTINUE }
        milter register connect connect
        milter main
    """ % made, python=[LOW_GROWTH_THRESHOLDS])
    told = "WARNING: " + told
    _connections(m, 5)  # told at 3 to 5, and again at 6 to 10 at the earliest
    assert 3 <= int(m.wait_for(told).group(1)) <= 5
    time.sleep(0.15)  # three counts more
    assert m.stop() == 0
    assert len(re.findall(told, m.text)) == 1, m.text
    assert absent in m.text and "`after` events" not in m.text, m.text
    assert len(re.findall(r"WARNING: the script (runs|has) \d+", m.text)) == 1, m.text  # (not the other count)


def test_threads_are_told_once_for_the_process_not_once_per_generation(monkeypatch, caplog) -> None:
    """The threads counted are the process's (`thread::names`): during a reload the old and the
    new generation, each with its counts, told the same threads twice, and the new one again from
    the threshold. What was told of them belongs to the process. (In-process: a generation's
    counts are its host's Growth.)"""
    import logging

    from pytclmilter.tcl import growth

    monkeypatch.setattr(growth, "THREADS", 3)
    monkeypatch.setattr(growth.Growth, "_process_threads_told", 0)
    caplog.set_level(logging.WARNING, logger="pytclmilter")
    old, new = growth.Growth(), growth.Growth()
    for generation, threads in ((old, 4), (new, 4), (new, 7), (old, 8), (new, 9)):
        generation.counted(0, threads)
    told = [r.getMessage().split(" threads of")[0] for r in caplog.records]
    assert told == ["the script runs 4", "the script runs 8"], told


# ---------------------------------------------------------------------------- threads and reloads
#
# Thread evaluates what threads send to this thread in the interpreter that ran the thread's
# first thread:: command, for the process's life: a reload must neither delete that interpreter
# (it crashed with SIGSEGV at the next send) nor let a later script's threads send into it.

STOP_FROM_A_THREAD = r"""
package require TclMilter 1.0
proc from {ctx args} {
    thread::create {package require TclMilter; milter stop}
    return SMFIS_CONTINUE
}
milter register envfrom from
milter main
puts "after main"
"""


def test_a_thread_started_after_a_reload_stops_the_milter(tclrun, tmp_path):
    """Generation 1 never used Thread, so it is replaced; the reloaded script's thread runs
    `milter stop` (the manual's use of threads) and the milter stops as it would without a reload."""
    script = tmp_path / "stop.tcl"
    script.write_text(STOP_FROM_A_THREAD)
    run = tclrun(script)
    run.child.kill(signal.SIGUSR1)
    run.wait_for(r"reload: generation 1 is gone \(its last session is over\); generation 2 serves")
    with run.mta() as mta:
        mta.negotiate()
        mta.connect()
        assert mta.mail("<someone@example.org>")[0] == "c"
    assert run.wait_exit(15) == 0, run.output
    assert "after main" in run.text


USES_THREADS = r"""
package require TclMilter 1.0
proc helo {ctx host} {
    set ::main [thread::id]
    return SMFIS_CONTINUE
}
milter register helo helo
milter configure -onerror SMFIS_TEMPFAIL
milter main
"""


def test_a_script_that_used_threads_is_kept_and_a_later_one_cannot_use_them(tclrun, tmp_path):
    """Once generation 1 has used Thread it is not replaced; where it first did so while finishing
    a session after a reload, its interpreter stays and the new script's thread:: commands fail,
    saying why, instead of sending into another script's interpreter."""
    script = tmp_path / "threads.tcl"
    script.write_text(USES_THREADS)
    run = tclrun(script)
    with run.mta() as old:
        old.negotiate()
        old.connect()
        run.child.kill(signal.SIGUSR1)
        run.wait_for(r"reload: loading generation 2")
        assert old.helo()[0] == "c"  # generation 1's first thread:: command, after the reload
        with run.mta() as new:
            new.negotiate()
            new.connect()
            assert new.helo()[0] == "t"
        run.wait_for(r"the Thread package cannot be used by this script: Thread sends what threads send to "
                     r"this thread to the interpreter of the first script in this process that used it "
                     r"\(generation 1\)")
    run.wait_for(r"WARNING: reload: generation 1's interpreter stays for the process's life")
    run.wait_for(r"reload: generation 1 is gone")
    run.child.kill(signal.SIGUSR1)  # generation 2 never used Thread: it can be replaced
    run.wait_for(r"reload: generation 2 is gone \(its last session is over\); generation 3 serves")
    assert run.stop() == 0

    # a script that used Thread while serving is not replaced
    run = tclrun(script)
    with run.mta() as mta:
        mta.negotiate()
        mta.connect()
        assert mta.helo()[0] == "c"
    run.child.kill(signal.SIGUSR1)
    run.wait_for(r"ERROR: reload: generation 2 not loaded, generation 1 serves on unchanged: the serving script "
                 r"has used the Thread package, .* restart instead")
    assert run.stop() == 0


CHILD_USES_THREADS = r"""
package require TclMilter 1.0
interp create c
c eval {
    package require Thread
    thread::join [thread::create -joinable {error "from <a\x1b\[2J@b>\nERROR: forged line"}]
}
milter main
"""


def test_threads_used_only_by_an_interpreter_the_script_created_are_the_scripts(tclrun, tmp_path):
    """Where only an interpreter the script created ran thread:: commands, the script's first
    thread:: command was never seen: a thread's error went to stderr raw (``Error from thread``,
    an ESC, a forged line), and a reload replaced the script, deleting the interpreter Thread
    sends this thread's scripts to. Now the error is logged escaped and the script is kept."""
    script = tmp_path / "child.tcl"
    script.write_text(CHILD_USES_THREADS)
    run = tclrun(script)
    what = r"ERROR: error in thread tid0x[0-9a-f]+ \(thread::send -async, or the thread's own script\): "
    run.wait_for(what)
    run.child.kill(signal.SIGUSR1)
    run.wait_for(r"ERROR: reload: generation 2 not loaded, generation 1 serves on unchanged: the serving script "
                 r"has used the Thread package, .* restart instead")
    assert run.stop() == 0
    assert re.search(what + r"from <a\\x1b\[2J@b>\\nERROR: forged line\n  from <a\\x1b\[2J@b>\n"
                     r"  ERROR: forged line\n    while executing\n", run.text), run.text
    assert "\x1b" not in run.text and "Error from thread" not in run.text, run.text


def test_an_unknown_milter_subcommand_in_a_thread_is_a_bad_option(tmp_path):
    """In a thread `milter bogus` said only `milter stop` works there; Tcl's bad-option message
    comes first, as in the script's interpreter, and the thread restriction is for a real
    subcommand (`milter configure`) that cannot run there."""
    script = REPORT + r"""
        package require Thread
        set r [thread::send [thread::create] {
            package require TclMilter
            set r {}
            foreach cmd {{milter bogus} {milter configure} {milter}} {
                lappend r [catch $cmd m] $m $::errorCode
            }
            set r
        }]
        foreach {code m ec} $r cmd {bogus configure none} { R $cmd "$code $m | $ec" }
        exit 0
    """
    run = spawn(tmp_path, script, wait=False)
    assert run.wait_exit(30) == 0, run.output
    r = _results(run.output)
    assert r["bogus"] == ('1 bad option "bogus": must be configure, main, register, or stop '
                          "| TCL LOOKUP INDEX option bogus"), run.output
    assert r["configure"].startswith('1 milter configure: only "milter stop" works outside the main interpreter'), r
    assert r["none"] == '1 wrong # args: should be "milter option ?arg ...?" | TCL WRONGARGS', r


EXIT_IN_A_THREAD = r"""
package require TclMilter 1.0
package require Thread
proc rc {ctx l} {
    milter configure -onerror SMFIS_REJECT
    thread::create {exit 3}
    after 2000
    return SMFIS_REJECT
}
milter register envrcpt rc
milter main
"""


def test_a_threads_exit_writes_pending_log_lines_and_removes_the_pid_file(tclrun, tmp_path):
    """A thread's `exit` ends the process through C's exit(), which skips Python's finalization:
    the line the callback had logged, waiting in the log handler for the loop's turn, was lost,
    and the pid file was left behind; the script's own `exit` writes the one, removes the other."""
    pidfile = tmp_path / "milter.pid"
    run = tclrun(EXIT_IN_A_THREAD, "--on-error", "tempfail", "--pidfile", str(pidfile))
    assert pidfile.exists()
    with run.mta() as mta:
        mta.negotiate()
        mta.connect()
        mta.mail("<a@example.org>")
        with contextlib.suppress(Exception):  # (the connection ends with the process)
            mta.rcpt("<b@example.org>")
    assert run.wait_exit(15) == 3, run.output
    assert "INFO: milter configure -onerror SMFIS_REJECT ignored: --on-error given on the command line" in run.text, \
        run.output
    assert not pidfile.exists()


def _rcpt_to_a_thread_exit(sock: Path) -> None:
    """A message to EXIT_IN_A_THREAD over its unix socket, up to the RCPT whose callback ends it."""
    with Mta(str(sock)) as mta:
        mta.negotiate()
        mta.connect()
        mta.mail("<a@example.org>")
        with contextlib.suppress(Exception):  # (the connection ends with the process)
            mta.rcpt("<b@example.org>")


def test_a_threads_exit_removes_the_unix_socket_file(tclrun, tmp_path):
    """A thread's `exit` ends the process through C's exit(): the pid file went, as at the script's
    own `exit`, but the socket file was left behind, a stale socket the MTA kept connecting to
    (refused) until the next start replaced it."""
    sock = tmp_path / "milter.sock"
    run = tclrun(EXIT_IN_A_THREAD, "--pidfile", str(tmp_path / "milter.pid"), connection=f"unix:{sock}")
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    _rcpt_to_a_thread_exit(sock)
    assert run.wait_exit(15) == 3, run.output
    assert not sock.exists() and not (tmp_path / "milter.pid").exists(), run.output


def test_a_threads_exit_in_a_worker_leaves_the_socket_file_the_supervisor_serves(tclrun, tmp_path):
    """With --workers a thread's `exit` ends that worker alone: the socket file is the
    supervisor's, which goes on serving on it with a new worker; it goes at the stop."""
    sock = tmp_path / "milter.sock"
    run = tclrun(EXIT_IN_A_THREAD, "--workers", "2", connection=f"unix:{sock}")
    _rcpt_to_a_thread_exit(sock)
    run.wait_for(r"worker \d .*exited with status 3|worker \d .*status 3", 15)
    assert stat.S_ISSOCK(sock.lstat().st_mode), run.output
    with Mta(str(sock)) as mta:  # still served
        mta.negotiate()
    assert run.stop() == 0, run.output
    assert not sock.exists(), run.output


# A thread that ends the process as soon as the marker file (argv 0) appears.
EXIT_AT_THE_MARKER = r"""
package require TclMilter 1.0
package require Thread
thread::create [string map [list @MARKER@ [list [lindex $argv 0]]] {
    while {![file exists @MARKER@]} { after 5 }
    exit 3
}]
milter main
"""

# Holds the window between the socket file's making and its listener's recording open: the
# instant in which a thread's `exit` can land cannot be hit otherwise (listener.bind_unix is what
# bind() makes the file with; the sleep lets the thread's exit run meanwhile).
HOLD_AFTER_THE_FILE = """
import time
import pytclmilter.listener as listener

made = listener.bind_unix

def holding(*args):
    bound = made(*args)
    open({marker!r}, "w").close()
    time.sleep(3)
    return bound


def setup(milter):
    listener.bind_unix = holding
"""


def test_a_threads_exit_as_the_socket_is_made_removes_its_file(tclrun, tmp_path):
    """A thread's `exit` after the socket's file was made but before its listener was recorded
    (the instant between bind and serving) left the file behind: the exit handler looked for
    the listener the milter had, which it did not have yet. Now what bind made is recorded as it
    is made, and the exit removes it (under the normal stop's rule: only our socket)."""
    sock, marker = tmp_path / "milter.sock", tmp_path / "bound"
    run = tclrun(EXIT_AT_THE_MARKER, connection=f"unix:{sock}", args=[str(marker)], wait=False,
                 python=[HOLD_AFTER_THE_FILE.format(marker=str(marker))])
    assert run.wait_exit(20) == 3, run.output
    assert marker.exists(), run.output  # (the window was reached)
    assert not sock.exists() and not sock.is_symlink(), run.output
