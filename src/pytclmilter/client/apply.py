"""End-of-message actions applied to a message as Postfix applies them (docs/protocol.md §6.2-§6.3).

Postfix counts header indexes after its own ``Received:`` header, which a
filter never sees; here the message has none, so indexes count the
message's own headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import events as ev
from .message import Envelope, Message, angle


@dataclass
class Result:
    message: Message
    sender: str
    recipients: list[str]
    quarantine: str | None = None
    notes: list[str] = field(default_factory=list)


def apply(actions: list[ev.Reply], msg: Message, env: Envelope) -> Result:
    headers = list(msg.headers)
    body_parts: list[bytes] | None = None
    rcpts = [angle(r) for r in env.recipients]
    result = Result(Message(headers, msg.body), angle(env.sender), rcpts)
    for action in actions:
        t = type(action)
        if t is ev.AddHeader:
            headers.append((action.name, action.value))  # type: ignore[attr-defined]
        elif t is ev.InsertHeader:
            index = min(action.index, len(headers))  # type: ignore[attr-defined]
            headers.insert(index, (action.name, action.value))  # type: ignore[attr-defined]
        elif t is ev.ChangeHeader:
            _change(headers, action)  # type: ignore[arg-type]
        elif t is ev.ReplaceBody:
            body_parts = (body_parts or []) + [action.chunk]  # type: ignore[attr-defined]
        elif t is ev.AddRecipient:
            rcpts.append(angle(action.rcpt))  # type: ignore[attr-defined]
        elif t is ev.DeleteRecipient:
            target = angle(action.rcpt)  # type: ignore[attr-defined]
            if target in rcpts:
                rcpts.remove(target)
            else:
                result.notes.append(f"delrcpt {action.rcpt}: no such recipient")  # type: ignore[attr-defined]
        elif t is ev.ChangeFrom:
            result.sender = angle(action.sender)  # type: ignore[attr-defined]
        elif t is ev.Quarantine:
            result.quarantine = action.reason  # type: ignore[attr-defined]
    if body_parts is not None:
        result.message.body = b"".join(body_parts)
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
