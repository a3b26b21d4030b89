"""The current directory on ``sys.path`` as root: ``python3 -m pytclmilter.cli`` (and ``-c``) put
it first, so every module imported from then on, before the root import finder (rootimports.py)
is installed, was looked for there first: another user's ``logging.py`` in /tmp ran as root. The
console script ``pytclmilter`` puts its own directory there instead, as Python does for any
program run by its path: that directory is the program's own, as trusted as the program, and
stays, whatever the current directory (a program run from there lost its modules beside it).

Imported first by the package, with nothing but ``os`` and ``sys`` (which Python has loaded
already): the entry is removed before any other import, and put back only if only root could
add a name to that directory (safepath's walk, the directory itself writable by no group or
others, sticky or not). What Python imports before the package runs, the package itself among
it, is beyond this: as root, use the console script, or ``python3 -P``.
"""

from __future__ import annotations

import os
import sys


def guard() -> None:
    """As root, drop the current directory from the head of ``sys.path`` unless it is root's alone."""
    if os.geteuid() != 0 or not sys.path:
        return
    try:
        cwd = os.getcwd()
    except OSError:
        return
    if sys.path[0] not in ("", cwd) or not _put_by_python():
        return
    entry = sys.path.pop(0)
    from .logline import escape
    from .safepath import only_root_adds_to

    if only_root_adds_to(cwd):
        sys.path.insert(0, entry)
        return
    sys.stderr.write(f"pytclmilter: as root, not importing modules from the current directory {escape(cwd)}, which was first "
                     "on sys.path (python3 -m or -c puts it there): others may add files to it or a directory above "
                     "(use the pytclmilter command, or python3 -P)\n")


def _put_by_python() -> bool:
    """The head of ``sys.path`` is the current directory because Python put it there for ``-m``,
    ``-c``, standard input or the prompt, not a program's own directory that happens to be it."""
    argv = getattr(sys, "argv", None)  # (none in some embedding programs)
    if argv and argv[0] in ("", "-", "-c", "-m"):  # ("-m" while -m looks the module up)
        return True
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name != "__main__"  # (-m's module; a directory or zip run is "__main__")
