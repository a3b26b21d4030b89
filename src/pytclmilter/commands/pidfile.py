"""``--pidfile``: claimed and released as root without following a link or taking another's file.

The file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to its
directory's descriptor (safepath.py): the creation fails rather than open
anything already at the name, so a symbolic link there (even one to nowhere)
is never followed and no existing file is ever truncated or written. What is
already there is examined as it is:

* a regular file of ours (our effective uid) that is empty (a crash while
  writing) or holds our own pid or the pid of a process that is gone or is not
  a pytclmilter (the pid was reused; a pytclmilter is a Python whose command
  line names it): stale, removed and created anew;
* the same with the pid of a running pytclmilter: refused, "already running as
  pid N";
* a symbolic link, anything but a regular file, a file of another user, a file
  that holds something else than a pid: refused and left as it is.

At exit the file is removed only if the name still holds the very file we
created; safepath.remove_if says what window remains. After ``--user`` the
process is that user by then.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from ..safepath import ident, lstat_at, open_dir, remove_if

log = logging.getLogger("pytclmilter")

_PID_MAX = 4194304  # the kernel's upper limit for pid_max


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.claimed = False
        self._where: tuple[int, str] | None = None  # directory descriptor and name while ours
        self._ident: tuple[int, int] | None = None
        self._pid = 0  # the process that wrote it: a --workers worker's exit leaves it to that one

    def claim(self) -> None:
        """Write our pid; OSError whose text says why not."""
        try:
            dirfd, name = open_dir(self.path)
        except OSError as exc:
            raise self._cannot(exc) from None
        try:
            fd = self._create(dirfd, name)
            if fd is None:
                self._remove_stale(dirfd, name)
                fd = self._create(dirfd, name)
            if fd is None:
                raise self._refused("appeared while starting; refusing to replace it")
            try:
                self._ident, self._pid = ident(os.fstat(fd)), os.getpid()
                os.write(fd, f"{self._pid}\n".encode())
            except OSError as exc:
                raise self._cannot(exc) from None  # an empty file stays: stale at the next start
            finally:
                os.close(fd)
        except BaseException:
            os.close(dirfd)
            raise
        self._where, self.claimed = (dirfd, name), True

    def release(self) -> None:
        """Remove the file if the name still holds ours (a warning in the log otherwise)."""
        if self._where is None or os.getpid() != self._pid:
            return
        (dirfd, name), self._where = self._where, None
        try:
            if not remove_if(dirfd, name, stat.S_ISREG, self._ident):
                log.warning("pid file %s is not the one we wrote any more; leaving it", self.path)
        except OSError as exc:  # (after --user, in root's directory: the file of a stopped process)
            why = (f"uid {os.geteuid()} may not write its directory: " if exc.errno in (errno.EACCES, errno.EPERM)
                   else "")
            log.warning("cannot remove pid file %s: %s (%sleft behind, as a stale pid file the next start "
                        "replaces)", self.path, exc.strerror, why)
        finally:
            os.close(dirfd)

    def _create(self, dirfd: int, name: str) -> int | None:
        """A new file at the name, or None when something is there already."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, 0o644, dir_fd=dirfd)
        except FileExistsError:
            return None
        except OSError as exc:
            raise self._cannot(exc) from None

    def _remove_stale(self, dirfd: int, name: str) -> None:
        """Remove what is at the name if it is a stale pid file of ours; refuse anything else."""
        try:
            st = lstat_at(dirfd, name)
        except OSError as exc:
            raise self._cannot(exc) from None
        if st is None:
            return  # gone meanwhile
        if stat.S_ISLNK(st.st_mode):
            raise self._refused("is a symbolic link; refusing to follow it")
        if not stat.S_ISREG(st.st_mode):
            raise self._refused("exists and is not a regular file; refusing to replace it")
        if st.st_uid != os.geteuid():
            raise self._refused(f"is owned by uid {st.st_uid}, not by uid {os.geteuid()}; refusing to replace it")
        pid = self._read_pid(dirfd, name, st)
        if pid is None:
            why = "empty"
        elif pid == os.getpid():
            why = f"pid {pid} is this process"  # a container's pid 1 after a restart
        else:
            why = _whose(pid)
        if not why:
            raise OSError(errno.EEXIST, f"pid file {self.path}: pytclmilter is already running as pid {pid}")
        try:
            if remove_if(dirfd, name, stat.S_ISREG, ident(st)):
                log.info("removed stale pid file %s (%s)", self.path, why)
        except OSError as exc:
            raise self._cannot(exc) from None

    def _read_pid(self, dirfd: int, name: str, st: os.stat_result) -> int | None:
        """The pid in the file (None: empty); refused when it holds anything else."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dirfd)
        except OSError as exc:
            raise self._cannot(exc) from None
        try:
            if ident(os.fstat(fd)) != ident(st):
                raise self._refused("changed while starting; refusing to replace it")
            text = os.read(fd, 32).strip()
        finally:
            os.close(fd)
        if not text:
            return None
        if not text.isdigit() or not 0 < int(text) <= _PID_MAX:
            raise self._refused("does not hold a pid; refusing to replace it")
        return int(text)

    def _refused(self, why: str) -> OSError:
        return OSError(errno.EEXIST, f"pid file {self.path} {why}")

    def _cannot(self, exc: OSError) -> OSError:
        return OSError(exc.errno, f"cannot write pid file {self.path}: {exc.strerror}")


def _whose(pid: int) -> str:
    """Why the pid makes a pid file stale; "" when it is a running pytclmilter: a Python whose
    command line names pytclmilter (not `journalctl -u pytclmilter` or `vi pytclmilter.tcl`,
    which may well have the pid of one that crashed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} no longer runs"
    except PermissionError:
        pass  # it runs, as another user
    try:  # the kernel's files: no one else's names to swap
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"pytclmilter" not in f.read():
                return f"pid {pid} is not a pytclmilter"
        program = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except FileNotFoundError:
        return f"pid {pid} no longer runs"  # ended meanwhile
    except OSError:
        return ""  # cannot tell: take it as running
    return "" if program.startswith(("python", "pytclmilter")) else f"pid {pid} is not a pytclmilter"
