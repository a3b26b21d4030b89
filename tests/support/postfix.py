"""A private, throw-away Postfix instance for integration tests.

Why: a milter engine is only proven once a real MTA talks to it.  This module
starts a *separate* Postfix instance (own config, queue and data directories,
own random ports, bound to 127.0.0.1 only) whose only delivery target is
Postfix's own ``smtp-sink`` test server, which dumps every received message to
a file.  Tests send mail with :meth:`PrivatePostfix.send`, then look at what
reached the sink (:meth:`PrivatePostfix.wait_for_sink`), what is left in the
queue (:meth:`PrivatePostfix.queue`) and what Postfix logged
(:meth:`PrivatePostfix.log_text`).

Typical use::

    with PrivatePostfix(milter="inet:127.0.0.1:12345") as pf:
        result = pf.send("a@example.org", ["b@example.com"], message_bytes)
        assert result.accepted, result
        (msg,) = pf.wait_for_sink(1)
        assert msg.message["X-Added-By-Milter"] == "yes"

From a ``conftest.py``::

    from tests.support.postfix import postfix_factory
    postfix = pytest.fixture(postfix_factory, name="postfix")

    def test_x(postfix):
        pf = postfix(milter="inet:127.0.0.1:12345")

Things learned about running a private Postfix 3.7 (Debian 12) instance; the
code below refers back to these notes as [N1]..[N15]:

[N1]  ``postfix -c DIR start`` works without listing DIR in the default
      instance's ``alternate_config_directories``: that rule only binds
      non-root users (and the set-gid ``postdrop``/``postqueue``).  We run as
      root, so no change to /etc/postfix is needed and the system instance
      (if any) is left alone.  It listens on port 25 and uses
      /var/spool/postfix and /var/lib/postfix; we use random free ports and
      our own directories, so the two never collide and there is no need to
      stop it.
[N2]  Postfix drops privileges to ``mail_owner`` (``postfix``) before it opens
      some files by absolute path: the master opens ``$data_directory/
      master.lock`` as ``postfix``.  So ``data_directory`` must be owned by
      ``postfix`` *and every ancestor directory must be searchable (x) by
      ``postfix``*.  pytest's ``/tmp/pytest-of-root`` is mode 0700, so the
      instances live under the system temp dir (``/tmp/pfXXXXXXXX``) instead;
      the pytest factory copies their logs into pytest's tmp dir afterwards.
      Short paths also keep unix-socket paths under the 107-byte limit.
[N3]  ``queue_directory`` must be owned by root (``postfix check`` warns
      otherwise); ``postfix start`` runs ``postfix-script check-fatal`` which
      creates the queue sub-directories with the right owners on first start.
[N4]  ``maillog_file`` (logging through ``postlogd`` instead of syslog) is
      refused unless the path starts with one of ``maillog_file_prefixes``
      (default ``/var, /dev/stdout``), so that is set to the instance root.
      The master.cf needs the ``postlog unix-dgram`` service for it.  The log
      is written asynchronously (datagrams): poll it, see :meth:`wait_for_log`.
[N5]  Every service in our master.cf runs with ``chroot = n``: a chrooted
      smtpd would resolve unix milter sockets relative to the queue directory
      and would need copies of /etc files.  Debian's stock master.cf chroots
      most services, so we write our own minimal master.cf.
[N6]  ``postfix start`` returns only after the master has bound its listening
      sockets (``master -w``), so no probe connection is needed (a probe
      connection would also be an extra SMTP session, which a milter would
      see).  The master daemonizes but keeps no handle on our stdout/stderr
      pipes only if we give it none: command output goes to files, never to
      pipes, else ``subprocess.run`` could wait for EOF forever.
[N7]  ``postfix stop`` signals the master and then polls with ``sleep 1``, so
      it costs at least a second.  We do what it does (SIGTERM to the master,
      whose pid is in ``$queue_directory/pid/master.pid``; the master is a
      session/process-group leader and terminates its children) but poll
      every 20 ms, escalating to SIGKILL of the process group.
[N8]  On machines whose PID 1 does not reap orphans (containers, some VMs)
      Postfix daemons linger as zombies after the master exits; liveness
      checks therefore treat state ``Z`` as dead.
[N9]  127.0.0.1 is an "inet interface" of the instance, so by default Postfix
      treats our test client as *local* and rewrites headers (adds Date,
      Message-ID, From, qualifies bare addresses).  ``local_header_rewrite_
      clients =`` (empty) makes it behave like an MX receiving from a remote
      client: the only change to a message is the prepended Received header.
[N10] smtp-sink's dump is not wire-exact: it removes *every* CR (also bare CRs
      inside lines), undoes dot-stuffing, writes LF line ends and appends the
      LF of the final ".<CR><LF>".  :attr:`SinkMessage.raw` is the dump with
      that last LF removed; :attr:`SinkMessage.data` restores CRLF.  The
      envelope ("X-Mail-Args", "X-Rcpt-Args") is passed through smtp-sink's
      ``printable()``, so non-ASCII (SMTPUTF8) addresses show up with '?'.
      smtp-sink does not announce SMTPUTF8, so Postfix bounces mail that
      requires it.
[N11] smtp-sink creates the dump file at MAIL FROM and closes it before
      answering the final "."; an aborted transaction's file is deleted.  A
      file is therefore complete exactly when smtp-sink no longer holds it
      open, which we read from /proc/<pid>/fd (Linux only, as is Postfix on
      our CI).  smtp-sink insists on ``-u USER`` when started as root.
[N12] smtpd sleeps ``smtpd_error_sleep_time`` (1 s) after each rejected
      command and disconnects after ``smtpd_hard_error_limit`` errors; both
      are relaxed here so reject tests stay fast.
[N13] Postfix re-reads main.cf in 300 ms steps while its mtime is within the
      last couple of seconds (guarding against half-written files), so the
      first command after writing the config took ~2 s.  The harness backdates
      main.cf/master.cf mtimes after writing them.
[N14] Commands such as ``postfix start`` write errors found before logging is
      set up (e.g. "fatal: parameter inet_interfaces: no local interface
      found") to stderr only when stderr is a tty, else to syslog, which a
      CI machine may not even have (no /dev/log).  The harness gives them a
      pty as stderr so such errors end up in the HarnessError message.
[N15] SMTP AUTH (``sasl_users``) uses Cyrus SASL with a private sasldb; only
      packages are installed (sasl2-bin for saslpasswd2, libsasl2-modules for
      PLAIN), no system file is touched.  Debian's Postfix reads Cyrus's
      ``smtpd.conf`` from ``$config_directory/sasl/`` (upstream from
      ``cyrus_sasl_config_path``, which is set to the same directory); without
      it Cyrus falls back to /etc/sasldb2.  smtpd (user ``postfix``, no
      chroot [N5]) opens the sasldb read-only, so it is root:postfix 0640.
      With ``smtpd_sasl_local_domain`` empty Cyrus looks a user up in the
      realm ``$myhostname``, where saslpasswd2 ``-u`` stores it, and the
      name Postfix logs and sends as ``{auth_authen}`` stays the bare login;
      setting the local domain would make it ``user@domain``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email
import email.message
import email.policy
import fcntl
import functools
import glob
import json
import os
import pwd
import random
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .service import PrivateService

__all__ = [
    "HarnessError",
    "PrivatePostfix",
    "Reply",
    "SendResult",
    "SinkMessage",
    "SMTPStageError",
    "ensure_postfix_installed",
    "ensure_sasl_installed",
    "free_port",
    "listening",
    "postfix_factory",
    "wait_for_listener",
    "wait_until",
    "write_sasl_config",
]

# System binaries (Debian paths); the only absolute paths used here.
POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
POSTCONF = "/usr/sbin/postconf"
SMTP_SINK = "/usr/sbin/smtp-sink"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"
MAIL_OWNER = "postfix"
LOCALHOST = "127.0.0.1"

T = TypeVar("T")


class HarnessError(RuntimeError):
    """The harness itself (not the code under test) could not do its job."""


# --------------------------------------------------------------------------
# installation
# --------------------------------------------------------------------------


def _postfix_present() -> bool:
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        return False
    return all(os.access(p, os.X_OK) for p in (POSTFIX, POSTQUEUE, POSTSUPER, SMTP_SINK))


def _sasl_present() -> bool:
    """saslpasswd2 and the PLAIN and sasldb plugins (libsasl2-modules is only recommended)."""
    plugins = ("libplain.so*", "libsasldb.so*")
    return os.access(SASLPASSWD2, os.X_OK) and all(glob.glob(f"/usr/lib/*/sasl2/{p}") for p in plugins)


def _apt_install(packages: Sequence[str], present: Callable[[], bool], preseed: str = "") -> None:
    """Install Debian ``packages`` unless ``present()`` already holds (CI starts fresh).

    ``preseed`` is fed to debconf-set-selections first.  A file lock
    serialises concurrent callers (xdist).
    """
    if present():
        return
    names = " ".join(packages)
    if os.geteuid() != 0:
        raise HarnessError(f"{names} not installed and we are not root to install it")
    lock_path = Path(tempfile.gettempdir()) / "pytclmilter-postfix-install.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if present():
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if preseed and shutil.which("debconf-set-selections"):
            subprocess.run(["debconf-set-selections"], input=preseed, text=True, env=env, check=False)
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise HarnessError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    if not present():
        raise HarnessError(f"{names} installed but still missing")


def ensure_postfix_installed() -> None:
    """Install Debian's postfix package if it is missing.

    debconf is preseeded to "No configuration", so the package does not
    write a system main.cf and the system-wide instance is not started:
    only private instances run.
    """
    _apt_install(
        ["postfix"],
        _postfix_present,
        "postfix postfix/main_mailer_type select No configuration\n"
        "postfix postfix/mailname string harness.test\n",
    )


def ensure_sasl_installed() -> None:
    """Install Cyrus SASL's saslpasswd2 and plugins if missing (for ``sasl_users``) [N15]."""
    _apt_install(["sasl2-bin", "libsasl2-modules"], _sasl_present)


def write_sasl_config(conf: Path, realm: str, users: Mapping[str, str]) -> Path:
    """A Cyrus SASL application config ``conf`` offering PLAIN and LOGIN against a sasldb beside
    it that holds ``users`` (login -> password) in ``realm``; returns the sasldb's path [N15].
    Shared by the Postfix and Sendmail harnesses, which differ in where Cyrus looks for it."""
    conf.parent.mkdir(mode=0o755, exist_ok=True)
    db = conf.parent / "sasldb2"
    conf.write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {db}\nmech_list: PLAIN LOGIN\n")
    for user, password in users.items():
        proc = subprocess.run([SASLPASSWD2, "-c", "-p", "-f", str(db), "-u", realm, user],
                              input=password.encode(), capture_output=True)
        if proc.returncode != 0:
            raise HarnessError(f"saslpasswd2 {user} exited {proc.returncode}: {proc.stderr!r}")
    return db


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError.

    Bounded polling instead of fixed sleeps keeps the happy path fast and the
    failure path bounded.  ``message`` may be a callable so that expensive
    diagnostics are only built on failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"after {timeout:.1f}s: {text}")
        time.sleep(interval)


LOCAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_TEST_PORT = 10000


@functools.cache
def ports_below_ephemeral() -> range:
    """[10000, start of the kernel's ephemeral range): ports neither connect() nor bind(0) hand out."""
    try:
        start = int(LOCAL_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        start = 32768  # Linux's default
    return range(LOWEST_TEST_PORT, start)


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free a moment ago, chosen below the ephemeral range.

    Why not bind-to-0: a server stopped and started again on its port (a Redis
    outage) leaves the port free in between, and bind(0) or connect() of either
    xdist worker could take it: the restart would fail with "Address already in
    use".  No automatic choice takes a port below the range; another worker's
    free_port() still picks the same number by chance (1 in ~22 000 per call,
    no cross-process lock).  SystemRandom: a seeded ``random`` would give every
    worker the same sequence.  Racy by nature; :meth:`PrivatePostfix.start`
    retries with new ports when a bind fails.
    """
    ports = ports_below_ephemeral()
    for port in [*random.SystemRandom().sample(ports, min(len(ports), 50)), 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise HarnessError(f"no free TCP port on {host}")


def tcp_listeners() -> list[tuple[str, int, str]]:
    """Every IPv4 LISTEN socket, from /proc/net/tcp: (address in /proc's hex, port, socket inode)."""
    listeners = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, _, port = fields[1].partition(":")
        if fields[3] == "0A":
            listeners.append((addr, int(port, 16), fields[9]))
    return listeners


def _tcp_listening(host: str, port: int) -> bool:
    """True if a LISTEN socket exists on host:port, without connecting to it.

    Read from /proc/net/tcp so the check does not open an SMTP/milter session.
    """
    want_addrs = {"00000000"}  # 0.0.0.0
    with contextlib.suppress(OSError):
        want_addrs.add(socket.inet_aton(host)[::-1].hex().upper())
    try:
        listeners = tcp_listeners()
    except OSError:  # pragma: no cover - non-Linux
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return True
        return False
    return any(lport == port and addr in want_addrs for addr, lport, _ in listeners)


def _unix_listening(path: str) -> bool:
    """True if a listening unix socket is bound at path (via /proc/net/unix)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:  # pragma: no cover - non-Linux
        return os.path.exists(path)
    for line in lines:
        fields = line.split()
        # Flags 00010000 == __SO_ACCEPTCON, i.e. listen() was called.
        if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
            return True
    return False


def listening(address: str) -> bool:
    """True if a server listens at a Postfix-style address, without connecting.

    ``address`` is ``inet:HOST:PORT`` or ``unix:/PATH`` (the smtpd_milters
    syntax), so a test can pass the same string it gives Postfix.  Not
    connecting means the server sees no spurious session.
    """
    kind, _, rest = address.partition(":")
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        return _tcp_listening(host or LOCALHOST, int(port))
    if kind in ("unix", "local"):
        return _unix_listening(rest)
    raise ValueError(f"unsupported address {address!r}")


def wait_for_listener(
    address: str, timeout: float = 10.0, alive: Callable[[], object] | None = None
) -> None:
    """Wait until :func:`listening` (address); ``alive`` may raise to stop early
    (e.g. when the server process already died)."""

    def check() -> bool:
        if alive is not None:
            alive()
        return listening(address)

    wait_until(check, timeout, message=f"nothing listens at {address}")


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state, pgrp) of a live process, or None if gone or a zombie [N8]."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()
    state, pgrp = fields[0], int(fields[2])
    return None if state in ("Z", "X") else (state, pgrp)


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_state(int(entry))
            if st is not None and st[1] == pgid:
                pids.append(int(entry))
    return pids


def _searchable_by(path: Path, uid: int, gids: set[int]) -> Path | None:
    """First directory on the way to ``path`` the user cannot search, or None."""
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return d
    return None


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    """One SMTP reply.  ``code`` is -1 if the server closed the connection."""

    code: int
    text: str

    @classmethod
    def of(cls, code: int, msg: bytes | str) -> Reply:
        return cls(code, msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg)

    @property
    def ok(self) -> bool:
        """2xx or 3xx: the command was accepted."""
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SMTPStageError(HarnessError, AssertionError):
    """Raised by :meth:`SendResult.check`: names the stage and the reply."""

    def __init__(self, stage: str, reply: Reply, result: SendResult) -> None:
        super().__init__(f"SMTP {stage} failed: {reply}\n{result}")
        self.stage, self.reply, self.result = stage, reply, result


_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


@dataclasses.dataclass
class SendResult:
    """Reply of every SMTP stage of one :meth:`PrivatePostfix.send`.

    A stage that was not reached is None.  ``data`` is the reply to the DATA
    command if that was refused, else the final reply after the message.
    """

    banner: Reply | None = None
    ehlo: Reply | None = None
    failed_auth: Reply | None = None  # only when sent with a failed_login
    auth: Reply | None = None  # only when sent with a login
    mail: Reply | None = None
    rcpt: dict[str, Reply] = dataclasses.field(default_factory=dict)
    data: Reply | None = None

    @property
    def accepted(self) -> bool:
        """True when Postfix took responsibility for the message."""
        return self.data is not None and 200 <= self.data.code < 300

    @property
    def refused(self) -> dict[str, Reply]:
        """Recipients refused at RCPT TO (as smtplib.sendmail reports them)."""
        return {r: rep for r, rep in self.rcpt.items() if not rep.ok}

    @property
    def stage(self) -> str:
        """The last stage attempted: banner, ehlo, auth, mail, rcpt or data."""
        if self.data is not None:
            return "data"
        if self.rcpt:
            return "rcpt"
        for name in ("mail", "auth", "ehlo", "banner"):
            if getattr(self, name) is not None:
                return name
        return "banner"

    @property
    def final(self) -> Reply | None:
        """The reply that decided the outcome (the last one received)."""
        if self.data is not None:
            return self.data
        if self.rcpt:
            return list(self.rcpt.values())[-1]
        return self.mail or self.auth or self.ehlo or self.banner

    @property
    def queue_id(self) -> str | None:
        """Postfix queue id from "250 2.0.0 Ok: queued as ID", if accepted."""
        if self.accepted and self.data is not None:
            m = _QUEUED_AS.search(self.data.text)
            return m.group(1) if m else None
        return None

    def check(self) -> SendResult:
        """Raise :class:`SMTPStageError` unless the message was accepted."""
        if not self.accepted:
            raise SMTPStageError(self.stage, self.final or Reply(-1, "no reply"), self)
        return self

    def __str__(self) -> str:
        parts = [f"banner={self.banner}", f"ehlo={self.ehlo}"]
        parts += [f"failed_auth={self.failed_auth}"] if self.failed_auth is not None else []
        parts += [f"auth={self.auth}"] if self.auth is not None else []
        parts.append(f"mail={self.mail}")
        parts += [f"rcpt<{r}>={rep}" for r, rep in self.rcpt.items()]
        parts.append(f"data={self.data}")
        return "SendResult(" + ", ".join(parts) + ")"


def _angle_addr(args: str) -> str:
    """'<a@b> SIZE=1' -> 'a@b' (the address of an X-Mail/X-Rcpt-Args line)."""
    m = re.match(r"\s*<([^>]*)>", args)
    return m.group(1) if m else args.split(" ", 1)[0]


@dataclasses.dataclass(frozen=True)
class SinkMessage:
    """One message as smtp-sink received it from Postfix.

    ``raw`` has LF line endings and no CRs at all [N10]; use ``data`` to
    compare with CRLF message bytes given to :meth:`PrivatePostfix.send`.
    """

    path: Path
    client_addr: str
    client_proto: str
    helo: str | None
    mail_args: str  # "<sender> SIZE=... BODY=..." exactly as smtp-sink saw it
    rcpt_args: tuple[str, ...]  # "<rcpt> ORCPT=rfc822;..." per RCPT TO
    raw: bytes

    @property
    def mail_from(self) -> str:
        """Envelope sender without angle brackets ('' for the null sender)."""
        return _angle_addr(self.mail_args)

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients without angle brackets, in RCPT TO order."""
        return [_angle_addr(a) for a in self.rcpt_args]

    @property
    def data(self) -> bytes:
        """The message with CRLF line endings, as on the wire minus dot-stuffing."""
        return self.raw.replace(b"\n", b"\r\n")

    @property
    def header_bytes(self) -> bytes:
        """Header block (LF endings), without the separating empty line."""
        head, sep, _ = self.raw.partition(b"\n\n")
        return head + b"\n" if sep else self.raw

    @property
    def body(self) -> bytes:
        """Body (LF endings) after the first empty line."""
        return self.raw.partition(b"\n\n")[2]

    @property
    def message(self) -> email.message.Message:
        """Parsed with the compat32 policy, which keeps header values verbatim."""
        return email.message_from_bytes(self.raw, policy=email.policy.compat32)

    def headers(self, name: str) -> list[str]:
        """All values of header ``name`` in order (unfolded raw strings)."""
        return [str(v) for v in self.message.get_all(name, [])]

    @classmethod
    def parse(cls, path: Path, content: bytes) -> SinkMessage:
        """Parse an smtp-sink ``-d`` dump (format in smtp-sink(1))."""
        fields: dict[str, list[str]] = {}
        pos = 0
        while pos < len(content):
            end = content.index(b"\n", pos)
            line = content[pos:end].decode("utf-8", "replace")
            pos = end + 1
            if line.startswith("Received: "):
                # smtp-sink's own 3-line Received header ends its records;
                # skip its continuation lines.  A message header never starts
                # with white space, so this is unambiguous.
                while pos < len(content) and content[pos : pos + 1] in (b"\t", b" "):
                    pos = content.index(b"\n", pos) + 1
                break
            name, _, value = line.partition(": ")
            fields.setdefault(name, []).append(value)
        else:
            raise HarnessError(f"{path}: no smtp-sink Received header in dump")
        body = content[pos:]
        if body.endswith(b"\n"):
            body = body[:-1]  # the LF of the terminating ".<CR><LF>" [N10]
        return cls(
            path=path,
            client_addr=fields.get("X-Client-Addr", [""])[0],
            client_proto=fields.get("X-Client-Proto", [""])[0],
            helo=fields.get("X-Helo-Args", [None])[0],
            mail_args=fields.get("X-Mail-Args", [""])[0],
            rcpt_args=tuple(fields.get("X-Rcpt-Args", [])),
            raw=body,
        )


# --------------------------------------------------------------------------
# the instance
# --------------------------------------------------------------------------

_MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix(PrivateService):
    """One private Postfix instance relaying everything to an smtp-sink.

    Directories are created at construction (so e.g. :meth:`socket_path` can
    be handed to a milter before :meth:`start`); ports are chosen and the
    config is written at start, so ``milter`` and ``settings`` may still be
    changed until then.
    Use as a context manager, or via :func:`postfix_factory`, so that
    processes are stopped and files removed even when a test fails.
    """

    def __init__(
        self,
        milter: str | None = None,
        settings: Mapping[str, object] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        hostname: str = "harness.test",
        sink_options: Sequence[str] = (),
        sasl_users: Mapping[str, str] | None = None,
        keep: bool = False,
    ) -> None:
        """
        milter:       smtpd_milters value in Postfix syntax, e.g.
                      ``inet:127.0.0.1:12345`` or ``unix:/path/sock`` (a
                      comma-separated list also works); None = no milter.
        settings:     main.cf parameters that override the defaults below
                      (e.g. milter_default_action, milter_protocol,
                      milter_command_timeout); a value of None removes a
                      default.  bools become yes/no.
        base_dir:     where the instance directory is made; default is the
                      system temp dir.  Every ancestor must be searchable by
                      user ``postfix`` [N2], which pytest's tmp dirs are not.
        hostname:     myhostname (appears in Received headers and banner).
        sink_options: extra smtp-sink flags, e.g. ``["-r", "rcpt"]`` to make
                      the sink soft-reject RCPT and so exercise the deferred
                      queue.
        sasl_users:   login -> password: smtpd offers AUTH PLAIN and LOGIN
                      and checks them against these users [N15]; None = no
                      AUTH.  Send with ``send(..., login=(user, password))``.
        keep:         leave the directory behind on close (for debugging).
        """
        self.milter = milter
        self.settings: dict[str, object] = dict(settings or {})
        self.hostname = hostname
        self.sink_options = list(sink_options)
        self.sasl_users = dict(sasl_users) if sasl_users is not None else None
        self.keep = keep
        self.smtpd_port = 0
        self.sink_port = 0
        self._sink: subprocess.Popen[bytes] | None = None
        self._master_pid: int | None = None

        ensure_postfix_installed()
        if self.sasl_users is not None:
            ensure_sasl_installed()
        owner = pwd.getpwnam(MAIL_OWNER)
        self._owner_uid, self._owner_gid = owner.pw_uid, owner.pw_gid
        base = Path(base_dir) if base_dir is not None else Path(tempfile.gettempdir())
        self.root = Path(tempfile.mkdtemp(prefix="pf", dir=base)).resolve()
        try:
            os.chmod(self.root, 0o755)  # mkdtemp makes it 0700 [N2]
            gids = {self._owner_gid, *(g.gr_gid for g in _groups_of(MAIL_OWNER))}
            blocked = _searchable_by(self.root, self._owner_uid, gids)
            if blocked is not None:
                raise HarnessError(
                    f"user {MAIL_OWNER} cannot search {blocked} (mode "
                    f"{stat.filemode(blocked.stat().st_mode)}); Postfix needs "
                    f"every ancestor of its directories searchable. Use a "
                    f"base_dir such as the default {tempfile.gettempdir()}."
                )
            for sub in ("etc", "q", "data", "sink", "s"):
                (self.root / sub).mkdir(mode=0o755)
            # Sockets may be created by milters running as any user.
            os.chmod(self.root / "s", 0o1777)
            # [N2] master opens data_directory/master.lock as mail_owner.
            os.chown(self.data_dir, self._owner_uid, self._owner_gid)
            # [N11] smtp-sink runs as mail_owner and creates its dumps here.
            os.chown(self.sink_dir, self._owner_uid, self._owner_gid)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    # ---- paths -----------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "q"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def sink_dir(self) -> Path:
        return self.root / "sink"

    @property
    def maillog_path(self) -> Path:
        return self.root / "maillog"

    @property
    def sasl_dir(self) -> Path:
        return self.config_dir / "sasl"

    def socket_path(self, name: str = "milter") -> Path:
        """A short path for a unix socket (e.g. a milter's) in this instance.

        smtpd runs as user ``postfix``: the process that creates the socket
        must make it writable by that user (e.g. ``os.umask(0)`` before
        binding, or chmod 0666 / chown postfix afterwards), else Postfix
        logs "Permission denied" and applies milter_default_action.
        """
        path = self.root / "s" / name
        if len(os.fsencode(path)) > 107:
            raise HarnessError(f"unix socket path too long: {path}")
        return path

    # ---- configuration -----------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf this instance uses: defaults overridden by settings."""
        cf: dict[str, object] = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "myhostname": self.hostname,
            "mydomain": self.hostname,
            "myorigin": "$myhostname",
            "inet_interfaces": LOCALHOST,
            "inet_protocols": "ipv4",
            # Nothing is delivered locally; everything goes to the sink.
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery disabled in test harness",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "relayhost": f"[{LOCALHOST}]:{self.sink_port}",
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "local_header_rewrite_clients": "",  # [N9]
            # No DNS anywhere (Postfix 3.7: smtp_dns_support_level replaces
            # the deprecated disable_dns_lookups).
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtp_tls_security_level": "none",
            # Retry deferred mail quickly.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
            "in_flow_delay": "0",
            "delay_warning_time": "0",
            # [N12]
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "1000",
            # [N4] log to a file through postlogd, no syslog needed.
            "maillog_file": self.maillog_path,
            "maillog_file_prefixes": self.root,
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP harness",
            # Milter defaults; bounded timeouts keep failing tests short.
            "milter_default_action": "tempfail",
            "milter_connect_timeout": "5s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "30s",
        }
        if self.milter:
            cf["smtpd_milters"] = self.milter
        if self.sasl_users is not None:  # [N15]
            cf.update(smtpd_sasl_auth_enable=True, smtpd_sasl_type="cyrus",
                      cyrus_sasl_config_path=self.sasl_dir)
        cf.update(self.settings)
        out: dict[str, str] = {}
        for key, value in cf.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = "yes" if value else "no"
            text = str(value)
            if "\n" in text:
                raise ValueError(f"main.cf value for {key} contains a newline")
            out[key] = text
        return out

    def _write_config(self) -> None:
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main)
        smtpd = f"{LOCALHOST}:{self.smtpd_port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(smtpd + _MASTER_CF_SERVICES)  # [N5]
        # [N13] Postfix re-reads a "hot" config file until it is a few
        # seconds old; backdating it saves ~1.5 s on every command.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))
        if self.sasl_users is not None:
            self._write_sasl(self.sasl_users)

    def _write_sasl(self, users: Mapping[str, str]) -> None:
        """Cyrus's smtpd.conf and a sasldb holding ``users`` [N15]."""
        db = write_sasl_config(self.sasl_dir / "smtpd.conf", self.hostname, users)
        if db.exists():
            os.chown(db, 0, self._owner_gid)
            os.chmod(db, 0o640)

    # ---- commands ----------------------------------------------------------

    def _run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        """Run a Postfix command for this instance and return its stdout.

        stdout goes to a file, never a pipe [N6]; stderr goes to a pty when
        possible, because Postfix commands print their fatal errors to stderr
        only if it is a terminal and otherwise only to syslog [N14].
        """
        with tempfile.TemporaryFile(dir=self.root) as out, _StderrCapture() as err:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err.fd,
                timeout=timeout,
                cwd=self.root,
            )
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
        if check and proc.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{err.text}{text}\n"
                f"--- maillog tail ---\n{self._log_tail()}"
            )
        return text

    def postconf(self, name: str) -> str:
        """Value of a main.cf parameter as this instance sees it."""
        return self._run(POSTCONF, "-c", str(self.config_dir), "-h", name).strip()

    def postsuper(self, *args: str) -> str:
        """Run postsuper on this instance, e.g. ``postsuper("-H", queue_id)``."""
        return self._run(POSTSUPER, "-c", str(self.config_dir), *args)

    # ---- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._master_pid is not None and _proc_state(self._master_pid) is not None

    def _read_master_pid(self) -> int | None:
        """The master's pid from its pid file, if that process is ours.

        A stale pid file could name a recycled pid; the master chdirs to
        its queue_directory, so its cwd proves identity before we signal it.
        """
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            if os.readlink(f"/proc/{pid}/cwd") == str(self.queue_dir):
                return pid
        except (OSError, ValueError, IndexError):
            pass
        return None

    def start(self, attempts: int = 3) -> PrivatePostfix:
        """Start smtp-sink and Postfix; retry on a lost port race."""
        if self.running:
            return self
        last: Exception | None = None
        for _ in range(attempts):
            self.smtpd_port, self.sink_port = free_port(), free_port()
            if self.smtpd_port == self.sink_port:
                continue
            try:
                self._start_sink()
                self._write_config()
                self._run(POSTFIX, "-c", str(self.config_dir), "start")  # [N1][N3][N6]
                self._master_pid = self._read_master_pid()
                if self._master_pid is None:
                    raise HarnessError(f"postfix started but no master found:\n{self._log_tail()}")
                if not _tcp_listening(LOCALHOST, self.smtpd_port):
                    raise HarnessError(f"smtpd is not listening on {self.smtpd_port}")
                return self
            except (HarnessError, TimeoutError) as exc:
                last = exc
                self.stop()
                if "in use" not in str(exc):
                    raise
        raise HarnessError(f"could not start after {attempts} attempts: {last}")

    def _start_sink(self) -> None:
        sink_log = open(self.root / "sink.log", "ab")
        try:
            self._sink = subprocess.Popen(
                [
                    SMTP_SINK,
                    "-4",
                    "-u",
                    MAIL_OWNER,  # [N11]
                    "-h",
                    "sink.test",
                    "-d",
                    f"{self.sink_dir}/%Y%m%d%H%M%S.",
                    *self.sink_options,
                    f"{LOCALHOST}:{self.sink_port}",
                    "64",
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink_log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        finally:
            sink_log.close()
        sink = self._sink

        def up() -> bool:
            if sink.poll() is not None:
                raise HarnessError(f"smtp-sink exited {sink.returncode}: {self._sink_log()}")
            return _tcp_listening(LOCALHOST, self.sink_port)

        wait_until(up, 10, message="smtp-sink did not start listening")

    def _sink_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "sink.log").read_text(errors="replace")
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Postfix and the sink; idempotent and safe after a failed start.

        Does what ``postfix stop`` does without its 1 s polling [N7]; any
        Postfix process left in the master's process group is SIGKILLed.
        """
        pid = self._master_pid if self._master_pid is not None else self._read_master_pid()
        if pid is not None and _proc_state(pid) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda: not _pids_in_group(pid), timeout, interval=0.02)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                wait_until(lambda: not _pids_in_group(pid), 5, message="postfix did not die")
        self._master_pid = None
        sink, self._sink = self._sink, None
        if sink is not None and sink.poll() is None:
            sink.terminate()
            try:
                sink.wait(timeout)
            except subprocess.TimeoutExpired:
                sink.kill()
                sink.wait(5)

    def close(self) -> None:
        """Stop everything and remove the instance directory (unless keep)."""
        try:
            self.stop()
        finally:
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)

    def archive(self, dest: str | os.PathLike[str]) -> Path:
        """Copy config, maillog, sink log and dumps to ``dest`` for post-mortems."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("etc", "sink"):
            if (self.root / name).is_dir():
                shutil.copytree(self.root / name, dest / name, dirs_exist_ok=True)
        for name in ("maillog", "sink.log"):
            if (self.root / name).is_file():
                shutil.copy2(self.root / name, dest / name)
        return dest

    def __repr__(self) -> str:
        return (
            f"PrivatePostfix(root={str(self.root)!r}, smtpd={self.smtpd_port}, "
            f"sink={self.sink_port}, milter={self.milter!r})"
        )

    # ---- SMTP --------------------------------------------------------------

    @contextlib.contextmanager
    def smtp_session(self, timeout: float = 60.0) -> Iterator[smtplib.SMTP]:
        """An ``smtplib.SMTP`` connected to this instance's smtpd (banner read).

        For step-by-step dialogues; closed (QUIT if possible) on exit.
        """
        if not self.smtpd_port:
            raise HarnessError("instance not started")
        with closing_smtp(smtplib.SMTP(LOCALHOST, self.smtpd_port, timeout=timeout)) as smtp:
            yield smtp

    def send(
        self,
        sender: str,
        recipients: str | Sequence[str],
        message: bytes,
        *,
        helo: str = "client.example",
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
        login: tuple[str, str] | None = None,
        mechanism: str = "PLAIN",
        failed_login: str | None = None,
        timeout: float = 60.0,
    ) -> SendResult:
        """Send one message; report the reply of every stage, never raise on
        an SMTP rejection (call ``.check()`` on the result for that).

        ``login`` = (user, password) authenticates with AUTH ``mechanism``
        after EHLO (see ``sasl_users``); a refused login ends the session
        before MAIL.  ``failed_login``: see :func:`smtp_send`.

        ``message`` is sent as is (smtplib only dot-stuffs and terminates it),
        so it should use CRLF line endings.  Like ``smtplib.sendmail`` DATA is
        skipped when every recipient was refused.
        """
        smtp = smtplib.SMTP(timeout=timeout)
        return smtp_send(smtp, lambda: smtp.connect(LOCALHOST, self.smtpd_port), sender, recipients,
                         message, helo=helo, mail_options=mail_options, rcpt_options=rcpt_options,
                         login=login, mechanism=mechanism, failed_login=failed_login)

    # ---- observation -------------------------------------------------------

    def sink_messages(self) -> list[SinkMessage]:
        """Messages smtp-sink has completely received so far, oldest first."""
        return read_sink(self.sink_dir, self._sink)

    def wait_for_sink(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least ``count`` messages reached the sink; return all."""

        def enough() -> list[SinkMessage] | None:
            if self._sink is not None and self._sink.poll() is not None:
                raise HarnessError(f"smtp-sink died: {self._sink_log()}")
            msgs = self.sink_messages()
            return msgs if len(msgs) >= count else None

        return wait_until(
            enough,
            timeout,
            message=lambda: (
                f"expected {count} message(s) at the sink, got "
                f"{len(self.sink_messages())}\n--- queue ---\n{self.queue()}\n"
                f"--- maillog tail ---\n{self._log_tail()}"
            ),
        )

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j`` records: queue_name (incoming, active, deferred,
        hold, ...), queue_id, sender, recipients[{address, delay_reason}], ...
        """
        out = self._run(POSTQUEUE, "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for_queue(
        self, queue_name: str | None = None, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` messages are in ``queue_name`` (None = any)."""

        def matching() -> list[dict[str, Any]] | None:
            recs = [r for r in self.queue() if queue_name in (None, r.get("queue_name"))]
            return recs if len(recs) >= count else None

        return wait_until(
            matching,
            timeout,
            interval=0.1,
            message=lambda: f"queue {queue_name!r}: {self.queue()}\n{self._log_tail()}",
        )

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now (postqueue -f)."""
        self._run(POSTQUEUE, "-c", str(self.config_dir), "-f")

    def log_text(self) -> str:
        """Everything Postfix logged so far (maillog_file) [N4]."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the maillog matches the regex ``pattern``; return the match."""
        rx = re.compile(pattern, re.MULTILINE)
        return wait_until(
            lambda: rx.search(self.log_text()),
            timeout,
            message=lambda: f"{pattern!r} not in maillog:\n{self._log_tail()}",
        )

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class _StderrCapture:
    """A pty (or, failing that, a file) to hand a child process as stderr.

    A reader thread drains the pty so a chatty child can never block on a
    full terminal buffer; the text is available as ``.text`` after exit.
    """

    def __init__(self) -> None:
        self._master: int | None = None
        self._file: Any = None
        self._thread: threading.Thread | None = None
        self._chunks: list[bytes] = []
        self.text = ""
        try:
            self._master, self.fd = os.openpty()
        except OSError:
            self._file = tempfile.TemporaryFile()
            self.fd = self._file.fileno()
            return
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self._master is not None
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO once the slave side is closed everywhere
                return
            if not data:
                return
            self._chunks.append(data)

    def __enter__(self) -> _StderrCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.seek(0)
            raw = self._file.read()
            self._file.close()
        else:
            os.close(self.fd)  # our copy of the slave; the child's is gone
            assert self._thread is not None and self._master is not None
            # A daemon (the Postfix master) may keep the slave open, so the
            # reader might never see EIO: give it a moment, then stop.
            self._thread.join(0.5)
            os.close(self._master)
            self._thread.join(1)
            raw = b"".join(self._chunks)
        self.text = raw.decode("utf-8", "replace").replace("\r\n", "\n")


def _groups_of(user: str) -> list[Any]:
    import grp

    return [g for g in grp.getgrall() if user in g.gr_mem]


def _record_disconnect(result: SendResult, text: str, rcpts: Sequence[str], login: bool) -> None:
    """Put a code -1 reply on the stage during which the server hung up."""
    reply = Reply(-1, f"connection closed: {text}")
    if result.banner is None:
        result.banner = reply
    elif result.ehlo is None:
        result.ehlo = reply
    elif login and result.auth is None:
        result.auth = reply
    elif result.mail is None:
        result.mail = reply
    elif len(result.rcpt) < len(rcpts):
        result.rcpt[rcpts[len(result.rcpt)]] = reply
    else:
        result.data = reply


def _auth(smtp: smtplib.SMTP, user: str, password: str, mechanism: str = "PLAIN") -> Reply:
    """AUTH PLAIN or LOGIN; the server's reply, also a refusal (smtplib raises on those)."""
    smtp.user, smtp.password = user, password
    authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
    try:
        return Reply.of(*smtp.auth(mechanism, authobject))
    except smtplib.SMTPAuthenticationError as exc:
        return Reply.of(exc.smtp_code, exc.smtp_error)


@contextlib.contextmanager
def closing_smtp(smtp: smtplib.SMTP) -> Iterator[smtplib.SMTP]:
    """``smtp``, connected, closed (QUIT if possible) on exit. Shared by the Postfix and Sendmail
    harnesses."""
    try:
        yield smtp
    finally:
        quit_smtp(smtp)


def quit_smtp(smtp: smtplib.SMTP) -> None:
    """QUIT if the server still takes it, else just close."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def smtp_send(
    smtp: smtplib.SMTP,
    connect: Callable[[], tuple[int, bytes]],
    sender: str,
    recipients: str | Sequence[str],
    message: bytes,
    *,
    helo: str = "client.example",
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
    login: tuple[str, str] | None = None,
    mechanism: str = "PLAIN",
    failed_login: str | None = None,
) -> SendResult:
    """One SMTP transaction on ``smtp`` (``connect`` opens it and returns the banner); the
    reply of every stage, never raising on a rejection. Shared by the Postfix and Sendmail
    harnesses: only how the connection is opened differs. ``login``: AUTH (``mechanism``
    PLAIN or LOGIN) after EHLO. ``failed_login``: first an AUTH PLAIN as that user with a
    wrong password, whose refusal is ``failed_auth``; the session goes on either way."""
    if isinstance(recipients, str):
        recipients = [recipients]
    result = SendResult()
    try:
        code, msg = connect()
        result.banner = Reply.of(code, msg)
        if code != 220:
            return result
        code, msg = smtp.ehlo(helo)
        result.ehlo = Reply.of(code, msg)
        if code != 250:
            return result
        if failed_login is not None:
            result.failed_auth = _auth(smtp, failed_login, "not the password")
        if login is not None:
            result.auth = _auth(smtp, *login, mechanism)
            if result.auth.code != 235:
                return result
        code, msg = smtp.mail(sender, list(mail_options))
        result.mail = Reply.of(code, msg)
        if code != 250:
            return result
        for rcpt in recipients:
            code, msg = smtp.rcpt(rcpt, list(rcpt_options))
            result.rcpt[rcpt] = Reply.of(code, msg)
            if code == 421:
                return result
        if not any(r.ok for r in result.rcpt.values()):
            return result
        data_reply: tuple[int, bytes | str]
        try:
            data_reply = smtp.data(message)
        except smtplib.SMTPDataError as exc:
            data_reply = (exc.smtp_code, exc.smtp_error)
        result.data = Reply.of(*data_reply)
        return result
    except smtplib.SMTPServerDisconnected as exc:
        _record_disconnect(result, str(exc), recipients, login is not None)
        return result
    finally:
        quit_smtp(smtp)


def read_sink(sink_dir: Path, sink: subprocess.Popen[bytes] | None) -> list[SinkMessage]:
    """The messages an smtp-sink process has completely received in ``sink_dir``, oldest first."""
    # List the directory first, then the sink's open files: a file that
    # is listed but not open was closed, i.e. is complete [N11].
    paths = [p for p in sink_dir.rglob("*") if p.is_file()]
    open_now: set[str] = set()
    if sink is not None and sink.poll() is None:
        fd_dir = Path(f"/proc/{sink.pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.is_dir() else ():
            with contextlib.suppress(OSError):
                open_now.add(os.readlink(fd))
    done = []
    for p in paths:
        if str(p) in open_now:
            continue
        try:
            st = p.stat()
            content = p.read_bytes()
        except FileNotFoundError:  # aborted transaction, deleted
            continue
        done.append((st.st_mtime_ns, p.name, SinkMessage.parse(p, content)))
    return [m for _, _, m in sorted(done, key=lambda t: (t[0], t[1]))]


# --------------------------------------------------------------------------
# pytest integration
# --------------------------------------------------------------------------


def postfix_factory(tmp_path_factory: Any) -> Iterator[Callable[..., PrivatePostfix]]:
    """Generator fixture body yielding ``make(milter=None, settings=None, *,
    start=True, **kwargs) -> PrivatePostfix``.

    Register it in a conftest (this module does not import pytest)::

        postfix = pytest.fixture(postfix_factory, name="postfix")

    At teardown, even after a failed test, every instance is stopped, its
    config/maillog/sink dumps are copied to a pytest tmp dir
    (``.../postfix-artifactsN``, printed in the failure's captured output) and
    its directory under the system temp dir is removed.
    """
    instances: list[PrivatePostfix] = []

    def make(
        milter: str | None = None,
        settings: Mapping[str, object] | None = None,
        *,
        start: bool = True,
        **kwargs: Any,
    ) -> PrivatePostfix:
        pf = PrivatePostfix(milter, settings, **kwargs)
        instances.append(pf)
        if start:
            pf.start()
        return pf

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for pf in reversed(instances):
            try:
                pf.stop()
            except BaseException as exc:  # keep cleaning the others
                errors.append(exc)
            with contextlib.suppress(Exception):
                dest = pf.archive(tmp_path_factory.mktemp("postfix-artifacts"))
                print(f"postfix harness artifacts of {pf!r}: {dest}")
            pf.close()
        if errors:
            raise errors[0]
