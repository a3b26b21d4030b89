"""The ``milter`` command: configure, main, register, stop (TclMilter 1.0's control functions)."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from ..callbacks import EVENTS, Callback
from ..connspec import ConnSpecError, parse, parse_metrics
from ..hooks import FlushRefused
from ..logline import escape
from ..milter import Milter
from ..repeats import Repeated
from ..settings import MAX_WORKERS
from ..status import parse_status, status_names
from . import osthreads
from .usage import NONE, VALUE_NUMBER, Answer, TclUsageError, boolean, check_count, integer, number, one_of, wrong_args

if TYPE_CHECKING:
    from .interp import TclHost

log = logging.getLogger("pytclmilter")


def _ignored_said(_options: Repeated, label: str, missed: int) -> None:
    """The line of a script's configure of an option the command line fixed (``label``: the
    option, the value given and why it is ignored, escaped), with how many such calls since the
    last (as the next one says it, or alone once the hour is over: repeats.tell_counts)."""
    log.info("milter configure %s (said once an hour for this option%s)", label,
             f"; {missed} more since" if missed else "")


class SuspendAtMain(Exception):
    """`milter main` under run: the script waits there while the host serves (tclmilter.tcl)."""


@dataclass(frozen=True)
class Option:
    attr: str  # field of Settings (but "debuglevel": MilterCommand keeps it)
    before_main: bool  # "may only be changed prior to milter main"
    parse: Callable[[str], Any]
    show: Callable[[Any], Any] = lambda v: v
    numeric: bool = False  # a number: Tcl's forms in a script, decimal from a command-line flag


_N = TypeVar("_N", int, float)


def _at_least(low: int, convert: Callable[[str], _N], expected: str, most: float = math.inf) -> Callable[[str], _N]:
    """An option's parser: the value ``convert``ed, refused below ``low`` (or NaN) or above
    ``most`` in Tcl's words."""
    def parse_value(value: str) -> _N:
        n = convert(value)
        if not low <= n <= most:  # NaN compares false both ways: `-grace nan` would be no grace at all
            raise TclUsageError(f'expected {expected} but got "{value}"', VALUE_NUMBER)
        return n
    return parse_value


_positive = _at_least(1, integer, "positive integer")


def _c_int(parse: Callable[[str], int]) -> Callable[[str], int]:
    """``parse``, refusing what a C int cannot hold as Tcl_GetIntFromObj does (listen() takes one)."""
    def parse_value(value: str) -> int:
        n = parse(value)
        if n > 2**31 - 1:
            raise TclUsageError("integer value too large to represent",
                                ("ARITH", "IOVERFLOW", "integer value too large to represent"))
        return n
    return parse_value

_non_negative = _at_least(0, integer, "non-negative integer")
_seconds = _at_least(0, number, "non-negative number")


def _spec(check: Callable[[str], object], empty_ok: bool = False) -> Callable[[str], str]:
    """A parser of a socket option's value: ``check`` (connspec) refuses it in Tcl's words."""
    def parse_value(value: str) -> str:
        if value or not empty_ok:
            try:
                check(value)
            except ConnSpecError as exc:
                raise TclUsageError(str(exc)) from None
        return value

    return parse_value


def _name(value: str) -> str:
    """The milter's name: every log line and the listening line show it, so not blank."""
    if not value.strip():
        raise TclUsageError(f'bad name "{value}": must not be empty')
    return value


_connection = _spec(parse)
_metrics = _spec(parse_metrics, empty_ok=True)  # "" serves no metrics


def _status(value: str) -> Any:
    # Not "": as a callback's result it means continue, but as -onerror (or --on-error "") an
    # empty value, such as an unset variable's default, would let every failing message through.
    status = parse_status(value) if value else None
    if status is None or status.name not in ("CONTINUE", "REJECT", "TEMPFAIL", "ACCEPT", "DISCARD"):
        raise TclUsageError(f'bad status "{value}": must be SMFIS_ACCEPT, SMFIS_CONTINUE, SMFIS_DISCARD, '
                            "SMFIS_REJECT, or SMFIS_TEMPFAIL")
    return status


OPTIONS: dict[str, Option] = {
    "-name": Option("name", True, _name),
    "-connection": Option("connection", True, _connection),
    "-timeout": Option("timeout", True, _non_negative, numeric=True),
    "-backlog": Option("backlog", True, _c_int(_positive), lambda v: v or max(socket.SOMAXCONN, 20), numeric=True),
    "-debuglevel": Option("debuglevel", False, _non_negative, numeric=True),
    # New in pytclmilter:
    "-onerror": Option("on_error", False, _status, lambda v: v.smfis),
    "-grace": Option("grace", False, _seconds, numeric=True),
    "-calltimeout": Option("call_timeout", False, _seconds, numeric=True),
    "-workers": Option("workers", True, _at_least(1, integer, f"positive integer up to {MAX_WORKERS}", MAX_WORKERS),
                       numeric=True),
    "-metrics": Option("metrics", True, _metrics),
    "-dryrun": Option("dry_run", False, boolean, int),
    "-maxconnections": Option("max_connections", False, _non_negative, numeric=True),
}

SUBCOMMANDS = ("configure", "main", "register", "stop")

_DIGITS = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_RADIX = re.compile(r"\s*[+-]?0[xXoObB]", re.ASCII)


def _decimal(raw: str) -> str:
    """A command-line flag's number read in decimal, as a command line's user means it: Tcl's
    rules made `--workers 010` eight workers, `0x10` sixteen and `08` an error. Digits lose their
    leading zeros; a radix prefix is refused; anything else is left to the option's own check."""
    if _DIGITS.fullmatch(raw):
        return str(int(raw))
    if _RADIX.match(raw):
        raise TclUsageError(f'expected decimal number but got "{raw}" (a command-line flag is read in decimal; '
                            "the script's milter configure reads Tcl's forms)", VALUE_NUMBER)
    return raw


def _flagged(flag: str, name: str, message: str) -> str:
    """An option's error as the command line's: ``connection "x": ...`` becomes ``--connection
    "x": ...``, and one that does not open with the option's word gets the flag in front."""
    word = name[1:] + " "
    return flag + message[len(word) - 1:] if message.startswith(word) else f"{flag}: {message}"

_ENDS_HERE = "milter main: the script ends here under check and try"


class MilterCommand:
    """Implements ``milter ...`` for one interpreter and its Milter."""

    def __init__(self, host: "TclHost", milter: Milter) -> None:
        self.host = host
        self.milter = milter
        self.locked: dict[str, str] = {}  # options fixed on the command line: why (lock)
        self.debuglevel = 0
        #: Replaces serving in `milter main` (check mode returns at once); None serves.
        self.main_hook: Callable[[], None] | None = None
        self.main_calls = 0
        #: The file that called `milter main` (`info script`, made absolute then: a `cd` may follow):
        #: its rest runs when `milter main` returns, as does the script's, which may source it.
        self.main_file = ""
        #: check/try: end the script when `milter main` returns, so that what follows it (such as
        #: the manual's `file delete` of the production socket) never runs outside production.
        self.end_script_at_main = False
        self.ended_at_main = False
        #: run: `milter main` suspends the script and the host serves outside it (TclHost.start).
        self.suspend_at_main = False
        #: A script's configure of an option in ``locked``: its line said an hour per option, the
        #: rest counted (a configure per message, or in a loop, wrote a line each).
        self.ignored = Repeated(3600.0, keep=len(OPTIONS), tell=_ignored_said)

    def __call__(self, args: Sequence[str]) -> Any:
        if not args:
            raise wrong_args("milter option ?arg ...?")
        sub = one_of("option", args[0], SUBCOMMANDS)
        return getattr(self, "_" + sub)(args[1:])

    # ------------------------------------------------------------ configure

    def _configure(self, args: Sequence[str]) -> Any:
        if not args:
            return tuple(x for name in sorted(OPTIONS) for x in (name, self._get(name)))
        if len(args) == 1:
            return self._get(one_of("option", args[0], OPTIONS))
        if len(args) % 2:
            name = one_of("option", args[-1], OPTIONS)
            raise TclUsageError(f'value for "{name}" missing')
        for i in range(0, len(args), 2):
            self.set(one_of("option", args[i], OPTIONS), args[i + 1], from_script=True)
        return ""

    def _get(self, name: str) -> Any:
        opt = OPTIONS[name]
        value = self.debuglevel if name == "-debuglevel" else getattr(self.milter.settings, opt.attr)
        return opt.show(value)

    def set(self, name: str, raw: str, from_script: bool = False) -> None:
        opt = OPTIONS[name]
        value = opt.parse(raw)
        if opt.before_main and self.milter.running:
            raise TclUsageError(f'option "{name}" can only be changed before milter main')
        if from_script and name in self.locked:
            self._say_ignored(name, raw)
            return
        if name == "-debuglevel":
            self.debuglevel = value
            logging.getLogger("pytclmilter").setLevel(logging.DEBUG if value > 0 else logging.NOTSET)
            return
        change: dict[str, Any] = {opt.attr: value}
        self.milter.settings = replace(self.milter.settings, **change)

    def _say_ignored(self, name: str, raw: str) -> None:
        """Log that the script's configure of ``name`` is ignored, unless said this hour (counted then)."""
        label = f"{name} {escape(raw)} ignored: {escape(self.locked[name])}"
        missed = self.ignored.due(name, label)
        if missed is not None:
            _ignored_said(self.ignored, label, missed)

    def lock(self, name: str, raw: str, flag: str, why: str = "") -> None:
        """Set an option from the command line; the script cannot change it afterwards. Its error
        names the flag: the option's own words (``expected integer but got "x"``) do not say which
        of the command line's values it was. ``why`` the script's configure is ignored, where no
        flag gave the value (try's own): by default ``--workers given on the command line``."""
        value = raw
        try:
            option = OPTIONS.get(name)  # (an unknown one: set's bad option error)
            value = _decimal(raw) if option is not None and option.numeric else raw
            self.set(name, value)
        except TclUsageError as exc:
            # (the option's words quote what it was given: "-05" read as "-5" is quoted as typed)
            said = str(exc).replace(f'got "{value}"', f'got "{raw}"') if value != raw else str(exc)
            raise TclUsageError(_flagged(flag, name, said)) from None
        self.locked[name] = why or f"{flag} given on the command line"

    # ------------------------------------------------------------ main / stop

    def _main(self, args: Sequence[str]) -> str:
        check_count(args, 0, 0, "milter main")
        if self.milter.running:
            raise TclUsageError("milter main: the milter is already running")
        if self.milter.workers > 1:
            self._check_forkable()
        self.main_calls += 1
        # (Tcl's own `info script`, whatever the script made of `info`; Tcl's cwd is the process's)
        script = str(self.host.child_call("::tcl::info::script"))
        self.main_file = os.path.abspath(script) if script else ""
        if self.suspend_at_main:
            raise SuspendAtMain
        if self.main_hook is not None:
            self.main_hook()
            return self._after_main()
        try:
            self._serve(inside=True)
        finally:
            self.host.limit.clear()
        if self.end_script_at_main:
            return self._after_main()
        return ""

    def _check_forkable(self) -> None:
        """The workers are forked, and a fork copies no thread: what the script's threads do or
        send would never reach them, and a worker's sync send to one would wait forever; a
        forked thread pool believes its workers idle without them, and a post to it waits for
        ever too (osthreads.py)."""
        forks = f"milter main: -workers {self.milter.workers} forks the serving processes and a fork keeps no thread"
        threads = self.host.thread_count() - 1
        if threads:
            raise TclUsageError(f"{forks}, so the script's {threads} other thread(s) would not be in them: "
                                "start threads in callbacks, or serve with -workers 1")
        unknown = osthreads.unknown_threads()
        if unknown:
            raise TclUsageError(
                f"{forks}, so {unknown} thread(s) of this process that `thread::names` does not list would not be "
                "in them: a thread pool's workers (`tpool::create` with -minworkers above 0, or a `tpool::post`, "
                "before `milter main`) or a thread of a library a --python file loaded; create the pool in a "
                "callback (the first that needs it), or with -minworkers 0 and no post before `milter main`, "
                "or serve with -workers 1")

    def serve(self, inside: bool = False) -> Answer:
        """Serve until the milter stops, for a script waiting in `milter main`: what that returns,
        ``("ok", "")`` or ``("error", message, errorCode)``. ``inside``: in a Tcl command (_serve)."""
        try:
            self._serve(inside)
        except TclUsageError as exc:
            return ("error", str(exc), exc.code)
        return ("ok", "")

    def serve_inside(self) -> Answer:
        """`milter main` where Tcl could not suspend the script: serve here (check: not at all),
        then return what `milter main` returns, ending the script under check and try."""
        if self.main_hook is not None:
            self.main_hook()
            result = ("ok", "")
        else:
            result = self.serve(inside=True)
        if result[0] == "ok" and self.end_script_at_main:
            self.ended_at_main = True
            self.host.cancel_script(_ENDS_HERE)  # past any `catch` around `milter main`
            return ("error", _ENDS_HERE, NONE)
        return result

    def _serve(self, inside: bool) -> None:
        """``inside``: in a Tcl command of the script, so below the main interpreter's top level,
        where the callbacks' codes need checking (TclCallbacks.inside)."""
        self.host.callbacks.inside += inside
        try:
            self.milter.run()
        except (ConnSpecError, FlushRefused) as exc:
            raise TclUsageError(f"milter main: {exc}") from None
        except OSError as exc:
            raise TclUsageError(f"milter main: {exc.strerror or exc}") from None
        finally:
            self.host.callbacks.inside -= inside

    def _after_main(self) -> str:
        if self.end_script_at_main:
            self.ended_at_main = True
            raise TclUsageError(_ENDS_HERE)
        return ""

    def _stop(self, args: Sequence[str]) -> str:
        check_count(args, 0, 0, "milter stop")
        self.milter.stop()
        return ""

    # ------------------------------------------------------------ register

    def _register(self, args: Sequence[str]) -> str:
        check_count(args, 1, 2, "milter register event ?callback?")
        event = one_of("event", args[0], EVENTS)
        registry = self.milter.registry
        if len(args) == 1:
            current = registry.tcl_callback(event)
            return current.name if current else ""
        script = args[1]
        if script == "" or not self.host.callbacks.words(script):  # {} or " ": no command to call
            registry.replace_tcl(event, None)
            self.host.callbacks.forget_callback(event)
        else:
            run = self.host.callbacks.callback(script, event)
            registry.replace_tcl(event, Callback(run, "tcl", script, self.host.limit))
        return ""


__all__ = ["MilterCommand", "OPTIONS", "SuspendAtMain", "status_names"]
