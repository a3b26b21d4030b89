"""An MTA's side of a filter connection, for tests/test_differential_libmilter.py.

:class:`Mta` plays one :class:`Scenario`: it negotiates with one of the MTAs' version 6 offers,
sends Postfix's or Sendmail's macro frames, and reacts to the replies as those MTAs do (a verdict
at CONNECT or HELO ends the connection, one at a message stage ends the message, Postfix sends
ABORT after every message...), as a generator for :func:`support.differential.converse`. A
scenario may name an invalid command (:data:`INVALID`) that the model slips in at a point where
it is out of order; from there on the driver asks before it waits for a reply.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Iterator

from .differential import SKIPPED, UNCERTAIN, Command, Model, Reply, offer
from .engine import RawMTA, z

# Skip and no-reply bits by command (docs/protocol.md §2, §4.3).
SKIP_BIT = {b"C": 0x1, b"H": 0x2, b"M": 0x4, b"R": 0x8, b"B": 0x10, b"L": 0x20, b"N": 0x40, b"U": 0x100,
            b"T": 0x200}
NR_BIT = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000, b"U": 0x20000, b"L": 0x80,
          b"N": 0x40000, b"B": 0x80000}
P_SKIP = 0x400
VERDICTS = frozenset({b"a", b"r", b"t", b"d", b"y"})  # final replies that end what they answer

#: Option negotiation offers by name: Postfix and Sendmail both offer all of version 6
#: (docs/protocol.md §4.1); the others are an MTA that cannot skip and one with fewer actions.
OFFERS = {
    "postfix": (6, 0x1FF, 0x1FFFFF),
    "sendmail": (6, 0x1FF, 0x1FFFFF),
    "no-skip": (6, 0x1FF, 0x1FFFFF & ~P_SKIP),
    "few-actions": (6, 0x3F, 0x1FFFFF),
}


class Ended(Exception):
    """The filter closed the connection: the MTA model stops."""


# ---------------------------------------------------------------- the MTA model


@dataclass
class Scenario:
    seed: int
    profile: str
    style: str  # "postfix" or "sendmail": which macros, and ABORT after every message or not
    offer: str
    instructions: list[str]
    invalid: str | None = None
    mta: "Mta | None" = None  # the model of the last run (did it slip its invalid command in?)

    def __str__(self) -> str:
        return (f"seed={self.seed} {self.profile} {self.style} offer={self.offer} invalid={self.invalid} "
                f"{self.instructions}")

    def model(self) -> Model:
        self.mta = Mta(self)
        return self.mta.run()


def invalid_frames(rnd: random.Random) -> dict[str, tuple[str, list[Command]]]:
    """The invalid commands: name -> (where the model slips it in, the frames). Headers go without
    waiting where SMFIP_NR_HDR was negotiated (Mta.hook)."""
    chunk = b"out of place\r\n"
    return {
        "rcpt_before_mail": ("between", [Command(b"R", z("<x@example.com>"), True)]),
        "data_before_mail": ("between", [Command(b"T", b"", True)]),
        "header_before_mail": ("between", [Command(b"L", z("Subject", "early"))]),
        "eoh_before_mail": ("between", [Command(b"N", b"", True)]),
        "body_before_mail": ("between", [Command(b"B", chunk, True)]),
        "eom_before_mail": ("between", [Command(b"E", b"", True)]),
        "abort_outside": ("between", [Command(b"A")]),
        "connect_again": ("between", [Command(b"C", RawMTA.connect_payload("again.example"), True)]),
        "data_before_rcpt": ("after_mail", [Command(b"T", b"", True)]),
        "eom_before_rcpt": ("after_mail", [Command(b"E", b"", True)]),
        "helo_mid_message": ("in_message", [Command(b"H", z("second.example"), True)]),
        "mail_mid_message": ("in_message", [Command(b"M", z("<again@example.org>"), True)]),
        "quit_nc_mid_message": ("in_message", [Command(b"K")]),
        "quit_nc_then_connect": ("in_message", [Command(b"K"),
                                                Command(b"C", RawMTA.connect_payload("next.example"), True)]),
        "unknown_in_headers": ("in_headers", [Command(b"U", z("XFOO in headers"), True)]),
        "unknown_then_helo": ("between_rcpts", [Command(b"U", z("XBAR"), True), Command(b"H", z("again"), True)]),
        "body_after_eom": ("after_eom", [Command(b"B", chunk, True)]),
        "header_after_eom": ("after_eom", [Command(b"L", z("X-Late", "late"))]),
        "eom_after_eom": ("after_eom", [Command(b"E", b"", True)]),
        "quit_nc_after_helo": ("after_helo", [Command(b"K")]),
        "optneg_again": ("anywhere", [Command(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF), True)]),
        "unknown_code": ("anywhere", [Command(rnd.choice([b"X", b"z", b"\x01", b"o", b"%"]), b"junk\0", True)]),
    }


INVALID = sorted(invalid_frames(random.Random(0)))

#: Values as the MTAs give the AUTH macros of MAIL (besides the generic ones of macro_pairs).
AUTH_VALUES = {"{auth_type}": ["PLAIN", "LOGIN"], "{auth_authen}": ["alice", "bob@example.org"],
               "{auth_author}": ["<alice@example.org>"], "{auth_ssf}": ["0", "256"]}

#: CONNECT's family and address (docs/protocol.md §2.1): as Postfix and Sendmail send them
#: (Sendmail writes an IPv6 address with its "IPv6:" tag, and uncompressed unless
#: UseCompressedIPv6Addresses), other spellings libmilter reads, and malformed ones.
CONNECT_ADDRESSES = [
    (b"4", "192.0.2.7"), (b"4", "192.0.2.7"), (b"4", "192.0.2.7"), (b"6", "2001:db8::7"), (b"6", "2001:db8::7"),
    (b"L", "/var/run/client"), (b"U", ""), (b"U", ""),
    (b"6", "IPv6:2001:db8::7"), (b"6", "IPv6:2001:db8:0:0:0:0:0:7"), (b"6", "ipv6:::1"), (b"6", "::ffff:192.0.2.7"),
    (b"6", "2001:DB8::A"), (b"4", "127.1"), (b"4", "192.0.2.007"), (b"4", "0x7f.0.0.1"), (b"L", ""),
    (b"4", "192.0.2.300"), (b"4", ""), (b"4", "2001:db8::7"), (b"6", "192.0.2.7"), (b"6", "fe80::1%eth0"),
    (b"4", "192.0.2.7 trailing"), (b"L", "/" + "p" * 107), (b"L", "/" + "p" * 106),
]

#: CONNECT payloads that break §2.1's layout: what follows the host name.
MALFORMED_CONNECT = [
    b"",  # no family byte
    b"X\x00\x19192.0.2.7\x00",  # an unknown family
    b"4",  # no port
    b"4\x00",  # half a port
    b"4\x00\x19",  # no address
    b"4\x00\x19192.0.2.7",  # no NUL after the address
    b"4\x00\x19192.0.2.7\x00junk\x00",  # two strings
    b"L\x00\x00/var/run/a\x00b\x00",  # two strings
    b"U\x00\x19192.0.2.7\x00",  # unknown, with a port and address after all
]


class Mta:
    """An MTA's side of one filter connection, reacting to the replies as Postfix or Sendmail."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.rnd = random.Random(scenario.seed)
        self.proto = 0
        self.last = b""  # the last command sent (macros aside) and its reply
        self.last_reply: Reply | None = None
        invalid = invalid_frames(self.rnd)
        self.inject_at, self.inject = invalid[scenario.invalid] if scenario.invalid else ("", [])
        self.injected = False

    # -- sending
    def send(self, command: Command) -> Iterator[Command]:
        reply = yield command
        if reply is None:
            raise Ended
        if command.code != b"D":
            self.last, self.last_reply = command.code, reply
        return reply

    def event(self, code: bytes, payload: bytes = b"") -> Iterator[Command]:
        """An event as the negotiation has it: skipped, or sent with or without waiting."""
        if self.proto & SKIP_BIT.get(code, 0):
            return SKIPPED
        return (yield from self.send(Command(code, payload, waits=not self.proto & NR_BIT.get(code, 0))))

    def macros(self, stage: str) -> Iterator[Command]:
        """The macro frame before an event; sent for a skipped event too (both MTAs), but for the
        content events: Postfix sends none for a skipped header, end of headers or body chunk
        (milter8.c registers no MIME callback for them), Sendmail none for a skipped end of headers."""
        pairs = self.macro_pairs(stage)
        if self.s.style == "sendmail" and (stage in "LBU" or not pairs):
            return
        if stage in ("LNB" if self.s.style == "postfix" else "N") and self.proto & SKIP_BIT[stage.encode()]:
            return
        payload = stage.encode() + b"".join(z(k, v) for k, v in pairs)
        yield from self.send(Command(b"D", payload))

    def macro_pairs(self, stage: str) -> list[tuple[str, str]]:
        rnd = self.rnd
        names = {"C": ["j", "{j}", "{daemon_name}", "_"], "H": ["{tls_version}", "{cipher}"],
                 "M": ["i", "{i}", "{mail_addr}", "{auth_type}", "{auth_authen}", "{auth_author}", "{auth_ssf}"], "R": ["i", "{rcpt_addr}"], "T": ["i", "{i}"],
                 "N": ["i", "{i}"], "E": ["i", "{i}"], "L": ["i"], "B": ["i"], "U": ["i"]}[stage]
        if rnd.random() < 0.15:
            return []
        chosen = rnd.sample(names, rnd.randint(1, len(names)))
        return [(n, rnd.choice(AUTH_VALUES.get(n, []) + [f"{stage}{rnd.randint(1, 9)}", f"v {stage}", "caf\u00e9",
                                                         "x@example.org"]))
                for n in chosen]

    def hook(self, point: str) -> Iterator[Command]:
        """Insert the scenario's invalid command here, maybe (True if so); from then on the driver
        asks before it waits for a reply (support.differential.converse)."""
        if self.injected or self.inject_at not in (point, "anywhere") or self.rnd.random() < 0.4:
            return False
        self.injected = True
        yield UNCERTAIN
        for command in self.inject:
            if command.code in NR_BIT:  # (a header waits for its reply where NR_HDR was not negotiated)
                command = Command(command.code, command.payload, not self.proto & NR_BIT[command.code])
            yield from self.send(command)
        return True

    # -- the conversation
    def run(self) -> Model:
        try:
            version, actions, protocol = OFFERS[self.s.offer]
            reply = yield from self.send(offer(version, actions, protocol))
            if reply[0] != b"O":
                return
            self.proto = struct.unpack_from("!III", reply[1])[2]
            sessions = self.rnd.choice([1, 1, 1, 2, 3])
            for n in range(sessions):
                if (yield from self.session()):
                    return
                last = n == sessions - 1
                if (last and self.rnd.random() < 0.9) or not (yield from self.quit_nc()):
                    break  # (after the last session's QUIT_NC, an empty one: QUIT or EOF right away)
            yield from self.hook("between")
            if self.rnd.random() < 0.8:
                yield from self.send(Command(b"Q"))
        except Ended:
            return

    def session(self) -> Iterator[Command]:
        """One SMTP session; True when a verdict ended the connection."""
        rnd = self.rnd
        yield from self.macros("C")
        reply = yield from self.event(b"C", self.connect_payload())
        if (yield from self.connection_verdict(reply)):
            return True
        for _ in range(rnd.choice([0, 1, 1, 1, 2])):
            yield from self.macros("H")
            reply = yield from self.event(b"H", z(rnd.choice(["client.example", "mail .example", "x\u00e9"])))
            if (yield from self.connection_verdict(reply)):
                return True
            yield from self.hook("after_helo")
        yield from self.hook("between")
        if rnd.random() < 0.2:
            yield from self.unknown()
        for _ in range(rnd.choice([1, 1, 2, 3] if self.inject else [0, 1, 1, 2, 3])):
            yield from self.message()
            yield from self.hook("between")
        return False

    def connect_payload(self) -> bytes:
        rnd = self.rnd
        host = rnd.choice(["client.example", "[192.0.2.7]"])
        if rnd.random() < 0.06:
            return z(host) + rnd.choice(MALFORMED_CONNECT)
        family, address = rnd.choice(CONNECT_ADDRESSES)
        return RawMTA.connect_payload(host, family, rnd.choice([0, rnd.randint(1, 65535)]), address)

    def connection_verdict(self, reply: Reply) -> Iterator[Command]:
        """After a verdict at CONNECT or HELO Postfix closes the filter connection, Sendmail quits it."""
        if reply[0] not in {b"a", b"r", b"t", b"y"}:  # (d and s mean nothing there)
            return False
        if self.s.style == "sendmail":
            yield from self.send(Command(b"Q"))
        raise Ended

    def quit_nc(self) -> Iterator[Command]:
        """QUIT_NC where libmilter takes it: after end of message or an unknown command (True if sent)."""
        if not (self.last == b"E" and self.last_reply == (b"c", b"")):
            reply = yield from self.unknown()
            if reply[0] in (b"a", SKIPPED[0]):  # (back in HELO, as after any accept; or no UNKNOWN sent)
                return False
        yield from self.send(Command(b"K"))
        return True

    def unknown(self) -> Iterator[Command]:
        yield from self.macros("U")
        return (yield from self.event(b"U", z(self.rnd.choice(["XFOO", "VRFY bob", "x\u00e9 y"]))))

    def message(self) -> Iterator[Command]:
        """One message: MAIL ... end of message, or abandoned at a stage (ABORT, or EOF)."""
        rnd = self.rnd
        stop = rnd.choice([None] * 8 + ["mail", "rcpt", "data", "header", "eoh", "body"])
        eof = stop is not None and rnd.random() < 0.25
        yield from self.macros("M")
        reply = yield from self.event(b"M", z(rnd.choice(["<a@example.org>", "<>"]),
                                              *rnd.sample(["SIZE=1234", "BODY=8BITMIME"], rnd.randint(0, 2))))
        if reply[0] in VERDICTS:
            return (yield from self.message_over())
        yield from self.hook("after_mail")
        yield from self.hook("in_message")
        if (yield from self.abandon(stop == "mail", eof)):
            return
        if not (yield from self.recipients()):
            return (yield from self.message_over())
        yield from self.hook("in_message")
        if (yield from self.abandon(stop == "rcpt", eof)):
            return
        skipped = False  # the filter answered SKIP to a body chunk: no more body, none in the EOM
        for stage, code, payloads in self.content():
            for payload in payloads:
                yield from self.macros(code.decode())
                reply = yield from self.event(code, b"" if code == b"E" and skipped else payload)
                if code == b"B" and reply[0] == b"s" and self.proto & P_SKIP:
                    skipped = True
                    break
                if code == b"E" or reply[0] in VERDICTS:
                    if code == b"E":
                        yield from self.hook("after_eom")
                    return (yield from self.message_over(finished=code == b"E"))
                if stage == "header" and reply != SKIPPED:
                    # (only after a header sent: with no DATA and no headers, an unknown command
                    # here follows RCPT, after which pytclmilter takes the EOM, docs/protocol.md
                    # §7.2, and libmilter leaves the MTA waiting for its reply)
                    yield from self.hook("in_headers")
            yield from self.hook("in_message")
            if (yield from self.abandon(stop == stage, eof)):
                return

    def recipients(self) -> Iterator[Command]:
        """RCPT one to three times (an unknown command between two); True if one was accepted."""
        rnd = self.rnd
        accepted = False
        count = rnd.choice([1, 1, 2, 3])
        for i in range(count):
            yield from self.macros("R")
            reply = yield from self.event(b"R", z(rnd.choice(["<b@example.com>", "<c@example.com>"]),
                                                  *(["NOTIFY=NEVER"] if rnd.random() < 0.2 else [])))
            if reply[0] in {b"a", b"d"}:  # accept or discard the whole message: nothing more of it is sent
                return False
            accepted = accepted or reply[0] not in {b"r", b"t", b"y"}
            if i < count - 1:
                yield from self.hook("between_rcpts")
                if rnd.random() < 0.15 and (yield from self.unknown())[0] in {b"a", b"d"}:
                    return False  # Postfix: nothing more of the message
        return accepted

    def content(self) -> list[tuple[str, bytes, list[bytes]]]:
        rnd = self.rnd
        headers = [z(*rnd.choice([("Subject", "hello"), ("From", "a@example.org"), ("X-Old", "folded\n\tvalue"),
                                  ("Subject", "caf\u00e9"), ("To", "")])) for _ in range(rnd.choice([0, 1, 2, 3]))]
        if not headers and self.proto & SKIP_BIT[b"N"] and not self.proto & (SKIP_BIT[b"T"] | SKIP_BIT[b"L"]):
            # DATA straight to the body or EOM: libmilter's table refuses it, pytclmilter takes it
            # (docs/protocol.md §7.2); libmilter would leave the MTA waiting.
            headers = [z("Subject", "hello")]
        chunks = [rnd.choice([b"line one\r\n", b"8-bit \xc3\xa9 and \xff\r\n", b"tab\there\r\n.\r\n", b"x" * 300])
                  for _ in range(rnd.choice([0, 1, 1, 2]))]
        last = b""
        if chunks and not self.proto & SKIP_BIT[b"B"] and rnd.random() < 0.2:
            last = chunks.pop()  # an MTA that sends the last chunk with the EOM (docs/protocol.md §2.4)
        return [("data", b"T", [b""]), ("header", b"L", headers), ("eoh", b"N", [b""]), ("body", b"B", chunks),
                ("eom", b"E", [last])]

    def abandon(self, here: bool, eof: bool) -> Iterator[Command]:
        """The client goes away (EOF) or resets (ABORT) here; True if it did."""
        if not here:
            return False
        if eof:
            raise Ended
        yield from self.send(Command(b"A"))
        return True

    def message_over(self, finished: bool = False) -> Iterator[Command]:
        """Postfix sends ABORT after every message (docs/protocol.md §10.1), Sendmail after one that
        ended before its end of message (an RSET after the recipients were refused, say)."""
        if self.s.style == "postfix" or not finished:
            yield from self.send(Command(b"A"))
