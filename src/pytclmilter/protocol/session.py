"""The filter side of one milter connection as a state machine, without I/O.

Bytes go in with :meth:`FilterSession.receive_data`, events come out of
:meth:`FilterSession.next_event`, replies go in with
:meth:`FilterSession.send` and come out as bytes to write. The session
knows which event waits for a reply and refuses replies that are illegal for
it (a header change outside end of message, SKIP outside the body, ...), so
nothing malformed ever reaches the MTA.

The state table (in :mod:`.table`) and the out-of-order rules are
libmilter's (docs/protocol.md §7), with one deliberate difference: a command
that needs a reply but is not allowed even after libmilter's fall-back to the
HELO state is a protocol error here, so the connection is closed at once;
libmilter drops it silently and leaves the MTA waiting for its timeout.
"""

from __future__ import annotations

from collections import deque
from typing import Final

# Imported by name, not as a module: compiled, `events.Name` is a module attribute look-up per use.
from .events import (
    Abort, Accept, Body, Closed, Connect, Discard, EndOfMessage, EnvFrom, Event, Header, Helo, Macro, NoReply,
    OptionNegotiation, OptionNegotiationReply, Progress, Quit, QuitNewConnection, Reject, Reply, ReplyCode, Skip,
    Tempfail,
)
from .codec import FrameReader, decode_header
from .constants import MAX_DATA_SIZE, Action, Proto
from .errors import LocalProtocolError, RemoteProtocolError
from .macros import STORED_STAGES, MacroStore
from .negotiation import DEFAULT, EVENT_FLAGS, Negotiated
from .table import (
    COMMAND_CODES, COMMANDS, FINAL_REPLIES, NEXT, REPLIES, State, code_of, decode_command, encode_reply, reply_spec,
)

S = State

# The state as a plain int inside the session (compiled, an enum member is an attribute lookup
# on every test); FilterSession.state gives the State.
_INIT: Final = int(S.INIT)
_HELO: Final = int(S.HELO)
_HDRS: Final = int(S.HDRS)
_BODY: Final = int(S.BODY)
_ENDM: Final = int(S.ENDM)
_UNKN: Final = int(S.UNKN)
_CLOSED: Final = int(S.CLOSED)
# The defaults every session starts from, as plain ints once (int() of a flag is a Python call).
_DEFAULT_PROTO: Final = int(DEFAULT.protocol)
_DEFAULT_ACTIONS: Final = int(DEFAULT.actions)

# The per-packet dictionaries, derived from the command table (plain ints: IntFlag arithmetic
# costs microseconds on the hot path).
_STATE_OF: Final[dict[bytes, int]] = {c.code: int(c.state) for c in COMMANDS if c.state is not None}
#: States whose event a skip flag can suppress, so the skip rule may jump over them.
_SKIPPABLE: Final[dict[State, int]] = {c.state: int(c.skip) for c in COMMANDS if c.state is not None and c.skip}
_STATES: Final = tuple(State)

#: _trans_ok's answers by (negotiated protocol flags, old state, new state) packed in one int.
_TRANS_OK: Final[dict[int, bool]] = {}
#: How many it keeps: an MTA's flags need a few dozen; a peer offering every mix of skip bits in
#: turn made them grow to tens of megabytes, kept for the process's life.
_TRANS_OK_MAX: Final = 1024

_TRANSACTION: Final[frozenset[int]] = frozenset(int(s) for s in (S.MAIL, S.RCPT, S.DATA, S.HDRS, S.EOHS, S.BODY))
#: What UNKNOWN's row allows that ends the message an unknown command interrupted (QUIT: teardown).
_LEAVES: Final[frozenset[int]] = frozenset(int(s) for s in (S.HELO, S.MAIL, S.Q_NC))

#: Event type -> the NR bit that silences its reply (0: always answered), for the events the MTA
#: waits on; _CODE_OF gives their command codes.
_NR_OF_TYPE: Final[dict[type, int]] = {c.event: int(c.no_reply) for c in COMMANDS if c.replied}
_CODE_OF: Final[dict[type, bytes]] = {c.event: c.code for c in COMMANDS if c.replied}
_NR_HDR: Final = _NR_OF_TYPE[Header]
_NEVER_REPLIED: Final = frozenset(c.code for c in COMMANDS if not c.replied)
_NR_OF_CODE: Final[dict[bytes, int]] = {c.code: int(c.no_reply) for c in COMMANDS if c.replied}
#: Commands a reject answers alone: the state stays (libmilter's CT_IGNO).
_REJECT_KEEPS_STATE: Final = frozenset(c.code for c in COMMANDS if c.reject_keeps_state)
_MACRO: Final = code_of(Macro)
_HEADER: Final = code_of(Header)
#: MAIL's macro stage letter (the command's code): the macros both MTAs send before every MAIL.
_MAIL_STAGE: Final = code_of(EnvFrom)

#: Modifications, and by the code each goes out as (reply_spec) the action flag it needs.
_MODIFICATIONS: Final = frozenset(r.reply for r in REPLIES if r.action)
_ACTION_BITS: Final[dict[bytes, int]] = {r.code: int(r.action) for r in REPLIES if r.action}
_FINAL: Final = FINAL_REPLIES
_SKIP: Final = int(Proto.SKIP)


class NeedData:
    """Sentinel type: more bytes are needed before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class FilterSession:
    """One MTA connection, filter side."""

    __slots__ = ("emit_macros", "_state", "macros", "negotiated", "_proto", "_actions", "_reader", "_queue",
                 "_pending", "_pending_code", "_eof", "_closed_emitted", "_clear_after_quit_nc", "_before_unknown",
                 "_clear_on_delivery", "ignored", "ended", "mail_macros")

    def __init__(self, emit_macros: bool = True) -> None:
        #: Also hand out Macro events (they are always stored in ``macros``); a driver that
        #: only looks macros up turns this off and saves a third of the per-packet work.
        self.emit_macros = emit_macros
        self._state = _INIT
        self.macros = MacroStore()
        self.negotiated: Negotiated = DEFAULT
        self._proto = _DEFAULT_PROTO  # the negotiated flags as plain ints, for hot checks
        self._actions = _DEFAULT_ACTIONS
        self._reader = FrameReader(COMMAND_CODES, MAX_DATA_SIZE)
        self._queue: deque[Event] = deque()
        self._pending: Event | None = None
        self._pending_code = b""
        self._eof = False
        self._closed_emitted = False
        self._clear_after_quit_nc = False
        #: The code of a command whose macro clearing waits until the abort queued before it is delivered.
        self._clear_on_delivery = b""
        #: The state an UNKNOWN command interrupted: what may follow the unknown command.
        self._before_unknown = _INIT
        #: How many out-of-order commands that are not answered (ABORT, QUIT_NC, and those under a
        #: negotiated no-reply bit) were ignored, as libmilter ignores them (Postfix sends an ABORT
        #: after each finished message). QUIT is never out of order: it ends the session anywhere.
        self.ignored = 0
        #: Why the connection ended (teardown's reason), None while it lasts. After QUIT_NC the
        #: close event was already given, so a QUIT or EOF then ends it with no event: the
        #: driver must look here.
        self.ended: str | None = None
        #: MAIL-stage macro packets received. Both MTAs send one before every MAIL, also when MAIL
        #: is skipped (NOMAIL): where nothing else marks a new message (Sendmail sends no ABORT
        #: for a message decided before its end of message, docs/protocol.md §10.1), this does.
        self.mail_macros = 0

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the MTA; ``b""`` means end of file."""
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as events (read on, or not, while a callback runs)."""
        return self._reader.pending

    @property
    def pending(self) -> Event | None:
        """The event the MTA waits on a reply for, if any."""
        return self._pending

    @property
    def state(self) -> State:
        """Where the session is, in libmilter's terms."""
        return _STATES[self._state]

    @property
    def in_transaction(self) -> bool:
        return self._in_message(self._state)

    def _in_message(self, state: int) -> bool:
        """A message is open: a transaction state, or UNKNOWN in the middle of one (see _resumes)."""
        return state in _TRANSACTION or (state == _UNKN and self._before_unknown in _TRANSACTION)

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises RemoteProtocolError for bad input."""
        if self._pending is not None:
            raise LocalProtocolError(f"reply to {type(self._pending).__name__} first")
        queue, reader = self._queue, self._reader
        while True:
            if queue:
                queued = queue.popleft()
                if self._clear_on_delivery and type(queued) is not Abort:
                    self._clear_deferred()
                return self._deliver(queued)
            if self._state == _CLOSED:
                return NEED_DATA
            item = reader.next_frame()
            if item is None:
                if self._eof:
                    if reader.pending:
                        # State unchanged: teardown() must still abort an open message.
                        raise RemoteProtocolError(f"connection closed inside a packet ({reader.pending} bytes)")
                    queue.extend(self.teardown("eof"))
                    continue
                return NEED_DATA
            code, payload = item
            if code == _MACRO and not self.emit_macros and not self._clear_after_quit_nc:
                # Nearly half of all packets: stored as they came, no event, no decoding; those
                # for stages that are never stored (L, B, U: one before every header) dropped.
                if not payload:
                    raise RemoteProtocolError("macro: empty payload")
                stage = payload[:1]
                if stage in STORED_STAGES:
                    if stage == _MAIL_STAGE:
                        self.mail_macros += 1
                    self.macros.define_raw(payload)
                continue
            if code == _HEADER and self._state == _HDRS:
                # A header after a header (always allowed, clears no macros): the other hot path.
                header = decode_header(payload)
                if not (self._proto & _NR_HDR):
                    header.needs_reply = True
                    self._pending, self._pending_code = header, code
                return header
            event = self._handle_frame(code, payload)
            if event is not None:
                return self._deliver(event)

    def _handle_frame(self, code: bytes, payload: bytes) -> Event | None:
        """Apply one frame; returns its event, or None when it queued events (or none) instead."""
        event = decode_command(code, payload)
        if self._clear_after_quit_nc:  # libmilter clears after the close callback, so later
            self._clear_after_quit_nc = False
            self.macros.clear()
            if type(event) is not Quit:
                # The next SMTP session has begun, and its CONNECT (which would) may be skipped
                # (SMFIP_NOCONNECT): it gets its own close all the same, as libmilter's QUIT gives.
                self._closed_emitted = False
        if type(event) is Macro:
            if event.stage == _MAIL_STAGE:
                self.mail_macros += 1
            self.macros.define(event.stage, event.macros)
            return event if self.emit_macros else None
        new = _STATE_OF[code]
        if type(event) is Quit:
            self._queue.extend(self.teardown("quit"))
            return None
        queue = self._queue  # empty: frames are read only when every queued event was delivered
        state = self._state
        if not self._trans_ok(state, new) and not self._resumes(state, new):
            if self._in_message(state):
                queue.append(Abort())
            self._state = _HELO
            if not self._trans_ok(_HELO, new):
                self._refuse(code, state)
                return None
        elif state == _UNKN and new in _LEAVES and self._in_message(state):
            # UNKNOWN's row allows these, but they leave the message the unknown command
            # interrupted unfinished: its abort callbacks run, as when they follow RCPT itself
            # (Postfix sends its ABORT after the HELO: ignored then, as after a finished message).
            queue.append(Abort())
        event = self._enter(new, code, event)
        if queue:  # an abort, or the chunk an EOM carried, goes first
            queue.append(event)
            return None
        return event

    def _resumes(self, state: int, new: int) -> bool:
        """After an UNKNOWN command, what the interrupted state allows.

        libmilter's table lets only DATA and BODY of a message follow UNKNOWN, so with DATA
        skipped (no data callback) a client's typo between RCPT and DATA made the message's
        headers, end of headers or end of message illegal: Postfix and Sendmail send an
        unknown command to the filter in the middle of a transaction too.
        """
        return state == _UNKN and self._trans_ok(self._before_unknown, new)

    def _enter(self, new: int, code: bytes, event: Event) -> Event:
        """The command is allowed: take its state and apply its effects; returns the event to deliver."""
        if new == _UNKN and self._state != _UNKN:
            self._before_unknown = self._state
        self._state = new
        if type(event) is QuitNewConnection:
            self._clear_after_quit_nc = True  # the close callback still sees this session's macros
            return Closed("quit_nc")
        if self._queue:
            # An abort goes first, and its callbacks see the message's macros, as libmilter's,
            # which clears at the command's own handling: cleared when this event is delivered.
            self._clear_on_delivery = code
        else:
            self.macros.command(code)
        if type(event) is Connect:
            self._closed_emitted = False  # a new SMTP session: it gets its own close
        elif type(event) is EndOfMessage and event.chunk:
            self._queue.append(Body(event.chunk))  # no reply: EOM answers both
            return EndOfMessage()
        return event

    def _refuse(self, code: bytes, was: int) -> None:
        if code in _NEVER_REPLIED or self._proto & _NR_OF_CODE.get(code, 0):
            # The MTA waits for no reply (a header under NR_HDR, say): ignored, as libmilter does.
            self.ignored += 1
            return
        # Before option negotiation, "after HELO" (the state libmilter falls back to) would be wrong.
        where = "before option negotiation" if was == _INIT else f"after {self.state.name}"
        raise RemoteProtocolError(f"command {code.decode('latin-1')!r} is not allowed {where}")

    def _trans_ok(self, old: int, new: int) -> bool:
        """libmilter's trans_ok: a state the filter skips may be jumped over.

        The answer depends only on the two states and the negotiated flags, so it is computed
        once per process for each combination (a handful: every MTA connection negotiates alike;
        at most _TRANS_OK_MAX kept).
        """
        key = (self._proto << 8) | (old << 4) | new
        known = _TRANS_OK.get(key)
        if known is None:
            if len(_TRANS_OK) >= _TRANS_OK_MAX:
                _TRANS_OK.clear()
            known = _TRANS_OK[key] = self._trans_walk(old, new)
        return known

    def _trans_walk(self, old: int, new: int) -> bool:
        """Follow the states in order from ``old`` while each next one may be jumped over.

        The headers may always be jumped over, skipped or not: a message can have none (Postfix
        hides its own Received:), and then DATA is followed by the end of headers, or, when that
        is skipped too, by the body or end of message, which libmilter's table refuses.
        """
        s = old
        skip = self._proto
        while True:
            if new in NEXT[_STATES[s]]:
                return True
            n = s + 1
            if n > _BODY:
                return False
            flag = _SKIPPABLE.get(_STATES[n])
            if n != _HDRS and (flag is None or not (skip & flag)):
                return False
            s = n

    def _clear_deferred(self) -> None:
        """The macro clearing of a command queued behind an abort (see _enter), now that the
        abort was delivered: only queued events can carry one, so only the queue looks here."""
        self.macros.command(self._clear_on_delivery)
        self._clear_on_delivery = b""

    def _deliver(self, event: Event) -> Event:
        t = type(event)
        nr = _NR_OF_TYPE.get(t)
        if nr is None:  # Macro, Abort, Closed: nothing to answer
            if t is Closed:
                self._closed_emitted = True
            return event
        if t is Body and self._state == _ENDM:  # the EOM-carried chunk
            return event
        if not (self._proto & nr):  # EOM and option negotiation have no NR bit (0): always answered
            event.needs_reply = True
            self._pending = event
            self._pending_code = _CODE_OF[t]
        return event

    def teardown(self, reason: str) -> list[Event]:
        """Events that end the session (abort if inside a message, then Closed once)."""
        # Events still queued are never delivered after Closed. A queued abort (out-of-order
        # fallback) or end of message (EOM carrying a body chunk) means a message is open.
        queued = list(self._queue)
        self._queue.clear()
        out: list[Event] = []
        if self._in_message(self._state) or any(type(e) in (Abort, EndOfMessage) for e in queued):
            out.append(Abort())
        if not self._closed_emitted:
            out.append(Closed(reason))
            self._closed_emitted = True
        self._state = _CLOSED
        self._pending = None
        if self.ended is None:
            self.ended = reason
        return out

    # ------------------------------------------------------------ output

    def send(self, reply: Reply) -> bytes:
        """Encode a reply to the pending event, or raise LocalProtocolError and send nothing."""
        t = type(reply)
        pending = self._pending
        if t is Progress:
            # The MTA reads only `O` while it waits for the negotiation reply.
            if pending is None or type(pending) is OptionNegotiation:
                return b""
            return encode_reply(reply)
        if t is NoReply:
            if pending is not None:
                raise LocalProtocolError(f"{type(pending).__name__} needs a reply")
            return b""
        if pending is None:
            raise LocalProtocolError(f"no event waits for {t.__name__}")
        if t is OptionNegotiationReply:
            raise LocalProtocolError("use accept_negotiation() for the option negotiation reply")
        if t in _MODIFICATIONS:
            return self._modification(reply)
        if t not in _FINAL:
            raise LocalProtocolError(f"{t.__name__} cannot be sent by a filter")
        if type(pending) is OptionNegotiation:
            raise LocalProtocolError("option negotiation needs its own reply")
        if t is Skip and (type(pending) is not Body or not (self._proto & _SKIP)):
            raise LocalProtocolError("skip is allowed only for a body chunk when the MTA understands it")
        if t is Discard and type(pending) in (Connect, Helo):
            raise LocalProtocolError("discard is meaningful only for a message, not at connect or helo")
        data = encode_reply(reply)
        self._after_final(t)
        return data

    def _modification(self, reply: Reply) -> bytes:
        if type(self._pending) is not EndOfMessage:
            raise LocalProtocolError(f"{type(reply).__name__} is allowed only at end of message")
        spec = reply_spec(reply)
        bit = _ACTION_BITS[spec.code] if spec is not None else 0
        if not (self._actions & bit):
            raise LocalProtocolError(f"the MTA did not grant the {Action(bit).name} action")
        return encode_reply(reply)

    def _after_final(self, t: type) -> None:
        code = self._pending_code
        self._pending = None
        if t is Accept:
            self._state = _HELO
        elif t in (Reject, Tempfail, Discard, ReplyCode) and code not in _REJECT_KEEPS_STATE:
            self._state = _HELO

    def accept_negotiation(self, negotiated: Negotiated) -> bytes:
        """Answer the pending option negotiation and adopt its parameters."""
        if type(self._pending) is not OptionNegotiation:
            raise LocalProtocolError("no option negotiation is pending")
        self.negotiated = negotiated
        self._proto = int(negotiated.protocol)
        self._actions = int(negotiated.actions)
        self._reader.max_payload = negotiated.max_payload
        self._pending = None
        return negotiated.wire or encode_reply(negotiated.reply)

    def fail_negotiation(self) -> list[Event]:
        """The filter refuses the offer: end the session (close callbacks still run)."""
        self._pending = None
        return self.teardown("negotiation")


__all__ = ["FilterSession", "NEED_DATA", "NeedData", "State", "EVENT_FLAGS"]
