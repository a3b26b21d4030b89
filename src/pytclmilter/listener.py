"""Binding the listening socket, apart from serving it, so ``--workers`` can bind once and fork.

Unix sockets: a stale socket file (nobody answers) is removed first; a live
socket or a file that is not a socket is refused and left alone; the caller
remembers the file's identity so that only our own socket is removed at exit.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass

from .connspec import ConnSpec, ConnSpecError

log = logging.getLogger("pytclmilter")


@dataclass
class Listener:
    sock: socket.socket
    spec: ConnSpec  # with the real port when port 0 was asked for
    unix_ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we created

    def remove_unix(self) -> None:
        """Remove our socket file, only if it is still the one we created."""
        if self.unix_ident is None:
            return
        try:
            st = os.lstat(self.spec.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.unix_ident:
                os.unlink(self.spec.path)
        except OSError:
            pass
        self.unix_ident = None


def bind(spec: ConnSpec, backlog: int | None, socket_mode: int | None) -> Listener:
    """A listening, non-blocking socket for the spec; ConnSpecError with the reason otherwise."""
    backlog = backlog or max(socket.SOMAXCONN, 20)
    if spec.family == "unix":
        _clear_stale_socket(spec.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(spec.path)
            if socket_mode is not None:
                os.chmod(spec.path, socket_mode)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise ConnSpecError(f"cannot listen on {spec}: {exc.strerror or exc}") from None
        st = os.stat(spec.path)
        sock.setblocking(False)
        return Listener(sock, spec, (st.st_dev, st.st_ino))
    family = socket.AF_INET if spec.family == "inet" else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted socket (Linux): replies go out at once, dead peers are noticed.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        host = spec.host if spec.host is not None else ("0.0.0.0" if family == socket.AF_INET else "::")
        sock.bind((host, spec.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConnSpecError(f"cannot listen on {spec}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    if spec.port == 0:
        spec = ConnSpec(spec.family, host=spec.host, port=sock.getsockname()[1])
    return Listener(sock, spec)


def _clear_stale_socket(path: str) -> None:
    """Remove a stale socket file; refuse a live socket or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConnSpecError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConnSpecError(f"{path} exists and is not a socket; refusing to remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConnSpecError(f"cannot check socket {path}: {exc.strerror}") from None
        os.unlink(path)  # nobody answers: a leftover from a process that died
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise ConnSpecError(f"{path} is in use by another process; refusing to replace it")
