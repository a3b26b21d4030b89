"""The script's private data as Python callbacks see it (``Context.script_priv``).

What a script sets with ``setpriv`` stays in its interpreter as Tcl values (tclmilter.tcl keeps
a dict per connection in ``::tclmilter::priv``), so a body collected block by block is never
copied into Python and back. Python reads it only when a Python callback asks for it: one call
into Tcl, which hands over the bytes Tcl keeps the text in, converted once into the ``str`` the
README's bytes rule gives.
"""

from __future__ import annotations

import tkinter
from typing import Any, Callable

from .strings import from_tcl, tcl_to_text, to_tcl


def identity_text(data: Any) -> str:
    """A value ``encoding convertto identity`` produced, as Python's text."""
    if isinstance(data, bytes):
        return tcl_to_text(data)
    return from_tcl(str(data))  # not a byte array after all: tkinter made text of it


class TclPrivate:
    """The script interpreter's half of every connection's private data (see ``ScriptPrivate``)."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call  # runs a command in the script's interpreter
        # Connections whose script has set private data: only those need a call into Tcl (most
        # connections of most filters have none, and a call costs as much as a tenth of a message).
        self._kept: set[int] = set()

    def started(self, conn_id: int) -> None:
        """The script set the connection's first private data (tclmilter.tcl says so)."""
        self._kept.add(conn_id)

    def get(self, conn_id: int, name: str) -> Any:
        if conn_id not in self._kept:
            raise KeyError(name)
        try:
            return identity_text(self._call("::tclmilter::privbytes", conn_id, to_tcl(name)))
        except tkinter.TclError:
            raise KeyError(name) from None

    def items(self, conn_id: int) -> dict[str, Any]:
        if conn_id not in self._kept:
            return {}
        flat = self._call("::tclmilter::allprivbytes", conn_id)
        if not isinstance(flat, tuple):  # no private data: the empty string
            return {}
        return {identity_text(flat[i]): identity_text(flat[i + 1]) for i in range(0, len(flat), 2)}

    def drop(self, conn_id: int, name: str) -> None:
        if conn_id in self._kept:
            self._call("::tclmilter::forgetpriv", conn_id, to_tcl(name))

    def unset(self, conn_id: int, pattern: str | None) -> None:
        if conn_id in self._kept:
            self._call("::tclmilter::unsetpriv", conn_id, *(() if pattern is None else (to_tcl(pattern),)))

    def forget(self, conn_id: int) -> None:
        """The connection is over: its private data goes."""
        if conn_id in self._kept:
            self._kept.discard(conn_id)
            self._call("::tclmilter::forgetpriv", conn_id)
