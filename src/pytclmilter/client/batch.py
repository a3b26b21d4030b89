"""The report of ``pytclmilter try`` on many messages: a line each, a summary, or a comparison of two scripts.

Everything here is one line per fact, and every string that comes from a
message or a script (a subject, a sender, a reply text, a header value) goes
through :func:`~pytclmilter.logline.escape`: an archive is untrusted, and a
subject must not be able to end a line or send escape sequences to a terminal.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from email.header import decode_header, make_header

from ..logline import escape
from ..protocol import events as ev
from .conversation import VERDICTS, Outcome
from .message import Envelope, Message, angle
from .report import describe


@dataclass(frozen=True)
class Verdict:
    """What one script did with one message: all that the MTA would act on, and nothing else,
    so that two scripts did the same exactly when their Verdicts are equal."""

    verdict: str
    stage: str
    reply: str
    modifications: tuple[str, ...]
    rejected: tuple[str, ...]  # "recipient <x> rejected: reply"
    error: str = ""

    @classmethod
    def of(cls, outcome: Outcome) -> "Verdict":
        rejected = tuple(f"recipient {r} rejected: {why}" for r, why in outcome.rejected_rcpts.items())
        return cls(outcome.verdict, outcome.stage, outcome.reply_text, modifications(outcome.actions), rejected,
                   outcome.error)

    def text(self) -> str:
        """``reject at envfrom "550 ...", 0 modifications`` (escaped)."""
        reply = f' "{escape(self.reply)}"' if self.reply else ""
        n = len(self.modifications)
        parts = [f"{self.verdict} at {self.stage or '-'}{reply}", f"{n} modification{'' if n == 1 else 's'}"]
        if self.rejected:
            k = len(self.rejected)
            parts.append(f"{k} recipient{'' if k == 1 else 's'} rejected")
        if self.error:
            parts.append(f"error: {escape(self.error)}")
        return ", ".join(parts)


def modifications(actions: list[ev.Reply]) -> tuple[str, ...]:
    """The end-of-message actions as text, the body's chunks as one ``replacebody`` with a digest
    (two new bodies of the same length differ by it); a quarantine is the verdict, not listed."""
    out: list[str] = []
    body = [a.chunk for a in actions if isinstance(a, ev.ReplaceBody)]
    for action in actions:
        if isinstance(action, ev.ReplaceBody):
            if body:
                data = b"".join(body)
                out.append(f"replacebody ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]})")
                body = []
        elif not isinstance(action, ev.Quarantine):
            out.append(describe(action))
    return tuple(out)


def about(env: Envelope, msg: Message) -> str:
    """Which message: its envelope sender and its subject (decoded), else its Message-ID."""
    parts = [f"from {escape(angle(env.sender))}"]
    subject = msg.header("Subject")
    if subject is not None:
        parts.append(f'subject "{escape(_decoded(subject))}"')
    else:
        msgid = msg.header("Message-ID")
        if msgid is not None:
            parts.append(f"id {escape(msgid)}")
    return ", ".join(parts)


def _decoded(value: str) -> str:
    """An RFC 2047 encoded header for a person to read; as it is when it cannot be decoded."""
    try:
        return str(make_header(decode_header(value.replace("\n", ""))))
    except (ValueError, LookupError, UnicodeError):
        return value


def line(label: str, what: str, verdict: Verdict) -> str:
    """One message of a batch: ``NAME: accept at eom, 1 modification; from <a@b>, subject "..."``."""
    return f"{escape(label)}: {verdict.text()}; {what}"


def error_line(label: str, error: str) -> str:
    """A message that was not tried."""
    return f"{escape(label)}: error: {escape(error)}"


class Tally:
    """The summary of a batch: messages by verdict, and those not tried."""

    def __init__(self) -> None:
        self.verdicts: Counter[str] = Counter()
        self.failed = 0  # not tried, or the conversation broke
        self.messages = 0

    def add(self, verdict: Verdict | None) -> None:
        self.messages += 1
        if verdict is None or verdict.error:
            self.failed += 1
        if verdict is not None:
            self.verdicts[verdict.verdict] += 1

    def text(self) -> str:
        n = self.messages
        counts = [f"{self.verdicts[v]} {v}" for v in VERDICTS if self.verdicts[v]]
        not_tried = self.messages - sum(self.verdicts.values())
        if not_tried:
            counts.append(f"{not_tried} not tried")
        return f"summary: {n} message{'' if n == 1 else 's'}" + (": " + ", ".join(counts) if counts else "")


def comparison(label: str, what: str, names: tuple[str, str], a: Verdict, b: Verdict) -> list[str]:
    """Two scripts' verdicts on one message: each side's verdict, then what only that side did."""
    width = max(len(escape(n)) for n in names)
    lines = [f"{escape(label)}: {what}"]
    for name, mine, theirs in ((names[0], a, b), (names[1], b, a)):
        lines.append(f"  {escape(name) + ':':{width + 1}} {mine.text()}")
        lines += [f"      {escape(item)}" for item in _only_in(mine.modifications + mine.rejected,
                                                             theirs.modifications + theirs.rejected)]
    return lines


def _only_in(mine: tuple[str, ...], theirs: tuple[str, ...]) -> list[str]:
    """The items of ``mine`` that ``theirs`` lacks, counting repeats, in ``mine``'s order."""
    left = Counter(theirs)
    out = []
    for item in mine:
        if left[item]:
            left[item] -= 1
        else:
            out.append(item)
    return out


def comparison_summary(messages: int, differ: int, not_tried: int) -> str:
    text = f"summary: {messages} message{'' if messages == 1 else 's'}, {differ} differ{'s' if differ == 1 else ''}"
    return text + (f", {not_tried} not tried" if not_tried else "")
