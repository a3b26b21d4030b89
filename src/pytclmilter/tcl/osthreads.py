"""The process's threads that neither Python nor the Thread package's `thread::names` knows of.

--workers forks at `milter main`, and a fork keeps no thread. `thread::names` lists the script's
Thread-package threads (milter_cmd.py refuses the fork while there are any), but not a thread
pool's workers: `tpool::create -minworkers 2` starts two that a forked worker believes idle
without having them, so its callback's `tpool::post` and `tpool::wait` wait for ever in C (no
-calltimeout stops them). Nor a thread of a C library that a --python file loads. Only the
kernel lists them all (/proc/self/task, Linux): what is neither Python's (``threading``, less the
foreign threads it was merely called from) nor Tcl's notifier is one of those.

Tcl's notifier thread (Tcl 8.6's select-based notifier: one a process, started at the first event
wait, restarted in a forked child by Tcl's own pthread_atfork handlers) is the one that survives
the fork as it should, and nothing names it. It is told apart only when other threads are there:
``Tcl_SetServiceMode(TCL_SERVICE_ALL)`` starts it, if it was not running, without servicing any
event (as `update` would); a thread that appears then is it, and the others were all foreign;
none appearing means it was running already, and is one of them. It is not started otherwise:
the supervisor forks from one thread where the script waited for no event (workers.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Final

import _tkinter

_TASKS: Final = "/proc/self/task"
_SERVICE_ALL: Final = 1  # TCL_SERVICE_ALL
#: Seconds between two looks at the tasks: a Python thread that has just ended leaves `threading`
#: a moment before the kernel's list, and two looks that agree have none such.
_SETTLE: Final = 0.01
_SETTLE_TRIES: Final = 10


def _tasks() -> set[int] | None:
    """The OS thread ids of this process; None where the system does not list them."""
    try:
        return {int(name) for name in os.listdir(_TASKS)}
    except (OSError, ValueError):
        return None


def _python_threads() -> set[int]:
    """The OS thread ids of Python's own threads (a foreign one it was called from is not its own)."""
    return {t.native_id for t in threading.enumerate()
            if t.native_id is not None and not isinstance(t, threading._DummyThread)}


def _not_pythons() -> set[int]:
    """The threads that are not Python's, once two looks agree (``_SETTLE`` apart)."""
    seen = (_tasks() or set()) - _python_threads()
    for _ in range(_SETTLE_TRIES):
        if not seen:
            break
        time.sleep(_SETTLE)
        again = (_tasks() or set()) - _python_threads()
        if again == seen:
            break
        seen = again
    return seen


def _notifier_started() -> bool:
    """Start Tcl's notifier thread if it was not running: True if it was not (see the module).
    False where Tcl's function cannot be found by _tkinter's file (a _tkinter built into Python
    has none; one linking Tcl statically need export nothing; threads.py meets the same): the
    notifier is then taken for one of the threads, as if it ran."""
    try:
        tcl = ctypes.CDLL(_tkinter.__file__)
        service_mode = tcl.Tcl_SetServiceMode
    except (OSError, AttributeError):
        return False
    service_mode.restype, service_mode.argtypes = ctypes.c_int, [ctypes.c_int]
    before = _tasks() or set()
    service_mode(service_mode(_SERVICE_ALL))  # (the mode it had, set back)
    return bool((_tasks() or set()) - before - _python_threads())


def unknown_threads() -> int:
    """The threads of this process that are neither Python's, nor Tcl's notifier, nor listed by
    `thread::names` (call it when that lists none but the script's); 0 where the system does
    not list its threads. One too few on a Tcl whose notifier has no thread (epoll: Tcl 8.7), or
    whose Tcl_SetServiceMode is out of reach while the notifier is not running."""
    foreign = _not_pythons()
    if not foreign or _notifier_started():
        return len(foreign)
    return len(foreign) - 1
