"""What a run needs, made on first use: the C programs, build/venv and the Pythons the filters run on.

Everything is rebuilt only when its source changed, so a second run starts at once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from milterbench import BUILD, ROOT, SCRIPTS, VENV, say, warn


def build_c(src: Path, out: Path, libs: list[str]) -> Path:
    """gcc -O2, only when the source is newer than the binary. Built under a name of its own, then
    renamed into place: the tests' parallel workers build the same program at once, and one that
    looked while gcc wrote found the binary there, newer than its source, and ran it half-made."""
    BUILD.mkdir(parents=True, exist_ok=True)
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    fd, part = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        cmd = ["gcc", "-O2", "-Wall", "-o", part, str(src), *libs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr}")
        os.chmod(part, 0o755)  # (mkstemp made it 0600: the linker keeps that, adding only x)
        os.replace(part, out)
    finally:
        if os.path.exists(part):
            os.unlink(part)
    return out


def loadgen_path() -> Path:
    return build_c(SCRIPTS / "loadgen.c", BUILD / "loadgen", ["-lpthread"])


def null_filter_path() -> Path:
    return build_c(SCRIPTS / "nullmilter.c", BUILD / "nullmilter", [])


def libmilter_filter_path() -> Path | None:
    if not Path("/usr/include/libmilter/mfapi.h").exists():
        warn("libmilter-dev is not installed (apt-get install libmilter-dev): no libmilter filter")
        return None
    return build_c(SCRIPTS / "bench_libmilter.c", BUILD / "bench_libmilter", ["-lmilter", "-lpthread"])


def bench_venv() -> Path:
    """build/venv's Python, the environment is created on first use."""
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    return py


def source_digest() -> str:
    """A digest of what the installed build is made of: src/, setup.py, pyproject.toml."""
    h = hashlib.sha256()
    for path in sorted([*(ROOT / "src").rglob("*.py"), ROOT / "setup.py", ROOT / "pyproject.toml"]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def can_import(py: str, module: str) -> bool:
    return Path(py).exists() and subprocess.run([py, "-c", f"import {module}"], capture_output=True).returncode == 0


def installed_python(module: str) -> str | None:
    """This Python or build/venv's, the first that can import ``module``; None if neither can."""
    return next((py for py in (sys.executable, str(VENV / "bin" / "python")) if can_import(py, module)), None)


def python_importing(module: str, package: str, needs: str = "") -> str | None:
    """This Python if it can import ``module``, else build/venv's, with ``package`` installed there on
    first use; None, with pip's output as a warning, when that install fails."""
    py = installed_python(module)
    if py is not None:
        return py
    say(f"bench: installing {package} into {VENV}{needs}")
    py = str(bench_venv())
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", package],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        warn(f"pip install {package} failed:\n{proc.stdout}{proc.stderr}")
        return None
    return py


@functools.cache
def uvloop_python() -> str:
    """A Python with uvloop, for the filters that run this checkout's src/ (floor, *-pure). Without
    it they would measure asyncio's own event loop while the table says uvloop (pytclmilter falls
    back to asyncio silently, and a Python that runs this script need not have its dependencies)."""
    py = python_importing("uvloop", "uvloop>=0.19")
    if py is None:
        raise SystemExit("bench: the floor and the *-pure filters need uvloop")
    return py


@functools.cache  # once per run: every tcl/python filter uses the same install
def compiled_python() -> str:
    """build/venv's Python with this checkout installed as users install it (the hot path compiled
    by mypyc, setup.py); reinstalled whenever the source changed."""
    py = bench_venv()
    stamp = VENV / "pytclmilter.digest"
    digest = source_digest()
    if not (stamp.exists() and stamp.read_text() == digest):
        say(f"bench: installing this checkout into {VENV} (compiling the hot path, about a minute)")
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        for cmd in ([*pip, "uvloop>=0.19"], [*pip, "--no-deps", "--force-reinstall", str(ROOT)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
        stamp.write_text(digest)
    probe = subprocess.run([str(py), "-c", "from pytclmilter.compiled import describe; print(describe())"],
                           capture_output=True, text=True, check=True, cwd=VENV)
    if "compiled" not in probe.stdout:
        warn(f"{probe.stdout.strip()}: the tcl and python filters run the pure-Python source")
    return str(py)


def pymilter_python() -> str | None:
    """A Python that can import Milter: this one, else build/venv (created, pymilter installed)."""
    py = python_importing("Milter", "pymilter", " (needs gcc, libmilter-dev and Python headers)")
    if py is None:
        warn("no pymilter comparison")
    return py
