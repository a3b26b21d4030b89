"""Command line: ``pytclmilter run SCRIPT.tcl [options] [--] [script args]``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tkinter
from pathlib import Path
from typing import Sequence

from . import __version__
from .connspec import ConnSpec
from .milter import Milter
from .tcl.interp import TclHost
from .tcl.usage import TclUsageError

EX_USAGE = 64
EX_SOFTWARE = 70

log = logging.getLogger("pytclmilter")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="pytclmilter", description="Run TclMilter scripts as a milter.")
    p.add_argument("--version", action="version", version=f"pytclmilter {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="run a TclMilter script as a milter")
    run.add_argument("script", help="the TclMilter script (.tcl)")
    run.add_argument("--connection", "-c", metavar="SPEC",
                     help="listen here (unix:/path, inet:port@host, inet6:port@host); overrides the script")
    run.add_argument("--timeout", metavar="SECONDS", help="I/O timeout; overrides the script's -timeout")
    run.add_argument("--backlog", metavar="N", help="listen backlog; overrides the script's -backlog")
    run.add_argument("--name", help="milter name; overrides the script's -name")
    run.add_argument("--on-error", metavar="STATUS",
                     help="answer when a callback fails: SMFIS_TEMPFAIL (default), SMFIS_CONTINUE, ...")
    run.add_argument("--grace", metavar="SECONDS", help="how long open sessions may finish at stop (default 30)")
    run.add_argument("--python", metavar="HOOKS.py", action="append", default=[],
                     help="Python file whose setup(milter) adds callbacks to the same chains (repeatable)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("args", nargs="*", help="arguments for the script (argv); put them after -- if they start with -")
    return p, {"run": run}


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s pytclmilter[%(process)d] %(levelname)s: %(message)s",
    )


def load_hooks(path: str, milter: Milter) -> None:
    """Import a --python file and call its setup(milter)."""
    spec = importlib.util.spec_from_file_location(f"pytclmilter_hooks_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"pytclmilter: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    setup = getattr(module, "setup", None)
    if not callable(setup):
        raise SystemExit(f"pytclmilter: {path} has no setup(milter) function")
    setup(milter)


def _announce(milter: Milter, spec: ConnSpec) -> None:
    print(f"pytclmilter: {milter.name} listening on {spec}", flush=True)


def cmd_run(opts: argparse.Namespace) -> int:
    setup_logging(opts.log_level)
    if not Path(opts.script).is_file():
        print(f'pytclmilter: couldn\'t read file "{opts.script}": no such file', file=sys.stderr)
        return EX_USAGE
    host = TclHost()
    milter = host.milter
    milter.hooks.listening = lambda spec: _announce(milter, spec)
    overrides = {"-connection": opts.connection, "-timeout": opts.timeout, "-backlog": opts.backlog,
                 "-name": opts.name, "-onerror": opts.on_error, "-grace": opts.grace}
    try:
        for option, value in overrides.items():
            if value is not None:
                host.command.lock(option, value, "--" + option[1:])
    except TclUsageError as exc:
        print(f"pytclmilter: {exc}", file=sys.stderr)
        return EX_USAGE
    for path in opts.python:
        load_hooks(path, milter)
    host.set_argv(opts.script, list(opts.args) + list(getattr(opts, "rest", [])))
    try:
        host.source(opts.script)
    except tkinter.TclError:
        print(host.error_info(), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:  # everything after -- belongs to the script, verbatim
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    top, commands = _parsers()
    if not argv or argv[0] not in commands:
        top.parse_args(argv)  # prints usage, --help or --version, and exits
        return EX_USAGE
    try:
        opts = commands[argv[0]].parse_intermixed_args(argv[1:])
    except SystemExit as exc:
        return EX_USAGE if exc.code else 0
    opts.command, opts.rest = argv[0], rest
    try:
        return cmd_run(opts)
    except KeyboardInterrupt:
        print("pytclmilter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
