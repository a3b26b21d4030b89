"""The null milter (scripts/nullmilter.c), the limit row of ``scripts/bench``.

What it must be to be that limit: it answers Postfix's option negotiation with the very bytes
pytclmilter answers for the benchmark script (with and without a body callback), and it serves
the load generator's messages, one or many per connection and 1 MB bodies, without an error.
Then one scaled-down ``scripts/bench engine`` run with both modes shows the rows a user reads.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.bench import loadgen_path, null_filter_path
from support.postfix import free_port

ROOT = Path(__file__).resolve().parents[1]
POSTFIX_OFFER = struct.pack("!IcIII", 13, b"O", 6, 0x1FF, 0x1FFFFF)  # what Postfix 3.7 offers


@contextmanager
def serving(cmd: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, f"{cmd[0]} did not listen"
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def null_milter(port: int, body: bool) -> list[str]:
    return [str(null_filter_path()), *(["-b"] if body else []), f"inet:{port}@127.0.0.1"]


def pytclmilter(port: int, body: bool) -> list[str]:
    return [sys.executable, "-m", "pytclmilter.cli", "run", str(ROOT / "tclmilter" / "examples" / "bench.tcl"),
            "--connection", f"inet:{port}@127.0.0.1", *(["--", "body"] if body else [])]


def negotiation_reply(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(POSTFIX_OFFER)
        reply = b""
        while len(reply) < 4 or len(reply) < 4 + struct.unpack("!I", reply[:4])[0]:
            chunk = s.recv(4096)
            assert chunk, f"closed after {reply!r}"
            reply += chunk
        return reply


@pytest.mark.parametrize("body", [False, True], ids=["body skipped", "body callback"])
def test_null_milter_negotiates_what_pytclmilter_negotiates_for_the_bench_script(body: bool) -> None:
    replies = []
    for command in (pytclmilter, null_milter):
        port = free_port()
        with serving(command(port, body), port):
            replies.append(negotiation_reply(port))
    ours, null = replies
    assert ours[4:5] == b"O"
    assert null == ours


@pytest.mark.parametrize("args", [["-m", "1"], ["-m", "50"], ["-m", "1", "-b", "1048576"]],
                         ids=["1 msg/conn", "50 msgs/conn", "1 MB bodies"])
def test_null_milter_serves_the_load_generator_without_an_error(args: list[str]) -> None:
    port = free_port()
    with serving(null_milter(port, "-b" in args), port):
        proc = subprocess.run([str(loadgen_path()), "-c", "4", "-n", "200", *args, f"inet:{port}@127.0.0.1"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT messages=200 " in proc.stdout and " errors=0 " in proc.stdout


def test_engine_mode_measures_both_modes_beside_the_null_milter(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "engine", "--filters", "null,tcl-pure", "--conns", "4",
         "--bodies", "4k", "--per-conn", "1,20", "--quick", "--duration", "0.5", "--warmup", "0.2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = proc.stdout.split("\nResults\n", 1)[1]
    for name in ("null", "tcl-pure"):
        for per_conn in (1, 20):
            assert re.search(rf"^{name}\s+4\s+{per_conn}\s+4 KB\s+\d+ ", results, re.M), results
    cells = json.loads(out.read_text())["cells"]
    assert sorted((c["filter"], c["per_conn"], c["errors"]) for c in cells) == [
        ("null", 1, 0), ("null", 20, 0), ("tcl-pure", 1, 0), ("tcl-pure", 20, 0)]


def test_a_program_the_bench_builds_appears_whole_to_a_build_running_meanwhile(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-xdist's workers build build/bench/nullmilter (and loadgen) at once: gcc wrote the
    binary in place, and a worker that looked meanwhile found it there, newer than its source,
    and ran it half-written. (In process: a stand-in gcc writes its output in two steps, and
    another build of the same program runs between them.)"""
    from milterbench import build

    src, out = tmp_path / "p.c", tmp_path / "p"
    src.write_text("int main(void) { return 0; }\n")
    meanwhile: list[bytes] = []

    def gcc(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        target = Path(cmd[cmd.index("-o") + 1])
        target.write_bytes(b"\x7fELF half")
        if not meanwhile:
            meanwhile.append(b"")
            meanwhile[0] = build.build_c(src, out, []).read_bytes()  # another worker's build
        target.write_bytes(b"\x7fELF whole")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(build, "subprocess", type("Subprocess", (), {"run": staticmethod(gcc)}))
    assert build.build_c(src, out, []).read_bytes() == b"\x7fELF whole"
    assert meanwhile == [b"\x7fELF whole"]
