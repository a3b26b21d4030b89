"""Run TclMilter scripts under ``pytclmilter run`` and talk to them as the MTA.

Two halves:

* :class:`TclRun` -- one ``pytclmilter run SCRIPT.tcl`` process spawned with
  ``pexpect`` (so stdout and stderr come through one pty, in order).  A reader
  thread drains the pty all the time (a milter that logs a lot must never
  block on a full pty), :meth:`TclRun.wait_for` waits for a regex in the
  collected output, :attr:`TclRun.port` is the port of the last
  ``pytclmilter: NAME listening on inet:PORT@HOST`` line, :meth:`TclRun.stop`
  sends SIGTERM and returns the exit status.

* :class:`Mta` -- the MTA side of one milter connection.  Option negotiation
  and ordinary commands go through the PyPI ``miltertest`` package
  (``MilterConnection``); for 8-bit data (bodies, header values, addresses
  that are not UTF-8) and for replies miltertest cannot decode, frames are
  built and parsed right here, byte for byte.  Nothing here imports
  pytclmilter: the MTA side must be independent of the code under test.

  Like a real MTA, :class:`Mta` honours what the filter negotiated: an event
  whose skip bit (``SMFIP_NO*``) the filter asked for is not sent (the method
  returns ``SKIPPED``), and for an event under a no-reply bit (``SMFIP_NR_*``)
  no reply is read (the method returns ``NOREPLY``).

This module does not import pytest; register the factory in a test module::

    tclrun = pytest.fixture(tclrun_factory, name="tclrun")

    def test_x(tclrun):
        m = tclrun(SCRIPT)            # waits for the listening line
        with m.mta() as mta:
            mta.negotiate()
            assert mta.connect() == ("c", {})
        assert m.stop() == 0
"""

from __future__ import annotations

import codecs
import contextlib
import importlib.util
import os
import re
import select
import signal
import socket
import struct
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import miltertest
import pexpect
from miltertest import constants as K

LISTENING = re.compile(r"pytclmilter: (\S+) listening on (\S+)\r?\n")
REPO = Path(__file__).resolve().parents[2]

# Tcl procs for scripts: R reports a value, T runs a script and reports "OK result" or "ERR message".
TCL_HELPERS = r"""
proc R {key value} { puts "R\t$key\t$value" }
proc T {key script} {
    if {[catch {uplevel 1 $script} m]} { R $key "ERR $m" } else { R $key "OK $m" }
}
"""

#: What `run` logs at start as root without --user (tests run as root): not one of the warnings
#: a test counts.
ROOT_WARNING = "WARNING: serving as root without --user: "
#: Either wording of that warning: without --user, or with a --user of uid 0 ("--user root").
_ROOT_WARNINGS = re.compile(r"WARNING: serving as root (without --user|\(--user .* is uid 0\)): ")


def warnings(text: str) -> list[str]:
    """The WARNING lines of a run's output, but the root one of its start."""
    return [line for line in re.findall(r"^.* WARNING: .*$", text, re.M) if not _ROOT_WARNINGS.search(line)]


def link_local() -> tuple[str, str] | None:
    """An IPv6 link-local address of this host and its interface's name, if it has one."""
    with contextlib.suppress(OSError), open("/proc/net/if_inet6", encoding="ascii") as f:
        for line in f:
            hexaddr, _, _, scope, _, name = line.split()
            if scope == "20":  # IPV6_ADDR_LINKLOCAL
                return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr)), name
    return None


def ipv6_loopback() -> str | None:
    """Why ``::1`` cannot be listened on here (no IPv6, or lo without it), or None if it can."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback here: {exc.strerror or exc}"
    return None


SKIPPED = "skipped"  # the filter asked the MTA not to send this event
NOREPLY = "noreply"  # the filter asked the MTA not to wait for a reply

# Skip bit and no-reply bit of each event command.
_FLAGS = {
    "C": (K.SMFIP_NOCONNECT, K.SMFIP_NR_CONN),
    "H": (K.SMFIP_NOHELO, K.SMFIP_NR_HELO),
    "M": (K.SMFIP_NOMAIL, K.SMFIP_NR_MAIL),
    "R": (K.SMFIP_NORCPT, K.SMFIP_NR_RCPT),
    "T": (K.SMFIP_NODATA, K.SMFIP_NR_DATA),
    "U": (K.SMFIP_NOUNKNOWN, K.SMFIP_NR_UNKN),
    "L": (K.SMFIP_NOHDRS, K.SMFIP_NR_HDR),
    "N": (K.SMFIP_NOEOH, K.SMFIP_NR_EOH),
    "B": (K.SMFIP_NOBODY, K.SMFIP_NR_BODY),
}
FINAL = frozenset("acrtdy")  # replies that end an event (plus 's' for body)


def _pytclmilter_command() -> list[str]:
    """The ``pytclmilter`` installed beside this Python (what a user runs: with scripts/test, the
    compiled build), else one on PATH, else ``python -m pytclmilter.cli`` of this checkout."""
    dirs = [str(Path(sys.executable).parent), *os.environ.get("PATH", "").split(os.pathsep)]
    for d in dirs:
        exe = Path(d) / "pytclmilter"
        if exe.is_file() and os.access(exe, os.X_OK):
            return [str(exe)]
    return [sys.executable, "-m", "pytclmilter.cli"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a pytclmilter process: this checkout's src/ only when pytclmilter is not
    installed, so that an installed (compiled) build is the one under test."""
    env = dict(os.environ)
    if importlib.util.find_spec("pytclmilter") is None:
        env.setdefault("PYTHONPATH", str(REPO / "src"))
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------- the process


class TclRun:
    """One ``pytclmilter run`` process."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.argv = list(argv)
        self._buf: list[str] = []
        self._lock = threading.Lock()
        self._cursor = 0
        self._eof = threading.Event()
        self._stop = threading.Event()  # wait_exit: stop draining (a grandchild may hold the pty open)
        self.status: int | None = None
        full_env = child_env(env)
        self.child = pexpect.spawn(
            self.argv[0], self.argv[1:], env=full_env, cwd=cwd, encoding="utf-8",
            codec_errors="replace", timeout=None, echo=False, preexec_fn=preexec_fn, use_poll=True,
        )
        self._fd = os.dup(self.child.child_fd)  # the reader's own: close() cannot give its number to another file
        self._reader = threading.Thread(target=self._read, name=f"tclrun-{self.child.pid}", daemon=True)
        self._reader.start()
        self.name: str | None = None
        self.spec: str | None = None
        self.port: int | None = None

    # -- output

    def _read(self) -> None:
        """Drain the pty until every holder closed it (EIO) or its descriptor went away.

        The bytes are read here with os.read, not with pexpect's read_nonblocking: that one calls
        isalive() (a waitpid) when the pty is quiet, and wait_exit() calls it in the main thread,
        so the two raced for the child's status and the loser raised PtyProcessError in this thread.
        Now only the main thread asks for the status.
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = self._fd
        ready = select.poll()  # (select() fails past descriptor 1023: a test holding many clients)
        ready.register(fd, select.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    if not ready.poll(200):
                        continue
                    data = os.read(fd, 65536)
                except (OSError, ValueError):  # EIO: the pty's last holder closed it; EBADF: close()
                    break
                if not data:
                    break
                text = decoder.decode(data)
                with self._lock:
                    self._buf.append(text)
        finally:
            os.close(fd)
            with self._lock:
                self._buf.append(decoder.decode(b"", final=True))
            self._eof.set()

    @property
    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr, pty line ends)."""
        with self._lock:
            if len(self._buf) > 1:  # joined once, not on every poll of wait_for
                self._buf[:] = ["".join(self._buf)]
            return self._buf[0] if self._buf else ""

    @property
    def text(self) -> str:
        """:attr:`output` with LF line ends (the pty turns LF into CRLF, and Tcl's CRLF into CR CR LF)."""
        return re.sub(r"\r+\n", "\n", self.output)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, since: int | None = None,
                 advance: bool = True) -> re.Match[str]:
        """Wait until ``pattern`` matches the output after the cursor (or ``since``); move the cursor past it."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        start = self._cursor if since is None else since
        while True:
            out = self.output
            m = rx.search(out, start)
            if m:
                if advance:
                    self._cursor = m.end()
                return m
            if self._eof.is_set() or time.monotonic() > deadline:
                done = "the process ended" if self._eof.is_set() else f"{timeout}s passed"
                raise AssertionError(f"{rx.pattern!r} not seen ({done}); output so far:\n{out[start:]}")
            time.sleep(0.01)

    def results(self, tag: str = "R") -> dict[str, str]:
        """``TAG<tab>key<tab>value`` lines of the output (see :data:`TCL_HELPERS`) as a dict; later wins."""
        out = {}
        for line in self.text.splitlines():
            if line.startswith(tag + "\t"):
                _, key, value = (line.split("\t", 2) + [""])[:3]
                out[key] = value
        return out

    def mark(self) -> int:
        """A position in the output to search from later (``wait_for(..., since=mark)``)."""
        return len(self.output)

    def wait_listening(self, timeout: float = 15.0) -> int:
        m = self.wait_for(LISTENING, timeout)
        self.name, self.spec = m.group(1), m.group(2)
        pm = re.match(r"inet6?:(\d+)@", self.spec)
        self.port = int(pm.group(1)) if pm else None
        return self.port or 0

    # -- process

    def alive(self) -> bool:
        return self.status is None and self.child.isalive()

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to end; its exit code (or -signal)."""
        if self.status is not None:
            return self.status
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            if time.monotonic() > deadline:
                raise AssertionError(f"process did not exit within {timeout}s; output:\n{self.output}")
            time.sleep(0.02)
        self._eof.wait(5)
        self._stop.set()
        self._reader.join(5)
        st = self.child.exitstatus
        self.status = st if st is not None else -(self.child.signalstatus or 0)
        self.child.close(force=True)
        return self.status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` (SIGTERM) and wait; the exit status."""
        if self.status is None and self.child.isalive():
            self.child.kill(sig)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.status is None:
            try:
                if self.child.isalive():
                    self.child.kill(signal.SIGKILL)
                self.wait_exit(5)
            except Exception:  # noqa: BLE001 - teardown must not mask the test's failure
                pass

    # -- MTA side

    def mta(self, **kw: Any) -> "Mta":
        assert self.port, f"no inet port known (spec {self.spec})"
        return Mta(self.port, **kw)


def _write_whole(path: Path, text: str) -> None:
    """Write ``path`` by renaming a complete file over it. Tests start several runs of one script
    at once (``wait=False``), each spawn writing the same file: written in place, it was truncated
    while an earlier run read it, and that run sourced an empty script and ended (exit 0, nothing
    served, its log no further than the hot path line). A reader keeps the file it opened."""
    part = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def spawn(tmp_path: Path, script: str | Path, *options: str, args: Sequence[str] = (), python: Sequence[str] = (),
          connection: str | None = "inet:0@127.0.0.1", wait: bool = True, name: str = "milter.tcl",
          env: dict[str, str] | None = None, dedent: bool = True, prefix: Sequence[str] = (),
          preexec_fn: Callable[[], None] | None = None) -> TclRun:
    """Write ``script`` to ``tmp_path/name`` and run it; wait for the listening line unless ``wait=False``.

    A :class:`~pathlib.Path` is run as it is (not copied). ``python`` files
    (their text) are written next to the script and passed with ``--python``;
    ``args`` go after ``--``; ``prefix`` runs the command through another (e.g. ``nsenter``);
    ``preexec_fn`` runs in the child before it starts (e.g. to lower a resource limit).
    """
    if isinstance(script, Path):
        path = script
    else:
        path = tmp_path / name
        _write_whole(path, textwrap.dedent(script) if dedent else script)
    argv = [*prefix, *_pytclmilter_command(), "run", str(path)]
    if connection is not None:
        argv += ["--connection", connection]
    for i, src in enumerate(python):
        hook = tmp_path / f"hooks{i}.py"
        _write_whole(hook, textwrap.dedent(src))
        argv += ["--python", str(hook)]
    argv += list(options)
    if args:
        argv += ["--", *args]
    run = TclRun(argv, env=env, cwd=str(tmp_path), preexec_fn=preexec_fn)
    if wait:
        run.wait_listening()
    return run


def tclrun_factory(tmp_path: Path) -> Iterator[Callable[..., TclRun]]:
    """Generator fixture body: ``make(script, *options, **kw) -> TclRun``; every process is killed at teardown."""
    runs: list[TclRun] = []

    def make(script: str | Path, *options: str, **kw: Any) -> TclRun:
        run = spawn(tmp_path, script, *options, **kw)
        runs.append(run)
        return run

    try:
        yield make
    finally:
        for run in runs:
            run.kill()


# ---------------------------------------------------------------------------- the MTA side


def frame(code: str | bytes, payload: bytes = b"") -> bytes:
    """One milter packet: u32 length (code + payload), code, payload."""
    c = code.encode("latin-1") if isinstance(code, str) else code
    return struct.pack("!I", len(payload) + 1) + c + payload


def z(*strings: str | bytes) -> bytes:
    """NUL-terminated strings; ``str`` as UTF-8, ``bytes`` as they are."""
    return b"".join((s.encode() if isinstance(s, str) else s) + b"\0" for s in strings)


class Mta:
    """The MTA end of one milter connection (miltertest for plain text, raw frames for bytes)."""

    def __init__(self, port: int | str, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        """To ``host:port``, or with a ``str`` to that unix socket."""
        if isinstance(port, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(port)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.conn = miltertest.MilterConnection(self.sock)
        self.actions = 0
        self.protocol = 0
        self.macro_lists: dict[int, str] = {}

    def __enter__(self) -> "Mta":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- negotiation

    def negotiate(self, actions: int = K.SMFI_V6_ACTS, protocol: int = K.SMFI_V6_PROT) -> tuple[int, int]:
        """miltertest's strict optneg (fails on bits we did not offer, and on macro lists)."""
        self.actions, self.protocol = self.conn.optneg_mta(actions, protocol)
        return self.actions, self.protocol

    def negotiate_raw(self, actions: int = K.SMFI_V6_ACTS, protocol: int = K.SMFI_V6_PROT,
                      version: int = 6) -> tuple[int, int, dict[int, str]]:
        """OPTNEG by hand; also parses the macro lists miltertest refuses."""
        self.send_raw("O", struct.pack("!III", version, actions, protocol))
        code, payload = self.recv_raw()
        assert code == "O", (code, payload)
        _v, self.actions, self.protocol = struct.unpack_from("!III", payload)
        assert self.actions & ~actions == 0 and self.protocol & ~protocol == 0, "asked for bits not offered"
        rest, lists = payload[12:], {}
        while rest:
            (stage,) = struct.unpack_from("!I", rest)
            end = rest.index(b"\0", 4)
            lists[stage] = rest[4:end].decode()
            rest = rest[end + 1 :]
        self.macro_lists = lists
        return self.actions, self.protocol, lists

    # -- raw frames

    def send_raw(self, code: str, payload: bytes = b"") -> None:
        self.sock.sendall(frame(code, payload))

    def recv_raw(self, eof_ok: bool = False) -> tuple[str, bytes] | None:
        """The next packet as (code, payload bytes), progress packets included."""
        buf = self.conn.buf
        while len(buf) < 5 or len(buf) < 4 + struct.unpack_from("!I", buf)[0]:
            data = self.sock.recv(65536)
            if not data:
                if eof_ok and not buf:
                    self.conn.buf = b""
                    return None
                raise EOFError(f"EOF from the milter ({len(buf)} bytes pending)")
            buf += data
        (n,) = struct.unpack_from("!I", buf)
        code, payload = buf[4:5].decode("latin-1"), buf[5 : 4 + n]
        self.conn.buf = buf[4 + n :]
        return code, payload

    def reply_raw(self) -> tuple[str, bytes]:
        """The next reply that is not SMFIR_PROGRESS."""
        while True:
            r = self.recv_raw()
            assert r is not None
            if r[0] != "p":
                return r

    def eof(self, timeout: float = 5.0) -> bool:
        """True if the milter closed the connection (no further packet)."""
        self.sock.settimeout(timeout)
        try:
            return self.recv_raw(eof_ok=True) is None
        except (ConnectionResetError, EOFError):
            return True

    def event_raw(self, code: str, payload: bytes = b"") -> tuple[str, bytes] | str:
        """Send one event unless skipped; read its reply unless no-reply was negotiated."""
        skip, nr = _FLAGS.get(code, (0, 0))
        if self.protocol & skip:
            return SKIPPED
        self.send_raw(code, payload)
        if self.protocol & nr:
            return NOREPLY
        return self.reply_raw()

    # -- decoded (miltertest) events

    def event(self, cmd: str, **kw: Any) -> tuple[str, dict[str, Any]] | str:
        """Send one command with miltertest's codec; reply decoded by miltertest (UTF-8)."""
        skip, nr = _FLAGS.get(cmd, (0, 0))
        if self.protocol & skip:
            return SKIPPED
        self.conn._send(cmd, **kw)
        if self.protocol & nr:
            return NOREPLY
        return self.conn.recv()

    def macro(self, stage: str, **macros: str) -> None:
        self.conn.send_macro(stage, **macros)

    def connect(self, hostname: str = "client.example.net", address: str = "192.0.2.7", port: int = 40123,
                family: str = "4") -> Any:
        return self.event(K.SMFIC_CONNECT, hostname=hostname, family=family, port=port, address=address)

    def helo(self, name: str = "client.example.net") -> Any:
        return self.event(K.SMFIC_HELO, helo=name)

    def mail(self, *args: str) -> Any:
        return self.event(K.SMFIC_MAIL, args=list(args))

    def rcpt(self, *args: str) -> Any:
        return self.event(K.SMFIC_RCPT, args=list(args))

    def data(self) -> Any:
        return self.event(K.SMFIC_DATA)

    def header(self, name: str, value: str) -> Any:
        return self.event(K.SMFIC_HEADER, name=name, value=value)

    def eoh(self) -> Any:
        return self.event(K.SMFIC_EOH)

    def body(self, data: bytes) -> list[Any]:
        """Body in MTA-sized chunks (65535 bytes), raw; the replies (or SKIPPED/NOREPLY) per chunk."""
        out = []
        for i in range(0, len(data), K.MILTER_CHUNK_SIZE):
            out.append(self.event_raw("B", data[i : i + K.MILTER_CHUNK_SIZE]))
        return out

    def eom(self) -> list[tuple[str, bytes]]:
        """Send end of message; every packet up to and including the final reply, raw."""
        self.send_raw("E")
        out = []
        while True:
            r = self.recv_raw()
            assert r is not None
            out.append(r)
            if r[0] in FINAL:
                return out

    def abort(self) -> None:
        self.send_raw("A")

    def quit(self) -> None:
        self.send_raw("Q")

    def unknown(self, line: str) -> Any:
        return self.event_raw("U", z(line))

    def message(self, sender: str = "<sender@example.org>", rcpts: Sequence[str] = ("<rcpt@example.com>",),
                headers: Sequence[tuple[str, str]] = (("From", "sender@example.org"), ("Subject", "test")),
                body: bytes = b"Hello\r\n", macros: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
        """A whole transaction, each step's reply by name (``eom``: every packet, raw).

        ``macros`` maps a stage letter (M R T L N B E) to macros sent just before that command.
        """
        macros = macros or {}

        def before(stage: str) -> None:
            if stage in macros:
                self.macro(stage, **macros[stage])

        before("M")
        steps: dict[str, Any] = {"mail": self.mail(sender)}
        steps["rcpt"] = []
        for r in rcpts:
            before("R")
            steps["rcpt"].append(self.rcpt(r))
        before("T")
        steps["data"] = self.data()
        steps["headers"] = [self.header(n, v) for n, v in headers]
        before("N")
        steps["eoh"] = self.eoh()
        steps["body"] = self.body(body) if body else []
        before("E")
        steps["eom"] = self.eom()
        return steps


def ok(reply: Any) -> bool:
    """A reply that lets the MTA carry on: continue, or an event it did not send or wait on."""
    return reply in (SKIPPED, NOREPLY) or (isinstance(reply, tuple) and reply[0] == "c")


def children_of(parent: int) -> set[int]:
    """The live child processes of ``parent`` (the workers of a --workers supervisor)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                out.add(int(entry.name))
    return out
