"""``--pidfile`` as root in a directory others may write: a symlink or another user's file at the
path is refused and left as it is, a stale pid file of ours is replaced, a running pytclmilter's
is refused, and at stop only the file written at start is removed. All through
``pytclmilter run`` as an admin starts it."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.tclrun import tclrun_factory

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="files of another user need root")

STAMP = r"""
package require TclMilter
proc eom {ctx} { $ctx addheader X-Stamp yes; return SMFIS_CONTINUE }
milter register eom eom
milter main
"""

TCP = "inet:0@127.0.0.1"


@pytest.fixture
def piddir():
    """A world-writable sticky directory, like /tmp, for the pid file."""
    path = Path(tempfile.mkdtemp(prefix="ptmp", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def state(path: Path) -> tuple:
    """What could change about a file: its type, owner, mode and content (a link's text)."""
    st = os.lstat(path)
    content = os.readlink(path) if stat.S_ISLNK(st.st_mode) else path.read_bytes() if stat.S_ISREG(st.st_mode) else None
    return st.st_ino, st.st_mode, st.st_uid, st.st_gid, content


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def refused(m, text: str) -> None:
    """The start ends with status 1 and the reason, before the milter says it listens."""
    assert m.wait_exit(15) == 1, m.text
    assert f"milter main: {text}\n" in m.text, m.text
    assert "listening on" not in m.text


@pytest.mark.parametrize("kind", ["to-a-root-file", "dangling"])
def test_a_symlink_at_the_pid_path_is_refused_and_never_followed(tclrun, tmp_path, piddir, kind):
    target = tmp_path / "secret"
    if kind == "to-a-root-file":
        target.write_bytes(b"root's data\n")
        target.chmod(0o600)
        before = state(target)
    pidfile = piddir / "milter.pid"
    pidfile.symlink_to(target)
    link = state(pidfile)
    m = tclrun(STAMP, "--pidfile", str(pidfile), connection=TCP, wait=False)
    refused(m, f"pid file {pidfile} is a symbolic link; refusing to follow it")
    assert state(pidfile) == link
    if kind == "dangling":
        assert not os.path.lexists(target), "the link's target was created"
    else:
        assert state(target) == before


@ROOT_ONLY
def test_a_pid_file_of_another_user_is_refused_and_left_alone(tclrun, piddir):
    nobody = pwd.getpwnam("nobody")
    pidfile = piddir / "milter.pid"
    pidfile.write_text(f"{dead_pid()}\n")
    os.chown(pidfile, nobody.pw_uid, nobody.pw_gid)
    before = state(pidfile)
    m = tclrun(STAMP, "--pidfile", str(pidfile), connection=TCP, wait=False)
    refused(m, f"pid file {pidfile} is owned by uid {nobody.pw_uid}, not by uid 0; refusing to replace it")
    assert state(pidfile) == before


@pytest.mark.parametrize("kind", ["not-a-pid", "not-a-pid-number", "directory", "fifo"])
def test_what_is_not_a_pid_file_is_refused_and_left_alone(tclrun, piddir, kind):
    """An admin's typo (--pidfile naming a config file) must not cost that file, nor one holding
    a number no pid can be (a serial, a date, above the kernel's limit for pid_max)."""
    pidfile = piddir / "milter.pid"
    if kind.startswith("not-a-pid"):
        pidfile.write_text("smtpd_milters = unix:/x.sock\n" if kind == "not-a-pid" else "20261205\n")
        expected = "does not hold a pid; refusing to replace it"
    elif kind == "directory":
        pidfile.mkdir()
        expected = "exists and is not a regular file; refusing to replace it"
    else:
        os.mkfifo(pidfile)
        expected = "exists and is not a regular file; refusing to replace it"
    before = state(pidfile)
    m = tclrun(STAMP, "--pidfile", str(pidfile), connection=TCP, wait=False)
    refused(m, f"pid file {pidfile} {expected}")
    assert state(pidfile) == before


@pytest.mark.parametrize("kind", ["dead", "reused", "reused-by-a-tool-naming-it", "empty"])
def test_a_stale_pid_file_is_replaced_and_removed_at_stop(tclrun, piddir, kind):
    """Ours, a regular file, and its pid runs no pytclmilter: gone, taken by another program
    since (also one whose command line names pytclmilter, as `journalctl -u pytclmilter -f`
    does: before, "already running as pid N" and no start), or nothing written at all (a crash)."""
    pidfile = piddir / "milter.pid"
    other = None
    if kind == "dead":
        pid = dead_pid()
        why = f"pid {pid} no longer runs"
    elif kind == "reused":
        other = subprocess.Popen(["sleep", "60"])
        pid = other.pid
        why = f"pid {pid} is not a pytclmilter"
    elif kind == "reused-by-a-tool-naming-it":  # a shell waiting on its stdin, pytclmilter in its argv
        other = subprocess.Popen(["sh", "-c", "read line  # journalctl -u pytclmilter -f"], stdin=subprocess.PIPE)
        pid = other.pid
        why = f"pid {pid} is not a pytclmilter"
    else:
        pid = None
        why = "empty"
    pidfile.write_text(f"{pid}\n" if pid else "")
    try:
        m = tclrun(STAMP, "--pidfile", str(pidfile), connection=TCP)
        m.wait_for(re.escape(f"removed stale pid file {pidfile} ({why})"), since=0)  # (logged in a batch)
        assert pidfile.read_text() == f"{m.child.pid}\n"
        st = os.lstat(pidfile)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        assert m.stop() == 0
        assert not os.path.lexists(pidfile)
    finally:
        if other is not None:
            other.kill()
            other.wait()


def test_the_pid_file_of_a_running_pytclmilter_is_refused(tclrun, piddir):
    pidfile = piddir / "milter.pid"
    first = tclrun(STAMP, "--pidfile", str(pidfile), connection=TCP)
    second = tclrun(STAMP, "--pidfile", str(pidfile), connection=TCP, wait=False)
    refused(second, f"pid file {pidfile}: pytclmilter is already running as pid {first.child.pid}")
    assert pidfile.read_text() == f"{first.child.pid}\n"
    with first.mta() as mta:  # the first one still serves
        assert mta.negotiate()
    assert first.stop() == 0
    assert not os.path.lexists(pidfile)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_pid_file_replaced_while_serving_is_left_at_stop(tclrun, tmp_path, piddir, kind):
    pidfile = piddir / "milter.pid"
    m = tclrun(STAMP, "--pidfile", str(pidfile), connection=TCP)
    target = tmp_path / "secret"
    target.write_bytes(b"root's data\n")
    swap = piddir / "swap"
    if kind == "file":
        swap.write_text("someone else's pid file\n")
    else:
        swap.symlink_to(target)
    os.rename(swap, pidfile)
    before, target_before = state(pidfile), state(target)
    assert m.stop() == 0
    m.wait_for(re.escape(f"pid file {pidfile} is not the one we wrote any more; leaving it"), since=0)
    assert state(pidfile) == before
    assert state(target) == target_before


EXITS_WHILE_SERVING = r"""
package require TclMilter
set marker [lindex $argv 0]
proc leave {} {  ;# the first process to get here exits 3: with --workers, one worker once
    if {![file exists $::marker]} { close [open $::marker w]; exit 3 }
}
after 200 leave
milter main
"""


def test_tcl_exit_while_serving_removes_the_pid_file(tclrun, piddir):
    """Tcl's exit ends the process at once (os._exit): it removed the socket but left the pid
    file, which docs/cli.md says is removed at exit."""
    pidfile = piddir / "milter.pid"
    sock = piddir / "milter.sock"
    m = tclrun(EXITS_WHILE_SERVING, "--pidfile", str(pidfile), connection=f"unix:{sock}",
               args=[str(piddir / "marker")])
    assert m.wait_exit(15) == 3, m.text
    assert not os.path.lexists(sock)
    assert not os.path.lexists(pidfile), "the pid file of a process that exited was left behind"


def test_a_worker_that_calls_exit_leaves_the_supervisors_pid_file(tclrun, piddir):
    pidfile = piddir / "milter.pid"
    m = tclrun(EXITS_WHILE_SERVING, "--pidfile", str(pidfile), "--workers", "2", connection=TCP,
               args=[str(piddir / "marker")])
    m.wait_for(r"worker \d \(pid \d+\) died \(exit status 3\); starting a new one", since=0)
    assert pidfile.read_text() == f"{m.child.pid}\n"
    assert m.stop() == 0
    assert not os.path.lexists(pidfile)


def _links_home(piddir: Path, tmp_path: Path, owner: str) -> tuple[Path, Path]:
    """A link ``piddir/d`` made by ``owner`` that sends a path through it to a directory of root's."""
    home = tmp_path / "roots"
    home.mkdir(mode=0o755)
    link = piddir / "d"
    link.symlink_to(home)
    pw = pwd.getpwnam(owner)
    os.lchown(link, pw.pw_uid, pw.pw_gid)
    return link, home


@ROOT_ONLY
@pytest.mark.parametrize("what", ["pidfile", "socket"])
def test_a_directory_link_another_user_made_in_tmp_is_not_followed(tclrun, tmp_path, piddir, what):
    """Another user's link in a sticky /tmp on the way to the pid file or the socket: the
    kernel's protected_symlinks guard is off in many containers, and root made its files in the
    directory the link named."""
    link, home = _links_home(piddir, tmp_path, "nobody")
    options = ("--pidfile", str(link / "m.pid")) if what == "pidfile" else ()
    m = tclrun(STAMP, *options, "--user", "nobody",
               connection=TCP if what == "pidfile" else f"unix:{link}/m.sock", wait=False)
    assert m.wait_exit(15) == 1, m.text
    assert f"the symbolic link {link} is in a directory others may write; refusing to follow it" in m.text
    assert "listening on" not in m.text
    assert list(home.iterdir()) == []


@ROOT_ONLY
def test_a_directory_link_of_roots_in_tmp_is_followed(tclrun, tmp_path, piddir):
    link, home = _links_home(piddir, tmp_path, "root")
    (home / "sub").mkdir()
    m = tclrun(STAMP, "--pidfile", str(link / "sub" / ".." / "m.pid"), connection=f"unix:{link}/m.sock")
    assert (home / "m.pid").read_text() == f"{m.child.pid}\n"
    assert stat.S_ISSOCK(os.lstat(home / "m.sock").st_mode)
    assert m.stop() == 0


@ROOT_ONLY
def test_a_pid_file_the_user_cannot_remove_is_left_with_why_and_replaced_at_the_next_start(tclrun, tmp_path):
    """In root's own directory (the safe place: the --user user cannot swap the file there) the
    stop, by then as that user, cannot remove it: the warning said only "Permission denied",
    not why nor whether the next start would cope."""
    pidfile = tmp_path / "m.pid"
    nobody = pwd.getpwnam("nobody").pw_uid
    m = tclrun(STAMP, "--pidfile", str(pidfile), "--user", "nobody", connection=TCP)
    assert m.stop() == 0
    assert (f"WARNING: cannot remove pid file {pidfile}: Permission denied (uid {nobody} may not write its "
            "directory: left behind, as a stale pid file the next start replaces)") in m.text, m.text
    assert pidfile.read_text() == f"{m.child.pid}\n"
    again = tclrun(STAMP, "--pidfile", str(pidfile), "--user", "nobody", connection=TCP)
    assert f"removed stale pid file {pidfile} (" in again.text, again.text
    assert pidfile.read_text() == f"{again.child.pid}\n"
    assert again.stop() == 0
