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
process. The socket is made while still root; messages are sent to the manager's address, which
systemd keeps writable for every user (the process may have dropped to ``--user`` by then).
Only the process that read the address speaks (the ``--workers`` supervisor, not its workers,
as systemd's default ``NotifyAccess=main`` wants). A message that cannot be sent is logged once;
the milter serves on.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from ..logline import escape

log = logging.getLogger("pytclmilter")


class Notifier:
    """The service manager's socket, if there is one: :meth:`send` does nothing without it."""

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._failed = False
        self._ready = False
        self._pid = os.getpid()
        if not address:
            return
        if address.startswith("@"):  # the abstract namespace: a NUL where the path would start
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        else:
            log.warning("NOTIFY_SOCKET %s: not a unix socket address; systemd will not be told when the milter is "
                        "ready", escape(address))
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

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

    def send(self, message: str) -> None:
        if self._sock is None or self._address is None or os.getpid() != self._pid:
            return  # (a --workers worker: systemd hears the main process alone, NotifyAccess=main)
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:  # once: the manager is gone or never was, and will not come back
                self._failed = True
                log.warning("cannot notify systemd (NOTIFY_SOCKET): %s%s", exc.strerror or exc,
                            "" if self._ready or not message.startswith("READY=1") else
                            f" (as uid {os.geteuid()}): the service manager is not told that the milter "
                            "serves, and a Type=notify unit fails its start at TimeoutStartSec")
            return
        self._ready = self._ready or message.startswith("READY=1")  # (the start was heard)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
