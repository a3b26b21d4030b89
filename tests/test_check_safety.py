"""`pytclmilter check` stops the script at `milter main`: what follows (the manual's example
deletes its production socket there) must not run when an admin merely checks a script."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pexpect
import pytest


def test_check_does_not_run_the_code_after_milter_main(tmp_path: Path) -> None:
    victim = tmp_path / "live.sock"
    victim.write_text("stands for a running milter's socket")
    script = tmp_path / "s.tcl"
    script.write_text(
        "package require TclMilter 1.0\n"
        "proc from {ctx l} { return SMFIS_CONTINUE }\n"
        "milter register envfrom from\n"
        "milter main\n"
        f"file delete {victim}\n"
    )
    out, status = pexpect.run(f"{sys.executable} -m pytclmilter.cli check {script}", withexitstatus=True,
                              encoding="utf-8", timeout=30, use_poll=True)
    assert status == 0, out
    assert "envfrom   tcl    from" in out
    assert victim.exists(), "check ran the script's code after milter main"


PLAIN = Path(__file__).parent / "data" / "plain.eml"


def _cli(*args: str) -> tuple[int, str]:
    command = shlex.join([sys.executable, "-m", "pytclmilter.cli", *args])
    out, status = pexpect.run(command, withexitstatus=True, encoding="utf-8", timeout=60, use_poll=True)
    return status, out


def _script(tmp_path: Path, main: str, victim: Path) -> Path:
    script = tmp_path / "s.tcl"
    script.write_text(
        "package require TclMilter 1.0\n"
        "proc from {ctx l} { return SMFIS_REJECT }\n"
        "milter register envfrom from\n"
        f"{main}\n"
        f"file delete {victim}\n"
    )
    return script


# `catch` around `milter main` must not let the script go on; nor where Tcl cannot suspend the
# script (`interp eval` is implemented in C), where `milter main` serves inside the call.
MAINS = ["milter main", "catch {milter main}", "catch {interp eval {} {milter main}}"]


@pytest.mark.parametrize("main", MAINS)
def test_try_does_not_run_the_code_after_milter_main(tmp_path: Path, main: str) -> None:
    """The manual's example deletes its socket after `milter main`: trying a message with the
    production script deleted the live milter's socket."""
    victim = tmp_path / "live.sock"
    victim.write_text("stands for a running milter's socket")
    status, out = _cli("try", str(_script(tmp_path, main, victim)), str(PLAIN))
    assert "verdict: reject at envfrom" in out, out
    assert status == 1, out
    assert victim.exists(), "try ran the script's code after milter main"


@pytest.mark.parametrize("main", MAINS[1:])
def test_check_does_not_run_the_code_after_a_caught_milter_main(tmp_path: Path, main: str) -> None:
    victim = tmp_path / "live.sock"
    victim.write_text("stands for a running milter's socket")
    status, out = _cli("check", str(_script(tmp_path, main, victim)))
    assert status == 0, out
    assert "envfrom   tcl    from" in out and "ends here" not in out, out
    assert victim.exists(), "check ran the script's code after milter main"


def test_try_runs_callbacks_at_the_global_level_as_run_does(tmp_path: Path) -> None:
    """Under try the callbacks ran inside the script's `milter main` call: `upvar 1` reached that
    proc's locals and `break` ended a callback as an empty result (continue, nothing logged),
    where `run` logs `invoked "break" outside of a loop` and answers -onerror."""
    script = tmp_path / "levels.tcl"
    script.write_text(
        "package require TclMilter 1.0\n"
        "set seen 0\n"
        "proc from {ctx l} { upvar 1 seen s; incr s; if {[info level] != 1} { return SMFIS_DISCARD } }\n"
        "proc rcpt {ctx l} { break }\n"
        "milter register envfrom from\n"
        "milter register envrcpt rcpt\n"
        "milter main\n"
    )
    status, out = _cli("try", str(script), str(PLAIN))
    assert "envfrom  <" in out and "-> continue" in out, out
    assert 'envrcpt callback rcpt failed (invoked "break" outside of a loop), answering SMFIS_TEMPFAIL' in out, out
    assert "verdict: tempfail at envrcpt" in out, out
    assert status == 2, out
