"""pytclmilter: a milter engine in Python that runs TclMilter scripts and Python callbacks."""

from . import cwdguard

cwdguard.guard()  # before any other import: see cwdguard

from . import earlyreload

earlyreload.hold()  # before the imports that take most of run's start: see earlyreload

from .checks import MilterError
from .context import Context
from .hooks import Hooks
from .milter import Milter, ReloadError
from .scripting import TclError
from .settings import Settings
from .status import ACCEPT, CONTINUE, DISCARD, NOREPLY, REJECT, SKIP, TEMPFAIL, Status

__version__ = "0.1.0"
__all__ = [
    "Milter", "Settings", "Hooks", "Context", "MilterError", "TclError", "ReloadError", "Status",
    "CONTINUE", "REJECT", "DISCARD", "ACCEPT", "TEMPFAIL", "SKIP", "NOREPLY",
]
