"""Readings from /proc: CPU of a process tree and of the whole machine, memory and open files.

The machine may be shared (someone else's test suite): the CPU that processes outside the
measurement use is measured too, and reported as other%, so that a noisy figure shows as noisy.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

from milterbench import warn

CLK_TCK = os.sysconf("SC_CLK_TCK")
OTHER_LOAD_WARN = 10.0  # % of all CPUs used by processes that are not part of the measurement


def tcp_listening(port: int) -> bool:
    """A LISTEN socket on the port, read from /proc/net/tcp (no probe connection)."""
    want = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1].endswith(want) and fields[3] == "0A":
                return True
    return False


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, its live descendants and the children it reaped."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            stats[int(entry)] = data[data.rfind(")") + 2 :].split()
    if pid not in stats:
        return 0.0, 0.0
    children: dict[int, list[int]] = {}
    for p, f in stats.items():
        children.setdefault(int(f[1]), []).append(p)
    # fields after ")": state ppid pgrp ... utime(11) stime(12) cutime(13) cstime(14)
    user, system = int(stats[pid][13]), int(stats[pid][14])
    todo = [pid]
    while todo:
        p = todo.pop()
        f = stats[p]
        user += int(f[11])
        system += int(f[12])
        todo.extend(children.get(p, []))
    return user / CLK_TCK, system / CLK_TCK


def proc_cpu(pid: int) -> float:
    """CPU seconds (user+system) of a process, its live descendants and the children it reaped."""
    return sum(proc_cpu_split(pid))


def children_cpu() -> float:
    """CPU seconds of the children this process reaped (smtp-source, for one)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def box_busy() -> float:
    """CPU seconds the whole machine spent busy so far (all CPUs; /proc/stat minus idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def other_load_pct(busy: float, ours: float, seconds: float) -> float:
    """The share of all CPUs that other processes used: ``busy`` CPU seconds of the machine, of which
    ``ours`` were the measurement's own, over ``seconds``."""
    return max(0.0, busy - ours) / (seconds * (os.cpu_count() or 1)) * 100


_quiet_left = 0.0  # seconds wait_quiet may still spend waiting in this run


def set_quiet_budget(seconds: float) -> None:
    """How long wait_quiet may wait in all during this run (a busy machine must not stall a run)."""
    global _quiet_left
    _quiet_left = seconds


def wait_quiet(limit_pct: float, max_wait: float, ours_cpu: Callable[[], float]) -> float:
    """Wait (up to max_wait s, and within the run's budget) until other processes use less than
    limit_pct of the machine; ``ours_cpu`` gives the CPU seconds of the processes measured.

    A shared machine (someone else's test suite) would have its load measured as ours.
    Returns the last measured share of other load, in percent of all CPUs.
    """
    global _quiet_left
    start = time.monotonic()
    deadline = start + max(0.0, min(max_wait, _quiet_left))
    while True:
        b0, c0, t0 = box_busy(), ours_cpu(), time.monotonic()
        time.sleep(0.3)
        b1, c1, t1 = box_busy(), ours_cpu(), time.monotonic()
        other = other_load_pct(b1 - b0, c1 - c0, t1 - t0)
        if other <= limit_pct or time.monotonic() >= deadline:
            _quiet_left -= max(0.0, time.monotonic() - start - 0.3)
            if other > limit_pct:
                warn(f"other processes keep {other:.0f}% of the CPUs busy; measuring anyway")
            return other


def proc_status_kb(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def proc_nofile(pid: int) -> int:
    """The process's soft limit on open files (-1: unlimited or unknown)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return int(soft) if soft.isdigit() else -1
    return -1
