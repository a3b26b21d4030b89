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

Over TLS (``tls=tls_files(dir)``: a private CA and a certificate for 127.0.0.1 it signed, made
with the openssl CLI), the server listens on its TLS port only (``--port 0``); ``server.tls``
may be changed between a stop and a start (another CA's certificate, to play a server the
client must not trust)::

    server = RedisServer(tmp_path, tls=tls_files(tmp_path / "ca"))

Readiness and the keys are checked with raw RESP over a socket: the client under test
(redis-py, inside the milter) is not the one that checks it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from support.postfix import free_port


class TlsFiles(NamedTuple):
    """A CA's certificate, and a server certificate for 127.0.0.1 it signed with its key."""

    ca: Path
    cert: Path
    key: Path


def tls_files(where: Path) -> TlsFiles:
    """In ``where`` (made): a new CA (ca.pem) and a certificate for IP 127.0.0.1 it signed
    (server.pem, server.key). EC keys: some milliseconds each, where RSA takes a good part of a second."""
    where.mkdir(parents=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                     "-subj", f"/CN=test CA {where.name}"],
                    ["req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
                    ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                     "-out", "server.pem", "-days", "2", "-extfile", "san.ext"]):
        subprocess.run(["openssl", *command], cwd=where, check=True, capture_output=True, timeout=30)
    return TlsFiles(where / "ca.pem", where / "server.pem", where / "server.key")


class RedisServer:
    """One redis-server process on 127.0.0.1:``port`` (a free one by default), over TLS with ``tls``."""

    def __init__(self, workdir: Path, port: int | None = None, tls: TlsFiles | None = None) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; scripts/test does)")
        self.binary = binary
        self.dir = workdir / "redis"
        self.dir.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0, or over TLS rediss://127.0.0.1:PORT/0?ssl_ca_certs=CA (the
        CA of the files the server was made with)."""
        if self.tls is None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None, "already running"
        log = open(self.dir / "redis.log", "ab")
        ports = ["--port", str(self.port)] if self.tls is None else [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
            "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            [self.binary, *ports, "--bind", "127.0.0.1", "--dir", str(self.dir),
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
        with self._connect() as s:
            s.sendall(payload)
            reply = b""
            while reply.count(b"\r\n") < len(commands):  # (SELECT's +OK, then the first line of the command's)
                data = s.recv(4096)
                if not data:
                    break
                reply += data
        return reply.split(b"\r\n")[len(commands) - 1]

    def _connect(self) -> socket.socket:
        """A connection to the server; over TLS, the server's certificate checked against its CA."""
        plain = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        if self.tls is None:
            return plain
        try:
            return ssl.create_default_context(cafile=str(self.tls.ca)).wrap_socket(plain, server_hostname="127.0.0.1")
        except BaseException:
            plain.close()
            raise
