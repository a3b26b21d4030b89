"""Signals seen while the thread that would run Python's handlers is held (in Tcl, in C).

Python runs its signal handlers only on the main thread, between bytecodes; its C-level handler
meanwhile writes each signal's number to the wakeup fd. A :class:`SignalPipe` is that fd while
open: a thread of its own reads the numbers and hands them on at once, however held the main
thread is. Used by the stop during a load (commands/sigmask.py) and the stop deadline while
serving (overdue.py).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable


class SignalPipe:
    """The wakeup fd while open; ``take`` gets the signal numbers read, in the pipe's thread."""

    def __init__(self, take: Callable[[bytes], None], name: str) -> None:
        self._take = take
        self._read_end, self._write_end = os.pipe()
        os.set_blocking(self._write_end, False)  # (set_wakeup_fd's requirement)
        #: The wakeup fd before (the event loop's, or -1), put back by close().
        self.previous = signal.set_wakeup_fd(self._write_end, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._read, name=name, daemon=True)

    def start(self) -> None:
        """Hand on the numbers from now on (those that came since the pipe opened wait in it):
        apart from the opening, so that ``take`` may read what its owner keeps of the pipe."""
        # The thread starts with the signals blocked: they are no one's to take there.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def reclaim(self) -> int | None:
        """The wakeup fd made this pipe again (main thread only): the fd that had replaced it
        (asyncio's ``loop.add_signal_handler`` sets the loop's, a ``--python`` file may set any
        with ``signal.set_wakeup_fd``), or None when it was still this pipe. Python keeps one
        wakeup fd per process, and it cannot be read without being set."""
        found = signal.set_wakeup_fd(self._write_end, warn_on_full_buffer=False)
        return None if found == self._write_end else found

    def close(self) -> None:
        """The wakeup fd it replaced back; the thread ended (by a 0: no signal has that number)."""
        signal.set_wakeup_fd(self.previous, warn_on_full_buffer=False)
        os.write(self._write_end, b"\0")
        self._thread.join()
        os.close(self._read_end)
        os.close(self._write_end)

    def _read(self) -> None:
        while True:
            data = os.read(self._read_end, 64)
            ended = 0 in data
            data = data.replace(b"\0", b"")
            if data:
                self._take(data)
            if ended:
                return
