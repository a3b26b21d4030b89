"""pytclmilter against C libmilter: the same filter, the same conversations, the same results.

The filter (tests/support/difffilter.c on libmilter, tests/support/difffilter.tcl on
pytclmilter) logs every callback call with its arguments and macros and answers as a
per-conversation instruction says. Each generated conversation is driven against libmilter by an
MTA model that reacts to the replies as Postfix or Sendmail would (tests/support/differential.py),
then replayed byte for byte against pytclmilter; the two must agree on every reply frame, on
when the connection ends, and on every callback line, step by step.

Where pytclmilter departs from libmilter on purpose, docs/protocol.md says so, and each such
departure is one named entry of DEVIATIONS (or INSTRUCTION_DEVIATIONS) below, which turns what
libmilter did into what pytclmilter must do instead; nothing else may differ. Two live in
difffilter.c instead, where libmilter's own way would leave the MTA waiting for a reply and so
change the conversation: DEFERRED_HEADER_VERDICT and NOREPLY_WHERE_THE_MTA_WAITS.

The conversations come from a seeded generator: valid ones (negotiation with the MTAs' version 6
offer, with fewer actions or without SMFIP_SKIP; one or more SMTP sessions with QUIT_NC; filters
without the callbacks of connect, helo and unknown, data, headers, end of headers, the body, or
MAIL, RCPT and abort (PROFILES), so that the MTA skips those events but sends their macros;
CONNECT with each family, in the spellings the MTAs use (Sendmail's "IPv6:" tag) and others, and
malformed; messages, ABORT or EOF at every stage, the last body chunk carried by the end of
message now and then, verdicts with and without reply texts at every stage, end of message
actions; Postfix's and Sendmail's macro frames, the AUTH macros of MAIL among them), and invalid
ones: a command out of order or of an unknown code slipped into a valid one
(support.mta_model.INVALID).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from support.differential import (CFilter, Command, Run, Step, TclFilter, answered, build_difffilter, converse, offer,
                                  replay)
from support.mta_model import INVALID, OFFERS, P_SKIP, VERDICTS, Scenario

SEED = 20261207
VALID = 440
INVALID_RUNS = 264
#: Which callbacks each filter process leaves unregistered: every connection of a libmilter
#: process must negotiate the same skip bits (libmilter keeps them in a table shared by all).
#: Each skip bit a filter may ask for, alone or with others. (Not a filter without envfrom but
#: with abort: pytclmilter asks for MAIL without a reply there (docs/protocol.md §4.4, §7.5),
#: while libmilter's state table takes MAIL as skippable whatever was negotiated.)
PROFILES = {"full": (), "noconnect": ("connect",), "nohelo": ("helo", "unknown"), "nodata": ("data",),
            "noheaders": ("header",), "noeoh": ("eoh",), "nobody": ("body",),
            "content": ("data", "header", "eoh", "body"), "nomail": ("envfrom", "envrcpt", "abort")}
PROFILE_WEIGHTS = [16, 4, 2, 2, 2, 2, 2, 2, 2]

# ---------------------------------------------------------------- the generated scenarios

STAGES = ["connect", "helo", "envfrom", "envrcpt", "data", "unknown", "header", "eoh", "body", "eom"]
STATUSES = ["reject"] * 4 + ["tempfail"] * 3 + ["accept"] * 2 + ["discard"] * 2 + ["skip", "noreply", "continue"]
REPLY_TEXTS = ["", "", "", " 550 5.7.1 go away", " 451 4.7.1 try later", " 550", " 421 4.3.0 closing now",
               " 554 5.7.1", " 450 4.2.0 busy, sorry"]
ACTIONS = ["addheader", "insheader", "chgheader", "delheader", "addrcpt", "addrcpt_par", "delrcpt", "chgfrom",
           "chgfrom_par", "replacebody", "quarantine", "progress"]


def instructions(rnd: random.Random) -> list[str]:
    lines: dict[str, str] = {}
    for _ in range(rnd.choice([0, 1, 1, 2, 2, 3])):
        stage = rnd.choice(STAGES)
        key = stage if rnd.random() < 0.5 else f"{stage}#{rnd.randint(1, 3)}"
        lines[key] = rnd.choice(STATUSES) + rnd.choice(REPLY_TEXTS)
    if rnd.random() < 0.25:
        lines["actions"] = " ".join(rnd.sample(ACTIONS, rnd.randint(1, 5)))
    if rnd.random() < 0.03:
        lines["negotiate"] = rnd.choice(["reject", "tempfail", "accept"])
    return [f"{key} {value}" for key, value in lines.items()]


def scenarios() -> list[Scenario]:
    rnd = random.Random(SEED)
    out = []
    for n in range(VALID + INVALID_RUNS):
        style = rnd.choice(["postfix", "sendmail"])
        offer_name = rnd.choices([style, "no-skip", "few-actions"], [8, 1, 1])[0]
        out.append(Scenario(seed=rnd.getrandbits(32), profile=rnd.choices(list(PROFILES), PROFILE_WEIGHTS)[0], style=style,
                            offer=offer_name, instructions=instructions(rnd),
                            invalid=INVALID[n % len(INVALID)] if n >= VALID else None))
    return out


# ---------------------------------------------------------------- the documented deviations

Rerun = Callable[[list[Command], list[bool]], Run]
FINAL_CODES = frozenset({b"c", b"a", b"r", b"t", b"d", b"y", b"s"})
FINAL_BYTES = frozenset(b"cartdys")
ACTION_CODES = frozenset({b"h", b"i", b"m", b"+", b"2", b"-", b"e", b"b", b"q"})


def _code_at(run: Run, step: Step) -> bytes:
    return run.commands[int(step.at)].code if step.at.isdigit() else b""


def _final(step: Step, new: bytes) -> None:
    """Replace the step's final reply (its last frame) by ``new``, with no payload."""
    step.frames[-1] = (new, b"")


def unanswered_command_ends_the_session(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """A command the MTA waits on that libmilter leaves unanswered: either libmilter ended the
    session there (a code that is no command, docs/protocol.md §1.3), or the state table refused
    it even from HELO and libmilter dropped it without a word, leaving the MTA to its timeout
    (§7.3). pytclmilter ends the session at that command in both cases: as libmilter does when
    the MTA hangs up just before it."""
    index = _unanswered(run)
    if index == len(run.commands):
        return run
    steps = rerun(run.commands[:index], run.awaited[:index]).steps
    steps[-1].at = f"eof@{index}"
    return Run(run.commands, run.awaited, steps)


def _unanswered(run: Run) -> int:
    """The first command the MTA waited on that libmilter left unanswered (or the end): where
    pytclmilter ends the session, having taken the commands before it."""
    return next((i for i, (c, wait) in enumerate(zip(run.commands, run.awaited)) if c.waits and not wait),
                len(run.commands))


def skip_outside_the_body(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """docs/protocol.md §8: SKIP is sent only for a body chunk, and only when the MTA offered
    SMFIP_SKIP; elsewhere pytclmilter sends continue. Without SMFIP_SKIP it stops calling the
    body callbacks of the message instead, answering its further chunks with continue."""
    offered = OFFERS[scenario.offer][2] & P_SKIP
    skipping = False
    for step in run.steps:
        code = _code_at(run, step)
        if code in (b"M", b"A", b"E", b"H"):
            skipping = False
        if code == b"B" and skipping:
            step.lines = [line for line in step.lines if not line.startswith("body ")]
            _final(step, b"c")
        elif step.frames and step.frames[-1][0] == b"s" and (code != b"B" or not offered):
            _final(step, b"c")
            skipping = code == b"B"
    return run


def eom_chunk_answered_once(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """docs/protocol.md §2.4: when the body callback answers the chunk an EOM carries with other
    than continue, libmilter sends that answer and then its end-of-message answer too: two final
    replies to one command, which puts the MTA out of step. pytclmilter sends one: the verdict.
    (A SKIP there ends only the body in pytclmilter and its eom callbacks answer; no conversation
    of this SEED has one.)"""
    for step in run.steps:
        if _code_at(run, step) == b"E":
            finals = [i for i, (code, _) in enumerate(step.frames) if code[0] in FINAL_BYTES]
            if len(finals) == 2:
                del step.frames[finals[1]]
    return run


def discard_at_connect_or_helo(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """docs/protocol.md §8: DISCARD means nothing at CONNECT and HELO; pytclmilter sends continue."""
    for step in run.steps:
        if _code_at(run, step) in (b"C", b"H") and step.frames and step.frames[-1][0] == b"d":
            _final(step, b"c")
    return run


def actions_go_with_the_final_reply(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """docs/protocol.md §6.1, §6.4: the actions of an end of message are written with its final
    reply, and only when it lets the message through; a progress call is written at once. libmilter
    writes each action at its call, whatever the answer. pytclmilter also sends a replaced body
    after the other actions, as one run of frames, as Postfix requires (§6.3)."""
    order = {b"p": 0, b"b": 2}  # progress first, the replaced body last (§6.3)
    for step in run.steps:
        if _code_at(run, step) == b"E" and step.frames:
            final = step.frames[-1]
            kept = [f for f in step.frames[:-1] if f[0] not in ACTION_CODES or final[0] in (b"c", b"a", b"d", b"s")]
            step.frames = sorted(kept, key=lambda f: order.get(f[0], 1)) + [final]
    return run


def unknown_leaves_the_message_open(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """docs/protocol.md §7.2: after an unknown command in the middle of a message, HELO, MAIL,
    QUIT_NC, QUIT or EOF call the message's abort callbacks first in pytclmilter (libmilter's
    UNKNOWN state is outside any message): as libmilter does with an ABORT before that command."""
    taken = _unanswered(run)
    at = _after_unknown_in_message(run, taken)
    if not at:
        return run
    commands, awaited = run.commands[:taken], run.awaited[:taken]
    for index in reversed(at):
        commands.insert(index, Command(b"A"))
        awaited.insert(index, False)
    expected = rerun(commands, awaited)
    inserted = [index + n for n, index in enumerate(at)]
    for step in expected.steps:  # back to the indexes of the commands sent
        prefix, _, index = step.at.rpartition("@")
        if index.isdigit():
            original = int(index) - sum(1 for i in inserted if i < int(index))
            step.at = f"{prefix}@{original}" if prefix else str(original)
    expected.steps[-1].at = run.steps[-1].at  # (where the session ends: see the deviation above)
    return Run(run.commands, run.awaited, expected.steps)


def _after_unknown_in_message(run: Run, taken: int) -> list[int]:
    """Where a command that ends a message follows an unknown command that came between the
    envelope commands of one (the index of that command, or ``taken``: the end), as the MTA sees
    the transaction from the replies. (From DATA on, an unknown command is out of order: it
    aborts the message in both.)"""
    replies = {int(step.at): step.frames[-1][0] for step in run.steps if step.at.isdigit() and step.frames}
    at: list[int] = []
    stage, after_unknown = "", False  # stage: "" outside a message, "envelope", "content"
    for index, command in enumerate(run.commands[:taken]):
        code, reply = command.code, replies.get(index, b"")
        if code == b"D":
            continue
        if after_unknown and code in (b"H", b"M", b"K", b"Q"):
            at.append(index)
        after_unknown = stage == "envelope" and code == b"U" and reply != b"a"
        stage = _stage_after(stage, code, reply)
    if after_unknown:
        at.append(taken)
    return at


def _stage_after(stage: str, code: bytes, reply: bytes) -> str:
    if code == b"M":
        return "envelope" if reply not in VERDICTS else ""
    if code == b"R" or (code == b"U" and stage == "envelope"):
        return stage if reply != b"a" else ""
    if code in (b"T", b"L", b"N", b"B") and stage:
        return "content" if reply not in VERDICTS else ""
    return ""


def reply_text_ends_with_its_session(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """docs/protocol.md §6.5, §7.5: pytclmilter forgets the stored reply text at QUIT_NC, as the
    next SMTP session may be another client's; libmilter keeps it, and a later matching verdict
    in the next session sends it. Which text each callback set is its instruction's."""
    instruction = dict(line.split(" ", 1) for line in scenario.instructions)
    calls: dict[str, int] = {}
    stale = False  # libmilter holds a text from a session before a QUIT_NC; pytclmilter none
    lines = [line for step in run.steps for line in step.lines]
    seen = 0
    for step in run.steps:
        for line in step.lines:
            seen += 1
            name = line.split(" ", 1)[0]
            calls[name] = calls.get(name, 0) + 1
            spec = instruction.get(f"{name}#{calls[name]}", instruction.get(name, ""))
            if " " in spec:
                stale = False  # setreply in this session: both hold that text
            elif name == "close" and seen < len(lines):
                stale = True
        if stale and step.frames and step.frames[-1][0] == b"y":
            _final(step, b"r" if step.frames[-1][1][:1] == b"5" else b"t")
            stale = False
    return run


def no_close_for_an_empty_session(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """docs/protocol.md §7.5: a QUIT or EOF right after QUIT_NC, or a CONNECT there that ends the
    connection (§2.1), ends a session that never began: pytclmilter runs no close callbacks for
    it, libmilter runs them a second time."""
    last = max((i for i, command in enumerate(run.commands) if command.code == b"K"), default=None)
    lines = run.steps[-1].lines
    end = run.steps[-1].at.partition("@")[2]
    refused = end.isdigit() and [c.code for c in run.commands[int(end) - 1 : int(end) + 1]] == [b"K", b"C"]
    quit_after = last is not None and all(c.code == b"Q" for c in run.commands[last + 1 :])
    if (refused or quit_after) and [line.split(" ")[0] for line in lines[-2:]] == ["close", "close"]:
        del lines[-1]
    return run


def connect_address_is_one_string(scenario: Scenario, run: Run, rerun: Rerun) -> Run:
    """docs/protocol.md §2.1: pytclmilter refuses a CONNECT whose address is followed by more
    strings, and ends the session there; libmilter reads the first string and ignores the rest
    (as its decoder is strict elsewhere, pytclmilter guesses at no garbled frame)."""
    index = next((i for i, c in enumerate(run.commands) if c.code == b"C" and _connect_strings(c.payload) > 1), None)
    end = run.steps[-1].at.partition("@")[2]
    if index is None or (end.isdigit() and int(end) <= index):  # (it ended there, or before)
        return run
    steps = rerun(run.commands[:index], run.awaited[:index]).steps
    steps[-1].at = f"eof@{index}"
    return Run(run.commands, run.awaited, steps)


def _connect_strings(payload: bytes) -> int:
    """How many strings follow the port of a CONNECT payload (0 for family U or a short one)."""
    rest = payload[payload.find(b"\0") + 1 :]
    return rest[3:].count(b"\0") if rest[:1] in (b"4", b"6", b"L") else 0


def accept_from_negotiate_goes_on(instructions: list[str]) -> list[str]:
    """docs/protocol.md §4.4: pytclmilter takes SMFIS_ACCEPT from a negotiate callback as
    continue; libmilter ends the session for anything but continue (or SMFIS_ALL_OPTS). Turns
    the instructions pytclmilter follows into those libmilter follows to the same effect."""
    return [line.replace("negotiate accept", "negotiate continue") for line in instructions]


#: Each entry turns what libmilter did into what pytclmilter must do (in this order).
DEVIATIONS: list[Callable[[Scenario, Run, Rerun], Run]] = [
    unanswered_command_ends_the_session,
    unknown_leaves_the_message_open,
    reply_text_ends_with_its_session,
    connect_address_is_one_string,
    no_close_for_an_empty_session,
    eom_chunk_answered_once,
    skip_outside_the_body,
    discard_at_connect_or_helo,
    actions_go_with_the_final_reply,
]
#: ... and these the instructions libmilter follows from those pytclmilter follows.
INSTRUCTION_DEVIATIONS: list[Callable[[list[str]], list[str]]] = [accept_from_negotiate_goes_on]


def libmilter_instructions(scenario: Scenario) -> list[str]:
    lines = scenario.instructions
    for deviation in INSTRUCTION_DEVIATIONS:
        lines = deviation(lines)
    return lines


def expected(scenario: Scenario, run: Run, rerun: Rerun, needed: set[str]) -> list[Step]:
    """What pytclmilter must do, from what libmilter did; ``needed`` gets the names of the
    deviations that changed something."""
    for deviation in DEVIATIONS:
        before = repr(run.steps)
        run = deviation(scenario, run, rerun)
        if repr(run.steps) != before:
            needed.add(deviation.__name__)
    return run.steps


# ---------------------------------------------------------------- the test


@dataclass
class Filters:
    """One profile's processes: libmilter, a second libmilter to ask whether a command will be
    answered (support.differential.converse), pytclmilter."""

    libmilter: CFilter
    probe: CFilter
    pytclmilter: TclFilter

    def instruct(self, scenario: Scenario) -> None:
        self.libmilter.instruct(libmilter_instructions(scenario))
        self.probe.instruct(libmilter_instructions(scenario))
        self.pytclmilter.instruct(scenario.instructions)


@pytest.fixture(scope="module")
def filters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Filters]]:
    directory = tmp_path_factory.mktemp("differential")
    exe = build_difffilter(directory)
    started: list[CFilter | TclFilter] = []
    out: dict[str, Filters] = {}
    try:
        for profile, unregistered in PROFILES.items():
            libmilter = CFilter(exe, directory / f"libmilter-{profile}", unregistered)
            started.append(libmilter)
            probe = CFilter(exe, directory / f"probe-{profile}", unregistered)
            started.append(probe)
            tcl = TclFilter(directory / f"pytclmilter-{profile}", unregistered)
            started.append(tcl)
            out[profile] = Filters(libmilter, probe, tcl)
        yield out
    finally:
        for filt in started:
            filt.close()


def test_pytclmilter_answers_and_calls_back_as_libmilter_does(filters: dict[str, Filters]) -> None:
    """Every generated conversation: the same reply frames at the same points, the connection
    closed at the same point, the same callback lines in the same steps, but for DEVIATIONS."""
    mismatches: list[str] = []
    needed: set[str] = set()
    slipped_in: set[str | None] = set()
    for scenario in scenarios():
        f = filters[scenario.profile]
        f.instruct(scenario)
        needed |= {d.__name__ for d in INSTRUCTION_DEVIATIONS if d(scenario.instructions) != scenario.instructions}
        try:
            run = converse(f.libmilter, scenario.model(), lambda commands, awaited: answered(f.probe, commands, awaited))
        except TimeoutError:
            raise AssertionError(f"libmilter left the MTA waiting: {scenario}") from None
        if scenario.mta is not None and scenario.mta.injected:
            slipped_in.add(scenario.invalid)
        actual = replay(f.pytclmilter, run.commands, [command.waits for command in run.commands]).steps
        want = expected(scenario, run, lambda commands, awaited: replay(f.libmilter, commands, awaited), needed)
        if actual != want:
            mismatches.append(describe(scenario, run.commands, want, actual))
    assert not mismatches, f"{len(mismatches)} conversations differ; the first:\n\n" + "\n\n".join(mismatches[:3])
    assert needed == {d.__name__ for d in DEVIATIONS + INSTRUCTION_DEVIATIONS}, "a deviation no conversation needed"
    assert slipped_in == set(INVALID), "an invalid command no conversation had"


#: Offers no MTA of the generator makes: no flags (an old MTA's), the internal bits (data sizes and
#: the reserved one) set, a bit no version defines, and bit 31 (SMFIP_TEST in the protocol word).
ODD_OFFERS = [(6, 0, 0), (2, 0, 0), (6, 0x1FF, 0x1FFFFF | 0x70000000), (6, 0x1FF, 0x1FFFFF | 0x00400000),
              (6, 0x1FF, 0x1FFFFF | 0x80000000), (6, 0x800001FF, 0x1FFFFF)]
BIT31 = 0x80000000
#: libmilter reads each word signed and shows bit 31 sign-extended where unsigned long has 64
#: bits; pytclmilter shows the word as sent (docs/protocol.md §4.4).
SIGN_EXTENDED = re.compile(r"\b0xffffffff(?=[89a-f][0-9a-f]{7}\b)")


def test_the_negotiate_callback_is_shown_an_odd_offer_as_libmilter_shows_it(tmp_path: Path) -> None:
    """The negotiate callback got the MTA's numbers as sent: 0x0 0x0 for an offer of no flags,
    where libmilter's xxfi_negotiate gets the version-1 masks (0xf 0x3f) both negotiate by, and
    the internal bits libmilter keeps to itself. Each filter logs what its callback got. Bit 31
    is shown as sent, where libmilter sign-extends it (a documented departure)."""
    exe = build_difffilter(tmp_path)
    libmilter = CFilter(exe, tmp_path / "libmilter")
    try:
        tcl = TclFilter(tmp_path / "pytclmilter")
        try:
            for version, actions, protocol in ODD_OFFERS:
                sent = [offer(version, actions, protocol)]
                want = replay(libmilter, sent, [True]).steps[0].lines
                got = replay(tcl, sent, [True]).steps[0].lines
                assert want[:1] and want[0].startswith("negotiate "), want
                if (actions | protocol) & BIT31:
                    assert SIGN_EXTENDED.search(want[0]), want  # (libmilter's way, departed from)
                    want = [SIGN_EXTENDED.sub("0x", line) for line in want]
                assert got == want, (hex(actions), hex(protocol))
        finally:
            tcl.close()
    finally:
        libmilter.close()


def describe(scenario: Scenario, commands: list[Command], want: list[Step], actual: list[Step]) -> str:
    """A mismatch as a reader needs it: the scenario, what was sent, where the steps part."""
    out = [str(scenario)]
    out += [f"  sent {i}: {c.code!r} {c.payload[:60]!r}{' (waits)' if c.waits else ''}" for i, c in enumerate(commands)]
    for n in range(max(len(want), len(actual))):
        w = want[n] if n < len(want) else None
        a = actual[n] if n < len(actual) else None
        if w != a:
            out.append(f"  step {n}: expected (from libmilter) {w}\n  step {n}: pytclmilter            {a}")
    return "\n".join(out)
