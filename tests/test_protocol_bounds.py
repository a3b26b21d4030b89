"""What a peer can make the protocol core keep for the life of the process: bounded however
many connections it opens, whatever it offers."""

from __future__ import annotations

import gc
import struct
import tracemalloc
from typing import Callable

from pytclmilter.protocol import FilterSession, RemoteProtocolError, Wants, negotiate
from pytclmilter.protocol import events as ev


def kept_by(work: Callable[[], None]) -> int:
    """The bytes ``work`` leaves allocated once its own garbage is gone."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_protocol_words_an_mta_offers_are_not_kept_one_each():
    """The offer's 32-bit protocol word was made a Proto flag, and Python keeps every flag value
    it ever made: about 460 bytes for good per distinct word, so a peer offering a new one on
    each connection grew the process without end (46 MB per 100 000 connections; 2 MB here)."""
    wants = Wants(events=frozenset({"header", "body"}))

    def offers() -> None:
        for word in range(1, 5_001):
            negotiate(ev.OptionNegotiation(6, 0x1FF, word << 8), wants)

    assert kept_by(offers) < 200_000


#: SMFIP_NOCONNECT ... SMFIP_NODATA: the bits that decide which states may be jumped over.
SKIP_BITS = (0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x100, 0x200)
PAYLOADS = {b"C": b"h\0U", b"H": b"x\0", b"M": b"<a>\0", b"R": b"<b>\0", b"L": b"a\0b\0", b"B": b"x", b"U": b"x\0",
            b"T": b"", b"N": b"", b"E": b""}
ASKS_EVERY_SKIP_BIT = Wants(events=frozenset())  # a filter with none of those callbacks


def frame(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload) + 1) + code + payload


def skip_offers() -> list[ev.OptionNegotiation]:
    """Offers with each of the 512 mixes of skip bits."""
    return [ev.OptionNegotiation(6, 0x1FF, sum(bit for i, bit in enumerate(SKIP_BITS) if mask >> i & 1))
            for mask in range(1 << len(SKIP_BITS))]


def one_command_after(offer: ev.OptionNegotiation, code: bytes) -> None:
    """A connection that negotiates ``offer``, then sends one command (mostly out of order)."""
    s = FilterSession(emit_macros=False)
    s.receive_data(frame(b"O", struct.pack("!III", offer.version, offer.actions, offer.protocol)))
    s.accept_negotiation(negotiate(s.next_event(), ASKS_EVERY_SKIP_BIT))
    s.receive_data(frame(code, PAYLOADS[code]))
    try:
        s.next_event()
    except RemoteProtocolError:
        pass


def test_offers_with_every_mix_of_skip_bits_do_not_grow_the_state_rule_answers():
    """The out-of-order rule's answers are kept per negotiated flags and pair of states: a peer
    offering each mix of skip bits in turn and sending commands out of order made them grow by
    half a megabyte here, for good (up to tens of megabytes with every pair of states)."""
    offers = skip_offers()
    for offer in offers:  # (the flag values of the answers: as many as there are mixes, once)
        negotiate(offer, ASKS_EVERY_SKIP_BIT)

    def commands() -> None:
        for offer in offers:
            for code in PAYLOADS:
                one_command_after(offer, code)

    assert kept_by(commands) < 200_000
