"""``pytclmilter try``: messages through a script, no MTA, through the real server code.

The script's ``milter main`` serves on a private unix socket in a temporary
directory; the MTA side of :mod:`pytclmilter.client` sends the messages there,
one connection each and one after the other, as an MTA would; then the
milter stops, exactly as in production; the script is not resumed after its ``milter main``
(what follows may delete the production socket). One message file
gets the full report; a directory of ``.eml`` files or an mbox gets a line per
message and a summary. ``--compare`` runs a second script the same way and
lists the messages the two treat differently.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
import tkinter
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterable

from ..client.apply import delivered
from ..client.archive import MBOX_MAGIC, Item, Listing, TooLarge, copy_stream, open_input
from ..client.batch import Tally, Verdict, about, comparison, comparison_summary, error_line, line
from ..client.conversation import Outcome, converse
from ..client.load import connect, one
from ..client.message import Envelope, Message
from ..client.report import EXIT_CODES, as_text, to_json
from ..client.streamed import StreamedMbox
from ..connspec import ConnSpec
from ..hooks import Hooks
from ..logline import escape, guard, one_line
from .common import (EX_NOINPUT, EX_SOFTWARE, ScriptExit, UsageError, add_envelope_options, add_log_level,
                     add_script_options, check_script, envelope_of, macros_of, make_host, read_message,
                     reports_print_anywhere, stdin_fd)
from .logs import setup_logging
from .workdir import private_workdir
from . import sigmask

#: Exit statuses of a batch and of --compare (docs/cli.md); a single message exits with its verdict.
ALL_TRIED, DIFFER, NOT_ALL_TRIED = 0, 1, 2

#: The script's options try overrides besides -connection: what would fork the serving processes
#: (the conversation talks to this process, so a try of a -workers script waited forever) or
#: bind the production daemon's metrics port (taken while it runs: `milter main` failed).
TRY_OVERRIDES: dict[str, str | None] = {"-grace": "5", "-workers": "1", "-metrics": ""}

#: What is called for each message of a batch: its number, the item, and the script's verdict
#: (None when the message was not tried).
OnMessage = Callable[[int, Item, str, Verdict | None], None]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("try", help="run a message, a directory of .eml files or an mbox through a script "
                                   "without an MTA and show what it did")
    p.add_argument("script", help="the TclMilter script (.tcl)")
    add_envelope_options(p, "a message file, a directory of .eml files, an mbox, or - for standard input")
    p.add_argument("--compare", metavar="OTHER.tcl",
                   help="run OTHER.tcl too and list only the messages whose verdict or modifications differ")
    add_script_options(p)
    add_log_level(p, "warning", "the milter's log lines on stderr")
    # MESSAGE takes the place run gives the script's arguments: they come after --, which main()
    # cuts off before argparse sees it; the usage says so, as docs/cli.md does.
    p.usage = p.format_usage().removeprefix("usage: ").rstrip() + " [-- ARGS...]"
    p.epilog = "ARGS: arguments for the script (its argv), after --; they may start with -."
    return p


#: The sockets the script serves on, in the private directory: one, or two for --compare.
_TRY_SOCKET, _FIRST_SOCKET, _OTHER_SOCKET = "try.sock", "first.sock", "other.sock"


def cmd_try(opts: argparse.Namespace) -> int:
    setup_logging(opts.log_level)
    reports_print_anywhere()
    macros_of(opts)  # a usage error before anything runs
    with private_workdir("pytclmilter-try-", (_TRY_SOCKET, _FIRST_SOCKET, _OTHER_SOCKET)) as workdir:
        listing = _input(opts, workdir)
        if isinstance(listing, Listing) and listing.kind == "message" and not opts.compare:
            return _single(opts, listing.path, workdir)
        if opts.json:
            raise UsageError("--json reports on a single message, without --compare")
        if opts.compare:
            assert isinstance(listing, Listing)  # (a stream is copied for --compare: _input)
            return _compare(opts, listing, workdir)
        return _batch(opts, listing, workdir)


def _input(opts: argparse.Namespace, workdir: str) -> Listing | StreamedMbox:
    """What the MESSAGE argument names. Standard input, a FIFO, a device or a process substitution
    (``<(...)``, /dev/fd/N) can be read only once: its first bytes tell an mbox, read as it
    comes (streamed.py: ``tail -f mbox |`` never ends), from a message, copied to a file first
    (read twice); so is an mbox for --compare, which reads it once for each script."""
    try:
        if opts.message != "-" and not _is_stream(opts.message):
            return open_input(opts.message, opts.message, opts.max_size)
        fd = stdin_fd() if opts.message == "-" else os.open(opts.message, os.O_RDONLY | os.O_CLOEXEC)
        first = _first_bytes(fd)
        if first == MBOX_MAGIC and not opts.compare:
            return StreamedMbox(fd, first, opts.message, opts.max_size)
        return open_input(_copied(fd, first, opts.message != "-", workdir, opts.max_size), opts.message,
                          opts.max_size)
    except OSError as exc:
        raise UsageError(f"{opts.message}: {exc.strerror or exc}", EX_NOINPUT) from None
    except TooLarge as exc:
        raise UsageError(f"{opts.message}: {exc}", EX_NOINPUT) from None


def _first_bytes(fd: int) -> bytes:
    """As many bytes of the stream as ``From `` has (fewer at its end), and not one more: the
    rest is read by whoever reads it next."""
    first = b""
    while len(first) < len(MBOX_MAGIC):
        more = os.read(fd, len(MBOX_MAGIC) - len(first))
        if not more:
            break
        first += more
    return first


def _copied(fd: int, first: bytes, close: bool, workdir: str, limit: int) -> str:
    """Where the stream ``fd`` (its ``first`` bytes read already) was copied to; OSError when it
    cannot be read, TooLarge (the copy removed) when it is one message of more than ``limit`` bytes."""
    copy = os.path.join(workdir, "input")
    with open(copy, "wb") as f, open(fd, "rb", closefd=close) as source:
        try:
            copy_stream(source, f, limit, first)
        except BaseException:
            os.unlink(copy)
            raise
    return copy


def _is_stream(path: str) -> bool:
    """Neither a regular file nor a directory (which are read where they are)."""
    mode = os.stat(path).st_mode
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _serve(opts: argparse.Namespace, script: str, socket: str,
           work: Callable[[ConnSpec, float | None], Awaitable[None]],
           signalled: Callable[[signal.Signals], None] | None = None) -> int | None:
    """Run the script; once its ``milter main`` listens, ``work`` talks to it, then the milter stops.
    None when all went well, else the exit status (the error is printed). ``work`` is given how
    long to wait for a reply: as long as a callback may run (-calltimeout, None: no limit), and
    10 s more; a fixed 30 s showed a callback of 40 s as a broken filter, where `run` waits.
    ``signalled`` is given the signal that stopped the milter (Ctrl-C: SIGINT) while it served."""
    exited = ScriptExit()
    listened: list[bool] = []
    done: list[bool] = []
    failed: list[Exception] = []
    stops: list[signal.Signals] = []

    async def converse(spec: ConnSpec) -> None:
        listened.append(True)
        limit = host.milter.call_timeout
        try:
            await work(spec, limit + 10.0 if limit else None)
            done.append(True)
        except Exception as exc:  # raised again below, out of the script's `milter main`
            failed.append(exc)
        finally:
            host.milter.stop()

    def listening(spec: ConnSpec) -> None:
        asyncio.ensure_future(converse(spec))

    def on_signal(sig: signal.Signals) -> None:
        stops.append(sig)
        if signalled is not None:
            signalled(sig)

    hooks = Hooks(listening=listening, signal=on_signal)
    with sigmask.interruptible():  # (making it runs Tcl too: every pkgIndex.tcl on auto_path)
        host = make_host(script, opts.python, TRY_OVERRIDES | {"-connection": f"unix:{socket}"},
                         on_exit=exited, milter_hooks=hooks, by="try")
    try:
        host.set_argv(script, list(getattr(opts, "rest", [])))
        # The script serves as under run, from the `milter main` it waits in, and is never resumed:
        # what follows (the manual's example deletes the production socket there) must not run when
        # an admin tries a message. Where Tcl cannot suspend it, it serves inside and ends there.
        host.command.end_script_at_main = True
        try:
            with sigmask.interruptible():
                waiting = host.start(script)
            if waiting:
                served = host.command.serve()
                if served[0] == "error":
                    print(f"pytclmilter: {escape(script)}: {one_line(served[1])}", file=sys.stderr)
                    return EX_SOFTWARE
        except tkinter.TclError:
            info = host.error_info()  # (before the flush: the errors it catches are recorded there too)
            host.flush_channels(ending=True)  # what the script wrote, before what try says of its end
            if failed:
                raise failed[0]
            if exited.code is None and not host.command.ended_at_main:
                print(guard(info), file=sys.stderr)  # (as run prints it: a newline of the message's indented)
                return EX_SOFTWARE
        if stops and not done:
            return _interrupted(stops[0], "before every message was tried")
        if failed:
            raise failed[0]
        if not listened and exited.code is not None:
            print(f"pytclmilter: {escape(script)}: {exited.before_main()}", file=sys.stderr)
            return EX_SOFTWARE
        if not listened:
            print(f"pytclmilter: {escape(script)} never called milter main", file=sys.stderr)
            return EX_SOFTWARE
        if not done:  # `milter main` returned (`milter stop` in a callback) while a conversation was on
            print(f"pytclmilter: {escape(script)} stopped serving before every message was tried", file=sys.stderr)
            return EX_SOFTWARE
        return None
    finally:
        host.flush_channels(ending=True)  # what the script wrote (as Tcl's exit)


def _interrupted(sig: signal.Signals, what: str) -> int:
    """A stop signal (Ctrl-C) came while the milter served, and cut what it was doing: said, and
    the status of a process that signal ended (130 for SIGINT), as before serving."""
    print(f"pytclmilter: interrupted ({sig.name}) {what}", file=sys.stderr)
    return 128 + sig


def _single(opts: argparse.Namespace, path: str, workdir: str) -> int:
    """One message: the stage-by-stage report, the exit status of its verdict."""
    opts.message = path
    msg, env = read_message(opts)
    outcomes: list[Outcome] = []
    stops: list[signal.Signals] = []

    async def work(spec: ConnSpec, wait: float | None) -> None:
        outcomes.append(await one(spec, env, msg, wait))

    failure = _serve(opts, opts.script, os.path.join(workdir, _TRY_SOCKET), work, stops.append)
    if failure is not None:
        return failure
    outcome = outcomes[0]
    if stops and outcome.error:  # (not cut: the stop's grace let it finish, and it is reported)
        return _interrupted(stops[0], "before the message was answered")
    result = delivered(outcome, msg, env)
    print(to_json(outcome, result) if opts.json else as_text(outcome, result))
    return EXIT_CODES.get(outcome.verdict, 2)


def _run_all(opts: argparse.Namespace, script: str, listing: Listing | StreamedMbox, socket: str,
             each: OnMessage, signalled: list[signal.Signals]) -> int | None:
    """Every message of the listing through the script, one connection each, in order; ``each``
    gets the verdicts, once per message. The script runs once for the whole batch (its state
    carries over, as in production); message N has queue id 4TRYnnnnnnn with N in its digits. When
    the milter stopped (Ctrl-C: ``signalled``; a callback called `milter stop`: the socket is
    gone), no later message can be tried: each is counted and listed as not tried (of a stream,
    those read so far: the rest may never come)."""

    def stop_signal(sig: signal.Signals) -> None:
        signalled.append(sig)
        if isinstance(listing, StreamedMbox):
            listing.interrupt()  # (waiting for the stream's next message)

    async def work(spec: ConnSpec, wait: float | None) -> None:
        stopped = ""  # why the messages from here on are not tried
        async for n, item in _numbered(listing):
            if item.error or stopped:
                each(n, item if item.error else replace(item, error=f"not tried: {stopped}"), "", None)
                continue
            msg = Message.parse(item.raw)
            env = envelope_of(opts, msg, f"4TRY{n:07d}")
            outcome, stopped, note = await attempt(spec, env, msg, wait)
            if outcome is None:
                _say_not_tried(note, item)
                if isinstance(listing, StreamedMbox):
                    listing.interrupt()
                each(n, replace(item, error=f"not tried: {stopped}"), "", None)
                continue
            each(n, item, about(env, msg), Verdict.of(outcome))

    async def attempt(spec: ConnSpec, env: Envelope, msg: Message, wait: float | None) -> tuple[Outcome | None, str, str]:
        """The message's outcome; else why it was not tried, and the note on stderr saying so:
        the filter no longer serves, or a stop signal (Ctrl-C) came before its reply, which
        either cut the connection or ended the loop first (its task cancelled)."""
        if not signalled:
            outcome: Outcome | None = None
            try:
                reader, writer = await connect(spec)
                outcome = await converse(reader, writer, env, msg, wait)  # (it raises no OSError)
            except OSError as exc:
                return None, "the filter stopped serving", f"{escape(script)} no longer serves ({escape(str(exc))})"
            except asyncio.CancelledError:
                if not signalled:
                    raise
            if not signalled or (outcome is not None and not outcome.error):
                return outcome, "", ""
        why = f"interrupted ({signalled[0].name})"
        return None, why, why

    return _serve(opts, script, socket, work, stop_signal)


async def _numbered(listing: Listing | StreamedMbox) -> AsyncIterator[tuple[int, Item]]:
    """The messages of ``listing`` and their numbers, from 1; a stream's as they come."""
    if isinstance(listing, Listing):
        for numbered in enumerate(listing.items(), 1):
            yield numbered
        return
    n = 0
    async for item in listing.items():
        n += 1
        yield n, item


def _say_not_tried(note: str, item: Item) -> None:
    print(f"pytclmilter: {note}: the messages from {escape(item.label)} on were not tried", file=sys.stderr)


def _not_tried(items: Iterable[tuple[int, Item]], why: str, each: OnMessage, note: str = "") -> None:
    """The messages of ``items`` listed and counted as not tried, ``why`` said on each line (one
    that could not be read, or is malformed, gives its own reason); ``note``: on stderr first,
    with the message from which on none was tried."""
    for k, (n, item) in enumerate(items):
        if note and not k:
            _say_not_tried(note, item)
        each(n, item if item.error else replace(item, error=f"not tried: {why}"), "", None)


def _batch(opts: argparse.Namespace, listing: Listing | StreamedMbox, workdir: str) -> int:
    """A line per message as it is done, then the summary."""
    tally = Tally()

    def each(n: int, item: Item, what: str, verdict: Verdict | None) -> None:
        print(error_line(item.label, item.error) if verdict is None else line(item.label, what, verdict), flush=True)
        tally.add(verdict)

    failure = _run_all(opts, opts.script, listing, os.path.join(workdir, _TRY_SOCKET), each, [])
    if failure is not None:
        return failure
    _note_ignored(listing)
    print(tally.text())
    return NOT_ALL_TRIED if tally.failed else ALL_TRIED


def _compare(opts: argparse.Namespace, listing: Listing, workdir: str) -> int:
    """The first script over every message, then the other, listing the messages they treat
    differently. Ctrl-C during the first stops there: the other does not start, and no message
    is compared."""
    for script in (opts.script, opts.compare):  # both, before a long batch runs through the first
        check_script(script)
    first: list[Verdict | None] = []
    signalled: list[signal.Signals] = []
    failure = _run_all(opts, opts.script, listing, os.path.join(workdir, _FIRST_SOCKET),
                       lambda n, i, w, v: first.append(v), signalled)
    if failure is not None:
        return failure
    differ = not_tried = failed = seen = 0
    names = (opts.script, opts.compare)

    def each(n: int, item: Item, what: str, verdict: Verdict | None) -> None:
        nonlocal differ, not_tried, failed, seen
        seen = n
        mine = first[n - 1] if n <= len(first) else None
        if verdict is None or mine is None:
            not_tried += 1
            print(error_line(item.label, item.error or "not tried by the first script"), flush=True)
            return
        broken = bool(verdict.error or mine.error)  # shown even when both broke alike
        failed += broken
        differ += verdict != mine
        if verdict != mine or broken:
            print("\n".join(comparison(item.label, what, names, mine, verdict)), flush=True)

    if signalled:  # (the first run said from which message on it stopped)
        _not_tried(enumerate(listing.items(), 1), f"interrupted ({signalled[0].name})", each)
    else:
        failure = _run_all(opts, opts.compare, listing, os.path.join(workdir, _OTHER_SOCKET), each, signalled)
        if failure is not None:
            return failure
    _note_ignored(listing)
    not_tried += max(0, len(first) - seen)  # (the directory lost files between the two runs)
    print(comparison_summary(max(len(first), seen), differ, not_tried))
    return NOT_ALL_TRIED if not_tried or failed else DIFFER if differ else ALL_TRIED


def _note_ignored(listing: Listing | StreamedMbox) -> None:
    if isinstance(listing, Listing) and listing.ignored:
        sys.stdout.flush()
        n = listing.ignored
        print(f"pytclmilter try: {escape(listing.name)}: {n} entr{'y' if n == 1 else 'ies'} ignored (only regular "
              "*.eml files directly in the directory are read; symbolic links are not followed)", file=sys.stderr)
