"""A time limit for synchronous Python callbacks (Tcl ones use Tcl's ``interp limit``).

A plain function cannot be stopped from outside, so the limit is a one-shot
``SIGALRM`` timer whose handler raises inside the callback, only while a
callback runs, and only on the main thread (where Python delivers signals).
Async callbacks are limited with ``asyncio.wait_for`` in the engine instead.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable


class CallbackTimeout(Exception):
    """A callback ran longer than the milter's ``call_timeout``."""


class PythonLimit:
    def __init__(self) -> None:
        self._active = False
        self._seconds = 0.0
        self._installed = False

    def call(self, seconds: float, func: Callable[..., Any], *args: Any) -> Any:
        if not seconds or threading.current_thread() is not threading.main_thread():
            return func(*args)
        if not self._installed:
            signal.signal(signal.SIGALRM, self._expired)
            self._installed = True
        self._active, self._seconds = True, seconds
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return func(*args)
        finally:
            self._active = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _expired(self, signum: int, frame: object) -> None:
        if self._active:
            self._active = False
            raise CallbackTimeout(f"callback stopped after {self._seconds:g} s (call_timeout)")
