"""The per-message log line, handed straight to the one handler that would write it.

The engine logs one line per message (its verdict). logging's path for one record (Logger.info,
_log, makeRecord, the record's __init__, handle, callHandlers, the handler's handle and emit,
getMessage: a dozen interpreted calls) was a tenth of the engine's instructions per message.
``pytclmilter run`` installs a handler that can tell when it is the only place the line can go,
unfiltered (``DirectSink.takes``); then the line is formatted and queued by it in one call, the
same text logging would have written. Otherwise (an application's own logging set-up, a filter,
a second handler, syslog) the line goes through logging as usual.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

INFO: Final = logging.INFO


class DirectSink(Protocol):
    def takes(self, logger: logging.Logger, level: int) -> bool:
        """A line at ``level`` from ``logger`` would reach this sink alone, unfiltered."""

    def write_line(self, level: int, message: str) -> None:
        """Write it as logging would have, through this sink."""


_sink: DirectSink | None = None


def set_sink(sink: DirectSink | None) -> None:
    global _sink
    _sink = sink


def info(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.info(msg, *args)``, in one call when the direct sink takes the line."""
    sink = _sink
    if sink is not None and sink.takes(logger, INFO):
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):  # logging reports a bad format on stderr and goes on: so do we
            logger.info(msg, *args)
            return
        sink.write_line(INFO, message)
    else:
        logger.info(msg, *args)
