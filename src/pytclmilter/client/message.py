"""A message file (.eml) as an MTA would hand it to a milter, and the envelope around it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any, Final

from ..protocol.codec import text, wire


#: A header field's first line: a name of printable characters but the colon, then a colon
#: (blanks before it are the obsolete syntax of RFC 5322 §4.5.3, which Message.parse strips).
FIELD: Final = re.compile(rb"[!-9;-~]+[ \t]*:")


class Field(tuple[str, str]):
    """A header of the message file: (name, value) as the MTA sends it to the milter, and
    ``line``, the field as the file has it (folds as bare LF), which is what the MTA delivers
    while no filter changes it: ``Subject:\tHi`` or ``X-A:b`` as they are, not ``Subject: \tHi``."""

    line: str

    def __new__(cls, name: str, value: str, line: str) -> "Field":
        field = super().__new__(cls, (name, value))
        field.line = line
        return field

    def __reduce__(self) -> tuple[type["Field"], tuple[str, str, str]]:
        """copy and pickle make a Field again, its line with it (not a bare tuple)."""
        return Field, (self[0], self[1], self.line)


@dataclass
class Message:
    """Headers in order (name, value without the space after the colon, folds as bare LF) and body (CRLF)."""

    headers: list[tuple[str, str]]
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> "Message":
        """Split like Postfix: the header section ends at the first empty line, or at the first
        line that is neither a field nor a field's continuation, which begins the body (it was
        dropped, and the filter and the report never saw it); line ends become CRLF."""
        raw = raw.replace(b"\r\n", b"\n")
        headers: list[Field] = []
        # An mbox separator line (a single message saved from an mbox): no part of the message;
        # Postfix's sendmail skips it too.
        pos = raw.find(b"\n") + 1 or len(raw) if raw.startswith(b"From ") else 0
        while pos < len(raw):
            end = raw.find(b"\n", pos)
            end = len(raw) if end < 0 else end
            line = raw[pos:end]
            if line[:1] in (b" ", b"\t") and headers:
                last, fold = headers[-1], "\n" + text(line)
                headers[-1] = Field(last[0], last[1] + fold, last.line + fold)
            elif FIELD.match(line):
                raw_name, _, raw_value = line.partition(b":")
                raw_value = raw_value[1:] if raw_value[:1] == b" " else raw_value  # the MTA strips one space
                headers.append(Field(text(raw_name.rstrip()), text(raw_value), text(line)))
            else:
                if not line:
                    pos = end + 1  # the empty line that ends the header section
                break
            pos = end + 1
        return cls(list(headers), raw[pos:].replace(b"\n", b"\r\n"))

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def render(self) -> bytes:
        """The message as bytes with CRLF line ends: the file's headers as it has them, those a
        filter added or changed as the MTAs write them (one space after the colon)."""
        lines = [wire((h.line if isinstance(h, Field) else f"{h[0]}: {h[1]}").replace("\n", "\r\n"))
                 for h in self.headers]
        return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + self.body


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


def bare(address: str) -> str:
    """The address as Postfix and Sendmail give it in {mail_addr} and {rcpt_addr}: without the
    angle brackets of MAIL FROM/RCPT TO, however --from and --rcpt spelled it."""
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address
