"""Binding the listening socket, apart from serving it, so ``--workers`` can bind once and fork.

Unix sockets: unixsocket.py makes the file (a stale socket removed, a live one or
any other file refused and left alone) with its mode and owner from the start;
only the process that bound it removes it at exit, and only if the name still
holds that very socket. Each file is recorded as it is made, so that a thread's
`exit` (C's exit(), at any instant of the main thread's) removes it too
(:func:`remove_made`), before the server or the supervisor has its listener.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from typing import Final

from .connspec import ConnSpec, ConnSpecError, refuse_long_path
from .inetaddr import ipv4_mapped, sockaddr
from .logline import escape
from .unixsocket import SocketFile, bind_unix

log = logging.getLogger(__name__)

#: A unix socket's path that is a TCP port with a forgotten ``inet:``: ``8891``, ``8891@host``
#: (the milter's form), ``host:8891`` (Postfix's form); the port and the host, if any.
_PORT_LIKE: Final = (re.compile(r"([0-9]+)(?:@(.+))?\Z"), re.compile(r"(?P<host>[^/:@]+):(?P<port>[0-9]+)\Z"))


#: The unix socket files this process made and has not removed (by id: each is removed once),
#: and the lock held while one is made and recorded: remove_made() takes it and keeps it.
_MADE: Final[dict[int, SocketFile]] = {}
_MAKING: Final = threading.Lock()
#: Seconds a thread's `exit` waits for a socket being made (a stale one's probe takes up to 1 s).
_MAKING_WAIT: Final = 5.0


@dataclass
class Listener:
    sock: socket.socket
    spec: ConnSpec  # with the real port when port 0 was asked for
    unix_file: SocketFile | None = None  # the socket file we made (None in a --workers worker)

    def remove_unix(self) -> None:
        """Remove our socket file, only if it is still the one we created (once)."""
        unix_file, self.unix_file = self.unix_file, None
        if unix_file is not None:
            _remove(unix_file)


def _remove(unix_file: SocketFile) -> None:
    """Remove a recorded file once, whichever thread comes first (the stop, a thread's `exit`)."""
    if _MADE.pop(id(unix_file), None) is not None:
        unix_file.remove()


def remove_made() -> None:
    """The process ends at once (a thread's `exit`, on that thread): every socket file it made and
    still has goes, as at a stop (only if its name still holds our socket), one being made too;
    the lock stays held, so none is made after (the process is ending)."""
    _MAKING.acquire(timeout=_MAKING_WAIT)  # (past it: what is recorded goes all the same)
    for unix_file in list(_MADE.values()):
        _remove(unix_file)


def bind(spec: ConnSpec, backlog: int | None, socket_mode: int | None,
         socket_owner: tuple[int, int] | None = None) -> Listener:
    """A listening, non-blocking socket for the spec; ConnSpecError with the reason otherwise.

    A unix socket's file gets ``socket_mode`` and ``socket_owner`` (uid, gid; -1 keeps one).
    """
    backlog = backlog or max(socket.SOMAXCONN, 20)
    if spec.family == "unix":
        _warn_port_like(spec)
        if not spec.path.startswith("/"):  # libmilter's: the current directory's now (the script's,
            absolute = os.path.abspath(spec.path)  # after a cd): the line says which
            # (the MTA is told the whole path: parse() saw only the relative one)
            refuse_long_path(spec.path, f'connection "{escape(str(spec))}"', absolute)
            spec = ConnSpec("unix", path=absolute)
        with _MAKING:
            sock, unix_file = bind_unix(spec.path, backlog, socket_mode, socket_owner)
            _MADE[id(unix_file)] = unix_file
        sock.setblocking(False)
        return Listener(sock, spec, unix_file)
    family = socket.AF_INET if spec.family == "inet" else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted socket (Linux): replies go out at once, dead peers are noticed.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        host = spec.host if spec.host is not None else ("0.0.0.0" if family == socket.AF_INET else "::")
        if family == socket.AF_INET6:  # inet6:PORT is IPv6's every address, not IPv4's too; an
            # IPv4-mapped address is IPv4's (libmilter leaves the option at Linux's default, off)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if ipv4_mapped(host) else 1)
        sock.bind(sockaddr(family, host, spec.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConnSpecError(f"cannot listen on {escape(str(spec))}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    if spec.port == 0:
        spec = ConnSpec(spec.family, host=spec.host, port=sock.getsockname()[1])
    return Listener(sock, spec)


def _warn_port_like(spec: ConnSpec) -> None:
    """``--connection 8891`` (or ``unix:8891``): libmilter's rule (no type is a unix socket, kept)
    quietly makes a socket file named 8891 in the current directory, where a TCP port was meant;
    said once, at bind, in the words that fit what was written."""
    path = spec.path
    digits, postfix = _PORT_LIKE[0].match(path), _PORT_LIKE[1].match(path)
    if digits is not None:
        port, host = digits.group(1), digits.group(2) or "127.0.0.1"
    elif postfix is not None:
        port, host = postfix.group("port"), postfix.group("host")
    else:
        return
    if not spec.written_type:
        log.warning('connection "%s" is a unix socket of that name (without inet: or inet6: in front, a connection '
                    "is one, as in libmilter); for TCP port %s write inet:%s@%s", escape(path), port, port,
                    escape(host))
        return
    kind = escape(spec.written_type)
    log.warning('connection "%s:%s" is a unix socket (the type %s: makes it one), its file %s in the current '
                "directory, not a TCP port; for TCP port %s write inet:%s@%s", kind, escape(path), kind,
                escape(path), port, port, escape(host))
