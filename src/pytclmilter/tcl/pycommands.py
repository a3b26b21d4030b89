"""Python's half of the script: commands written in Python (``milter.tcl_command``), and
Python's calls to the script's procs (``ctx.tcl``, ``milter.tcl``).

Each command of the milter's registry (scripting.py) becomes, in the script's interpreter, an
alias of ``::tclmilter::pycommand`` (tclmilter.tcl) with a Python command of the main
interpreter. The Python side answers a list, as the bridge's own commands do (tkinter drops the
message of an error raised inside a Python command):

* ``{ok value}``: the function's result as a Tcl value (:func:`tcl_value`);
* ``{error message errorCode errorInfo}``: a wrong number of arguments (Tcl's wording, errorCode
  ``TCL WRONGARGS``), a :class:`TclError` (a Tcl error by intent, as Tcl's ``error`` makes one:
  its errorCode or ``NONE``, errorInfo its own or the message, no traceback) or another exception
  (errorCode ``PYTHON ClassName message``; errorInfo starts with the Python traceback, and Tcl
  adds its own frames as the error travels up);
* ``{limit}``: the callback's time (``-calltimeout``) ran out while the function ran. Tcl's limit
  cannot stop Python code, so the function runs under the Python limit (limits.py) with the
  time left to the Tcl callback; once it is stopped, Tcl's deadline is set to now and the proc
  waits for it: the callback ends as any callback over its limit does, and ``catch`` cannot
  keep it alive.

Arguments arrive as ``str`` under the README's bytes rule (``from_tcl``): a byte that is not
UTF-8 is a surrogate escape, and goes back to Tcl as that same byte.

The other way, ``ctx.tcl(...)`` runs a command through ``::tclmilter::call`` (tclmilter.tcl),
which hands back the bytes Tcl keeps the result's text in: the exact string form of any Tcl
value, converted once under the same rule. Run from a Python callback, the Tcl code gets the
time that callback has left (Tcl's own limit, set for it), or a callback's full time from an
``async`` one; run from a Python command, it is already inside a limited Tcl callback.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import tkinter
import traceback
from types import TracebackType
from typing import Any, Callable, Final, Sequence

from ..context import Context
from ..limits import PYTHON_LIMIT, CallbackTimeout, internals_dropped
from ..logline import failure_text
from ..milter import Milter
from ..protocol.codec import text
from ..scripting import TclCommand, TclCommands, TclError
from ..status import Status
from .limit import CallLimit, is_limit_error
from .priv import identity_text
from .strings import from_tcl, to_tcl
from .usage import count_ok, with_article, wrong_args

_WRAPPER: Final = "::tclmilter::pycommand"
_CALL: Final = "::tclmilter::call"
_CALL_LIST: Final = "::tclmilter::calllist"
#: Asked by the wrapper when a Python command failed as Python entered it (:meth:`PythonCommands._ran_out`).
_RAN_OUT: Final = "::tclmilter::py::ranout"
#: Where our ::tclmilter::call frames start in errorInfo: what follows is ours, not the script's.
_OUR_FRAMES: Final = '\n    ("uplevel" body line 1)\n    invoked from within\n"uplevel #0 $args"'


class _Stopped(Exception):
    """The callback's time ran out while a Python command ran; ``where``: its traceback."""

    def __init__(self, where: str = "") -> None:
        super().__init__(where)
        self.where = where


#: Levels of lists and dicts a value given to Tcl may nest. Deeper, Python's recursion limit
#: stopped the conversion at a depth that varied with the stack (about 450 levels), and inside
#: tkinter's call of a command, whose RecursionError tkinter keeps to itself: the script got an
#: empty error. (tkinter's own C conversion crashes the process near 100 000 levels.)
MAX_NESTING: Final = 100
#: What a Python command answers when Python's recursion limit stops it (a command calling itself
#: through milter.tcl): made here, as there is no stack left to make it then.
_RECURSION: Final = "maximum recursion depth exceeded (a Python command that calls itself through Tcl?)"
_RECURSION_ANSWER: Final = ("error", _RECURSION, ("PYTHON", "RecursionError", _RECURSION), _RECURSION)


def tcl_form(value: Any, string: Callable[[str], Any], other: Callable[[Any], Any], depth: int = 0) -> Any:
    """A Python value in the shape tkinter makes a Tcl value of: None the empty string, bool 1 or
    0, a Status its SMFIS_ name, numbers as they are, bytes their text (the bytes rule), a list or
    tuple a Tcl list, a dict a Tcl dict (a key/value list). ``string`` gives each text's form,
    ``other`` that of a value of any other type. ValueError for lists or dicts nested deeper than
    MAX_NESTING (a list that contains itself has no end)."""
    if type(value) is str:
        return string(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, Status):
        return value.smfis
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        return string(str(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return string(text(bytes(value)))
    if isinstance(value, (list, tuple, dict)) and depth >= MAX_NESTING:
        raise ValueError(f"{with_article(type(value).__name__)} nested deeper than {MAX_NESTING} levels "
                         "(or one that contains itself) has no Tcl form")
    depth += 1
    if isinstance(value, (list, tuple)):
        return tuple(tcl_form(v, string, other, depth) for v in value)
    if isinstance(value, dict):
        return tuple(x for k, v in value.items()
                     for x in (tcl_form(k, string, other, depth), tcl_form(v, string, other, depth)))
    return other(value)


def tcl_value(value: Any) -> Any:
    """A Python command's result as tkinter must be given it (:func:`tcl_form`, texts made
    :func:`to_tcl`); TypeError for a type with no Tcl form."""
    return tcl_form(value, to_tcl, _no_tcl_form)


def _no_tcl_form(value: Any, verb: str = "return") -> Any:
    raise TypeError(f"{with_article(type(value).__name__)} has no Tcl form ({verb} str, int, float, bool, bytes, None, "
                    "or a list, tuple or dict of them)")


def script_word(value: Any) -> Any:
    """An argument of ctx.tcl as :func:`tcl_value` makes it, a context (in a list too) as its
    context command."""
    return tcl_form(value, to_tcl, _word)


def _word(value: Any) -> Any:
    if isinstance(value, Context):
        return value.host_data or ""
    return _no_tcl_form(value, "pass a context,")


def _own_frames_dropped(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the command's function on: this module's frames say nothing to its author."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


class PythonCommands:
    """Makes a milter's Python commands in the script's interpreter and runs them there."""

    def __init__(self, call: Callable[..., Any], create: Callable[[str, Callable[..., Any]], None],
                 child: str, limit: CallLimit, milter: Milter) -> None:
        self._call = call  # a command in the main interpreter
        self._create = create
        self._child = child
        self.limit = limit
        self._milter = milter  # callbacks have a time limit only while it serves
        self._ids = itertools.count(1)
        self._thread = threading.get_ident()  # tkinter's interpreter works on its own thread only
        #: Python commands and calls into Tcl running now, one inside the other: only the outermost
        #: sets the time limit, the others run within it.
        self._depth = 0
        #: Where the last command stopped by the time limit was (its traceback), for the log line
        #: of the callback it stopped: the Tcl error of a limit carries Tcl's frames only.
        self.stopped = ""

    def attach(self, commands: TclCommands) -> None:
        """Create the commands defined so far, and each one defined later at once."""
        self._create(_RAN_OUT, self._ran_out)
        self._call("interp", "alias", self._child, _RAN_OUT, "", _RAN_OUT)
        commands.watch(self.create)

    def _ran_out(self) -> int:
        """1 if the callback's time ran out (the wrapper then waits for Tcl's limit, as for a
        {limit} answer). Asked when a runner raised before its first line could catch anything:
        the watchdog's signal came in Tcl's C code (`exec`, a long argument converted), and its
        handler ran as Python entered the runner; tkinter keeps such an exception to itself and
        gave Tcl an empty error, which the script could `catch`, running on past -calltimeout."""
        if not PYTHON_LIMIT.ran_out:
            return 0
        self.limit.expire()
        return 1

    def create(self, command: TclCommand) -> None:
        """The command in the script's interpreter; ValueError if the name is taken there (a
        Python command must not replace ``set`` or a package's command and break the script)."""
        if self._child_call("::tcl::info::commands", to_tcl(command.name)):
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
            try:
                return attempt(*args)
            except RecursionError:  # (in _error: no stack left to report it; tkinter would drop it)
                return _RECURSION_ANSWER
            except CallbackTimeout as exc:  # outside the function (converting its words or result)
                return self._stopped_in(command.name, _where(exc))

        def attempt(*args: str) -> tuple[Any, ...]:
            if not count_ok(len(args), low, high):
                message = to_tcl(str(wrong_args(usage)))
                return ("error", message, ("TCL", "WRONGARGS"), message)
            self._depth += 1
            try:
                result = self._limited(func, [from_tcl(a) for a in args])
            except _Stopped as stopped:
                return self._stopped_in(command.name, stopped.where)
            except CallbackTimeout:  # (not the function's: _limited made that _Stopped) a limit all the same
                raise
            except TclError as exc:  # a Tcl error by intent (or one of milter.tcl let through): no traceback
                return self._tcl_answer(exc, _own_frames_dropped(exc.__traceback__))
            # The script gets it as a Tcl error: a sys.exit() too, which would otherwise pass
            # through Tcl uncatchable and fail the callback, or end the load, from outside it,
            # and any BaseException (a library's own class), of which tkinter gave Tcl an empty message.
            except BaseException as exc:  # noqa: BLE001
                return self._error(exc, _own_frames_dropped(exc.__traceback__))
            finally:
                self._depth -= 1
            try:
                return ("ok", tcl_value(result))
            except (TypeError, ValueError) as exc:
                message = to_tcl(f"{command.name}: {failure_text(exc)}")
                return ("error", message, ("PYTHON", type(exc).__name__, message), message)

        return run

    def _stopped_in(self, name: str, where: str) -> tuple[Any, ...]:
        """The {limit} answer: the callback's time ran out while the command ``name`` ran (its
        traceback ``where``, for the callback's log line); Tcl's limit ends the callback now."""
        self.stopped = f"Python command {name} stopped at the time limit in:\n{where}"
        self.limit.expire()
        return ("limit",)

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

    # ------------------------------------------------------------ Python -> Tcl

    def call(self, words: tuple[Any, ...]) -> str:
        """ctx.tcl: the command's result as text (the bytes rule)."""
        return identity_text(self._run(_CALL, words))

    def call_list(self, words: tuple[Any, ...]) -> list[str]:
        """ctx.tcl_list: the command's result split as a Tcl list, each element as text."""
        result = self._run(_CALL_LIST, words)
        if isinstance(result, tuple):
            return [identity_text(e) for e in result]
        return [] if result == "" else [identity_text(result)]

    def _run(self, helper: str, words: tuple[Any, ...]) -> Any:
        if threading.get_ident() != self._thread:
            raise RuntimeError("ctx.tcl and milter.tcl work on the milter's thread only (in callbacks)")
        if not words:
            raise TypeError("ctx.tcl needs a command name")
        args = [script_word(w) for w in words]
        inside = self.limit.running  # Tcl code called the Python code calling us: its limit stays
        if not self._depth and self._milter.running:
            self._arm()
        self._depth += 1
        try:
            return self._call("interp", "eval", self._child, (helper, *args))
        except tkinter.TclError as exc:
            raise self._tcl_error(exc) from None
        finally:
            self._depth -= 1
            if not self._depth and not inside:
                self.limit.done()

    def _arm(self) -> None:
        """Give the Tcl code the time the Python callback running it has left, or, from an async
        one (whose time asyncio keeps), a callback's full time."""
        now = time.monotonic()
        left = PYTHON_LIMIT.remaining()
        if left is not None:
            self.limit.begin_within(now + left, now)
        else:
            self.limit.begin_handlers()

    def _tcl_error(self, exc: tkinter.TclError) -> BaseException:
        info = str(self._call("set", "::errorInfo"))
        cut = info.rfind(_OUR_FRAMES)
        info = from_tcl(info[:cut] if cut >= 0 else info)
        code = self._call("lrange", self._call("set", "::errorCode"), 0, "end")
        words = tuple(from_tcl(str(w)) for w in (code if isinstance(code, tuple) else (code,) if code else ()))
        if is_limit_error(str(exc), words):
            self.limit.reset()
            stopped = CallbackTimeout(f"callback stopped after {self._milter.call_timeout:g} s (call_timeout), "
                                      "in Tcl code")
            stopped.add_note(f"Tcl errorInfo:\n{info}")
            if self.stopped:  # a Python command that this Tcl code called was running
                stopped.add_note(self.stopped)
                self.stopped = ""
            return stopped
        return TclError(from_tcl(str(exc)), info, words)

    # ------------------------------------------------------------ errors

    @staticmethod
    def _tcl_answer(exc: TclError, tb: TracebackType | None) -> tuple[Any, ...]:
        """A TclError as Tcl's ``error message ?info? ?code?`` makes it: errorCode its words or
        NONE; errorInfo its message, or the Tcl stack it carries (a milter.tcl call's) followed by
        the Python frames it went up through (``tb``): the script's fault was Tcl's, but which
        Python line called that proc is what its author looks for, and a typo's refusal, raised
        where it was found, has no stack to show."""
        message = to_tcl(exc.message)
        code = tuple(to_tcl(w) for w in exc.error_code) or ("NONE",)
        if not exc.error_info:
            return ("error", message, code, message)
        frames = _through(tb)
        info = f"{exc.error_info}\n    (in Python, going up through)\n{frames}" if frames else exc.error_info
        return ("error", message, code, to_tcl(info))

    @staticmethod
    def _error(exc: BaseException, tb: TracebackType | None) -> tuple[Any, ...]:
        message = failure_text(exc)  # ("3" would say nothing: SystemExit(3))
        trace = "".join(traceback.format_exception(type(exc), exc, internals_dropped(exc, tb))).rstrip("\n")
        return ("error", to_tcl(message), ("PYTHON", type(exc).__name__, to_tcl(message)),
                to_tcl(f"{message}\n{trace}"))


#: The modules a call into the script's Tcl (milter.tcl, ctx.tcl) goes through before its
#: TclError is raised (by basename: compiled, a frame is named by the source path at build time).
_CALLS_INTO_TCL: Final = frozenset({"milter.py", "context.py", "pycommands.py"})


def _through(tb: TracebackType | None) -> str:
    """The Python frames a TclError went up through, without the last ones, pytclmilter's call
    into Tcl: the line of the command's that called the proc is where its author looks."""
    entries = []
    while tb is not None:
        entries.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    while entries and os.path.basename(entries[-1][0].f_code.co_filename) in _CALLS_INTO_TCL:
        entries.pop()
    return "".join(traceback.StackSummary.extract(iter(entries)).format()).rstrip("\n")


def _where(exc: BaseException) -> str:
    """Where a stopped command was: its frames, without the exception line (whose seconds are
    the time that was left, not the limit)."""
    return "".join(traceback.format_tb(_own_frames_dropped(internals_dropped(exc, exc.__traceback__)))).rstrip("\n")
