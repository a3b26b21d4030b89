"""The unix socket's file, made and removed as root in a directory that others may write.

Made without a window: the socket is bound in a private directory (mode 0700,
ours, made next to the socket path and used only through a descriptor), its
mode and owner are set there, and only then is it linked under its public
name with link(2), which neither replaces what is there nor follows a link.
Until that link no one else can reach the file, and after it the public name
is never chmod-ed or chown-ed: a symlink or a hard link swapped in at the
public name is never acted on. The other ways fall short: chmod and chown by
path act on whatever the name holds by then (a symlink swapped in: its
target); fchmod and fchown of a socket's descriptor change the socket, not
its file; a umask set around bind() gives the mode only, and is process-wide
(a file a thread of the script creates at that moment gets it too).

What is at the public name beforehand is examined as it is, a link as a link:
nothing is fine; a socket nobody answers on (asked through a descriptor of that
very socket, never by its name) is stale and removed; a live
socket or anything else is refused and left alone. Removals (that stale
socket at start, ours at stop) check the name and unlink it relative to the
directory's descriptor; :func:`safepath.remove_if` says what window remains
(one name may be removed, never a link's target, no file changed). At stop the
process is usually the ``--user`` already, not root.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass, field

from .connspec import ConnSpecError
from .logline import escape
from .safepath import Changed, connect_at, ident, lstat_at, open_dir, remove_if

log = logging.getLogger("pytclmilter")

_INNER = "socket"  # the socket's name inside the private directory


@dataclass
class SocketFile:
    """Our socket's file: its directory (a descriptor), its name there and its (st_dev, st_ino)."""

    dirfd: int
    name: str
    ident: tuple[int, int]
    path: str
    #: The process that bound it: a --workers worker's copy (the supervisor's Listener, forked) is
    #: not its to remove, whatever ends the worker (a thread's `exit` runs run.py's removal there).
    pid: int = field(default_factory=os.getpid)

    def remove(self) -> None:
        """Remove the name if it still holds our socket; close the directory's descriptor."""
        if os.getpid() != self.pid:
            return
        try:
            if not remove_if(self.dirfd, self.name, stat.S_ISSOCK, self.ident):
                self._tell_replaced()
        except OSError as exc:  # after --user, a root-owned directory, say
            log.warning("cannot remove socket file %s: %s (left as a stale socket: the next start replaces it)",
                        escape(self.path), exc.strerror or exc)
        finally:
            os.close(self.dirfd)

    def _tell_replaced(self) -> None:
        """Our socket's name holds something else by now: say so (the MTA could not reach the
        milter by that name since), and leave it alone."""
        try:
            st = lstat_at(self.dirfd, self.name)
        except OSError:
            return
        if st is not None:
            log.warning("socket file %s was replaced while serving (now %s): left alone; the MTA could not "
                        "reach this milter by that name since", escape(self.path), _kind(st.st_mode))


def _kind(mode: int) -> str:
    """What a directory entry is, in a word or two for a log line."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "another socket"),
                       (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"


def bind_unix(path: str, backlog: int, mode: int | None,
              owner: tuple[int, int] | None) -> tuple[socket.socket, SocketFile]:
    """A listening socket whose file is at ``path``, with this mode and owner (uid, gid; -1 keeps
    one) from the moment it appears there; ConnSpecError with the reason otherwise."""
    if mode is not None and not 0 <= mode <= 0o777:  # chmod(-1) would make it 07777: anyone's
        raise ConnSpecError(f"socket mode {mode:#o} of unix:{path} is no file mode (0 to 0777)")
    try:
        dirfd, name = open_dir(path)
    except FileNotFoundError:  # (a /run directory after a reboot, a unit without its ExecStartPre)
        where = os.path.dirname(path) or "."
        raise ConnSpecError(f"cannot listen on unix:{path}: its directory {where} does not exist: make it first "
                            f"(owned by the --user user, if any: install -d -o USER -m 0750 {where})") from None
    except OSError as exc:
        raise ConnSpecError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    try:
        _clear_stale(dirfd, name, path)
        sock, made = _bind_private(dirfd, name, path, backlog, mode, owner)
    except BaseException:
        os.close(dirfd)
        raise
    return sock, SocketFile(dirfd, name, made, path)


def _clear_stale(dirfd: int, name: str, path: str) -> None:
    """Remove a stale socket; refuse a live socket or anything that is not a socket."""
    try:
        st = lstat_at(dirfd, name)
    except OSError as exc:
        raise ConnSpecError(f"cannot use {path}: {exc.strerror}") from None
    if st is None:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConnSpecError(f"{path} exists and is not a socket; refusing to remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        _connect_to(probe, dirfd, name, st, path)  # sends nothing: only asks whether it listens
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConnSpecError(f"cannot check socket {path}: {exc.strerror}") from None
        try:  # nobody answers: a leftover from a process that died
            if remove_if(dirfd, name, stat.S_ISSOCK, ident(st)):
                log.info("removed stale socket %s", escape(path))
        except OSError as err:
            raise ConnSpecError(f"cannot remove stale socket {path}: {err.strerror}") from None
        return
    finally:
        probe.close()
    raise ConnSpecError(f"{path} is in use by another process; refusing to replace it")


def _connect_to(probe: socket.socket, dirfd: int, name: str, st: os.stat_result, path: str) -> None:
    """safepath.connect_at; ConnSpecError when the name holds something else by now."""
    try:
        connect_at(probe, dirfd, name, st)
    except Changed:
        raise ConnSpecError(f"{path} changed while starting; refusing to replace it") from None


def _bind_private(dirfd: int, name: str, path: str, backlog: int, mode: int | None,
                  owner: tuple[int, int] | None) -> tuple[socket.socket, tuple[int, int]]:
    """Bind, chmod, chown and listen in a private directory, then link the socket into place."""
    try:
        private, privfd = _private_dir(dirfd, name)
    except OSError as exc:
        raise ConnSpecError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The directory by its descriptor: a short path whatever the socket's, and no name to swap.
        sock.bind(f"/proc/self/fd/{privfd}/{_INNER}")
        if mode is not None:
            os.chmod(_INNER, mode, dir_fd=privfd)
        if owner is not None:
            os.chown(_INNER, *owner, dir_fd=privfd, follow_symlinks=False)
        sock.listen(backlog)
        made = ident(os.stat(_INNER, dir_fd=privfd, follow_symlinks=False))
        os.link(_INNER, name, src_dir_fd=privfd, dst_dir_fd=dirfd, follow_symlinks=False)
    except FileExistsError:
        sock.close()
        raise ConnSpecError(f"{path} appeared while starting; refusing to replace it") from None
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if not os.path.isdir("/proc/self/fd"):
            why = "/proc is not mounted (the socket is bound through /proc/self/fd)"
        raise ConnSpecError(f"cannot listen on unix:{path}: {why}") from None
    finally:
        _remove_private(dirfd, private, privfd)
    return sock, made


def _private_dir(dirfd: int, name: str) -> tuple[str, int]:
    """A new directory beside the socket that only we may change, and its descriptor."""
    for _ in range(10):
        private = f".{name}.{secrets.token_hex(4)}"
        try:
            os.mkdir(private, 0o700, dir_fd=dirfd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free name for a private directory")
    privfd = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    st = os.fstat(privfd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:  # renamed and replaced in between
        os.close(privfd)
        raise PermissionError(errno.EPERM, f"private directory {private} was replaced while starting")
    return private, privfd


def _remove_private(dirfd: int, private: str, privfd: int) -> None:
    """Our name inside it (the socket stays under its public name), then the empty directory."""
    with contextlib.suppress(OSError):
        os.unlink(_INNER, dir_fd=privfd)
    os.close(privfd)
    with contextlib.suppress(OSError):
        os.rmdir(private, dir_fd=dirfd)  # removes an empty directory only, never follows a link
