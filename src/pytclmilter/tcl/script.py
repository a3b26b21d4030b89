"""The script's run in its interpreter: sourced in a coroutine that `milter main` suspends,
resumed when the milter stops, its errorInfo as tclsh would show it, its evaluation cancelled,
and its channels flushed as Tcl's exit does.
"""

from __future__ import annotations

import _tkinter
import contextlib
import time
import tkinter
from typing import Any, Callable, Final, NamedTuple, Sequence

from . import output
from .callbacks import CALLED_FROM
from .limit import CallLimit
from .milter_cmd import MilterCommand
from .strings import to_tcl
from .usage import Answer

#: The coroutine that runs the script under start(): it exists while the script waits in `milter main`.
COROUTINE: Final = "::tclmilter::py::script"
#: Tcl's error for a `yield` outside a coroutine.
_NO_COROUTINE: Final = "yield can only be called in a coroutine"
#: How long a flush waits for the readers of the script's channels (a pipe's program, a socket's
#: peer) to take what is queued: as the process ends, in all; before a fork, while they take
#: none of it (each time the bytes queued reach a new low it waits as long again), ...
FLUSH_WAIT: Final = 3.0
#: ... and this long at most, however steadily they read (a reload's flush holds the
#: supervisor's loop, and a stop comes after it).
FLUSH_MOST: Final = 30.0
_DONT_WAIT: Final = _tkinter.DONT_WAIT
_FILE_EVENTS: Final = _tkinter.FILE_EVENTS


class Queued(NamedTuple):
    """A channel's output not written yet: its name, the bytes, its pipeline's pids (or "")."""
    channel: str
    left: int
    pids: str

    def __str__(self) -> str:
        return f"channel {self.channel}" + (f" (to pid {self.pids})" if self.pids else "")


def _never() -> bool:
    return False


class TclScript:
    """The script of one host (TclHost), run in the interpreter ``child`` of the host's ``tk``."""

    def __init__(self, tk: Any, child: str, limit: CallLimit, command: MilterCommand) -> None:
        self.tk = tk
        self.child = child
        self.limit = limit
        self.command = command
        #: How start() sources the script, for error_info: `source top.tcl`.
        self.source_word = ""

    def _call(self, *words: Any) -> Any:
        """Invoke a command in the script's interpreter (a pure list: no parsing of source text)."""
        return self.tk.call("interp", "eval", self.child, words)

    def error_info(self) -> str:
        """Tcl's errorInfo as tclsh would show it: ending at the script's file, without the frames
        of how start() and resume() run it (`source` in a coroutine, in the child interpreter). A
        break, continue or other code at the script's top level is made an error only where our
        call returns it, with that call as its one frame: the script's `source` is named instead
        (tclsh names the command and line, which no longer exist by then)."""
        try:
            info = str(self.tk.call("set", "::errorInfo"))
        except tkinter.TclError:
            return ""
        made = info.find(f'\n    while executing\n"interp eval {self.child} ')
        if made >= 0 and self.source_word and info.count("\n", made) == 2:
            return f'{info[:made]}\n    while executing\n"{self.source_word}"'
        ours = max(info.rfind(f'{CALLED_FROM}"coroutine {COROUTINE} '), info.rfind(f'{CALLED_FROM}"{COROUTINE} '))
        if ours < 0:
            return info
        source = info.rfind(f'{CALLED_FROM}"source ', 0, ours)
        adjacent = source >= 0 and info.find(CALLED_FROM, source + 1) == ours
        return info[:source if adjacent else ours]

    def set_argv(self, script: str, argv: Sequence[str]) -> None:
        """argv0, argv and argc as tclsh sets them for ``script`` run with ``argv``."""
        self._call("set", "argv0", script)
        self._call("set", "argv", tuple(to_tcl(a) for a in argv))
        self._call("set", "argc", len(argv))
        self._call("set", "tcl_interactive", 0)

    def start(self, path: str, within: float = 0.0, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Source a script whose `milter main` suspends it instead of serving (tclmilter.tcl), so that
        the milter serves outside the script's stack and a reload can replace the script without
        running the code after its `milter main`. True: it waits in `milter main` (serve, then
        resume); False: it ended, or it served inside (where Tcl could not suspend it). A TclError
        carries errorInfo in ``error_info()``. ``within``: seconds the script may take to get there
        (0: no limit), held by Tcl's `interp limit` whatever the script sets -calltimeout to; past
        them the TclError comes with ``self.limit.exceeded`` set. ``stopped``: true when a stop
        came before that limit began (a reload's watch, which expires it from then on), which
        then ends at once: begun, it would have run the script to its `milter main`."""
        self.command.suspend_at_main = True
        self.source_word = str(self.tk.call("format", "%s", ("source", path)))  # (a list: as Tcl shows it)
        if within:
            now = time.monotonic()
            self.limit.begin_within(now + within, now)
            if stopped():
                self.limit.expire()
        yielded = self._call("coroutine", COROUTINE, "source", path)
        if within:
            self.limit.clear()
        return self._at_main(yielded)

    @property
    def waiting(self) -> bool:
        """The script waits in `milter main` (start)."""
        return bool(self._call("::tcl::info::commands", COROUTINE))

    def resume(self, result: Answer) -> bool:
        """The milter stopped: `milter main` returns ``result`` (MilterCommand.serve) and the script
        goes on; True if it waits in `milter main` again. TclError as start()."""
        self.limit.clear()  # the code after `milter main` runs without the callbacks' limit
        return self._at_main(self._call(COROUTINE, result))

    def _at_main(self, yielded: Any) -> bool:
        """Whether the script waits in `milter main`, which yields "main" (tclmilter.tcl). A `yield`
        of the script's own at its top level, where tclsh has no coroutine, is refused as tclsh
        refuses it (TclError); it suspended the script, and the milter served."""
        if not self.waiting:
            return False
        if str(yielded) == "main":
            return True
        self._call("rename", COROUTINE, "")  # (unwinds the script)
        self.tk.call("set", "::errorInfo", _NO_COROUTINE)  # (what error_info reads)
        raise tkinter.TclError(_NO_COROUTINE)

    def cancel(self, message: str) -> None:
        """Unwind the script's evaluation where it is, through any `catch` (Tcl's `interp cancel
        -unwind`): the ``message`` is the error its evaluation ends with."""
        self.tk.call("interp", "cancel", "-unwind", "--", self.child, message)

    def flush(self, ending: bool, stopped: Callable[[], bool] = _never, wait: float = FLUSH_WAIT) -> list[Queued]:
        """Write what the script's channels buffer, as Tcl's exit does, waiting (until
        ``stopped()`` at most) for readers that take it slowly: ``wait`` seconds in all when
        ``ending``, else ``wait`` seconds without progress, FLUSH_MOST in all; what is still
        queued then, by channel. ``ending``: the process goes, so the channels stay non-blocking
        (``flush_all`` in prelude.py), and the lines `puts -nonewline` began and holds are written
        (output.py); else (before a fork) those that were blocking are made so again."""
        switched = self.flush_tcl(ending)
        try:
            left = self._drain(stopped, wait, wait if ending else max(wait, FLUSH_MOST))
        finally:
            if switched:
                self.tk.call("::tclmilter::py::blocking", self.child, switched)
        if ending:  # (every call but close's: the process ends)
            output.write_held()
        return left

    def _drain(self, stopped: Callable[[], bool], wait: float, most: float) -> list[Queued]:
        """Service file events (Tcl writes a non-blocking channel's queue as its reader takes it)
        while output is queued, until ``wait`` seconds pass with no new low in the bytes queued,
        ``most`` seconds at most; a script's `fileevent` handler that runs meanwhile is held to
        that end. What is queued still."""
        left = self._queued()
        if not left or wait <= 0:
            return left
        now = time.monotonic()
        end, low = now + most, sum(queued.left for queued in left)
        deadline = min(now + wait, end)
        try:
            while left and not stopped() and time.monotonic() < deadline and not self.limit.exceeded:
                self.limit.begin_within(deadline, time.monotonic())
                while self.tk.dooneevent(_DONT_WAIT | _FILE_EVENTS) and not self.limit.exceeded:
                    pass
                time.sleep(0.01)
                left = self._queued()
                total = sum(queued.left for queued in left)
                if total < low:  # the reader took some: as long again
                    low, deadline = total, min(time.monotonic() + wait, end)
        finally:
            self.limit.clear()
        return self._queued()  # (past the deadline the limit refused every command: it is off now)

    def _queued(self) -> list[Queued]:
        try:
            entries = self.tk.splitlist(self.tk.call("::tclmilter::py::queued", self.child))
        except tkinter.TclError:  # (an interpreter deleted already)
            return []
        left = []
        for entry in entries:
            channel, count, pids = self.tk.splitlist(entry)
            left.append(Queued(str(channel), int(count), " ".join(str(p) for p in self.tk.splitlist(pids))))
        return left

    def flush_tcl(self, ending: bool) -> Any:
        """flush() without the held lines and the wait: the interpreter's own channels only; the
        channels made non-blocking that were not (none when ``ending``)."""
        if ending:
            self.limit.clear()  # (a stopped callback's limit would refuse every command)
        with contextlib.suppress(tkinter.TclError):  # (an interpreter deleted already)
            return self.tk.call("::tclmilter::py::flush_all", self.child, 1 if ending else 0)
        return ""
