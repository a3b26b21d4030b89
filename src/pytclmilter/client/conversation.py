"""The MTA side of one milter conversation, as Postfix holds it, for ``try`` and ``send``.

Sends the events of one SMTP session with Postfix's macros, honours what the
filter negotiated (skipped stages, no-reply stages), stops where Postfix
would stop (a reject at MAIL ends the transaction, a reject at RCPT drops
that recipient), and records every reply and action per stage.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..context import MAX_CHANGES, MAX_QUEUED
from ..protocol import events as ev
from ..protocol.codec import FrameReader, split_body
from ..protocol.constants import ALL_ACTIONS, ALL_PROTO, MDS_1M, Family
from ..protocol.errors import ProtocolError
from ..protocol.macros import letter_of
from ..protocol.table import COMMAND_OF_EVENT, REPLIES, REPLY_CODES, decode_reply, encode_command
from .message import Envelope, Message, angle, bare

VERDICTS = ("accept", "reject", "tempfail", "discard", "quarantine")


@dataclass
class Stage:
    """One event sent, and what came back."""

    name: str
    detail: str = ""
    reply: str = ""  # "continue", "reject", ... or "" when no reply was expected
    text: str = ""  # reply text of a `y` reply
    actions: list[ev.Reply] = field(default_factory=list)
    progress: int = 0
    failed: bool = False  # the conversation broke while this event was sent or its reply awaited


@dataclass
class Outcome:
    """Everything the conversation produced."""

    verdict: str = "accept"
    reply_text: str = ""
    stage: str = ""  # where the verdict was given
    stages: list[Stage] = field(default_factory=list)
    actions: list[ev.Reply] = field(default_factory=list)  # the EOM modifications
    rejected_rcpts: dict[str, str] = field(default_factory=dict)
    #: The envelope's recipients the MTA keeps: those rejected or tempfailed at RCPT dropped.
    recipients: list[str] = field(default_factory=list)
    negotiated: tuple[int, int, int] | None = None  # (version, actions, protocol) the filter answered
    error: str = ""


class ConversationError(Exception):
    """The filter broke the protocol or the connection."""


#: What a stage's reply is called in the report: a final reply's SMFIR_ name (ReplyCode: by its text).
_REPLY_NAMES = {r.reply: r.name.lower() for r in REPLIES if r.final and r.reply is not ev.ReplyCode}
#: Replies Postfix takes before the final one: modifications (at end of message only) and quarantine.
_ACTIONS = frozenset(r.reply for r in REPLIES if r.action)
#: Stage replies after which the session goes on. SKIP is a continue that also skips the
#: following events of that kind, whatever the event (Postfix's milter8_event, docs/protocol.md §8).
_GOES_ON = ("", "continue", "skip")


class Conversation:
    """Drives one connection; ``run`` returns the outcome (it never raises for a filter's verdict)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float | None = 30.0) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.frames = FrameReader(REPLY_CODES, MDS_1M)
        self.protocol = 0
        self.out = Outcome()
        self.skipping: type | None = None  # the kind of event the filter answered SKIP to, while they last
        self.frame_size = 0  # the data bytes of the last reply
        self.changes = 0  # the modifications kept, and their bytes (_hold)
        self.held = 0

    # ------------------------------------------------------------ wire

    def _send(self, *events: ev.Event) -> None:
        if self.writer.transport.is_closing():  # (asyncio drops it, and warns from the fifth on, unexplained)
            if all(isinstance(event, (ev.Abort, ev.Quit)) for event in events):
                return  # the end of a message or session, no reply awaited: a filter may close first
            raise self._lost()
        try:
            self.writer.write(b"".join(encode_command(e) for e in events))
        except RuntimeError:  # uvloop's, on a transport closed by a reset (asyncio's drops the bytes)
            raise ConversationError("the filter closed the connection") from None

    async def _drain(self) -> None:
        """Wait until the filter took what was sent, within ``timeout``: one that read no more (a
        body it takes without replies, SMFIP_NR_BODY, then stuck) held send for ever once the
        socket's buffers were full, as Postfix's milter_command_timeout counts the sending too.
        With nothing left in our buffer there is nothing to wait for: drain() at once, in this
        task, as before that limit (wait_for's task lets the loop first take a reset the filter
        sent after its last reply: `try` then called a stop after the verdict a failure)."""
        try:
            if not self.writer.transport.get_write_buffer_size():
                await self.writer.drain()
                return
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except asyncio.TimeoutError:
            where = self.out.stages[-1].name if self.out.stages else "option negotiation"
            raise ConversationError(f"the filter took no more data within {self.timeout:g} s "
                                    f"(sending at {where})") from None
        except ConnectionError as exc:  # (a reset, a broken pipe; asyncio's own "Connection lost" has no errno)
            raise self._lost(exc=exc) from None

    def _lost(self, doing: str = "sending", exc: OSError | None = None) -> ConversationError:
        """The connection broke while ``doing`` (the filter, or a balancer before it, died): said
        once, with the last event sent, where asyncio dropped the writes after it unexplained and
        a reset gave only the OS's words; the system's reason after it if it gave one (a reset
        while sending: the filter left what was sent unread)."""
        where = f"after {self.out.stages[-1].name}" if self.out.stages else "at option negotiation"
        why = f": {exc.strerror}" if exc is not None and exc.errno and exc.strerror else ""
        return ConversationError(f"the connection to the filter was lost while {doing} ({where}){why}")

    async def _recv(self) -> ev.Reply:
        """The next reply, within ``timeout`` for the whole of it: a filter that trickles it a byte
        at a time, each within the timeout, held the conversation for as long as it liked."""
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        while True:
            frame = self.frames.next_frame()
            if frame is not None:
                self.frame_size = len(frame[1])
                return decode_reply(*frame)
            try:
                left = None if deadline is None else max(deadline - loop.time(), 0.0)
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except asyncio.TimeoutError:
                where = self.out.stages[-1].name if self.out.stages else "option negotiation"
                raise ConversationError(f"no reply from the filter within {self.timeout:g} s "
                                        f"(waiting at {where})") from None
            except ConnectionResetError:  # (a filter killed mid-answer, SO_LINGER 0: an RST)
                raise self._lost("reading its reply") from None
            if not data:
                raise ConversationError("the filter closed the connection")
            self.frames.feed(data)

    async def _event(self, stage: Stage, macros: dict[str, str], event: ev.Event) -> Stage | None:
        """Send one event after its macros; wait for the reply unless the filter said not to."""
        if self.skipping is not None:
            if type(event) is self.skipping:
                return None  # Postfix sends neither the event nor its macros
            self.skipping = None
        spec = COMMAND_OF_EVENT[type(event)]
        macro = ev.Macro(spec.code, macros)  # named by the code of the command it precedes
        if self.protocol & spec.skip:
            self._send(macro)  # both MTAs send macros of skipped stages too
            return None
        self._send(macro, event)
        self.out.stages.append(stage)
        if self.protocol & spec.no_reply:
            await self._drain()
            return stage
        await self._drain()
        await self._reply(stage, eom=isinstance(event, ev.EndOfMessage))
        if stage.reply == "skip":
            self.skipping = type(event)
        return stage

    async def _reply(self, stage: Stage, eom: bool = False) -> None:
        while True:
            reply = await self._recv()
            if isinstance(reply, ev.Progress):
                stage.progress += 1
                continue
            if isinstance(reply, ev.ReplyCode):
                stage.reply = "reject" if reply.text[:1] == "5" else "tempfail"
                stage.text = reply.text
                return
            name = _REPLY_NAMES.get(type(reply))
            if name is not None:
                stage.reply = name
                return
            if type(reply) not in _ACTIONS:  # Postfix: "unexpected filter response", a tempfail
                raise ConversationError(f"{type(reply).__name__} sent at {stage.name}: neither a final reply "
                                        "nor an action")
            if not eom and not isinstance(reply, ev.Quarantine):
                raise ConversationError(f"{type(reply).__name__} sent at {stage.name}, outside end of message")
            self._hold(stage, reply)

    def _hold(self, stage: Stage, action: ev.Reply) -> None:
        """Keep an action, within what the milter itself lets one message have (context.py): a
        filter that sent them without end, each at once, grew the memory without end and the
        conversation never ended."""
        self.held += self.frame_size
        if isinstance(action, ev.ReplaceBody):
            pass
        elif self.changes >= MAX_CHANGES:
            raise ConversationError(f"the filter sent more than {MAX_CHANGES} modifications at end of message, more "
                                    "than a message may have (a loop in the filter?)")
        else:
            self.changes += 1
        if self.held > MAX_QUEUED:
            raise ConversationError(f"the filter sent more than {MAX_QUEUED >> 20} MiB of modifications at end of "
                                    "message, more than a message may hold (a loop in the filter?)")
        stage.actions.append(action)

    # ------------------------------------------------------------ the session

    async def run(self, env: Envelope, msg: Message) -> Outcome:
        self.out.recipients = list(env.recipients)  # all of them, unless the filter refuses some at RCPT
        try:
            await self._session(env, msg)
        except (ProtocolError, ConversationError, OSError, asyncio.TimeoutError) as exc:
            self.out.error = str(exc) or type(exc).__name__
            self.out.verdict = "tempfail"
            self.out.reply_text = f"milter failure: {self.out.error}"
            self.out.stage = self._failed_at()
        finally:
            self.writer.close()
        return self.out

    def _failed_at(self) -> str:
        """The stage the conversation broke at: the last event sent (an event is recorded when
        sent, its reply awaited before the next), marked failed unless it had its reply (the
        break came after: ABORT, QUIT); "negotiate" before any."""
        if not self.out.stages:
            return "negotiate"
        last = self.out.stages[-1]
        last.failed = not last.reply
        return last.name

    async def _session(self, env: Envelope, msg: Message) -> None:
        self._send(ev.OptionNegotiation(6, int(ALL_ACTIONS), int(ALL_PROTO)))
        await self._drain()
        answer = await self._recv()
        if not isinstance(answer, ev.OptionNegotiationReply):
            raise ConversationError(f"expected the option negotiation reply, got {type(answer).__name__}")
        self.protocol = answer.protocol
        self.out.negotiated = (answer.version, answer.actions, answer.protocol)
        defaults = {"j": "pytclmilter.localhost", "{daemon_name}": "pytclmilter", "v": "pytclmilter",
                    "_": f"{env.client_name} [{env.client_ip}]"}
        given = {letter_of(name) for name in env.macros}  # `{j}=x` replaces j, as `j=x` does
        conn_macros = {name: value for name, value in defaults.items() if letter_of(name) not in given}
        conn_macros.update(env.macros)
        family = Family.INET6 if ":" in env.client_ip else Family.INET
        steps: list[tuple[Stage, dict[str, str], ev.Event]] = [
            (Stage("connect", f"{env.client_name} [{env.client_ip}]"), conn_macros,
             ev.Connect(env.client_name, family, 25, env.client_ip)),
            (Stage("helo", env.helo), {}, ev.Helo(env.helo)),
        ]
        for stage, macros, event in steps:
            done = await self._event(stage, macros, event)
            if done is not None and done.reply not in _GOES_ON:
                return self._verdict(done, connection=True)
        await self._transaction(env, msg)
        self._send(ev.Quit())
        await self._drain()

    async def _transaction(self, env: Envelope, msg: Message) -> None:
        mail = await self._event(Stage("envfrom", angle(env.sender)), {"{mail_addr}": bare(env.sender)},
                                 ev.EnvFrom([angle(env.sender)]))
        if mail is not None and mail.reply not in _GOES_ON:
            return self._verdict(mail)
        kept: list[str] = []
        temporary = False
        for n, rcpt in enumerate(env.recipients):
            stage = await self._event(Stage("envrcpt", angle(rcpt)), {"i": env.queue_id, "{rcpt_addr}": bare(rcpt)},
                                      ev.EnvRcpt([angle(rcpt)]))
            if stage is None or stage.reply in _GOES_ON:
                kept.append(rcpt)
            elif stage.reply == "accept":
                # The whole message is accepted as far as this filter goes: Postfix sends it no more
                # events of the message (MILTER8_STAT_ACCEPT_MSG), only the ABORT that ends it.
                self.out.recipients = kept + list(env.recipients[n:])
                self._send(ev.Abort())
                return self._verdict(stage)
            elif stage.reply == "discard":
                return self._verdict(stage)
            else:
                self.out.rejected_rcpts[rcpt] = stage.text or stage.reply
                temporary = temporary or stage.reply == "tempfail"
        self.out.recipients = kept
        if not kept:
            # the client got 4xx for at least one recipient: it will try again later
            self.out.verdict, self.out.stage = ("tempfail" if temporary else "reject"), "envrcpt"
            self.out.reply_text = "no recipient accepted" if temporary else "all recipients rejected"
            self._send(ev.Abort())
            return
        qid = {"i": env.queue_id}
        content: list[tuple[Stage, ev.Event]] = [(Stage("data"), ev.Data())]
        content += [(Stage("header", f"{n}: {v}"), ev.Header(n, v)) for n, v in msg.headers]
        content.append((Stage("eoh"), ev.EndOfHeaders()))
        for stage, event in content:
            done = await self._event(stage, qid, event)
            if done is not None and done.reply not in _GOES_ON:
                self._send(ev.Abort())
                return self._verdict(done)
        for i, chunk in enumerate(split_body(msg.body)):
            done = await self._event(Stage("body", f"chunk {i + 1}, {len(chunk)} bytes"), qid, ev.Body(chunk))
            if done is not None and done.reply == "skip":
                break
            if done is not None and done.reply not in ("", "continue"):
                self._send(ev.Abort())
                return self._verdict(done)
        eom = Stage("eom")
        await self._event(eom, qid, ev.EndOfMessage())  # never skipped, always answered
        self.out.actions = list(eom.actions)
        self._send(ev.Abort())  # Postfix sends ABORT after every message
        if eom.reply in ("continue", "accept", "skip"):
            held = [a for a in eom.actions if isinstance(a, ev.Quarantine)]
            self.out.verdict, self.out.stage = ("quarantine", "eom") if held else ("accept", "eom")
            if held:
                self.out.reply_text = held[0].reason
            return
        self._verdict(eom)

    def _verdict(self, stage: Stage, connection: bool = False) -> None:
        reply = stage.reply
        if reply == "accept":
            self.out.verdict = "accept"
        elif reply == "skip":
            return
        else:
            self.out.verdict = reply
        self.out.stage = stage.name
        self.out.reply_text = stage.text


async def converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, env: Envelope, msg: Message,
                   timeout: float | None = 30.0) -> Outcome:
    return await Conversation(reader, writer, timeout).run(env, msg)
