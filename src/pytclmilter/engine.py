"""One connection's logic: core events -> callback chain -> replies.

Sits between the sans-I/O core and the socket: the server hands it bytes and
gives it a ``write`` and a ``close`` function. Callbacks that are plain
functions (every Tcl callback) run synchronously inside ``data_received``, so
a whole pipelined batch of packets is answered with one write; a callback
that returns an awaitable pauses this connection only, and the rest of the
batch is handled when it completes.

Calling one callback (its time limit, awaitable and failure) is calling.py's ``Caller``, this
class's base; what every connection of a milter reads is shared.py's ``Shared``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Final, Protocol

from .callbacks import ARGUMENTS, Callback, Registry
from .calling import Caller, traceback_text
from .context import Context
from .hooks import Hooks
from .limits import PYTHON_LIMIT
from .logline import as_field, escape, escape_lines, failure_text, quoted, said
from .negotiating import answer_for, answer_text
from .logline import info as log_info
from .repeats import fault_kind
# Imported by name, not as a module: compiled, `events.Name` is a module attribute look-up per use.
from .protocol.events import (
    Abort, Accept, Body, Closed, Connect, Continue, Discard, EndOfMessage, EnvFrom, EnvRcpt, Event, Helo, Macro,
    OptionNegotiation, Progress, Reject, Reply, ReplyCode, Skip, Tempfail, Unknown,
)
from .protocol.constants import Proto
from .protocol.errors import LocalProtocolError, RemoteProtocolError
from .protocol.negotiation import check_offer, shown
from .protocol.session import FilterSession, NeedData
from .protocol.table import COMMANDS
from .shared import Shared
from .status import Status

log: Final = logging.getLogger("pytclmilter")
_NO_HOOK: Final = Hooks().context_created  # (no limit, nor its watchdog, for the hook nobody gave)

_monotonic: Final = time.monotonic  # compiled, `time.monotonic` is two look-ups per call
#: Abort and close runs that may wait behind a running async abort or close callback: a peer
#: sending MAIL and ABORT in a loop queued one more each (memory without bound, and a chain of
#: tasks whose cancellation at stop overflowed the stack). At this many, the connection's further
#: commands wait until one has run.
_QUIET_QUEUE: Final = 8
#: Bytes of the MTA's that may wait unhandled while an async callback runs before its connection
#: is no longer read (one read more at most): reading on notices at once an MTA that closes or
#: resets the connection meanwhile (one that gave up waiting), and an MTA waiting for the reply
#: sends nothing more.
_WATCHED: Final = 4096
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

_MESSAGE_EVENTS: Final = frozenset(c.event for c in COMMANDS if c.message)
_SKIP: Final = int(Proto.SKIP)

#: How sessions normally end; other reasons (timeout, protocol error, stop) are worth an info line.
_ROUTINE_ENDS: Final = frozenset({"eof", "quit"})


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


class ConnectionEngine(Caller):
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
    Callbacks are called in one place, :meth:`_call` (calling.Caller).
    """

    __slots__ = ("registry", "session", "ctx", "link", "_out", "_busy", "_pending", "_decided", "_deferred",
                 "_deferred_stage", "_quiet", "_queued", "_held", "closed", "client", "sender", "debug", "_counted",
                 "_cut", "_mail_macros")

    def __init__(self, shared: Shared, conn_id: int, link: "Link") -> None:
        self.registry: Registry = shared.registry
        self.session = FilterSession(emit_macros=False)
        self.ctx = Context(conn_id, self.session.macros, self._progress, self.session)
        super().__init__(shared, self.ctx.name)
        self.link = link
        self._out: list[bytes] = []
        self._busy = False
        self._pending: asyncio.Future[None] | None = None  # with _busy: the async chain's task
        self._quiet: asyncio.Future[None] | None = None  # async abort or close callbacks still running
        self._queued = 0  # abort and close runs waiting behind _quiet (_QUIET_QUEUE)
        self._held = False  # _busy because _queued reached _QUIET_QUEUE
        self._counted = False  # no closed line: its fault was counted, not logged (fault_due), or a PROXY line said it
        self._cut = ""  # the stage of the async callback the connection's end cancelled (_finish)
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
        meter = self.meter
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
                      escape_lines(traceback_text(exc)))

    @property
    def busy(self) -> bool:
        """An async callback is running for this connection."""
        return self._busy

    @property
    def due(self) -> float:
        """When the async callback running now reaches its own time limit (``time.monotonic()``;
        infinity: none runs, or it has none): the server lets one due by a grace's end be
        stopped by it, answered and logged, before it cuts the connection (connection.cut)."""
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
        spec = ARGUMENTS.get(t)
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
                status = self._run_sync("negotiate", shown(offer, self.shared.settings.max_data_size))
                self.ctx.stage = ""
            if status not in (Status.CONTINUE, Status.ACCEPT):
                raise RemoteProtocolError(f"the negotiate callback answered {status.smfis}")
            negotiated = answer_for(self.registry, offer, self.shared.settings.max_data_size, self.ctx.symlists)
        except RemoteProtocolError as exc:
            if self.fault_due(f"negotiation failed: {said(exc)}"):
                log.warning("%s: negotiation with %s failed: %s", self.name, self.link.peer, said(exc))
            for event in self.session.fail_negotiation():
                self._handle(event)
            return
        if self.debug:
            log.debug("%s: offered v%d actions 0x%x protocol 0x%x; answered %s", self.name,
                      offer.version, offer.actions, offer.protocol, answer_text(negotiated.reply))
        self._out.append(self.session.accept_negotiation(negotiated))

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
            self._quiet = asyncio.ensure_future(self._in_turn(pending))

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
            await self._in_turn(self._quiet_chain(name))
        finally:
            self._queued -= 1
        if self._held and self._queued < _QUIET_QUEUE:
            self._held = self._busy = False
            if not self.closed:
                self._go_on()

    async def _in_turn(self, awaitables: list[Awaitable[Status]]) -> None:
        """Await each in turn (abort and close callbacks: their failures are logged by _awaited);
        after one abandoned (it ignored its cancellation), the connection is closed."""
        for awaitable in awaitables:
            await awaitable
            if self._abandoned:
                self._cut_loose()

    def _cut_loose(self) -> None:
        """Close the connection of an abandoned callback: it may still use the context."""
        if not self.closed:
            self._flush()
            self.connection_lost(ABANDONED_END)


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
        """Not queued while the peer leaves replies unread (it has progress to read already):
        a script's loop around `progress` queued 5 bytes a call, megabytes a second, for an MTA
        that read none, until -calltimeout (never, with 0)."""
        self.link.touch()
        if self.link.blocked:
            return
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


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not merely given a CancelledError
    by something it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
