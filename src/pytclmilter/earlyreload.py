"""SIGUSR1 and SIGUSR2 held from the first line of ``pytclmilter run``: their default action ends
a process, and ``run`` took them over only once its modules were imported and its log began (some
0.3 s), so a reload asked at once after a start (``systemctl start`` then ``systemctl reload``)
killed the milter (exit 138), and a stray SIGUSR2 (exit 140). Blocked here, they wait: ``run``
takes a SIGUSR1 as any reload that comes before the milter serves (hooks.forget_early_reload:
logged, ignored), and a SIGUSR2 as any other (sigmask.unused_signal_ignored: logged, ignored).

Imported by the package right after cwdguard, with nothing but ``os``, ``sys`` and ``signal``:
the package's own imports are most of that time. Only for the ``run`` program (the console
script or ``python3 -m pytclmilter.cli``): ``try``, ``check`` and ``send``, and an application
that imports the package, keep the mask they had (a blocked signal is inherited by what they
exec). What Python does before the package is imported (its own start, 20-30 ms on an idle
machine and up to 150 ms on a busy one, as long as ``python3 -c pass``) is beyond this. The stop signals are left to their
default action meanwhile: a stop asked before anything serves ends the process, as asked.
"""

from __future__ import annotations

import os
import signal
import sys


def hold() -> None:
    """Block SIGUSR1 and SIGUSR2 if this process is ``pytclmilter run``; ``run`` unblocks SIGUSR1
    where it serves, SIGUSR2 once its handler is in place."""
    if _is_run_program():
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2))


def _is_run_program() -> bool:
    """The console script ``pytclmilter run ...``, or ``python3 [options] -m pytclmilter.cli run ...``."""
    if os.path.basename(sys.argv[0]) == "pytclmilter":
        return sys.argv[1:2] == ["run"]
    args = sys.orig_argv
    for i, word in enumerate(args[:-2]):
        if word == "-m":
            return args[i + 1] == "pytclmilter.cli" and args[i + 2] == "run"
    return False
