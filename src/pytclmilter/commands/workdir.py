"""``try``'s private directory (its socket, a copy of a piped input), removed however ``try`` ends.

While the script loads, Ctrl-C ends the process at once, as under tclsh (sigmask.interruptible):
no ``finally`` runs, and the directory stayed behind in /tmp. So a watcher process, forked before
any script runs, holds the read end of a pipe whose write end only ``try`` holds; when ``try``
ends, by any means (SIGINT, SIGKILL included), the pipe reads end of file and the watcher removes
the directory. It ignores the terminal's signals (Ctrl-C reaches the whole process group): its
life is bounded by ``try``'s anyway.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from typing import Iterator, NoReturn

from ..connspec import MAX_UNIX_PATH

#: What a terminal sends the whole foreground process group; the watcher outlives them all.
_TERMINAL_SIGNALS = {signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT}


@contextlib.contextmanager
def private_workdir(prefix: str, socket_names: tuple[str, ...] = ()) -> Iterator[str]:
    """A new directory only this user may enter, removed on leaving and when the process dies.
    In the temporary directory (TMPDIR), or in /tmp when the path of a socket named as in
    ``socket_names`` would be too long there (a deep TMPDIR made every try a usage error)."""
    path = tempfile.mkdtemp(prefix=prefix)
    room = max((len(os.fsencode(name)) + 1 for name in socket_names), default=0)  # with its "/"
    if len(os.fsencode(path)) + room + 1 >= MAX_UNIX_PATH and os.path.isdir("/tmp"):
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        read_end, write_end = os.pipe()  # close-on-exec: what the script runs does not hold it
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINAL_SIGNALS)  # none before the child ignores them
        try:
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                _watch(path, read_end)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_end)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(write_end)
        os.waitpid(pid, 0)


def _watch(path: str, read_end: int) -> NoReturn:
    """The watcher: wait for the end of the pipe, remove ``path``, and exit without unwinding the
    parent's stack (its ``finally`` blocks, its buffered output are the parent's)."""
    try:
        for sig in _TERMINAL_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERMINAL_SIGNALS)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the terminal (a pexpect pty) is not held open after try ended
            os.dup2(null, fd)
        while os.read(read_end, 1):
            pass
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os._exit(0)
