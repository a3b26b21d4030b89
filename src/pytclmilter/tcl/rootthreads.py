"""Root's checking `source` and `load` (rootfiles.py) in the threads of the Thread package.

A thread's interpreter runs in another thread, where tkinter's commands cannot be called, and
the script's thread may be waiting for it in C (a synchronous `thread::send`, `thread::join`, a
`tpool::post` waiting for a worker's ``-initcmd``): a check asked of that thread would never be
answered. So the checks are also a Tcl static package, ``Tclmilterroot``, whose commands are
ctypes callbacks: Python runs them in the calling thread, taking the GIL, which the script's
thread does not hold while it waits in Tcl. `thread::create` and `tpool::create` are procs
(rootfiles.py) that begin each thread's script and each worker's ``-initcmd`` with
``load {} Tclmilterroot``: as root, its interpreter then gets the commands, the prelude and the
procs; as any other user, nothing (Tcl's own commands stay).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any, Callable, Final, Sequence

import _tkinter

from .strings import tcl_to_wire, wire_to_tcl
from .usage import NONE, Answer, TclUsageError

log = logging.getLogger(__name__)

PACKAGE: Final = "Tclmilterroot"
_OK: Final = 0
_EVAL_GLOBAL: Final = 0x20000  # TCL_EVAL_GLOBAL
_p = ctypes.c_void_p
_OBJ_COMMAND: Final = ctypes.CFUNCTYPE(ctypes.c_int, _p, _p, ctypes.c_int, ctypes.POINTER(_p))
_INIT: Final = ctypes.CFUNCTYPE(ctypes.c_int, _p)
#: The Tcl functions used, with their (result, arguments) types.
_SIGNATURES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "Tcl_StaticPackage": (None, [_p, ctypes.c_char_p, _INIT, _p]),
    "Tcl_CreateObjCommand": (_p, [_p, ctypes.c_char_p, _OBJ_COMMAND, _p, _p]),
    "Tcl_GetStringFromObj": (_p, [_p, ctypes.POINTER(ctypes.c_int)]),
    "Tcl_NewStringObj": (_p, [ctypes.c_char_p, ctypes.c_int]),
    "Tcl_NewByteArrayObj": (_p, [ctypes.c_char_p, ctypes.c_int]),
    "Tcl_NewListObj": (_p, [ctypes.c_int, ctypes.POINTER(_p)]),
    "Tcl_SetObjResult": (None, [_p, _p]),
    "Tcl_EvalEx": (ctypes.c_int, [_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]),
}
#: The callbacks handed to Tcl: kept for the process's life, as Tcl keeps their addresses.
_KEPT: list[Any] = []


def register(commands: dict[str, Callable[[Sequence[str]], Any]], script: str) -> None:
    """Make ``load {} Tclmilterroot`` give an interpreter, of any thread, these commands (each
    answers as TclHost's: {ok value} or {error message errorCode}) and then evaluate ``script``
    in it, while the process is root; once a process (every host's are the same). OSError or
    AttributeError where this Tcl cannot be reached."""
    if _KEPT:
        return
    tcl = ctypes.CDLL(_tkinter.__file__)  # (its libtcl's functions, as tkinter calls them)
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(tcl, name)
        function.restype, function.argtypes = result, arguments
    made = [(name.encode(), _OBJ_COMMAND(_command(tcl, name, func))) for name, func in commands.items()]
    text = script.encode()

    def init(interp: int) -> int:
        if os.geteuid() != 0:
            return _OK
        for name, command in made:
            tcl.Tcl_CreateObjCommand(interp, name, command, None, None)
        return int(tcl.Tcl_EvalEx(interp, text, len(text), _EVAL_GLOBAL))

    init_callback = _INIT(init)
    _KEPT.extend([made, init_callback])
    tcl.Tcl_StaticPackage(None, PACKAGE.encode(), init_callback, None)


def _command(tcl: Any, name: str, func: Callable[[Sequence[str]], Any]) -> Callable[..., int]:
    """A Tcl command's C function calling ``func`` with its arguments; never raises (ctypes would
    print the exception and return TCL_OK)."""

    def command(_data: int, interp: int, objc: int, objv: Any) -> int:
        try:
            args = [_text(tcl, objv[i]) for i in range(1, objc)]
            answer: Answer = ("ok", func(args))
        except TclUsageError as usage:
            answer = ("error", str(usage), usage.code)
        except Exception as exc:  # noqa: BLE001 - report, never crash the thread
            log.exception("internal error in %s", name)
            answer = ("error", f"internal error: {exc}", NONE)
        tcl.Tcl_SetObjResult(interp, _obj(tcl, answer))
        return _OK

    return command


def _text(tcl: Any, obj: int) -> str:
    size = ctypes.c_int()
    data = ctypes.string_at(tcl.Tcl_GetStringFromObj(obj, ctypes.byref(size)), size.value)
    return tcl_to_wire(data).decode("utf-8", "surrogateescape")


def _obj(tcl: Any, value: Any) -> int:
    """A new Tcl object of a result: bytes a byte array, a tuple a list, None "", else text."""
    if isinstance(value, tuple):
        items = (_p * len(value))(*(_obj(tcl, item) for item in value))
        return int(tcl.Tcl_NewListObj(len(value), items))
    if isinstance(value, bytes):
        return int(tcl.Tcl_NewByteArrayObj(value, len(value)))
    data = wire_to_tcl(str("" if value is None else value).encode("utf-8", "surrogateescape"))
    return int(tcl.Tcl_NewStringObj(data, len(data)))
