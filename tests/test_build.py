"""The build: the hot path compiled with mypyc, the pure-Python source kept working and typed.

``scripts/test`` installs the project as users do (a wheel, not editable), so the rest of the
suite runs the compiled modules; the tests here make sure that really happened, that the
pure-Python source (an editable install, ``PYTCLMILTER_PURE=1``, or a machine without a C
compiler) passes the core's tests too, and that the whole package type-checks, which mypyc
needs and which keeps the annotations that compiled code enforces at run time honest.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pytclmilter
from pytclmilter.compiled import C_MODULES, compiled_modules, describe

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

#: The core's own tests, and the ones that drive Tcl callbacks through the engine.
CORE_TESTS = ["tests/test_protocol_session.py", "tests/test_protocol_codec.py", "tests/test_protocol_fuzz.py",
              "tests/test_protocol_bounds.py",
              "tests/test_engine_api.py", "tests/test_hardening_fuzz.py", "tests/test_tcl_runtime.py"]


def setup_constant(name: str) -> object:
    """A constant of setup.py (HOT, C_EXT)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name}")


def hot_modules() -> set[str]:
    """setup.py's HOT list as module names."""
    paths = setup_constant("HOT")
    assert isinstance(paths, list)
    return {"pytclmilter." + p.removesuffix(".py").replace("/", ".") for p in paths}


def c_modules() -> set[str]:
    """setup.py's C_EXT modules, which compiled.py must know as C."""
    names = setup_constant("C_EXT")
    assert isinstance(names, dict) and set(names) == C_MODULES
    return set(names)


def runs_from_source() -> bool:
    return Path(pytclmilter.__file__).resolve().is_relative_to(SRC)


def test_an_installed_build_runs_the_hot_path_compiled() -> None:
    if runs_from_source() or os.environ.get("PYTCLMILTER_PURE") == "1":
        assert compiled_modules() == [], "compiled modules next to the source would shadow its edits"
        assert describe().startswith("hot path: pure Python")
        return
    # A wheel build that fell back to pure Python (mypyc missing, type check or compiler failed)
    # installs fine but runs at half the speed: that must not pass unnoticed.
    assert set(compiled_modules()) == hot_modules() | c_modules()
    assert describe() == f"hot path: compiled with mypyc ({len(hot_modules())} modules) and C ({len(c_modules())})"


def test_the_pure_python_source_passes_the_core_tests() -> None:
    if runs_from_source():
        pytest.skip("this run already tests the pure-Python source")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    probe = subprocess.run([sys.executable, "-c", "from pytclmilter.compiled import compiled_modules as c; print(c())"],
                           env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_the_package_type_checks(tmp_path: Path) -> None:
    """With the build's settings, and --strict on top, as a program using the package may be
    checked (python-api.md, "Type hints"); it found an untyped lambda called in typed code and a
    name read through a module that merely imports it."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path), "--config-file",
                           str(ROOT / "pyproject.toml"), str(SRC / "pytclmilter")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("Success: no issues found")



def test_no_compiled_module_reraises_after_an_await_in_an_except_clause() -> None:
    """Compiled with mypyc, a bare ``raise`` after an ``await`` in the same except clause
    re-raised an exception already freed: the process crashed when asyncio logged it
    (calling.Caller._awaited, at a stop with a callback that ignored its cancellation). Bind the
    exception, and await and raise it after the clause."""
    paths = setup_constant("HOT")
    assert isinstance(paths, list)
    found = []
    for path in paths:
        tree = ast.parse((SRC / "pytclmilter" / path).read_text())
        for handler in ast.walk(tree):
            if isinstance(handler, ast.ExceptHandler):
                inside = list(ast.walk(handler))
                if any(isinstance(n, ast.Await) for n in inside) and any(
                        isinstance(n, ast.Raise) and n.exc is None for n in inside):
                    found.append(f"{path}:{handler.lineno}")
    assert found == [], f"a bare raise after an await in an except clause of a compiled module: {found}"
