"""Which of the hot-path modules run compiled (mypyc, see setup.py) and which as Python source.

A wheel build compiles them; an editable install, ``PYTCLMILTER_PURE=1`` or a failed compile
leaves them pure Python, which works the same at about half the speed. ``pytclmilter run``
logs the answer, so a slow deployment can be told from a slow filter.
"""

from __future__ import annotations

import importlib.machinery
import sys

_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
#: Modules written in C (setup.py's C_EXT), built and skipped with the mypyc ones.
C_MODULES = frozenset({"pytclmilter.tcl._tclbytes"})


def compiled_modules() -> list[str]:
    """Names of the loaded pytclmilter modules that are compiled extensions (empty: pure Python)."""
    from . import engine, server  # noqa: F401 - loads every hot-path module ...
    from .tcl import interp  # noqa: F401 - ... and the Tcl bridge's

    return sorted(name for name, module in list(sys.modules.items())
                  if name.startswith("pytclmilter.") and str(getattr(module, "__file__", "")).endswith(_SUFFIXES))


def describe() -> str:
    """One phrase for the log: how the hot path runs."""
    names = compiled_modules()
    if not names:
        return ("hot path: pure Python (an editable install, PYTCLMILTER_PURE=1, or no C compiler or mypy "
                "when installing; see docs/deployment.md)")
    in_c = len(C_MODULES.intersection(names))
    return f"hot path: compiled with mypyc ({len(names) - in_c} modules) and C ({in_c})"
