"""Connecting to a milter, and ``send --count N --concurrency C``: a load generator with percentiles."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..connspec import ConnSpec
from .conversation import Outcome, converse
from .message import Envelope, Message
from .report import shown


async def connect(spec: ConnSpec) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if spec.family == "unix":
        return await asyncio.open_unix_connection(sock=_unix_socket(spec.path))
    host = spec.host or ("127.0.0.1" if spec.family == "inet" else "::1")
    return await asyncio.open_connection(host, spec.port)


def _unix_socket(path: str) -> socket.socket:
    """A socket connected to ``path`` as Postfix connects to a milter: when the filter's listen
    queue is full, the connection fails at once (EAGAIN, "Resource temporarily unavailable"; a
    unix socket has no connection under way). asyncio's own connect took EAGAIN for one under
    way, went on as if connected and failed at the first write with "Invalid argument"."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


async def one(spec: ConnSpec, env: Envelope, msg: Message, timeout: float | None = 30.0) -> Outcome:
    try:
        reader, writer = await asyncio.wait_for(connect(spec), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        why = str(exc) or f"no answer within {timeout:g} s"  # (a TimeoutError says nothing)
        return Outcome(verdict="tempfail", error=f"cannot connect to {spec}: {why}")
    return await converse(reader, writer, env, msg, timeout)


@dataclass
class LoadResult:
    count: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    verdicts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    def as_dict(self) -> dict[str, Any]:
        """The summary as ``send --count N --json`` prints it: seconds and milliseconds as numbers."""
        return {
            "messages": self.count,
            "seconds": round(self.seconds, 3),
            "messages_per_second": round(self.count / self.seconds, 1) if self.seconds else 0.0,
            "latency_ms": {name: round(self.percentile(p) * 1000, 2)
                           for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "verdicts": dict(sorted(self.verdicts.items())),
            "errors": dict(self.errors.most_common()),
        }

    def summary(self) -> str:
        rate = self.count / self.seconds if self.seconds else 0.0
        p50, p90, p99, top = (self.percentile(p) * 1000 for p in (50, 90, 99, 100))
        lines = [
            f"messages: {self.count} in {self.seconds:.2f} s = {rate:.0f} messages/s",
            f"latency ms: p50 {p50:.2f}  p90 {p90:.2f}  p99 {p99:.2f}  max {top:.2f}",
            "verdicts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.verdicts.items())),
        ]
        if self.errors:
            # (escaped as send's other lines: a spec or an error may carry a newline or an ESC)
            lines.append("errors: " + "; ".join(f"{v}x {shown(k)}" for k, v in self.errors.most_common(5)))
        return "\n".join(lines)


async def load(spec: ConnSpec, env: Envelope, msg: Message, count: int, concurrency: int,
               progress: TextIO | None = sys.stderr, timeout: float = 30.0) -> LoadResult:
    """Send ``count`` messages over ``concurrency`` parallel connections, one message per connection."""
    result = LoadResult(count, 0.0)
    todo = iter(range(count))
    start = time.perf_counter()

    async def worker() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            outcome = await one(spec, env, msg, timeout)
            result.latencies.append(time.perf_counter() - t0)
            result.verdicts[outcome.verdict] += 1
            if outcome.error:
                result.errors[outcome.error] += 1

    async def reporter() -> None:
        while True:
            await asyncio.sleep(0.5)
            done = len(result.latencies)
            rate = done / (time.perf_counter() - start)
            if progress is not None:
                progress.write(f"\r{done}/{count} messages, {rate:.0f} messages/s ")
                progress.flush()

    ticker = asyncio.ensure_future(reporter())
    try:
        # (no more workers than messages: --concurrency 3000000 made 3 GB of them for two messages)
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    finally:
        ticker.cancel()
    result.seconds = time.perf_counter() - start
    if progress is not None:
        progress.write(f"\r{count}/{count} messages, {count / result.seconds:.0f} messages/s\n")
    return result
