"""Soak, scaled down from ``scripts/soak`` (100 000 messages over 1 000 connections).

5 000 messages over 200 concurrent connections through ``pytclmilter run`` of a filter that uses
every event and private data on every message, plus a Python hook. The filter reports from an
``after`` timer the number of Tcl commands ``::tclmilter::*`` (one per open context) and its RSS,
and the hook the Context and ConnectionEngine objects alive; after the load they must be what they
were after the warm-up: no leaked contexts or private data.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_soak():
    loader = importlib.machinery.SourceFileLoader("soak_script", str(ROOT / "scripts" / "soak"))
    spec = importlib.util.spec_from_loader("soak_script", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_script"] = module
    loader.exec_module(module)
    return module


soak = load_soak()


def test_no_leak_after_5000_messages_over_200_connections(tmp_path, record_property):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    fig = soak.soak(5000, 200, 1000, interval=1.0, tolerance_mb=8, workdir=tmp_path)
    print(soak.report(fig))
    for key in ("rate", "rss_growth_kb", "peak_cmds", "peak_rss_kb"):
        record_property(key, getattr(fig, key))
    assert fig.ok, soak.report(fig)
    assert fig.peak_cmds > fig.end.cmds, "the sampling saw contexts open during the load"
    assert fig.end.cmds == fig.baseline.cmds
    assert fig.end.contexts == fig.end.engines == 0
