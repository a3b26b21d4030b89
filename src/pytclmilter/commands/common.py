"""What the subcommands share: usage errors, loading a script with its hooks, envelope options."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import io
import ipaddress
import os
import signal
import stat
import sys
import time
import tkinter
import traceback
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Callable, Mapping

from ..client.archive import MAX_SIZE, TooLarge, read_at_most
from ..client.message import Envelope, Message
from ..hooks import Hooks
from ..limits import CallbackTimeout, internals_dropped
from ..logline import said
from ..milter import Milter
from .. import rootimports
from ..safepath import Untrusted, open_trusted, os_reason
from ..scripting import is_async
from ..tcl.interp import TclHost
from ..tcl.usage import TclUsageError

EX_USAGE = 64
EX_NOINPUT = 66
EX_SOFTWARE = 70


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 64 (or the given one)."""

    def __init__(self, message: str, status: int = EX_USAGE) -> None:
        super().__init__(message)
        self.status = status


class UnsafeFile(UsageError):
    """As root, a file to run, or a directory on its path, that another user could change: run
    and check exit 1 (as for a file that fails to load), try 70 (cli.main); a reload logs it."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"refusing to load {what} as root: {why}", 1)


class HooksFailed(Exception):
    """A --python file failed to import, or its setup(milter) raised: the message names the file
    and the exception, ``detail`` is the traceback from the file's own frames on (pytclmilter's
    frames say nothing to its author). run and check exit 1, try 70 (cli.main)."""

    def __init__(self, path: str, exc: BaseException) -> None:
        super().__init__(f"--python {path}: {_failure(exc)}")  # escaped where printed or logged
        self.path = path
        #: The time limit of a reload's load stopped it (reloading.Generations._start).
        self.stopped = isinstance(exc, CallbackTimeout)
        tb = _from_file(internals_dropped(exc, exc.__traceback__), path)
        self.detail = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n")


def _failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):  # its status would be taken for the command's (try: 3, "discarded")
        return (f"called sys.exit({said(exc.code, repr)}) while loading; a --python file cannot end pytclmilter "
                "(raise an exception to fail the load)")
    return f"{type(exc).__name__}: {said(exc)}"  # (its __str__ may raise: that was an "unexpected error" of ours)


def _from_file(tb: TracebackType | None, path: str) -> TracebackType | None:
    """The traceback from the first frame in ``path`` on (None for a SyntaxError, whose own
    lines say where)."""
    name = os.path.realpath(path)
    while tb is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) != name:
        tb = tb.tb_next
    return tb


def _as_the_files(path: str, call: Callable[[], object]) -> None:
    """``call`` (the --python file's import or setup); whatever it raises fails the load, as the
    file's (HooksFailed): sys.exit() too, which would otherwise end the command with the file's
    status as if it were the command's, and any other BaseException, which was an "unexpected
    error" of pytclmilter's. KeyboardInterrupt alone goes on while SIGINT raises it: a stop
    (Ctrl-C); a reload's load takes SIGINT itself (reloading._AbandonedAtStop), and then it is
    the file's own, which ended the milter, unlogged, with status 130."""
    try:
        call()
    except KeyboardInterrupt as exc:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            raise
        raise HooksFailed(path, exc) from None
    except BaseException as exc:  # noqa: BLE001 - any error of the file's: reported as the file's
        raise HooksFailed(path, exc) from None


def read_hooks(path: str) -> bytes:
    """The source of a --python file, read from the descriptor checked as root (_opened_as_root);
    UsageError when it cannot be read."""
    reason = _not_readable(path, directory="is a directory")
    if reason:
        raise UsageError(f"--python {path}: {reason}", EX_NOINPUT)
    what = f"--python {path}"
    fd = _opened_as_root(path, what) if os.geteuid() == 0 else None
    try:
        with open(path if fd is None else fd, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"{what}: {os_reason(exc)}", EX_NOINPUT) from None


def _opened_as_root(path: str, what: str) -> int:
    """A descriptor of the file ``path`` that ``what`` (the script, ``--python PATH``) names, as
    root: UnsafeFile when another user could have changed it or a directory on its way
    (safepath.open_trusted), UsageError (EX_NOINPUT) when it cannot be opened."""
    try:
        return open_trusted(path)
    except Untrusted as exc:
        raise UnsafeFile(what, exc.strerror or str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{what}: {os_reason(exc)}", EX_NOINPUT) from None


class _CheckedSource(importlib.machinery.SourceFileLoader):
    """A --python file's loader: it compiles the bytes read (and checked, as root) by read_hooks,
    and never reads or writes a cached ``.pyc``. The file's ``__pycache__``, which nothing checks,
    could hold other code that Python would run (its recorded mtime and size are all it
    compares with the source); and as root, writing one left root's files in the admin's directory."""

    def __init__(self, fullname: str, path: str, source: bytes) -> None:
        super().__init__(fullname, path)
        self.source = source

    def get_data(self, path: str) -> bytes:
        return self.source if path == self.path else super().get_data(path)

    def path_stats(self, path: str) -> Mapping[str, Any]:
        raise OSError("no bytecode cache")  # get_code then compiles the source, and writes no .pyc


def _setup_of(path: str, module: ModuleType) -> object:
    """The file's setup, or None: looked up as the file's own code, since a module __getattr__
    of the file's runs then, and what it raises fails the load naming the file (HooksFailed)."""
    found: list[object] = []
    _as_the_files(path, lambda: found.append(getattr(module, "setup", None)))
    return found[0]


def load_hooks(path: str, source: bytes, milter: Milter) -> None:
    """Import a --python file from its ``source`` (read_hooks) and call its setup(milter);
    HooksFailed if either raises."""
    name = f"pytclmilter_hooks_{Path(path).stem}"
    if not path.endswith(tuple(importlib.machinery.SOURCE_SUFFIXES)):  # (a .pyc, a .so: no source to check)
        raise UsageError(f"--python {path}: cannot be imported")
    spec = importlib.util.spec_from_file_location(name, path, loader=_CheckedSource(name, path, source))
    assert spec is not None and spec.loader is not None  # (given a loader, it makes a spec)
    loader = spec.loader
    module = importlib.util.module_from_spec(spec)
    # Registered as an import would be: @dataclass and pickling look the module up by name. A
    # reload's import replaces the entry; the old generation keeps its module through its callbacks.
    sys.modules[spec.name] = module
    _as_the_files(path, lambda: loader.exec_module(module))
    setup = _setup_of(path, module)
    if not callable(setup):
        raise UsageError(f"--python {path}: has no setup(milter) function")
    if is_async(setup):  # (its coroutine would never run: no callback registered, and no error)
        raise UsageError(f"--python {path}: setup(milter) must be a plain function, not async: it runs "
                         "once, while the script loads")
    _as_the_files(path, lambda: setup(milter))


def add_script_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--python", metavar="HOOKS.py", action="append", default=[],
                   help="Python file whose setup(milter) adds callbacks to the same chains (repeatable)")


#: Command-line flags whose names differ from the Tcl option they set.
_FLAGS = {"-onerror": "--on-error", "-calltimeout": "--call-timeout", "-dryrun": "--dry-run",
          "-maxconnections": "--max-connections"}


def check_script(script: str) -> None:
    """A UsageError (EX_NOINPUT) unless ``script`` is a regular file, saying why in tclsh's words;
    as root, UnsafeFile unless only root could change it (_opened_as_root), before anything
    runs. The `source` that then runs it reads it from a descriptor checked again (tcl/rootfiles.py)."""
    reason = _not_readable(script, directory="illegal operation on a directory")
    if reason:
        raise UsageError(f'couldn\'t read file "{script}": {reason}', EX_NOINPUT)
    if os.geteuid() == 0:
        os.close(_opened_as_root(script, script))


def _not_readable(path: str, directory: str) -> str:
    """Why ``path`` is no file to read ("" if it is one): a typo and a directory are told apart
    (``directory`` says the latter), a FIFO is not opened (reading it would block), and a file
    without read permission is found here, not by Tcl's `source` (a script error, exit 1 or 70)."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):  # (O_NONBLOCK: a FIFO swapped in after the stat does not block)
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as exc:
        return os_reason(exc)
    if stat.S_ISREG(mode):
        return ""
    return directory if stat.S_ISDIR(mode) else "not a regular file"


def make_host(script: str, hooks: list[str], overrides: dict[str, str | None],
              on_exit: Callable[[int], None] | None = None, milter_hooks: Hooks | None = None,
              by: str = "", checked: Callable[[], None] | None = None) -> TclHost:
    """An interpreter with the milter command, command-line overrides locked, Python hooks loaded;
    ``milter_hooks``: the command's own (listening, signal); ``by``: the command that fixes the
    overrides itself (try), which the script's ignored configure then names, not a flag nobody
    gave; ``checked``: called once the files and the overrides passed, before any file runs.
    Every file is checked, as root, before any of them runs."""
    check_script(script)
    sources = [(path, read_hooks(path)) for path in hooks]
    if os.geteuid() == 0:
        rootimports.install()  # what the files import, as they are, only from files of root's
    try:
        host = TclHost(milter_hooks, on_exit=on_exit)
    except tkinter.TclError as exc:  # (as root, an index on Tcl's auto_path refused: TCLLIBPATH's)
        raise UsageError(f"cannot make the script's interpreter: {exc}", 1) from None
    try:
        for option, value in overrides.items():
            if value is not None:
                why = f"{by} sets {option} {value or '{}'}" if by else ""
                host.command.lock(option, value, _FLAGS.get(option, "--" + option[1:]), why)
    except TclUsageError as exc:
        host.close()
        raise UsageError(str(exc)) from None
    if checked is not None:
        checked()
    try:
        for path, source in sources:
            load_hooks(path, source, host.milter)
    except BaseException:
        host.close()  # a reload goes on serving: free this interpreter now
        raise
    return host


class ScriptExit:
    """Tcl's `exit` for try and check: remember the code and unwind the script (an error nobody reports)."""

    def __init__(self) -> None:
        self.code: int | None = None

    def __call__(self, code: int) -> None:
        self.code = code
        raise TclUsageError(f"exit {code}")

    def before_main(self) -> str:
        """What check and try say of a script that calls `exit` before its `milter main`: that run,
        as tclsh, ends there with its status, serving nothing (not that it "never calls" it)."""
        code = self.code
        return f"the script calls exit {code} before milter main (run ends there, status {code}, serving nothing)"


def add_log_level(p: argparse.ArgumentParser, default: str, lines: str) -> None:
    """``--log-level`` of run, try and check, whose defaults differ: the help says which."""
    p.add_argument("--log-level", default=default, choices=["debug", "info", "warning", "error"],
                   help=f"{lines} from this level on (default: %(default)s)")


def add_envelope_options(p: argparse.ArgumentParser,
                         message_help: str = "the message file, or - for standard input") -> None:
    p.add_argument("message", metavar="MESSAGE.eml", help=message_help)
    p.add_argument("--from", dest="sender", metavar="ADDR", help="envelope sender (default: Return-Path or From)")
    p.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                   help="envelope recipient, repeatable (default: To, Cc, Bcc)")
    p.add_argument("--client-ip", default="127.0.0.1", metavar="IP",
                   help="client address in the connect event; IPv6 if it has a colon (default: %(default)s)")
    p.add_argument("--client-name", default="localhost", metavar="NAME",
                   help="client host name in the connect event (default: %(default)s)")
    p.add_argument("--helo", default="localhost", metavar="NAME", help="HELO/EHLO argument (default: %(default)s)")
    p.add_argument("--macro", action="append", default=[], metavar="NAME=VALUE",
                   help="macro the MTA sends (e.g. --macro {auth_authen}=alice), repeatable")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    p.add_argument("--max-size", type=_max_size, default=MAX_SIZE, metavar="BYTES",
                   help="refuse a message larger than this, as Postfix's message_size_limit (default: %(default)s)")


def _max_size(value: str) -> int:
    """--max-size: a whole number of bytes, at least 1 (argparse's usage error otherwise)."""
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number of bytes but got "{value}"') from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{size}: must be at least 1 byte")
    return size


def reports_print_anywhere() -> None:
    """Standard output writes a character its encoding lacks (a snowman on a Latin-1 terminal,
    PYTHONIOENCODING=iso8859-1) as ``\\u2603``: a report failed with UnicodeEncodeError."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def stdin_fd() -> int:
    """Descriptor 0, for a MESSAGE given as ``-``; a UsageError (EX_NOINPUT) if standard input was
    closed at start (sys.stdin is then None): descriptor 0 may since be a file of pytclmilter's,
    whose bytes were read as the message."""
    if sys.stdin is None:
        raise UsageError("-: standard input is closed", EX_NOINPUT)
    return 0


def read_message(opts: argparse.Namespace) -> tuple[Message, Envelope]:
    """The message file (``-``: standard input, as for try) and its envelope; a UsageError
    (EX_NOINPUT) when it cannot be read or is larger than --max-size (a device or a file that
    grows is read no further)."""
    stdin = opts.message == "-"
    try:
        with open(stdin_fd() if stdin else opts.message, "rb", closefd=not stdin) as f:
            raw = read_at_most(f, opts.max_size)
    except OSError as exc:
        raise UsageError(f"{opts.message}: {exc.strerror}", EX_NOINPUT) from None
    except TooLarge as exc:
        raise UsageError(f"{opts.message}: {exc}", EX_NOINPUT) from None
    msg = Message.parse(raw)
    return msg, envelope_of(opts, msg)


def envelope_of(opts: argparse.Namespace, msg: Message, queue_id: str = Envelope.queue_id) -> Envelope:
    """The envelope of one message: the options where given, else the message's headers."""
    try:  # (sent in the connect event with its family: what no MTA would send, the script never sees)
        address = ipaddress.ip_address(opts.client_ip)
    except ValueError:
        raise UsageError(f'--client-ip "{opts.client_ip}": not an IPv4 or IPv6 address') from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:  # (a milter ends the session)
        raise UsageError(f'--client-ip "{opts.client_ip}": a scoped address is not one an MTA sends')
    return Envelope.from_message(msg, opts.sender, opts.rcpt or None, client_ip=opts.client_ip,
                                 client_name=opts.client_name, helo=opts.helo, macros=macros_of(opts),
                                 queue_id=queue_id)


def macros_of(opts: argparse.Namespace) -> dict[str, str]:
    """The --macro options; UsageError for one that is not NAME=VALUE, or whose name no MTA sends
    (a long name without braces, which getsymval would never find)."""
    macros = {}
    for item in opts.macro:
        name, eq, value = item.partition("=")
        if not eq or not name.strip("{}"):
            raise UsageError(f'--macro "{item}": must be NAME=VALUE')
        if len(name) > 1 and not (len(name) > 2 and name[0] == "{" and name[-1] == "}"):
            raise UsageError(f'--macro "{item}": a name longer than one letter is sent in braces, as the '
                             f"MTA sends it: --macro '{{{name.strip('{}')}}}={value}'")
        macros[name] = value
    return macros
