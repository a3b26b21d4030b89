"""The report of one conversation: stage by stage, the actions, the resulting message; text or JSON."""

from __future__ import annotations

import json
import re
from typing import Any

from ..logline import escape
from ..protocol import events as ev
from ..protocol.codec import text, wire
from .apply import Result
from .conversation import Outcome

#: Exit status per verdict (documented in docs/cli.md); 64+ are usage errors.
EXIT_CODES = {"accept": 0, "reject": 1, "tempfail": 2, "discard": 3, "quarantine": 4}


def describe(action: ev.Reply) -> str:
    match action:
        case ev.AddHeader():
            return f"addheader {action.name}: {action.value}"
        case ev.InsertHeader():
            return f"insheader at {action.index} {action.name}: {action.value}"
        case ev.ChangeHeader():
            what = "delete" if not action.value else f"-> {action.value}"
            return f"chgheader {action.name}[{action.index}] {what}"
        case ev.AddRecipient():
            return f"addrcpt {action.rcpt}{_args(action.args)}"
        case ev.DeleteRecipient():
            return f"delrcpt {action.rcpt}"
        case ev.ChangeFrom():
            return f"chgfrom {action.sender}{_args(action.args)}"
        case ev.ReplaceBody():
            return f"replacebody ({len(action.chunk)} bytes)"
        case ev.Quarantine():
            return f"quarantine {action.reason}"
    return type(action).__name__


def _args(args: str | None) -> str:
    return f" {args}" if args else ""


def _negotiated(answer: tuple[int, int, int] | None) -> dict[str, Any] | None:
    """The filter's option negotiation reply; None when it never gave one (no connection, or it
    broke before), rather than a version 0 no filter answered."""
    if answer is None:
        return None
    return {"version": answer[0], "actions": hex(answer[1]), "protocol": hex(answer[2])}


def as_dict(outcome: Outcome, result: Result | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "verdict": outcome.verdict,
        "stage": outcome.stage or None,  # (no connection: the text report's "at -")
        "reply": outcome.reply_text,
        "exit_status": EXIT_CODES.get(outcome.verdict, 2),
        "negotiated": _negotiated(outcome.negotiated),
        "stages": [
            {"stage": s.name, "detail": s.detail, "reply": s.reply or None, "text": s.text or None,
             "failed": s.failed, "progress": s.progress, "actions": [describe(a) for a in s.actions]}
            for s in outcome.stages
        ],
        "actions": [describe(a) for a in outcome.actions],
        "rejected_recipients": outcome.rejected_rcpts,
        "notes": result.notes if result is not None else [],
    }
    if outcome.error:
        doc["error"] = outcome.error
    if result is not None:
        doc["message"] = {
            "sender": result.sender,
            "recipients": result.recipients,
            "quarantine": result.quarantine,
            "text": text(result.message.render()),
        }
    return doc


def shown(s: str) -> str:
    """Text from the filter or the message for one report line, escaped as the log escapes it
    (logline.escape), so that it can neither start a line of its own (a forged "verdict:") nor
    send escape sequences to the terminal. Kept: tabs, a line break that folds a header (a
    space or tab follows it), and bytes that were not UTF-8, which printable() shows as \\xNN."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or c == "\t" or "\udc80" <= c <= "\udcff"
                   or (c == "\n" and s[i + 1 : i + 2] in (" ", "\t")) else escape(c)
                   for i, c in enumerate(s))


def printable(s: str) -> str:
    """Text for a terminal: bytes that are not UTF-8 (surrogate escapes) as \\xNN. Control
    characters were escaped where the text was put together (shown, wire_text)."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def as_text(outcome: Outcome, result: Result | None) -> str:
    lines = []
    for s in outcome.stages:
        reply = s.reply or ("(no reply: failed)" if s.failed else "(no reply expected)")
        extra = f' "{shown(s.text)}"' if s.text else ""
        prog = f" [{s.progress} progress]" if s.progress else ""
        detail = f" {shown(s.detail)}" if s.detail else ""
        lines.append(f"{s.name:8}{detail} -> {reply}{extra}{prog}")
        lines += [f"           action: {shown(describe(a))}" for a in s.actions]
    if outcome.error:
        lines.append(f"error: {shown(outcome.error)}")
    for rcpt, why in outcome.rejected_rcpts.items():
        lines.append(f"recipient {shown(rcpt)} rejected: {shown(why)}")
    reply = f' "{shown(outcome.reply_text)}"' if outcome.reply_text else ""
    lines.append(f"verdict: {outcome.verdict} at {outcome.stage or '-'}{reply}")
    if result is not None and outcome.verdict in ("accept", "quarantine"):
        lines += [f"note: {shown(note)}" for note in result.notes]
        lines.append(f"envelope: from {shown(result.sender)} to {shown(', '.join(result.recipients))}")
        lines.append("--- resulting message ---")
        lines.append(wire_text(result.message.render()))
    return printable("\n".join(lines))


#: Controls a message may hold that a terminal would act on: all of C0 but tab and LF, DEL, C1.
_MESSAGE_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def wire_text(raw: bytes) -> str:
    """Message bytes for a terminal: CRLF shown as LF, undecodable bytes as \\xNN, other
    controls (a lone CR, ESC: from the message or a filter's header) escaped as in the log."""
    shown_text = raw.replace(b"\r\n", b"\n").decode("utf-8", "backslashreplace").rstrip("\n")
    return _MESSAGE_CONTROLS.sub(lambda m: escape(m.group()), shown_text)


def to_json(outcome: Outcome, result: Result | None) -> str:
    """ASCII only, so that it prints whatever the terminal's encoding: other characters as JSON
    escapes (``\\u00e9``), and a byte that is not UTF-8 (a lone surrogate here) as ``\\udcNN``."""
    return json.dumps(as_dict(outcome, result), indent=2, ensure_ascii=True, default=str)


__all__ = ["EXIT_CODES", "as_dict", "as_text", "to_json", "describe", "wire"]
