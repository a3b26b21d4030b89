"""A private redis-server for tests: Debian's binary on a loopback port, its files in a temp dir.

Nothing of the system's Redis is used (the Debian package may start a service on 6379, or not):
each :class:`RedisServer` runs its own process, without persistence (``--save ""``,
``--appendonly no``), and can be stopped and started again on the same port, to play an outage::

    server = RedisServer(tmp_path)
    server.start()
    ... server.url ...        # redis://127.0.0.1:PORT/0
    server.stop()             # the clients see "connection refused"
    server.start()            # empty again
    server.close()            # teardown

Readiness and the keys are checked with raw RESP over a socket: the client under test
(redis-py, inside the milter) is not the one that checks it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from support.postfix import free_port


class RedisServer:
    """One redis-server process on 127.0.0.1:``port`` (a free one by default)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; scripts/test does)")
        self.binary = binary
        self.dir = workdir / "redis"
        self.dir.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None, "already running"
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == b"+PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGTERM) and wait for it: its port refuses connections afterwards."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def command(self, *words: str, db: int | None = None) -> bytes:
        """One command in RESP, in database ``db`` if given; the first line of its reply (``+PONG``, ``:3``...)."""
        commands = [("SELECT", str(db)), words] if db is not None else [words]
        payload = b"".join(f"*{len(c)}\r\n".encode() + b"".join(
            f"${len(w.encode())}\r\n".encode() + w.encode() + b"\r\n" for w in c) for c in commands)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload)
            reply = b""
            while reply.count(b"\r\n") < len(commands):  # (SELECT's +OK, then the first line of the command's)
                data = s.recv(4096)
                if not data:
                    break
                reply += data
        return reply.split(b"\r\n")[len(commands) - 1]
