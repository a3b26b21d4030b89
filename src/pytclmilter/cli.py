"""Command line: ``pytclmilter run | try | send | check``; each lives in :mod:`pytclmilter.commands`."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from . import __version__
from .commands import check, run, send, sigmask, trial
from .commands.common import EX_SOFTWARE, EX_USAGE, HooksFailed, UsageError
from .logline import escape, guard
from .repeats import tell_counts
from .tcl import threads

_COMMANDS: dict[str, tuple[Callable[..., argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "run": (run.add_parser, run.cmd_run),
    "try": (trial.add_parser, trial.cmd_try),
    "send": (send.add_parser, send.cmd_send),
    "check": (check.add_parser, check.cmd_check),
}


#: How the commands that run a script take the script's own arguments.
_SCRIPT_ARGS = {"run": "SCRIPT.tcl [options] -- ARGS", "check": "SCRIPT.tcl [options] -- ARGS",
                "try": "SCRIPT.tcl MESSAGE.eml [options] -- ARGS"}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its error's controls escaped (logline.guard: not backslashes, as the
    "invalid choice" error quotes a word in Python's escapes already): "unrecognized arguments",
    "ambiguous option" and a type's error quote the command line as typed, an ESC, a CR or a
    newline in it raw on a terminal, or in run's log (its stderr), where a newline began a line
    of its own."""

    def error(self, message: str) -> NoReturn:
        super().error(guard(message))


class _CommandParser(_Parser):
    """A command's parser. A script's argument that starts with - (``-store x``) is one argparse
    does not know unless it follows a lone ``--``; its error named it and no more."""

    def error(self, message: str) -> NoReturn:
        unknown = message.removeprefix("unrecognized arguments: ")
        form = _SCRIPT_ARGS.get(self.prog.rpartition(" ")[2])
        if form and unknown != message and any(word.startswith("-") for word in unknown.split()):
            message += f" (arguments for the script that start with - go after a lone --: {self.prog} {form})"
        super().error(message)


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    top = _Parser(prog="pytclmilter", description="Run TclMilter scripts as a milter.")
    top.add_argument("--version", action="version", version=f"pytclmilter {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)
    return top, {name: add(sub) for name, (add, _) in _COMMANDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:  # everything after -- belongs to the script, verbatim
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    top, commands = _parsers()
    if not argv or argv[0] not in commands:
        try:
            top.parse_args(argv)  # usage, --help or --version
        except SystemExit as exc:
            return 0 if not exc.code else EX_USAGE
        return EX_USAGE
    try:
        # Intermixed: options may follow the script name, as in `run x.tcl --connection ...`.
        opts = commands[argv[0]].parse_intermixed_args(argv[1:])
    except SystemExit as exc:
        return EX_USAGE if exc.code else 0
    opts.command, opts.rest = argv[0], rest
    sigmask.file_size_signal_caught()  # before any script runs (why: sigmask.py)
    try:
        return _COMMANDS[argv[0]][1](opts)
    except UsageError as exc:
        # (a file's name, Tcl's reason) as run's log writes it, for every command: run's stderr is its
        # log; the others' a terminal's, but also what CI and cron mail capture, where a newline in a
        # file's name or a --python file's message began a line of its own (`INFO: forged`)
        print(guard(f"pytclmilter {argv[0]}: {exc}"), file=sys.stderr)
        if exc.status == 1 and argv[0] == "try":  # (1 would read as "rejected"; UnsafeFile's and the like)
            return EX_SOFTWARE
        return exc.status
    except HooksFailed as exc:  # the traceback from the file's frames, not from ours
        # one line, then its traceback (a --python file's exception may quote what it read)
        print(guard(f"pytclmilter {argv[0]}: {escape(str(exc))}\n{exc.detail}"), file=sys.stderr)
        return EX_SOFTWARE if argv[0] == "try" else 1
    except KeyboardInterrupt:
        print("pytclmilter: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pytclmilter try ... | head`: the reader went away, not an error of ours
        sys.stderr.close()
        return 0
    finally:
        # Failures counted, not logged one by one (a script's failing `after` loop), since the last
        # line about them: a script that fails, or ends, outside `milter main` (which tells them as
        # it stops) would never tell them.
        tell_counts(ended_only=False)


def entry() -> int:
    """The ``pytclmilter`` program: :func:`main`, and the process's end (threads.end_process: a
    thread of the script's that calls in as Python finalizes would crash it)."""
    code = main()
    threads.end_process(code)
    return code


if __name__ == "__main__":
    sys.exit(entry())
