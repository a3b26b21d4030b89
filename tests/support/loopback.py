"""A TCP server on loopback that is not what the code under test expects (no milter behind a
balancer, no Redis behind a store's address): each connection is served by ``serve(conn)`` in a
thread of its own, so that a server that never answers holds only its own connection."""

from __future__ import annotations

import socket
import threading
from typing import Callable


class LoopbackServer:
    """Accepts on 127.0.0.1 (a free port) until :meth:`close`; ``accepted`` counts connections."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._serve = serve
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._serve(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
