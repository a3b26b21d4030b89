"""The Tcl bridge: TclMilter's ``milter`` command and context commands in a tkinter interpreter."""

from .interp import TclHost, tcl_library_dir

__all__ = ["TclHost", "tcl_library_dir"]
