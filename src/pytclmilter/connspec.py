"""libmilter connection specs: ``unix:/path``, ``local:/path``, ``inet:port@host``, ``inet6:port@host``.

This module owns the spec's syntax and its error, ConnSpecError; what an inet or inet6 host
names, and whether a milter can serve there, is inetaddr.py's. Parsing follows
smfi_setconn/smfi_opensocket (docs/protocol.md §9.1): a bare path is a Unix socket, the protocol
name is case-insensitive, a port is a number or else looked up as a service, ``inet:PORT`` alone
means every address, a host in brackets is a numeric address. Unlike libmilter's ``atoi``, a
number followed by anything is refused: Postfix's ``inet:127.0.0.1:8891`` would be port 127 on
every address; so is text after ``]``, which libmilter ignores.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from .inetaddr import AddressError, address
from .logline import escape


class ConnSpecError(ValueError):
    """The connection spec cannot be used. Its text quotes the spec escaped (logline.escape), so
    that a newline in a --connection or a script's -connection cannot make a line of its own."""


@dataclass(frozen=True, slots=True)
class ConnSpec:
    family: str  # "unix", "inet" or "inet6"
    path: str = ""
    host: str | None = None  # None: every address
    port: int = 0
    #: A unix socket's type as written ("unix", "LOCAL"); "" for a bare path, libmilter's default
    #: type (listener.py's warning of a name like a port says which it was).
    written_type: str = field(default="", compare=False)

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        host = self.host if self.host is not None else ("0.0.0.0" if self.family == "inet" else "::")
        return f"{self.family}:{self.port}@{host}"

    def postfix(self) -> str:
        """The same address in Postfix's smtpd_milters syntax: for a Python milter's author, who
        gets a ConnSpec from ``Milter.listening`` (the port asked as 0) and points Postfix at it,
        as the end-to-end tests do; src/ itself needs none."""
        if self.family == "unix":
            return f"unix:{self.path}"
        host = self.host or ("127.0.0.1" if self.family == "inet" else "::1")
        return f"inet:{'[' + host + ']' if ':' in host else host}:{self.port}"


MAX_UNIX_PATH = 108  # sizeof(sun_path) on Linux, NUL included
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # in a unix path: never meant


def parse(spec: str, what: str = "connection") -> ConnSpec:
    """Parse a spec; raises ConnSpecError with a message a mail admin can act on, naming the
    setting as ``what``, on one line: what it quotes of the spec escaped."""
    try:
        return _parse(spec, what)
    except ConnSpecError as exc:  # (the message is ours but for what it quotes: escaped whole)
        raise ConnSpecError(escape(str(exc))) from None


def _parse(spec: str, what: str) -> ConnSpec:
    """:func:`parse`, its messages quoting the spec as given."""
    if not spec:
        raise ConnSpecError("empty connection spec")
    if ":" not in spec:
        written, rest = "", spec
    else:
        written, rest = spec.split(":", 1)
    proto = written.lower() or "unix"
    if proto in ("unix", "local"):
        if not rest:
            raise ConnSpecError(f'{what} "{spec}": missing socket path')
        refuse_long_path(rest, f'{what} "{spec}"')
        if rest != rest.strip() or _CONTROL.search(rest):
            # ([read $f]'s newline, a unit file's trailing space: a socket no MTA was told of)
            raise ConnSpecError(f'{what} "{spec}": socket path with white space at an end or a control '
                                "character: no MTA is told that name (libmilter would make it)")
        return ConnSpec("unix", path=rest, written_type=written)
    if proto not in ("inet", "inet6"):
        raise ConnSpecError(f'{what} "{spec}": unknown socket type "{proto}": must be unix, local, inet or inet6')
    port_text, at, host = rest.partition("@")
    port = _port(port_text, spec, what)
    if at and not host:  # libmilter: an unknown host name. Not every address: a typo or an empty $HOST
        raise ConnSpecError(f'{what} "{spec}": missing host after "@" (inet:PORT alone listens on every address)')
    return ConnSpec(proto, host=_host(host, proto, port_text, spec, what) if host else None, port=port)


def same(one: str, other: str) -> bool:
    """Whether two specs name the same socket (``unix:/x``, ``local:/x`` and ``/x`` do): a reload
    compares what is served, not how it is written. Text that does not parse is compared as text."""
    try:
        return parse(one) == parse(other)
    except ConnSpecError:
        return one == other


def refuse_long_path(path: str, named: str, absolute: str | None = None) -> None:
    """ConnSpecError if the socket's path, ``absolute`` when given (a relative one's, which is what
    the MTA must be told), does not fit sun_path. libmilter: strlen + 1 < sizeof(sun_path).
    ``named`` is quoted as given (escaped by the caller); ``absolute`` is measured as it is and
    quoted escaped (measured escaped, a path of backslashes that fits was refused)."""
    if len(os.fsencode(absolute or path)) + 1 >= MAX_UNIX_PATH:
        whole = f" from the current directory: {escape(absolute)}" if absolute else ""
        raise ConnSpecError(f"{named}: socket path longer than {MAX_UNIX_PATH - 2} bytes{whole}")


def parse_metrics(text: str) -> ConnSpec:
    """Where to serve the metrics (HTTP): ``inet:PORT@HOST`` or ``inet6:PORT@HOST``, with the host
    given: the metrics are for whom the admin chooses, not every address by default."""
    spec = parse(text, "metrics")
    if spec.family == "unix":  # (a unix path may hold a C1 control: escaped as parse's messages)
        raise ConnSpecError(f'metrics "{escape(text)}": must be inet:PORT@HOST or inet6:PORT@HOST (HTTP over TCP)')
    if spec.host is None:
        raise ConnSpecError(f'metrics "{escape(text)}": needs the address to listen on, such as inet:{spec.port}@127.0.0.1')
    return spec


def _port(text: str, spec: str, what: str) -> int:
    if not text:
        raise ConnSpecError(f'{what} "{spec}": missing port')
    if text[0] in "0123456789":
        if not re.fullmatch(r"[0-9]+", text):  # atoi would take the leading digits: 127 of 127.0.0.1:8891
            raise ConnSpecError(f'{what} "{spec}": port "{text}" is not a number{_postfix_hint(spec)}')
        port = int(text)
    else:
        try:
            port = socket.getservbyname(text, "tcp")
        except OSError:
            raise ConnSpecError(f'{what} "{spec}": unknown service "{text}"{_postfix_hint(spec)}') from None
    if not 0 <= port <= 65535:
        raise ConnSpecError(f'{what} "{spec}": port {port} out of range')
    return port


def _postfix_hint(spec: str) -> str:
    """What to write instead of Postfix's ``inet:HOST:PORT`` (or ``inet:PORT@[HOST]:PORT``), when
    that is what the spec looks like."""
    found = (re.fullmatch(r"inet6?:(\[[^]@]*\]|[^@]*):([0-9]+)", spec, re.IGNORECASE)
             or re.fullmatch(r"inet6?:[^@]*@(\[[^]]*\]):([0-9]+)", spec, re.IGNORECASE))
    if not found:
        return ""
    host, port = found.groups()
    ours = f"inet6:{port}@{host}" if ":" in host else f"inet:{port}@{host}"
    return f" (inet:HOST:PORT is Postfix's syntax; the milter's is {ours})"


def _host(host: str, proto: str, port: str, spec: str, what: str) -> str:
    """The address a host names (inetaddr.py), brackets taken off as libmilter takes them, its
    refusal quoting the spec."""
    written, bracketed = host, host.startswith("[")
    if bracketed:
        written, bracket, rest = host[1:].partition("]")
        if not bracket:
            raise ConnSpecError(f'{what} "{spec}": missing "]"')
        if rest:  # libmilter ignores it: a typo, or a port meant (Postfix's [HOST]:PORT)
            raise ConnSpecError(f'{what} "{spec}": "{rest}" after "]"{_postfix_hint(spec)}')
    try:
        return address(written, proto, port, bracketed=bracketed)
    except AddressError as exc:
        raise ConnSpecError(f'{what} "{spec}": {exc}') from None
