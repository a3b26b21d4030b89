"""``scripts/bench engine``'s Targets summary, from cells as a run measures them.

What a user reads after a run: each target MET or MISSED, and for the absolute ones (CPU per
message, p99) the same figure for the floor and libmilter of the run, so that a target this
machine cannot reach in its present phase is told from one the engine misses.
"""

from __future__ import annotations

from support.bench import KB4, Cell, engine_targets


def cells(**figures: tuple[float, float, float]) -> list[Cell]:
    """One 32-connection 4 KB cell per filter: name=(msgs/s, CPU µs, p99 ms)."""
    return [Cell(name, 32, KB4, rate=rate, cpu_us=cpu, p99_ms=p99) for name, (rate, cpu, p99) in figures.items()]


def test_absolute_targets_show_the_floor_and_libmilter_of_the_run() -> None:
    lines = engine_targets(cells(floor=(4117, 239, 13.08), libmilter=(2084, 673, 30.31),
                                 pymilter=(1219, 1228, 48.59), tcl=(2126, 462, 27.57)))
    assert lines[0] == "messages/s at 32 conns: tcl 2126 = 1.74 x pymilter 1219 (target >= 2x): MISSED"
    assert lines[1] == ("CPU per message at 32 conns: tcl 462 us (target <= 150 us): MISSED; same run: "
                        "floor 239 us, libmilter 673 us (the floor, with no engine, misses it too)")
    assert lines[2] == ("p99 latency at 32 conns: tcl 27.57 ms (target < 10 ms): MISSED; same run: "
                        "floor 13.08 ms, libmilter 30.31 ms (the floor, with no engine, misses it too)")


def test_a_floor_within_the_target_is_not_blamed() -> None:
    lines = engine_targets(cells(floor=(7458, 125, 8.0), pymilter=(1327, 964, 59.4),
                                 tcl=(2853, 313, 9.5)))
    assert lines[0].endswith("(target >= 2x): MET")
    assert lines[1] == ("CPU per message at 32 conns: tcl 313 us (target <= 150 us): MISSED; same run: "
                        "floor 125 us")
    assert lines[2] == "p99 latency at 32 conns: tcl 9.50 ms (target < 10 ms): MET; same run: floor 8.00 ms"


def test_without_reference_cells_the_lines_are_the_bare_targets() -> None:
    lines = engine_targets(cells(tcl=(3000, 140, 9.0)))
    assert lines == ["CPU per message at 32 conns: tcl 140 us (target <= 150 us): MET",
                     "p99 latency at 32 conns: tcl 9.00 ms (target < 10 ms): MET"]
