"""libmilter connection specs: ``unix:/path``, ``local:/path``, ``inet:port@host``, ``inet6:port@host``.

Parsing follows smfi_setconn/smfi_opensocket (docs/protocol.md §9.1): a
bare path is a Unix socket, the protocol name is case-insensitive, a port
is a number or else looked up as a service, ``inet:PORT`` alone means every
address, a bracketed IPv4 address is read as ``inet_addr`` reads it (``[127.1]``). Unlike
libmilter's ``atoi``, a number followed by anything is refused: Postfix's
``inet:127.0.0.1:8891`` would be port 127 on every address; so is text after ``]``, which
libmilter ignores. The broadcast address 255.255.255.255 is refused however written: libmilter
refuses ``[255.255.255.255]`` (inet_addr's error value, INADDR_NONE), and Linux would bind it
where no MTA can connect; so is its IPv4-mapped form (``inet6:...@[::ffff:255.255.255.255]``),
and a multicast address (``224.0.0.1``, ``ff05::1``), bound where no MTA can connect too.
Any other IPv4-mapped address is served as libmilter serves it: IPv4 connections to that address.
A bracketed address may have a zone (``[fe80::1%eth0]``), as the unbracketed one may. An IPv6
address is kept in one form however written (``[::FFFF:7f00:1]`` is ``::ffff:127.0.0.1``), as a
bracketed IPv4 one in dotted quads: the spec's text is what the listening line shows.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Final

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


#: inet_addr's INADDR_NONE, its error and this address alike: libmilter refuses it.
_BROADCAST = "255.255.255.255"
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
    return ConnSpec(proto, host=_host(host, proto, spec, what) if host else None, port=port)


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


def _numeric(addr: str, family: int, proto: str, spec: str, what: str) -> str:
    """A bracketed address, as libmilter reads it: IPv6 as inet_pton does, IPv4 as inet_addr
    (``[127.1]``, ``[0x7f.1]``: what a host name of digits means to getaddrinfo too), written
    back in dotted quads, so that the listening line says which address that is."""
    if family == socket.AF_INET6:
        if _is_ipv6(addr):
            return addr
        if "%" in addr:  # a zone, as the unbracketed form takes it (inet_pton, libmilter's, refuses one)
            with contextlib.suppress(OSError):
                found = socket.getaddrinfo(addr, None, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
                return _with_zone(found[0][4])
    elif re.fullmatch(r"[0-9a-fA-FxX.]+", addr):  # (inet_aton takes "1.2.3.4 anything")
        try:
            return socket.inet_ntoa(socket.inet_aton(addr))
        except OSError:
            pass
    raise ConnSpecError(f'{what} "{spec}": "{addr}" is not an {proto} address{_ipv6_hint(f"[{addr}]", proto)}')


def _ipv6_hint(host: str, proto: str) -> str:
    """What to write for an IPv6 address given to inet (``::1`` or ``[::1]``, as written; with
    its interface too, ``fe80::1%eth0``, which inet_pton refuses)."""
    return f" (IPv6: inet6:...@{host})" if proto == "inet" and _is_ipv6(host.strip("[]").partition("%")[0]) else ""


def _is_ipv6(addr: str) -> bool:
    """An IPv6 address as inet_pton reads it (libmilter's), not a name."""
    try:
        socket.inet_pton(socket.AF_INET6, addr)
    except OSError:
        return False
    return True


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


def _host(host: str, proto: str, spec: str, what: str) -> str:
    family = socket.AF_INET if proto == "inet" else socket.AF_INET6
    if host.startswith("["):
        written, bracket, rest = host[1:].partition("]")
        if not bracket:
            raise ConnSpecError(f'{what} "{spec}": missing "]"')
        if rest:  # libmilter ignores it: a typo, or a port meant (Postfix's [HOST]:PORT)
            raise ConnSpecError(f'{what} "{spec}": "{rest}" after "]"{_postfix_hint(spec)}')
        _refuse_unknown_zone(written, family, spec, what)
        addr = _numeric(written, family, proto, spec, what)
    else:
        _refuse_unknown_zone(host, family, spec, what)
        try:
            infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:  # (an IPv6 address for inet: "Address family ... not supported")
            raise ConnSpecError(f'{what} "{spec}": cannot resolve "{host}" for {proto}: {exc.strerror}'
                                f"{_ipv6_hint(host, proto)}") from None
        written, addr = host, _with_zone(infos[0][4])
    if family == socket.AF_INET6:
        addr = _one_form(addr)
    if _ipv4(addr) == _BROADCAST:
        which = "" if written == _BROADCAST else f" ({_BROADCAST})"
        raise ConnSpecError(f'{what} "{spec}": "{written}"{which} is the broadcast address: no MTA can connect to '
                            f"it (libmilter refuses [{_BROADCAST}]: inet_addr's error value, INADDR_NONE)")
    if _multicast(addr):
        which = "" if written == addr else f" ({addr})"
        raise ConnSpecError(f'{what} "{spec}": "{written}"{which} is a multicast address: no MTA can connect to it '
                            "(TCP connects to one host's address)")
    if _link_local_without_zone(addr):
        raise ConnSpecError(f'{what} "{spec}": "{written}" is a link-local address, which means nothing without its '
                            f"interface: name it, as in {proto}:{_port_of(spec)}@{addr}%{_an_interface()} (Linux "
                            "refuses the bind)")
    return addr


def _refuse_unknown_zone(host: str, family: int, spec: str, what: str) -> None:
    """ConnSpecError for an IPv6 address whose zone names no interface of this host: a name was
    "not an inet6 address" or "cannot resolve", a number dropped (if_indextoname), then said to
    be missing ("name it"), though it was named."""
    addr, percent, zone = host.partition("%")
    if family != socket.AF_INET6 or not percent or not zone or not _is_ipv6(addr):
        return
    try:
        if zone.isascii() and zone.isdigit():
            socket.if_indextoname(int(zone))
        else:
            socket.if_nametoindex(zone)
    except (OSError, OverflowError, ValueError):
        raise ConnSpecError(f'{what} "{spec}": "{host}": no network interface "{zone}" on this host '
                            "(ip link lists them)") from None


def _one_form(addr: str) -> str:
    """An IPv6 address however written (``[::FFFF:7f00:1]``, ``[0:0::1]``) in one form, as a
    bracketed IPv4 one is written back in dotted quads: ipaddress's compressed form, zone kept,
    an IPv4-mapped one as ``::ffff:127.0.0.1`` (Python 3.13's and inet_ntop's form; 3.11 writes
    ``::ffff:7f00:1``). The listening line is what the admin compares with the MTA's setting."""
    ip = ipaddress.IPv6Address(addr)
    mapped = ip.ipv4_mapped
    if mapped is None:
        return ip.compressed
    return f"::ffff:{mapped}" + (f"%{ip.scope_id}" if ip.scope_id else "")


def ipv4_mapped(addr: str) -> bool:
    """``::ffff:127.0.0.1``: IPv4 traffic, which an IPv6-only socket can never bind to."""
    return _ipv4(addr) != addr


#: IPv6's link-local addresses. Not IPv6Address.is_link_local: a Python that reads an IPv4-mapped
#: address as its IPv4 form there would call ::ffff:169.254.1.1 one, IPv4 traffic libmilter binds.
_LINK_LOCAL: Final = ipaddress.IPv6Network("fe80::/10")


def _link_local_without_zone(addr: str) -> bool:
    """fe80::/10 with no interface: Linux refuses its bind, as "Invalid argument", which named no cause."""
    try:
        return "%" not in addr and ipaddress.IPv6Address(addr) in _LINK_LOCAL
    except ValueError:
        return False


def _an_interface() -> str:
    """An interface this host has, for an example of a zone: its first but the loopback, which a
    link-local address on it would not reach an MTA by; eth0 when it has none (or none is told)."""
    with contextlib.suppress(OSError):
        for _, name in socket.if_nameindex():
            if name != "lo":
                return name
    return "eth0"


def _port_of(spec: str) -> str:
    """The port as the spec wrote it, for an example that names the same one."""
    return spec.split(":", 1)[1].partition("@")[0]


def _multicast(addr: str) -> bool:
    """A multicast address, IPv4 (224.0.0.0/4), IPv6 (ff00::/8) or IPv4-mapped: Linux binds an
    IPv4 one for TCP and the filter said it listened there, but a connect to it is refused
    (Network is unreachable); an IPv6 one failed at bind, as "Invalid argument"."""
    try:
        return ipaddress.ip_address(_ipv4(addr)).is_multicast
    except ValueError:
        return False


def _ipv4(addr: str) -> str:
    """An IPv4-mapped IPv6 address (``::ffff:255.255.255.255``) as the IPv4 address it names,
    any other as it is: the broadcast address so written failed only at bind (Invalid argument)."""
    with contextlib.suppress(ValueError):
        mapped = ipaddress.IPv6Address(addr).ipv4_mapped
        if mapped is not None:
            return str(mapped)
    return addr


def _with_zone(sockaddr: tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]) -> str:
    """The address getaddrinfo gave, with its interface when it has one (``fe80::1%eth0``, as
    given): the zone comes apart, in scope_id, and a link-local address without it binds nowhere."""
    if len(sockaddr) == 4 and sockaddr[3]:
        with contextlib.suppress(OSError):
            return f"{sockaddr[0]}%{socket.if_indextoname(sockaddr[3])}"
    return str(sockaddr[0])


def sockaddr(family: int, host: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """What bind() takes: for IPv6 the zone of ``fe80::1%eth0`` as its scope_id, which a
    2-tuple leaves 0 (the bind of a link-local address then fails: Invalid argument)."""
    if family != socket.AF_INET6:
        return host, port
    found = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)[0][4]
    if len(found) != 4:  # (an IPv6 one is always 4: for the type checker)
        return host, port
    return found
