"""What each signal the milter's processes take asks for: server.py serving, the --workers
supervisor and its workers (workers.py), and ``run`` while it loads (commands/). Here, apart from
server.py, so that those import them downward rather than from the server."""

from __future__ import annotations

import logging
import signal
from typing import Final

log: Final = logging.getLogger("pytclmilter")

#: Stop the milter gracefully (with workers: sent to the supervisor; to a worker, that worker).
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: From the --workers supervisor to the workers a reload replaced: finish the open sessions (their
#: log lines and metrics then say "milter reloaded", not "milter stopped"), then end.
REPLACED: Final = signal.SIGUSR2
#: Reload the script (to ``run`` serving alone, or to the --workers supervisor).
RELOAD: Final = signal.SIGUSR1


class StopTold:
    """Whether this process logged the stop signal it took: its handler (server.py's, or the
    --workers supervisor's) and the line of a reload's load the stop abandons
    (commands/reloading.py, through Milter.tell_stop) each tell it, whichever comes first, and
    the other at debug: one stop, one line."""

    def __init__(self) -> None:
        self.done = False

    def claim(self) -> bool:
        """True once: the caller logs the stop."""
        if self.done:
            return False
        self.done = True
        return True

    def tell(self, line: str) -> None:
        """The stop's line, at debug when it was told already."""
        if self.claim():
            log.info("%s", line)
        else:
            log.debug("%s (the abandoned reload's line told it)", line)
