"""The url target of scripts/fuzz: arbitrary ``-store`` specs to the greylist's ``check_spec``
(tclmilter/examples/greylist_store.py), which reads a Redis URL at load time
(``scripts/fuzz --target url run``).

One input is the spec as UTF-8 (bytes that are not: surrogate escapes, as a Tcl string of them
arrives), its first byte choosing a prefix put in front (none, ``redis://``, ``rediss://``,
``unix://``, ``redis://user:SECRET@``, ``rediss://:SECRET@h:1/0?ssl_password=``...), so that
the fuzzer gets past the scheme at once. Each byte 0x01 in the rest is replaced by the SECRET, a
password's stand-in. Checked on every input:

* ``check_spec`` returns a kind (sqlite, redis) or raises ConfigError; any other exception (a
  plain ValueError, an IndexError) is a fault: ``greydb`` shows it with a traceback;
* a spec it takes as Redis's, redis-py's own parser (``redis.connection.parse_url``) takes too:
  otherwise the store failed at its first check, not at load;
* no message quotes the SECRET where it was a password or a user: before the last "@" after the
  scheme (a user, a password, one read as a port or a path), or the value of a ``password``,
  ``username`` or ``ssl_password`` option of the query (where the SECRET also stands elsewhere,
  the host's name say, the message may quote it there: not checked).
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tclmilter" / "examples"))

import greylist_store  # noqa: E402
from greylist_store import ConfigError, check_spec  # noqa: E402

SECRET = "Pw7Secr3tQz"
#: Option names whose values are secrets (redis-py's password and user, the TLS key's passphrase).
SECRET_OPTIONS = ("password", "username", "ssl_password")
PREFIXES = ["", "redis://", "rediss://", "unix://", "redis://user:\x01@", "rediss://:\x01@127.0.0.1:6379/0?",
            "redis://127.0.0.1:6379/0?password=\x01&", "rediss://127.0.0.1/0?ssl_password=\x01&",
            "unix:///run/redis.sock?db=0&", "redis://:\x01", "sqlite:"]


class Stats:
    def __init__(self) -> None:
        self.inputs = self.taken = self.refused = self.secrets = 0


STATS = Stats()


def spec_of(data: bytes) -> str:
    prefix = PREFIXES[data[0] % len(PREFIXES)] if data else ""
    return (prefix + data[1:].decode("utf-8", "surrogateescape")).replace("\x01", SECRET)


def secret_is_private(spec: str) -> bool:
    """Whether each SECRET in ``spec`` stands where a password or a user does (module docstring)."""
    rest = spec.partition("://")[2] if "://" in spec else spec  # (a spec that is no URL: quoted whole)
    userinfo, at, after = rest.rpartition("@")
    public = after if at else rest
    try:
        query = urlsplit(spec).query
        secrets = [v for k, v in parse_qsl(query, keep_blank_values=True) if k in SECRET_OPTIONS]
    except ValueError:
        secrets = []
    return public.count(SECRET) <= sum(v.count(SECRET) for v in secrets)


def one_input(data: bytes) -> None:
    STATS.inputs += 1
    spec = spec_of(data)
    try:
        kind = check_spec(spec)
    except ConfigError as exc:
        STATS.refused += 1
        message = str(exc)
        if SECRET in spec and secret_is_private(spec):
            STATS.secrets += 1
            assert SECRET not in message, f"the password is shown: {message!r} for {spec!r}"
        return
    STATS.taken += 1
    assert kind in ("sqlite", "redis"), kind
    if kind == "redis":
        redis = greylist_store._redis_module()
        try:
            redis.connection.parse_url(spec)
        except Exception as exc:  # noqa: BLE001 - the point: redis-py refuses what load took
            raise AssertionError(f"check_spec took {spec!r}, redis-py's parse_url refuses it: {exc!r}") from exc


def seeds() -> dict[str, bytes]:
    def seed(prefix: int, rest: str) -> bytes:
        return bytes([prefix]) + rest.encode("utf-8", "surrogateescape")

    return {
        "plain": seed(1, "127.0.0.1:6379/0"),
        "tls-options": seed(2, "10.0.0.1:6380/1?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem&ssl_password=\x01"),
        "unix": seed(3, "/run/redis/redis-server.sock?db=2&socket_timeout=0.5"),
        "user-password": seed(4, "[::1]:6379/3?client_name=grey&protocol=3"),
        "password-query": seed(6, "max_connections=4&health_check_interval=10&retry_on_timeout=yes"),
        "misread-password": seed(9, "a/b?c@127.0.0.1:6379/0"),
        "bad-port": seed(1, ":\x01@h:99999/0"),
        "fragment": seed(1, "h:1/0?password=a#b"),
        "unknown-option": seed(5, "sockettimeout=1"),
        "ipv6-unclosed": seed(1, "[::1/0"),
        "sqlite": seed(10, "/var/lib/grey.sqlite"),
        "no-scheme": seed(0, "redis:/h/0"),
    }
