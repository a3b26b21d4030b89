"""Acting, as root, on one name in a directory that others may write, without following links.

The directory is opened once (``O_PATH``) and every later step names the
entry relative to that descriptor (the ``*at`` system calls) and never
follows a symbolic link at the name: whatever someone puts there, a link is
examined or removed as a link, never its target. The path *to* the directory
is the admin's choice and trusted: a link on the way (``/var/run -> /run``)
is followed once, when the directory is opened.
"""

from __future__ import annotations

import os
from typing import Callable


def open_dir(path: str) -> tuple[int, str]:
    """A descriptor of the directory ``path`` is in (close it) and the name in it; OSError."""
    head, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise IsADirectoryError(21, "Is a directory")
    return os.open(head or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), name


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    """The entry itself (a link as a link); None when there is none."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


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
