"""Callbacks into Tcl: the script's command prefix called with the context and the event's
arguments, its result read as a status and its error as the script registered it.

Each callback is an alias in the host's interpreter to the prefix in the script's, called as a
Tcl command object: no script text is parsed per call.
"""

from __future__ import annotations

import re
import tkinter
from typing import Any, Callable, Final, Sequence

from ..context import Context
from ..callbacks import CallbackError
from ..logline import SHOWN, clip
from ..protocol.codec import text
from ..status import Status
from .limit import WAIT_STOPPED, CallLimit, is_limit_error
from .pycommands import PythonCommands
from .strings import ascii_text, from_tcl, tcl_to_wire, to_tcl, wire_to_tcl
from .usage import TclUsageError

#: tkinter's own quoting of a tuple as a Tcl list; private to tkinter, so not in its type stubs.
_stringify: Final[Callable[[Any], str]] = getattr(tkinter, "_stringify")
#: How errorInfo introduces each outer frame.
CALLED_FROM: Final = "\n    invoked from within\n"
#: How errorInfo introduces its first frame.
_EXECUTING: Final = "\n    while executing\n"
#: Tcl's error for a command that ended in break, continue or another code where none is allowed.
_UNEXPECTED_CODE: Final = re.compile(r'invoked "(?:break|continue)" outside of a loop|command returned bad code: -?\d+')
# What the second alias of a body callback runs, for blocks that are not plain ASCII: the block
# arrives as the bytes Tcl keeps its text in (strings.py), which become the string without
# another conversion, and tailcall runs the script's callback in the lambda's place (so [info
# level] and uplevel see the callback alone). A lambda in the global namespace, because that is
# where an alias resolves its command.
_BODY_LAMBDA: Final = "{prefix context bytes} {tailcall {*}$prefix $context [::tcl::encoding::convertfrom identity $bytes]} ::"


def _to_tcl(value: Any) -> Any:
    """Callback arguments as Tcl values: bytes as text, lists as lists, dicts as key/value lists."""
    if type(value) is str:
        return value if value.isascii() and "\x00" not in value else to_tcl(value)
    if isinstance(value, str):
        return to_tcl(value)
    if isinstance(value, bytes):
        return to_tcl(text(value))
    if isinstance(value, list):
        return tuple(_to_tcl(v) for v in value)
    if isinstance(value, dict):
        flat: list[Any] = []
        for k, v in value.items():
            flat.append(_to_tcl(k))
            flat.append(_to_tcl(v))
        return tuple(flat)
    return value


class NotAStatus:
    """A callback result that is no SMFIS_* name: the engine logs it and continues."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        """As the engine's warning quotes it: a long result by its start (logline.clip)."""
        if len(self.text) <= SHOWN:
            return f'"{self.text}"'
        return f'"{clip(self.text)}" ({len(self.text)} characters)'


_STATUS_BY_NAME: Final = {s.smfis: s for s in Status} | {"": Status.CONTINUE}


def tcl_status(result: Any) -> Status | NotAStatus:
    """A Tcl callback's result by its string value, as Tcl sees it (tkinter hands back typed objects)."""
    if type(result) is str:  # the usual `return SMFIS_...`
        status = _STATUS_BY_NAME.get(result)
        if status is not None:
            return status
    if isinstance(result, tuple):
        result = _stringify(result)
    value = str(result)
    if value == "":
        return Status.CONTINUE
    status = _STATUS_BY_NAME.get(value)
    return status if status is not None else NotAStatus(from_tcl(value))


def _as_registered(info: str, alias: str, script: str) -> str:
    """A callback's errorInfo with its last frame as the script registered the callback: the
    alias it is called through is in no script, and an 8-bit block's second alias is given the
    bytes Tcl keeps the block's text in, shown as other characters (the frame above it, the
    callback's own, shows the block's text). A callback that ends in `break`, `continue` or
    another code has no frame of its own: its error is Tcl's, `while executing` the alias. (When
    the script's interpreter made that error rather than ours, which depends on what ran there
    before, Tcl writes "invoked from within" instead: shown alike.)"""
    frame = info.rfind(f'{CALLED_FROM}"{alias}_8bit ')
    if frame >= 0:
        return info[:frame]
    for intro in (CALLED_FROM, _EXECUTING):
        frame = info.rfind(f'{intro}"{alias} ')
        if frame >= 0:
            rest = info[frame + len(intro) + 1 + len(alias):]
            shown = _EXECUTING if _UNEXPECTED_CODE.fullmatch(info[:frame]) else intro
            return f'{info[:frame]}{shown}"{script}{rest}'
    frame = info.rfind(f'{_EXECUTING}"{alias}_8bit ')
    if frame < 0:
        return info
    name = frame + len(_EXECUTING) + 1
    return f"{info[:name]}{script}{_text_of_bytes(info[name + len(alias) + len('_8bit'):])}"


def _usage_as_registered(text: str, alias: str, script: str) -> str:
    """Tcl's `wrong # args` of a callback (its message, errorInfo's first line) with the callback
    as the script registered it: Tcl writes the usage of a command called through an alias with
    the alias's name, which is in no script; TclMilter 1.0 called the callback itself."""
    usage = f'wrong # args: should be "{alias}'
    if text.startswith(usage) and text[len(usage):len(usage) + 1] in (" ", '"'):
        return f'wrong # args: should be "{script}{text[len(usage):]}'
    return text


def _text_of_bytes(shown: str) -> str:
    """What errorInfo shows of words given as the bytes Tcl keeps text in (a character per byte,
    cut after 150), as the text they are."""
    try:
        return text(tcl_to_wire(shown.encode("latin-1")))
    except UnicodeEncodeError:  # (not such a frame after all)
        return shown


def command_object(tk: Any, name: str) -> Any:
    """``name`` as a Tcl object that has looked its command up (Tcl's cmdName type).

    Given a str, tkinter makes a new Tcl object for every call and Tcl looks the command up
    in its hash table each time; this one is kept and the look-up is cached in it (Tcl
    re-checks it when commands change), about a tenth of a callback call's cost.
    """
    var = "::tclmilter::py::cmdobj"
    try:
        tk.call("set", var, name)
        tk.eval(f"namespace origin ${var}")  # resolves the object held by the variable
        return tk.call("set", var)
    except tkinter.TclError:  # the plain name works as well, only slower
        return name
    finally:
        tk.call("unset", "-nocomplain", var)


class TclCallbacks:
    """The script's callbacks (`milter register`), each through its own alias in the host's
    interpreter (``tk``) to its prefix in the script's (``child``)."""

    def __init__(self, tk: Any, child: str, limit: CallLimit, pycommands: PythonCommands,
                 error_info: Callable[[], str]) -> None:
        """``error_info``: the script's (TclScript.error_info), for a callback's error."""
        self.tk = tk
        self.child = child
        self.limit = limit
        self.pycommands = pycommands
        self.error_info = error_info
        #: `milter main` serves inside a Tcl command (MilterCommand._serve): the callbacks are then
        #: called below the main interpreter's top level, where Tcl lets break and continue through
        #: as a normal result, so their code is checked (_checked).
        self.inside = 0
        self._count = 0
        self._aliases: dict[str, list[str]] = {}  # event -> its Tcl callback's aliases (callback())

    def callback(self, script: str, event: str = "") -> Callable[..., Any]:
        """A Python callable that runs a Tcl command prefix with the context and event arguments;
        it replaces the event's previous one, whose aliases are deleted (forget_callback).

        The prefix is reached through an alias in the main interpreter, so each call is a direct
        invocation across interpreters with no script text parsed. The engine holds it to
        -calltimeout with ``self.limit`` (registered as its Callback's limit).
        """
        words = self.words(script)
        self._count += 1
        command = f"::tclmilter::cb{self._count}"
        run = self._new_callback(command, words, event, script)
        self.forget_callback(event)
        self._aliases[event] = [command, f"{command}_8bit"] if event == "body" else [command]
        return run

    def forget_callback(self, event: str) -> None:
        """Delete the aliases of the event's Tcl callback, replaced or unregistered: a script that
        registers per message (`milter register body [list collect $id]`) would otherwise add
        commands to the interpreter for as long as the milter runs."""
        for name in self._aliases.pop(event, ()):
            self.tk.call("interp", "alias", "", name, "")

    def _new_callback(self, command: str, words: tuple[str, ...], event: str, script: str) -> Callable[..., Any]:
        """callback()'s callable, through a new alias ``command`` to the prefix ``words`` (``script``)."""
        self.tk.call("interp", "alias", "", command, self.child, *words)
        alias = command_object(self.tk, command)
        call = self.tk.call
        tcl_error = tkinter.TclError

        def failure(exc: tkinter.TclError) -> CallbackError:
            return self._failure(exc, command, script)

        def run_header(ctx: Context, name: str, value: str) -> Any:
            """run() for the most frequent callback: its two strings converted without a call each."""
            name = name if name.isascii() and "\x00" not in name else to_tcl(name)
            value = value if value.isascii() and "\x00" not in value else to_tcl(value)
            if self.inside:
                return self._checked(command, script, (alias, ctx.host_data, name, value))
            try:
                result = call(alias, ctx.host_data, name, value)
            except tcl_error as exc:
                raise failure(exc) from None
            return tcl_status(result)

        if event == "header":
            return run_header

        if event == "body":
            return self._body_callback(command, words, alias, script)

        def run(ctx: Context, *args: Any) -> Any:
            if self.inside:
                return self._checked(command, script, (alias, ctx.host_data, *[_to_tcl(a) for a in args]))
            try:
                result = call(alias, ctx.host_data, *[_to_tcl(a) for a in args])
            except tcl_error as exc:
                raise failure(exc) from None
            return tcl_status(result)

        return run

    def _checked(self, command: str, script: str, words: tuple[Any, ...]) -> Status | NotAStatus:
        """A callback's call, its code checked: below the main interpreter's top level (``inside``)
        Tcl takes a break or continue for a normal result, which would answer the MTA. Caught, a
        code other than ok and error becomes what Tcl's top level makes of it (`unexpected` in
        prelude.py). (At the top level Tcl does this itself, at no cost per call.)"""
        code = int(self.tk.call("catch", words, "::tclmilter::py::result", "::tclmilter::py::options"))
        result = self.tk.call("set", "::tclmilter::py::result")
        if code != 0 and code != 1:
            code, result = self.tk.splitlist(self.tk.call(
                "::tclmilter::py::unexpected", code, result, self.tk.call("set", "::tclmilter::py::options"),
                self.tk.call("format", "%s", words)))
            code = int(code)
        if code == 1:
            raise self._failure(tkinter.TclError(str(result)), command, script)
        return tcl_status(result)

    def words(self, script: str) -> tuple[str, ...]:
        """A command prefix as its words; TclUsageError with Tcl's message if it is no list."""
        try:
            return tuple(self.tk.splitlist(script))
        except tkinter.TclError as exc:
            raise TclUsageError(str(exc)) from None

    def _body_callback(self, command: str, words: Sequence[str], alias: Any, script: str) -> Callable[..., Any]:
        """callback()'s run() for body blocks: ASCII as it is, others as the bytes Tcl keeps their
        text in, through a second alias that runs _BODY_LAMBDA."""
        self.tk.call("interp", "alias", "", f"{command}_8bit", self.child, "apply", _BODY_LAMBDA, tuple(words))
        alias_8bit = command_object(self.tk, f"{command}_8bit")
        call = self.tk.call
        tcl_error = tkinter.TclError

        def run_body(ctx: Context, block: bytes) -> Any:
            text = ascii_text(block)  # one pass over a block the cache no longer holds
            if self.inside:
                words = (alias, ctx.host_data, text) if text is not None else (alias_8bit, ctx.host_data,
                                                                                wire_to_tcl(block))
                return self._checked(command, script, words)
            try:
                if text is not None:
                    result = call(alias, ctx.host_data, text)
                else:
                    result = call(alias_8bit, ctx.host_data, wire_to_tcl(block))
            except tcl_error as exc:
                raise self._failure(exc, command, script) from None
            return tcl_status(result)

        return run_body

    def _failure(self, exc: tkinter.TclError, alias: str, script: str) -> CallbackError:
        """The CallbackError of the callback ``script``, called through ``alias``, that raised ``exc``."""
        info = _usage_as_registered(_as_registered(from_tcl(self.error_info()), alias, script), alias, script)
        code = self.tk.call("set", "::errorCode")
        words = code if isinstance(code, tuple) else self.tk.splitlist(str(code))
        if is_limit_error(str(exc), [str(w) for w in words[:3]]):
            stopped = self.limit.stopped()
            self.limit.reset()
            self.limit.echo_due = str(exc) == WAIT_STOPPED  # (Tcl's echo of it comes at the next event pass)
            if self.pycommands.stopped:  # a Python command was running: where it was, too
                info = f"{info}\n{self.pycommands.stopped}"
                self.pycommands.stopped = ""
            return CallbackError(f"callback {stopped}", info)
        return CallbackError(_usage_as_registered(from_tcl(str(exc)), alias, script), info)
