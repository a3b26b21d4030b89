"""What a --python file imports while root runs it: a module's file, and every directory on its
way, must be one only root could change (safepath.open_trusted), as the --python file itself.

The check is a finder ahead of Python's own (sys.meta_path), which asks the others where the
module is and hands back their spec with a loader that reads the source, or a cached ``.pyc``,
from the checked descriptor: what runs is what was checked. A ``.pyc`` refused is not used (the
source is compiled instead, as for any unreadable cache); an extension module is checked, then
opened by name (dlopen takes nothing else: no name on the way is another user's to change once
checked). Any other loader with a file (a zip archive) is refused: it reads what nothing
checked. Only while the effective uid is 0: after --user, and for a developer's own account,
imports are Python's own.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from importlib.machinery import ExtensionFileLoader, ModuleSpec, SourceFileLoader, SourcelessFileLoader
from types import ModuleType
from typing import Any, Sequence

from .safepath import Untrusted, open_trusted, read_trusted


class UnsafeModule(ImportError):
    """A module root would import from a file another user could change (the message says
    which and how to fix it)."""


def _refused(name: str, path: str, why: str) -> UnsafeModule:
    return UnsafeModule(f"refusing to import {name} from {path} as root: {why}", name=name, path=path)


def _read(loader: SourceFileLoader | SourcelessFileLoader, path: str) -> bytes:
    """A file loader's read, from the descriptor checked: the module's own file refused with
    UnsafeModule, a cached ``.pyc`` with the OSError that makes Python compile the source."""
    try:
        return read_trusted(path)
    except Untrusted as exc:
        if path != loader.path:
            raise
        raise _refused(loader.name, path, exc.strerror or str(exc)) from None


class _CheckedSource(SourceFileLoader):
    def get_data(self, path: str) -> bytes:
        return _read(self, path)


class _CheckedBytecode(SourcelessFileLoader):
    def get_data(self, path: str) -> bytes:
        return _read(self, path)


class _CheckedExtension(ExtensionFileLoader):
    def create_module(self, spec: ModuleSpec) -> ModuleType:
        try:
            os.close(open_trusted(self.path))
        except Untrusted as exc:
            raise _refused(self.name, self.path, exc.strerror or str(exc)) from None
        return super().create_module(spec)


_CHECKED = ((SourceFileLoader, _CheckedSource), (SourcelessFileLoader, _CheckedBytecode),
            (ExtensionFileLoader, _CheckedExtension))


class RootImports(importlib.abc.MetaPathFinder):
    """The finder (module docstring); :func:`install` puts it first."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if os.geteuid() != 0:
            return None
        for finder in sys.meta_path:
            find: Any = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                return _checked(spec)
        return None


def _checked(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` with a checking loader; UnsafeModule for a file no such loader can read."""
    loader = spec.loader
    if loader is None or not spec.has_location or spec.origin is None:
        return spec  # (a namespace package's directory, a built-in or frozen module: no file)
    for kind, checking in _CHECKED:
        if type(loader) is kind:
            spec.loader = checking(spec.name, spec.origin)
            return spec
    raise _refused(spec.name, spec.origin, f"{type(loader).__name__} reads it, and what it reads cannot be "
                                           "checked (only a plain .py, .pyc or extension module file can)")


def install() -> None:
    """Check what is imported from now on while root (once per process)."""
    if not any(isinstance(f, RootImports) for f in sys.meta_path):
        sys.meta_path.insert(0, RootImports())
