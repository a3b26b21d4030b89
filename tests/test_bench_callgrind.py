"""``scripts/bench profile --tool callgrind``: whose instructions a dump holds, and what a
connection costs beyond its messages (``--per-conn 1,100``), as the report prints them."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.bench import TICK, Profile, owner_sums, per_connection, self_by_function

TCL = "/opt/tcl/lib/libtcl8.6.so"
PY = "/opt/python/lib/libpython3.11.so.1.0"

# A callgrind dump as valgrind writes it: names given once with their number, then by number
# alone; the cost line after calls= is the callee's inclusive cost, not the caller's own.
DUMP = f"""version: 1
creator: callgrind-3.19.0
positions: line
events: Ir
summary: 100

ob=(1) {TCL}
fl=(1) ???
fn=(1) Tcl_EvalObjv
0 30
cob=(2) {PY}
cfi=(2) ???
cfn=(2) PyObject_Call
calls=2 0
0 50
ob=(2)
fl=(2)
fn=(2)
0 40
+1 10
fn=(3) _PyEval_EvalFrameDefault
0 20
"""


def test_own_instructions_by_function_and_owner(tmp_path: Path) -> None:
    dump = tmp_path / "tcl.callgrind.1"
    dump.write_text(DUMP)
    total, own = self_by_function(dump)
    assert total == 100
    assert own == {(TCL, "Tcl_EvalObjv"): 30, (PY, "PyObject_Call"): 50, (PY, "_PyEval_EvalFrameDefault"): 20}
    assert owner_sums({k: float(v) for k, v in own.items()}) == {
        "Tcl (libtcl: the script, aliases, the event queue)": 30.0,
        "CPython (the interpreter, objects, its C modules, asyncio, logging)": 70.0}


def test_per_connection_takes_the_tick_out_by_its_idle_split(capsys: pytest.CaptureFixture[str]) -> None:
    # Idle, the tick is 80 % Tcl's and 20 % CPython's. At 1 message a connection the tick counted
    # 20 per message (two idle windows' worth), at 2 a connection 4: what is left of each owner is
    # the messages' and the connections' own work, 500 and 400 a message.
    idle = Profile(1, 10.0, {TICK: 10.0}, {(TCL, "Tcl_ServiceEvent"): 8.0, (PY, "take_gil"): 2.0})
    few = Profile(300, 520.0, {TICK: 20.0},
                  {(TCL, "Tcl_EvalObjv"): 216.0, (TCL, "Tcl_ServiceEvent"): 16.0, (PY, "take_gil"): 288.0})
    many = Profile(600, 404.0, {TICK: 4.0},
                   {(TCL, "Tcl_EvalObjv"): 166.0, (TCL, "Tcl_ServiceEvent"): 3.2, (PY, "take_gil"): 234.8})
    per_connection(few, many, [1, 2], idle, top=2)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "per connection, beyond its messages (1 against 2 a connection; the tick taken out):"
    assert out[1] == "          200  the whole process: 40.0 % of a message at 1 a connection"
    owners = out[out.index("  by whose code (each object's own; they sum to 200, the tick taken out by its idle "
                           "split):") + 1:][:2]
    assert sorted(owners) == [
        "          100   50.0 %  CPython (the interpreter, objects, its C modules, asyncio, logging)",
        "          100   50.0 %  Tcl (libtcl: the script, aliases, the event queue)"]
    functions = out[-2:]
    assert sorted(functions) == ["          100  Tcl_EvalObjv  (Tcl)", "          100  take_gil  (CPython)"]
