"""A milter's settings as one immutable value.

:class:`~pytclmilter.milter.Milter` owns it and hands it down to the server, the
connections and the worker processes; changing an option (a ``Milter`` attribute, Tcl's
``milter configure``) makes a new value with :func:`dataclasses.replace`, so whoever holds
one sees a consistent set and no layer writes into another's configuration. Compiled with
the hot path (setup.py): the engine reads ``call_timeout`` and ``on_error`` as native
attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .protocol.constants import MAX_DATA_SIZE
from .status import ERROR_ANSWERS, Status

DEFAULT_CONNECTION: Final = "unix:/var/run/tclmilter.sock"
DEFAULT_TIMEOUT: Final = 7210
#: MTA connections served at once (per process; 0: no limit). Postfix opens one per smtpd and
#: cleanup process (default_process_limit 100 each): 1000 leaves room for five times that,
#: and holds what peers can make the milter keep (~0.5 MB a connection, docs/hardening.md) to
#: about half a gigabyte, where the open-files limit `run` lifts (65536 and more) held nothing.
DEFAULT_MAX_CONNECTIONS: Final = 1000
#: Worker processes at most (--workers). An idle worker is 2 tasks, 19 descriptors and 6.5 MB
#: of its own memory: 1024 of them (4 per core of the largest machines, room for sync callbacks
#: that wait) are 2048 tasks, within the 4096 of a common RLIMIT_NPROC (which counts threads),
#: and 6.5 GB; a typo such as 100000 forked until that limit or memory ran out.
MAX_WORKERS: Final = 1024
#: listen()'s argument is a C int.
_BACKLOG_MAX: Final = 0x7FFFFFFF


@dataclass(frozen=True)
class Settings:
    """What a milter is configured with; the meanings are in docs/python-api.md."""

    name: str = "pytclmilter"
    connection: str = DEFAULT_CONNECTION
    #: int or float: Tcl's -timeout is an integer and `milter configure -timeout` shows it as one
    #: (compiled, a float field would turn 7210 into 7210.0).
    timeout: int | float = DEFAULT_TIMEOUT
    backlog: int | None = None
    on_error: Status = Status.TEMPFAIL
    grace: float = 30.0
    socket_mode: int | None = None
    #: Owner (uid, gid; -1 keeps one) the unix socket's file has from the moment it appears.
    socket_owner: tuple[int, int] | None = None
    max_data_size: int = MAX_DATA_SIZE
    #: A callback running longer than this is stopped and answered with on_error (0: no limit).
    call_timeout: float = 60.0
    #: Processes serving one socket; 1 serves in this process (see workers.py).
    workers: int = 1
    #: How often a host (the Tcl interpreter) gets its turn to run timers and file events.
    tick_interval: float = 0.02
    #: Where to serve Prometheus metrics over HTTP (inet:PORT@HOST, metrics.py); "" serves none.
    metrics: str = ""
    #: Callbacks run, but the MTA gets continue and no modification; what would have been sent
    #: is logged and counted as "would ..." (engine.ConnectionEngine._answer).
    dry_run: bool = False
    #: Connections accepted beyond this many open are closed at once (accept.py); 0: no limit.
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        """Refuse what the command line and Tcl's `milter configure` refuse, whoever sets it: a
        negative call_timeout stopped every callback at once, a NaN grace was no grace at all."""
        for name, value in (("timeout", self.timeout), ("grace", self.grace), ("call_timeout", self.call_timeout),
                            ("tick_interval", self.tick_interval)):
            if not value >= 0:  # (NaN too)
                raise ValueError(f"{name} {value!r}: must be a number of seconds, 0 or more")
        if self.max_connections < 0:
            raise ValueError(f"max_connections {self.max_connections!r}: must be 0 (no limit) or more")
        if self.workers > MAX_WORKERS:
            raise ValueError(f"workers {self.workers!r}: must be at most {MAX_WORKERS} (each is a process)")
        for name, least in (("workers", self.workers), ("backlog", self.backlog)):
            if least is not None and least < 1:
                raise ValueError(f"{name} {least!r}: must be 1 or more")
        if self.backlog is not None and self.backlog > _BACKLOG_MAX:  # (run() ended in an OverflowError)
            raise ValueError(f"backlog {self.backlog!r}: more than {_BACKLOG_MAX}, the most listen() takes (the "
                             "kernel caps it at net.core.somaxconn)")
        if self.on_error not in ERROR_ANSWERS:
            raise ValueError(f"on_error {self.on_error.smfis}: must be one of "
                             f"{', '.join(s.smfis for s in ERROR_ANSWERS)}")
        if self.socket_mode is not None and not 0 <= self.socket_mode <= 0o777:
            # (chmod would take 0o7777: a setuid, world-writable socket file)
            raise ValueError(f"socket_mode {self.socket_mode:#o}: must be a file mode from 0o0 to 0o777, "
                             "such as 0o660")
