"""`pytclmilter check` stops the script at `milter main`: what follows (the manual's example
deletes its production socket there) must not run when an admin merely checks a script."""

from __future__ import annotations

import sys
from pathlib import Path

import pexpect


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
                              encoding="utf-8", timeout=30)
    assert status == 0, out
    assert "envfrom   tcl    from" in out
    assert victim.exists(), "check ran the script's code after milter main"
