"""The callback chain: per event, an ordered list shared by Python and Tcl callbacks; the
arguments each event's callbacks are called with (ARGUMENTS); how a failed one is told (CallbackError).

Several callbacks may listen to one event; they run in registration order and
the first status other than continue answers the MTA. Tcl's ``milter register``
keeps one slot per event (TclMilter had one callback per event), replaced in
place when re-registered; Python's ``register`` appends.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Final

from .limits import PYTHON_LIMIT, Limit
from .protocol.constants import Family
# Imported by name, not as a module: compiled, `events.Name` is a module attribute look-up per use.
from .protocol.events import Body, Connect, EnvFrom, EnvRcpt, Event, Header, Helo, Unknown
from .protocol.negotiation import EVENT_FLAGS, Wants
from .protocol.table import COMMANDS

#: The callback events, in protocol order: those of the command table (close is QUIT's and QUIT_NC's).
EVENTS: Final = tuple(dict.fromkeys(c.callback for c in COMMANDS if c.callback))

#: The arguments each event's callbacks get after the context, named as the manual names them.
EVENT_ARGS: Final = {c.callback: c.args for c in COMMANDS if c.callback}

#: Events whose verdict may wait for the next replied event: the MTA sends them only after
#: the whole message arrived, so a reject at a header or at end of headers reaches the client
#: in the same SMTP reply either way. Asking for no reply lets the MTA stream them.
DEFERRABLE: Final = frozenset({"header"})

#: Registry versions, unique across registries, so that a negotiation computed for one set of
#: callbacks is never reused for another (see negotiating.answer_for).
_GENERATIONS: Final = itertools.count(1)


def accepts(func: Callable[..., Any], event: str) -> bool:
    """Whether ``func`` can be called as the engine calls the event's callbacks (the context, then
    the event's arguments, positional). A callable without a readable signature (a builtin)
    checks its arguments itself. A decorated one is checked as it is called, not as the
    function it wraps (functools.wraps): a decorator may pass that one other arguments."""
    try:
        sig = inspect.signature(func, follow_wrapped=False)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*range(1 + len(EVENT_ARGS[event])))
    except TypeError:
        return False
    return True


def not_accepted(event: str) -> str:
    """How a callback that cannot take the event's arguments is reported."""
    names = ("context",) + EVENT_ARGS[event]
    plural = "s" if len(names) > 1 else ""
    return f"does not accept the {len(names)} argument{plural} the event passes ({' '.join(names)})"


@dataclass(slots=True)
class Callback:
    func: Callable[..., Any]
    origin: str = "python"  # "python" or "tcl"
    name: str = ""
    limit: Limit = PYTHON_LIMIT  # what holds it to the milter's call_timeout (Tcl's: its interpreter's)


class Registry:
    """Callbacks per event. Changes are seen by the next event (and negotiation by the next connection)."""

    def __init__(self) -> None:
        self._chains: dict[str, list[Callback]] = {e: [] for e in EVENTS}
        #: Changes with every add, remove or replace: what was derived from the chains is stale.
        self.generation = next(_GENERATIONS)

    @staticmethod
    def check_event(event: str) -> str:
        if event not in EVENTS:
            raise ValueError(f'bad event "{event}": must be {", ".join(EVENTS[:-1])}, or {EVENTS[-1]}')
        return event

    def add(self, event: str, callback: Callback) -> None:
        chain = self._chains[self.check_event(event)]
        self._chains[event] = chain + [callback]  # copy-on-write: a running chain is not disturbed
        self.generation = next(_GENERATIONS)

    def remove(self, event: str, predicate: Callable[[Callback], bool]) -> bool:
        chain = self._chains[self.check_event(event)]
        kept = [c for c in chain if not predicate(c)]
        self._chains[event] = kept
        self.generation = next(_GENERATIONS)
        return len(kept) != len(chain)

    def replace_tcl(self, event: str, callback: Callback | None) -> None:
        """Tcl's single slot: replace it where it stands, append it, or remove it (None)."""
        chain = list(self._chains[self.check_event(event)])
        for i, c in enumerate(chain):
            if c.origin == "tcl":
                if callback is None:
                    del chain[i]
                else:
                    chain[i] = callback
                break
        else:
            if callback is not None:
                chain.append(callback)
        self._chains[event] = chain
        self.generation = next(_GENERATIONS)

    def tcl_callback(self, event: str) -> Callback | None:
        for c in self._chains[self.check_event(event)]:
            if c.origin == "tcl":
                return c
        return None

    def chain(self, event: str) -> list[Callback]:
        return self._chains[event]

    def registered(self) -> dict[str, list[Callback]]:
        return {e: list(c) for e, c in self._chains.items() if c}

    def wants(self) -> Wants:
        """What to negotiate: skip stages nobody listens to, no replies where verdicts can wait."""
        events = frozenset(e for e in EVENT_FLAGS if self._chains[e])
        no_reply = events & DEFERRABLE
        if self._chains["abort"] and "envfrom" not in events:
            # MAIL is where a message starts: skipped, the HELO -> ABORT jump becomes legal and
            # the ABORT Postfix sends after every message would call the abort callbacks of a
            # message that ended with its eom or a verdict ("not invoked if message transmission
            # is completed", the manual). Asked for without a reply, where the MTA allows it.
            events |= {"envfrom"}
            no_reply |= {"envfrom"}
        return Wants(events=events, no_reply=no_reply)


class CallbackError(Exception):
    """A callback failed; ``detail`` is what to log (a traceback or Tcl's errorInfo)."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


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
ARGUMENTS: Final[dict[type, tuple[str, Callable[[Any], tuple[Any, ...]]]]] = {
    c.event: (c.callback, _ARG_FUNCS[c.callback]) for c in COMMANDS if c.callback in _ARG_FUNCS
}


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
