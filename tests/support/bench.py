"""scripts/bench's own logic (the package scripts/milterbench), for the tests that check it directly.

scripts/ is not installed (the benchmark is a developer tool, not part of the product), so the one
line below puts it on the path, once, for every test that imports this module.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from milterbench.build import loadgen_path, null_filter_path  # noqa: E402
from milterbench.callgrind import TICK, Profile, owner_sums, per_connection, self_by_function  # noqa: E402
from milterbench.load import KB4, MB1, Cell  # noqa: E402
from milterbench.report import engine_targets, ratio_lines, ratio_targets  # noqa: E402

__all__ = ["KB4", "MB1", "TICK", "Cell", "Profile", "engine_targets", "loadgen_path", "null_filter_path", "owner_sums",
           "per_connection", "ratio_lines", "ratio_targets", "self_by_function"]
