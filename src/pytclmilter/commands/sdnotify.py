"""systemd's readiness protocol (``sd_notify``), for a unit with ``Type=notify``.

With ``Type=simple`` systemd counts the service as started the moment the process exists: a
Postfix ordered ``After=`` it may connect before the socket is bound, and ``systemctl reload``
returns before the script has loaded, whether or not it did. With ``Type=notify`` systemd
waits for ``READY=1``, which ``run`` sends once the socket is bound (before the workers are
forked, which serve from the same socket), and shows ``STATUS=`` in ``systemctl status``: what
serves, and whether the last reload loaded. ``RELOADING=1`` ... ``READY=1`` brackets a reload,
``STOPPING=1`` starts a stop.

The address comes from ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace), which
is removed from the environment at once, so that no program the script starts speaks for this
process. The socket is connected at start, while still root and before any of the script runs,
and every message goes to that connected peer: the path is looked up once, never again after
``--user`` (a manager's socket only root may write still hears READY=1), and what the name holds
later does not matter. The path is walked as safepath walks the socket's (no link another user
could have made, at the name neither), and as root refused in a directory others may write
where the socket is not root's, or has another link: another user could have put any socket
of root's under that name (the journal's, a daemon's control socket) for root to write to.
systemd's own (``/run/systemd/notify``) is in a directory of root's; libsystemd's sd_notify
connects by path at each call, as whoever calls it.
Only the process that read the address speaks (the ``--workers`` supervisor, not its workers,
as systemd's default ``NotifyAccess=main`` wants). A message that cannot be sent, or that finds
the manager's queue full for SEND_WAIT seconds, is logged once; the milter serves on. Once one
found it full so long, the next ones do not wait (each waiting held a reload 2 s, a stop 2.6 s):
one that finds no room is dropped and counted, until one goes through again; the count is told
in one line then, or at the end (with a message that waited in vain after the first, whose line
is said once).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time

from ..logline import escape
from ..safepath import Untrusted, connect_at, lstat_at, open_entry

log = logging.getLogger("pytclmilter")

#: Seconds a message waits for room in the manager's queue (a busy PID 1): a send blocked for
#: ever where the manager did not read, READY=1 included, before the first connection was served.
SEND_WAIT = 1.0


class Notifier:
    """The service manager's socket, if there is one: :meth:`send` does nothing without it."""

    def __init__(self, address: str | None) -> None:
        self._sock: socket.socket | None = None
        self._failed = False
        self._ready = False
        #: Messages dropped without waiting since one found the queue full for SEND_WAIT seconds.
        self._dropped = 0
        self._pid = os.getpid()
        if not address:
            return
        if not address.startswith(("@", "/")):
            log.warning("NOTIFY_SOCKET %s: not a unix socket address; systemd will not be told when the milter is "
                        "ready", escape(address))
            return
        try:
            self._sock = _connected(address)
        except Untrusted as exc:
            log.warning("NOTIFY_SOCKET %s: refusing it: %s; systemd will not be told when the milter is "
                        "ready", escape(address), escape(exc.strerror or str(exc)))
        except OSError as exc:
            self._tell_failed(exc, "READY=1")

    @classmethod
    def from_environment(cls) -> "Notifier":
        """The manager named by NOTIFY_SOCKET, taken out of the environment (module docstring)."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def ready(self, status: str) -> None:
        """Serving; ``status`` (which may quote the script) escaped, so it cannot add a field."""
        self.send(f"READY=1\nSTATUS={escape(status)}")

    def reloading(self) -> None:
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")

    @property
    def main(self) -> bool:
        """Whether this is the process that made it: not a --workers worker, which tells no one."""
        return os.getpid() == self._pid

    def send(self, message: str) -> None:
        if self._sock is None or not self.main:
            return  # (a --workers worker: systemd hears the main process alone, NotifyAccess=main)
        try:
            self._sock.send(message.encode())
        except TimeoutError:
            self._sock.settimeout(0.0)  # (the next ones: dropped at once while the queue is full)
            if self._failed:  # (the line is said once: one that waits in vain later is counted, as dropped)
                self._dropped += 1
            self._tell_failed(TimeoutError(f"its queue stayed full for {SEND_WAIT:g} s (the service manager does "
                                           "not read it); the next messages do not wait for it"), message)
            return
        except BlockingIOError:  # (not waiting, since one timed out): still full
            self._dropped += 1
            return
        except OSError as exc:
            self._tell_failed(exc, message)
            return
        if self._sock.gettimeout() != SEND_WAIT:  # the queue has room again: messages wait again
            self._sock.settimeout(SEND_WAIT)
            self._tell_dropped("before its queue had room again")
        self._ready = self._ready or message.startswith("READY=1")  # (the start was heard)

    def _tell_dropped(self, until: str) -> None:
        """The count of the messages dropped without waiting, if any, in one line (by the process
        that counted them: a --workers worker has a copy of the count as it was at its fork)."""
        if self._dropped and os.getpid() == self._pid:
            log.warning("%d messages to systemd (NOTIFY_SOCKET) dropped: its queue stayed full %s", self._dropped,
                        until)
            self._dropped = 0

    def _tell_failed(self, exc: OSError, message: str) -> None:
        if not self._failed:  # once: the manager is gone or never was, and will not come back
            self._failed = True
            log.warning("cannot notify systemd (NOTIFY_SOCKET): %s%s", exc.strerror or exc,
                        "" if self._ready or not message.startswith("READY=1") else
                        f" (as uid {os.geteuid()}): the service manager is not told that the milter "
                        "serves, and a Type=notify unit fails its start at TimeoutStartSec")

    def close(self) -> None:
        if self._sock is not None:
            self._tell_dropped("to the end")
            self._sock.close()
            self._sock = None


def _connected(address: str) -> socket.socket:
    """A datagram socket connected to the manager's (module docstring); OSError, Untrusted."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if address.startswith("@"):  # the abstract namespace: a NUL where the path would start; the
            sock.connect(b"\0" + os.fsencode(address[1:]))  # environment's bytes, UTF-8 or not
        else:
            _connect_path(sock, address)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(SEND_WAIT)
    return sock


def _connect_path(sock: socket.socket, path: str) -> None:
    """Connect to the socket at ``path`` as safepath opens a directory (a link followed only where
    no one else could have made it), to the very socket examined; as root, Untrusted when another
    user could have put it there."""
    dirfd, name, path = open_entry(path)
    try:
        st = lstat_at(dirfd, name)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.ECONNREFUSED, "not a socket" if not stat.S_ISLNK(st.st_mode) else
                          "a symbolic link another user could have made, not a socket")
        if os.geteuid() == 0:
            _only_root_put(os.fstat(dirfd), st, path)
        connect_at(sock, dirfd, name, st)
    finally:
        os.close(dirfd)


def _only_root_put(directory: os.stat_result, entry: os.stat_result, path: str) -> None:
    """Untrusted unless no one but root could have put the socket under its name: a directory of
    root's that no group or others may write, or a sticky one of root's (``/tmp``) where the socket
    is root's (a directory's owner may rename any entry in it, a sticky one's too) and has no other
    link (where fs.protected_hardlinks is 0, anyone may link there any socket of root's)."""
    where = os.path.dirname(path) or "."
    writable = directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky_and_roots = directory.st_mode & stat.S_ISVTX and entry.st_uid == 0
    if directory.st_uid == 0 and (not writable or sticky_and_roots and entry.st_nlink == 1):
        return
    if directory.st_uid == 0 and sticky_and_roots:
        raise Untrusted(errno.EPERM, f"{path} has {entry.st_nlink} links and is in a directory others may write, "
                                     "where another user may have linked any socket of root's (use a directory "
                                     "only root may write, as systemd's /run/systemd)")
    why = f"owned by uid {directory.st_uid}" if directory.st_uid != 0 else "writable by others"
    raise Untrusted(errno.EPERM, f"{where} is {why}, who could put another socket under that name "
                                 "(use a directory only root may write, as systemd's /run/systemd)")
