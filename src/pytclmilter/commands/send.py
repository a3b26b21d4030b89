"""``pytclmilter send``: the same conversation against any running milter, or many as a load test."""

from __future__ import annotations

import argparse
import asyncio
import json

from ..client.apply import delivered
from ..client.load import load, one
from ..client.report import EXIT_CODES, as_text, to_json
from ..connspec import ConnSpecError, parse
from .common import UsageError, add_envelope_options, read_message, reports_print_anywhere
from .logs import setup_logging


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("send", help="send a message to a running milter (any libmilter one too) as an MTA would")
    p.add_argument("--connection", "-c", required=True, metavar="SPEC",
                   help="where the milter listens (unix:/path, inet:port@host, inet6:port@host)")
    add_envelope_options(p)
    p.add_argument("--count", type=int, default=1, metavar="N",
                   help="send N messages (load generator) and print a summary (with --json: as JSON)")
    p.add_argument("--concurrency", type=int, default=1, metavar="C", help="parallel connections with --count")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="wait at most this long to connect and for each reply (default: %(default)s)")
    # Not an option of send (there is no milter here to log: the report is the conversation); kept
    # only to say so, where argparse would say "unrecognized arguments".
    p.add_argument("--log-level", help=argparse.SUPPRESS)
    return p


def cmd_send(opts: argparse.Namespace) -> int:
    if opts.log_level is not None:
        raise UsageError("--log-level: send has no log lines to choose from (the milter it talks to logs in its "
                         "own log; the report shows the conversation): it is an option of run, try and check")
    setup_logging("warning")
    reports_print_anywhere()
    try:
        spec = parse(opts.connection)
    except ConnSpecError as exc:  # (it quotes the spec escaped: one line)
        raise UsageError(str(exc)) from None
    if opts.count < 1 or opts.concurrency < 1:
        raise UsageError("--count and --concurrency must be at least 1")
    if not opts.timeout > 0:  # (0 timed out every wait at once: "cannot connect ...:" and no reason)
        raise UsageError(f"--timeout {opts.timeout:g}: must be more than 0 seconds")
    msg, env = read_message(opts)
    if opts.count > 1:
        result = asyncio.run(load(spec, env, msg, opts.count, opts.concurrency, timeout=opts.timeout))
        status = 0 if not result.errors else 1
        print(json.dumps(result.as_dict() | {"exit_status": status}, indent=2) if opts.json else result.summary())
        return status
    outcome = asyncio.run(one(spec, env, msg, opts.timeout))
    applied = delivered(outcome, msg, env)
    print(to_json(outcome, applied) if opts.json else as_text(outcome, applied))
    return EXIT_CODES.get(outcome.verdict, 2)
