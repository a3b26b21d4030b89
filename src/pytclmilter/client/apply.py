"""End-of-message actions applied to a message as Postfix applies them (docs/protocol.md §6.2-§6.3).

Postfix counts header indexes after its own ``Received:`` header, which a
filter never sees; here the message has none, so indexes count the
message's own headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..protocol import events as ev
from .conversation import Outcome
from .message import Envelope, Message, angle


@dataclass
class Result:
    message: Message
    sender: str
    recipients: list[str]
    quarantine: str | None = None
    notes: list[str] = field(default_factory=list)


def delivered(outcome: Outcome, msg: Message, env: Envelope) -> Result | None:
    """What the MTA would deliver, for an accepted or quarantined message (else None): the
    recipients refused at RCPT are no longer in its envelope, as Postfix drops them."""
    if outcome.verdict not in ("accept", "quarantine"):
        return None
    return apply(outcome.actions, msg, replace(env, recipients=outcome.recipients))


def apply(actions: list[ev.Reply], msg: Message, env: Envelope) -> Result:
    headers = list(msg.headers)
    body_parts: list[bytes] | None = None
    rcpts = [angle(r) for r in env.recipients]
    result = Result(Message(headers, msg.body), angle(env.sender), rcpts)
    for action in actions:
        match action:
            case ev.AddHeader():
                headers.append((action.name, action.value))
            case ev.InsertHeader():
                headers.insert(min(action.index, len(headers)), (action.name, action.value))
            case ev.ChangeHeader():
                _change(headers, action)
            case ev.ReplaceBody():
                body_parts = (body_parts or []) + [action.chunk]
            case ev.AddRecipient():
                rcpts.append(angle(action.rcpt))
            case ev.DeleteRecipient():
                target = angle(action.rcpt)
                if target in rcpts:
                    rcpts.remove(target)
                else:
                    result.notes.append(f"delrcpt {action.rcpt}: no such recipient")
            case ev.ChangeFrom():
                result.sender = angle(action.sender)
            case ev.Quarantine():
                result.quarantine = action.reason
    if body_parts is not None:
        result.message.body = b"".join(body_parts)
    if not rcpts and any(isinstance(a, ev.DeleteRecipient) for a in actions):  # (docs/protocol.md §10.17)
        result.notes.append("no recipient left: the MTA answers 250 and delivers the message nowhere")
    return result


def _change(headers: list[tuple[str, str]], action: ev.ChangeHeader) -> None:
    """Nth header of that name (case-insensitive; 0 behaves as 1); empty value deletes; missing -> append."""
    wanted = max(action.index, 1)
    seen = 0
    for i, (name, _) in enumerate(headers):
        if name.lower() == action.name.lower():
            seen += 1
            if seen == wanted:
                if action.value:
                    headers[i] = (name, action.value)
                else:
                    del headers[i]
                return
    if action.value:
        headers.append((action.name, action.value))
