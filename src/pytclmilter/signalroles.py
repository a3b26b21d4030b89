"""What each signal the milter's processes take asks for: server.py serving, the --workers
supervisor and its workers (workers.py), and ``run`` while it loads (commands/). Here, apart from
server.py, so that those import them downward rather than from the server."""

from __future__ import annotations

import signal
from typing import Final

#: Stop the milter gracefully (with workers: sent to the supervisor; to a worker, that worker).
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: From the --workers supervisor to the workers a reload replaced: finish the open sessions (their
#: log lines and metrics then say "milter reloaded", not "milter stopped"), then end.
REPLACED: Final = signal.SIGUSR2
#: Reload the script (to ``run`` serving alone, or to the --workers supervisor).
RELOAD: Final = signal.SIGUSR1
