"""``scripts/bench idle``, scaled down: 50 idle milter connections to the Python filter.

It runs from this checkout's src/ (``python-pure``): the default ``python`` filter first
installs the checkout, compiled, into build/venv, a minute that tells nothing about this mode.

What a user sees: a result row for the filter with its KB of RSS per connection, the target
line, and the JSON file with every connection opened and none lost.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_idle_prints_kb_per_connection(tmp_path):
    out = tmp_path / "idle.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "idle", "--conns", "50", "--filters", "python-pure",
         "--settle", "0.3", "--timeout", "30", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # filter, connections, RSS before MB, RSS idle MB, KB/conn, RSS closed MB, open s, target
    row = re.search(r"^python-pure\s+50\s+[\d.]+\s+[\d.]+\s+(-?[\d.]+)\s+[\d.]+\s+[\d.]+\s+(MET|MISSED)$",
                    proc.stdout, re.M)
    assert row, proc.stdout
    assert re.search(r"^  python-pure: -?[\d.]+ KB per connection over 50 connections .*: (MET|MISSED)$",
                     proc.stdout, re.M), proc.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["filter"], run["conns"], run["opened"], run["lost"], run["error"]) == ("python-pure", 50, 50, 0, "")
    assert run["rss_before_kb"] > 0 and run["rss_idle_kb"] > 0
    assert run["fds_idle"] - run["fds_before"] >= 50  # the filter really held the connections
    assert abs(run["kb_per_conn"] - float(row.group(1))) < 0.1
