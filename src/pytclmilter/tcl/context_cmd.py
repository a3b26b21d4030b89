"""The per-connection context command: ``$context subcommand ?arg ...?``.

Each subcommand maps onto a :class:`~pytclmilter.context.Context` method, with
TclMilter's argument forms (``chgheader name ?index? data``, ``setreply rcode
??xcode? message?``) and Tcl-worded errors.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Final, Sequence

from ..context import Context
from ..logline import escape, said
from ..repeats import Repeated
from ..tclmatch import unset_matching
from .pycommands import tcl_form
from .usage import TclUsageError, bad_choice, count_ok, integer, with_article, wrong_args

# Private data: ::tclmilter::context (tclmilter.tcl) answers from the script's own values and
# comes here only for what Python callbacks set (ctx.priv), or with an error to report.


def _getpriv(ctx: Context, args: Sequence[str]) -> Any:
    if not args:
        return _readable("", ctx.priv)
    return _read(ctx, args[0])


def priv_value(value: Any) -> Any:
    """A value Python set, as the context command hands it to Tcl: :func:`tcl_form` with texts
    left as they are (the command's result goes through deep_to_tcl) and any other type as its
    string form. Bytes are text under the bytes rule (tkinter would make a byte array of them,
    one character per byte: UTF-8 text read as Latin-1, and the bytes that reach the MTA altered)."""
    return tcl_form(value, _same, _string_form)


def _string_form(value: object) -> str:
    """``str(value)``; one that raises (a host's class) is a ValueError, the script's error as a
    nesting too deep is, not an "internal error" with pytclmilter's frames."""
    try:
        return str(value)
    except Exception as exc:  # noqa: BLE001 - any error of the host's code
        raise ValueError(f"{with_article(type(value).__name__)} whose str() failed ({type(exc).__name__}: {said(exc)})") from None


def _same(value: str) -> str:
    return value


def _read(ctx: Context, name: str) -> Any:
    try:
        value = ctx.priv[name]
    except KeyError:
        # errorCode as Tcl's own for a variable that is not there: `trap {TCL LOOKUP VARNAME}` works
        raise TclUsageError(f'can\'t read "{name}": no such private data', ("TCL", "LOOKUP", "VARNAME", name)) from None
    return _readable(name, value)


def _readable(name: str, value: Any) -> Any:
    """priv_value, its ValueError (a value a Python callback nested too deep, or whose str()
    raises) the script's error."""
    try:
        return priv_value(value)
    except ValueError as exc:
        what = f'private data "{name}"' if name else "private data"
        raise TclUsageError(f"{what}: {exc}", ("PYTHON", "ValueError", str(exc))) from None


def _setpriv(ctx: Context, args: Sequence[str]) -> Any:
    if len(args) == 1:
        return _read(ctx, args[0])
    return ctx.setpriv(args[0], args[1])


def _unsetpriv(ctx: Context, args: Sequence[str]) -> None:
    unset_matching(ctx.priv, args[0] if args else None)


log = logging.getLogger("pytclmilter")


def _getsymval(ctx: Context, args: Sequence[str]) -> str:
    name = args[0]
    value = ctx.getsymval(name)
    if value is None:
        if len(name) > 1 and name[0] != "{":
            _bare_name(ctx, name)
        return ""
    return value


def _bare_name(ctx: Context, name: str) -> None:
    """``getsymval {auth_authen}`` is Tcl quoting: it asks for ``auth_authen``, which finds nothing,
    as in libmilter and TclMilter 1.0 (the MTAs send long names in braces). The answer stays ""
    (a script written for 1.0 behaves as it did), but the admin is told why the value is empty."""
    if ctx.getsymval("{" + name + "}") is None:
        return
    missed = _BARE_NAMES.due(name)
    if missed is not None:
        _bare_name_said(_BARE_NAMES, name, missed)


def _bare_name_said(_names: Repeated, name: str, missed: int) -> None:
    """The warning of a macro asked for without its braces, with how many such calls since the
    last (as the next one says it, or alone once the hour is over: repeats.tell_counts)."""
    shown = escape(name)
    log.warning('getsymval %s found nothing though the MTA sent {%s}: a long macro name needs its '
                'braces in the value, as in getsymval {{%s}} or "{%s}" (said once an hour%s)',
                shown, shown, shown, shown, f"; {missed} more since" if missed else "")


#: Bare long macro names a script asked for while the MTA sent their braced form: said an hour.
_BARE_NAMES: Final = Repeated(3600.0, keep=32, tell=_bare_name_said)


def _setreply(ctx: Context, args: Sequence[str]) -> None:
    # setreply rcode ??xcode? message?: with two arguments the second is the message.
    if len(args) == 1:
        ctx.setreply(args[0])
    elif len(args) == 2:
        ctx.setreply(args[0], None, args[1])
    else:
        ctx.setreply(args[0], args[1] or None, args[2])


def _setmlreply(ctx: Context, args: Sequence[str]) -> None:
    ctx.setmlreply(args[0], args[1] or None, *args[2:])


def _name_index_data(default: int) -> Callable[[Sequence[str]], tuple[str, int, str]]:
    def parse(args: Sequence[str]) -> tuple[str, int, str]:
        if len(args) == 2:
            return args[0], default, args[1]
        return args[0], integer(args[1]), args[2]

    return parse


_chg_args: Final = _name_index_data(1)
_ins_args: Final = _name_index_data(0)


def _chgheader(ctx: Context, args: Sequence[str]) -> None:
    name, index, data = _chg_args(args)
    ctx.chgheader(name, data, index)


def _insheader(ctx: Context, args: Sequence[str]) -> None:
    name, index, data = _ins_args(args)
    ctx.insheader(name, data, index)


# name -> (min args, max args or None, argument usage, handler)
SUBCOMMANDS: Final[dict[str, tuple[int, int | None, str, Callable[[Context, Sequence[str]], Any]]]] = {
    "getpriv": (0, 1, "?name?", _getpriv),
    "getsymval": (1, 1, "symbol", _getsymval),
    "setpriv": (1, 2, "name ?value?", _setpriv),
    "setreply": (1, 3, "rcode ??xcode? message?", _setreply),
    "setmlreply": (3, None, "rcode xcode line ?line ...?", _setmlreply),
    "unsetpriv": (0, 1, "?pattern?", _unsetpriv),
    "addheader": (2, 2, "name data", lambda c, a: c.addheader(a[0], a[1])),
    "addrcpt": (1, 2, "rcpt ?esmtpArgs?", lambda c, a: c.addrcpt(a[0], a[1] if len(a) > 1 else None)),
    "chgheader": (2, 3, "name ?index? data", _chgheader),
    "delrcpt": (1, 1, "rcpt", lambda c, a: c.delrcpt(a[0])),
    "insheader": (2, 3, "name ?index? data", _insheader),
    "replacebody": (1, 1, "data", lambda c, a: c.replacebody(a[0])),
    "progress": (0, 0, "", lambda c, a: c.progress()),
    "quarantine": (1, 1, "reason", lambda c, a: c.quarantine(a[0])),
    "chgfrom": (1, 2, "sender ?esmtpArgs?", lambda c, a: c.chgfrom(a[0], a[1] if len(a) > 1 else None)),
    "setsymlist": (2, 2, "stage macros", lambda c, a: c.setsymlist(a[0], a[1])),
}


def dispatch(ctx: Context, args: Sequence[str]) -> Any:
    """Run ``$context sub ?arg ...?`` for one context."""
    if not args:
        raise wrong_args(f"{ctx.host_data} subcommand ?arg ...?")
    spec = SUBCOMMANDS.get(args[0])
    if spec is None:
        raise bad_choice("option", args[0], SUBCOMMANDS)
    low, high, usage, handler = spec
    rest = args[1:]
    if not count_ok(len(rest), low, high):  # (not check_count: the usage text is built only when it is needed)
        raise wrong_args(f"{ctx.host_data} {args[0]}{' ' + usage if usage else ''}")
    result = handler(ctx, rest)
    return "" if result is None else result
