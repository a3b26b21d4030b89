"""greylist_store.py -- the greylist's triplets in a store every worker and every host sees.

A ``--python`` hooks file for greylist.tcl. It gives the script one command::

    greydb configure ?-store SPEC? ?-delay S? ?-maxage S? ?-unavailable tempfail|accept? ?-retry S?
    greydb check IP SENDER RCPT    ;# pass | wait SECONDS | unavailable
    greydb expire                  ;# forget triplets not seen for -maxage; how many

and keeps in one place what every deployment of the greylist shares: the triplet rules (first
seen, delay, last seen, forgotten after -maxage), what happens while the store cannot be
reached, and the two back ends, chosen by -store:

* ``sqlite:PATH`` (the default, ``sqlite:/var/lib/greylist/greylist.sqlite``): Python's own
  sqlite3, a file on this host shared by any number of ``--workers`` (WAL mode, so readers never
  wait for the writer; one atomic upsert per check, so two workers seeing the same triplet at
  once agree on its first sight); made 0600, and its -wal and -shm with it;
* ``redis://HOST:PORT/DB`` (or ``rediss://``, or ``unix://SOCKET?db=DB``): a Redis server shared by several hosts; one key
  per triplet whose time to live is -maxage, updated by one Lua script (atomic in Redis). Needs
  the ``redis`` package (``pip install redis``), imported only when Redis is chosen. The URL's
  query may give the options of _REDIS_OPTIONS (rediss://: and _REDIS_TLS_OPTIONS); any other
  name, or a value an option does not take, fails the load.

The store is opened at the first check, not when the script loads: by then ``run --user`` has
dropped root's privileges and ``--workers`` have forked (each opens its own connection). Still
root (no ``--user``), it opens the file or the socket only where pytclmilter.safepath's checks
for a path opened by name allow (docs/python-api.md, "Opening a path by name as root").

A store that cannot be reached (Redis down, the SQLite file locked past 0.5 s or unwritable)
answers ``unavailable`` (-unavailable tempfail, the default: the script refuses the recipient
with a 4xx and the client retries) or ``pass`` (-unavailable accept: mail flows ungreylisted),
logs one warning when the outage starts and one when the store is back (the outages that start
within a minute of the last one logged only counted), and is tried again at most every -retry
seconds (default 5): in between, checks answer at once, without touching the network.
Callbacks run on the milter's only thread, so no call may block long: Redis gets 0.3 s to
connect, for a TLS handshake and for each read, 1 s in all for a check (a URL's timeouts may
shorten these, never a check's 1 s), and its host name is resolved once, when
the script loads (within 5 s, else the load fails), never while serving. A server that answers
what no Redis answers (another service at that port) is an outage too, not an error per check.

The file of the greylist before its store (one Tcl list per line: ip sender rcpt first last)
is imported once with pytclmilter's own python3 (``/opt/pytclmilter/bin/python3`` in
docs/deployment.md; it imports pytclmilter)::

    /opt/pytclmilter/bin/python3 greylist_store.py import OLDFILE [STORE] [MAXAGE]

STORE as -store (default $GREYLIST_STORE, else DEFAULT_STORE); a triplet last seen more than
MAXAGE seconds ago (default 35 days, as -maxage) is left out.

Each ``setup(milter)`` makes its own store object, closed when it is garbage: a second setup in
the same process (a reload) shares nothing with the first.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import math
import ipaddress
import os
import re
import socket
import sqlite3
import stat
import sys
import threading
import time
import weakref
from typing import Any, Final, Iterable, Iterator, NamedTuple, Protocol
from urllib.parse import SplitResult, parse_qsl, unquote_plus, urlsplit, urlunsplit

try:
    from pytclmilter import TclError
    from pytclmilter.logline import escape
    from pytclmilter.repeats import Repeated
    from pytclmilter.safepath import Untrusted, refuse_unsafe_path_as_root, refuse_unsafe_socket_as_root
except ImportError as exc:  # `import` run by a python3 other than pytclmilter's: say which one, not a traceback
    if __name__ != "__main__":
        raise
    sys.exit(f"{os.path.basename(sys.argv[0])}: {exc}: run it with the python3 pytclmilter is installed in, "
             "the one next to the pytclmilter program (e.g. /opt/pytclmilter/bin/python3)")

log = logging.getLogger("pytclmilter.greylist")

DEFAULT_STORE = "sqlite:/var/lib/greylist/greylist.sqlite"
SQLITE_BUSY_TIMEOUT = 0.5  # seconds a write waits for another worker's
#: Seconds one `greydb expire` may take (batch after batch): the milter serves nothing meanwhile,
#: and some 100 000 rows go in that time, far more than the new triplets of a minute (-interval).
EXPIRE_TIME = 0.2
REDIS_TIMEOUT = 0.3  # seconds to connect, and for each read of an answer
REDIS_DEADLINE = 1.0  # seconds one check may spend with Redis in all (a reconnect's handshake included)
RESOLVE_TIMEOUT = 5.0  # seconds the host name of a redis:// store may take to resolve, at load
REDIS_PREFIX = b"greylist:"
DEFAULT_MAX_AGE = 3024000.0  # 35 days
#: The longest -maxage: Redis's EXPIRE refuses past about 9.2e15 s, at every check; none needs more.
MAX_AGE_LIMIT = 3153600000.0  # 100 years
#: The files SQLite makes beside the database (and opens by their paths, as the database).
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
OUTAGE_LINES_EVERY = 60.0  # seconds: an outage that starts sooner after the last one logged is counted, not logged


class ConfigError(ValueError):
    """A setting that cannot work (a bad -maxage, an option a Redis URL does not take): the admin's
    to mend, so the script gets it as a Tcl error, one line and Tcl's frames (``greydb configure:
    -maxage must be ...``), never a Python traceback; the import prints it and exits 64. Any other
    exception of ``greydb`` is a fault of this file's, and keeps its traceback."""


class StoreError(Exception):
    """The store cannot be used now (also: a setting of this host that stops it being opened)."""


class Settings(NamedTuple):
    store: str = DEFAULT_STORE
    delay: float = 300
    max_age: float = DEFAULT_MAX_AGE
    unavailable: str = "tempfail"
    retry: float = 5


_OPTIONS = {"-store": "store", "-delay": "delay", "-maxage": "max_age", "-unavailable": "unavailable",
            "-retry": "retry"}


def configured(settings: Settings, words: Iterable[str]) -> Settings:
    """``settings`` changed by ``-option value`` pairs; ConfigError naming a bad one."""
    words = list(words)
    if len(words) % 2:
        raise ConfigError(f'option "{words[-1]}" has no value')
    changes: dict[str, Any] = {}
    for option, value in zip(words[::2], words[1::2]):
        field = _OPTIONS.get(option)
        if field is None:
            raise ConfigError(f'unknown option "{option}": must be {", ".join(_OPTIONS)}')
        if field == "store":
            check_spec(value)  # a bad spec, or Redis without its client: said at load time
            changes[field] = value
        elif field == "unavailable":
            if value not in ("tempfail", "accept"):
                raise ConfigError(f'-unavailable must be tempfail or accept, not "{value}"')
            changes[field] = value
        elif field == "max_age":
            changes[field] = _seconds(option, value, minimum=1, maximum=MAX_AGE_LIMIT)
        else:
            changes[field] = _seconds(option, value, minimum=0)
    return _consistent(settings._replace(**changes))


def _consistent(settings: Settings) -> Settings:
    """``settings``, unless -maxage would forget a triplet before its retry could pass."""
    if settings.max_age <= settings.delay:
        raise ConfigError(f"-maxage ({settings.max_age:g} s) must be longer than -delay ({settings.delay:g} s): a "
                         "retry after the delay would find its triplet forgotten, greylisted again for ever")
    return settings


def _seconds(option: str, value: str, minimum: float, maximum: float = math.inf) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not minimum <= seconds <= maximum or math.isinf(seconds):
        limits = (f"from {minimum:g} to {maximum:.0f} ({maximum / 31536000:g} years)" if maximum < math.inf
                  else f">= {minimum:g}")
        raise ConfigError(f'{option} must be a number of seconds {limits}, not "{value}"')
    return seconds


# ---------------------------------------------------------------------------- back ends


Errors = tuple[type[Exception], ...]


class Store(Protocol):
    """What the greylist needs of a back end; ``errors``: the exceptions that mean "unavailable"."""

    @property
    def errors(self) -> Errors: ...

    @property
    def where(self) -> str: ...

    @property
    def forgets_by_itself(self) -> bool:
        """True when the store drops old triplets on its own (expire has nothing to ask it)."""

    def see(self, triplet: tuple[str, str, str], now: float, max_age: float) -> tuple[float, int]:
        """Record a sighting at ``now``; (first seen, sightings) after it, both reset when the
        triplet was last seen more than ``max_age`` ago. Atomic."""

    def expire(self, before: float) -> int:
        """Forget (some of the) triplets last seen before ``before``; how many."""

    def merge(self, triplet: tuple[str, str, str], first: float, last: float, now: float, max_age: float) -> None:
        """Add a triplet seen from ``first`` to ``last`` (import): the earlier first and later last win."""

    def close(self) -> None: ...


def check_spec(spec: str) -> str:
    """The kind of store a ``-store`` spec names (sqlite, redis); ConfigError for a bad one."""
    if spec.startswith("sqlite:"):
        if spec == "sqlite:":
            raise ConfigError("-store sqlite:PATH needs a path")
        return "sqlite"
    # (unix:///run/redis/redis-server.sock?db=0: Redis's socket; a scheme in any case, as RFC 3986 and redis-py read it)
    if re.match(r"(rediss?|unix)://.", spec, re.IGNORECASE):
        try:
            _refuse_unreadable_url(spec)
            _refuse_unix_host(spec)
            _check_redis_options(spec)
        except ConfigError:
            if _password_misread(spec):
                raise ConfigError(f"-store {spec.partition(':')[0]}://...: not shown, as a password in it may have "
                                  "been read as its port, path or query: a password's \"/\", \"?\", \"#\" or \"@\" "
                                  "must be written %2F, %3F, %23, %40") from None
            raise
        _redis_module()
        return "redis"
    said = "-store must be sqlite:PATH or redis://HOST:PORT/DB (or unix://SOCKET?db=DB), not"
    if "@" in spec or "?" in spec:  # (a mistyped URL, REDIS:/ or redis//, may hold a password: its head alone)
        head = re.match(r"(?i)(rediss?|unix|sqlite)(?=:?/)", spec)  # (a scheme's word, nothing else)
        raise ConfigError(f'{said} "{head[0] if head else ""}..." (the rest not shown: a password may be in it, '
                          'before an "@" or in its query)')
    raise ConfigError(f'{said} "{spec}"')


def _refuse_unreadable_url(spec: str) -> None:
    """ConfigError for a URL urlsplit cannot read (``redis://[::1/0``; shown by its scheme alone,
    as what it holds, a password too, cannot be told apart) and for a port that is no number from
    1 to 65535: Python's words for those ("Port out of range 0-65535") came from deep in the
    store's making, and port 0 loaded, every check an outage."""
    try:
        parts = urlsplit(spec)
    except ValueError as exc:  # (its words quote what stands in brackets: with an "@", a password's maybe)
        why = str(exc) if "@" not in spec or "'" not in str(exc) else 'a password\'s "[" or "]" must be written %5B, %5D'
        raise ConfigError(f"-store {spec.partition(':')[0]}://...: not a URL ({why})") from None
    if "#" in spec:  # (redis-py drops it and what follows: a password's "#", ?password=a#b read as "a")
        raise ConfigError(f'-store {_redis_where(spec)}: a "#" ends a URL, what follows it would be dropped '
                          '(a password\'s "#" is written %23)')
    # The port as urllib's SplitResult.port, and so redis-py, reads it: after the first "]" of a
    # bracketed host (redis://[::1]:1]:6379/0: "1]:6379", not "6379": a ValueError at load).
    host_port = parts.netloc.rpartition("@")[2]
    _, bracket, bracketed = host_port.partition("[")
    port = bracketed.partition("]")[2].partition(":")[2] if bracket else host_port.partition(":")[2]
    if port and not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ConfigError(f'-store {_redis_where(spec)}: the port must be a number from 1 to 65535, not "{port}"')


def _password_misread(spec: str) -> bool:
    """Whether an "@" follows the URL's host part: a password's unencoded "/", "?" or "#" (base64
    ones have "/") ended the host part there, its head read as the port and its tail as the path,
    the query or a fragment, so that any message quoting what was read would show it. (Or an
    "@" in the query's values, ?username=me@example.org: its messages are withheld as well.)"""
    return "@" in re.sub(r"^[^/?#]*", "", spec.partition("://")[2])


def _refuse_unix_host(spec: str) -> None:
    """ConfigError for a unix:// URL with a host part: redis-py takes its path alone, so
    unix://run/redis.sock connected to /redis.sock, "run" dropped in silence, and
    unix://redis.sock to no path at all (a user before an "@" is redis-py's: kept)."""
    parts = urlsplit(spec)
    host = parts.netloc.rpartition("@")[2]
    if parts.scheme == "unix" and host:
        raise ConfigError(f'-store {_redis_where(spec)}: a unix:// URL names the socket by its absolute path, after '
                         f'three slashes (unix:///run/redis/redis-server.sock?db=0); "{host}" would be dropped')


def _positive_seconds(value: str) -> str | None:
    try:
        seconds = float(value)
    except ValueError:
        return "a number of seconds > 0"
    return None if 0 < seconds < math.inf else "a number of seconds > 0"


#: The most digits a number of a Redis URL may have: int() refuses more than 4300 (a ValueError out
#: of the load, under its traceback), redis-py too, at each check (?db=) or in silence (/DB: 0).
DIGITS_AT_MOST = 18


def _database(value: str) -> str | None:
    return (None if value.isascii() and value.isdigit() and len(value) <= DIGITS_AT_MOST
            else "a database number (0, 1, ...)")


def _count(minimum: int) -> Any:
    def check(value: str) -> str | None:
        if not (value.isascii() and value.isdigit()) or len(value) <= DIGITS_AT_MOST and int(value) < minimum:
            return f"a whole number >= {minimum}"
        return None if len(value) <= DIGITS_AT_MOST else f"a whole number of {DIGITS_AT_MOST} digits at most"
    return check


def _anything(value: str) -> str | None:
    return None


def _one_of(words: tuple[str, ...], said: str, fold: bool = True) -> Any:
    """A check of a word among ``words``; in any case with ``fold`` (redis-py's booleans), else as written."""
    def check(value: str) -> str | None:
        return None if (value.lower() if fold else value) in words else said
    return check


#: The options a Redis URL's query may give, and what each must be (None: fine; else what it must
#: be). redis-py hands every other name to its connection as an argument, which refused it as each
#: check connected ("unexpected keyword argument"), an outage blamed on the server; and checks a
#: value only then (?ssl_cert_reqs=bogus) or not at all (?ssl_check_hostname=bogus is true).
_TRUE_OR_FALSE = _one_of(("true", "false", "yes", "no", "1", "0"), "true or false")
#: (health_check_interval .. socket_read_size: redis-py reads them, and a URL may have carried them
#: before this list; none lengthens a check past its 1 s, none adds a retry: that has no tries)
_REDIS_OPTIONS = {"db": _database, "username": _anything, "password": _anything, "client_name": _anything,
                  "socket_timeout": _positive_seconds, "socket_connect_timeout": _positive_seconds,
                  "health_check_interval": _count(0), "socket_keepalive": _TRUE_OR_FALSE,
                  "protocol": _one_of(("2", "3"), "2 or 3"), "max_connections": _count(1),
                  "retry_on_timeout": _TRUE_OR_FALSE, "socket_read_size": _count(1)}
_REDIS_TLS_OPTIONS = {"ssl_ca_certs": _anything, "ssl_ca_path": _anything, "ssl_certfile": _anything,
                      "ssl_keyfile": _anything, "ssl_password": _anything,
                      # (as written: redis-py refused NONE at each connect, an outage per check)
                      "ssl_cert_reqs": _one_of(("none", "optional", "required"), "none, optional or required", fold=False),
                      # (redis-py reads these as false, any other word as true)
                      "ssl_check_hostname": _TRUE_OR_FALSE}


def _check_redis_options(spec: str) -> None:
    """ConfigError naming an option of a Redis URL's query that redis-py would take and fail on
    later, at each check, or read as something else than meant; and a database after the port
    that is no number (redis-py ignores it: database 0)."""
    parts = urlsplit(spec)
    where = _redis_where(spec)
    accepted = {**_REDIS_OPTIONS, **(_REDIS_TLS_OPTIONS if parts.scheme == "rediss" else {})}
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and _database(database) is not None:
        raise ConfigError(f'-store {where}: the database after the port must be a number (/0, /1, ...), '
                         f'not "{parts.path}"')
    seen: set[str] = set()
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        check = accepted.get(name)
        if check is None:
            hint = ("TLS options are for rediss:// only" if name in _REDIS_TLS_OPTIONS
                    else "".join(f"{m}?" for m in difflib.get_close_matches(name, accepted, 1)))
            raise ConfigError(f'-store {where}: unknown option "{name}" in its query'
                             f'{f" ({hint})" if hint else ""}: must be {", ".join(accepted)}')
        if name in seen:
            raise ConfigError(f'-store {where}: option "{name}" given twice')
        seen.add(name)
        wanted = check(value)
        if wanted is not None:
            raise ConfigError(f'-store {where}: {name} must be {wanted}, not "{value}"')


def open_store(spec: str) -> Store:
    """The back end a ``-store`` spec names (not connected yet: that happens at its first use)."""
    if check_spec(spec) == "sqlite":
        return SqliteStore(spec[len("sqlite:"):])
    return RedisStore(spec)


def _db_text(value: str) -> str | bytes:
    """Text as SQLite stores it: bytes that are not UTF-8 (surrogate escapes) as a blob, so that
    they stay distinct and come back unchanged."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


class SqliteStore:
    """Triplets in a SQLite file shared by the processes of one host."""

    errors: Errors = (sqlite3.Error, OSError, StoreError)
    forgets_by_itself = False
    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS triplets (
            ip TEXT NOT NULL, sender TEXT NOT NULL, rcpt TEXT NOT NULL,
            first_seen REAL NOT NULL, last_seen REAL NOT NULL, seen INTEGER NOT NULL,
            PRIMARY KEY (ip, sender, rcpt));
        CREATE INDEX IF NOT EXISTS triplets_last_seen ON triplets (last_seen);
    """
    # One statement: SQLite runs it under the write lock, so two workers recording the same new
    # triplet at once get one first sighting (seen 1) and one second (seen 2), never two firsts.
    # A first sighting later than now (another host's clock ahead, a number no greylist wrote)
    # becomes now: kept, it held the triplet until then ("try again in 86401 seconds").
    _SEE = """
        INSERT INTO triplets (ip, sender, rcpt, first_seen, last_seen, seen) VALUES (?, ?, ?, ?, ?, 1)
        ON CONFLICT (ip, sender, rcpt) DO UPDATE SET
            first_seen = CASE WHEN last_seen < ? THEN excluded.first_seen ELSE min(first_seen, excluded.first_seen) END,
            seen = CASE WHEN last_seen < ? THEN 1 ELSE seen + 1 END,
            last_seen = excluded.last_seen
        RETURNING first_seen, seen
    """
    _MERGE = """
        INSERT INTO triplets (ip, sender, rcpt, first_seen, last_seen, seen) VALUES (?, ?, ?, ?, ?, 1)
        ON CONFLICT (ip, sender, rcpt) DO UPDATE SET
            first_seen = min(first_seen, excluded.first_seen), last_seen = max(last_seen, excluded.last_seen)
    """
    _EXPIRE_BATCH = 1000  # rows per expire: a call must not hold the write lock for long

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = f"sqlite:{path}"
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._told = False  # that the file is readable by others

    def _conn(self) -> sqlite3.Connection:
        if self._db is not None and self._pid == os.getpid():
            return self._db
        # (a connection from before a fork is the parent's: SQLite forbids using it; left alone)
        try:  # as root: SQLite follows links, and opens the file and makes its -wal... by their paths
            refuse_unsafe_path_as_root(self.path, SQLITE_SIDE_FILES)
        except Untrusted as exc:
            raise StoreError(exc.strerror) from None
        self._tell_others_read(_create_private(self.path))
        db = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None)
        try:
            _wal_mode(db)
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, no fsync per check
            db.executescript(self._SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db, self._pid = db, os.getpid()
        return db

    def _tell_others_read(self, mode: int | None) -> None:
        """A file made before the store made it private (0644, SQLite's default): said once, not
        changed (its mode is the admin's)."""
        if mode is not None and mode & (stat.S_IROTH | stat.S_IWOTH) and not self._told:
            self._told = True
            log.warning("greylist store %s is readable by others (mode %04o): the addresses in it are "
                        "theirs to read; chmod 0600 it and its -wal and -shm", escape(self.where), mode)

    def see(self, triplet: tuple[str, str, str], now: float, max_age: float) -> tuple[float, int]:
        oldest = now - max_age
        rows = self._conn().execute(self._SEE, (*map(_db_text, triplet), now, now, oldest, oldest)).fetchall()
        first, seen = rows[0]
        return float(first), int(seen)

    def expire(self, before: float) -> int:
        """Batch after batch, each its own transaction (the write lock is free between them), until
        none is left or EXPIRE_TIME is up. One batch a call, and the timer's call a minute, forgot
        1000 triplets a minute: more new ones than that, and the file grew for ever."""
        db, removed, ends = self._conn(), 0, time.monotonic() + EXPIRE_TIME
        while True:
            cur = db.execute(
                "DELETE FROM triplets WHERE rowid IN (SELECT rowid FROM triplets WHERE last_seen < ? LIMIT ?)",
                (before, self._EXPIRE_BATCH))
            removed += cur.rowcount
            if cur.rowcount < self._EXPIRE_BATCH or time.monotonic() >= ends:
                return removed

    def merge(self, triplet: tuple[str, str, str], first: float, last: float, now: float, max_age: float) -> None:
        if last >= now - max_age:
            self._conn().execute(self._MERGE, (*map(_db_text, triplet), first, last))

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None


def _wal_mode(db: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, waiting for another process as long as any statement would.

    While another process switches the same new file to WAL (two workers' first checks at once),
    SQLite answers "database is locked" at once, without its busy handler: one worker of two
    began its life with an outage and answered -unavailable for -retry seconds.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _create_private(path: str) -> int | None:
    """Make the database file, 0600, if it is not there; the mode of the one that was (None: made now).

    SQLite makes it 0644 (less the umask): a list of who mails whom, readable by every local
    user. Its -wal, -shm and -journal take the database file's mode (SQLite's rule, os_unix.c),
    so they are private too. O_EXCL: a name that exists, a link too, is never opened here, and
    never replaced; SQLite opens what is there (as root, no link: refuse_unsafe_path_as_root). A
    link to where the file is to be (the --user's: it reaches what that user may write) is
    followed to make it there, as SQLite would.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        return None
    except FileExistsError:
        pass
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # a link to no file yet
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        return None
    if not stat.S_ISREG(mode):  # (SQLite's words: "unable to open database file", "disk I/O error")
        raise StoreError(f"{path} is {_kind(mode)}, not a database file")
    return stat.S_IMODE(mode)


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, in a word or two."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


# The sighting, in Redis: one script runs atomically, so two hosts recording the same new triplet
# at once get one first sighting and one second. A key not seen for max_age has expired (TTL).
# (first and last stay strings: a Lua number would come back truncated to an integer.) A key of
# ours holding what the script never writes (a string another program SET, a field that is no
# number) is that triplet's first sight: Redis's error for it (WRONGTYPE) made an outage of the
# whole store, every recipient tempfailed for -retry seconds, at each retry of that one triplet.
# A first sight later than now (a host whose clock ran ahead, a number no greylist wrote) becomes
# now, as in SQLite: kept, it held the triplet until then, its reply "try again in 86401 seconds".
_REDIS_NUMBER = """
local function number(s)
    local n = tonumber(s)
    if n and n == n and n > -math.huge and n < math.huge then return n end
end
"""
_REDIS_SEE = _REDIS_NUMBER + """
local kind = redis.call('TYPE', KEYS[1])['ok']
local first, seen
if kind == 'hash' then
    local old = redis.call('HMGET', KEYS[1], 'first', 'seen')
    if number(old[1]) and number(old[2]) then
        first, seen = string.format('%.17g', number(old[1])), math.floor(number(old[2])) + 1
        if number(old[1]) > tonumber(ARGV[1]) then
            first = ARGV[1]
            redis.call('HSET', KEYS[1], 'first', first)
        end
    end
end
if first then
    redis.call('HSET', KEYS[1], 'last', ARGV[1], 'seen', seen)
else
    if kind ~= 'none' then redis.call('DEL', KEYS[1]) end
    first, seen = ARGV[1], 1
    redis.call('HSET', KEYS[1], 'first', first, 'last', first, 'seen', 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {first, seen}
"""
_REDIS_MERGE = _REDIS_NUMBER + """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then redis.call('DEL', KEYS[1]) end
local old = redis.call('HMGET', KEYS[1], 'first', 'last')
local first, last = ARGV[1], ARGV[2]
if number(old[1]) and number(old[1]) < tonumber(first) then first = old[1] end
if number(old[2]) and number(old[2]) > tonumber(last) then last = old[2] end
local ttl = math.ceil(tonumber(last) + tonumber(ARGV[3]) - tonumber(ARGV[4]))
if ttl > 0 then
    redis.call('HSET', KEYS[1], 'first', first, 'last', last)
    if not number(redis.call('HGET', KEYS[1], 'seen')) then redis.call('HSET', KEYS[1], 'seen', 1) end
    redis.call('EXPIRE', KEYS[1], ttl)
end
return ttl
"""


def _redis_module() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError("-store redis://... needs the Python package redis (pip install redis)") from None
    return redis


def _no_setinfo(redis: Any) -> dict[str, None]:
    """redis-py's arguments that keep it from sending CLIENT SETINFO: driver_info since 8.x,
    lib_name and lib_version before (deprecated since)."""
    known = inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    return {"driver_info": None} if "driver_info" in known else {"lib_name": None, "lib_version": None}


#: The options of a Redis URL's query whose values are never shown (:func:`_redis_where`).
_SECRET_OPTIONS: Final = ("password", "username", "ssl_password")


def _redis_where(url: str) -> str:
    """The URL for the log, without the user and password it may hold: before the host's "@" (the
    last one: redis-py reads an unencoded "@" in a password so) or as ?password= / ?username=,
    nor a rediss:// URL's ?ssl_password= (its key file's passphrase)."""
    parts = urlsplit(url)  # (the rest of the query as written: re-encoded, ?ssl_ca_certs=/etc/ca.pem read %2Fetc%2F...)
    query = "&".join(item for item in parts.query.split("&")
                     if unquote_plus(item.partition("=")[0]) not in _SECRET_OPTIONS)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + (f"?{query}" if query else "")


def _resolve(host: str, port: int, timeout: float = RESOLVE_TIMEOUT) -> str:
    """The first address ``host`` resolves to, within ``timeout``; ConfigError saying why not.

    getaddrinfo has no time limit of its own (a slow DNS holds it 4-30 s), so it runs in a
    thread of its own that is given up on after ``timeout``.
    """
    found: list[list[Any] | OSError] = []

    def lookup() -> None:
        try:
            found.append(list(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        raise ConfigError(f'cannot resolve the Redis host "{host}": no answer within {timeout:g} s')
    answer = found[0]
    if isinstance(answer, OSError) or not answer:
        raise ConfigError(f'cannot resolve the Redis host "{host}": {answer or "no address"}')
    return str(answer[0][4][0])


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_address(parts: SplitResult, address: str) -> str:
    """The URL of ``parts`` with ``address`` for its host (user, password and port kept)."""
    userinfo, at, _ = parts.netloc.rpartition("@")
    host = f"[{address}]" if ":" in address else address
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}{port}"))


def pinned_url(url: str) -> str:
    """``url`` with its host name resolved, once, now (at load): a reconnect while serving must
    not ask DNS, which would hold the milter's only thread for as long as DNS takes."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme == "unix" or not host or _is_address(host):
        return url
    if parts.scheme == "rediss":  # TLS checks the certificate against the name it connects to
        raise ConfigError(f'-store rediss:// needs an IP address, not the host name "{host}" (a name '
                         "would be looked up at every reconnect, holding the milter while DNS answers)")
    return _with_address(parts, _resolve(host, parts.port or 6379))


class _Deadline:
    """The end (time.monotonic()) of the Redis operation under way; infinite between operations."""

    def __init__(self) -> None:
        self.end = math.inf

    def left(self) -> float:
        return self.end - time.monotonic()


class _BoundedSocket:
    """A connected socket whose every read and write ends by the deadline of the operation under way.

    redis-py's socket_timeout bounds each read, not an answer: a server that trickles its answer
    (a byte every 0.1 s) never trips it, and held the milter's only thread until -calltimeout
    stopped the callback, at every message, no outage ever being noticed. Past the deadline a
    read raises socket.timeout, which redis-py turns into its TimeoutError (and disconnects).
    """

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline
        self._timeout = sock.gettimeout()

    def __getattr__(self, name: str) -> Any:  # fileno, shutdown, close, setsockopt...: the socket's own
        return getattr(self._sock, name)

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def _bound(self) -> None:
        left = self._deadline.left()
        if left <= 0:
            raise socket.timeout(f"no answer within {REDIS_DEADLINE:g} s in all")
        self._sock.settimeout(left if self._timeout is None else min(left, self._timeout))

    def recv(self, *args: Any) -> bytes:
        self._bound()
        return self._sock.recv(*args)

    def recv_into(self, *args: Any) -> int:
        self._bound()
        return self._sock.recv_into(*args)

    def send(self, *args: Any) -> int:
        self._bound()
        return self._sock.send(*args)

    def sendall(self, *args: Any) -> None:
        self._bound()
        self._sock.sendall(*args)


class _WithinDeadline:
    """A connection's timeout (socket_connect_timeout, socket_timeout) as redis-py reads it: the
    one set, cut to what is left of the operation's deadline.

    The connect, and a TLS handshake, happen in redis-py's _connect, before the socket is a
    _BoundedSocket: a URL's ?socket_connect_timeout=3 (the query wins over the client's
    arguments) held a check 3 s on a trickled handshake, at every reconnect. Read as the connect
    and then the handshake begin, each gets what the ones before left of REDIS_DEADLINE.
    """

    def __init__(self, deadline: _Deadline, base: type, name: str) -> None:
        self._deadline = deadline
        self._name = name
        # redis-py 8 keeps it behind a property of its own; 5 sets it on the instance (__set__ here)
        self._base = inspect.getattr_static(base, name, None)

    def _configured(self, conn: Any) -> float | None:
        if self._name in vars(conn):
            configured: float | None = vars(conn)[self._name]
            return configured
        return self._base.__get__(conn, type(conn)) if hasattr(self._base, "__get__") else None

    def __get__(self, conn: Any, owner: type | None = None) -> Any:
        if conn is None:
            return self
        configured = self._configured(conn)
        left = self._deadline.left()
        if math.isinf(left):  # between operations
            return configured
        left = max(left, 0.001)  # (0 would make the socket non-blocking: a timeout is what this is)
        return left if configured is None else min(configured, left)

    def __set__(self, conn: Any, value: float | None) -> None:
        vars(conn)[self._name] = value


#: The files a rediss:// connection reads by their paths (redis-py's attribute, the URL's option).
_TLS_FILES = (("ca_certs", "ssl_ca_certs"), ("certfile", "ssl_certfile"), ("keyfile", "ssl_keyfile"))


def _refuse_unsafe_tls_files(conn: Any) -> None:
    """StoreError unless root may read the TLS files of ``conn`` by their paths (no --user):
    OpenSSL follows links, and a CA file another user could swap would have a fake Redis trusted."""
    for attribute, option in _TLS_FILES:
        path = getattr(conn, attribute, None)
        if isinstance(path, str):
            try:
                refuse_unsafe_path_as_root(path)
            except Untrusted as exc:
                raise StoreError(f"{option} {path}: {exc.strerror}") from None


def _bounded_connection(base: Any, deadline: _Deadline) -> type:
    """redis-py's connection class ``base`` (TCP, TLS or unix socket) with its socket bounded by
    ``deadline``, its connect and TLS handshake too."""

    def _connect(self: Any) -> _BoundedSocket:
        if isinstance(getattr(self, "path", None), str):  # (a unix socket's connection)
            try:  # as root, only a socket no other user could have put there (redis-py connects by the path)
                refuse_unsafe_socket_as_root(self.path)
            except OSError as exc:  # (not redis-py's to word as a connection error)
                raise StoreError(exc.strerror) from None
        _refuse_unsafe_tls_files(self)
        return _BoundedSocket(base._connect(self), deadline)

    return type(f"Bounded{base.__name__}", (base,), {
        "_connect": _connect, **{name: _WithinDeadline(deadline, base, name)
                                 for name in ("socket_connect_timeout", "socket_timeout")}})


#: What redis-py raises when a server answers in Redis's syntax what Redis never answers (a
#: list where the handshake expects a map, a number for the check's pair): it trusts the server.
_ALIEN_ANSWER: Errors = (AttributeError, TypeError, ValueError, IndexError, KeyError)


class RedisStore:
    """Triplets in a Redis server shared by several hosts.

    A host name in the URL is resolved once, when the store is configured (the script loads):
    the milter then connects to that address, and a reload resolves the name again.
    """

    forgets_by_itself = True  # each key's time to live

    def __init__(self, url: str) -> None:
        redis = _redis_module()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.errors: Errors = (redis.exceptions.RedisError, OSError, StoreError)
        self.where = _redis_where(url)
        self._deadline = _Deadline()
        kind = {"unix": redis.connection.UnixDomainSocketConnection, "rediss": redis.connection.SSLConnection}
        base = kind.get(urlsplit(url).scheme, redis.connection.Connection)
        # No retries: redis-py's default retries with back-off would hold the milter's thread for
        # seconds. The greylist retries instead, at most every -retry seconds. RESP2, as redis-py
        # before 8 spoke: a script's answer needs nothing more, and 8's RESP3 opens with HELLO,
        # whose refusal of a missing password ("HELLO must be called with the client already
        # authenticated ...") was the outage line, and a server without it a warning per connect.
        # No CLIENT SETINFO either: a connection's first command is the check's (or AUTH, SELECT).
        self._client = redis.Redis.from_url(
            pinned_url(url), socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, protocol=2, **_no_setinfo(redis),
            connection_class=_bounded_connection(base, self._deadline))
        self._see = self._client.register_script(_REDIS_SEE)
        self._merge = self._client.register_script(_REDIS_MERGE)

    @staticmethod
    def key(triplet: tuple[str, str, str]) -> bytes:
        """greylist:IP NUL SENDER NUL RCPT (NUL cannot occur in milter strings: no two triplets share a key)."""
        return REDIS_PREFIX + b"\0".join(s.encode("utf-8", "surrogateescape") for s in triplet)

    @contextlib.contextmanager
    def _talking(self) -> Iterator[None]:
        """One operation: REDIS_DEADLINE in all, and an answer no Redis gives is a StoreError
        (an outage, logged once), not an error of every check."""
        self._deadline.end = time.monotonic() + REDIS_DEADLINE
        try:
            yield
        except _ALIEN_ANSWER as exc:
            raise StoreError(f"an answer no Redis gives ({_reason(exc)}): is it a Redis server?") from exc
        finally:
            self._deadline.end = math.inf

    def see(self, triplet: tuple[str, str, str], now: float, max_age: float) -> tuple[float, int]:
        with self._talking():
            first, seen = self._see(keys=[self.key(triplet)], args=[repr(now), math.ceil(max_age)])
            return float(first), int(seen)

    def expire(self, before: float) -> int:
        return 0  # Redis forgets a key when its time to live runs out

    def merge(self, triplet: tuple[str, str, str], first: float, last: float, now: float, max_age: float) -> None:
        with self._talking():
            self._merge(keys=[self.key(triplet)], args=[repr(first), repr(last), repr(max_age), repr(now)])

    def close(self) -> None:
        self._client.close()


# ---------------------------------------------------------------------------- the greylist


class Greylist:
    """The triplet rules on a store, and what to answer while the store cannot be reached."""

    def __init__(self, settings: Settings = Settings()) -> None:
        self.settings = settings
        self._next_try = 0.0
        self.clock = time.monotonic
        self._open(settings.store)

    def _open(self, spec: str) -> None:
        self.store = open_store(spec)
        self.outages = _Outages(self.store.where)
        # (closed when dropped, a reload's, or at exit: what its outage lines did not tell is told)
        self._finalizer = weakref.finalize(self, _closed, self.store, self.outages)

    def configure(self, words: Iterable[str]) -> None:
        settings = configured(self.settings, words)
        if settings.store != self.settings.store:
            self._finalizer()
            self._open(settings.store)
        self.settings = settings

    def check(self, ip: str, sender: str, rcpt: str) -> str | tuple[str, int]:
        """``pass``, ``(wait, SECONDS)``, or while the store cannot be reached ``unavailable``
        (-unavailable tempfail) or ``pass`` (accept)."""
        now = time.time()
        seen = self._use(lambda store: store.see((ip, sender, rcpt), now, self.settings.max_age))
        if seen is None:
            self.outages.answered += 1
            return "pass" if self.settings.unavailable == "accept" else "unavailable"
        first, count = seen
        if count == 1:  # first sight: a retry after the delay is what real mail servers do
            return ("wait", math.ceil(self.settings.delay))
        left = first + self.settings.delay - now
        return ("wait", math.ceil(left)) if left > 0 else "pass"

    def expire(self) -> int:
        if self.store.forgets_by_itself:  # nothing is sent: no sign of the store being back
            return 0
        removed = self._use(lambda store: store.expire(time.time() - self.settings.max_age))
        return removed or 0

    def _use(self, op: Any) -> Any:
        """``op(store)``; None when the store cannot be reached (an outage, see _Outages; the
        store is not tried again until -retry seconds have passed)."""
        now = self.clock()
        if self.outages.since is not None and now < self._next_try:
            return None
        try:
            result = op(self.store)
        except self.store.errors as exc:
            # from the failure, not the try's start: a try that took longer than -retry (SQLite's
            # lock wait, Redis's deadline) left every next check due to wait as long again
            self._next_try = self.clock() + self.settings.retry
            self.outages.failed(now, _reason(exc), self._answer(), self.settings.retry)
            self.store.close()  # a fresh connection at the next try
            return None
        self.outages.answering(now)
        return result

    def _answer(self) -> str:
        return "tempfail" if self.settings.unavailable == "tempfail" else "accept (not greylisted)"


class _Outages:
    """A store's outages and their lines: one when an outage starts, one when it ends.

    A store that fails and answers by turns (Redis at its maxmemory, a lossy link) made two
    lines every -retry seconds, per process: an outage that starts within OUTAGE_LINES_EVERY of
    the last line is counted instead, both its lines, and the count told by the next line, or
    the first check the store answers once the minute is over, or as the store is closed, or at
    an end with no atexit; an outage under way without a line is in the count, and one under way
    with its line has its recipients told then (its "is back" line never comes). A counted one
    that lasts past the minute gets its line then. Holds nothing of the Greylist, which the
    finalizer and pytclmilter.repeats' end hook outlive.
    """

    def __init__(self, where: str) -> None:
        self.where = where  # the store's spec, for the lines
        self.since: float | None = None  # clock() when the outage under way began
        self.answered = 0  # recipients answered without the store in it
        self.answered_told = 0  # of those, the ones a line told while it went on (tell)
        self.told = False  # it has had its line
        self.answer = "tempfail"  # how they were answered (Greylist._answer)
        self.untold = self.untold_answered = 0  # outages ended without a line since the last one, their recipients
        self.quiet_until = -math.inf  # no line before this (clock())
        # pytclmilter.repeats tells a Repeated's counts at every end, atexit or not (a stop,
        # overdue's give-up, a worker's os._exit, which the finalizer misses). Its window never
        # ends, so nothing but an end tells it; its first due() is "log it", made here so that
        # each later one is counted.
        self._at_end = Repeated(math.inf, tell=lambda *_: self.tell("told as the milter stops"))
        self._at_end.due(where)

    def failed(self, now: float, reason: str, answer: str, retry: float) -> None:
        """A try failed: an outage starts or goes on; its line, unless one came within the minute."""
        if self.since is None:
            self.since, self.answered, self.answered_told, self.told = now, 0, 0, False
        self.answer = answer
        if self.told:
            self._at_end.due(self.where)  # (its recipients: an end with no "is back" line tells them)
            return
        if now < self.quiet_until:
            self._at_end.due(self.where)  # (counted: an end tells it)
            return
        since = (f"; {self.untold} more outages since the last such line, {self.untold_answered} recipients "
                 f"answered {answer} in them (logged at most once a minute)" if self.untold else "")
        already = f"; down for {now - self.since:.1f} s" if now > self.since else ""
        # the spec comes from the script's arguments, the reason may quote what the store sent
        log.warning("greylist store %s unavailable (%s): answering %s, trying again every %g s%s%s",
                    escape(self.where), escape(reason), answer, retry, already, since)
        self.told = True
        self._said(now)

    def answering(self, now: float) -> None:
        """A try the store answered: the end of the outage under way (its line, or counted), or
        the count's line once the minute is over."""
        if self.since is None:
            if self.untold and now >= self.quiet_until:
                self.tell("logged at most once a minute")
                self._said(now)
            return
        if self.told:  # (the ones a line told while it went on, at a stop, are not told again)
            since = "since the last line about it" if self.answered_told else "meanwhile"
            log.warning("greylist store %s is back after %.1f s; %d recipients were answered %s %s",
                        escape(self.where), now - self.since, self.answered - self.answered_told, self.answer, since)
        else:
            self.untold += 1
            self.untold_answered += self.answered
        self.since = None

    def tell(self, why: str) -> None:
        """The line of the outages no line told, the one under way included (``why``: when); or,
        for one under way that had its line, of the recipients since: its "is back" line, which
        would tell them, does not come if the store is closed or the process ends first."""
        under_way = self.since is not None and not self.told
        if self.untold or under_way:
            log.warning("greylist store %s: %d more outages since the last line about it, %d recipients answered "
                        "%s in them%s (%s)", escape(self.where), self.untold + under_way,
                        self.untold_answered + (self.answered if under_way else 0), self.answer,
                        ", the last one still under way" if under_way else "", why)
        elif self.since is not None and self.answered > self.answered_told:
            log.warning("greylist store %s: still unavailable, %d recipients answered %s since the last line about "
                        "it (%s)", escape(self.where), self.answered - self.answered_told, self.answer, why)
        self.untold = self.untold_answered = 0
        self.told = self.since is not None  # (the end of the one under way: its own line)
        self.answered_told = self.answered

    def closing(self) -> None:
        """The store is closed: what no line told is told now, and nothing is left for an end."""
        self.tell("told as the store is closed")
        self._at_end.overdue(ended_only=False)

    def _said(self, now: float) -> None:
        """A line told all there was: none before a minute, nothing left for an end to tell."""
        self.untold = self.untold_answered = 0
        self.quiet_until = now + OUTAGE_LINES_EVERY
        self._at_end.overdue(ended_only=False)


def _closed(store: Store, outages: _Outages) -> None:
    """Close a store no longer used (a reload dropped it, -store changed, the process ends),
    telling what its outage lines did not: the next line that would have never comes."""
    outages.closing()
    store.close()


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------- the Tcl command


def _command(greylist: Greylist) -> Any:
    def greydb(subcommand: str, *args: str) -> Any:
        if subcommand == "check":
            if len(args) != 3:
                raise TclError('wrong # args: should be "greydb check ip sender rcpt"', error_code=("TCL", "WRONGARGS"))
            return greylist.check(*args)
        if subcommand == "configure":
            try:
                greylist.configure(args)
            except ConfigError as exc:
                raise TclError(f"greydb configure: {exc}", error_code=("GREYLIST", "CONFIG")) from None
            return None
        if subcommand == "expire" and not args:
            return greylist.expire()
        raise TclError(f'bad subcommand "{subcommand}": must be check, configure or expire',
                       error_code=("TCL", "LOOKUP", "SUBCOMMAND", subcommand))

    return greydb


def setup(milter: Any) -> None:
    """The hooks file's entry: the command ``greydb`` for the script (the store opens at its first check)."""
    milter.tcl_command("greydb", _command(Greylist()))


# ---------------------------------------------------------------------------- import of the old file


def old_entries(lines: Iterable[str]) -> Iterator[tuple[tuple[str, str, str], float, float]]:
    """The entries of greylist.tcl's old state file: one Tcl list per line, ``ip sender rcpt
    first last``, read by Tcl itself; a line that is no such list is skipped, as the old script
    skipped it."""
    import tkinter

    tcl = tkinter.Tcl()
    for line in lines:
        try:
            words = [str(w) for w in tcl.splitlist(line)]
        except (tkinter.TclError, UnicodeError):
            continue
        if len(words) != 5:
            continue
        ip, sender, rcpt, first, last = words
        try:
            yield (ip, sender, rcpt), float(first), float(last)
        except ValueError:
            continue


def import_file(old: str, store: Store, max_age: float = DEFAULT_MAX_AGE) -> tuple[int, int]:
    """Merge the old state file into the store; (triplets imported, lines skipped or expired)."""
    imported = skipped = 0
    now = time.time()
    try:
        with open(old, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
        for triplet, first, last in old_entries(lines):
            if last < now - max_age:
                continue
            store.merge(triplet, first, last, now, max_age)
            imported += 1
        skipped = len(lines) - imported
    finally:
        store.close()
    return imported, skipped


def main(argv: list[str]) -> int:
    usage = (f"usage: {os.path.basename(sys.argv[0])} import OLDFILE [STORE] [MAXAGE]\n"
             f"  STORE: sqlite:PATH, redis://HOST:PORT/DB or unix://SOCKET?db=DB (default $GREYLIST_STORE, else {DEFAULT_STORE})")
    if len(argv) not in (2, 3, 4) or argv[0] != "import":
        print(usage, file=sys.stderr)
        return 64
    store = argv[2] if len(argv) > 2 else os.environ.get("GREYLIST_STORE", DEFAULT_STORE)
    try:
        max_age = _seconds("MAXAGE", argv[3], 1, MAX_AGE_LIMIT) if len(argv) > 3 else DEFAULT_MAX_AGE
        target = open_store(store)
    except ValueError as exc:
        print(f"import: {exc}", file=sys.stderr)
        return 64
    errors: Errors = (OSError, *target.errors)  # (redis's too: one line, not a traceback)
    try:
        imported, skipped = import_file(argv[1], target, max_age)
    except errors as exc:
        print(f"import: {target.where}: {_reason(exc)}", file=sys.stderr)
        return 1
    print(f"imported {imported} triplets into {target.where} ({skipped} lines skipped or expired)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
