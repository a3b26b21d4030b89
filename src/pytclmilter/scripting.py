"""What Python and a hosted script offer each other: commands written in Python that the script
calls (:class:`TclCommands`), and the errors of Python's calls into the script (:class:`TclError`).

The milter keeps them in a :class:`TclCommands` registry and knows nothing else of Tcl: the
Tcl bridge (tcl/pycommands.py) watches the registry and makes each entry a command of the
script's interpreter, before the script runs or, for a command added later, at once. What a
command accepts is read here, once, from the function's signature, so that a call with the
wrong number of arguments is answered the way Tcl answers it, without calling Python.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

class TclError(Exception):
    """A Tcl error in what Python ran in the script (``ctx.tcl``): Tcl's message, with its
    ``error_info`` (the Tcl stack, also shown under a traceback as the exception's note) and its
    ``error_code`` words (``("NONE",)`` for a plain ``error``). Raised by a Python command, the
    script gets it as Tcl's ``error message ?info? ?code?`` makes one: no Python traceback."""

    def __init__(self, message: str, error_info: str = "", error_code: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.error_info = error_info
        self.error_code = error_code
        if error_info:
            self.add_note(f"Tcl errorInfo:\n{error_info}")


#: Commands the bridge itself gives the script: a Python command must not replace them.
_RESERVED = ("milter", "exit")
_RESERVED_NAMESPACE = "tclmilter::"


@dataclass(frozen=True)
class TclCommand:
    """One command: ``func`` called with the Tcl words as ``str``; ``max_args`` None: no limit."""

    name: str
    func: Callable[..., Any]
    min_args: int
    max_args: int | None
    #: The arguments as Tcl's usage messages write them: ``key ?value?``, ``?arg ...?``.
    usage: str


def _signature(name: str, func: Callable[..., Any]) -> tuple[int, int | None, str]:
    """(fewest arguments, most or None, usage) of a function called with positional words."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature: any number, as it checks itself
        return 0, None, "?arg ...?"
    low, high, words = 0, 0, []
    rest = False  # a *args parameter: no largest count
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            high += 1
            if p.default is p.empty:
                low += 1
                words.append(p.name)
            else:
                words.append(f"?{p.name}?")
        elif p.kind is p.VAR_POSITIONAL:  # (the keyword-only parameters come after it: go on)
            words.append("?arg ...?" if p.name == "args" else f"?{p.name} ...?")
            rest = True
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            raise ValueError(f"tcl_command {name}: keyword-only parameter {p.name!r} has no default, "
                             "and Tcl passes positional words only")
    return low, (None if rest else high), " ".join(words)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"tcl_command: bad command name {name!r}: must be a non-empty string")
    bare = name.lstrip(":")
    if bare in _RESERVED or bare.startswith(_RESERVED_NAMESPACE):
        raise ValueError(f'tcl_command: "{name}" is pytclmilter\'s own command')
    return name


def is_async(func: object) -> bool:
    """An async function, a partial of one, or an object whose __call__ is one: calling it makes
    a coroutine, which code that calls and uses the result at once would never run."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


class TclCommands:
    """The Python commands of a milter's script, by name, in definition order."""

    def __init__(self) -> None:
        self._commands: dict[str, TclCommand] = {}
        self._watchers: list[Callable[[TclCommand], None]] = []

    def add(self, name: str, func: Callable[..., Any]) -> TclCommand:
        """Define a command; ValueError for a bad or taken name, a function Tcl cannot call."""
        check_name(name)
        if not callable(func):
            raise ValueError(f"tcl_command {name}: {func!r} is not callable")
        if is_async(func):
            raise ValueError(f"tcl_command {name}: a Tcl command cannot be async (Tcl waits for its result)")
        if name in self._commands:
            raise ValueError(f'tcl_command: "{name}" is already defined')
        low, high, usage = _signature(name, func)
        command = TclCommand(name, func, low, high, usage)
        for watcher in self._watchers:  # the bridge creates it: a refusal there leaves it undefined
            watcher(command)
        self._commands[name] = command
        return command

    def watch(self, watcher: Callable[[TclCommand], None]) -> None:
        """Call ``watcher`` for every command defined so far and every one defined later."""
        for command in self._commands.values():
            watcher(command)
        self._watchers.append(watcher)

    def clear(self) -> None:
        """Forget every command: the interpreter that ran them is gone, and what their functions
        hold (a hooks file's database connection) must go with it, even while this milter object
        lives on (the first generation's runs the server's loop)."""
        self._commands.clear()
        self._watchers.clear()

    def __iter__(self) -> Iterator[TclCommand]:
        return iter(list(self._commands.values()))
