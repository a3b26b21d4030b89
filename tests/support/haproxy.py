"""A private, throw-away HAProxy in front of milters, for tests and the benchmark.

Why: a pool of milter instances sits behind a TCP balancer (Postfix's smtpd_milters is a chain,
not a pool), and the balancer's health check must speak milter.  This module runs the shipped
configuration, ``scripts/haproxy.cfg``, as users would -- only its ``bind`` line and its
``server`` lines are replaced (a free loopback port, the test's instances) and a private
``global`` section is put in front (an admin socket in the instance's directory) -- so the
documented configuration is the tested one.

Typical use::

    with PrivateHAProxy({"a": "127.0.0.1:12001", "b": "127.0.0.1:12002"}) as hap:
        hap.wait_status("a", "UP")
        pf = postfix(milter=hap.milter)          # inet:127.0.0.1:PORT, Postfix syntax
        hap.stats()["b"]["scur"]                 # sessions open on b now

Notes:

[H1]  ``haproxy -db`` stays in the foreground and writes its warnings -- every server state
      change, "Server pytclmilter/a is DOWN, reason: Layer7 timeout, ..." -- to stderr; the
      private global section logs to stdout, so the template's ``option tcplog`` adds one line
      per milter session (which server, how long, how it ended).  Both go to ``haproxy.log``
      (:meth:`log_text`); a state change appears twice, once per channel.
[H2]  Debian's haproxy package enables a system-wide haproxy.service; its stock configuration
      binds no port, and the private instance uses its own free port and admin socket, so
      the two never meet.  :func:`ensure_haproxy_installed` stops and disables it when it has
      just installed the package, so a test machine runs no balancer nobody asked for.
[H3]  ``show stat`` on the admin socket is CSV whose first line names the fields ("# pxname,
      svname,..."); ``status`` is UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" (going up),
      MAINT, DRAIN or "no check"; ``check_status`` is the last check's result (L7OK, L7TOUT,
      L7RSP, L4CON, ...); ``scur`` the sessions open on a server now.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from support.postfix import LOCALHOST, HarnessError, free_port, listening, wait_until
from support.service import PrivateService

HAPROXY = "/usr/sbin/haproxy"
REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "scripts" / "haproxy.cfg"
BACKEND = "pytclmilter"  # the backend section's name in the template

_BIND = re.compile(r"^(\s*bind\s+)\S+(.*)$", re.MULTILINE)
_SERVER = re.compile(r"^(\s*)server\s+\S+\s+\S+(.*)\n", re.MULTILINE)


def ensure_haproxy_installed() -> None:
    """Install Debian's haproxy if it is missing (CI starts from a bare machine) [H2]."""
    if os.access(HAPROXY, os.X_OK):
        return
    if os.geteuid() != 0:
        raise HarnessError("haproxy is not installed and we are not root to install it")
    lock_path = Path(tempfile.gettempdir()) / "pytclmilter-haproxy-install.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(HAPROXY, os.X_OK):
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "haproxy"]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise HarnessError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        if shutil.which("systemctl"):
            subprocess.run(["systemctl", "disable", "--now", "haproxy"], capture_output=True, check=False)
    if not os.access(HAPROXY, os.X_OK):
        raise HarnessError("haproxy package installed but /usr/sbin/haproxy is missing")


def render(template: str, bind: str, servers: Mapping[str, str]) -> str:
    """The template with its ``bind`` address and its ``server`` lines replaced.

    The first ``server`` line's position and trailing options are kept for every new line;
    ``servers`` maps a server name to HOST:PORT.
    """
    text, n = _BIND.subn(lambda m: f"{m.group(1)}{bind}{m.group(2)}", template, count=1)
    lines = list(_SERVER.finditer(text))
    if n != 1 or not lines:
        raise HarnessError("the HAProxy template has no bind line or no server line")
    indent, options = lines[0].group(1), lines[0].group(2)
    new = "".join(f"{indent}server {name} {addr}{options}\n" for name, addr in servers.items())
    start, end = lines[0].start(), lines[-1].end()
    return text[:start] + new + text[end:]


class PrivateHAProxy(PrivateService):
    """One HAProxy process running the shipped milter configuration on a free loopback port."""

    def __init__(self, servers: Mapping[str, str]) -> None:
        """``servers``: name -> HOST:PORT of each milter instance."""
        ensure_haproxy_installed()
        self.servers = dict(servers)
        self.root = Path(tempfile.mkdtemp(prefix="hap"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- paths and addresses

    @property
    def config_path(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def admin_socket(self) -> Path:
        return self.root / "admin.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "haproxy.log"

    @property
    def milter(self) -> str:
        """The balancer's address in Postfix's smtpd_milters syntax."""
        return f"inet:{LOCALHOST}:{self.port}"

    def config(self) -> str:
        """The configuration this instance runs: a private global section, then the template."""
        head = (
            "# written by tests/support/haproxy.py\n"
            "global\n"
            f"    stats socket {self.admin_socket} mode 600 level admin\n"
            "    log stdout format raw local0\n\n"
        )
        return head + render(TEMPLATE.read_text(), f"{LOCALHOST}:{self.port}", self.servers)

    # ---- lifecycle

    def start(self, attempts: int = 3) -> PrivateHAProxy:
        """Write the config, check it (``haproxy -c``), run it; retry on a lost port race."""
        last = ""
        for _ in range(attempts):
            self.port = free_port()
            self.config_path.write_text(self.config())
            check = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
            if check.returncode != 0:
                raise HarnessError(f"haproxy -c refused the configuration:\n{check.stdout}{check.stderr}")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                             start_new_session=True)
            try:
                wait_until(self._up, 10, message=lambda: f"haproxy did not start:\n{self.log_text()}")
                return self
            except (HarnessError, TimeoutError) as exc:  # (wait_until times out with TimeoutError)
                last = str(exc)
                self.stop()
                if "cannot bind" not in last:
                    raise
        raise HarnessError(f"haproxy could not start after {attempts} attempts: {last}")

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"haproxy exited {self.proc.returncode}:\n{self.log_text()}")
        return listening(self.milter) and self.admin_socket.exists()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop at once (SIGTERM is HAProxy's hard stop); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def archive(self, dest: str | os.PathLike[str]) -> Path:
        """Copy the config and the log to ``dest`` for post-mortems."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for path in (self.config_path, self.log_path):
            if path.is_file():
                shutil.copy2(path, dest / path.name)
        return dest

    # ---- observation and control

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One command on the admin socket (e.g. ``show stat``, ``set server B/S state drain``)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.admin_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def stats(self) -> dict[str, dict[str, str]]:
        """The backend's servers by name: their ``show stat`` fields [H3]."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(text.splitlines())
        return {r["svname"]: r for r in rows if r["pxname"] == BACKEND and r["svname"] in self.servers}

    def set_state(self, server: str, state: str) -> None:
        """``ready``, ``drain`` or ``maint`` for one server (drain: no new sessions)."""
        out = self.command(f"set server {BACKEND}/{server} state {state}").strip()
        if out:
            raise HarnessError(f"set server {server} state {state}: {out}")

    def wait_status(self, server: str, status: str, timeout: float = 10.0) -> dict[str, str]:
        """Wait until ``server``'s status is exactly ``status`` (UP, DOWN, ...); its stat row."""

        def reached() -> dict[str, str] | None:
            row = self.stats()[server]
            return row if row["status"] == status else None

        def why() -> str:
            row = self.stats().get(server, {})
            brief = {k: row.get(k) for k in ("status", "check_status", "check_desc", "scur")}
            return f"{server} is not {status}: {brief}\n{self.log_text()}"

        return wait_until(reached, timeout, interval=0.05, message=why)

    def log_text(self) -> str:
        """What HAProxy wrote so far: its server state changes [H1]."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""


def haproxy_factory(tmp_path_factory: Any) -> Iterator[Callable[..., PrivateHAProxy]]:
    """Generator fixture body: ``make(servers) -> PrivateHAProxy``, started.

    At teardown every instance is stopped, its config and log copied to a pytest tmp dir
    (printed in the failure's captured output) and its directory removed.
    """
    instances: list[PrivateHAProxy] = []

    def make(servers: Mapping[str, str]) -> PrivateHAProxy:
        hap = PrivateHAProxy(servers)
        instances.append(hap)
        return hap.start()

    try:
        yield make
    finally:
        for hap in reversed(instances):
            hap.stop()
            with contextlib.suppress(Exception):
                print(f"haproxy harness artifacts: {hap.archive(tmp_path_factory.mktemp('haproxy-artifacts'))}")
            hap.close()
