"""docs/migrating.md's worked example: a legacy filter moved to Python one proc at a time.

``pytclmilter try --json`` (through pexpect, as a person runs it) sends each sample message
through legacy.tcl and through each step (stepN.tcl with --python stepN.py); every step must
answer exactly as the legacy script does: the same verdict, at the same stage, with the same
reply, the same actions and the same resulting message, 8-bit subject included.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pexpect
import pytest

from support.engine import make_milter, serving
from support.tclrun import _pytclmilter_command, child_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tclmilter" / "examples" / "migrating"
DATA = ROOT / "tests" / "data"
STEPS = ["step1", "step2", "step3"]
#: What decides a message's fate and content: the rest (negotiation, per-stage detail) may
#: differ as callbacks move between Tcl and Python.
DECISIVE = ("verdict", "stage", "reply", "exit_status", "actions", "rejected_recipients", "message")


def try_json(script: str, message: str, hooks: str | None = None, where: Path = EXAMPLE,
             sender: str | None = None) -> dict[str, Any]:
    args = ["try", str(where / script), str(DATA / message), "--json"]
    if hooks:
        args += ["--python", str(where / hooks)]
    if sender is not None:
        args += ["--from", sender]
    return report(args)


def report(args: list[str]) -> dict[str, Any]:
    """The decisive part of a `pytclmilter try/send ... --json` report."""
    command = _pytclmilter_command()
    args = [*command[1:], *args]
    child = pexpect.spawn(command[0], args, env=child_env(), cwd=str(ROOT), encoding="utf-8", timeout=30,
                          echo=False, use_poll=True)
    out = child.read().replace("\r\n", "\n")
    child.close()
    start = re.search(r"^\{$", out, re.M)
    assert start, out
    doc = json.JSONDecoder().raw_decode(out[start.start():])[0]
    assert child.exitstatus == doc["exit_status"], out
    return {key: doc.get(key) for key in DECISIVE}


EXPECTED = {
    "plain.eml": ("accept", "eom", "", []),
    "blacklisted.eml": ("reject", "envfrom", "550 5.7.1 sender blacklisted", []),
    "suspect.eml": ("accept", "eom", "", ["addheader X-Spam-Score: 4 (Free caf\udce9 for the winners)"]),
    "spammy.eml": ("reject", "eom", "550 5.7.1 spam score 10", []),
}


@pytest.mark.parametrize("message", list(EXPECTED))
def test_every_step_answers_as_the_legacy_script(message: str) -> None:
    legacy = try_json("legacy.tcl", message)
    assert (legacy["verdict"], legacy["stage"], legacy["reply"], legacy["actions"]) == EXPECTED[message]
    for step in STEPS:
        assert try_json(f"{step}.tcl", message, f"{step}.py") == legacy, step
    if message == "suspect.eml":  # the subject's Latin-1 byte went through Python and back
        text = legacy["message"]["text"].encode("utf-8", "surrogateescape")
        assert b"X-Spam-Score: 4 (Free caf\xe9 for the winners)\r\n" in text


@pytest.mark.parametrize("sender", ["<>", "<friend@public.com>", "<Spammer@SpamDomain.COM>"])
def test_every_step_reads_the_blacklist_as_the_legacy_script_did(tmp_path: Path, sender: str) -> None:
    """Translated, not corrected: legacy.tcl compares the lower-cased address with the entries as
    written (a mixed-case one never matches), and its split keeps a blank line as an empty entry,
    which the null sender <> matches. The steps lower-cased the entries and skipped blank lines,
    so on such a file they answered otherwise than the legacy script (migrating.md)."""
    where = tmp_path / "migrating"
    shutil.copytree(EXAMPLE, where)
    (where / "blacklist.txt").write_text("spammer@spamdomain.com\n\nFriend@Public.com\n")
    legacy = try_json("legacy.tcl", "plain.eml", where=where, sender=sender)
    for step in STEPS:
        assert try_json(f"{step}.tcl", "plain.eml", f"{step}.py", where, sender) == legacy, step


def test_the_code_the_page_shows_is_the_examples_own() -> None:
    """migrating.md quotes step1.py, step2.py's header callback and step3.tcl: as the files are."""
    page = (ROOT / "docs" / "migrating.md").read_text()
    python = re.findall(r"^```python\n(.*?)^```", page, re.S | re.M)
    assert len(python) == 2 and python[0].startswith("# step1.py\n")
    assert python[0].removeprefix("# step1.py\n") in (EXAMPLE / "step1.py").read_text()
    assert python[1] in (EXAMPLE / "step2.py").read_text()
    tcl = re.findall(r"^```tcl\n(.*?)^```", page, re.S | re.M)
    assert tcl[-1] in (EXAMPLE / "step3.tcl").read_text()


def test_each_step_moves_a_proc_out_of_the_script() -> None:
    procs = {name: set(re.findall(r"^proc (\w+)", (EXAMPLE / f"{name}.tcl").read_text(), re.M))
             for name in ["legacy", *STEPS]}
    assert procs["legacy"] == {"is_blacklisted", "subject_score", "lg_envfrom", "lg_header", "lg_eom"}
    assert procs["step1"] == procs["legacy"] - {"is_blacklisted"}
    assert procs["step2"] == procs["step1"] - {"lg_header"}
    assert procs["step3"] == set()


def test_step3_as_a_python_program_of_its_own_answers_as_the_legacy_script() -> None:
    """migrating.md: with nothing left in the script, step3.py can become a program of its own,
    Milter(name="Legacy", connection=...) with the same setup(milter): no Tcl at all."""
    namespace: dict[str, Any] = {"__file__": str(EXAMPLE / "step3.py")}
    exec(compile((EXAMPLE / "step3.py").read_text(), str(EXAMPLE / "step3.py"), "exec"), namespace)
    milter = make_milter(name="Legacy")
    namespace["setup"](milter)
    with serving(milter) as srv:
        for message in EXPECTED:
            sent = report(["send", "--connection", str(srv.spec), str(DATA / message), "--json"])
            assert sent == try_json("legacy.tcl", message), message
