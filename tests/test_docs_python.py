"""docs/python-api.md's examples, copied out of the page and run as a reader runs them.

Each program is written to a file as the page shows it and started with ``python3 FILE``; the
commands of its shell block run against it (``pytclmilter send``, ``check``, ``try``) and what
the page shows they print must be what they print. Only a fixed port is changed for a free one.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import pytclmilter
from support.engine import WAIT, RawMTA, strings, wait_for, z
from support.tclrun import _pytclmilter_command, child_env

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"


def blocks(lang: str) -> list[str]:
    """The page's code blocks of that language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), re.S | re.M)


def block(lang: str, start: str) -> str:
    """The one block of that language whose text starts with ``start``."""
    found = [b for b in blocks(lang) if b.startswith(start)]
    assert len(found) == 1, f"{len(found)} {lang} blocks start with {start!r}"
    return found[0]


def shell_after(program: str) -> str:
    """The unlabelled or ``sh`` block that follows the program's block: its commands."""
    text = DOC.read_text()
    rest = text[text.index(program) + len(program) + len("```"):]  # (past the program's own fence)
    found = re.search(r"^```(?:sh)?\n(.*?)^```", rest, re.S | re.M)
    assert found, program[:40]
    return found.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """The example programs a test starts, stopped with SIGTERM at its end (by their own pid)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def start(procs: list[subprocess.Popen[str]], program: Path) -> subprocess.Popen[str]:
    """``python3 PROGRAM`` in its directory, as the page runs it."""
    proc = subprocess.Popen([sys.executable, program.name], cwd=program.parent, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    return proc


def wait_listening(proc: subprocess.Popen[str], port: int) -> None:
    """Until the program accepts connections (it prints nothing when it does)."""

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the example ended: {proc.communicate()[1]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_for(up, timeout=20)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_pytclmilter_command(), *args], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=60)


def in_order(shown: list[str], out: str) -> None:
    """Each line the page shows is a line of ``out``, in the page's order ("..." leaves lines out)."""
    lines = out.splitlines()
    at = 0
    for want in shown:
        if want.strip() == "...":
            continue
        assert want in lines[at:], f"{want!r} not in (from line {at}):\n{out}"
        at = lines.index(want, at) + 1


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, as the page says; the program's stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return err


def test_the_filter_in_python_answers_as_the_page_shows(tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    program = block("python", "import asyncio\n")
    spec = f"inet:{free_port()}@127.0.0.1"
    assert program.count("inet:8899@127.0.0.1") == 1
    (tmp_path / "example.py").write_text(program.replace("inet:8899@127.0.0.1", spec))
    proc = start(started, tmp_path / "example.py")
    wait_listening(proc, int(spec[len("inet:"):spec.index("@")]))
    sent = 0
    for command, comments in re.findall(r"^(pytclmilter send .*)\n((?:#.*\n)+)", shell_after(program), re.M):
        words = command.replace("inet:8899@127.0.0.1", spec).split()
        out = run_cli(*words[1:]).stdout
        for comment in comments.splitlines():  # "#   a  ...  b": each piece is (part of) a line
            for piece in re.split(r"\s+\.\.\.\s+", comment.lstrip("#").strip()):
                assert piece in out, f"{piece!r} not in:\n{out}"
        sent += 1
    assert sent == 2
    assert stop(proc) == ""  # the library configures no log handler


def test_the_filter_in_python_keeps_no_subject_from_a_message_to_the_next(
        tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    """Private data outlives a message: the page's example stamped a second message of the
    connection (SMTP allows several per session) that had no Subject with the first one's,
    "Subject: [checked] Lunch", because only its envfrom's size was reset."""
    port = free_port()
    (tmp_path / "example.py").write_text(
        block("python", "import asyncio\n").replace("inet:8899@127.0.0.1", f"inet:{port}@127.0.0.1"))
    wait_listening(start(started, tmp_path / "example.py"), port)
    with RawMTA(socket.create_connection(("127.0.0.1", port), timeout=WAIT)) as mta:
        mta.optneg()
        assert mta.connect() == (b"c", b"")
        subjects = []
        for headers in ([("Subject", "Lunch"), ("From", "<a@example.org>")], [("From", "<a@example.org>")]):
            assert mta.mail() == (b"c", b"") and mta.rcpt() == (b"c", b"")
            for name, value in headers:  # (no reply: the milter asked for none, NR_HDR)
                mta.send(b"L", z(name, value))
            assert mta.eoh() == (b"c", b"") and mta.body(b"hi\r\n") == (b"c", b"")
            replies = mta.eom()
            subjects += [strings(p[4:]) for code, p in replies if code == b"m"]
            assert replies[-1] == (b"c", b""), replies
            mta.abort()  # as Postfix ends each message
    assert subjects == [[b"Subject", b"[checked] Lunch"], [b"Subject", b"[checked] "]]


def test_a_typed_program_type_checks_strictly_and_runs_as_shown(tmp_path: Path,
                                                                started: list[subprocess.Popen[str]]) -> None:
    """The package is typed (py.typed, where it is installed) and register hands back the
    callback: a user's annotated program passes ``mypy --strict``. Without the marker mypy
    skipped the package ("missing library stubs or py.typed marker"), and with register typed
    ``Any`` it refused every decorated callback ("Untyped decorator makes function untyped")."""
    program = block("python", "# typed.py\n")
    (tmp_path / "typed.py").write_text(program)
    shown = shell_after(program).splitlines()
    assert shown[0] == "$ mypy --strict typed.py"
    package = Path(pytclmilter.__file__).resolve().parent  # as installed: site-packages, or src/
    env = child_env({"PYTHONPATH": str(package.parent)})
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                              "typed.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert checked.stdout.splitlines() == [shown[1]], checked.stdout + checked.stderr

    assert shown[2] == "$ python3 typed.py &"
    proc = start(started, tmp_path / "typed.py")
    assert proc.stdout is not None
    listening = proc.stdout.readline().strip()
    assert re.fullmatch(shown[3].replace("41234", r"\d+"), listening), listening
    spec = listening.split()[-1]
    command, grep = shown[4].removeprefix("$ ").split(" | grep ")
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "plain.eml", tmp_path / "tests" / "data")
    out = run_cli(*command.replace("inet:41234@127.0.0.1", spec).split()[1:], cwd=tmp_path).stdout
    patterns = grep.split()[1::2]  # grep -e A -e B
    assert [line for line in out.splitlines() if any(p in line for p in patterns)] == shown[5:], out
    stop(proc)


def test_the_hooks_file_joins_the_script_as_check_and_try_show(tmp_path: Path) -> None:
    hooks = block("python", "# hooks.py\nfrom pytclmilter import CONTINUE\n")
    script = block("tcl", "# withpy.tcl\n")
    (tmp_path / "hooks.py").write_text(hooks)
    (tmp_path / "withpy.tcl").write_text(script)
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "plain.eml", tmp_path / "tests" / "data")
    session = shell_after(script)
    runs = re.split(r"^\$ ", session, flags=re.M)[1:]
    assert [r.split("\n", 1)[0] for r in runs] == [
        "pytclmilter check withpy.tcl --python hooks.py",
        "pytclmilter try withpy.tcl tests/data/plain.eml --python hooks.py"]
    for run in runs:
        command, shown = run.split("\n", 1)
        done = run_cli(*command.split()[1:], cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        in_order(shown.splitlines(), done.stdout)


def test_every_setting_of_a_milter_is_documented_in_its_section() -> None:
    """Each field of Settings is an attribute of Milter a program may set; tick_interval was
    checked and tested, but a reader of the page could not know it existed."""
    import dataclasses

    from pytclmilter.settings import Settings

    section = DOC.read_text().split("## `Milter`", 1)[1].split("\n## ", 1)[0]
    missing = [f.name for f in dataclasses.fields(Settings) if f"`{f.name}`" not in section]
    assert missing == [], f"not in docs/python-api.md's Milter section: {missing}"
