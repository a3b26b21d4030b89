"""What a peer can make the protocol core keep for the life of the process: bounded however
many connections it opens, whatever it offers."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Callable

from pytclmilter.protocol import Wants, negotiate
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
