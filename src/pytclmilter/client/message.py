"""A message file (.eml) as an MTA would hand it to a milter, and the envelope around it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

from ..protocol.codec import text


@dataclass
class Message:
    """Headers in order (name, value without the space after the colon, folds as bare LF) and body (CRLF)."""

    headers: list[tuple[str, str]]
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> "Message":
        """Split like Postfix: header lines up to the first empty line; line ends become CRLF."""
        raw = raw.replace(b"\r\n", b"\n")
        head, sep, body = raw.partition(b"\n\n")
        if not sep and not re.match(rb"[!-9;-~]+:", head):
            head, body = b"", raw  # no header section at all
        headers: list[tuple[str, str]] = []
        for line in head.split(b"\n") if head else []:
            if line[:1] in (b" ", b"\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + "\n" + text(line))
                continue
            raw_name, colon, raw_value = line.partition(b":")
            if not colon:
                continue  # not a header line; Postfix would treat it as body, tests keep it simple
            raw_value = raw_value[1:] if raw_value[:1] == b" " else raw_value  # the MTA strips one space
            headers.append((text(raw_name.rstrip()), text(raw_value)))
        return cls(headers, body.replace(b"\n", b"\r\n"))

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def render(self) -> bytes:
        """The message as bytes with CRLF line ends (headers re-folded as received)."""
        from ..protocol.codec import wire

        lines = [wire(f"{n}: {v}".replace("\n", "\r\n")) for n, v in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


@dataclass
class Envelope:
    """Who talks to the MTA: client, HELO, sender, recipients, extra macros."""

    sender: str
    recipients: list[str]
    client_ip: str = "127.0.0.1"
    client_name: str = "localhost"
    helo: str = "localhost"
    macros: dict[str, str] = field(default_factory=dict)
    queue_id: str = "4TRY0000001"

    @classmethod
    def from_message(
        cls,
        msg: Message,
        sender: str | None = None,
        recipients: list[str] | None = None,
        **kw: Any,  # the other fields, passed on
    ) -> "Envelope":
        """Defaults from the message's headers: Return-Path or From for the sender, To/Cc/Bcc for recipients."""
        if sender is None:
            source = msg.header("Return-Path") or msg.header("From") or ""
            found = [a for _, a in getaddresses([source]) if a]
            sender = found[0] if found else ""
        if not recipients:
            fields = [v for n, v in msg.headers if n.lower() in ("to", "cc", "bcc")]
            recipients = [a for _, a in getaddresses(fields) if a] or ["postmaster@localhost"]
        return cls(sender=sender, recipients=list(recipients), **kw)


def angle(address: str) -> str:
    """The address as it appears in MAIL FROM/RCPT TO: with angle brackets."""
    address = address.strip()
    return address if address.startswith("<") else f"<{address}>"
