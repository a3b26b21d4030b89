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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Final, Protocol

from .callbacks import Callback, Registry
from .context import Context
from .hooks import Hooks
from .limits import CallbackTimeout, PythonLimit
from .logline import info as log_info
# Imported by name, not as a module: compiled, `events.Name` is a module attribute look-up per use.
from .protocol.events import (
    Abort, Accept, Body, Closed, Connect, Continue, Data, Discard, EndOfHeaders, EndOfMessage, EnvFrom,
    EnvRcpt, Event, Header, Helo, Macro, OptionNegotiation, Progress, Reject, Reply, ReplyCode, Skip,
    Tempfail, Unknown,
)
from .protocol.constants import Family
from .protocol.errors import LocalProtocolError, RemoteProtocolError
from .protocol.negotiation import Negotiated, negotiate
from .protocol.session import FilterSession, NeedData
from .settings import Settings
from .status import Status, parse_status

log: Final = logging.getLogger("pytclmilter")

_PY_LIMIT: Final = PythonLimit()
#: Result types that are certainly not awaitable (skips inspect.isawaitable on the hot path).
_PLAIN: Final = frozenset({type(None), str, int, Status})

_CONTINUE: Final = Continue()
_VERDICT: Final = {s: s.name.lower() for s in Status}  # enum .name is a slow property
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


#: Event type -> (callback event name, function of the event giving the callback arguments).
_ARGS: Final[dict[type, tuple[str, Callable[[Any], tuple[Any, ...]]]]] = {
    Connect: ("connect", _connect_args),
    Helo: ("helo", _helo_args),
    EnvFrom: ("envfrom", _envelope_args),
    EnvRcpt: ("envrcpt", _envelope_args),
    Data: ("data", _no_args),
    Unknown: ("unknown", _unknown_args),
    Header: ("header", _header_args),
    EndOfHeaders: ("eoh", _no_args),
    Body: ("body", _body_args),
    EndOfMessage: ("eom", _no_args),
}
#: negotiate() results by (registry generation, offer, size limit, macro lists): see _negotiated.
_NEGOTIATED: Final[dict[tuple[Any, ...], Negotiated]] = {}

_MESSAGE_EVENTS: Final = frozenset({Data, Header, EndOfHeaders, Body, EndOfMessage})

#: How sessions normally end; other reasons (timeout, protocol error, stop) are worth an info line.
_ROUTINE_ENDS: Final = frozenset({"eof", "quit"})



def address_info(e: Connect) -> dict[str, Any]:
    """The client address as TclMilter's addrInfo dict: family, address, port."""
    return {"family": _family_name(e.family), "address": e.address, "port": e.port}


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


@dataclass
class Stats:
    """Verdict counts since start, for the log summary."""

    verdicts: Counter[str] = field(default_factory=Counter)
    errors: int = 0

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.verdicts.items())]
        return ", ".join(parts + [f"callback errors={self.errors}"])


class Shared:
    """What every connection of one milter reads: its settings, callbacks, hooks and counts.

    ``settings`` is replaced whole when an option changes (the value itself never changes), and
    each connection reads it here at every use: an option set while serving (``milter configure
    -onerror`` in a callback) applies at once, to the connections already open too.
    """

    __slots__ = ("settings", "registry", "hooks", "stats")

    def __init__(self, settings: Settings, registry: Registry, hooks: Hooks, stats: Stats) -> None:
        self.settings = settings
        self.registry = registry
        self.hooks = hooks
        self.stats = stats


class CallbackError(Exception):
    """A callback failed; ``detail`` is what to log (a traceback or Tcl's errorInfo)."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class ConnectionEngine:
    """Drives one FilterSession with the milter's callbacks."""

    __slots__ = ("shared", "registry", "session", "ctx", "name", "link", "_out", "_busy", "_deferred",
                 "_deferred_stage", "_conn_done", "_done", "_skip_body", "closed", "client", "sender", "debug")

    def __init__(self, shared: Shared, conn_id: int, link: "Link") -> None:
        self.shared = shared
        self.registry: Registry = shared.registry
        self.session = FilterSession(emit_macros=False)
        self.ctx = Context(conn_id, self.session.macros, self._progress)
        self.name = self.ctx.name
        self.link = link
        self._out: list[bytes] = []
        self._busy = False  # an async callback is running: hold further events
        self._deferred: Status | None = None  # verdict of a no-reply event, answered at the next reply
        self._deferred_stage = ""
        self._conn_done = False  # connect/helo got a verdict: the whole connection is decided
        self._done = False  # the message (or connection) has its verdict: call no more callbacks
        self._skip_body = False
        self.closed = False
        self.client = ""
        self.sender = ""
        # Asked once: a connection lasts one SMTP session, and each isEnabledFor is an
        # interpreted call; a level set meanwhile applies from the next connection.
        self.debug = log.isEnabledFor(logging.DEBUG)
        shared.hooks.context_created(self.ctx)

    @property
    def busy(self) -> bool:
        """An async callback is running for this connection."""
        return self._busy

    # ------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.session.receive_data(data)
        if not self._busy:
            self._pump()

    def connection_lost(self, reason: str = "eof") -> None:
        """The socket is gone (EOF, error, timeout, stop): abort and close callbacks, once."""
        if self.closed:
            return
        if reason == "eof" and not self._busy:
            self.session.receive_data(b"")
            self._pump()
            return
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
                log.warning("%s: protocol error, closing the connection: %s", self.name, exc)
                self._flush()
                self.connection_lost("protocol error")
                return
            if isinstance(event, NeedData):
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
        t = type(event)
        spec = _ARGS.get(t)
        if spec is None:
            self._handle_control(event)
            return
        name, args_of = spec
        if t is EnvFrom:
            self._new_message()
            self.sender = event.args[0] if event.args else ""  # type: ignore[attr-defined]
        elif t is Connect:
            self.client = f"{event.hostname}[{event.address}]"  # type: ignore[attr-defined]
            self._conn_done = False
        if not event.needs_reply:
            self._no_reply_event(name, event, args_of)
            return
        if self._deferred is not None and t in _MESSAGE_EVENTS:
            status, self._deferred = self._deferred, None
            self._answer(f"{self._deferred_stage} (answered at {name})", event, status)
            return
        if self._done or self._conn_done or (t is Body and self._skip_body):
            self._answer(name, event, Status.CONTINUE, quiet=True)
            return
        self.ctx.stage = name
        result = self._run_chain(name, args_of(event))
        if type(result) is Status:
            self._answer(name, event, result)  # type: ignore[arg-type]
        else:
            self._await(name, event, result)  # type: ignore[arg-type]

    def _handle_control(self, event: Event) -> None:
        """Events without a callback of their own name: macros, negotiation, abort, close."""
        t = type(event)
        if t is Macro:
            return
        if t is OptionNegotiation:
            self._negotiate(event)  # type: ignore[arg-type]
        elif t is Abort:
            self._run_quiet("abort")
            self._new_message()
        elif t is Closed:
            self._run_quiet("close")
            if event.reason == "quit_nc":  # type: ignore[attr-defined]
                self.ctx.reply_text = None
            else:
                self._finish(event.reason)  # type: ignore[attr-defined]

    def _no_reply_event(self, name: str, event: Event, args_of: Callable[[Any], tuple[Any, ...]]) -> None:
        """An event the MTA does not wait on (NR negotiated, or a chunk carried by EOM)."""
        if self._done or self._conn_done or self._deferred is not None:
            return
        self.ctx.stage = name
        result = self._run_chain(name, args_of(event))
        if type(result) is not Status:
            self._await(name, event, result)  # type: ignore[arg-type]
            return
        self.ctx.stage = ""
        if result is not Status.CONTINUE:
            self._defer(name, result)  # type: ignore[arg-type]

    def _defer(self, name: str, status: Status) -> None:
        if status not in (Status.CONTINUE, Status.NOREPLY, Status.SKIP):
            self._deferred, self._deferred_stage = status, name

    def _new_message(self) -> None:
        self._deferred = None
        self._done = False
        self._skip_body = False
        self.ctx.drop_actions()

    def _negotiate(self, offer: OptionNegotiation) -> None:
        status = Status.CONTINUE
        if self.registry.chain("negotiate"):
            self.ctx.stage = "negotiate"
            status = self._run_sync("negotiate", (offer.version, offer.actions, offer.protocol))
            self.ctx.stage = ""
        try:
            if status not in (Status.CONTINUE, Status.ACCEPT):
                raise RemoteProtocolError(f"the negotiate callback answered {status.smfis}")
            negotiated = self._negotiated(offer)
        except RemoteProtocolError as exc:
            log.warning("%s: negotiation failed: %s", self.name, exc)
            for event in self.session.fail_negotiation():
                self._handle(event)
            return
        if self.debug:
            log.debug("%s: offered v%d actions 0x%x protocol 0x%x; answered %s", self.name,
                      offer.version, offer.actions, offer.protocol, negotiated.reply)
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
        chain = self.registry.chain(name)
        call_args = (self.ctx,) + args  # compiled, (ctx, *args) is built through a list
        for i, cb in enumerate(chain):
            # (call_timeout is read only for Python callbacks: Tcl's are limited inside Tcl.)
            limited = cb.origin == "python" and _PY_LIMIT.start(self.shared.settings.call_timeout)
            func = cb.func  # compiled, cb.func(*args) would be a getattr by name, as for a method
            try:
                try:
                    result = func(*call_args)
                finally:
                    if limited:
                        _PY_LIMIT.stop()  # before anything else: the failure's log line is not limited
            except (Exception, CallbackTimeout) as exc:  # noqa: BLE001 - a filter bug must not take the milter down
                return self._callback_failed(name, cb, exc)
            cls = type(result)
            if cls is Status:  # Tcl callbacks and well-behaved Python ones: no parsing
                status = result
            elif cls not in _PLAIN and inspect.isawaitable(result):
                return self._continue_async(name, args, chain, i, result)
            else:
                status = self._status(name, cb, result)
            if status is not Status.CONTINUE:
                return status
        return Status.CONTINUE

    async def _continue_async(self, name: str, args: tuple[Any, ...], chain: list[Callback], i: int,
                              first: Awaitable[Any]) -> Status:
        try:
            result = await self._limited(first)
        except (Exception, CallbackTimeout) as exc:  # noqa: BLE001
            return self._callback_failed(name, chain[i], exc)
        status = self._status(name, chain[i], result)
        if status is not Status.CONTINUE:
            return status
        for j in range(i + 1, len(chain)):
            cb = chain[j]
            try:
                if cb.origin == "python" and self.shared.settings.call_timeout:
                    result = _PY_LIMIT.call(self.shared.settings.call_timeout, cb.func, self.ctx, *args)
                else:
                    result = cb.func(self.ctx, *args)
                if inspect.isawaitable(result):
                    result = await self._limited(result)
            except (Exception, CallbackTimeout) as exc:  # noqa: BLE001
                return self._callback_failed(name, cb, exc)
            status = self._status(name, cb, result)
            if status is not Status.CONTINUE:
                return status
        return Status.CONTINUE

    async def _limited(self, awaitable: Awaitable[Any]) -> Any:
        limit = self.shared.settings.call_timeout
        if not limit:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, limit)
        except asyncio.TimeoutError:
            raise CallbackTimeout(f"callback stopped after {limit:g} s (call_timeout)") from None

    def _run_sync(self, name: str, args: tuple[Any, ...]) -> Status:
        result = self._run_chain(name, args)
        if isinstance(result, Status):
            return result
        close = getattr(result, "close", None)
        if close:
            close()
        log.error("%s: the %s callback must not be async; treated as continue", self.name, name)
        return Status.CONTINUE

    def _run_quiet(self, name: str) -> None:
        """abort and close: every callback runs, results are ignored (libmilter ignores them too)."""
        self.ctx.stage = name
        limit = self.shared.settings.call_timeout
        for cb in self.registry.chain(name):
            try:
                if cb.origin == "python" and limit:
                    result = _PY_LIMIT.call(limit, cb.func, self.ctx)
                else:
                    result = cb.func(self.ctx)
                if inspect.isawaitable(result):
                    asyncio.ensure_future(self._limited(result))
            except (Exception, CallbackTimeout) as exc:  # noqa: BLE001
                self._callback_failed(name, cb, exc)
        self.ctx.stage = ""

    def _status(self, name: str, cb: Callback, result: Any) -> Status:
        status = parse_status(result)
        if status is None:
            log.warning("%s: %s callback %s returned %r, not a status; treated as continue",
                        self.name, name, cb.name or cb.func, result)
            return Status.CONTINUE
        return status

    def _callback_failed(self, name: str, cb: Callback, exc: BaseException) -> Status:
        detail = exc.detail if isinstance(exc, CallbackError) else _traceback(exc)
        status = self.shared.settings.on_error
        log.error("%s: %s callback %s failed (%s), answering %s:\n%s", self.name, name, cb.name or cb.func,
                  exc, status.smfis, detail)
        self.shared.stats.errors += 1
        return status

    def _await(self, name: str, event: Event, awaitable: Awaitable[Status]) -> None:
        self._busy = True
        self.link.pause_reading()

        async def finish() -> None:
            try:
                status = await awaitable
            except Exception as exc:  # noqa: BLE001 - defensive: _continue_async catches callback errors
                status = self._callback_failed(name, Callback(lambda *a: None), exc)
            if self.closed:
                return
            if event.needs_reply:
                self._answer(name, event, status)
            else:
                self._defer(name, status)
            self._busy = False
            self.link.resume_reading()
            self._pump()

        asyncio.ensure_future(finish())

    # ------------------------------------------------------------ answering

    def _answer(self, name: str, event: Event, status: Status, quiet: bool = False) -> None:
        """Turn a status into the reply (plus EOM modifications) and queue the bytes."""
        self.ctx.stage = ""
        is_eom = type(event) is EndOfMessage
        if status is Status.CONTINUE and not is_eom:  # the common answer: nothing to decide
            self._out.append(self.session.send(_CONTINUE))
            return
        reply = self._reply_for(name, event, status)
        start = len(self._out)
        try:
            if is_eom:
                actions = self.ctx.take_actions() if status in (Status.CONTINUE, Status.ACCEPT, Status.DISCARD) else []
                self.ctx.drop_actions()
                for action in actions:
                    self._out.append(self.session.send(action))
            self._out.append(self.session.send(reply))
        except LocalProtocolError as exc:
            log.error("%s: %s: %s; answering tempfail", self.name, name, exc)
            del self._out[start:]  # nothing of this answer goes out
            self._out.append(self.session.send(Tempfail()))
            status = Status.TEMPFAIL
        if status is not Status.CONTINUE and status is not Status.SKIP:
            if type(event) in (Connect, Helo):
                self._conn_done = True
            elif type(event) not in (EnvRcpt, Unknown):
                self._done = True
        if status is Status.SKIP:
            self._skip_body = True
        if not quiet and (is_eom or status not in (Status.CONTINUE, Status.SKIP, Status.NOREPLY)):
            self._log_verdict(name, status, reply)
        if is_eom:
            # The message is over. With NOMAIL negotiated the MTA sends no MAIL (and Sendmail no
            # ABORT) before the next message, so its verdict must not leak into that one.
            self._new_message()

    def _reply_for(self, name: str, event: Event, status: Status) -> Reply:
        t = type(event)
        if status in (Status.REJECT, Status.TEMPFAIL):
            text = self.ctx.reply_text
            if text and text[0] == ("5" if status is Status.REJECT else "4"):
                self.ctx.reply_text = None
                return ReplyCode(text)
            return Reject() if status is Status.REJECT else Tempfail()
        if status is Status.NOREPLY:
            log.warning("%s: %s callback answered SMFIS_NOREPLY but the MTA waits for a reply; "
                        "sending continue", self.name, name)
            return Continue()
        if status is Status.SKIP and t is not Body:
            log.warning("%s: SMFIS_SKIP is meaningful only in the body callback; sending continue", self.name)
            return Continue()
        if status is Status.SKIP and not (self.session.negotiated.protocol & 0x400):
            return Continue()  # the MTA cannot skip: we stop calling body callbacks instead
        if status is Status.DISCARD and t in (Connect, Helo):
            log.warning("%s: SMFIS_DISCARD is meaningless at %s (the MTA would ignore it); sending continue",
                        self.name, name)
            return Continue()
        return _FINAL_OF[status]

    def _log_verdict(self, stage: str, status: Status, reply: Reply) -> None:
        text = getattr(reply, "text", "")
        verdict = _VERDICT[status] if not (stage == "eom" and status is Status.CONTINUE) else "accept"
        self.shared.stats.verdicts[verdict] += 1
        # without connect/envfrom callbacks those events are skipped, but their macros still arrive
        client = self.client or self.ctx.getsymval("_") or "-"
        sender = self.sender
        if not sender:
            mail_addr = self.ctx.getsymval("{mail_addr}")
            sender = f"<{mail_addr}>" if mail_addr else "-"
        log_info(log, "%s: verdict %s at %s client=%s from=%s%s", self.name, verdict, stage, client,
                 sender, f' reply="{text}"' if text else "")

    def _progress(self) -> None:
        self.link.touch()
        data = self.session.send(Progress())
        if data:
            self._flush()
            self.link.write(data)

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._flush()
        self.shared.hooks.context_closed(self.ctx)
        self.ctx.detach()
        self.link.close()
        # An MTA ending the session is routine (the verdict line said what mattered): debug.
        routine = reason in _ROUTINE_ENDS
        if not routine or self.debug:
            log.log(logging.DEBUG if routine else logging.INFO, "%s: closed (%s)", self.name, reason)


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
