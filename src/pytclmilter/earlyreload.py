"""SIGUSR1 held from the first line of ``pytclmilter run``: its default action ends a process,
and ``run`` took it over only once its modules were imported and its log began (some 0.3 s),
so a reload asked at once after a start (``systemctl start`` then ``systemctl reload``) killed
the milter (exit 138). Blocked here, it waits, and ``run`` takes it as any reload that comes
before the milter serves (hooks.forget_early_reload: logged, ignored).

Imported by the package right after cwdguard, with nothing but ``os``, ``sys`` and ``signal``:
the package's own imports are most of that time. Only for the ``run`` program (the console
script or ``python3 -m pytclmilter.cli``): ``try``, ``check`` and ``send``, and an application
that imports the package, keep the mask they had (a blocked signal is inherited by what they
exec). What Python does before the package is imported (some 20 ms) is beyond this.
"""

from __future__ import annotations

import os
import signal
import sys


def hold() -> None:
    """Block SIGUSR1 if this process is ``pytclmilter run``; ``run`` unblocks it where it serves."""
    if _is_run_program():
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1,))


def _is_run_program() -> bool:
    """The console script ``pytclmilter run ...``, or ``python3 [options] -m pytclmilter.cli run ...``."""
    if os.path.basename(sys.argv[0]) == "pytclmilter":
        return sys.argv[1:2] == ["run"]
    args = sys.orig_argv
    for i, word in enumerate(args[:-2]):
        if word == "-m":
            return args[i + 1] == "pytclmilter.cli" and args[i + 2] == "run"
    return False
