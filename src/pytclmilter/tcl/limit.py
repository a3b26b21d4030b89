"""A time limit for Tcl callbacks, with Tcl's own ``interp limit`` on the script's interpreter.

Setting the limit before every callback would cost two Tcl calls per
callback. Instead the deadline is armed lazily and Tcl calls us back when it
passes: if the callback running then is still within its allowance the
deadline moves on towards its end, otherwise Tcl unwinds it with ``time limit
exceeded`` (errorCode ``TCL LIMIT TIME``), which a script cannot ``catch``.
The deadline Tcl holds is never more than half a second away: at each such beat
the Python handlers of the signals that came meanwhile run, so a stop (SIGTERM)
holds the callback running to the stop's grace at once (server.py), not only once
it returns.
Tcl checks the deadline between commands only: a command blocked in C code
(``exec``) runs to its end, and :meth:`CallLimit.stop` tells the engine so.

The deadline stays armed after a callback returns (disarming would cost a Tcl call each time),
so it can pass while the host itself evaluates in the interpreter: an idle poll, a context's
cleanup, a Python callback reading private data. Those are no callback's time: a deadline that
finds nothing limited running is removed (:meth:`CallLimit.done` says when that is).

A command written in Python (tcl/pycommands.py) is Python code inside the Tcl callback, which
Tcl's limit cannot stop: it runs under the Python limit (limits.py) with :meth:`remaining`,
and when that stops it, :meth:`expire` has Tcl's limit end the callback the usual way.
Python code that runs Tcl (``ctx.tcl``) gives Tcl its own end with :meth:`begin_within`.
"""

from __future__ import annotations

import signal
import time
from typing import Callable, Final, Sequence

from ..shared import Shared
from ..limits import PYTHON_LIMIT, Limit

_HANDLER: Final = "::tclmilter::py::limit"
#: The Python halves of _HANDLER, a Tcl proc: the deadline's decision, and the same after it failed.
_DECIDE: Final = "::tclmilter::py::limit_decide"
_FAILED: Final = "::tclmilter::py::limit_failed"
#: A Python command that raises gives Tcl an empty error and tkinter keeps the exception to
#: itself: the Python limit's CallbackTimeout does so when its signal was pending as Tcl called
#: the handler (the time ran out in `exec`), and the hook or callback was never told (_failed).
_HANDLER_BODY: Final = f"if {{[catch {_DECIDE}]}} {_FAILED}"
#: Sets the limit on the script's interpreter and on each interpreter it made (prelude.py).
_LIMIT_TIME: Final = "::tclmilter::py::limit_time"
_monotonic: Final = time.monotonic  # compiled, `time.monotonic` is two look-ups per call
_NEVER: Final = float("inf")
#: Seconds between Tcl's calls to the deadline handler while limited Tcl code runs: the deadline
#: Tcl holds is never further away, however long the allowance (see :func:`_take_signals`).
_BEAT: Final = 0.5
_NO_SIGNALS: Final[tuple[signal.Signals, ...]] = ()
#: Tcl 8.6 keeps `interp limit ... -seconds` in a C int: a later second (2038) is refused there.
_TCL_LAST_SECOND: Final = 2**31 - 1


def _take_signals() -> None:
    """Run the Python handlers of the signals that came while Tcl ran. Python runs them only
    between its own statements, and a Tcl callback stuck in `after` or a loop runs none: a stop's
    signal (server.py) would lower the allowance only once the callback was over. CPython runs
    the pending handlers whenever the signal mask is set, also to what it was, and compiled code
    (mypyc) would not run them at all otherwise."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _NO_SIGNALS)


#: The errorInfo of the background error Tcl's own timer for the time limit queues when the limit
#: passes while the event loop runs (TimeLimitCallback, in `vwait` or `update`): its message is
#: "time limit exceeded". The code that waited is stopped too, and fails with "limit exceeded"
#: (:data:`WAIT_STOPPED`): that is the stop's report, and this its echo (TclHost._limit_echo).
LIMIT_ECHO: Final = "time limit exceeded\n    (while waiting for event)"
#: The error of `vwait` or `update` that the time limit stopped.
WAIT_STOPPED: Final = "limit exceeded"


def is_limit_error(message: str, code: Sequence[str]) -> bool:
    """Whether a Tcl error is this limit ending the callback. Tcl says so with errorCode ``TCL
    LIMIT TIME``, but from inside ``vwait`` with ``TCL EVENT LIMIT`` or none, so the message
    tells too."""
    return (tuple(code[:3]) in (("TCL", "LIMIT", "TIME"), ("TCL", "EVENT", "LIMIT"))
            or message in ("time limit exceeded", WAIT_STOPPED))


class CallLimit(Limit):
    """Per-callback time limit for one child interpreter; ``seconds`` 0 means none."""

    def __init__(self, call: Callable[..., object], create: Callable[[str, Callable[..., object]], None],
                 child: str, shared: Shared) -> None:
        self._call = call
        self._child = child
        self._shared = shared  # read at every deadline: `milter configure -calltimeout` applies at once
        self._started = _monotonic()
        self._seconds = 0.0
        self._armed_until = 0.0  # monotonic time of the deadline Tcl holds; 0: none
        self._cap = _NEVER  # an end the allowance may not pass (begin_within, expire)
        self._running = False  # limited Tcl code runs (a callback, handlers, begin_within's code)
        #: Tcl stopped an evaluation at the deadline, and runs nothing more in the interpreter
        #: until the limit is set again (any _set).
        self.exceeded = False
        #: A callback stopped waiting in `vwait` or `update` was reported: the echo of its stop that
        #: Tcl queued as a background error (:data:`LIMIT_ECHO`) is not logged again.
        self.echo_due = False
        create(_DECIDE, self._on_deadline)
        create(_FAILED, self._failed)
        call("proc", _HANDLER, "args", _HANDLER_BODY)
        create("::tclmilter::py::limit_sync", self._sync)

    def begin(self, seconds: float, now: float) -> bool:
        """A callback starts (the engine read the time and the milter's call_timeout)."""
        self._started, self._seconds, self._cap, self._running = now, seconds, _NEVER, True
        if not seconds:
            if self._armed_until:
                self._set(None)
            return False
        # Re-armed when Tcl would stop this evaluation at once, or later than its end (the limit
        # was lowered meanwhile: a stop under way).
        if self._armed_until < now or self._armed_until > now + seconds:
            self._set(now + seconds)
        return True

    def stop(self) -> bool:
        """Read the clock: a callback blocked in C code past its deadline may still return."""
        self._running = False
        return _monotonic() - self._started > self._seconds

    def done(self) -> None:
        """The limited code is over (a batch of handlers, begin_within's code): what the host runs
        in the interpreter next is not held to its end."""
        self._running = False

    def begin_within(self, deadline: float, now: float) -> None:
        """Python code held to ``deadline`` (monotonic) runs Tcl now: Tcl stops at the same end.
        A deadline Tcl holds that is still ahead and not past that end stays (as in :meth:`begin`):
        its handler extends it towards the end; re-arming would cost a Tcl call (a context's
        deletion, once a connection, runs here)."""
        self._started, self._seconds, self._cap, self._running = now, max(deadline - now, 0.0), deadline, True
        if not now < self._armed_until <= deadline:
            self._set(deadline)

    @property
    def running(self) -> bool:
        """Limited Tcl code runs now (a callback, a batch of handlers, begin_within's code)."""
        return self._running

    def remaining(self) -> float | None:
        """Seconds the Tcl code running now may still run; None when no limit is in force (the
        script's own code before and after serving, or -calltimeout 0)."""
        end = self._end() if self._armed_until else _NEVER
        return None if end == _NEVER else end - _monotonic()

    def expire(self) -> None:
        """The allowance is used up (by a Python command): Tcl's next check stops the evaluation."""
        now = _monotonic()
        self._cap, self._running = now, True
        self._set(now)

    def begin_handlers(self) -> None:
        """A batch of event handlers (``after``, ``fileevent``) starts now: the same allowance."""
        now = _monotonic()
        self.begin(self._shared.call_limit(now), now)

    def clear(self) -> None:
        """No limit outside serving: the script's own code after `milter main` runs unbounded."""
        self._running = False
        if self._armed_until:
            self._set(None)

    def reset(self) -> None:
        """After a callback was stopped: Tcl runs nothing more in the interpreter until its limit
        changes, so it goes; the next callback or batch of handlers arms a fresh one."""
        self._running = False
        self._set(None)

    def _end(self) -> float:
        """When the Tcl code running now must stop (_NEVER: no limit). An end given (begin_within,
        expire) holds whatever the script set -calltimeout to since; otherwise -calltimeout,
        read now: `milter configure -calltimeout` in a callback applies to it at once."""
        if self._cap != _NEVER:
            return self._cap
        limit = self._shared.call_limit(self._started)
        return self._started + limit if limit else _NEVER

    def stopped(self, what: str = "-calltimeout") -> str:
        """Why the limited Tcl code that ran last was stopped, for its log line (Shared.overrun)."""
        if self._cap != _NEVER:  # (begin_within, expire: their own end)
            return f"stopped after {self._shared.settings.call_timeout:g} s ({what})"
        return self._shared.overrun(self._started, _monotonic(), what)

    def _on_deadline(self, *args: object) -> None:
        if self._running:
            _take_signals()  # a stop that came meanwhile lowers the allowance now (_BEAT)
        end = self._end() if self._running else _NEVER
        if end == _NEVER:
            self._set(None)
        elif _monotonic() < end:
            self._set(end)  # the callback running now still has time: extend towards its end
        else:
            self.exceeded = True

    def _failed(self, *args: object) -> None:
        """The deadline's handler raised (its signal, already taken, does not come again): when
        that was the Python limit's CallbackTimeout, the Python code running this Tcl is out of
        time, and so is its Tcl, stopped now as at its end (tcl/pycommands.py's ranout, for a
        Python command's runner)."""
        if self._running and PYTHON_LIMIT.ran_out:
            self._cap = _monotonic()
        self._on_deadline()

    def _sync(self, *args: object) -> None:
        """The script made an interpreter: it gets the deadline armed now, with its handler."""
        if self._armed_until:
            self._set(self._armed_until)

    def _set(self, deadline: float | None) -> None:
        """Arm ``deadline`` (None: no limit) on the script's interpreter and every one it made:
        Tcl checks only the limit of the interpreter that runs, so a loop in the script's own
        `interp create`d child would hold the milter for ever."""
        self.exceeded = False
        if deadline is None:
            self._call(_LIMIT_TIME, self._child, "-seconds", "", "-milliseconds", "")
            self._armed_until = 0.0
            return
        now = _monotonic()
        deadline = min(deadline, now + _BEAT)  # Tcl calls back at each beat: _on_deadline extends
        wall = min(time.time() + (deadline - now), _TCL_LAST_SECOND)  # -calltimeout 1e9, Inf
        ms = int(wall * 1000) + 1
        self._call(_LIMIT_TIME, self._child, "-seconds", ms // 1000, "-milliseconds", ms % 1000,
                   "-command", _HANDLER)
        self._armed_until = deadline
