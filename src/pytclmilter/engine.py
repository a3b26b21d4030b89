"""One connection's logic: core events -> callback chain -> replies.

Sits between the sans-I/O core and the socket: the server hands it bytes and
gives it a ``write`` and a ``close`` function. Callbacks that are plain
functions (every Tcl callback) run synchronously inside ``data_received``, so
a whole pipelined batch of packets is answered with one write; a callback
that returns an awaitable pauses this connection only, and the rest of the
batch is handled when it completes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Final, Protocol

from .callbacks import Callback, Registry
from .context import Context
from .hooks import Hooks
from .limits import PYTHON_LIMIT, CallbackTimeout, internals_dropped
from .logline import (SHOWN, Repeated, SameTrace, as_field, clip, escape, escape_lines, failure_text, fault_kind,
                      place_of, quoted, said)
from .logline import info as log_info
from .meter import Meter
# Imported by name, not as a module: compiled, `events.Name` is a module attribute look-up per use.
from .protocol.events import (
    Abort, Accept, Body, Closed, Connect, Continue, Discard, EndOfMessage, EnvFrom, EnvRcpt, Event, Header,
    Helo, Macro, OptionNegotiation, OptionNegotiationReply, Progress, Reject, Reply, ReplyCode, Skip, Tempfail,
    Unknown,
)
from .protocol.constants import Action, Family, MacroStage, Proto, flag_names
from .protocol.errors import LocalProtocolError, RemoteProtocolError
from .protocol.negotiation import Negotiated, check_offer, negotiate
from .protocol.session import FilterSession, NeedData
from .protocol.table import COMMANDS
from .settings import Settings
from .status import Status, parse_status

log: Final = logging.getLogger("pytclmilter")
_NO_HOOK: Final = Hooks().context_created  # (no limit, nor its watchdog, for the hook nobody gave)

_monotonic: Final = time.monotonic  # compiled, `time.monotonic` is two look-ups per call
#: Result types that are certainly not awaitable (skips inspect.isawaitable on the hot path).
_PLAIN: Final = frozenset({type(None), str, int, Status})
#: A callback stopped by its limit comes back within 0.1 s of it (the Python watchdog's interval;
#: Tcl's deadline and asyncio's are exact). One that fails later than this past its limit was in
#: code the limit cannot interrupt, and its real time is logged too.
_LATE_STOP: Final = 0.5
#: Abort and close runs that may wait behind a running async abort or close callback: a peer
#: sending MAIL and ABORT in a loop queued one more each (memory without bound, and a chain of
#: tasks whose cancellation at stop overflowed the stack). At this many, the connection's further
#: commands wait until one has run.
_QUIET_QUEUE: Final = 8
#: Seconds an async callback cancelled by its limit (or by its connection's end) may take to end
#: (its ``finally`` clauses) before it is abandoned: one that swallows CancelledError would
#: otherwise hold its connection, or the milter's stop, as long as it likes.
UNWIND: Final = 1.0
_FOREVER: Final = float("inf")
#: Seconds each callback gets once a stop's grace is over (the abort and close callbacks of the
#: sessions it cuts), whatever call_timeout says.
LAST_WORDS: Final = 0.05
#: Bytes of the MTA's that may wait unhandled while an async callback runs before its connection
#: is no longer read (one read more at most): reading on notices at once an MTA that closes or
#: resets the connection meanwhile (one that gave up waiting), and an MTA waiting for the reply
#: sends nothing more.
_WATCHED: Final = 4096
#: Abandoned callbacks still running (one that ignored GeneratorExit too): held here so that they
#: are counted, and dropped as each ends. Each keeps its memory until then.
ABANDONED: Final[set["asyncio.Task[Any]"]] = set()
#: Why the connection of an abandoned callback was closed (its log line and metrics).
ABANDONED_END: Final = "callback ignored its cancellation"

# What is decided (ConnectionEngine._decided; see the class docstring). Plain ints: tested per event.
_OPEN: Final = 0
_BODY_SKIPPED: Final = 1
_DEFERRED: Final = 2
_MESSAGE: Final = 3
_CONNECTION: Final = 4

_CONTINUE: Final = Continue()
_VERDICT: Final = {s: s.name.lower() for s in Status}  # enum .name is a slow property
#: Answers at end of message that let the message through, so its modifications go with them
#: (a SKIP or NOREPLY there goes out as continue: the MTA accepts the message all the same).
_TAKES_ACTIONS: Final = frozenset({Continue, Accept, Discard})
_FINAL_OF: Final = {
    Status.CONTINUE: Continue(),
    Status.ACCEPT: Accept(),
    Status.DISCARD: Discard(),
    Status.SKIP: Skip(),
}

# The callback arguments of each event: typed functions, not lambdas (compiled, a lambda's
# parameter is untyped and every e.name a getattr by name; typed, it is a slot read).
def _no_args(e: Event) -> tuple[Any, ...]:
    return ()


def _connect_args(e: Connect) -> tuple[Any, ...]:
    return (e.hostname, address_info(e))


def _helo_args(e: Helo) -> tuple[Any, ...]:
    return (e.name,)


def _envelope_args(e: EnvFrom | EnvRcpt) -> tuple[Any, ...]:
    return (e.args,)


def _unknown_args(e: Unknown) -> tuple[Any, ...]:
    return (e.line,)


def _header_args(e: Header) -> tuple[Any, ...]:
    return (e.name, e.value)


def _body_args(e: Body) -> tuple[Any, ...]:
    return (e.chunk,)


#: Callback event name -> function of the event giving the callback arguments, for the events
#: whose callbacks answer the MTA (negotiate, abort and close are _handle_control's).
_ARG_FUNCS: Final[dict[str, Callable[[Any], tuple[Any, ...]]]] = {
    "connect": _connect_args,
    "helo": _helo_args,
    "envfrom": _envelope_args,
    "envrcpt": _envelope_args,
    "data": _no_args,
    "unknown": _unknown_args,
    "header": _header_args,
    "eoh": _no_args,
    "body": _body_args,
    "eom": _no_args,
}
#: Event type -> (callback event name, argument function), by the command table.
_ARGS: Final[dict[type, tuple[str, Callable[[Any], tuple[Any, ...]]]]] = {
    c.event: (c.callback, _ARG_FUNCS[c.callback]) for c in COMMANDS if c.callback in _ARG_FUNCS
}
#: negotiate() results by (registry generation, offer, size limit, macro lists): see _negotiated.
_NEGOTIATED: Final[dict[tuple[Any, ...], Negotiated]] = {}

_MESSAGE_EVENTS: Final = frozenset(c.event for c in COMMANDS if c.message)
_SKIP: Final = int(Proto.SKIP)

#: How sessions normally end; other reasons (timeout, protocol error, stop) are worth an info line.
_ROUTINE_ENDS: Final = frozenset({"eof", "quit"})
#: Of the lines for faults that end a connection (a garbled or truncated packet, a reset), the
#: first FAULT_LINES of each kind in FAULT_WINDOW seconds are logged; the others are counted, and
#: the count told in one line: whoever can reach the socket can open thousands a second.
FAULT_LINES: Final = 10
FAULT_WINDOW: Final = 60.0



def address_info(e: Connect) -> dict[str, Any]:
    """The client address as TclMilter's addrInfo dict: family, address, port.

    A unix socket's address has no port (libmilter hands its filters a sockaddr_un), so its port
    is 0 whatever the CONNECT carried."""
    port = e.port if e.family is Family.INET or e.family is Family.INET6 else 0
    return {"family": _family_name(e.family), "address": e.address, "port": port}


def _family_name(family: Family) -> str:
    # Compared by identity: an enum member's .value and hash() are Python-level code.
    if family is Family.INET:
        return "inet"
    if family is Family.INET6:
        return "inet6"
    if family is Family.UNIX:
        return "unix"
    return "unknown"


class Link(Protocol):
    """What the engine needs from its connection; the server provides it."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def touch(self) -> None: ...
    @property
    def blocked(self) -> bool: ...
    @property
    def peer(self) -> str:
        """Who is at the other end, for a warning that must say who sent garbage."""
    @property
    def proxied(self) -> bool:
        """The connection began with a PROXY protocol header (HAProxy's send-proxy)."""


@dataclass
class Stats:
    """Verdict counts since start, for the log summary; reloads (with --workers, the supervisor's)."""

    verdicts: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    reloads_ok: int = 0
    reloads_failed: int = 0
    #: Reloads a stop signal abandoned while they loaded (commands/reloading.py): no failure of the script.
    reloads_abandoned: int = 0
    #: --workers: the workers whose stop was not clean (workers.Supervisor.unclean): ``run`` exits 1.
    workers_unclean: int = 0
    #: Of the script serving new connections: 1 at start, one more at every reload that loads.
    generation: int = 1

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.verdicts.items())]
        return ", ".join(parts + [f"callback errors={self.errors}"])


def _answer_text(reply: OptionNegotiationReply) -> str:
    """The option negotiation's answer in the debug line: its flags by name (docs/protocol.md
    §4.2-§4.3), each number in hex too; the macro lists of a negotiate callback's setsymlist."""
    actions, protocol = Action(reply.actions), Proto(reply.protocol)
    text = (f"v{reply.version} actions {'|'.join(flag_names(actions)) or 'none'} (0x{reply.actions:x}) "
            f"protocol {'|'.join(flag_names(protocol)) or 'none'} (0x{reply.protocol:x})")
    lists = [f"{MacroStage(stage).name.lower()}={as_field(names)}" for stage, names in reply.macros.items()]
    return " ".join([text, "macro lists", *lists]) if lists else text


def _faults_told(faults: Repeated, kind: str, count: int) -> None:
    log.warning("%d more connection%s closed for the same reason, not logged one by one (the first %d in %g s "
                "are): %s", count, "" if count == 1 else "s", faults.whole, faults.seconds, escape(kind))


def _proxied_told(_proxied: Repeated, _label: str, count: int) -> None:
    """The count of a minute's PROXY-header connections, when none came after it to carry it
    (HAProxy's send-proxy fixed): else the last minute's were never told."""
    log.warning("%d more connection%s that began with a PROXY header closed with a protocol error since the last "
                "such line (said at most once a minute)", count, "" if count == 1 else "s")


class Shared:
    """What every connection of one milter reads: its settings, callbacks, hooks and counts.

    ``settings`` is replaced whole when an option changes (the value itself never changes), and
    each connection reads it here at every use: an option set while serving (``milter configure
    -onerror`` in a callback) applies at once, to the connections already open too.

    A reload makes a new one (another milter's) for the connections accepted from then on; those
    open keep theirs. ``generation`` tells them apart in the verdict lines.

    ``meter`` counts for ``--metrics`` (meter.py); None without, and each connection reads it once.
    ``traces``: the failed callbacks' traces logged lately, so that the same one is logged once.
    ``faults``: the lines of connections ended by a fault, by kind (:meth:`fault_due`); a reload
    hands it on, as the meter. ``proxied``: the line of those that began with a PROXY header.
    ``stop_by``: once a stop is under way, or a reload replaced this generation, when the grace of
    its open sessions ends (``time.monotonic()``): no callback runs past it (:meth:`call_limit`);
    infinity while serving. ``stop_why`` says, for a log line, which grace that is.
    """

    __slots__ = ("settings", "registry", "hooks", "stats", "generation", "meter", "traces", "faults", "proxied",
                 "stop_by", "stop_why")

    def __init__(self, settings: Settings, registry: Registry, hooks: Hooks, stats: Stats) -> None:
        self.settings = settings
        self.registry = registry
        self.hooks = hooks
        self.stats = stats
        self.generation = 1
        self.meter: Meter | None = None
        self.traces = SameTrace()
        self.faults = Repeated(FAULT_WINDOW, whole=FAULT_LINES, tell=_faults_told)
        self.proxied = Repeated(FAULT_WINDOW, tell=_proxied_told)  # the connections that began with a PROXY header
        self.stop_by = _FOREVER
        self.stop_why = ""

    def fault_due(self, kind: str) -> bool:
        """Whether to log the line of a connection ended by a fault of ``kind`` (fault_kind of its
        message): not when FAULT_LINES of that kind were logged in the last FAULT_WINDOW seconds;
        it is counted then, told by logline.tell_counts once the window is over (or by this method,
        when the next one comes first). A peer opening bad connections as fast as it can must not
        decide the log's size."""
        faults = self.faults
        missed = faults.due(kind)
        if missed:
            _faults_told(faults, kind, missed)
        return missed is not None

    def hold_to(self, by: float, why: str) -> None:
        """No callback runs past ``by`` (monotonic), the end of the grace ``why`` names ("the
        stop's 30 s grace"); an earlier end given before holds."""
        if by < self.stop_by:
            self.stop_by, self.stop_why = by, why

    def graced(self, started: float) -> bool:
        """Whether the end of a stop's or reload's grace, not call_timeout, is what limited a
        callback started at ``started``."""
        limit = self.settings.call_timeout
        return self.stop_by != _FOREVER and not (limit and started + limit <= self.stop_by)

    def overrun(self, started: float, now: float, what: str) -> str:
        """Why a callback started at ``started`` was stopped ``now``, for its log line: ``what``
        (the limit's name), or the end of a stop's or reload's grace when that came first."""
        limit = self.settings.call_timeout
        if not self.graced(started):
            return f"stopped after {limit:g} s ({what})"
        allowed = f"{what} is {limit:g} s" if limit else f"no {what}"
        return f"stopped after {now - started:.1f} s: {self.stop_why} was over ({allowed})"

    def call_limit(self, now: float = -1.0) -> float:
        """How long a callback starting ``now`` (-1: now) may run (0: no limit): call_timeout, and
        once a stop is under way (or a reload replaced this generation) no longer than its grace,
        then LAST_WORDS (the abort and close callbacks of the sessions it cuts): an answer after
        that reaches no MTA, and a stuck callback would hold the stop by as much as call_timeout
        again, per callback. The clock is read only then: the per-event path reads none."""
        limit = self.settings.call_timeout
        if self.stop_by == _FOREVER:
            return limit
        left = max(self.stop_by - (_monotonic() if now < 0 else now), LAST_WORDS)
        return min(limit, left) if limit else left


class CallbackError(Exception):
    """A callback failed; ``detail`` is what to log (a traceback or Tcl's errorInfo)."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class _Exited(Exception):
    """SystemExit or KeyboardInterrupt raised in an async callback, carried as an Exception: asyncio
    re-raises those two out of the event loop from the task they end, which would end the milter
    for one callback's ``sys.exit()`` (or a library's)."""

    def __init__(self, original: SystemExit | KeyboardInterrupt) -> None:
        super().__init__(str(original))
        self.original = original


async def _in_turn(awaitables: list[Awaitable[Status]]) -> None:
    """Await each in turn (abort and close callbacks: their failures are logged by _awaited)."""
    for awaitable in awaitables:
        await awaitable


def abandon(task: "asyncio.Task[Any]", awaitable: Awaitable[Any]) -> None:
    """Let go of a cancelled callback that goes on: the coroutine it returned is closed
    (GeneratorExit at its await: its ``finally`` clauses run, and an ``except CancelledError``
    does not catch it), and the task cancelled once more, which ends on a closed one. One that
    survives even that is kept in ABANDONED, counted, until it ends. (The callback's coroutine,
    not the task's: that one is compiled by mypyc, and a Task stepping a compiled coroutine
    closed under it crashed the process.)"""
    close = getattr(awaitable, "close", None)
    survives = close is None
    if close is not None:
        try:
            close()
        except RuntimeError:  # "coroutine ignored GeneratorExit": it awaits on
            survives = True
    task.cancel()
    if survives:
        ABANDONED.add(task)
    task.add_done_callback(_forget)


def _forget(task: "asyncio.Task[Any]") -> None:
    ABANDONED.discard(task)
    _consume(task)


def _consume(task: "asyncio.Task[Any]") -> None:
    """Read a finished callback task's outcome, which nobody answers with any more (asyncio would
    log an exception never retrieved)."""
    if not task.cancelled():
        task.exception()


async def _contained(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _Exited(exc) from None


class ConnectionEngine:
    """Drives one FilterSession with the milter's callbacks.

    What the callbacks have decided so far is one value, ``_decided``:

    * ``_OPEN``: nothing; every event's callbacks run.
    * ``_BODY_SKIPPED``: a callback answered SKIP; the body chunks the MTA still sends and waits
      on are answered continue without callbacks (an MTA without SMFIP_SKIP keeps sending them).
    * ``_DEFERRED``: an event the MTA does not wait on (a header under NR_HDR, the chunk an EOM
      carries) got a verdict; ``_deferred``, from stage ``_deferred_stage``, answers the next
      message event the MTA waits on. No callbacks run meanwhile.
    * ``_MESSAGE``: the message has its verdict; its remaining events are answered continue
      without callbacks (an unknown command is the connection's, not the message's: its
      callbacks still run).
    * ``_CONNECTION``: connect or helo had a verdict; the same for the rest of the SMTP session.

    Transitions, each in one method: :meth:`_decide` (an answer other than continue: SKIP ->
    body skipped, at connect or helo -> connection, at a message stage -> message; a recipient's
    or an unknown command's verdict concerns that command only, but a discard at RCPT the
    message), :meth:`_defer` (open or body skipped -> deferred), :meth:`_new_message` (MAIL's
    macros or MAIL, HELO, ABORT, end of message: back to open unless the connection is decided), :meth:`_new_session`
    (CONNECT, QUIT_NC: open).

    Besides: ``_busy`` (an async callback runs, or ``_held``: _QUIET_QUEUE abort or close runs
    wait behind an async one; this connection's further events wait, its socket is not read)
    and ``closed`` (the connection is over: nothing more is done).
    Callbacks are called in one place, :meth:`_call`.
    """

    __slots__ = ("shared", "registry", "session", "ctx", "name", "link", "_out", "_busy", "_pending", "_decided",
                 "_deferred", "_deferred_stage", "_quiet", "_queued", "_held", "_unwinding", "_abandoned", "closed", "client", "sender", "debug", "meter",
                 "_counted", "_due", "_cut", "_mail_macros", "calling")

    def __init__(self, shared: Shared, conn_id: int, link: "Link") -> None:
        self.shared = shared
        self.registry: Registry = shared.registry
        self.session = FilterSession(emit_macros=False)
        self.ctx = Context(conn_id, self.session.macros, self._progress, self.session)
        self.name = self.ctx.name
        self.link = link
        self._out: list[bytes] = []
        self._busy = False
        self._pending: asyncio.Future[None] | None = None  # with _busy: the async chain's task
        self._quiet: asyncio.Future[None] | None = None  # async abort or close callbacks still running
        self._queued = 0  # abort and close runs waiting behind _quiet (_QUIET_QUEUE)
        self._held = False  # _busy because _queued reached _QUIET_QUEUE
        #: An async callback stopped by its limit and answered, still ending (_settle).
        self._unwinding: tuple[str, Callback, asyncio.Task[Any], Awaitable[Any], str] | None = None
        self._abandoned = False  # a callback of this connection ignored its cancellation: it closes
        self._counted = False  # no closed line: its fault was counted, not logged (fault_due), or a PROXY line said it
        self._due = _FOREVER  # when the async callback awaited now reaches its own limit (see due)
        self._cut = ""  # the stage of the async callback the connection's end cancelled (_finish)
        #: The callback running now, until it returns (what holds a stop past its grace: overdue.py).
        self.calling: Callback | None = None
        self._decided = _OPEN
        self._deferred = Status.CONTINUE  # with _DEFERRED: the verdict waiting for a reply
        self._deferred_stage = ""
        self._mail_macros = 0  # the session's mail_macros when the last message began
        self.closed = False
        self.client = ""
        self.sender = ""
        # Asked once: a connection lasts one SMTP session, and each isEnabledFor is an
        # interpreted call; a level set meanwhile applies from the next connection.
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.meter = meter = shared.meter
        if meter is not None:
            meter.opened()
        self._hook("context_created", shared.hooks.context_created)

    def _hook(self, name: str, hook: Callable[[Context], None]) -> None:
        """A host's per-connection hook (Hooks): one that raises is logged, and the connection
        goes on (its callbacks run; one that needed the hook fails and answers on_error). Left
        to propagate, it left the MTA waiting with the socket open (context_created) or the
        connection half torn down (context_closed), logged by asyncio only, unescaped.

        Held to call_timeout like a plain Python callback (on the main thread): it runs on the
        serving loop, and one that hung held every connection, for ever."""
        now = _monotonic()
        held = hook is not _NO_HOOK and PYTHON_LIMIT.begin(self.shared.call_limit(now), now)
        try:
            try:
                hook(self.ctx)
            finally:
                if held:
                    PYTHON_LIMIT.stop()
        # A host's bug must not hang or leak the connection, nor end the milter with a sys.exit()
        # or any BaseException (CallbackTimeout, a library's own class beside Exception).
        except BaseException as exc:  # noqa: BLE001
            log.error("%s: the %s hook %s failed (%s):\n%s", self.name, name,
                      escape(getattr(hook, "__qualname__", repr(hook))), escape(failure_text(exc)),
                      escape_lines(_traceback(exc)))

    @property
    def busy(self) -> bool:
        """An async callback is running for this connection."""
        return self._busy

    @property
    def due(self) -> float:
        """When the async callback running now reaches its own time limit (``time.monotonic()``;
        infinity: none runs, or it has none): the server lets one due by a grace's end be
        stopped by it, answered and logged, before it cuts the connection (server._cut)."""
        return self._due

    @property
    def ending(self) -> "asyncio.Future[None] | None":
        """Once closed: what its abort and close callbacks, then its context's end, still wait for
        (an async callback cut by the close, an async abort callback); None or done: nothing."""
        return self._quiet if self.closed else None

    # ------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.session.receive_data(data)
        if not self._busy:
            self._pump()
        elif self.session.buffered > _WATCHED:
            self.link.pause_reading()

    def connection_lost(self, reason: str = "eof") -> None:
        """The socket is gone (EOF, error, timeout, stop): abort and close callbacks, once."""
        if self.closed:
            return
        if reason == "eof" and not self._busy:
            self.session.receive_data(b"")
            self._pump()
            return
        pending = self._pending
        if self._busy and pending is not None and not pending.done():
            self._cut = self.ctx.stage  # ("" once answered: stopped by its limit, still ending)
            # Cut while an async callback runs (the MTA closed or reset the connection, which
            # is read meanwhile, or a stop's or a reload's grace ran out): it is cancelled, and
            # the abort and close callbacks and the context's end come after it has ended, as
            # after an async abort callback: not beside it, on a context ended.
            # Cancelled once its task has had its first turn: one cut in the turn that made it
            # (a write of that turn found the peer gone) never ran, and Python warned on stderr
            # that its coroutines were "never awaited"; now it is cancelled at its first await.
            pending.get_loop().call_soon(pending.cancel)
            self._quiet = pending
        for event in self.session.teardown(reason):
            self._handle(event)
        self._finish(reason)

    def resume(self) -> None:
        """The peer reads its replies again: go on with the commands already received."""
        if not self._busy and not self.closed:
            self._pump()

    def _pump(self) -> None:
        while not self._busy and not self.closed:
            if len(self._out) >= 64:  # a long pipelined batch: hand it on, and stop if the peer lags
                self._flush()
                if self.link.blocked:
                    return
            try:
                event = self.session.next_event()
            except RemoteProtocolError as exc:
                self._protocol_error(str(exc))
                if self.meter is not None:
                    self.meter.protocol_error()
                self._flush()
                self.connection_lost("protocol error")
                return
            if isinstance(event, NeedData):
                if self.session.ended is not None:  # QUIT or EOF after QUIT_NC: no close event comes
                    self._finish(self.session.ended)
                    return
                break
            self._handle(event)
        self._flush()

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self.link.write(data)

    # ------------------------------------------------------------ events

    def _handle(self, event: Event) -> None:
        if self.session.mail_macros != self._mail_macros:
            # MAIL's macros came: a new message, whether its MAIL comes (it may be skipped) or
            # not, and whatever ended the last one (Sendmail may send no ABORT for it).
            self._mail_macros = self.session.mail_macros
            self._new_message()
        t = type(event)
        spec = _ARGS.get(t)
        if spec is None:
            self._handle_control(event)
            return
        name, args_of = spec
        # type(event), not t: mypy narrows event by this test (compiled, both are a pointer compare).
        if type(event) is EnvFrom:
            self._new_message()
            self.sender = event.args[0] if event.args else ""
        elif type(event) is Helo:
            # HELO/EHLO ends any transaction. After a verdict at MAIL (or later) the session is
            # back in HELO, so Postfix's ABORT before it is ignored and Sendmail sends none:
            # without this the helo callbacks of a second EHLO never ran.
            self._new_message()
            self.sender = ""
        elif type(event) is Connect:
            self._new_session()
            self.client = f"{event.hostname}[{event.address}]"
        if not event.needs_reply:
            self._no_reply_event(name, event, args_of)
            return
        decided = self._decided
        if decided != _OPEN:  # a verdict holds: maybe no callbacks (see the class docstring)
            if decided == _DEFERRED and t in _MESSAGE_EVENTS:
                self._answer(f"{self._deferred_stage} (answered at {name})", event, self._deferred)
                return
            if (decided == _CONNECTION or (decided == _MESSAGE and t is not Unknown)
                    or (decided == _BODY_SKIPPED and t is Body)):
                self._answer(name, event, Status.CONTINUE, quiet=True)
                return
        self.ctx.stage = name
        result = self._run_chain(name, args_of(event))
        if isinstance(result, Status):
            self._answer(name, event, result)
        else:
            self._await(name, event, result)

    def _handle_control(self, event: Event) -> None:
        """Events without a callback of their own name: macros, negotiation, abort, close."""
        if type(event) is Macro:
            return
        if type(event) is OptionNegotiation:
            self._negotiate(event)
        elif type(event) is Abort:
            self._run_quiet("abort")
            self._new_message()
        elif type(event) is Closed:
            self._run_quiet("close")
            if event.reason == "quit_nc":
                # Another SMTP session follows on this connection, maybe another client's: what
                # the filter kept or said for this one must not reach it (nor its log lines).
                self.ctx.reply_text = None
                self.ctx.unsetpriv()
                self._new_session()  # (its CONNECT, which would, may be skipped: SMFIP_NOCONNECT)
            else:
                self._finish(event.reason)

    def _no_reply_event(self, name: str, event: Event, args_of: Callable[[Any], tuple[Any, ...]]) -> None:
        """An event the MTA does not wait on (NR negotiated, or a chunk carried by EOM)."""
        if self._decided >= _DEFERRED:
            return
        self.ctx.stage = name
        result = self._run_chain(name, args_of(event))
        if not isinstance(result, Status):
            self._await(name, event, result)
            return
        self.ctx.stage = ""
        if result is not Status.CONTINUE:
            self._defer(name, result)

    # ------------------------------------------------------------ what is decided (class docstring)

    def _decide(self, t: type, status: Status) -> None:
        """The transition an answer other than continue makes."""
        if status is Status.SKIP:
            self._decided = _BODY_SKIPPED
        elif t is Connect or t is Helo:
            self._decided = _CONNECTION
        elif (t is not EnvRcpt and t is not Unknown) or (t is EnvRcpt and status is Status.DISCARD):
            self._decided = _MESSAGE  # a discard at RCPT is the whole message's (docs/protocol.md §8)

    def _defer(self, stage: str, status: Status) -> None:
        """A no-reply event's verdict: kept for the next reply (continue, noreply, skip: nothing to keep)."""
        if status is not Status.CONTINUE and status is not Status.NOREPLY and status is not Status.SKIP:
            self._decided, self._deferred, self._deferred_stage = _DEFERRED, status, stage

    def _new_message(self) -> None:
        if self._decided != _CONNECTION:
            self._decided = _OPEN
        self.ctx.drop_actions()

    def _new_session(self) -> None:
        self._decided = _OPEN
        self.sender = ""
        self.client = ""  # (a session after QUIT_NC whose CONNECT is skipped has no name of its own)

    def _negotiate(self, offer: OptionNegotiation) -> None:
        try:
            check_offer(offer)  # before the callbacks, which have nothing to say to such an MTA
            status = Status.CONTINUE
            if self.registry.chain("negotiate"):
                self.ctx.stage = "negotiate"
                status = self._run_sync("negotiate", (offer.version, offer.actions, offer.protocol))
                self.ctx.stage = ""
            if status not in (Status.CONTINUE, Status.ACCEPT):
                raise RemoteProtocolError(f"the negotiate callback answered {status.smfis}")
            negotiated = self._negotiated(offer)
        except RemoteProtocolError as exc:
            if self.fault_due(f"negotiation failed: {said(exc)}"):
                log.warning("%s: negotiation with %s failed: %s", self.name, self.link.peer, said(exc))
            for event in self.session.fail_negotiation():
                self._handle(event)
            return
        if self.debug:
            log.debug("%s: offered v%d actions 0x%x protocol 0x%x; answered %s", self.name,
                      offer.version, offer.actions, offer.protocol, _answer_text(negotiated.reply))
        self._out.append(self.session.accept_negotiation(negotiated))

    def _negotiated(self, offer: OptionNegotiation) -> Negotiated:
        """negotiate() for this offer and the callbacks registered now, computed once per combination.

        Every connection of an MTA makes the same offer, and the callbacks rarely change, so
        this is a dictionary lookup on the per-connection path.
        """
        symlists = self.ctx.symlists
        max_data_size = self.shared.settings.max_data_size
        key = (self.registry.generation, offer.version, offer.actions, offer.protocol,
               max_data_size, tuple(symlists.items()))
        negotiated = _NEGOTIATED.get(key)
        if negotiated is None:
            wants = self.registry.wants()
            wants.max_data_size = max_data_size
            wants.macros = dict(symlists)
            negotiated = negotiate(offer, wants)
            if len(_NEGOTIATED) >= 256:  # bounded: callbacks changing all the time must not grow it
                _NEGOTIATED.clear()
            _NEGOTIATED[key] = negotiated
        return negotiated

    # ------------------------------------------------------------ running callbacks

    def _run_chain(self, name: str, args: tuple[Any, ...]) -> Status | Awaitable[Status]:
        """The event's callbacks in order, up to the first answer other than continue."""
        chain = self.registry.chain(name)
        call_args = (self.ctx,) + args  # compiled, (ctx, *args) is built through a list
        # read per callback: `milter configure -calltimeout`, and a stop's grace, apply at once (a
        # later callback given what the chain's start had left ran past the grace, until its cut)
        for i, cb in enumerate(chain):
            limit = self.shared.call_limit()
            status = self._call(name, cb, call_args, limit, False)
            if not isinstance(status, Status):
                return self._chain_async(name, call_args, chain, i, status)
            if status is not Status.CONTINUE:
                return status
        return Status.CONTINUE

    async def _chain_async(self, name: str, call_args: tuple[Any, ...], chain: list[Callback], i: int,
                           pending: Awaitable[Status]) -> Status:
        """The rest of a chain once callback ``i`` turned out async (``pending``)."""
        status = await pending
        for j in range(i + 1, len(chain)):
            if status is not Status.CONTINUE or not await self._settle():
                break
            result = self._call(name, chain[j], call_args, self.shared.call_limit(), False)
            status = result if isinstance(result, Status) else await result
        return status

    def _run_sync(self, name: str, args: tuple[Any, ...]) -> Status:
        """A chain answered at once (negotiate): its async callbacks were refused in _call."""
        result = self._run_chain(name, args)
        if not isinstance(result, Status):
            raise TypeError(f"the {name} chain gave an awaitable")  # (_call's refusal makes this impossible)
        return result

    def _not_awaitable(self, name: str, cb: Callback, awaitable: Awaitable[Any]) -> Status:
        """An async callback where the answer must be given at once: closed unstarted (a coroutine
        merely dropped makes Python warn "never awaited" on stderr), logged (once a minute per
        callback, as a result that is no status: it is so at every connection), taken as continue.
        (An ``async def`` is refused by register: this is a plain function returning one.)"""
        close = getattr(awaitable, "close", None)
        if close:
            close()
        who = cb.name or said(cb.func, repr)
        if self.shared.traces.logged_as(f"{name} {who} is async", self.name) is None:
            log.error("%s: the %s callback %s must not be async; treated as continue (said once a minute for this "
                      "callback)", self.name, name, escape(who))
        return Status.CONTINUE

    def _run_quiet(self, name: str) -> None:
        """abort and close: every callback runs, results are ignored (libmilter ignores them too).

        The connection does not wait for an async one; what comes after it in the connection's
        own end does: the close callbacks after the abort callbacks, the context's end after
        both (docs/protocol.md §7.5). Before, an async abort callback ran after the close
        callbacks, on a context already ended."""
        if self._quiet is not None and not self._quiet.done():
            self._quiet = asyncio.ensure_future(self._quiet_after(self._quiet, name))
            self._queued += 1
            if self._queued >= _QUIET_QUEUE and not self._busy and not self.closed:
                self._held = self._busy = True  # (_quiet_after lets go)
                self.link.pause_reading()
            return
        pending = self._quiet_chain(name)
        if pending:
            self._quiet = asyncio.ensure_future(_in_turn(pending))

    def _quiet_chain(self, name: str) -> list[Awaitable[Status]]:
        """Run the event's callbacks; the awaitables of the async ones, not awaited yet."""
        self.ctx.stage = name
        call_args = (self.ctx,)
        pending = []
        for cb in self.registry.chain(name):
            result = self._call(name, cb, call_args, self.shared.call_limit(), True)
            if not isinstance(result, Status):
                pending.append(result)
        self.ctx.stage = ""
        return pending

    async def _quiet_after(self, before: Awaitable[None], name: str) -> None:
        try:
            await before
        except asyncio.CancelledError:
            if _cancelling():  # this task itself: the loop ends
                raise
            # (before: a callback cancelled as its connection was cut, see connection_lost)
        try:
            await _in_turn(self._quiet_chain(name))
        finally:
            self._queued -= 1
        if self._held and self._queued < _QUIET_QUEUE:
            self._held = self._busy = False
            if not self.closed:
                self._go_on()

    def _call(self, name: str, cb: Callback, call_args: tuple[Any, ...], limit: float,
              ignore: bool) -> Status | Awaitable[Status]:
        """Call one callback: the one place for the time limit, failures, and reading the result.

        Returns its status (``on_error`` if it raised or was stopped; continue for a result
        that is no status, with a warning, or for any result with ``ignore``), or, for an
        async callback, an awaitable giving that status. Tcl callbacks return a Status, which
        is taken as it is. With a limit (``limit`` seconds, read by the caller for each callback),
        ``cb.limit`` holds the callback to it (limits.py) and says whether it overran: a
        callback that comes back after its limit, from code the limit cannot interrupt, is
        logged with its time. Without one the clock is not read at all.
        """
        started = _monotonic() if limit or self.meter is not None else 0.0
        limiter = cb.limit
        held = limiter.begin(limit, started)
        late = False
        func = cb.func  # compiled, cb.func(*args) would be a getattr by name, as for a method
        self.calling = cb
        try:
            try:
                result = func(*call_args)
            finally:
                self.calling = None
                if held:
                    late = limiter.stop()  # before anything else: the failure's log line is not limited
        # A filter bug must not take the milter down: any BaseException, sys.exit() included (the
        # Tcl `exit` ends the process, as the manual has it; Python's is a failure like any other),
        # and a library's own class beside Exception. (A stop signal is the loop's: no KeyboardInterrupt.)
        except BaseException as exc:  # noqa: BLE001
            status = self._callback_failed(name, cb, self._grace_named(exc, started), ignore)
            if limit:
                self._check_time(name, cb, started, limit, _LATE_STOP)
            self._timed(name, cb, started)
            return status
        if late or (limit and not held):  # a sync Python callback off the main thread is timed here
            self._check_time(name, cb, started, limit, 0.0)
        if isinstance(result, Status):  # Tcl callbacks and well-behaved Python ones: no parsing
            self._timed(name, cb, started)
            return result
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            if name == "negotiate":
                return self._not_awaitable(name, cb, result)
            return self._awaited(name, cb, result, limit, started, ignore)  # timed when it completes
        self._timed(name, cb, started)
        return Status.CONTINUE if ignore else self._status(name, cb, result)

    def _grace_named(self, exc: BaseException, started: float) -> BaseException:
        """A plain Python callback that started in a stop's or reload's grace was held to what was
        left of it, which the Python limit calls call_timeout (it knows no grace): its line names
        the grace, as a Tcl or an async callback's does."""
        if type(exc) is CallbackTimeout and str(exc).endswith("(call_timeout)") and self.shared.graced(started):
            exc.args = (f"callback {self.shared.overrun(started, _monotonic(), 'call_timeout')}",)
        return exc

    async def _awaited(self, name: str, cb: Callback, awaitable: Awaitable[Any], limit: float, started: float,
                       ignore: bool) -> Status:
        """:meth:`_call` for an async callback, once it returned its awaitable.

        Run as a task of its own, so that the limit answers the MTA at its time whatever the
        callback does with its cancellation (asyncio.wait_for waited until it let go: one that
        swallowed CancelledError held the MTA as long as it liked)."""
        task = asyncio.ensure_future(_contained(awaitable))
        cut: asyncio.CancelledError | None = None
        if not ignore:
            self._due = started + limit if limit else _FOREVER
        try:
            done, _ = await asyncio.wait((task,), timeout=limit or None)
        except asyncio.CancelledError as exc:  # the connection is cut, or the loop ends: the callback too
            cut = exc
        if not ignore:
            self._due = _FOREVER
        if cut is not None:  # (awaited outside the except clause: compiled, a bare raise after an
            task.cancel()    # await there re-raised an exception already freed, and crashed)
            await self._unwound(name, cb, task, awaitable, "as its connection was cut")
            raise cut
        if not done:
            return await self._stopped(name, cb, task, awaitable, limit, started, ignore)
        try:
            result = task.result()
        except asyncio.CancelledError as exc:
            # From inside the callback: it awaited a task or future that was cancelled. Left to
            # propagate, the connection would wait for ever, paused, with nothing logged.
            status = self._callback_failed(name, cb, exc, ignore)
            self._timed(name, cb, started)
            return status
        # Any BaseException, as in _call: CallbackTimeout (the time limit of Tcl code the callback
        # ran, ctx.tcl), a library's own class beside Exception.
        except BaseException as exc:  # noqa: BLE001
            status = self._callback_failed(name, cb, exc.original if isinstance(exc, _Exited) else exc, ignore)
            if limit:
                self._check_time(name, cb, started, limit, _LATE_STOP)
            self._timed(name, cb, started)
            return status
        if limit:
            self._check_time(name, cb, started, limit, 0.0)
        self._timed(name, cb, started)
        return Status.CONTINUE if ignore else self._status(name, cb, result)

    async def _stopped(self, name: str, cb: Callback, task: "asyncio.Task[Any]", awaitable: Awaitable[Any],
                       limit: float, started: float, ignore: bool) -> Status:
        """An async callback ran out of time: cancelled, and answered with ``on_error`` now. It
        gets UNWIND seconds to end before anything more of this connection runs (its ``finally``
        clauses use the context); :meth:`_settle` waits for it there."""
        task.cancel()
        shared = self.shared  # a stop's grace may have cut the limit short: the line names it, as for Tcl
        why = shared.overrun(started, _monotonic(), "call_timeout")
        status = self._callback_failed(name, cb, CallbackTimeout(f"callback {why}"), ignore)
        self._check_time(name, cb, started, limit, _LATE_STOP)
        self._timed(name, cb, started)
        when = f"when {shared.stop_why} was over" if shared.graced(started) else f"at the {limit:g} s call timeout"
        self._unwinding = (name, cb, task, awaitable, when)
        if ignore and not await self._settle():  # abort, close: no answer to give first
            self._cut_loose()
        return status

    async def _settle(self) -> bool:
        """Wait (UNWIND seconds at most) for a callback stopped by its limit to end; False if it
        did not, and was abandoned."""
        unwinding, self._unwinding = self._unwinding, None
        if unwinding is not None:
            await self._unwound(*unwinding)
        return not self._abandoned

    async def _unwound(self, name: str, cb: Callback, task: "asyncio.Task[Any]", awaitable: Awaitable[Any],
                       when: str) -> None:
        """Give a cancelled callback UNWIND seconds to end; abandon it (logged) if it does not."""
        if not task.done():
            try:
                await asyncio.wait((task,), timeout=UNWIND)
            finally:
                if not task.done():
                    abandon(task, awaitable)
                    self._abandoned = True
                    log.error("%s: %s callback %s ignored its cancellation %s and is abandoned; its "
                              "connection is closed (abandoned callbacks still running: %d)", self.name, name,
                              escape(cb.name or repr(cb.func)), when, len(ABANDONED))
        if task.done():
            _consume(task)

    def _cut_loose(self) -> None:
        """Close the connection of an abandoned callback: it may still use the context."""
        if not self.closed:
            self._flush()
            self.connection_lost(ABANDONED_END)

    def _timed(self, name: str, cb: Callback, started: float) -> None:
        """Count a callback's time for --metrics (without metrics the clock was not read)."""
        if self.meter is not None:
            self.meter.callback(name, cb.origin, _monotonic() - started)

    def _check_time(self, name: str, cb: Callback, started: float, limit: float, grace: float) -> None:
        """Count a callback that took longer than ``limit`` (stopped by it, or back late); log one
        that took longer than ``limit`` + ``grace`` seconds."""
        elapsed = _monotonic() - started
        shared = self.shared
        if shared.stop_by != _FOREVER:  # a stop's or reload's grace: its end holds it too (call_limit)
            limit = min(limit, shared.call_limit(started))
        if elapsed > limit and self.meter is not None:
            self.meter.overran(name, cb.origin)
        if elapsed > limit + grace:
            self._overran(name, cb, elapsed, limit, started)

    def _overran(self, name: str, cb: Callback, elapsed: float, limit: float, started: float) -> None:
        """A callback came back after its limit: it was in code the limit cannot interrupt (C code,
        a sync callback off the main thread, an async one blocking the event loop). The limit is
        named as the failure line names it: call_timeout, or the grace that ended first."""
        shared = self.shared
        over = f"past the end of {shared.stop_why}" if shared.graced(started) else f"over the {limit:g} s call timeout"
        log.warning("%s: %s callback %s took %.1f s, %s, which could not stop it sooner",
                    self.name, name, escape(cb.name or repr(cb.func)), elapsed, over)

    def _status(self, name: str, cb: Callback, result: Any) -> Status:
        status = parse_status(result)
        if status is None:
            # A proc that ends in `set` returns what it set, for every header of every message:
            # said once a minute per callback (the same place, as for a failure's trace).
            who = cb.name or repr(cb.func)
            if self.shared.traces.logged_as(f"{name} {who} returns no status", self.name) is None:
                log.warning("%s: %s callback %s returned %s, not a status; treated as continue (said once a "
                            "minute for this callback)", self.name, name, escape(who), escape(_result_shown(result)))
            return Status.CONTINUE
        return status

    def _callback_failed(self, name: str, cb: Callback | None, exc: BaseException, ignore: bool = False) -> Status:
        """Log a failure (``cb`` None: the engine's own, around an async chain); ``on_error``.
        With ``ignore`` (abort, close) the line says no answer goes: those events take none."""
        detail = exc.detail if isinstance(exc, CallbackError) else _traceback(exc)
        status = self.shared.settings.on_error
        # The script's or the MTA's text in every part (a callback name is a Tcl script, an error
        # message may quote a header): escaped, and errorInfo's lines indented (logline).
        who = "chain" if cb is None else cb.name or repr(cb.func)
        text = said(exc)
        message = failure_text(exc)
        seen = self.shared.traces.logged_as(f"{name} {who}\n{place_of(detail, text)}", self.name) if detail else None
        answer = _failure_answer(name, status, ignore, self.shared.settings.dry_run)
        if seen is None:
            log.error("%s: %s callback %s failed (%s), %s:\n%s", self.name, name,
                      escape(who), escape(message), answer, escape_lines(detail))
        else:
            log.error("%s: %s callback %s failed (%s), %s (the same trace as %s)", self.name, name,
                      escape(who), escape(message), answer, seen)
        self.shared.stats.errors += 1
        if self.meter is not None:
            self.meter.failed(name, "python" if cb is None else cb.origin)
        return status

    def _await(self, name: str, event: Event, pending: Awaitable[Status]) -> None:
        """An async callback runs: hold this connection's events until its chain completes."""
        self._busy = True
        if self.session.buffered > _WATCHED:  # else read on, to notice the MTA's end (data_received)
            self.link.pause_reading()
        self._pending = asyncio.ensure_future(self._resume_after(name, event, pending))

    async def _resume_after(self, name: str, event: Event, pending: Awaitable[Status]) -> None:
        try:
            status = await pending
        except Exception as exc:  # noqa: BLE001 - defensive: _call catches the callbacks' own failures
            status = self._callback_failed(name, None, exc)
        if self.closed:
            return
        if event.needs_reply:
            self._answer(name, event, status)
        else:
            self._defer(name, status)
        self._flush()  # the answer goes out at the limit, before the stopped callback has ended
        if not await self._settle():
            self._busy = False
            self._cut_loose()
            return
        self._busy = False
        self._go_on()

    def _go_on(self) -> None:
        """After an async callback: read and handle the next commands, unless the peer has not
        read the replies yet (then the server's resume_writing calls :meth:`resume`). Without
        this, every command already read was answered into a full write buffer: 256 kB of them,
        a thousand times that in replies."""
        self.link.resume_reading()
        if not self.link.blocked:
            self._pump()

    # ------------------------------------------------------------ answering

    def _answer(self, name: str, event: Event, status: Status, quiet: bool = False) -> None:
        """Turn a status into the reply (plus EOM modifications) and queue the bytes."""
        self.ctx.stage = ""
        is_eom = type(event) is EndOfMessage
        if status is Status.CONTINUE and not is_eom:  # the common answer: nothing to decide
            self._out.append(self.session.send(_CONTINUE))
            return
        status = self._effective(name, event, status)
        reply = self._reply_for(event, status)
        # --dry-run: the callbacks' answer is decided on as usual (the events after a verdict run
        # no callbacks, as they would not arrive), but the MTA gets continue and no modification.
        dry = self.shared.settings.dry_run and not quiet
        start = len(self._out)
        actions: list[Reply] = []
        try:
            if is_eom:
                if type(reply) in _TAKES_ACTIONS:
                    actions = self.ctx.take_actions()
                self.ctx.drop_actions()
                if dry:
                    self._log_would(actions)
                else:
                    for action in actions:
                        self._out.append(self.session.send(action))
            self._out.append(self.session.send(_CONTINUE if dry else reply))
        except LocalProtocolError as exc:
            log.error("%s: %s: %s; answering tempfail", self.name, name, exc)
            del self._out[start:]  # nothing of this answer goes out
            self._out.append(self.session.send(Tempfail()))
            status = Status.TEMPFAIL
            actions = []
        if actions and self.meter is not None:
            for action in actions:
                self.meter.modification(action, dry)
        if status is not Status.CONTINUE:
            self._decide(type(event), status)
        if not quiet and (is_eom or status not in (Status.CONTINUE, Status.SKIP, Status.NOREPLY)):
            self._log_verdict(name, status, reply, dry)
        if is_eom:
            # The message is over. With NOMAIL negotiated the MTA sends no MAIL (and Sendmail no
            # ABORT) before the next message, so its verdict must not leak into that one.
            self._new_message()

    def _effective(self, name: str, event: Event, status: Status) -> Status:
        """The status as the MTA will take it: one that cannot be sent here goes out as continue.

        What is decided and logged follows this, not the callback's word: a NOREPLY, a SKIP
        outside the body or a DISCARD at connect or helo answered ``c`` must not stop the
        callbacks of the rest of the message or connection behind the MTA's back.
        """
        t = type(event)
        if status is Status.NOREPLY:
            log.warning("%s: %s callback answered SMFIS_NOREPLY but the MTA waits for a reply; "
                        "sending continue", self.name, name)
            return Status.CONTINUE
        if status is Status.SKIP and t is not Body:
            log.warning("%s: SMFIS_SKIP is meaningful only in the body callback; sending continue", self.name)
            return Status.CONTINUE
        if status is Status.DISCARD and (t is Connect or t is Helo):
            log.warning("%s: SMFIS_DISCARD is meaningless at %s (the MTA would ignore it); sending continue",
                        self.name, name)
            return Status.CONTINUE
        return status

    def _reply_for(self, event: Event, status: Status) -> Reply:
        if status is Status.REJECT or status is Status.TEMPFAIL:
            text = self.ctx.reply_text
            if text and text[0] == ("5" if status is Status.REJECT else "4"):
                self.ctx.reply_text = None
                return ReplyCode(text)
            return Reject() if status is Status.REJECT else Tempfail()
        if status is Status.SKIP and not (self.session.negotiated.protocol & _SKIP):
            return Continue()  # the MTA cannot skip: we stop calling body callbacks instead
        return _FINAL_OF[status]

    def _log_verdict(self, stage: str, status: Status, reply: Reply, dry: bool) -> None:
        text = getattr(reply, "text", "")
        verdict = _VERDICT[status] if not (stage == "eom" and status is Status.CONTINUE) else "accept"
        if self.meter is not None:
            self.meter.verdict(verdict, stage, dry)
        if dry:
            verdict = "would " + verdict
        self.shared.stats.verdicts[verdict] += 1
        # without connect/envfrom callbacks those events are skipped, but their macros still arrive
        client = self.client or self.ctx.getsymval("_") or "-"
        sender = self.sender
        if not sender:
            mail_addr = self.ctx.getsymval("{mail_addr}")  # "" from Postfix for a bounce's <>
            sender = f"<{mail_addr}>" if mail_addr is not None else "-"
        # client, sender and reply text come from the MTA and the script: escaped, and quoted
        # where they could pass for more fields (logline)
        log_info(log, "%s: verdict %s at %s client=%s from=%s%s gen=%d", self.name, verdict, stage,
                 as_field(client), as_field(sender), f" reply={quoted(escape(text))}" if text else "",
                 self.shared.generation)

    def _log_would(self, actions: list[Reply]) -> None:
        """--dry-run: the modifications the MTA would have got, one line each, counted as "would ..."."""
        from .client.report import describe

        verdicts = self.shared.stats.verdicts
        for action in actions:
            what = describe(action)
            verdicts["would " + what.partition(" ")[0]] += 1
            # header names and values, addresses: the script's and the MTA's text, escaped
            log_info(log, "%s: would %s", self.name, escape(what))

    def _progress(self) -> None:
        self.link.touch()
        data = self.session.send(Progress())
        if data:
            self._flush()
            self.link.write(data)

    def _finish(self, reason: str) -> None:
        """The connection is over, for ``reason``; its closed line names the async callback its
        end cancelled, if any (``_cut``: then at info, even for an EOF)."""
        if self.closed:
            return
        self.closed = True
        self._flush()
        quiet = self._quiet
        if quiet is not None and not quiet.done():  # the context ends after its last callback
            quiet.add_done_callback(self._end_context)
        else:
            self._end_context()
        self.link.close()
        if self.meter is not None:
            self.meter.closed(reason)
        # An MTA ending the session is routine (the verdict line said what mattered): debug. A
        # reset (any "error: ...") is a fault of its own, and so is an end while a callback runs
        # (an MTA that gave up waiting): limited as faults, as the peer may repeat them at will.
        # After a fault counted, nothing.
        routine, cut = reason in _ROUTINE_ENDS, self._cut
        text = f"{reason}, while its {cut} callback ran: cancelled" if cut else reason
        if routine and not cut:
            if self.debug:
                log.debug("%s: closed (%s)", self.name, reason)
        elif not self._counted and (not (routine or reason.startswith("error: ")) or self.fault_due(f"closed ({text})")):
            log.info("%s: closed (%s)", self.name, text)

    def fault_due(self, message: str) -> bool:
        """Whether to log the line of the fault ``message`` that ends this connection (Shared.fault_due)."""
        if self.shared.fault_due(fault_kind(message)):
            return True
        self._counted = True
        return False

    def _protocol_error(self, error: str) -> None:
        """The warning of a protocol error. One from a connection that began with a PROXY header
        is HAProxy's send-proxy, whose health checks alone make one a second, each failing alike:
        one line a minute, with the count since the last, and no "closed" line after it."""
        link = self.link
        if not link.proxied:
            if self.fault_due(f"protocol error: {error}"):
                log.warning("%s: protocol error from %s, closing the connection: %s", self.name, link.peer, error)
            return
        self._counted = True
        missed = self.shared.proxied.due("")
        if missed is not None:
            log.warning("%s: protocol error from %s, closing the connection: %s (said at most once a minute%s)",
                        self.name, link.peer, error, f"; {missed} more such connections since" if missed else "")

    def _end_context(self, _done: object = None) -> None:
        """The context's end (the host's hook, then nothing more of it works): after its last
        callback, an async abort or close callback included (a done callback then)."""
        self._hook("context_closed", self.shared.hooks.context_closed)
        self.ctx.detach()


def _failure_answer(name: str, status: Status, ignore: bool, dry: bool) -> str:
    """What a failure line says went to the MTA: under --dry-run continue, not ``on_error``."""
    if ignore:
        return f"no answer ({name} takes none)"
    if dry and status is not Status.CONTINUE:
        return f"would answer {status.smfis}; answering continue"
    return f"answering {status.smfis}"


def _result_shown(result: Any) -> str:
    """A result that is no status as its warning quotes it: a long text, bytes or collection by the
    start of its repr and its length (a Tcl callback's result comes quoted and cut already)."""
    shown = said(result, repr)
    if len(shown) <= SHOWN or not isinstance(result, (str, bytes, bytearray, list, tuple, dict)):
        return shown
    unit = "bytes" if isinstance(result, (bytes, bytearray)) else "characters" if isinstance(result, str) else "items"
    return f"{clip(shown)} ({len(result)} {unit})"


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not merely given a CancelledError
    by something it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, internals_dropped(exc, exc.__traceback__))).rstrip()
