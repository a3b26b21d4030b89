"""``pytclmilter run``: serve a TclMilter script, with the daemon options a mail admin expects."""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import grp
import logging
import os
import pwd
import re
import resource
import signal
import stat
import sys
import threading
import tkinter
import traceback
from types import TracebackType
from typing import Callable, Final, NamedTuple, TypeVar

from ..compiled import describe
from ..connspec import ConnSpec
from ..hooks import Hooks, forget_early_reload
from ..listener import remove_made
from ..logline import clip, escape, escape_lines, guard, one_line, said
from ..milter import Milter
from ..overdue import EXIT
from ..repeats import fault_kind, place_of
from ..tcl import threads
from ..tcl.output import python_output, unescaped
from ..tcl.interp import TclHost
from ..tcl.unanswered import Unanswered
from ..tcl.usage import Answer
from .check import NO_MAIN, callback_errors
from .common import HooksFailed, UsageError, add_log_level, add_script_options, make_host, reports_print_anywhere
from .logs import setup_logging
from .pidfile import PidFile
from . import sigmask
from .reloading import Abandoned, Generations
from .sdnotify import Notifier

_Entry = TypeVar("_Entry", pwd.struct_passwd, grp.struct_group)  # (_named: a user, or a group)
log = logging.getLogger("pytclmilter")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    run = sub.add_parser("run", help="run a TclMilter script as a milter")
    run.add_argument("script", help="the TclMilter script (.tcl)")
    run.add_argument("--connection", "-c", metavar="SPEC",
                     help="listen here (unix:/path, inet:port@host, inet6:port@host); overrides the script")
    run.add_argument("--timeout", metavar="SECONDS", help="seconds the MTA may stay silent before its connection is closed; overrides the script's -timeout")
    run.add_argument("--backlog", metavar="N", help="listen backlog; overrides the script's -backlog")
    run.add_argument("--name", help="milter name; overrides the script's -name")
    run.add_argument("--on-error", metavar="STATUS",
                     help="answer when a callback fails: SMFIS_TEMPFAIL (default), SMFIS_CONTINUE, ...")
    run.add_argument("--grace", metavar="SECONDS", help="how long open sessions may finish at stop (default 30)")
    run.add_argument("--call-timeout", metavar="SECONDS",
                     help="stop a callback running longer than this and answer --on-error (default 60, 0: none)")
    run.add_argument("--workers", metavar="N",
                     help="serve with N processes, each with its own interpreter (Tcl globals are per worker)")
    run.add_argument("--metrics", metavar="SPEC",
                     help="serve Prometheus metrics over HTTP at /metrics here (inet:port@host); overrides the script")
    run.add_argument("--max-connections", metavar="N",
                     help="MTA connections served at once (per worker); more are closed at once (default 1000, "
                          "0: no limit); overrides the script's -maxconnections")
    run.add_argument("--dry-run", action="store_true",
                     help="run the callbacks, but answer the MTA continue with no modification; log what "
                          "would have been sent (overrides the script's -dryrun)")
    add_script_options(run)
    run.add_argument("--user", help="drop privileges to this user after binding the socket")
    run.add_argument("--group", help="drop privileges to this group after binding (default: the user's group)")
    run.add_argument("--socket-mode", metavar="MODE", help="mode of the unix socket file, octal (e.g. 0660)")
    run.add_argument("--pidfile", metavar="PATH", help="write the process id here while serving")
    add_log_level(run, "info", "log lines (stderr, or syslog)")
    run.add_argument("--syslog", action="store_true", help="log to syslog (facility mail) instead of stderr")
    run.add_argument("args", nargs="*", default=[], help="arguments for the script (argv); put them after -- if they start with -")
    return run


class Daemon:
    """Privilege drop, pid file and the listening line, done once the socket is bound; what
    systemd is told (sdnotify.py)."""

    def __init__(self, milter: Milter, opts: argparse.Namespace, notify: Notifier,
                 files: Callable[[], list[str]]) -> None:
        self.milter = milter
        self.files = files  # what a reload reads, by then as --user (what the start read, by milter main)
        self.ids = _ids(opts.user, opts.group)
        # (made before the script runs: a relative path is the caller's, not where its `cd` leads)
        self.pidfile = PidFile(os.path.abspath(opts.pidfile)) if opts.pidfile else None
        self.dropped = False
        self.notify = notify
        self.serving = ""  # what systemctl status shows (STATUS=), after the -name of the script serving
        self.socket_mode = opts.socket_mode

    def listening(self, spec: ConnSpec) -> None:
        if self.pidfile is not None and not self.pidfile.claimed:  # while still root: /run is root's
            self.pidfile.claim()
        if self.ids is not None and not self.dropped:
            if os.geteuid() == 0:  # else already these ids (_ids): nothing to switch, nor allowed
                self.ids.switch()
            self.dropped = True
            log.info("running as uid %d gid %d", os.getuid(), os.getgid())
            _tell_unreadable(self.files())
        if self.socket_mode is not None and spec.family != "unix":
            log.warning("--socket-mode %s applies to a unix socket's file: %s has none (ignored)",
                        self.socket_mode, escape(str(spec)))
        if spec.family != "unix" and spec.host is None:  # libmilter's inet:PORT: the whole network's
            log.warning("listening on every address (%s): the milter protocol has no authentication, so "
                        "anyone who reaches port %d can feed this filter mail; %s:%d@%s listens on the "
                        "loopback address only", spec, spec.port, spec.family, spec.port,
                        "127.0.0.1" if spec.family == "inet" else "[::1]")
        # (-name and -connection are the script's text: escaped as in the log)
        try:
            print(f"pytclmilter: {escape(self.milter.name)} listening on {escape(str(spec))}", file=unescaped(sys.stdout),
                  flush=True)
        except OSError as exc:  # stdout's reader went away (a closed pipe): no reason not to serve
            log.warning("stdout cannot be written (%s): the listening line is not printed", exc.strerror or exc)
            sys.stdout = open(os.devnull, "w", encoding="utf-8")  # (its buffer would fail at exit)
        self.serving = f"listening on {spec}"
        self.notify.ready(f"{self.milter.name} {self.serving}")

    def signal(self, sig: signal.Signals) -> None:
        """A stop signal (server.py and workers.py call this for those alone)."""
        _stopped_by(self.notify, sig)

    def reload(self, scripts: Generations) -> None:
        """SIGUSR1: systemd sees the reload begin and end, and whether it loaded."""
        self.notify.reloading()
        try:
            loaded = scripts.reload()
        except Abandoned:  # the stop is the last word: no READY=1, and the script did not fail
            return
        outcome = "" if loaded else "; the last reload failed (see the log)"
        serving = scripts.current.milter  # its -name: a reload may change it
        self.notify.ready(f"{serving.name} {self.serving}; generation {serving.generation}{outcome}")

    def stopped(self) -> None:
        """A stop signal while the script's own code runs ends the process there (sigmask.py)."""
        self.notify.stopping()
        self.cleanup()

    def cleanup(self) -> None:
        if self.pidfile is not None:
            self.pidfile.release()
        self.notify.close()


def _stopped_by(notify: Notifier, sig: signal.Signals) -> None:
    """A stop signal came: systemd is told, and Ctrl-C at a terminal is answered, by the main
    process alone (it reaches the --workers workers too: each printed the answer again)."""
    notify.stopping()
    if sig == signal.SIGINT and notify.main and sys.stdin is not None and sys.stdin.isatty():
        print("\npytclmilter: interrupted, stopping", file=unescaped(sys.stderr), flush=True)


def _stopping(notify: Notifier, sig: signal.Signals) -> None:
    """A stop signal while neither the server nor the script's watch has it (sigmask.StopsBetween)."""
    log.info("received %s: stopping", sig.name)
    _stopped_by(notify, sig)


class Ids(NamedTuple):
    """Whom --user and --group name."""

    uid: int
    gid: int
    user: str  # the user's name in the group database, for its supplementary groups

    def switch(self) -> None:
        """Become the user: its supplementary groups as in the group database (as login, su
        and most daemons do: ``adduser pytclmilter redis`` must reach Redis's socket), the gid,
        the uid; root's groups are dropped. The groups first: setuid() ends the right to."""
        os.initgroups(self.user, self.gid)
        os.setgid(self.gid)
        os.setuid(self.uid)
        _check_switched(self.uid, self.gid)


def _check_switched(uid: int, gid: int) -> None:
    """OSError unless the switch left nothing of root's: the ids in every slot (real, effective,
    saved), and, for a user other than root, no capability. setuid() clears the capabilities
    only where the securebits let it: with no-setuid-fixup (systemd's SecureBits=, a container
    runtime's) the process went on as uid 65534 with all of root's, which the log did not say."""
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(errno.EPERM, f"after switching to uid {uid} gid {gid} the process has uids "
                                   f"{os.getresuid()} and gids {os.getresgid()}; refusing to serve")
    if uid == 0:
        return  # (--user root: serving as root, said at start)
    held = _capabilities_held()
    if held:
        raise OSError(errno.EPERM, f"after switching to uid {uid} the process still holds capabilities ({held}): "
                                   "the securebits keep them across setuid() (no-setuid-fixup: systemd's "
                                   "SecureBits=, a container's settings); refusing to serve with root's privileges")


def _capabilities_held() -> str:
    """The capability sets of this thread that are not empty, as /proc shows them ("" if none);
    where /proc cannot be read, whether setuid(0) succeeds."""
    try:
        with open("/proc/thread-self/status", encoding="ascii", errors="replace") as status:
            sets = re.findall(r"^(Cap(?:Prm|Eff|Amb)):\s*([0-9a-f]+)$", status.read(), re.M)
    except OSError:
        try:
            os.setuid(0)
        except OSError:
            return ""
        return "setuid(0) succeeded"
    return ", ".join(f"{name} {value}" for name, value in sets if int(value, 16))


def _tell_unreadable(files: list[str]) -> None:
    """A file the start read as root that the --user cannot: every reload would fail on it, the
    first one perhaps months later. Said now, while the admin is looking."""
    for path in dict.fromkeys(files):  # (the script, sourced too, is said once)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            log.warning("uid %d cannot read %s (%s): a reload (SIGUSR1) reads it as this user and would fail; "
                        "let it read the file and its directories", os.geteuid(), escape(path), exc.strerror or exc)


def _ids(user: str | None, group: str | None) -> Ids | None:
    """The ids of --user and --group (None without --user); UsageError when they cannot be had,
    quoting the name escaped (logline.escape): a newline in it cannot start a line of its own."""
    if user is None:
        if group is not None:
            raise UsageError("--group needs --user")
        return None
    try:
        pw = _named(user, pwd.getpwnam, pwd.getpwuid)
    except KeyError:
        raise UsageError(f'--user: no such user "{escape(user)}"') from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = _named(group, grp.getgrnam, grp.getgrgid).gr_gid
        except KeyError:
            raise UsageError(f'--group: no such group "{escape(group)}"') from None
    if os.geteuid() != 0:
        _check_unprivileged(pw.pw_uid, gid)
    return Ids(pw.pw_uid, gid, pw.pw_name)


def _named(text: str, by_name: Callable[[str], _Entry], by_id: Callable[[int], _Entry]) -> _Entry:
    """The user or group ``text`` names, by its id when it is digits 0-9; KeyError when none.
    str.isdigit() is true of "\u00b2", which int() refuses (a traceback), and of "\u0660", which
    it reads as 0: root, for a name no user can have. An id past the C type's range is none."""
    if text.isascii() and text.isdigit():
        try:
            return by_id(int(text))
        except OverflowError:
            raise KeyError(text) from None
    return by_name(text)


def _warn_root(user: str | None) -> None:
    """Serving as root is allowed (a test box, a container that is its own sandbox), as libmilter
    and OpenDKIM allow it (its UserID is optional), but said once at start: every callback, and
    every program the script starts, would parse what strangers mail with root's privileges,
    whether --user is left out or names uid 0 (``--user root``, ``--user 0``, a ``toor``)."""
    how = "without --user" if user is None else f"(--user {escape(user)} is uid 0)"
    log.warning("serving as root %s: every callback, and every program the script starts "
                "(exec, open |cmd), runs as root, so a flaw in the script, or in what it does with a "
                "message, gives root to whoever sends the mail; start with --user USER, a user other "
                "than root (the socket is bound and the pid file written as root first; docs/deployment.md)", how)


def _check_unprivileged(uid: int, gid: int) -> None:
    """Without root the process can only stay what it is: --user naming itself (a unit with
    ``User=`` that keeps ``--user``) is fine; another user or group is a usage error now, not
    an "Operation not permitted" from ``milter main`` once the script has loaded."""
    if uid != os.geteuid():
        raise UsageError("--user needs root privileges")
    if gid != os.getegid():
        raise UsageError(f"--user/--group: switching to gid {gid} needs root privileges "
                         f"(the process runs as gid {os.getegid()})")


def _serve_once(host: TclHost) -> Answer:
    """`milter main`'s serving; the supervisor of --workers takes SIGCHLD, one process serving
    alone runs the callbacks in this thread (sigmask.py)."""
    if host.milter.settings.workers > 1:
        return host.command.serve()
    with sigmask.children_reapable():
        return host.command.serve()


def raise_fd_limit() -> None:
    """Every connection is a file descriptor: lift the soft limit to the hard one (systemd's soft
    default of 1024 would refuse connections well before the machine runs out). The programs the
    script starts inherit it: Tcl forks in C, where nothing of ours runs (docs/deployment.md)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit: %s", exc)


def cmd_run(opts: argparse.Namespace) -> int:
    opts.syslog = setup_logging(opts.log_level, opts.syslog, daemon=True)  # (stderr closed: syslog)
    report_crashes()
    threading.excepthook = _thread_failed_logger()
    sys.unraisablehook = _unraisable_logger()
    # The listening line quotes the name and the socket's path: one that stdout's encoding lacks
    # (Café under PYTHONIOENCODING=ascii) ended the start in a traceback, nothing served.
    reports_print_anywhere()
    try:
        # A --python file's print() and sys.stderr.write() escaped as the script's `puts` (output.py)
        with python_output():
            return _serve(opts)
    except UsageError as exc:
        if opts.syslog:
            _log_failure(f"pytclmilter run: {exc}")
        raise  # (and on stderr: cli.main)
    except HooksFailed as exc:
        if opts.syslog:
            _log_failure(f"pytclmilter run: {exc}", exc.detail)
        raise
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - a bug, ours or a --python file's: say it where the log is
        return _unexpected(opts, exc)


def _unexpected(opts: argparse.Namespace, exc: BaseException) -> int:
    """An exception nothing handled ends ``run`` (status 1, as Python's own report of it): its
    traceback in the log, escaped, and with --syslog on stderr too. Python printed it on stderr
    alone, unescaped, which an init script's daemon sends nowhere: the mail log just stopped."""
    trace = "".join(traceback.format_exception(exc)).rstrip()
    if opts.syslog:
        print(guard(f"pytclmilter run: unexpected error\n{trace}"), file=unescaped(sys.stderr))
    _log_failure(f"unexpected error: {type(exc).__name__}: {said(exc)}", trace)
    return 1


def _thread_failed_logger() -> Callable[[threading.ExceptHookArgs], None]:
    """threading.excepthook for ``run``: an exception that ends a thread (one a --python file
    started, say) is logged, escaped, with its traceback (:func:`_log_unexpected`). Python
    printed it raw on stderr (with --syslog as well as in the log), once a thread."""

    def failed(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # (as Python's own hook: a thread's sys.exit() is no error)
            return
        name = args.thread.name if args.thread is not None else "?"
        _log_unexpected(f" in thread {name}", args.exc_type, args.exc_value, args.exc_traceback)

    return failed


def _unraisable_logger() -> Callable[[sys.UnraisableHookArgs], None]:
    """sys.unraisablehook for ``run``: an exception Python cannot raise (one in a ``__del__`` or
    a weakref callback of a --python file) is logged as a thread's death is
    (:func:`_thread_failed_logger`); Python printed it raw on stderr."""

    def ignored(args: sys.UnraisableHookArgs) -> None:
        where = args.err_msg or "Exception ignored in"
        what = f"{where}: {said(args.object, repr)}" if args.object is not None else where
        _log_unexpected(f", ignored: {what}", args.exc_type, args.exc_value, args.exc_traceback)

    return ignored


#: The unexpected errors of threads and of code Python cannot raise in: a --python file's thread
#: started per message, or a __del__ of an object made per message, may fail for every message;
#: each place's error is logged whole once a minute, its repeats counted (repeats.Repeated).
_UNEXPECTED: Final = Unanswered()


def _log_unexpected(where: str, exc_type: type[BaseException], exc: BaseException | None,
                    tb: TracebackType | None) -> None:
    """``ERROR: unexpected error WHERE: TYPE: message`` and the traceback below it, all escaped;
    its repeats at the same place counted (tcl/unanswered.py)."""
    trace = "".join(traceback.format_exception(exc_type, exc, tb)).rstrip()
    text = said(exc)
    message = f"{exc_type.__name__}: {text}"
    _UNEXPECTED.log(f"unexpected error{escape(where)}", message, trace,
                    f"{fault_kind(clip(message))}\n{place_of(trace, text)}")


def report_crashes() -> None:
    """A crash (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT: a C extension a --python file or the
    script loads, Tcl itself) ended the process with not a word, the log stopping at its last
    line: now stderr gets "Fatal Python error: Segmentation fault" and where each thread was
    (faulthandler, written from the signal handler, so nothing buffered is needed). The signal
    then ends the process as before (its status unchanged). Where stderr cannot take the dump,
    one warning says so: with stderr closed, enable() raised, and run ended with exit 1 and not a
    word (the traceback had nowhere to go); sent to /dev/null, a crash would leave no trace."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(all_threads=True)
    except (RuntimeError, ValueError, OSError) as exc:  # no sys.stderr, or no descriptor behind it
        log.warning("a crash (SIGSEGV, SIGABRT, ...) would leave no dump of where each thread was: "
                    "stderr cannot take it (%s); start pytclmilter with stderr open, to the journal or a file", exc)
        return
    if _is_dev_null(sys.stderr.fileno()):
        log.warning("a crash (SIGSEGV, SIGABRT, ...) would leave no dump of where each thread was: stderr "
                    "is /dev/null; send it to the journal or a file (2>>/var/log/pytclmilter.err)")


def _is_dev_null(fd: int) -> bool:
    try:
        here, null = os.fstat(fd), os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(here.st_mode) and here.st_rdev == null.st_rdev


def _log_failure(text: str, detail: str | None = None) -> None:
    """What ends ``run`` (printed on stderr) in the log too: with --syslog, stderr may go nowhere
    (an init script's daemon), and the mail log would not say why the filter is gone. A Tcl
    error's errorInfo follows its first line (or ``detail`` follows ``text``), as a callback's does."""
    message = text
    if detail is None:
        message, _, detail = text.partition("\n")
    log.error("exiting: %s%s", escape(message), "\n" + escape_lines(detail) if detail else "")


def _refused(opts: argparse.Namespace, host: TclHost) -> bool:
    """A callback that does not exist or cannot take its event's arguments would fail for every
    message (all mail answered -onerror): say so as check does, and serve nothing, as a reload does."""
    errors = callback_errors(opts.script, host)
    for line in errors:
        print(one_line(line), file=unescaped(sys.stderr))
    if errors and opts.syslog:
        _log_failure(errors[0], "\n".join(errors[1:]))
    return bool(errors)


def _never_served(opts: argparse.Namespace) -> int:
    """The script ran to its end without calling `milter main`: say so, as check does, and fail
    the start. It ended with status 0 and not a word (an empty or truncated file, a `milter
    main` behind a condition not met), and a service manager saw a clean stop."""
    message = f"{opts.script}: error: {NO_MAIN} (nothing was served)"
    print(escape(message), file=unescaped(sys.stderr))
    if opts.syslog:
        _log_failure(message)
    return 1


def _serve(opts: argparse.Namespace) -> int:
    """``run`` once logging is set up: load the script, serve, carry on after `milter main`."""
    notify = _set_up_process()
    run = _Run(opts, notify, _overrides(opts), _socket_mode(opts), _ids(opts.user, opts.group))
    run.load()
    run.make_daemon()
    return run.serve()


def _set_up_process() -> Notifier:
    """What the process needs before any code of the script's runs: systemd's notifier
    (sdnotify.py), the descriptor limit, the signals a reload and the waiters take. (The log's
    first line, the hot path's, comes once the command line passed: _Run._generation.)"""
    notify = Notifier.from_environment()
    raise_fd_limit()
    # A reload (SIGUSR1) before the milter serves has nothing to replace: not the end of the process.
    # One held since the start (earlyreload.py) is taken first: ignoring it would discard it unlogged.
    forget_early_reload()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sigmask.unused_signal_ignored()  # (SIGUSR2: a replaced worker's alone)
    sigmask.block_for_the_waiters()  # (the why: sigmask.py)
    return notify


def _overrides(opts: argparse.Namespace) -> dict[str, str | None]:
    """The command line's settings, which the script's `milter configure` cannot change."""
    overrides = {"-connection": opts.connection, "-timeout": opts.timeout, "-backlog": opts.backlog,
                 "-name": opts.name, "-onerror": opts.on_error, "-grace": opts.grace,
                 "-calltimeout": opts.call_timeout, "-workers": opts.workers, "-metrics": opts.metrics,
                 "-dryrun": "1" if opts.dry_run else None, "-maxconnections": opts.max_connections}
    if opts.name is not None and not opts.name.strip():  # (a log line's name, the listening line's)
        raise UsageError(f"--name {opts.name!r}: must not be empty")
    return overrides


def _socket_mode(opts: argparse.Namespace) -> int | None:
    """--socket-mode as three octal digits, as chmod's: int() alone took "-1" and "77777", and
    chmod made the socket 07777, writable by anyone."""
    if opts.socket_mode is None:
        return None
    if not re.fullmatch(r"0?[0-7]{1,3}", opts.socket_mode):
        raise UsageError(f'--socket-mode: "{opts.socket_mode}" is not an octal mode (0 to 0777)')
    return int(opts.socket_mode, 8)


class _Run:
    """One `run`: the script's generations and the daemon around its milter. The milter's hooks,
    Tcl's `exit` and a thread's reach both, though the first load needs the hooks before either
    is made (the hooks run only once the milter serves)."""

    scripts: Generations
    daemon: Daemon
    between: sigmask.StopsBetween

    def __init__(self, opts: argparse.Namespace, notify: Notifier, overrides: dict[str, str | None],
                 socket_mode: int | None, ids: Ids | None) -> None:
        self.opts, self.notify, self.overrides, self.socket_mode, self.ids = opts, notify, overrides, socket_mode, ids
        self.argv = list(opts.args) + list(getattr(opts, "rest", []))
        self.hooks = Hooks(listening=lambda spec: self.daemon.listening(spec),
                           signal=lambda sig: self.daemon.signal(sig),
                           reload=lambda: self.daemon.reload(self.scripts), exiting=lambda: self.daemon.cleanup())
        # A reload reads the files the start read, whatever directory the script has changed to since
        # (Tcl's cd, a daemon's `cd /`): by their absolute paths, taken before any of its code runs.
        self.reread = os.path.abspath(opts.script), [os.path.abspath(path) for path in opts.python]
        self.loads = 0
        self.loading = f"loading {opts.script}"
        self.after_main = f"running {opts.script} after its milter main"

    def load(self) -> None:
        """Load the script as root. A stop signal while the script's own code runs (loading it,
        or after its `milter main`) is logged and exits 0, as a stop while serving (sigmask.py);
        in between, a stop as soon as it can."""
        self.between = sigmask.StopsBetween(lambda sig: _stopping(self.notify, sig))
        self.between.install()
        with sigmask.stops_meanwhile(self.loading, self.notify.stopping):
            self.scripts = Generations(self.reread[0], self._generation, self._exit_process)
        # (after the options' check: a usage error serves nothing)
        if os.geteuid() == 0 and (self.ids is None or self.ids.uid == 0):
            _warn_root(self.opts.user)

    def make_daemon(self) -> None:
        """The daemon (privilege drop, pid file: at the listening hook) around the loaded milter,
        and what ends the process otherwise cleans up after it."""
        self.between.serves(self.scripts.current.milter.stop)  # (each generation's milter stops the one server)
        self.daemon = Daemon(self.scripts.current.milter, self.opts, self.notify,
                             lambda: [self.reread[0], *self.reread[1], *self.scripts.current.sourced])
        with contextlib.suppress(OSError, AttributeError):  # (a Tcl without the Thread package's way in)
            threads.at_process_exit(self._thread_exits)

    def _generation(self, on_exit: Callable[[int], None] | None) -> TclHost:
        """One generation's interpreter, made the same way at start and at every reload."""
        opts = self.opts
        script, python = (opts.script, opts.python) if not self.loads else self.reread
        # The log's first line, at start; after a usage error (a refused --connection, say) it
        # would stand above the one line that says what is wrong, for a filter that never started.
        first = (lambda: log.info("%s", describe())) if not self.loads else None
        self.loads += 1
        host = make_host(script, python, self.overrides, on_exit=on_exit, milter_hooks=self.hooks, checked=first)
        if self.socket_mode is not None:
            host.milter.socket_mode = self.socket_mode
        if self.ids is not None:  # the socket's file is made with this owner (unixsocket.py)
            host.milter.socket_owner = (self.ids.uid, self.ids.gid)
        host.set_argv(opts.script, self.argv)
        return host

    def _exit_process(self, host: TclHost, code: int) -> None:
        """Tcl's exit: the pid file goes first (the process ends without unwinding to cleanup);
        ``exit 0`` after a stop some worker did not end cleanly is that stop's failure."""
        self.daemon.cleanup()
        host.exit_process(code or _stop_status(host.milter))

    def _thread_exits(self) -> None:
        """A thread's `exit` (C's exit(): nothing unwinds) removes the socket file and the pid
        file, as the script's own `exit` does; the file too that bind has made and the milter
        does not have yet (listener.remove_made)."""
        self.scripts.current.milter.remove_socket_file()
        remove_made()
        self.daemon.cleanup()

    def serve(self) -> int:
        """Start the script and serve while it waits in `milter main`; a Tcl error ends it, with
        its errorInfo, status 1."""
        try:
            status = self._start()
        except tkinter.TclError:
            status = self._failed()
        finally:
            self.scripts.current.flush_channels(ending=True)  # as Tcl's exit would
            self.daemon.cleanup()
        return status if status is not None else _stop_status(self.scripts.current.milter)

    def _start(self) -> int | None:
        """Run the script, serving each time it waits in `milter main`: None once it has ended,
        a status where it never served."""
        with (sigmask.stops_meanwhile(self._starting, self.daemon.stopped,
                                      lambda: _stop_status(self.scripts.current.milter)),
              sigmask.children_reapable()):
            waiting = self.scripts.current.start(self.opts.script)
        if waiting and _refused(self.opts, self.scripts.current):
            return 1
        if not waiting and not self.scripts.current.command.main_calls:
            return _never_served(self.opts)
        while waiting:  # the script waits in `milter main`: serve, then let it go on
            waiting = self._serve_then_resume()
        return None

    def _starting(self) -> str:
        """What the script does while start() runs: loading, unless its `milter main` served
        inside a Tcl command and returned (an `after` handler's, from a `vwait`)."""
        return self.after_main if self.scripts.current.served_inside else self.loading

    def _serve_then_resume(self) -> bool:
        """Serve until the stop, then run the script's code after its `milter main` (a reload may
        have replaced the script meanwhile): True while it waits in a `milter main` again."""
        result = _serve_once(self.scripts.current)
        with (sigmask.stops_meanwhile(self.after_main, self.daemon.stopped,
                                      lambda: _stop_status(self.scripts.current.milter)),
              sigmask.children_reapable()):
            return self.scripts.current.resume(result)

    def _failed(self) -> int:
        """A Tcl error ended the script: what it wrote, then its errorInfo in tclsh's layout."""
        info = self.scripts.current.error_info()  # (before the flush: the errors it catches are recorded there too)
        self.scripts.current.flush_channels(ending=True)  # what the script wrote, before why it ended
        # tclsh's layout, but stderr is the log (the journal): no line after the first can pass for one
        print(guard(info), file=unescaped(sys.stderr))
        if self.opts.syslog:
            _log_failure(info)
        return 1


def _stop_status(milter: Milter) -> int:
    """0, or overdue.EXIT when a --workers worker's stop was not clean (workers.py): the
    supervisor's status says so, as one process's would (systemd shows the stop failed)."""
    return EXIT if milter.stats.workers_unclean else 0
