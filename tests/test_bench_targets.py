"""``scripts/bench engine``'s Targets summary, from cells as a run measures them.

What a user reads after a run: each target MET or MISSED, and for the absolute ones (CPU per
message, p99) the same figure for the floor and libmilter of the run, so that a target this
machine cannot reach in its present phase is told from one the engine misses.
"""

from __future__ import annotations

from support.bench import KB4, MB1, Cell, engine_targets, ratio_lines, ratio_targets


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


def peers(per_conn: int, body: int = KB4, **rates: float) -> list[Cell]:
    """One 32-connection cell per filter at ``per_conn`` messages per connection: name=msgs/s."""
    return [Cell(name, 32, body, rate=rate, cpu_us=300.0, per_conn=per_conn) for name, rate in rates.items()]


def test_ratios_against_the_null_milter_pymilter_and_libmilter_in_one_run() -> None:
    # The table: 100 and 1 messages per connection, 4 KB, 32 connections.
    cells = (peers(100, null=15500, libmilter=3550, pymilter=2220, tcl=4580)
             + peers(1, null=5400, libmilter=2160, pymilter=1270, tcl=2300))
    assert ratio_lines(cells) == [
        "100 msg/conn, 32 conns, 4 KB: tcl 4580 msgs/s (300 us CPU/msg) = 0.30 x null 15500 msgs/s, "
        "2.06 x pymilter 2220 msgs/s, 1.29 x libmilter 3550 msgs/s",
        "1 msg/conn, 32 conns, 4 KB: tcl 2300 msgs/s (300 us CPU/msg) = 0.43 x null 5400 msgs/s, "
        "1.81 x pymilter 1270 msgs/s, 1.06 x libmilter 2160 msgs/s",
    ]
    assert ratio_targets(cells) == [
        "1 msg/conn, 32 conns, 4 KB: tcl = 0.43 x null (target >= 0.6x): MISSED",
        "1 msg/conn, 32 conns, 4 KB: tcl = 1.81 x pymilter (target >= 2x): MISSED",
        "100 msg/conn, 32 conns, 4 KB: tcl = 2.06 x pymilter (target >= 2x): MET",
        "100 msg/conn, 32 conns, 4 KB: tcl = 1.29 x libmilter (target >= 1.3x): MISSED",
    ]


def test_one_megabyte_bodies_compare_megabytes_per_second() -> None:
    cells = peers(1, MB1, null=400, tcl=330)
    assert ratio_lines(cells) == ["1 msg/conn, 32 conns, 1 MB: tcl 346 MB/s (300 us CPU/msg) = 0.82 x null 419 MB/s"]
    assert ratio_targets(cells) == ["1 msg/conn, 32 conns, 1 MB: tcl = 0.82 x null in MB/s (target >= 0.8x): MET"]


def test_ratios_are_taken_within_one_cell_only() -> None:
    # pymilter measured only at 100 messages per connection: no ratio for the 1-message cell.
    cells = peers(1, null=5000, tcl=3000) + peers(100, pymilter=2000)
    assert ratio_targets(cells) == ["1 msg/conn, 32 conns, 4 KB: tcl = 0.60 x null (target >= 0.6x): MET"]
