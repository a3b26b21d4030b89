"""scripts/bench's own logic (the package scripts/milterbench), for the tests that check it directly.

scripts/ is not installed (the benchmark is a developer tool, not part of the product), so the one
line below puts it on the path, once, for every test that imports this module.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from milterbench.load import KB4, Cell  # noqa: E402
from milterbench.report import engine_targets  # noqa: E402

__all__ = ["KB4", "Cell", "engine_targets"]
