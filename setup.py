"""Build hook: the per-message hot path is compiled with mypyc; everything else stays Python.

The modules in HOT run for every packet of every message (the sans-I/O core, the engine, the
context and its checks, the callback chain, the Tcl side of a callback call, a connection's
per-read path, its server, and the per-connection accept loop). mypyc turns their type-annotated
Python into C extensions that run the same code about twice as fast (docs/benchmarks.md); the .py
files remain the source and the fallback. Compilation is skipped, and the install is pure
Python, when

* the install is editable (``pip install -e .``): a compiled module would shadow edits to its
  .py file, so development always runs the source;
* ``PYTCLMILTER_PURE=1`` is set;
* mypyc cannot be imported, or the C compiler fails: the build warns and goes on without the
  extensions rather than failing the install.

``pytclmilter.compiled_modules()`` and the first log line of ``pytclmilter run`` tell which it is.

One module is C from the start (C_EXT): ``tcl/_tclbytes.c`` converts large values (body blocks,
the body a script hands to ``replacebody``) between wire bytes and the bytes Tcl keeps text in,
in one pass; Python's codecs, which ``tcl/strings.py`` falls back to, take their error path for
every byte that is not UTF-8 (docs/benchmarks.md, "8-bit bodies through a Tcl script"). It is
built, and skipped, with the mypyc modules.

Compiled code is only fast where mypyc knows the types; in the HOT modules (each rule measured
with ``scripts/bench_inproc.py --callgrind``, docs/benchmarks.md):

* a module-level constant read per packet or per callback is ``Final`` (a C static; otherwise
  every read is a look-up in the module's dict), and so is an alias of another module's
  function (``_monotonic: Final = time.monotonic``: ``time.monotonic`` is two look-ups per call);
* names are imported from modules (``from .events import Header``), not used as ``module.Name``;
* a function that reads attributes of its argument is a typed ``def``, not a lambda (an
  untyped parameter turns ``e.name`` into a generic getattr); a callable attribute is read
  into a local before the call (``cb.func(*args)`` is a getattr by name, as for a method);
* state that is tested often is a plain int, not an enum member;
* a class whose attributes the hot path reads (``Settings``, a frozen dataclass) is defined in a
  HOT module: a compiled class's attribute is a native read, a Python class's a look-up by name.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HOT = [
    "protocol/constants.py",
    "protocol/errors.py",
    "protocol/events.py",
    "protocol/codec.py",
    "protocol/table.py",
    "protocol/macros.py",
    "protocol/negotiation.py",
    "protocol/session.py",
    "status.py",
    "settings.py",
    "limits.py",
    "logline.py",
    "repeats.py",
    "callbacks.py",
    "meter.py",
    "checks.py",
    "replies.py",
    "tclmatch.py",
    "context.py",
    "shared.py",
    "calling.py",
    "negotiating.py",
    "engine.py",
    "tcl/limit.py",
    "tcl/context_cmd.py",
    "tcl/interp.py",
    "tcl/callbacks.py",
    "tcl/strings.py",
    "tcl/usage.py",
    "connection.py",
    "server.py",
    "accept.py",
]

C_EXT = {"pytclmilter.tcl._tclbytes": "tcl/_tclbytes.c"}


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure-Python modules when the C compiler fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: install the .py files
            # All or nothing: each module's extension imports the shared one, so a partial set
            # would not import at all.
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            _warn(f"compiling failed ({exc})")


def _warn(reason: str) -> None:
    print(f"pytclmilter: {reason}; installing the pure-Python hot path (about half the speed)",
          file=sys.stderr)


def ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("PYTCLMILTER_PURE") == "1" or "editable_wheel" in sys.argv:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed")
        return []
    try:
        compiled = mypycify([os.path.join("src", "pytclmilter", m) for m in HOT], opt_level="3")
    except SystemExit:  # mypyc exits when the type check fails; the tests catch that, users go on
        _warn("mypyc's type check failed")
        return []
    return compiled + [Extension(name, [os.path.join("src", "pytclmilter", path)], extra_compile_args=["-O2"])
                       for name, path in C_EXT.items()]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
