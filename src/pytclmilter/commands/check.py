"""``pytclmilter check``: load a script without serving and report what it would do.

Reports syntax and runtime errors with file and line, each registered
callback (and whether its procedure exists and accepts the arguments the
event passes; for a Python callback, whether its function does), the
commands --python files define for the script, and the option negotiation
the engine would answer to an MTA offering everything.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tkinter
from typing import Any, Final

from ..callbacks import EVENT_ARGS, Callback, not_accepted
from ..logline import escape, guard, one_line
from ..protocol.constants import Action, Proto, flag_names
from ..protocol.events import OptionNegotiation
from ..protocol.negotiation import negotiate
from ..tcl.interp import TclHost
from ..tcl.rootfiles import read_source
from ..tcl.usage import TclUsageError
from .common import ScriptExit, add_log_level, add_script_options, make_host
from .logs import setup_logging
from . import sigmask

#: What check, run and a reload say of a script that ends without `milter main`.
NO_MAIN: Final = "the script never calls milter main"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("check", help="load a script without serving; report errors, callbacks, negotiation")
    p.add_argument("script", help="the TclMilter script (.tcl)")
    add_script_options(p)
    add_log_level(p, "warning", "the log lines of the load (a --python file's, the script's timers') on stderr")
    p.add_argument("args", nargs="*", default=[], help="arguments for the script (argv); put them after -- if they start with -")
    return p


def error_location(error_info: str) -> str:
    """``file:line`` of the innermost frame Tcl reports, or '': errorInfo lists the frames from
    the innermost out, so for an error in a file the script sources, the line in that file."""
    found = re.findall(r'\(file "([^"]+)" line (\d+)\)', error_info)
    return f"{found[0][0]}:{found[0][1]}" if found else ""


def script_error(script: str, exc: BaseException, error_info: str) -> str:
    """The first line check reports for a script that failed to load: ``file:line: error: ...``."""
    return f"{error_location(error_info) or script}: error: {exc}"


def _arity(host: TclHost, words: tuple[str, ...]) -> tuple[int, int | None] | None:
    """How many arguments a command prefix accepts, if it is a proc (None: not a proc)."""
    tk, call = host.tk, host.child_call
    proc = words[0]
    if not call("::tcl::info::procs", proc if proc.startswith("::") else "::" + proc):
        return None
    params = tk.splitlist(call("::tcl::info::args", proc))
    required = 0
    for p in params:
        if p == "args":
            return max(0, required - (len(words) - 1)), None
        has_default = bool(tk.getboolean(call("::tcl::info::default", proc, p, "::tclmilter::_d")))
        required += 0 if has_default else 1
    total = len(params) - (len(words) - 1)
    return max(0, required - (len(words) - 1)), total


def _autoloads(host: TclHost, command: str) -> bool:
    """Whether Tcl's autoloader (a tclIndex on auto_path, as libraries of TclMilter's day were
    kept) knows the command: its first call would define it. Read from the indexes only, never
    by loading the library, whose code would run here, unbounded (a reload serves meanwhile)."""
    name = command.lstrip(":")
    try:
        host.child_call("auto_load_index")
    except tkinter.TclError:  # a broken tclIndex: the call would fail on it too
        return False
    return any(host.tk.getboolean(host.child_call("::tcl::info::exists", f"::auto_index({n})"))
               for n in (name, f"::{name}"))


def _own_unknown(host: TclHost) -> bool:
    """Whether the script handles unknown commands itself (its own `unknown` proc, or `namespace
    unknown`): then a command that does not exist yet may well be served by it."""
    if not host.tk.getboolean(host.child_call("::tcl::namespace::eval", "::",
                                              "expr {[::tcl::namespace::unknown] in {{} ::unknown}}")):
        return True
    if not host.child_call("::tcl::info::procs", "::unknown"):
        return bool(host.child_call("::tcl::info::commands", "::unknown"))  # a command of its own
    return str(host.child_call("::tcl::info::body", "::unknown")) != str(host.tk.call("info", "body", "::unknown"))


def _tcl_problem(host: TclHost, event: str, cb: Callback) -> str | None:
    words = tuple(host.tk.splitlist(cb.name))
    if not host.child_call("::tcl::info::commands", words[0]):
        if _autoloads(host, words[0]) or _own_unknown(host):
            return None
        return f'{event} callback "{cb.name}": invalid command name "{words[0]}"'
    arity = _arity(host, words)
    given = 1 + len(EVENT_ARGS[event])
    if arity is not None and not (arity[0] <= given and (arity[1] is None or given <= arity[1])):
        return f'{event} callback "{cb.name}" {not_accepted(event)}'
    return None


def check_callbacks(host: TclHost) -> list[str]:
    """What would fail at every call of a Tcl callback: a command that does not exist, a proc
    that cannot take the event's arguments (a Python function that cannot is refused by
    Milter.register already)."""
    problems = []
    for event, chain in host.milter.registry.registered().items():
        for cb in chain:
            problem = _tcl_problem(host, event, cb) if cb.origin == "tcl" else None
            if problem is not None:
                problems.append(problem)
    return problems


def callback_errors(script: str, host: TclHost) -> list[str]:
    """check's lines for the callbacks that would fail every call: ``run`` refuses to serve them
    and a reload to load them, as check reports them (the whole mail would get -onerror)."""
    return [f"{script}: error: {problem}" for problem in check_callbacks(host)]


#: The commands after which Tcl reads no more of a file, at its top level (`source` returns, or
#: the process ends): what follows them may be anything, text that is no Tcl included.
_LAST_COMMANDS: Final = frozenset({"return", "::return", "exit", "::exit"})


def unfinished_command(host: TclHost, text: str) -> int | None:
    """The line where a command starts that the file never ends (a missing close-brace, bracket
    or quote), or None. Tcl reads a file one command at a time, so one after `milter main` fails
    only when `milter main` returns, at the stop: the load up to it went well. And it stops at a
    top-level `return` or `exit`: what follows that is never read."""
    if host.tk.getboolean(host.tk.call("info", "complete", text)):
        return None  # (the usual case, in one pass: the scan below grows with a proc's length squared)
    start, chunk = 1, ""
    for number, line in enumerate(text.split("\n"), 1):
        chunk += line + "\n"
        if host.tk.getboolean(host.tk.call("info", "complete", chunk)):
            if any(_first_word(command) in _LAST_COMMANDS for command in _commands(host, chunk)):
                return None
            start, chunk = number + 1, ""
    return start if chunk.strip() else None


def _commands(host: TclHost, chunk: str) -> list[str]:
    """The commands of lines that Tcl reads as complete, split at the semicolons between them (one
    in braces, quotes or a comment, or escaped, is no end: what precedes it is incomplete)."""
    commands, begin = [], 0
    for at, char in enumerate(chunk):
        if char == ";" and host.tk.getboolean(host.tk.call("info", "complete", chunk[begin:at])):
            escaped = len(chunk[begin:at]) - len(chunk[begin:at].rstrip("\\"))
            if escaped % 2 == 0 and not chunk[begin:at].lstrip().startswith("#"):
                commands.append(chunk[begin:at])
                begin = at + 1
    return [*commands, chunk[begin:]]


def _first_word(command: str) -> str:
    """A command's first word as written, bare (a quoted or braced one is not looked into)."""
    words = command.split(None, 1)
    return words[0] if words else ""


def _unfinished_after_main(script: str, path: str, host: TclHost) -> list[str]:
    """check's lines for a command after `milter main` that never ends, in the script (``path``:
    its absolute path, taken before it ran) and in the file that called `milter main`, if the
    script sourced it (none for a file now unreadable: the load read it, so that is a change
    since, which the next load reports)."""
    lines = []
    for file in dict.fromkeys(f for f in (path, host.command.main_file) if f):
        try:
            data = read_source(file).split(b"\x1a", 1)[0]  # (^Z: source's end)
        except TclUsageError:
            continue
        text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")  # (as source reads it)
        line = unfinished_command(host, text)
        if line is not None:
            lines.append(f"{script if file == path else file}:{line}: error: this command never ends (a missing "
                         "close-brace, bracket or quote): the script fails there when milter main returns, at stop")
    return lines


def describe_negotiation(host: TclHost) -> list[str]:
    result = negotiate(OptionNegotiation(6, 0x1FF, 0x1FFFFF), host.milter.registry.wants())
    protocol = flag_names(Proto(result.protocol))
    skipped = [name.lower() for name in protocol if name.startswith("NO")]
    silent = [name for name in protocol if name.startswith("NR_")]
    actions = flag_names(Action(result.actions))
    return [
        f"version {result.version}, actions 0x{result.actions:x}, protocol 0x{result.protocol:x}",
        "  skipped stages: " + (", ".join(skipped) or "none"),
        "  no-reply stages: " + (", ".join(silent) or "none"),
        "  actions: " + ", ".join(actions),
    ]


def _load_failure(script: str, host: TclHost, exc: tkinter.TclError, exited: ScriptExit) -> list[str]:
    """check's lines for a load that ended before `milter main` (none if it ended there): a Tcl
    error, then its errorInfo below it as the continuation lines of a log record (controls escaped,
    each line indented, bounded: logline.guard), or an `exit`. The status is 1 either way: check's
    is its verdict, and an `exit 66` would read as a missing file."""
    if exited.code is not None:
        where = error_location(host.error_info()) or script
        return [one_line(f"{where}: error: {exited.before_main()}")]
    if host.command.ended_at_main:
        return []
    info = host.error_info()
    # (guard bounds the whole once, and leaves the first line's escapes alone: not escaped twice)
    return [guard(escape(script_error(script, exc, info)) + "\n" + info)]


def cmd_check(opts: argparse.Namespace) -> int:
    setup_logging(opts.log_level)
    exited = ScriptExit()
    path = os.path.abspath(opts.script)  # (the script may `cd`)
    with sigmask.interruptible():  # (making it runs Tcl too: every pkgIndex.tcl on auto_path)
        host = make_host(opts.script, opts.python, {}, on_exit=exited)
    host.command.main_hook = lambda: None  # `milter main` serves nothing
    host.command.end_script_at_main = True  # and nothing after it runs (it may delete sockets)
    host.set_argv(opts.script, list(opts.args) + list(getattr(opts, "rest", [])))
    failure: list[str] = []
    try:
        with sigmask.interruptible():
            host.start(opts.script)  # the script waits in `milter main` and is never resumed
    except tkinter.TclError as exc:
        failure = _load_failure(opts.script, host, exc, exited)
    finally:
        host.flush_channels(ending=True)  # what the script wrote, before the report (as Tcl's exit)
    if failure:
        print("\n".join(failure), file=sys.stderr)
        return 1
    out: list[str] = [f"{escape(opts.script)}: loaded"]
    registered: dict[str, Any] = host.milter.registry.registered()
    out.append("callbacks:" if registered else "callbacks: none registered")
    for event, chain in registered.items():
        for cb in chain:
            out.append(f"  {event:9} {cb.origin:6} {one_line(cb.name)}")
    commands = list(host.milter.tcl_commands)
    if commands:  # (what a --python file defined for the script; load-time calls have run)
        out.append("python commands:")
        out += [one_line(f"  {c.name} {c.usage}".rstrip()) for c in commands]
    problems = check_callbacks(host)
    if host.command.main_calls == 0:
        problems.append(NO_MAIN)
    unfinished = _unfinished_after_main(opts.script, path, host)
    out.append("negotiation (to an MTA offering everything):")
    out += ["  " + line for line in describe_negotiation(host)]
    print("\n".join(out))
    for problem in problems:
        print(one_line(f"{opts.script}: error: {problem}"), file=sys.stderr)
    for line in unfinished:
        print(one_line(line), file=sys.stderr)
    return 1 if problems or unfinished else 0
