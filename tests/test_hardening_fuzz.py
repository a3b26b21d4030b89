"""The coverage-guided fuzzer's corpus, replayed through the protocol core on every test run.

``scripts/fuzz run`` fuzzes ``FilterSession`` with atheris; ``scripts/fuzz merge`` keeps the
inputs that add coverage in tests/fuzz-corpus/. Here each of them goes through the very same
harness (``one_input`` of scripts/fuzz: arbitrary splits, legal answers, only RemoteProtocolError
may end a session, bounded buffers, well-formed replies) without atheris, in well under a second.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import struct
import sys
from pathlib import Path

import pytest

from pytclmilter.protocol import NEED_DATA, FilterSession, Wants, negotiate
from pytclmilter.protocol import events as ev

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz-corpus"


def load_harness():
    loader = importlib.machinery.SourceFileLoader("fuzz_harness", str(ROOT / "scripts" / "fuzz"))
    spec = importlib.util.spec_from_loader("fuzz_harness", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_harness"] = module
    loader.exec_module(module)
    return module


fuzz = load_harness()
import fuzz_engine  # noqa: E402 - scripts/ is on the path once the harness is loaded
import fuzz_output  # noqa: E402
import fuzz_url  # noqa: E402
FILES = sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []


def test_the_corpus_is_there_and_small():
    assert 50 <= len(FILES) <= 500, len(FILES)
    assert sum(f.stat().st_size for f in FILES) < 1 << 20


def test_the_corpus_replays_through_the_core():
    for f in FILES:
        try:
            fuzz.checked_input(f.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{f.name}: {exc!r}") from exc


@pytest.mark.parametrize("name", sorted(fuzz.seeds()))
def test_the_seeds_replay_through_the_core(name):
    fuzz.checked_input(fuzz.seeds()[name])


def test_the_harness_answers_deep_into_sessions():
    """The corpus reaches end of message with modifications (not just early protocol errors)."""
    fuzz.STATS.__init__()
    for f in FILES:
        fuzz.checked_input(f.read_bytes())
    assert fuzz.STATS.events > 10 * len(FILES)  # events per input, on average
    assert fuzz.STATS.remote_errors < len(FILES)


@pytest.mark.parametrize("name", sorted(fuzz_engine.seeds()))
def test_the_engine_seeds_replay_through_a_tcl_script(name):
    """The engine target's seeds (scripts/fuzz_engine.py) go through its checks: a connection of a
    Tcl script, with async Python callbacks ahead of its own in some, answers each read as the
    protocol says, logs escaped lines, ends clean, also when the MTA goes away while one awaits."""
    fuzz_engine.one_input(fuzz_engine.seeds()[name])


@pytest.mark.parametrize("name", sorted(fuzz_url.seeds()))
def test_the_url_seeds_replay_through_the_greylists_store_check(name):
    """The url target's seeds (scripts/fuzz_url.py): a -store spec is taken (and redis-py's parser
    takes it too) or refused as a ConfigError that shows no password."""
    fuzz_url.one_input(fuzz_url.seeds()[name])


@pytest.mark.parametrize("name", sorted(fuzz_output.seeds()))
def test_the_output_seeds_replay_through_pythons_escaped_writes(name):
    """The output target's seeds (scripts/fuzz_output.py): Python's writes to stdout and stderr go
    out one whole, escaped line a write(), none past the fold."""
    fuzz_output.one_input(fuzz_output.seeds()[name])


def test_out_of_order_commands_ignored_silently_do_not_grow_memory():
    """Postfix sends an ABORT after every message, and a peer may send nothing but ABORTs: the
    session counts the ignored ones (FilterSession.ignored) and keeps nothing per command."""
    s = FilterSession()
    s.receive_data(struct.pack("!I", 13) + b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
    s.accept_negotiation(negotiate(s.next_event(), Wants()))
    abort = struct.pack("!I", 1) + b"A"
    for _ in range(100):
        s.receive_data(abort * 1000)
        while (event := s.next_event()) is not NEED_DATA:
            assert type(event) is not ev.Closed
    assert s.ignored == 100000
    assert not hasattr(s, "__dict__")  # (slots: nothing else can be growing on the session)
