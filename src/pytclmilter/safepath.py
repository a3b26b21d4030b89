"""Acting, as root, on one name in a directory that others may write, without following links.

The directory is opened once (``O_PATH``) and every later step names the
entry relative to that descriptor (the ``*at`` system calls) and never
follows a symbolic link at the name: whatever someone puts there, a link is
examined or removed as a link, never its target. The path *to* the directory
is the admin's choice: a link on the way (``/var/run -> /run``) is followed
when the directory is opened, but only where no one else could have put it
(:func:`open_dir`): the kernel's own guard (``fs.protected_symlinks``) is off
in many containers, and a link another user made in ``/tmp`` sent root's
socket and pid file into any directory.

A file root runs (the script, a ``--python`` file) is opened by the same walk, every directory
on the way and the file itself checked as it is opened (:func:`open_trusted`), as OpenSSH's
StrictModes and Sendmail's safe-file checks do.

A path root gives to a library that opens it by name (SQLite's file, redis-py's unix socket) is
checked first by the same walk (:func:`refuse_unsafe_path_as_root`,
:func:`refuse_unsafe_socket_as_root`): the library follows what the name holds by then.
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
import stat
from typing import Callable, Iterable


_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # (O_NONBLOCK: a FIFO at the name does not block)
_MAX_LINKS = 40  # as the kernel's path walk
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH

#: What a walk checks of each directory it opens and of the file at its end: the name walked
#: (links resolved) and what was opened there (fstat).
Check = Callable[[str, os.stat_result], None]


class Untrusted(PermissionError):
    """A name on the way that another user could have changed (its strerror says which, and how)."""


def open_dir(path: str) -> tuple[int, str]:
    """A descriptor of the directory ``path`` is in (close it) and the name in it; OSError."""
    head, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise IsADirectoryError(21, "Is a directory")
    return _walk(head or "."), name


def open_entry(path: str) -> tuple[int, str, str]:
    """:func:`open_dir` for a name to use, not replace (a socket to connect to): a link at the
    name is followed where one on the way would be (:func:`_trusted_link`), as the kernel's walk
    follows it. The directory's descriptor (close it), the name in it and the path reached."""
    for _ in range(_MAX_LINKS + 1):
        dirfd, name = open_dir(path)
        try:
            st = lstat_at(dirfd, name)
            if st is None or not stat.S_ISLNK(st.st_mode) or not _trusted_link(os.fstat(dirfd), st):
                return dirfd, name, path
            path = os.path.join(os.path.dirname(path), os.readlink(name, dir_fd=dirfd))
        except BaseException:
            os.close(dirfd)
            raise
        os.close(dirfd)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))


def open_trusted(path: str) -> int:
    """A descriptor to read the file ``path`` from (close it), opened by the walk of
    :func:`open_dir` (a link followed only where no one else could have made it) with each
    directory on the way and the file checked as it is opened (:func:`_owned_by_us`): Untrusted
    when another user could have changed any of them, and so what root runs; OSError otherwise."""
    # From the root, as a reload names it: the walk from the current directory alone let a
    # start accept what each reload then refused (a directory above it another user's).
    fd = _walk(_from_root(path), _owned_and_linked_once(), _FILE)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _owned_by_us(name: str, st: os.stat_result) -> None:
    """Untrusted unless only root (we) could change ``name``: ours, and writable by no group or
    others, except a sticky directory (``/tmp``): there no one else may remove or rename what
    root owns, and every entry walked below it must be root's too (this same check)."""
    if st.st_uid not in (0, os.geteuid()):
        raise Untrusted(errno.EPERM, f"{name} is owned by uid {st.st_uid}, not root: that user could "
                                     f"change what runs as root (chown root {shlex.quote(name)})")
    writable = st.st_mode & _OTHERS_WRITE
    if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        who, letters = {stat.S_IWGRP: ("its group", "g"), stat.S_IWOTH: ("others", "o")}.get(
            writable, ("its group and others", "go"))
        raise Untrusted(errno.EPERM, f"{name} is writable by {who}, who could change what runs as "
                                     f"root (chmod {letters}-w {shlex.quote(name)})")


def _owned_and_linked_once() -> Check:
    """:func:`_owned_by_us`, and a file in a directory others may write (a sticky one, as others
    are refused) must have no other link: where the kernel does not stop it (``fs.protected_hardlinks``
    0), another user may link there any file of root's (a log holding their text) under the
    name a script runs."""
    parent: list[os.stat_result] = []

    def check(name: str, st: os.stat_result) -> None:
        _owned_by_us(name, st)
        if stat.S_ISDIR(st.st_mode):
            parent[:] = [st]
        elif st.st_nlink > 1 and parent and parent[0].st_mode & _OTHERS_WRITE:
            raise Untrusted(errno.EPERM, f"{name} has {st.st_nlink} links and is in a directory others may write, "
                                         "where another user may have linked any file of root's; refusing it (use "
                                         "the file from a directory only root may write)")

    return check


def _walk(path: str, check: Check | None = None, last: int = _DIR) -> int:
    """Open the directory ``path`` a name at a time, as the kernel would, but follow a symbolic
    link only where its owner is to be trusted (:func:`_trusted_link`); OSError otherwise. A
    name that becomes a link meanwhile fails the open (O_NOFOLLOW), never leads elsewhere.
    ``check`` sees every directory opened, the first one too, and the last name, opened with
    ``last``'s flags (a file's, not a directory's)."""
    fd = os.open("/" if path.startswith("/") else ".", _DIR)
    todo, walked, links = path.split("/")[::-1], "/" if path.startswith("/") else "", 0
    try:
        if check is not None:
            check(walked or ".", os.fstat(fd))
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            st = lstat_at(fd, part)
            if st is None or not stat.S_ISLNK(st.st_mode):
                flags = last if all(rest in ("", ".") for rest in todo) else _DIR
                fd = _replace(fd, os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd))
                walked = os.path.join(walked, part)
                if check is not None:
                    check(walked, os.fstat(fd))
                continue
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            if not _trusted_link(os.fstat(fd), st):
                raise Untrusted(errno.EPERM, f"the symbolic link {os.path.join(walked, part)} is in a "
                                "directory others may write; refusing to follow it")
            target = os.readlink(part, dir_fd=fd)
            todo.extend(target.split("/")[::-1])
            if target.startswith("/"):
                fd, walked = _replace(fd, os.open("/", _DIR)), "/"
                if check is not None:
                    check(walked, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new


def _trusted_link(directory: os.stat_result, link: os.stat_result) -> bool:
    """A link in a directory only root and we may write, or in a sticky one (``/tmp``) a link of
    ours or of the directory's owner (the kernel's ``protected_symlinks`` rule): any other one
    may have been made by another user, to send root's files where that user chose."""
    ours = (0, os.geteuid())
    if directory.st_uid in ours and not directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return True
    return bool(directory.st_mode & stat.S_ISVTX) and link.st_uid in (*ours, directory.st_uid)


def only_root_adds_to(path: str) -> bool:
    """Only root could add a name to the directory ``path`` (a module on ``sys.path``): it and
    every directory on the way pass :func:`_owned_by_us`, and it is writable by no group or
    others, sticky or not (anyone may add a name to a sticky directory)."""
    try:
        fd = open_roots_dir(path)
    except OSError:
        return False
    try:
        return not os.fstat(fd).st_mode & _OTHERS_WRITE
    finally:
        os.close(fd)


def open_roots_dir(path: str) -> int:
    """A descriptor of the directory ``path`` (close it), which no one but root could change, nor
    any directory on the way (:func:`_owned_by_us`; the last may be sticky): a name in it that a
    library opens again by path (SQLite, its -wal) reaches this very directory. Untrusted naming
    the first that another user could change (rename, or replace by a link)."""
    return _walk(path, _owned_by_us)


def _from_root(path: str) -> str:
    """``path`` from the root, its ``..`` left in, for :func:`_walk` to take as the kernel does:
    after a link, from where the link points (os.path.abspath drops ``link/..`` as text, and a
    check walked another way than the open: past another user's link in /tmp into their directory)."""
    return path if path.startswith("/") else os.path.join(os.getcwd(), path)


def _dir_and_name(path: str) -> tuple[str, str]:
    """The directory ``path`` is in, from the root, and its name. The directory without its ``.``
    and empty names, which name the same directory: a socket at ``/run/redis/./redis.sock`` is in
    ``/run/redis``, not in a ``.`` whose directory above (``/run/redis``) must be root's. Its
    ``..`` stay: the kernel walks ``link/..`` from where the link points (:func:`_from_root`)."""
    where, name = os.path.split(_from_root(path))
    return "/" + "/".join(part for part in where.split("/") if part not in ("", ".")), name


def refuse_unsafe_path_as_root(path: str, suffixes: Iterable[str] = ()) -> None:
    """Untrusted unless root may open ``path`` by its name: for code that gives the path to a
    library which opens it as written (SQLite; and the names it makes beside it, ``suffixes``:
    "-wal"). Links are followed there, and the file opened again by its path later, so the
    directory it is in and every one on the way must be root's (:func:`open_roots_dir`: a sticky
    one, as /tmp, allowed on the way; a link followed only where no one else could have made it),
    that directory writable by no group or others, and no name (with each suffix) a symbolic
    link: a directory another user may rename could be a link to any directory by the open, and
    a link at a name in one others may write could point at any file root may write. Not root
    (``run --user`` dropped privileges): nothing to refuse, a link reaches only what that user
    may write anyway. Any other OSError (no such directory) as the walk raised it."""
    if os.geteuid() != 0:
        return
    where, name = _dir_and_name(path)
    dirfd = _roots_dir(where, where, _OPEN)
    try:
        if os.fstat(dirfd).st_mode & _OTHERS_WRITE:
            raise _refused(_OPEN, f"in {where}, which others may write (run with --user, or give root the directory)")
        for entry in (name, *(name + suffix for suffix in suffixes)):
            _refuse_link(lstat_at(dirfd, entry), os.path.join(os.path.dirname(path), entry), _OPEN)
    finally:
        os.close(dirfd)


def refuse_unsafe_socket_as_root(path: str) -> None:
    """Untrusted unless root may connect to the unix socket ``path`` by its name (a client library
    connects by the path: redis-py): a name another user could change (a directory of theirs on
    the way, or one others may write) could be their own socket by then, a fake server. So every
    directory above the socket's must be root's, as for :func:`refuse_unsafe_path_as_root`; the
    socket's own directory may be its owner's too (/run/redis is redis's, who runs the server
    anyway), but writable by no group or others; and neither its name nor the socket's may be a
    symbolic link (the library would follow it, into a directory not checked). OSError
    "cannot reach its directory ..." when the walk to it fails; nothing to refuse when not root."""
    if os.geteuid() != 0:
        return
    where, name = _dir_and_name(path)
    dirfd = _sockets_dir(where)
    try:
        directory, sock = os.fstat(dirfd), lstat_at(dirfd, name)
    finally:
        os.close(dirfd)
    _refuse_socket_link(sock, os.path.join(where, name))
    if directory.st_mode & _OTHERS_WRITE:
        raise _refused(_CONNECT, f"in {where}, which others may write (chmod go-w {where}, or run with --user)")
    if directory.st_uid not in (0, None if sock is None else sock.st_uid):  # (none there: anyone's to make)
        owner = "no socket there yet" if sock is None else f"the socket's owner is uid {sock.st_uid}"
        raise _refused(_CONNECT, f"in {where}, owned by uid {directory.st_uid}, not root ({owner})")


_OPEN, _CONNECT = "open it", "connect to it"


def _refused(doing: str, why: str) -> Untrusted:
    return Untrusted(errno.EPERM, f"refusing to {doing} as root {why}")


def _roots_dir(path: str, where: str, doing: str) -> int:
    """:func:`open_roots_dir`, its refusal said as one to do ``doing`` in ``where``."""
    try:
        return open_roots_dir(path)
    except Untrusted as exc:
        raise _refused(doing, f"in {where}: {exc.strerror}") from None


def _sockets_dir(where: str) -> int:
    """A descriptor of the socket's directory ``where`` (close it): root's directories up to it, and
    no link at its name (O_NOFOLLOW alone said "Not a directory" there)."""
    above, last = os.path.split(where)
    try:
        fd = _roots_dir(above, where, _CONNECT)
        try:
            if not last:
                return os.dup(fd)
            _refuse_socket_link(lstat_at(fd, last), where)
            return os.open(last, _DIR | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
    except Untrusted:
        raise
    except OSError as exc:
        raise OSError(exc.errno, f"cannot reach its directory {where}: {exc.strerror}") from None


def _refuse_socket_link(found: os.stat_result | None, link: str) -> None:
    """:func:`_refuse_link` for a socket, with what to do instead."""
    _refuse_link(found, link, _CONNECT, " (name the socket itself, or run with --user)")


def _refuse_link(found: os.stat_result | None, link: str, doing: str, advice: str = "") -> None:
    """Untrusted if ``found`` (an lstat of ``link``) is a symbolic link."""
    if found is not None and stat.S_ISLNK(found.st_mode):
        raise _refused(doing, f"through the symbolic link {link}{advice}")


def read_trusted(path: str) -> bytes:
    """The content of the file ``path``, read from the descriptor :func:`open_trusted` checked."""
    with open(open_trusted(path), "rb") as f:
        return f.read()


def os_reason(exc: OSError) -> str:
    """An OSError as tclsh words it ("no such file or directory"), its file name left out."""
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    """The entry itself (a link as a link); None when there is none."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Changed(OSError):
    """The name holds another file than the one examined."""


def connect_at(sock: socket.socket, dirfd: int, name: str, st: os.stat_result) -> None:
    """Connect to the very socket ``st`` describes, through a descriptor of it: by its path,
    a symlink swapped in after the lstat would be followed, and root would connect to whatever
    socket it names. Changed when the name holds something else by now (OSError ENOENT when it
    holds nothing: gone meanwhile)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        if ident(os.fstat(fd)) != ident(st):
            raise Changed(errno.ESTALE, "changed meanwhile")
        sock.connect(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def remove_if(dirfd: int, name: str, kind: Callable[[int], bool], expected: tuple[int, int] | None) -> bool:
    """Remove the name if it holds a file of this kind (``stat.S_ISSOCK``...) and, when given, this
    very (st_dev, st_ino); True if removed. OSError when the unlink is not allowed.

    No system call removes a name only if it still holds a given inode, so a window remains
    between the check and ``unlinkat``: whoever may remove that name from the directory (anyone
    with write permission; in a sticky directory only the entry's owner, the directory's owner
    and root) could put another entry there in it, and that entry is then removed instead. That
    removes one directory entry -- never what a link points to, never a change to any file's
    content, mode or owner: nothing its swapper could not do to that name itself.
    """
    st = lstat_at(dirfd, name)
    if st is None or not kind(st.st_mode) or (expected is not None and ident(st) != expected):
        return False
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    return True
