"""``--workers N``: N processes serving one listening socket, supervised by the parent.

The parent binds the socket (and drops privileges) at ``milter main``, then
forks the workers from that very moment, so each starts with the script's
state as it stood when ``milter main`` was called: its own interpreter, its
own Tcl globals, the same callbacks. A worker that dies is replaced and the
death logged (five a minute at most, then a count; deaths faster than a burst:
replaced one a second, logged once a minute, then a count); a worker that exits with status 0 asked to stop (``milter
stop``), which stops all. SIGTERM, SIGINT and SIGHUP to the parent stop all
gracefully; then ``milter main`` returns in the parent and the script goes on.

SIGUSR1 to the parent reloads (``Hooks.reload``, then :meth:`Supervisor.reload`): the parent
forks a new set of workers from the new script's state, then tells the old set to stop (SIGTERM:
they close their copy of the socket, which the parent and the new set keep open, and finish
their sessions). The parent waits for its children and for SIGUSR1 with ``sigtimedwait``, both
signals blocked, so that neither is lost between two waits.

Every process holds the listening socket, and the kernel goes on queueing
connections until the last one closes it: at a stop the parent and each
worker close theirs first, so new connections are refused at once while open
sessions finish.

A worker must not outlive the parent (it would serve unsupervised and hold the
port, so that a restart cannot bind): the parent keeps the write end of a
pipe, each worker's event loop watches the read end, and its EOF, which the
kernel delivers however the parent died, stops the worker gracefully. Unlike
``prctl(PR_SET_PDEATHSIG)`` this works on any Unix, has no race with a parent
dying before the worker set it up (the EOF stays), and fires on the process's
death, not on that of the thread that forked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import time
from typing import Callable

from .accept import check_fd_limit
from .connspec import parse
from .hooks import Hooks, forget_early_reload, signalled
from .limits import PYTHON_LIMIT
from .listener import Listener, bind
from .signalroles import REPLACED, STOP_SIGNALS, StopTold
from .logline import escape
from .repeats import Every, Repeated, tell_counts
from .settings import Settings

log = logging.getLogger("pytclmilter")

#: A worker a stop signal stopped exits with STOPPED_BY + the signal, as a shell reports one; it
#: is replaced (the supervisor stops its workers with SIGTERM too, and then replaces none). Exit
#: status 0 is `milter stop`, which stops all.
STOPPED_BY = 128
#: How a worker ends a stop cleanly: by a stop signal (the supervisor's SIGTERM), handled or, where
#: serve() could not install a handler, by the default action (os.waitstatus_to_exitcode: minus the
#: signal); or its `milter stop`.
_CLEAN = frozenset({0, *(STOPPED_BY + sig for sig in STOP_SIGNALS), *(-sig for sig in STOP_SIGNALS)})
_RESPAWN_WINDOW = 10.0  # seconds
_RESPAWN_BURST = 5  # deaths within the window before respawning slows down
_DEATHS_WINDOW = 60.0  # seconds in which deaths are logged _RESPAWN_BURST times, or once when faster (_Deaths)
_FORK_TELL_EVERY = 60.0  # seconds between the lines of failed forks
#: A line a worker's `milter stop` writes on the stop pipe (_ask_stop). A script can write there too
#: (/proc/self/fd): what is no such line names no worker, and is only counted.
_ASKER = re.compile(rb"worker [0-9]{1,4} \(pid [0-9]{1,10}\)")
#: Bytes of the stop pipe read at one stop signal (its default capacity): what is left waits for the next.
_ASKED_MAX = 65536
#: Workers named in the line of one stop (_named): as many as one handler ever takes for real.
_ASKERS_SHOWN = 4
_SLOT_SETS = 4  # metrics slots per worker: the set serving, and up to three reloads finishing


#: Serves the inherited socket in a worker process until stopped. Given the socket, a callable
#: that stops all workers (the worker's ``milter stop``), and one to call on the worker's loop
#: once it listens, with a callable that stops this worker alone (see _watch_parent).
#: A worker's serving: the stop signal that ended it, if one did.
Serve = Callable[[Listener, Callable[[], None], Callable[[Callable[[], None]], None]], "signal.Signals | None"]


def run_workers(settings: Settings, supervisor: "Supervisor") -> None:
    """Bind the socket and supervise the workers (which announce it: hooks.listening, once)."""
    listener = bind(parse(settings.connection), settings.backlog, settings.socket_mode, settings.socket_owner)
    check_fd_limit(settings.backlog)
    try:
        supervisor.run(listener)
    finally:
        listener.remove_unix()
        listener.sock.close()


def _pidfd_of(parent: int) -> int | None:
    """In a worker, right after the fork: a pidfd of the supervisor, so that `milter stop`'s
    SIGTERM reaches it or nothing, never a process that took its pid after it died (the
    getppid() check and the kill are two steps). Opened by pid, it is the supervisor's only if
    that is still the parent after the open. None where there are none (Linux before 5.3, another
    Unix): the pid is signalled then, as before."""
    try:
        fd = os.pidfd_open(parent)  # (close-on-exec: a program the script starts gets none)
    except (AttributeError, OSError):
        return None
    if os.getppid() != parent:  # died already: the lifeline stops this worker
        os.close(fd)
        return None
    return fd


def _how(code: int) -> str:
    """How a worker ended, from os.waitstatus_to_exitcode: a signal's number is negative."""
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def _deaths_told(deaths: Repeated, _label: str, count: int) -> None:
    """The count of the deaths no line named, once their window is over (repeats.tell_counts)."""
    how = (f"at most {deaths.whole} lines in {deaths.seconds:g} s" if deaths.whole > 1 else
           f"one line in {deaths.seconds:g} s while they come faster than {_RESPAWN_BURST} in {_RESPAWN_WINDOW:g} s")
    log.error("%d more worker death%s since the last line about them, each replaced (not logged one by one: %s)",
              count, "" if count == 1 else "s", how)


class _Deaths:
    """Worker deaths, each logged, at most _RESPAWN_BURST in _DEATHS_WINDOW seconds; past
    _RESPAWN_BURST in _RESPAWN_WINDOW seconds (a worker that dies at once, the OOM killer under
    load) the respawns slow to one a second, which one line a window says. The deaths past those
    lines are counted, and their count told (repeats.Repeated): a worker that dies on every
    connection, or at every start, makes a few lines a minute, not one a death."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.lines = Repeated(_DEATHS_WINDOW, whole=_RESPAWN_BURST, tell=_deaths_told)
        self.storm = Repeated(_DEATHS_WINDOW, tell=_deaths_told)  # the deaths that slow the respawns

    def died(self, what: str) -> bool:
        """Log the death ``what`` as due; True when respawning must slow down."""
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < _RESPAWN_WINDOW] + [now]
        slow = len(self.times) > _RESPAWN_BURST
        missed = (self.storm if slow else self.lines).due("deaths")
        if missed is not None:
            before = f" ({missed} more since the last line)" if missed else ""
            if slow:
                log.error("%s; %d worker deaths within %g s: starting one a second at most, the deaths logged once "
                          "in %g s%s", what, len(self.times), _RESPAWN_WINDOW, self.storm.seconds, before)
            else:
                log.error("%s; starting a new one%s", what, before)
        return slow


def _named(askers: list[str]) -> str:
    """The workers that asked for a stop, each once and at most _ASKERS_SHOWN of them: a script can
    write well-formed lines to the stop pipe too (64 KiB of them were one line of 3,600 names)."""
    unique = list(dict.fromkeys(askers))
    shown = ", ".join(unique[:_ASKERS_SHOWN])
    more = len(unique) - _ASKERS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


class Supervisor:
    """Forks ``count`` workers running ``serve`` and keeps them running; :meth:`stop` stops all."""

    def __init__(self, count: int, hooks: Hooks, serve: Serve) -> None:
        self.hooks = hooks
        self.serve = serve
        #: Called in a new worker, with its slot (None: all are taken), before it serves; and here
        #: with the slot of one that ended (the metrics count each worker in its slot, and retire a
        #: dead one's).
        self.forked: Callable[[int | None], None] | None = None
        self.reaped: Callable[[int], None] | None = None
        self.count = count
        #: Slots for the workers alive at once: a set serving, and the sets of reloads that finish
        #: their sessions meanwhile (a worker forked when all are taken is not counted).
        self.slots = count * _SLOT_SETS
        self._slot_of: dict[int, int] = {}  # pid -> slot
        self._told_no_slot = False  # logged once, until a new worker is counted again
        self.listener: Listener | None = None  # the socket they serve, given to run()
        self.children: dict[int, tuple[int, int]] = {}  # pid -> (worker number, generation)
        self.generation = 1  # of the workers serving new connections (reload)
        self._gone: dict[int, Callable[[], None]] = {}  # replaced generation -> called when its last worker ended
        # Taken with sigtimedwait in the parent; SIGUSR1 only when the milter can reload (Hooks.reload).
        self._waited = (signal.SIGCHLD,) + ((signal.SIGUSR1,) if hooks.reload is not None else ())
        self.stopping = False
        self._told_again = False  # a stop signal while stopping was logged (_stop_again: once)
        #: The stop's line was logged: by _on_signal, or by the line of a reload's load the stop
        #: abandons (Milter.tell_stop), which logs after this handler ran: ours goes to debug.
        self.stop_told = StopTold()
        #: _on_signal's line while a reload runs (_on_reload), logged once it returned unless the
        #: reload's line told the stop: a stop before its load's watch began abandons it too.
        self._untold: str | None = None
        #: The stop signal that came, if one did: a reload's load under way is abandoned by it
        #: (commands/reloading.py), though this process's handler took it before the load's watch.
        self.stop_signal: signal.Signals | None = None
        #: The workers of the serving set whose stop was not clean (killed, failed, or ended by
        #: overdue.py past the grace): how each ended. The stop then fails, for systemd too
        #: (Milter.run, commands/run.py).
        self.unclean: list[str] = []
        #: The workers already dead, not yet reaped, as the stop began (_dead_now).
        self._dead_at_stop: set[int] = set()
        self.deaths = _Deaths()
        #: Workers of the serving set whose fork failed (EAGAIN, ENOMEM): tried again every second.
        self.unstarted: set[int] = set()
        self._fork_failed = Every(_FORK_TELL_EVERY)  # _spawn's log line
        self.pid = os.getpid()  # for the workers: os.getppid() there may already be another process
        #: In a worker that listens: stops it alone, from any thread (_watch_parent).
        self._stop_alone: Callable[[], object] | None = None
        #: In a worker: a pidfd of the supervisor (_pidfd_of), where the system has them.
        self._parent_fd: int | None = None

    def run(self, listener: Listener) -> None:
        self.listener = listener
        # The workers watch the read end; the write end closes when this process dies.
        self.lifeline, self._lifeline_w = os.pipe()
        # A worker's `milter stop` writes its name here before its SIGTERM: the log names it.
        self._asked_r, self._asked_w = os.pipe()
        for fd in (self._asked_r, self._asked_w):  # (no worker waits on a full one)
            os.set_blocking(fd, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._waited)
        if signal.SIGUSR1 in self._waited:
            forget_early_reload()
        try:
            # Only once our handlers are in place: a SIGTERM right after the listening line must
            # stop cleanly, not end the process by default and leave the socket file behind.
            self.hooks.listening(listener.spec)
            for number in range(1, self.count + 1):
                if not self.stopping:
                    self._spawn(number)
            # Forked, not yet accepting: each does once its loop runs (the connections meanwhile
            # wait in the socket's queue; a stop meanwhile waits for its handlers: _worker).
            # docs/deployment.md says so; a worker that dies before it serves is logged after.
            if not self.stopping:  # (a stop signal may have come before: none was started)
                log.info("%d workers serving %s", self.count, escape(str(self.listener.spec)))  # the script's text
            while self._reap() or (self.unstarted and not self.stopping):
                # A stop signal's handler interrupts the wait and kills the workers: SIGCHLD follows.
                # A second at most: _reap tries the unstarted again, and reaps a worker whose
                # SIGCHLD a thread of the script took (one it started while loading inherited
                # SIGCHLD unblocked: commands/sigmask.py).
                got = signal.sigtimedwait(self._waited, 1.0)
                if got is not None and got.si_signo == signal.SIGUSR1:
                    self._on_reload()
                tell_counts()  # (the deaths' counts, once their window is over)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (self.lifeline, self._lifeline_w, self._asked_r, self._asked_w):
                os.close(fd)
            tell_counts(ended_only=False)
        if self.unclean:
            log.error("all workers stopped, %d not cleanly: %s", len(self.unclean), "; ".join(self.unclean))
        else:
            log.info("all workers stopped")

    def _reap(self) -> bool:
        """Handle the workers that ended; False when none is left."""
        if self.unstarted and not self.stopping:
            self._start_unstarted()
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid in self.children:
                number, generation = self.children.pop(pid)
                slot = self._slot_of.pop(pid, None)
                if slot is not None and self.reaped is not None:
                    self.reaped(slot)
                if generation == self.generation:
                    self._reaped(pid, number, status)
                else:
                    self._replaced_ended(pid, number, generation, status)
        return False

    def _replaced_ended(self, pid: int, number: int, generation: int, status: int) -> None:
        """A worker of a generation a reload replaced ended (it was told to stop)."""
        code = os.waitstatus_to_exitcode(status)
        # (A stop may have come while it finished. Its end is the reload's, not counted as the
        # stop's: one held past the reload's grace may end before the stop and be reaped after.)
        if code not in _CLEAN:
            log.warning("worker %d (pid %d) of generation %d ended with %s while finishing", number, pid,
                        generation, _how(code))
        if not any(g == generation for _, g in self.children.values()):
            gone = self._gone.pop(generation, None)
            if gone is not None:
                gone()

    def reload(self, serve: Serve, generation: int, gone: Callable[[], None]) -> None:
        """Fork a set of workers running ``serve`` (a reloaded milter's), then stop the set serving
        now; ``gone`` is called when its last worker ended. New connections are accepted by the new
        set, or by an old worker until it closed its socket: none is refused meanwhile (the parent
        holds the socket)."""
        old = self.generation
        self.serve, self.generation = serve, generation
        self._gone[old] = gone
        replaced = [pid for pid, (_, g) in self.children.items() if g == old]
        self.unstarted.clear()  # the new set is started whole
        for number in range(1, self.count + 1):
            if not self.stopping:
                self._spawn(number)
        for pid in replaced:
            try:
                os.kill(pid, REPLACED)
            except ProcessLookupError:
                pass
        if not replaced:
            del self._gone[old]
            gone()

    def _on_reload(self) -> None:
        reload = self.hooks.reload
        self._untold = ""  # (before the check: a stop after it is the reload's to tell)
        try:
            if self.stopping:
                log.warning("received SIGUSR1 while stopping: no reload")
                return
            if reload is None:
                return
            try:
                reload()
            except Exception:  # noqa: BLE001 - a failed reload must not stop serving
                log.exception("reload failed; the milter serves on unchanged")
        finally:
            line, self._untold = self._untold, None
            if line:
                self.stop_told.tell(line)

    def _reaped(self, pid: int, number: int, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            self._ended_at_stop(pid, number, code)
            return
        if code == 0:
            # (`milter stop` tells first, _ask_stop: this is the script's `exit 0` in a worker)
            log.info("worker %d (pid %d) ended with exit status 0 (the script's exit 0): stopping all workers",
                     number, pid)
            self.stop()
            return
        if code - STOPPED_BY in STOP_SIGNALS:  # sent to it alone (an admin's kill, a pkill -f)
            log.warning("worker %d (pid %d) was stopped by %s sent to it; starting a new one (to stop the "
                        "milter, signal the supervisor, pid %d)", number, pid, signal.Signals(code - STOPPED_BY).name,
                        self.pid)
            self._spawn(number)
            return
        if self.deaths.died(f"worker {number} (pid {pid}) died ({_how(code)})"):
            time.sleep(1.0)  # a worker that dies at once must not turn into a fork loop
        if not self.stopping:
            self._spawn(number)

    def _ended_at_stop(self, pid: int, number: int, code: int) -> None:
        """A worker of the serving set ended while all stop: unclean, unless as a stop ends it;
        one dead before the stop began died while serving, a death as any other (logged)."""
        if code in _CLEAN:
            return
        if pid in self._dead_at_stop:
            log.error("worker %d (pid %d) died (%s) before the stop; not replaced", number, pid, _how(code))
            return
        self.unclean.append(f"worker {number} (pid {pid}) {_how(code)}")

    def _dead_now(self) -> set[int]:
        """The workers that have ended and are not reaped yet (looked at, left to _reap): deaths
        while serving. The supervisor reaps nothing while it loads a reload, so a death then
        was reaped only once a stop had begun, and failed the stop (exit 1) by its timing alone."""
        dead = set()
        for pid in self.children:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    dead.add(pid)
            except ChildProcessError:  # (reaped by a thread of the script's: _reap forgets it)
                continue
        return dead

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = self.stop_signal or signal.Signals(signum)
        askers, junk = self._askers() if signum == signal.SIGTERM else ([], 0)
        if self.stopping:  # every worker has been told already (stop): nothing more to do
            self._stop_again(signal.Signals(signum), askers)
            return
        why = f"{_named(askers)} called milter stop" if askers else f"received {signal.Signals(signum).name}"
        if junk:
            why += f" (and {junk} bytes on the stop pipe that are no worker's name, ignored)"
        line = f"{why}: stopping {len(self.children)} workers"
        if self._untold is None:
            self.stop_told.tell(line)
        else:  # a reload runs: its load is abandoned and its line tells the stop, or ours once it returns
            self._untold = line
        signalled(self.hooks, signal.Signals(signum))
        self.stop()

    def _stop_again(self, sig: signal.Signals, askers: list[str]) -> None:
        """A stop signal while all stop: an admin's (a second Ctrl-C, a `kill` that seemed slow) is
        told once, what it does; a worker's `milter stop` meanwhile is nothing to tell."""
        if askers or self._told_again:
            log.debug("received %s while stopping%s: the stop goes on", sig.name,
                      f" ({_named(askers)} called milter stop)" if askers else "")
            return
        self._told_again = True
        left = len(self.children)
        log.info("received %s while stopping: the stop goes on (%s still stopping keep%s the rest of the grace)",
                 sig.name, "the worker" if left == 1 else f"the {left} workers", "s" if left == 1 else "")

    def stop(self) -> None:
        """Stop every worker, each told once: one forked later is told by _fork. (A second
        stop signal sent them all another SIGTERM, and each logged a second stop.)"""
        if self.stopping:
            return
        self._dead_at_stop = self._dead_now()
        self.stopping = True
        # Our copy of the listening socket first: the workers close theirs as they stop.
        if self.listener is not None:
            self.listener.remove_unix()
            self.listener.sock.close()
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _start_unstarted(self) -> None:
        """Try again to fork the workers whose fork failed (_spawn)."""
        for number in sorted(self.unstarted):
            if self.stopping:
                return
            self.unstarted.discard(number)
            self._spawn(number)
            if number not in self.unstarted:
                log.info("worker %d started, after its fork had failed", number)

    def _spawn(self, number: int) -> None:
        try:
            self._fork(number)
        except OSError as exc:  # no process or memory left: serve with the others, try again
            self.unstarted.add(number)
            if self._fork_failed.due():
                log.error("cannot start worker %d: fork: %s; serving with %d workers, trying again every second "
                          "(logged at most once a minute)", number, exc.strerror, len(self.children))

    def _fork(self, number: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # A load (a reload's, or a Python command the script ran) started it, and this process
        # runs no callback: fork from a process with no thread of ours (docs/deployment.md).
        PYTHON_LIMIT.end_watchdog()
        # A stop signal waits until the new worker is in self.children (a stop in between would
        # miss it and leave it serving) and, in the worker, until serve() has installed its
        # handlers (_worker: a stop, never the default action's death). REPLACED
        # waits in the worker until its server takes it (server.py): a reload right after this
        # fork tells the worker before then, and the signal's default action ended it.
        slot = self._free_slot()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS + (REPLACED,))
        try:
            pid = os.fork()
            if pid == 0:
                self._worker(number, slot)  # never returns
            self.children[pid] = (number, self.generation)
            if slot is not None:
                self._slot_of[pid] = slot
            if self.stopping:  # a stop came before the fork: this one was not told
                os.kill(pid, signal.SIGTERM)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask - set(STOP_SIGNALS))

    def _free_slot(self) -> int | None:
        free = sorted(set(range(self.slots)) - set(self._slot_of.values()))
        if free:
            self._told_no_slot = False
            return free[0]
        if self.forked is not None and not self._told_no_slot:
            self._told_no_slot = True
            log.warning("the metrics do not count new workers: all %d slots are held by workers of "
                        "earlier reloads still finishing their sessions", self.slots)
        return None

    def _worker(self, number: int, slot: int | None) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if signal.SIGUSR1 in self._waited:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a reload is the supervisor's
        # The stop signals stay blocked (since _fork) until serve() has installed its handlers
        # (server.py), which then take one sent meanwhile: unblocked here, with the default action,
        # a SIGTERM to a worker just forked ended it at once, a "death" the supervisor replaced.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._waited)
        os.close(self._lifeline_w)  # else the pipe would never reach EOF
        os.close(self._asked_r)
        parent = self.pid
        self._parent_fd = _pidfd_of(parent)
        assert self.listener is not None  # forked from run()
        code = 0
        try:
            log.debug("worker %d (pid %d) serving", number, os.getpid())
            listener = Listener(self.listener.sock, self.listener.spec)  # the parent removes the file
            if self.forked is not None:
                self.forked(slot)
            stopped_by = self.serve(listener, lambda: self._ask_stop(number, parent),
                                    lambda stop: self._watch_parent(number, parent, stop))
            code = 0 if stopped_by is None else STOPPED_BY + stopped_by
        except BaseException:  # noqa: BLE001 - a worker must end here, whatever happened
            log.exception("worker %d failed", number)
            code = 70
        finally:
            tell_counts(ended_only=False)  # (serving tells its own as it stops, not when it failed)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _ask_stop(self, number: int, parent: int) -> None:
        """In a worker: `milter stop` stops all, by the parent's SIGTERM, which the log then
        blames on this worker, not on a SIGTERM from outside (systemd, an admin). Once the parent
        died (this worker is init's or a subreaper's child now), its pid may be another process's,
        which must not get the SIGTERM: this worker stops alone, as the lifeline would stop it
        (a callback that calls `milter stop` holds the loop that reads the lifeline)."""
        if os.getppid() != parent:
            self._alone(number, parent)
            return
        try:
            os.write(self._asked_w, f"worker {number} (pid {os.getpid()})\n".encode())
        except OSError:  # (full: 64 KiB of stops not read yet; the line says SIGTERM then)
            pass
        try:
            if self._parent_fd is not None:  # the supervisor itself, not whoever has its pid by now
                signal.pidfd_send_signal(self._parent_fd, signal.SIGTERM)
            else:
                os.kill(parent, signal.SIGTERM)
        except ProcessLookupError:  # it died since the check
            self._alone(number, parent)

    def _alone(self, number: int, parent: int) -> None:
        """In a worker whose supervisor died: its `milter stop` stops this worker alone."""
        log.warning("worker %d called milter stop, but the supervisor (pid %d) died: stopping this worker alone",
                    number, parent)
        if self._stop_alone is not None:  # (None before it listens: the lifeline stops it then)
            self._stop_alone()

    def _askers(self) -> tuple[list[str], int]:
        """Which workers asked for the stop being handled (_ask_stop; one handler may run for two
        workers' signals), and the count of the other bytes read from the pipe (_ASKER)."""
        try:
            asked = os.read(self._asked_r, _ASKED_MAX)
        except OSError:  # (nothing there: BlockingIOError)
            return [], 0
        lines = asked.split(b"\n")[:-1]
        askers = [line.decode("ascii") for line in lines if _ASKER.fullmatch(line)]
        return askers, len(asked) - sum(len(name) + 1 for name in askers)

    def _watch_parent(self, number: int, parent: int, stop: Callable[[], None]) -> None:
        """In a worker, once its server listens (on its loop): stop gracefully when the parent dies.

        ``stop`` stops this worker alone: the parent's pid may be another process's by now."""
        loop = asyncio.get_running_loop()
        self._stop_alone = lambda: loop.call_soon_threadsafe(stop)  # (_ask_stop: from the script's thread too)

        def gone() -> None:
            loop.remove_reader(self.lifeline)
            log.warning("worker %d: the supervisor (pid %d) died: stopping", number, parent)
            stop()

        loop.add_reader(self.lifeline, gone)
