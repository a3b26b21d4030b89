"""Commands written in Python, in the script's interpreter (``milter.tcl_command``).

Each command of the milter's registry (scripting.py) becomes, in the script's interpreter, an
alias of ``::tclmilter::pycommand`` (tclmilter.tcl) with a Python command of the main
interpreter. The Python side answers a list, as the bridge's own commands do (tkinter drops the
message of an error raised inside a Python command):

* ``{ok value}``: the function's result as a Tcl value (:func:`tcl_value`);
* ``{error message errorCode errorInfo}``: a wrong number of arguments (Tcl's wording, errorCode
  ``TCL WRONGARGS``) or an exception (errorCode ``PYTHON ClassName message``; errorInfo starts
  with the Python traceback, and Tcl adds its own frames as the error travels up);
* ``{limit}``: the callback's time (``-calltimeout``) ran out while the function ran. Tcl's limit
  cannot stop Python code, so the function runs under the Python limit (limits.py) with the
  time left to the Tcl callback; once it is stopped, Tcl's deadline is set to now and the proc
  waits for it: the callback ends as any callback over its limit does, and ``catch`` cannot
  keep it alive.

Arguments arrive as ``str`` under the README's bytes rule (``from_tcl``): a byte that is not
UTF-8 is a surrogate escape, and goes back to Tcl as that same byte.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from types import TracebackType
from typing import Any, Callable, Final, Sequence

from ..limits import PYTHON_LIMIT, CallbackTimeout
from ..protocol.codec import text
from ..scripting import TclCommand, TclCommands
from ..status import Status
from .limit import CallLimit
from .strings import from_tcl, to_tcl
from .usage import count_ok

log: Final = logging.getLogger("pytclmilter")

_WRAPPER: Final = "::tclmilter::pycommand"


class _Stopped(Exception):
    """The callback's time ran out while a Python command ran; ``where``: its traceback."""

    def __init__(self, where: str = "") -> None:
        super().__init__(where)
        self.where = where


def tcl_value(value: Any) -> Any:
    """A Python value as tkinter must be given it for its Tcl form: None the empty string, bool
    1 or 0, a Status its SMFIS_ name, bytes their text (the bytes rule), a list or tuple a Tcl
    list, a dict a Tcl dict (a key/value list); TypeError for anything else."""
    if type(value) is str:
        return to_tcl(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, Status):
        return value.smfis
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        return to_tcl(str(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return to_tcl(text(bytes(value)))
    if isinstance(value, (list, tuple)):
        return tuple(tcl_value(v) for v in value)
    if isinstance(value, dict):
        return tuple(x for k, v in value.items() for x in (tcl_value(k), tcl_value(v)))
    raise TypeError(f"a {type(value).__name__} has no Tcl form (return str, int, float, bool, bytes, None, "
                    "or a list, tuple or dict of them)")


def _own_frames_dropped(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the command's function on: this module's frames say nothing to its author."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


class PythonCommands:
    """Makes a milter's Python commands in the script's interpreter and runs them there."""

    def __init__(self, call: Callable[..., Any], create: Callable[[str, Callable[..., Any]], None],
                 child: str, limit: CallLimit) -> None:
        self._call = call  # a command in the main interpreter
        self._create = create
        self._child = child
        self.limit = limit
        self._ids = itertools.count(1)
        #: Where the last command stopped by the time limit was (its traceback), for the log line
        #: of the callback it stopped: the Tcl error of a limit carries Tcl's frames only.
        self.stopped = ""

    def attach(self, commands: TclCommands) -> None:
        """Create the commands defined so far, and each one defined later at once."""
        commands.watch(self.create)

    def create(self, command: TclCommand) -> None:
        """The command in the script's interpreter; ValueError if the name is taken there (a
        Python command must not replace ``set`` or a package's command and break the script)."""
        if self._child_call("info", "commands", to_tcl(command.name)):
            raise ValueError(f'tcl_command: "{command.name}" is already a Tcl command')
        own = f"::tclmilter::py::command{next(self._ids)}"
        self._create(own, self._runner(command))
        self._call("interp", "alias", self._child, own, "", own)
        self._call("interp", "alias", self._child, to_tcl(command.name), self._child, _WRAPPER, own)

    def _child_call(self, *words: Any) -> Any:
        return self._call("interp", "eval", self._child, words)

    def _runner(self, command: TclCommand) -> Callable[..., tuple[Any, ...]]:
        func, low, high = command.func, command.min_args, command.max_args
        usage = f"{command.name} {command.usage}".rstrip()

        def run(*args: str) -> tuple[Any, ...]:
            if not count_ok(len(args), low, high):
                message = to_tcl(f'wrong # args: should be "{usage}"')
                return ("error", message, ("TCL", "WRONGARGS"), message)
            try:
                result = self._limited(func, [from_tcl(a) for a in args])
            except _Stopped as stopped:
                self.stopped = f"Python command {command.name} stopped at the time limit in:\n{stopped.where}"
                self.limit.expire()
                return ("limit",)
            except Exception as exc:  # noqa: BLE001 - the script gets it as a Tcl error
                return self._error(exc, _own_frames_dropped(exc.__traceback__))
            try:
                return ("ok", tcl_value(result))
            except TypeError as exc:
                message = to_tcl(f"{command.name}: {exc}")
                return ("error", message, ("PYTHON", "TypeError", message), message)

        return run

    def _limited(self, func: Callable[..., Any], words: Sequence[str]) -> Any:
        """``func(*words)`` within the time the Tcl code running now has left (none at load time)."""
        if PYTHON_LIMIT.remaining() is not None:  # Python code ran this Tcl: its limit holds already
            try:
                return func(*words)
            except CallbackTimeout as exc:
                raise _Stopped(_where(exc)) from None
        left = self.limit.remaining()
        if left is None:
            return func(*words)
        if left <= 0:
            raise _Stopped()
        started = time.monotonic()
        held = PYTHON_LIMIT.begin(left, started)
        late = False
        try:
            result = func(*words)
        except CallbackTimeout as exc:
            raise _Stopped(_where(exc)) from None
        finally:
            if held:
                late = PYTHON_LIMIT.stop()
        if late or time.monotonic() - started > left:  # back from C code the signal could not stop
            raise _Stopped()
        return result

    @staticmethod
    def _error(exc: Exception, tb: TracebackType | None) -> tuple[Any, ...]:
        message = str(exc) or type(exc).__name__
        trace = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n")
        return ("error", to_tcl(message), ("PYTHON", type(exc).__name__, to_tcl(message)),
                to_tcl(f"{message}\n{trace}"))


def _where(exc: BaseException) -> str:
    """Where a stopped command was: its frames, without the exception line (whose seconds are
    the time that was left, not the limit)."""
    return "".join(traceback.format_tb(_own_frames_dropped(exc.__traceback__))).rstrip("\n")
