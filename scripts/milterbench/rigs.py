"""The filters under test, by name: the command that starts each, and its process while it runs.

Each runs the same workload (tclmilter/examples/bench.tcl and its copies in scripts/), listens on
a free TCP port of 127.0.0.1 and logs to build/bench/logs/NAME.log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from milterbench import BUILD, ROOT, SCRIPTS
from milterbench.build import compiled_python, libmilter_filter_path, null_filter_path, pymilter_python, uvloop_python
from milterbench.measure import proc_cpu, proc_cpu_split, tcp_listening

TCL_SCRIPT = ROOT / "tclmilter" / "examples" / "bench.tcl"
FILTERS = ("null", "libmilter", "pymilter", "tcl", "python")  # the default set of the modes
VARIANTS = "floor, tcl-pure, python-pure, tcl-asyncio, python-asyncio, tcl-wN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Filter:
    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return BUILD / "logs" / f"{self.name}.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"filter {self.name} was not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def start(self, timeout: float = 30.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while not tcp_listening(self.port):
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: filter {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"bench: filter {self.name} did not listen within {timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc else 0.0

    def cpu_split(self) -> tuple[float, float]:
        return proc_cpu_split(self.proc.pid) if self.proc else (0.0, 0.0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


def filters_cpu(filters: list[Filter]) -> float:
    """CPU seconds of all the filters' processes so far."""
    return sum(f.cpu() for f in filters)


def known(kind: str, variant: str) -> bool:
    """A filter name this module can start: a kind of FILTERS or floor, or a variant of tcl/python."""
    if not variant:
        return kind in (*FILTERS, "floor")
    return (kind in ("tcl", "python") and variant in ("pure", "asyncio")) \
        or (kind == "tcl" and re.fullmatch(r"w\d+", variant) is not None)


def make_filters(names: list[str], log_level: str, body_cb: bool) -> list[Filter]:
    """Filters by name: null (nullmilter.c, the limit), libmilter, pymilter, tcl, python, floor
    (bench_floor.py), and variants:
    NAME-pure (this checkout's src/, the hot path not compiled), NAME-asyncio (asyncio's own
    event loop instead of uvloop: PYTCLMILTER_LOOP=asyncio) and tcl-wN (pytclmilter run --workers N).
    tcl and python without -pure run this checkout as installed into build/venv: compiled.
    libmilter and pymilter are left out, with a warning, where they cannot be built."""
    installed_env = dict(os.environ)
    installed_env.pop("TCLLIBPATH", None)
    source_env = dict(installed_env)
    source_env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + source_env["PYTHONPATH"]
                                                    if source_env.get("PYTHONPATH") else "")
    out = []
    for name in names:
        kind, _, variant = name.partition("-")
        if not known(kind, variant):
            raise SystemExit(f"bench: unknown filter {name!r}; known: {', '.join(FILTERS)}, {VARIANTS}")
        port = free_port()
        conn = f"inet:{port}@127.0.0.1"
        body = ["--body"] if body_cb else []
        from_source = variant == "pure" or kind == "floor"
        env = dict(source_env if from_source else installed_env)
        if variant == "asyncio":
            env["PYTCLMILTER_LOOP"] = "asyncio"
        py = uvloop_python() if from_source else compiled_python() if kind in ("tcl", "python") else ""
        if kind == "null":
            cmd = [str(null_filter_path()), *(["-b"] if body_cb else []), conn]
        elif kind == "libmilter":
            exe = libmilter_filter_path()
            if exe is None:
                continue
            cmd = [str(exe), *(["-b"] if body_cb else []), conn]
        elif kind == "pymilter":
            pym = pymilter_python()
            if pym is None:
                continue
            cmd = [pym, str(SCRIPTS / "bench_pymilter.py"), conn, *body]
        elif kind == "tcl":
            workers = ["--workers", variant[1:]] if variant.startswith("w") else []
            cmd = [py, "-m", "pytclmilter.cli", "run", str(TCL_SCRIPT), "--connection", conn,
                   "--log-level", log_level, *workers, *(["--", "body"] if body_cb else [])]
        elif kind == "python":
            cmd = [py, str(SCRIPTS / "bench_filter.py"), conn, "--log-level", log_level, *body]
        else:  # the floor: uvloop and the kernel alone, canned replies, no engine
            cmd = [py, str(SCRIPTS / "bench_floor.py"), conn, *body]
        out.append(Filter(name, cmd, env, port))
    return out
