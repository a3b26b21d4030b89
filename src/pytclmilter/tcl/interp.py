"""The embedded Tcl interpreter: TclMilter's commands, the contexts, the event loop, exit.

The host ties the parts that stand alone: its own Tcl procedures (prelude.py), the callbacks
into Tcl (callbacks.py), the script's run up to and from `milter main` (script.py), and the
commands of tcl/ (milter_cmd.py, context_cmd.py, pycommands.py, output.py, threads.py, ...).

tkinter's interpreter may only be used from the thread that created it, so
everything here runs on the thread that runs the asyncio loop; ``milter stop``
from other threads arrives through Tcl's own event queue (Thread package) or
through :meth:`Milter.stop`, which is thread-safe.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
import tkinter
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Final, Sequence

import _tkinter

from ..checks import MilterError
from ..context import Context
from ..hooks import FlushRefused, Hooks
from ..limits import PYTHON_LIMIT, CallbackTimeout
from ..logline import escape, failure_text
from ..milter import Milter
from ..repeats import tell_counts
from . import context_cmd, growth, output, rootfiles, tclstderr, threads
from .callbacks import TclCallbacks, command_object
from .limit import LIMIT_ECHO, WAIT_STOPPED, CallLimit, is_limit_error
from .milter_cmd import MilterCommand, SuspendAtMain
from .priv import TclPrivate
from .prelude import OWN_AFTER, OWN_PID, PRELUDE
from .pycommands import PythonCommands
from .script import FLUSH_MOST, FLUSH_WAIT, Queued, TclScript
from .strings import deep_to_tcl, from_tcl, tcl_body_to_wire
from .unanswered import Unanswered, message_of
from .usage import NONE, Answer, TclUsageError, check_count, integer

log: Final = logging.getLogger("pytclmilter")

_DONT_WAIT: Final = _tkinter.DONT_WAIT
_ALL_EVENTS: Final = _tkinter.ALL_EVENTS
_IDLE_EVENTS: Final = _tkinter.IDLE_EVENTS
#: Seconds a tick that found something pending polls Tcl on, tick after tick, before `quiet` is
#: asked again. Tcl 8.6 can tell whether an `after` event is pending only by listing them all
#: (`after info`): O(n), 33 ms of CPU at 100 000 events, more than the 20 ms between ticks, where
#: a poll with nothing due costs microseconds. Asked every tick, that filled a CPU.
RECHECK_AFTER = 1.0
#: And for at least this many times the CPU the last `quiet` took: at most 1 % of a CPU whatever
#: the number of events (3.3 s at 100 000).
RECHECK_SHARE = 100.0
#: What a handler that Tcl refused to run, in the pass whose earlier handler the limit stopped,
#: is logged as (Tcl gives it no message: the interpreter runs nothing until the limit is reset).
_NOT_RUN: Final = ("not run: a handler due with it was stopped at the time limit (-calltimeout), and Tcl "
                   "runs nothing more in that pass")

#: What ends the line of a stopped `bgerror` (TclHost._bgerror): nothing else tells of them.
_DROPPED: Final = "; the errors queued after it in that pass, if any, are dropped"


#: The host whose script's interpreter Thread evaluates what threads send to this thread in: the
#: first to run a thread:: command (tclmilter.tcl, threads_used). Thread keeps that interpreter
#: for the process's life and would evaluate into freed memory once it is deleted, so the host
#: stays here and its interpreter is never deleted (TclHost.close); empty until then.
_THREAD_HOME: Final[list["TclHost"]] = []


class _Interpreter(tkinter.Tk):
    """What ``tkinter.Tcl()`` makes, less the start-up files of a desktop program.

    ``tkinter.Tk`` sources ``.Tk.tcl`` and ``.pytclmilter.tcl`` and executes ``.Tk.py`` and
    ``.pytclmilter.py`` from $HOME, or from the current directory when HOME is unset, as a
    service's often is (systemd starts it in /). In a daemon that starts as root that is code
    from a path no one configured, read through whatever symlink is there: never read any.
    """

    def readprofile(self, baseName: str, className: str) -> None:  # noqa: N803 - tkinter's names
        """Nothing: see the class."""


def tcl_library_dir() -> Path:
    """Where pkgIndex.tcl lives: the installed package data, else the source tree's tclmilter/."""
    try:
        path = Path(str(resources.files("pytclmilter.tcllib")))
        if (path / "pkgIndex.tcl").exists():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[3] / "tclmilter"



@functools.cache
def _tclsh(version: str) -> str | None:
    """The tclsh of this Tcl's version on PATH: what `info nameofexecutable` names under tclsh,
    where TclMilter's scripts ran. Here Tcl was started by Python and names Python, which a
    script that runs Tcl helpers with it would hand a Tcl script."""
    for name in (f"tclsh{version}", "tclsh"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


#: What the log calls an error of an `after` or `fileevent` handler of the script.
_HANDLER_ERROR: Final = "error in an event handler of the script (after, fileevent)"


class TclHost:
    """One interpreter hosting TclMilter for one :class:`Milter`."""

    #: The interpreter the script runs in: a child, so that Tcl's `interp limit` can bound callbacks.
    CHILD = "filter"

    def __init__(self, hooks: Hooks | None = None, on_exit: Callable[[int], None] | None = None) -> None:
        """``hooks``: the program's own (listening, signal); the interpreter adds its context and tick hooks."""
        own = replace(hooks or Hooks(), context_created=self._context_created, context_closed=self._context_closed,
                      tick=self.service_events, flush=self.flush_channels, write_held=output.write_held_now)
        self.milter = Milter(name="TclMilter", hooks=own)
        self.on_exit = on_exit or self.exit_process
        self._flush_waited = False  # (flush_channels: a wait gave up, output was left queued)
        self._dropped: set[str] = set()  # (and warned of these channels)
        libdir = str(tcl_library_dir())
        # New interpreters (those of Thread's secondary threads too) read TCLLIBPATH into auto_path.
        paths = os.environ.get("TCLLIBPATH", "")
        if libdir not in paths.split():
            os.environ["TCLLIBPATH"] = f"{libdir} {paths}".strip()
        self.tcl = _Interpreter(useTk=False)  # tkinter.Tcl(), without start-up files
        self.tk = self.tcl.tk
        self.tk.call("encoding", "system", "utf-8")  # scripts are UTF-8 whatever the locale
        self.contexts: dict[int, Context] = {}
        self._commands: list[str] = []  # the Python commands, deleted by close()
        #: The files the script's interpreters `source`d as root until its `milter main` (absolute
        #: paths, each once; tcl/rootfiles.py): what a reload reads again. (Not after: a callback
        #: that sources a file per message would grow it for ever.)
        self.sourced: dict[str, None] = {}
        #: `milter main` served inside the script's call (where Tcl could not suspend it).
        self.served_inside = False
        #: A reload loads this script: its `milter main` must suspend it, never serve.
        self.loading = False
        #: The background errors logged lately: a failing `after` loop logs once a minute.
        self.bgerrors = Unanswered()
        #: The errors of threads' scripts that no caller got (Thread's errorproc), as bgerrors.
        self.thread_errors = Unanswered()
        #: A handler was stopped by the limit since the background errors were last reported.
        self._handler_stopped = False
        #: The line of the time limit's echo (_limit_echo) held until it is known to be no echo of
        #: a stop reported by what was stopped; "": none held.
        self._echo_held = ""
        #: The script's pending `after` events and threads, told when they grow past any need.
        self.growth = growth.Growth()
        #: Until when (time.monotonic) ticks poll Tcl without asking `quiet` (RECHECK_AFTER).
        self._polling_until = 0.0
        self.command = MilterCommand(self, self.milter)
        self._register("::tclmilter::py::milter", self.command)
        self._register("::tclmilter::py::context", self._context)
        self._register("::tclmilter::py::replacebody", self._replacebody)
        self._register("::tclmilter::py::privstarted", self._priv_started)
        self._register("::tclmilter::py::exit", self._exit)
        self._register("::tclmilter::py::threads", self._threads)
        self._register("::tclmilter::py::bgerror", self._bgerror)
        self._register("::tclmilter::py::limit_echo", self._limit_echo)
        self._register("::tclmilter::py::thread_error", self._thread_error)
        self._create("::tclmilter::py::serve", self._serve_inside)
        self.tk.call("eval", PRELUDE)
        tclstderr.install()  # what Tcl itself writes on stderr, escaped
        self._make_child(libdir)
        # For `quiet` only, and only now: see _make_child.
        self.tk.call("catch", "package require Thread")
        self.private = TclPrivate(self.child_call)
        self.tk.call("interp", "alias", "", "::tclmilter::py::outgoing", self.CHILD, "set", "::tclmilter::outgoing")
        self._outgoing = command_object(self.tk, "::tclmilter::py::outgoing")
        self.limit = CallLimit(self.tk.call, self._create, self.CHILD, self.milter.shared)
        self.pycommands = PythonCommands(self.tk.call, self._create, self.CHILD, self.limit, self.milter)
        self.pycommands.attach(self.milter.tcl_commands)
        self.milter.script = self.pycommands
        self.script = TclScript(self.tk, self.CHILD, self.limit, self.command)
        self.callbacks = TclCallbacks(self.tk, self.CHILD, self.limit, self.pycommands, self.script.error_info)

    def _make_child(self, libdir: str) -> None:
        """The script's interpreter: TclMilter's Python commands and our exit aliased in.

        The Thread package evaluates every thread::send to this thread in the interpreter that
        ran the thread's first thread:: command (its ``Init``). `package require TclMilter` here
        runs `thread::id` (tclmilter.tcl), before the parent has Thread, so that interpreter is
        the script's: workers' sends, `milter stop` among them, reach the script's procs and
        globals as under tclsh.
        """
        child, call = self.CHILD, self.tk.call
        call("interp", "create", child)
        tclsh = _tclsh(str(call("info", "tclversion")))
        if tclsh is not None:  # a script's `exec [info nameofexecutable] helper.tcl` runs Tcl, as under tclsh
            self.child_call("proc", "::tcl::info::nameofexecutable", "", ("return", tclsh))
        for name in ("::tclmilter::py::milter", "::tclmilter::py::context", "::tclmilter::py::replacebody",
                     "::tclmilter::py::privstarted", "::tclmilter::py::exit", "::tclmilter::py::poll_next",
                     "::tclmilter::py::serve", "::tclmilter::py::threads", "::tclmilter::py::bgerror",
                     "::tclmilter::py::thread_error", "::tclmilter::py::watched", "::tclmilter::py::interp_made",
                     "::tclmilter::py::badcode"):
            call("interp", "alias", child, name, "", name)
        call("interp", "alias", child, "exit", "", "exit")
        call("interp", "alias", child, "::tclmilter::py::bghandle", "", "::tclmilter::py::bghandle", child)
        call("interp", "alias", child, "::tclmilter::py::bg_made", "", "::tclmilter::py::bg_made", child)
        # The first trace: Tcl gives each leave trace the previous one's result as the command's.
        self.child_call("trace", "add", "execution", "::interp", "leave", "::tclmilter::py::bg_made")
        self.child_call("eval", OWN_AFTER)  # (before any code of the script's: see prelude.py)
        self.child_call("eval", OWN_PID)
        output.install(self._register, call, child)
        threads.install(call, child)
        rootfiles.install(self._register, call, child, self._sourced)
        self.child_call("lappend", "auto_path", libdir)
        self.child_call("package", "require", "TclMilter")
        for name in ("::fileevent", "::tcl::chan::event"):  # (`chan event` is not `fileevent`)
            self.child_call("trace", "add", "execution", name, "enter", "::tclmilter::py::watched")
        self.child_call("trace", "add", "execution", "::interp", "leave", "::tclmilter::py::interp_made")

    def thread_count(self) -> int:
        """Threads of the Thread package in this process, this one included (1 without Thread)."""
        if not _THREAD_HOME or not self.tk.call("info", "commands", "::thread::names"):
            return 1  # (before any script ran a thread:: command, none can have made a thread)
        return len(self.tk.splitlist(self.tk.call("thread::names")))

    def thread_pools(self) -> int:
        """Thread pools of the Thread package in this process (`tpool::names`): their workers are
        threads that `thread::names`, and so :meth:`thread_count`, does not list."""
        if not _THREAD_HOME or not self.tk.call("info", "commands", "::tpool::names"):
            return 0
        return len(self.tk.splitlist(self.tk.call("tpool::names")))

    def _sourced(self, path: str) -> None:
        if not self.command.main_calls:
            self.sourced[path] = None

    def child_call(self, *words: Any) -> Any:
        """Invoke a command in the script's interpreter (a pure list: no parsing of source text)."""
        return self.tk.call("interp", "eval", self.CHILD, words)

    # ------------------------------------------------------------ Python-backed commands

    def _register(self, name: str, func: Callable[[Sequence[str]], Any]) -> None:
        """A Tcl command answering {ok value} or {error message}: see tclmilter.tcl for why."""

        def command(*args: str) -> Answer:
            try:
                result = func([from_tcl(a) for a in args])
            except SuspendAtMain:
                return ("suspend", "")
            except TclUsageError as usage:  # (one name per type: compiled, a name has one type)
                return ("error", str(usage), usage.code)
            except MilterError as refused:
                return ("error", str(refused), NONE)
            except Exception as exc:  # noqa: BLE001 - report, never crash the interpreter
                log.exception("internal error in %s", name)
                return ("error", f"internal error: {failure_text(exc)}", NONE)
            return ("ok", "" if result is None else deep_to_tcl(result))

        self._create(name, command)

    def _create(self, name: str, func: Callable[..., Any]) -> None:
        self.tk.createcommand(name, func)
        self._commands.append(name)

    def _context(self, args: Sequence[str]) -> Any:
        return context_cmd.dispatch(self._open_context(args), args[1:])

    def _open_context(self, args: Sequence[str]) -> Context:
        ctx = self.contexts.get(integer(args[0])) if args else None
        if ctx is None:
            raise TclUsageError("context no longer exists")
        return ctx

    def _replacebody(self, args: Sequence[str]) -> None:
        """``$context replacebody data``: the data is fetched as the bytes Tcl keeps its text in.

        Handed over as an argument, tkinter would make text of those bytes and the text would
        have to be made bytes again; fetched as the result of a call, they arrive as bytes.
        """
        ctx = self._open_context(args)
        data = self.tk.call(self._outgoing)
        ctx.replacebody(tcl_body_to_wire(data) if isinstance(data, bytes) else from_tcl(str(data)))

    def _bgerror(self, args: Sequence[str]) -> None:
        """An error of an `after` or `fileevent` handler (prelude.py's bghandle): logged as a
        callback's error is, where Tcl would print it raw on stderr. With a third word, the
        error's message: its handling in the script's interpreter was stopped (the time limit),
        and the errors queued after it are dropped (bghandle's break): said, as Tcl discards them
        itself, and cannot count them."""
        message, info = (list(args) + ["", ""])[:2]
        handled = args[2] if len(args) > 2 else None
        if handled is not None and not message or is_limit_error(message, ()):
            message = self.limit.stopped()
            if self.pycommands.stopped:  # a Python command was running: where it was, too
                info, self.pycommands.stopped = f"{info}\n{self.pycommands.stopped}", ""
        elif not message and self._handler_stopped:
            message = _NOT_RUN
        if handled is not None:
            message = f"{message}, as its bgerror handled the error: {handled}{_DROPPED}"
        self.bgerrors.log(_HANDLER_ERROR, message, info)

    def _limit_echo(self, args: Sequence[str]) -> int:
        """1 when a background error (its message and errorInfo, before bghandle handles it) is
        the time limit's echo of a stop reported by what was stopped, and is not reported again.

        When the limit passes in `vwait` or `update`, Tcl queues "time limit exceeded (while
        waiting for event)" as a background error (limit.LIMIT_ECHO) and the code that waited
        fails with "limit exceeded": a callback's failure is logged then (``echo_due``), and the
        echo, at the next event pass, was a second ERROR line for the same stop; a handler's
        error is queued just after the echo, which is held until the next report says which it
        was. An echo nothing else reports (the limit passed between two handlers of a batch) is
        logged, at the next report or at the end of the pass (_report_errors)."""
        message, info = (list(args) + ["", ""])[:2]
        if message == "time limit exceeded" and info == LIMIT_ECHO:
            if self.limit.echo_due:
                self.limit.echo_due = False
            else:
                self._flush_echo()
                self._echo_held = self.limit.stopped()
            return 1
        if message == WAIT_STOPPED:  # the held echo's stop, reported by the handler it stopped
            self._echo_held = ""
        self._flush_echo()
        if is_limit_error(message, ()):  # a stop reported by a handler stopped inside the wait: no echo
            self.limit.echo_due = False
        return 0

    def _flush_echo(self) -> None:
        """Log the echo held (_limit_echo): nothing else reported its stop."""
        if self._echo_held:
            message, self._echo_held = self._echo_held, ""
            self.bgerrors.log(_HANDLER_ERROR, message, LIMIT_ECHO)

    def _thread_error(self, args: Sequence[str]) -> None:
        """An error in a script that Thread ran with no caller to return it to (an `-async`
        `thread::send`, a thread's own script): tclmilter.tcl's thread_error, Thread's errorproc.
        Thread wrote it on stderr (``Error from thread tid0x...`` and the errorInfo, raw: an MTA's
        text in the message went to the journal as it was, and a failing loop flooded it)."""
        thread, info = (list(args) + ["", ""])[:2]
        what = f"error in thread {escape(thread)} (thread::send -async, or the thread's own script)"
        self.thread_errors.log(what, message_of(info), info)

    def _threads(self, args: Sequence[str]) -> None:
        """The script's first thread:: command: this interpreter becomes the one Thread sends this
        thread's scripts to, unless another holds that place (an error then, never a send that
        reaches the wrong script or freed memory)."""
        threads.started()
        if not _THREAD_HOME:
            _THREAD_HOME.append(self)
        elif _THREAD_HOME[0] is not self:
            generation = _THREAD_HOME[0].milter.generation
            raise TclUsageError(
                "the Thread package cannot be used by this script: Thread sends what threads send to "
                "this thread to the interpreter of the first script in this process that used it "
                f"(generation {generation}) for as long as the process lives; restart pytclmilter to "
                "use threads in this script (with try --compare: try each script alone)")

    @property
    def thread_home(self) -> bool:
        """Thread evaluates what threads send to this thread in this host's script interpreter."""
        return bool(_THREAD_HOME) and _THREAD_HOME[0] is self

    def _priv_started(self, args: Sequence[str]) -> None:
        # (the script can call it too: without its word, each call was an internal error, a traceback logged)
        check_count(args, 1, 1, "::tclmilter::py::privstarted connection")
        conn_id = integer(args[0])
        if conn_id not in self.contexts:  # (the script's own call: each id kept until the process ends)
            raise TclUsageError("context no longer exists")
        self.private.started(conn_id)

    def _exit(self, args: Sequence[str]) -> None:
        code = integer(args[0]) if args else 0
        self.on_exit(code)

    def exit_process(self, code: int) -> None:
        """Tcl's exit: stop serving at once (socket file removed), flush, end the process."""
        self.milter.abort()
        self.flush_channels(ending=True)
        tell_counts(ended_only=False)  # (the script's failing `after` loop's count: cli.main's end is not reached)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)

    # ------------------------------------------------------------ contexts

    def _context_created(self, ctx: Context) -> None:
        name = f"::tclmilter::ctx{ctx.id}"
        # (No limit needed: making a command runs no trace, and the alias is made from the host.)
        self.tk.call("interp", "alias", self.CHILD, name, self.CHILD, "::tclmilter::context", ctx.id)
        ctx.host_data = name  # the context command: the first argument of every callback
        ctx.script_priv = self.private
        ctx.script = self.pycommands
        self.contexts[ctx.id] = ctx

    def _context_closed(self, ctx: Context) -> None:
        self.contexts.pop(ctx.id, None)
        name, ctx.host_data = ctx.host_data, None
        self._limited(lambda: self._forget_context(ctx.id, name))

    def _forget_context(self, conn_id: int, name: str | None) -> None:
        self.private.forget(conn_id)
        if name:
            self.tk.call("interp", "alias", self.CHILD, name, "")

    def _limited(self, run: Callable[[], object]) -> None:
        """The Tcl a context hook runs (the context command deleted, its private data unset) runs
        the script's traces on them (`trace add command $ctx delete ...`): held to what the
        hook has left, as Tcl that Python code runs is (pycommands). The engine holds the hook to
        -calltimeout with the Python limit, which cannot stop Tcl: a trace that looped froze the
        milter for good, its stop included. Stopped, the hook fails with CallbackTimeout."""
        left = PYTHON_LIMIT.remaining()
        if left is None:  # (no limit: -calltimeout 0)
            run()
            return
        now = time.monotonic()
        self.limit.begin_within(now + left, now)
        try:
            run()
        except tkinter.TclError:
            if not self.limit.exceeded:
                raise
        finally:
            self.limit.done()
        if self.limit.exceeded:
            self.limit.reset()
            raise CallbackTimeout(f"callback stopped after {self.milter.call_timeout:g} s (call_timeout), in "
                                  "the script's Tcl code that the context's making or deleting ran (a trace)")

    def error_info(self) -> str:
        """The script's errorInfo as tclsh would show it (TclScript.error_info)."""
        return self.script.error_info()

    # ------------------------------------------------------------ event loop, scripts

    def service_events(self) -> None:
        """Run due Tcl timers, file events and thread messages without blocking.

        With a threaded Tcl every poll is a round trip to Tcl's notifier thread (two thread
        switches, and a wait whenever both CPUs are busy), so it is skipped while the script has
        nothing that could produce an event: most filters never have.
        """
        self._flush_echo()  # (one a callback's `update` or `vwait` took in and left held)
        if self.limit.exceeded:  # a handler was stopped: until reset, the interpreter runs nothing
            self.limit.reset()
            self._report_errors()
        if self._quiet():
            return
        if self.growth.due():  # (quiet: no `after` event, no other thread, nothing to count)
            self.growth.counted(int(self.tk.call("::tclmilter::py::after_count", self.CHILD)), self.thread_count() - 1,
                                self.thread_pools())
        self.limit.begin_handlers()
        try:
            for _ in range(1000):
                if not self.tk.dooneevent(_DONT_WAIT | _ALL_EVENTS):
                    return
                if self.limit.exceeded:  # its error is reported at the next tick, with time to run
                    break
            self.tk.call("::tclmilter::py::poll_next")  # events may be left: look again at the next tick
        finally:
            self.limit.done()
            # A Python command stopped in a handler: Tcl reported it (bgerror), no callback will.
            self.pycommands.stopped = ""

    def _quiet(self) -> bool:
        """Whether the script has nothing that could produce an event (prelude.py's `quiet`).

        Once it had something, the next ticks poll without asking for RECHECK_AFTER seconds or
        RECHECK_SHARE times what asking cost: a poll is all that `quiet` could save, and asking
        lists every pending `after` event. A quiet script is asked at every tick, so the first
        event it schedules fires at the next one.
        """
        now = time.monotonic()
        if now < self._polling_until:
            return False
        spent = time.thread_time()
        if self.tk.call("::tclmilter::py::quiet", self.CHILD, 1 if _THREAD_HOME else 0) in (1, "1"):
            return True
        self._polling_until = now + max(RECHECK_AFTER, RECHECK_SHARE * (time.thread_time() - spent))
        return False

    def _report_errors(self) -> None:
        """Run the idle handlers, Tcl's reports of background errors among them, before any
        timer: a handler that reschedules itself and loops is due again at once, and its report
        (an idle handler) never got a turn, so nothing was ever logged."""
        self._handler_stopped = True
        self.limit.begin_handlers()  # (the script's own `after idle` handlers run here too)
        try:
            for _ in range(100):
                if not self.tk.dooneevent(_DONT_WAIT | _IDLE_EVENTS) or self.limit.exceeded:
                    break
        finally:
            self.limit.done()
            self._handler_stopped = False
            self._flush_echo()

    def set_argv(self, script: str, argv: Sequence[str]) -> None:
        """argv0, argv and argc as tclsh sets them (TclScript.set_argv)."""
        self.script.set_argv(script, argv)

    # ------------------------------------------------------------ run's script, suspended in `milter main`

    def start(self, path: str, within: float = 0.0, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Source the script, suspended in its `milter main` (TclScript.start)."""
        return self.script.start(path, within, stopped)

    def resume(self, result: Answer) -> bool:
        """`milter main` returns ``result`` and the script goes on (TclScript.resume)."""
        return self.script.resume(result)

    def _serve_inside(self, *args: str) -> Answer:
        """`milter main` where Tcl cannot suspend the script: serve in this call, as TclMilter does."""
        if self.loading:
            return ("error", "milter main: called where Tcl cannot suspend the script (from a command "
                             "implemented in C): a reload cannot load it; restart instead", NONE)
        self.served_inside = self.command.main_hook is None
        try:
            return self.command.serve_inside()
        finally:
            self.limit.clear()

    def cancel_script(self, message: str) -> None:
        """Unwind the script's evaluation through any `catch` (TclScript.cancel)."""
        self.script.cancel(message)

    def flush_channels(self, ending: bool) -> None:
        """Write what the script's channels buffer, as Tcl's exit does (TclScript.flush), waiting
        a bounded time for slow readers. Before a fork (not ``ending``): FlushRefused if output
        is queued still, unless a stop ended the wait. Ending: what is left is dropped, with one
        warning for each channel. Once a wait left output queued (or a stop cut it short), the
        flushes after it wait no more: the stop, the exit do not wait twice."""
        wait = 0.0 if self._flush_waited else FLUSH_WAIT
        if not ending:
            left = self.script.flush(False, self.milter.stop_pending, wait)
            self._flush_waited = bool(left)
            if left and not self.milter.stop_pending():
                raise FlushRefused(_unflushed(self.milter.workers, left))
            return
        left = self.script.flush(True, wait=wait)
        self._flush_waited = bool(left)
        for queued in left:
            if queued.channel not in self._dropped:
                self._dropped.add(queued.channel)
                log.warning("%s: %d bytes not written within %g s, dropped as the process ends (its reader "
                            "did not take them)", escape(str(queued)), queued.left, FLUSH_WAIT)

    def close(self) -> None:
        """Delete the script's interpreter (a script waiting in `milter main` with it: the code
        after it never runs) and the Python commands, whose references to this host would keep
        the interpreter alive; the interpreter itself goes with the last reference to the host.
        The thread_home's interpreter stays, script and all, with the process (_THREAD_HOME)."""
        if not self.thread_home:
            self.script.flush_tcl(ending=True)  # its channels are closed with it: without waiting
            self.tk.call("interp", "delete", self.CHILD)
        for name in self._commands:
            self.tk.deletecommand(name)
        self._commands.clear()
        self.milter.tcl_commands.clear()
        self.contexts.clear()


def _unflushed(workers: int, left: Sequence[Queued]) -> str:
    """Why the workers are not forked: what the script's channels still queue (FlushRefused)."""
    held = "; ".join(f"{queued} still holds {queued.left} bytes" for queued in left)
    return (f"--workers {workers} forks the serving processes, but {held} its reader did not take (none "
            f"for {FLUSH_WAIT:g} s, or not all in {FLUSH_MOST:g} s): forked, each worker would write them again. "
            "Flush or close it before "
            "`milter main` (or read the pipe's other end), or serve with --workers 1")
