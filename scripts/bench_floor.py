#!/usr/bin/env python3
"""The floor under every pytclmilter figure: uvloop and the kernel, with no engine at all.

Answers the benchmark workload (scripts/bench's `floor` filter) with canned replies: the same
negotiation reply pytclmilter computes for the bench script, `continue` to every command that
waits for one, `X-Bench: 1` and `continue` at end of message. Frames are split and nothing else:
no state machine, no macros, no callbacks, no log lines. What this process costs per message is
what accepting, reading, writing and closing a milter connection costs in Python on uvloop, so
the difference to the `tcl` and `python` filters is the engine's own work.

    scripts/bench_floor.py inet:8899@127.0.0.1 [--body]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
from pathlib import Path

try:
    import pytclmilter  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pytclmilter.connspec import parse  # noqa: E402
from pytclmilter.milter import new_event_loop  # noqa: E402
from pytclmilter.protocol import events as ev  # noqa: E402
from pytclmilter.protocol.codec import frame  # noqa: E402
from pytclmilter.protocol.negotiation import Wants, negotiate  # noqa: E402

_HEAD = struct.Struct("!Ic")
_CONTINUE = frame(b"c")
_EOM = frame(b"h", b"X-Bench\0" + b"1\0") + _CONTINUE


class Floor(asyncio.Protocol):
    def __init__(self, wants: Wants, replied: frozenset[bytes]) -> None:
        self.wants, self.replied = wants, replied
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf, pos, out = self.buf + data, 0, []
        while len(buf) - pos >= 5:
            length, code = _HEAD.unpack_from(buf, pos)
            if len(buf) < pos + 4 + length:
                break
            if code == b"O":
                offer = ev.OptionNegotiation(*struct.unpack_from("!III", buf, pos + 5))
                out.append(negotiate(offer, self.wants).wire)
            elif code == b"E":
                out.append(_EOM)
            elif code in self.replied:
                out.append(_CONTINUE)
            pos += 4 + length
        self.buf = buf[pos:]
        if out:
            self.transport.write(b"".join(out))


async def serve(connection: str, body: bool) -> None:
    events = {"connect", "envfrom", "envrcpt", "header"} | ({"body"} if body else set())
    wants = Wants(events=frozenset(events), no_reply=frozenset({"header"}))
    replied = frozenset({b"C", b"M", b"R"} | ({b"B"} if body else set()))
    spec = parse(connection)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Floor(wants, replied), spec.host, spec.port, backlog=4096)
    print(f"floor listening on {connection}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("connection", nargs="?", default="inet:8899@127.0.0.1")
    p.add_argument("--body", action="store_true", help="answer body chunks too (not skipped)")
    p.add_argument("--log-level", default="info", help="accepted for symmetry with the other filters; unused")
    opts = p.parse_args()
    loop = new_event_loop()
    if not type(loop).__module__.startswith("uvloop"):  # the floor of the uvloop figures, or nothing
        raise SystemExit(f"bench_floor: the event loop is {type(loop).__module__}, not uvloop (not importable, or "
                         "PYTCLMILTER_LOOP=asyncio): this floor would measure asyncio's own")
    try:
        loop.run_until_complete(serve(opts.connection, opts.body))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
