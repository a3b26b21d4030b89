"""A time limit for synchronous Python callbacks (Tcl ones use Tcl's ``interp limit``).

A plain function cannot be stopped from outside, so a watchdog thread checks a
few times a second whether the callback running on the main thread has
overrun, and if so sends the main thread ``SIGALRM``, whose handler raises
inside the callback. Starting a callback costs two attribute writes; this
works on the main thread only (where Python runs signal handlers). Async
callbacks are limited with ``asyncio.wait_for`` in the engine instead.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Final


_monotonic: Final = time.monotonic  # compiled, a module attribute is a look-up per use
_get_ident: Final = threading.get_ident


class CallbackTimeout(BaseException):
    """A callback ran longer than the milter's ``call_timeout``.

    A BaseException, like KeyboardInterrupt, so that a callback's own ``except Exception``
    cannot swallow it and keep the milter stuck.
    """


class PythonLimit:
    def __init__(self) -> None:
        self._started = 0.0
        self._seconds = 0.0
        self._active = False
        self._watchdog: threading.Thread | None = None
        self._main = threading.main_thread().ident
        # A forked worker has no watchdog thread (threads do not survive fork): start a new one.
        os.register_at_fork(after_in_child=self._forget_watchdog)

    def _forget_watchdog(self) -> None:
        self._watchdog = None
        self._main = threading.main_thread().ident

    def start(self, seconds: float) -> bool:
        """A callback starts now and may run ``seconds``; False if it cannot be limited here
        (no limit, or not the main thread). Call :meth:`stop` when it returns or raises."""
        if not seconds or _get_ident() != self._main:
            return False
        if self._watchdog is None:
            self._start()
        self._seconds, self._started, self._active = seconds, _monotonic(), True
        return True

    def stop(self) -> None:
        self._active = False

    def call(self, seconds: float, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` limited to ``seconds``."""
        if not self.start(seconds):
            return func(*args)
        try:
            return func(*args)
        finally:
            self.stop()

    def _start(self) -> None:
        signal.signal(signal.SIGALRM, self._expired)
        main = threading.main_thread().ident
        self._watchdog = threading.Thread(target=self._watch, args=(main,), name="callback-watchdog", daemon=True)
        self._watchdog.start()

    def _overrun(self) -> bool:
        return self._active and _monotonic() - self._started > self._seconds

    def _watch(self, main: int) -> None:
        while True:
            time.sleep(min(0.1, max(self._seconds / 4, 0.01)))
            if self._overrun():
                signal.pthread_kill(main, signal.SIGALRM)

    def _expired(self, signum: int, frame: object) -> None:
        if self._overrun():
            self._active = False
            raise CallbackTimeout(f"callback stopped after {self._seconds:g} s (call_timeout)")
