"""Socket safety: the milter never removes a file that is not its socket, never takes over a live
socket, honours --socket-mode, and after --user writes nothing as root.

tests/test_engine_server.py covers a regular file and a live socket at the path with the Python
API; here: directories, FIFOs, symlinks (also to sockets), a socket replaced by a file while
serving, two ``pytclmilter run`` on one path, modes with and without --user, the ownership of
files a script writes from callbacks and timers after the privilege drop, and a process racing
to swap the socket for a symlink to a root-owned file while the milter starts as root; and
safepath's checks of a path or socket that root opens by name (for ``--python`` files).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pytclmilter.connspec import ConnSpecError, parse
from support.engine import MilterThread, make_milter, serving
from support.tclrun import tclrun_factory

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

STAMP = r"""
package require TclMilter
proc eom {ctx} { $ctx addheader X-Stamp yes; return SMFIS_CONTINUE }
milter register eom eom
milter main
"""


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="ptms", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def world_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="ptmw", dir="/tmp"))
    path.chmod(0o1777)
    return path


def send_one(path: Path) -> bytes:
    """A minimal milter conversation over the unix socket: negotiate and connect; the connect reply."""
    import struct

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    try:
        s.sendall(struct.pack("!I", 13) + b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
            chunk = s.recv(4096)
            assert chunk, "closed"
            data += chunk
        return data[4:5]
    finally:
        s.close()


def snapshot(path: Path) -> tuple:
    st = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
    return st.st_ino, st.st_mode, content, os.readlink(path) if stat.S_ISLNK(st.st_mode) else None


def make_thing(kind: str, path: Path, sockdir: Path) -> None:
    if kind == "regular-file":
        path.write_text("precious data\n")
    elif kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-file":
        (sockdir / "target").write_text("target data")
        path.symlink_to(sockdir / "target")
    elif kind == "dangling-symlink":
        path.symlink_to(sockdir / "nowhere")
    elif kind == "symlink-to-stale-socket":
        stale = sockdir / "stale.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(stale))
        s.close()  # a socket file nobody listens on
        path.symlink_to(stale)
    else:
        raise AssertionError(kind)


KINDS = ["regular-file", "empty-file", "directory", "fifo", "symlink-to-file", "dangling-symlink",
         "symlink-to-stale-socket"]


@pytest.mark.parametrize("kind", KINDS)
def test_never_removes_what_is_not_a_socket(sockdir, kind):
    path = sockdir / "milter.sock"
    make_thing(kind, path, sockdir)
    before = snapshot(path)
    m = make_milter(connection=f"unix:{path}")
    t = MilterThread(m)
    with pytest.raises(AssertionError, match="stopped before it listened"):
        t.start()
    assert isinstance(t.error, ConnSpecError), t.error
    assert "refusing" in str(t.error) or "not a socket" in str(t.error), t.error
    assert snapshot(path) == before
    if kind == "symlink-to-stale-socket":
        assert stat.S_ISSOCK(os.lstat(sockdir / "stale.sock").st_mode), "the link's target is left too"


def test_a_live_socket_of_another_milter_is_refused_and_keeps_working(tclrun, sockdir):
    path = sockdir / "milter.sock"
    first = tclrun(STAMP, connection=f"unix:{path}")
    ino = os.lstat(path).st_ino
    second = tclrun(STAMP, connection=f"unix:{path}", wait=False)
    assert second.wait_exit(15) == 1
    assert re.search(rf"{re.escape(str(path))} is in use by another process; refusing to replace it", second.text)
    assert os.lstat(path).st_ino == ino
    assert send_one(path) == b"O"  # the first one still serves on it
    assert first.stop() == 0
    assert not path.exists()


def test_a_socket_replaced_by_a_file_while_serving_is_not_removed_at_exit(sockdir):
    path = sockdir / "milter.sock"
    m = make_milter(connection=f"unix:{path}")
    with serving(m):
        os.unlink(path)
        path.write_text("someone else's file\n")
    assert path.read_text() == "someone else's file\n"


@pytest.mark.parametrize("kind", ["a symbolic link", "a regular file"])
def test_a_socket_name_swapped_while_serving_is_left_alone_and_said_at_stop(tclrun, sockdir, tmp_path, kind):
    """Someone who may write the socket's directory renames a symlink (or a file) over the socket
    while the milter serves: the MTA cannot reach it by that name from then on, and the stop left
    the name alone without a word. Now the stop says what it found there; it still leaves it."""
    path = sockdir / "milter.sock"
    m = tclrun(STAMP, connection=f"unix:{path}")
    swap = sockdir / "swap"
    if kind == "a symbolic link":
        os.symlink(tmp_path / "elsewhere", swap)
    else:
        swap.write_text("someone else's\n")
    os.rename(swap, path)
    before = snapshot(path)
    assert m.stop() == 0
    assert snapshot(path) == before
    assert (f"WARNING: socket file {path} was replaced while serving (now {kind}): left alone; the MTA could "
            "not reach this milter by that name since") in m.text, m.text


def test_a_stale_socket_is_replaced_and_ours_removed_at_exit(sockdir):
    path = sockdir / "milter.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    m = make_milter(connection=f"unix:{path}")
    with serving(m):
        assert send_one(path) == b"O"  # (the inode number may be reused: the connect is the proof)
    assert not path.exists()


@pytest.mark.parametrize("mode", ["0600", "0660", "0666", "0700"])
def test_socket_mode_is_honoured(tclrun, sockdir, mode):
    path = sockdir / "milter.sock"
    old = os.umask(0o077)  # whatever the umask, the mode asked for is the mode set
    try:
        m = tclrun(STAMP, "--socket-mode", mode, connection=f"unix:{path}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == int(mode, 8)
    assert send_one(path) == b"O"
    assert m.stop() == 0


@ROOT_ONLY
def test_socket_mode_and_owner_with_user(tclrun):
    nobody = pwd.getpwnam("nobody")
    d = world_dir()
    try:
        path = d / "milter.sock"
        m = tclrun(STAMP, "--user", "nobody", "--socket-mode", "0640", connection=f"unix:{path}")
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o640)
        assert m.stop() == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


WRITER = r"""
package require TclMilter
set dir [lindex $argv 0]
proc eom {ctx} {
    set f [open [file join $::dir from-eom.txt] w]; puts $f "written in eom"; close $f
    file mkdir [file join $::dir made-in-eom]
    return SMFIS_CONTINUE
}
proc tick {} {
    set f [open [file join $::dir from-timer.txt] w]; puts $f "written by a timer"; close $f
}
milter register eom eom
after 300 tick
milter main
"""

HOOK_WRITER = """
import os

def setup(milter):
    @milter.register("eom")
    def write(ctx):
        with open(os.path.join(os.environ["WRITE_DIR"], "from-python.txt"), "w") as f:
            f.write("written by a python callback\\n")
"""


@ROOT_ONLY
def test_after_user_the_files_callbacks_and_timers_write_belong_to_the_user(tclrun):
    nobody = pwd.getpwnam("nobody")
    d = world_dir()
    try:
        out = d / "out"
        out.mkdir()
        out.chmod(0o777)
        m = tclrun(WRITER, "--user", "nobody", connection="inet:0@127.0.0.1", args=[str(out)],
                   python=[HOOK_WRITER], env={"WRITE_DIR": str(out)})
        status = Path(f"/proc/{m.child.pid}/status").read_text()
        ids = {k: re.search(rf"^{k}:\s*(.*)$", status, re.M).group(1).split() for k in ("Uid", "Gid", "Groups")}
        assert ids["Uid"] == [str(nobody.pw_uid)] * 4
        assert ids["Gid"] == [str(nobody.pw_gid)] * 4
        assert ids["Groups"] == [str(nobody.pw_gid)], "no supplementary group of root's is kept"
        with m.mta() as mta:
            mta.negotiate()
            mta.message()
        deadline = time.monotonic() + 5
        names = {"from-eom.txt", "made-in-eom", "from-timer.txt", "from-python.txt"}
        while {p.name for p in out.iterdir()} != names and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {p.name for p in out.iterdir()} == names
        for p in out.iterdir():
            st = os.lstat(p)
            assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), (p.name, st.st_uid, st.st_gid)
        # and nothing it could reach as root: root's files stay out of reach
        with m.mta() as mta:
            mta.negotiate()
        assert m.stop() == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


# Runs the command with this group file as /etc/group, in a mount namespace of its own.
WITH_GROUP_FILE = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                   'mount --bind "$1" /etc/group && shift && exec "$@"', "sh"]


@ROOT_ONLY
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_after_user_the_process_has_the_users_supplementary_groups(tclrun, tmp_path):
    """docs/deployment.md: --user switches to the user's uid, gid and supplementary groups. An
    admin who ran `adduser pytclmilter redis` for Redis's socket expects that group; before,
    setgroups([gid]) left the filter with its primary group only."""
    nobody = pwd.getpwnam("nobody")
    extra = next(g for g in range(40000, 60000) if g not in {e.gr_gid for e in grp.getgrall()})
    group_file = tmp_path / "group"
    group_file.write_text(Path("/etc/group").read_text() + f"ptmextra:x:{extra}:nobody\n")
    m = tclrun(STAMP, "--user", "nobody", prefix=[*WITH_GROUP_FILE, str(group_file)])
    status = Path(f"/proc/{m.child.pid}/status").read_text()
    ids = {k: re.search(rf"^{k}:\s*(.*)$", status, re.M).group(1).split() for k in ("Uid", "Gid", "Groups")}
    assert ids["Uid"] == [str(nobody.pw_uid)] * 4
    assert ids["Gid"] == [str(nobody.pw_gid)] * 4
    assert sorted(map(int, ids["Groups"])) == sorted({nobody.pw_gid, extra}), ids["Groups"]
    assert m.stop() == 0


@ROOT_ONLY
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_user_switch_that_keeps_roots_capabilities_is_refused(tclrun, workers):
    """Securebits that keep the capabilities across setuid() (systemd's SecureBits=no-setuid-fixup,
    a container runtime's) left the process uid 65534 in all four slots with every capability of
    root's (CapEff 000001fffeffffff), and the log said `running as uid 65534`: the callbacks could
    write any file. The switch is checked: the start is refused before anything is served."""
    m = tclrun(STAMP, "--user", "nobody", "--workers", workers, wait=False,
               prefix=["setpriv", "--securebits", "+no_setuid_fixup", "--"])
    assert m.wait_exit(15) == 1, m.text
    assert re.search(r"milter main: after switching to uid 65534 the process still holds capabilities "
                     r"\(CapPrm [0-9a-f]+, CapEff [0-9a-f]+\)", m.text), m.text
    assert "listening on" not in m.text and "running as uid" not in m.text, m.text


@ROOT_ONLY
def test_a_socket_a_dropped_milter_could_not_remove_is_cleaned_at_the_next_start(tclrun):
    """In a root-owned directory the milter, once nobody, cannot unlink its socket at exit; it is
    left as a stale socket (never someone else's file), the log says so (it said nothing, where
    the pid file's removal in the same place has its warning), and the next start replaces it."""
    d = Path(tempfile.mkdtemp(prefix="ptmr", dir="/tmp"))
    d.chmod(0o755)
    try:
        path = d / "milter.sock"
        m = tclrun(STAMP, "--user", "nobody", "--socket-mode", "0666", connection=f"unix:{path}")
        assert m.stop() == 0
        assert path.exists()
        assert (f"WARNING: cannot remove socket file {path}: Permission denied (left as a stale socket: the "
                "next start replaces it)") in m.text, m.text
        m2 = tclrun(STAMP, connection=f"unix:{path}")
        assert send_one(path) == b"O"
        assert "removed stale socket" in m2.text
        assert m2.stop() == 0
        assert not path.exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- swaps while starting, as root

SYSTEM_PYTHON = "/usr/bin/python3"  # one the user nobody may run (this venv's may sit in root's home)

# The attacker: woken by inotify the moment a name appears in the directory (a loop polling
# lstat loses the race whenever the scheduler gives its CPU to someone else), it swaps every
# socket that appears there for a symlink to the target, atomically (rename over it).
RACER = r"""
import ctypes, os, stat, struct, sys
folder, target = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
watch = libc.inotify_init()
libc.inotify_add_watch(watch, folder.encode(), 0x100 | 0x80)  # IN_CREATE | IN_MOVED_TO
print("ready", flush=True)
while True:
    events = os.read(watch, 65536)
    while events:
        length = struct.unpack_from("iIII", events)[3]
        name = events[16:16 + length].rstrip(b"\0").decode()
        events = events[16 + length:]
        path = os.path.join(folder, name)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.symlink(target, path + ".link")
                os.rename(path + ".link", path)
        except OSError:
            pass
"""


def root_file(d: Path) -> Path:
    """A root-owned 0600 file in a directory only root may enter: what the attacker aims at."""
    d.mkdir(mode=0o700)
    target = d / "shadow"
    target.write_bytes(b"root's secret\n")
    target.chmod(0o600)
    return target


def target_state(target: Path) -> tuple:
    st = os.stat(target)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_ino, target.read_bytes()


@ROOT_ONLY
def test_a_socket_swapped_for_a_symlink_while_starting_never_redirects_chmod_or_chown(tclrun, tmp_path):
    """The socket directory belongs to the --user (as deployment.md sets it up) and is
    world-writable; a process of that user swaps every socket that appears there for a symlink
    to a root-owned 0600 file, as fast as it can, while the milter starts 50 times with
    --user nobody --socket-mode 0660 (five at a time, one of them with --workers 2). The
    file's owner, mode and content stay as they were every time."""
    nobody = pwd.getpwnam("nobody")
    target = root_file(tmp_path / "private")
    before = target_state(target)
    d = world_dir()
    os.chown(d, nobody.pw_uid, nobody.pw_gid)
    racer = None
    swapped = 0
    try:
        racer = subprocess.Popen([SYSTEM_PYTHON, "-c", RACER, str(d), str(target)], stdout=subprocess.PIPE,
                                 user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        os.setpriority(os.PRIO_PROCESS, racer.pid, -20)  # woken first, ahead of the milters
        assert racer.stdout.readline() == b"ready\n"
        for batch in range(10):
            paths = [d / f"milter{i}.sock" for i in range(5)]
            runs = [tclrun(STAMP, "--user", "nobody", "--socket-mode", "0660", *(["--workers", "2"] if i == 4 else []),
                           connection=f"unix:{path}", wait=False) for i, path in enumerate(paths)]
            for m in runs:
                m.wait_listening()
            assert target_state(target) == before, f"batch {batch + 1}: the target changed"
            for m in runs:
                assert m.stop() == 0
            assert target_state(target) == before, f"batch {batch + 1}: the target changed at stop"
            for path in paths:
                if os.path.islink(path):
                    swapped += 1
                    os.unlink(path)
            assert not list(d.iterdir()), "nothing is left behind (private directories, sockets)"
            assert racer.poll() is None
    finally:
        if racer is not None:
            racer.kill()
            racer.wait()
        shutil.rmtree(d, ignore_errors=True)
    print(f"the racer swapped the socket in {swapped} of 50 starts")
    assert swapped >= 25, "the race was not exercised"


# Swaps the name, as fast as it can, between a stale socket (a hard link of one) and a symlink to
# a live socket elsewhere: whatever the probe of a stale socket finds at lstat() may be the
# other one by the time it connects.
SWAPPER = r"""
import os, sys
folder, live = sys.argv[1], sys.argv[2]
stale, name = os.path.join(folder, "stale.sock"), os.path.join(folder, "milter.sock")
print("ready", flush=True)
i = 0
while True:
    i += 1
    tmp = os.path.join(folder, f"t{i}")
    os.link(stale, tmp) if i % 2 else os.symlink(live, tmp)
    os.rename(tmp, name)
"""


def test_the_probe_of_a_stale_socket_never_connects_through_a_symlink_swapped_in(sockdir, tmp_path):
    """docs/deployment.md: nothing done as root in the socket's directory follows a symlink. The
    probe that asks a stale socket whether it listens connected by path, so a symlink swapped in
    after the lstat() sent root's connection to any socket it named (a few in every thousand
    probes, here). Now it connects through a descriptor of the very socket it saw."""
    import sys

    from pytclmilter.safepath import open_dir
    from pytclmilter.unixsocket import _clear_stale

    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live"))
    live.listen(4096)
    live.setblocking(False)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sockdir / "stale.sock"))
    s.close()
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(sockdir), str(tmp_path / "live")],
                               stdout=subprocess.PIPE, text=True)
    dirfd, name = open_dir(str(sockdir / "milter.sock"))
    reached = 0
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == "ready\n"
        for _ in range(20000):
            try:
                _clear_stale(dirfd, name, str(sockdir / "milter.sock"))
            except ConnSpecError:
                pass  # a symlink, or a socket that changed meanwhile: refused, which is right
            while True:
                try:
                    conn, _ = live.accept()
                except BlockingIOError:
                    break
                conn.close()
                reached += 1
    finally:
        swapper.kill()
        swapper.wait()
        os.close(dirfd)
        live.close()
    assert reached == 0, f"{reached} probes connected to the live socket a symlink named"


@pytest.mark.parametrize("length", [106, 107])
def test_a_socket_path_is_refused_from_107_bytes_as_libmilter_refuses_it(length):
    """libmilter takes a path only while strlen + 1 < sizeof(sun_path): 106 bytes at most. One of
    107 (the kernel's limit, no room left) must be refused as the MTA's libmilter would refuse it;
    only 108 was tried, so a bound one byte late went unseen."""
    path = "/" + "s" * (length - 1)
    if length <= 106:
        assert parse(f"unix:{path}").path == path
    else:
        with pytest.raises(ConnSpecError, match="socket path longer than 106 bytes"):
            parse(f"unix:{path}")


def test_a_relative_socket_path_that_fits_is_not_measured_escaped(tclrun, tmp_path):
    """The length of a relative path's absolute form was measured escaped, as the message quotes
    it: a name with backslashes (each one two, escaped) that fits sun_path was refused as longer
    than 106 bytes, a socket the MTA could reach never served."""
    relative = "m" + "\\" * (100 - len(str(tmp_path)) - len("/m.sock")) + ".sock"
    absolute = f"{tmp_path}/{relative}"
    assert len(absolute) == 100 and len(absolute.replace("\\", "\\\\")) > 106
    run = tclrun("milter main", connection=f"unix:{relative}")
    assert (tmp_path / relative).is_socket(), run.text
    assert "longer than" not in run.text, run.text
    assert run.stop() == 0


def test_a_relative_socket_path_too_long_from_the_current_directory_is_refused(tclrun, tmp_path):
    """`--connection unix:sub/m.sock` whose absolute form passes 106 bytes: it served on a socket
    no MTA can connect to (sun_path holds no more), where the same path written whole is refused."""
    relative = "d" * max(1, 107 - len(str(tmp_path)) - len("/m.sock")) + "/m.sock"
    (tmp_path / relative).parent.mkdir()
    absolute = f"{tmp_path}/{relative}"
    assert len(absolute) > 106 and len(relative) < 106
    run = tclrun("milter main", connection=f"unix:{relative}", wait=False)
    assert run.wait_exit() == 1, run.text  # (as a socket that cannot be bound: exit 64 is the command line's)
    assert (f'connection "unix:{relative}": socket path longer than 106 bytes '
            f"from the current directory: {absolute}") in run.text
    assert not (tmp_path / relative).exists()


# ---------------------------------------------------------------------------- a path opened by name as root
# (what a --python file calls before a library opens a path as written: the greylist example's
# store, tests/test_greylist_store.py, shows them through its outage lines)


@ROOT_ONLY
def test_a_path_root_opens_by_name_is_refused_in_a_directory_others_may_write_or_through_a_link(
        tmp_path, monkeypatch):
    """refuse_unsafe_path_as_root: a relative path is checked from the root, as the library's open
    walks it; a link at a name made beside it (a suffix) is refused as at the name itself; a
    directory that does not exist is the walk's own OSError, not a refusal."""
    from pytclmilter.safepath import Untrusted, refuse_unsafe_path_as_root

    (tmp_path / "roots").mkdir(mode=0o755)
    (tmp_path / "roots" / "db-wal").symlink_to(tmp_path / "victim")
    refuse_unsafe_path_as_root(str(tmp_path / "roots" / "db"))  # no suffix: the link is no name of it
    with pytest.raises(Untrusted) as refused:
        refuse_unsafe_path_as_root(str(tmp_path / "roots" / "db"), ("-shm", "-wal"))
    assert refused.value.strerror == f"refusing to open it as root through the symbolic link {tmp_path}/roots/db-wal"
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o1777)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Untrusted) as refused:
        refuse_unsafe_path_as_root("shared/db")
    assert refused.value.strerror == (f"refusing to open it as root in {tmp_path}/shared, which others may "
                                      "write (run with --user, or give root the directory)")
    with pytest.raises(FileNotFoundError):
        refuse_unsafe_path_as_root("missing/db")


@ROOT_ONLY
def test_a_socket_root_connects_to_by_name_is_refused_in_another_users_directory_until_theirs_is_there(tmp_path):
    """refuse_unsafe_socket_as_root: the socket's directory may be the socket owner's (/run/redis),
    so with no socket there yet anyone's could appear: refused, saying so; a directory that cannot
    be reached is an OSError naming it."""
    from pytclmilter.safepath import Untrusted, refuse_unsafe_socket_as_root

    nobody = pwd.getpwnam("nobody")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(Untrusted) as refused:
        refuse_unsafe_socket_as_root(str(theirs / "redis.sock"))
    assert refused.value.strerror == (f"refusing to connect to it as root in {theirs}, owned by uid "
                                      f"{nobody.pw_uid}, not root (no socket there yet)")
    with pytest.raises(FileNotFoundError) as unreachable:
        refuse_unsafe_socket_as_root(str(tmp_path / "missing" / "redis.sock"))
    assert unreachable.value.strerror == f"cannot reach its directory {tmp_path}/missing: No such file or directory"


@ROOT_ONLY
def test_a_socket_named_with_dot_or_repeated_slashes_is_checked_as_without_them(tmp_path):
    """refuse_unsafe_socket_as_root: ``/run/redis/./redis.sock`` is the socket ``/run/redis/redis.sock``
    is (the check wanted root's ``/run/redis`` above a ``.``); ``..`` keeps its rule: the
    directory it is walked from must be root's."""
    from pytclmilter.safepath import Untrusted, refuse_unsafe_socket_as_root

    nobody = pwd.getpwnam("nobody")
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(mode=0o755, parents=True)
    for directory in (theirs, theirs / "sub"):
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(theirs / "redis.sock"))
        os.chown(theirs / "redis.sock", nobody.pw_uid, nobody.pw_gid)
        for path in (f"{theirs}/redis.sock", f"{theirs}/./redis.sock", f"{theirs}//redis.sock",
                     f"{tmp_path}//theirs/.//./redis.sock"):
            refuse_unsafe_socket_as_root(path)
        with pytest.raises(Untrusted) as refused:
            refuse_unsafe_socket_as_root(f"{theirs}/sub/../redis.sock")
        assert refused.value.strerror.startswith(f"refusing to connect to it as root in {theirs}/sub/..: ")
    (theirs / "redis.sock").unlink()
    with pytest.raises(Untrusted) as refused:
        refuse_unsafe_socket_as_root(f"{theirs}/./redis.sock")
    assert refused.value.strerror == (f"refusing to connect to it as root in {theirs}, owned by uid "
                                      f"{nobody.pw_uid}, not root (no socket there yet)")
