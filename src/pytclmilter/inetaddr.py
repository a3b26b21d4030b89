"""Which address an ``inet``/``inet6`` spec's host names, and whether a milter can serve there.

connspec.py reads the spec's syntax and hands the host here, brackets taken off; this module
owns the rules about the address itself. A bracketed IPv4 address is read as ``inet_addr`` reads
it (``[127.1]``), a bracketed IPv6 one as ``inet_pton`` does, or with a zone (``[fe80::1%eth0]``)
as the unbracketed form takes it; anything else is resolved. An IPv6 address is kept in one form
however written (``[::FFFF:7f00:1]`` is ``::ffff:127.0.0.1``), as a bracketed IPv4 one in dotted
quads: the spec's text is what the listening line shows. Refused at start, saying why: the
broadcast address 255.255.255.255 however written (libmilter refuses ``[255.255.255.255]``,
inet_addr's error value, INADDR_NONE, and Linux would bind it where no MTA can connect), its
IPv4-mapped form, a multicast address (``224.0.0.1``, ``ff05::1``), a link-local address without
its zone, a zone on any other address (Linux ignores it there), and a zone naming no interface
of this host. Any other IPv4-mapped address is served as
libmilter serves it: IPv4 connections to that address. Also what bind() takes for an address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from typing import Final


class AddressError(ValueError):
    """The address cannot be served. Its text is what follows the spec it is quoted with
    (connspec.py adds that): this module knows the host, not the spec or the setting."""


#: inet_addr's INADDR_NONE, its error and this address alike: libmilter refuses it.
_BROADCAST = "255.255.255.255"


def address(written: str, proto: str, port: str, *, bracketed: bool) -> str:
    """The address to listen on for a spec's host, ``written`` without its brackets, for
    ``proto`` ("inet" or "inet6"); ``port`` as the spec wrote it, for an example in a message.
    Raises AddressError saying why no MTA could connect there."""
    family = socket.AF_INET if proto == "inet" else socket.AF_INET6
    _refuse_zone_off_link(written, family, proto, port)
    _refuse_unknown_zone(written, family)
    addr = _numeric(written, family, proto) if bracketed else _resolved(written, family, proto)
    if family == socket.AF_INET6:
        addr = _one_form(addr)
    if _ipv4(addr) == _BROADCAST:
        which = "" if written == _BROADCAST else f" ({_BROADCAST})"
        raise AddressError(f'"{written}"{which} is the broadcast address: no MTA can connect to '
                           f"it (libmilter refuses [{_BROADCAST}]: inet_addr's error value, INADDR_NONE)")
    if _multicast(addr):
        raise _multicast_refused(written, addr)
    if _link_local_without_zone(addr):
        raise _link_local_refused(written, addr, proto, port)
    return addr


def _multicast_refused(written: str, addr: str) -> AddressError:
    which = "" if written == addr else f" ({addr})"
    return AddressError(f'"{written}"{which} is a multicast address: no MTA can connect to it '
                        "(TCP connects to one host's address)")


def _link_local_refused(written: str, addr: str, proto: str, port: str) -> AddressError:
    return AddressError(f'"{written}" is a link-local address, which means nothing without its '
                        f"interface: name it, as in {proto}:{port}@{addr}%{_an_interface()} (Linux "
                        "refuses the bind)")


def _resolved(host: str, family: int, proto: str) -> str:
    """An unbracketed host, a name or an address, as getaddrinfo gives it, its zone kept."""
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:  # (an IPv6 address for inet: "Address family ... not supported")
        raise AddressError(f'cannot resolve "{host}" for {proto}: {exc.strerror}{_ipv6_hint(host, proto)}') from None
    return _with_zone(infos[0][4])


def _numeric(addr: str, family: int, proto: str) -> str:
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
    raise AddressError(f'"{addr}" is not an {proto} address{_ipv6_hint(f"[{addr}]", proto)}')


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


def _refuse_zone_off_link(host: str, family: int, proto: str, port: str) -> None:
    """AddressError for a zone on an IPv6 address that is not link-local (``::1%lo``): it was
    "cannot resolve" (getaddrinfo takes an interface's name on fe80::/10 only) or "not an inet6
    address", and a number (``::1%1``) was taken though Linux ignores it there, tying the socket
    to no interface. libmilter takes no zone at all. A multicast one is refused as multicast, an
    empty zone (``fe80::1%``) on a link-local one as no zone: both were "cannot resolve" too."""
    addr, percent, zone = host.partition("%")
    if family != socket.AF_INET6 or not percent or not _is_ipv6(addr):
        return
    plain = _one_form(addr)
    if _multicast(plain):
        raise _multicast_refused(host, plain)
    if ipaddress.IPv6Address(addr) in _LINK_LOCAL:
        if not zone:
            raise _link_local_refused(host, plain, proto, port)
        return
    which = f"a zone (%{zone})" if zone else "an empty zone (%)"
    raise AddressError(f'"{host}": {which} is only meaningful on a link-local address (fe80::/10); Linux '
                       f"ignores it on {plain}, so it would not limit the socket to that interface: write "
                       f"{proto}:{port}@{plain}")


def _refuse_unknown_zone(host: str, family: int) -> None:
    """AddressError for an IPv6 address whose zone names no interface of this host: a name was
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
        raise AddressError(f'"{host}": no network interface "{zone}" on this host (ip link lists them)') from None


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
