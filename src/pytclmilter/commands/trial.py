"""``pytclmilter try``: one message through a script, no MTA, through the real server code.

The script's ``milter main`` serves on a private unix socket in a temporary
directory; the MTA side of :mod:`pytclmilter.client` sends the message there,
then the milter stops and ``main`` returns, exactly as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import tkinter

from ..client.apply import apply
from ..client.conversation import Outcome
from ..client.load import one
from ..client.report import EXIT_CODES, as_text, to_json
from ..connspec import ConnSpec
from ..hooks import Hooks
from .common import EX_SOFTWARE, ScriptExit, add_envelope_options, add_script_options, make_host, read_message
from .logs import setup_logging


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("try", help="run one message through a script without an MTA and show what it did")
    p.add_argument("script", help="the TclMilter script (.tcl)")
    add_envelope_options(p)
    add_script_options(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def cmd_try(opts: argparse.Namespace) -> int:
    setup_logging(opts.log_level)
    msg, env = read_message(opts)
    workdir = tempfile.mkdtemp(prefix="pytclmilter-try-")
    try:
        exited = ScriptExit()
        outcomes: list[Outcome] = []

        async def converse(spec: ConnSpec) -> None:
            try:
                outcomes.append(await one(spec, env, msg))
            finally:
                host.milter.stop()

        def listening(spec: ConnSpec) -> None:
            asyncio.ensure_future(converse(spec))

        host = make_host(opts.script, opts.python, {"-connection": f"unix:{workdir}/try.sock", "-grace": "5"},
                         on_exit=exited, milter_hooks=Hooks(listening=listening))
        host.set_argv(opts.script, list(getattr(opts, "rest", [])))
        try:
            host.source(opts.script)
        except tkinter.TclError:
            if exited.code is None:
                print(host.error_info(), file=sys.stderr)
                return EX_SOFTWARE
        if not outcomes:
            print(f"pytclmilter: {opts.script} never called milter main", file=sys.stderr)
            return EX_SOFTWARE
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    outcome = outcomes[0]
    result = apply(outcome.actions, msg, env) if outcome.verdict in ("accept", "quarantine") else None
    print(to_json(outcome, result) if opts.json else as_text(outcome, result))
    return EXIT_CODES.get(outcome.verdict, 2)
