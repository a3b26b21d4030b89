"""``Type=notify``: pytclmilter tells systemd when it serves, reloads and stops (sdnotify.py).

The service manager's end is a datagram socket made here, with SO_PASSCRED so that each
message's sender is known, as systemd knows it (its default NotifyAccess=main hears the main
process alone).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from support.tclrun import TclRun, tclrun_factory

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

SCRIPT = """\
package require TclMilter
puts "script sees NOTIFY_SOCKET: [info exists ::env(NOTIFY_SOCKET)]"
proc eom {ctx} { $ctx addheader X-Stamp A; return SMFIS_CONTINUE }
milter register eom eom
milter main
"""


class Manager:
    """systemd's end of NOTIFY_SOCKET."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.last = b""  # the last message as it came

    def receive(self, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
        """The next message: its sender's pid, and its fields."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        self.last = data
        pids = [struct.unpack("iII", cdata[:12])[0] for level, kind, cdata in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return pids[0], fields

    def hears_nothing(self) -> None:
        """Nothing comes within half a second (a socket the milter refused)."""
        with pytest.raises(socket.timeout):
            _, fields = self.receive(timeout=0.5)
            raise AssertionError(fields)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def full_queue(tmp_path: Path) -> Iterator[Manager]:
    """A manager at tmp_path/notify that reads nothing, its queue filled up (a PID 1 stuck)."""
    manager = Manager(str(tmp_path / "notify"))
    try:
        with filled(tmp_path / "notify"):
            yield manager
    finally:
        manager.close()


@contextlib.contextmanager
def filled(address: Path) -> Iterator[None]:
    """The queue of the manager at ``address`` filled up, until the manager reads again."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        filler.connect(str(address))
        filler.setblocking(False)
        with pytest.raises(BlockingIOError):
            for _ in range(100000):
                filler.send(b"X=1")
        yield
    finally:
        filler.close()


def stamps_and_stops(run: TclRun) -> None:
    """The milter serves (the script's header on a message), then stops cleanly."""
    with run.mta() as mta:
        mta.negotiate()
        assert ("h", b"X-Stamp\0A\0") in mta.message()["eom"]
    assert run.stop() == 0


@pytest.mark.parametrize("workers, where", [("1", "path"), ("2", "abstract")])
def test_systemd_hears_ready_reloads_and_stop_from_the_main_process(tclrun: Callable[..., TclRun], tmp_path: Path,
                                                                   workers: str, where: str) -> None:
    # (an abstract name is seen by every process of the network namespace: a concurrent pytest's
    # tmp_path has the same name, so this process's id makes it unique)
    name = f"pytclmilter-test-{os.getpid()}-{tmp_path.name}"
    address, env_value = ((str(tmp_path / "notify"), str(tmp_path / "notify")) if where == "path"
                          else (b"\0" + name.encode(), "@" + name))
    manager = Manager(address)
    try:
        script = tmp_path / "stamp.tcl"
        script.write_text(SCRIPT)
        run = tclrun(script, "--workers", workers, env={"NOTIFY_SOCKET": env_value})
        run.wait_for(r"script sees NOTIFY_SOCKET: 0", since=0)  # no program the script starts speaks for it
        main = run.child.pid
        pid, fields = manager.receive()
        assert pid == main and fields == {"READY": "1", "STATUS": f"TclMilter listening on {run.spec}"}
        with run.mta() as mta:  # READY=1 came with the socket bound: connections are served
            mta.negotiate()
            assert ("h", b"X-Stamp\0A\0") in mta.message()["eom"]

        run.child.kill(signal.SIGUSR1)
        pid, fields = manager.receive()
        assert pid == main and fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
        pid, fields = manager.receive()
        assert pid == main and fields == {"READY": "1", "STATUS": f"TclMilter listening on {run.spec}; generation 2"}

        script.write_text("nosuchcommand\n" + SCRIPT)
        run.child.kill(signal.SIGUSR1)
        assert manager.receive()[1]["RELOADING"] == "1"
        pid, fields = manager.receive()
        assert pid == main and fields == {"READY": "1", "STATUS": f"TclMilter listening on {run.spec}; "
                                                                  "generation 2; the last reload failed (see the log)"}

        script.write_text(SCRIPT.replace("milter main", "milter configure -name Renamed\nmilter main"))
        run.child.kill(signal.SIGUSR1)  # STATUS= names the script serving (it kept the first one's -name)
        assert manager.receive()[1]["RELOADING"] == "1"
        pid, fields = manager.receive()
        assert pid == main and fields == {"READY": "1", "STATUS": f"Renamed listening on {run.spec}; generation 3"}

        run.child.kill(signal.SIGTERM)
        pid, fields = manager.receive()
        assert pid == main and fields == {"STOPPING": "1", "STATUS": "stopping"}
        assert run.wait_exit(10) == 0
        with pytest.raises(socket.timeout):  # and nothing from a worker
            manager.receive(timeout=1.0)
    finally:
        manager.close()


REFUSED = {
    "restart only": ("milter configure -metrics inet:0@127.0.0.1",
                     "-metrics cannot change without a restart"),
    "stopped": ("milter stop",
                r"the new milter was stopped before it served \(its script called `milter stop` before `milter main`\)"),
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("why", sorted(REFUSED))
def test_a_reload_the_serving_milter_refuses_is_told_as_failed(tclrun: Callable[..., TclRun], tmp_path: Path,
                                                               workers: str, why: str) -> None:
    """A script that loads but that the serving milter refuses to hand over to (a setting only a
    restart can change; a `milter stop` before `milter main`): the old one serves on, and what
    `systemctl status` shows says the last reload failed, with the old generation and the old
    -name (the refused script renamed it), READY=1 after RELOADING=1 as systemd requires. Then
    a good script loads as the next generation."""
    manager = Manager(str(tmp_path / "notify"))
    try:
        script = tmp_path / "stamp.tcl"
        script.write_text(SCRIPT)
        run = tclrun(script, "--workers", workers, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert manager.receive()[1] == {"READY": "1", "STATUS": f"TclMilter listening on {run.spec}"}
        change, said = REFUSED[why]
        script.write_text(SCRIPT.replace("milter main", f"milter configure -name Renamed\n{change}\nmilter main"))
        run.child.kill(signal.SIGUSR1)
        assert manager.receive()[1]["RELOADING"] == "1"
        assert manager.receive()[1] == {"READY": "1", "STATUS": f"TclMilter listening on {run.spec}; generation 1; "
                                                                "the last reload failed (see the log)"}
        run.wait_for(rf"ERROR: reload: generation 2 not loaded, generation 1 serves on unchanged: {said}\r?\n",
                     since=0)
        with run.mta() as mta:  # the old script serves on
            mta.negotiate()
            assert ("h", b"X-Stamp\0A\0") in mta.message()["eom"]

        script.write_text(SCRIPT.replace("milter main", "milter configure -name Renamed\nmilter main"))
        run.child.kill(signal.SIGUSR1)
        assert manager.receive()[1]["RELOADING"] == "1"
        assert manager.receive()[1] == {"READY": "1", "STATUS": f"Renamed listening on {run.spec}; generation 2"}
        assert run.stop() == 0
    finally:
        manager.close()


def test_status_quotes_the_scripts_name_and_socket_escaped_so_they_add_no_field(tclrun: Callable[..., TclRun],
                                                                                tmp_path: Path) -> None:
    """STATUS= quotes the script's ``-name`` and ``-connection``, and each line of a notify message
    is a field of its own: a name with a newline then ``STOPPING=1`` told systemd the filter was
    stopping (or ``READY=1``, ``MAINPID=``...), and an escape sequence reached the terminal of
    ``systemctl status``. They are escaped as in the log (logline.escape), at the start and after a reload."""
    name = "Evil\\nSTOPPING=1\\x1b\\[31mé"  # (Tcl's backslash escapes: a newline, an ESC)
    # (a newline or tab in a unix path is refused, connspec.py: a C1 control and U+2028 are not)
    sock = tmp_path / "a\u0085MAINPID=1\u2028b\u009b31m.sock"
    address = str(tmp_path / "notify")
    manager = Manager(address)
    try:
        script = tmp_path / "named.tcl"
        script.write_text(f'package require TclMilter\nmilter configure -name "{name}"\nmilter main\n')
        run = tclrun(script, "--connection", f"unix:{sock}", env={"NOTIFY_SOCKET": address})
        shown = f"Evil\\nSTOPPING=1\\x1b[31mé listening on unix:{tmp_path}/a\\u0085MAINPID=1\\u2028b\\u009b31m.sock"
        fields = manager.receive()[1]
        assert manager.last == f"READY=1\nSTATUS={shown}".encode()
        assert fields == {"READY": "1", "STATUS": shown}

        run.child.kill(signal.SIGUSR1)
        assert manager.receive()[1]["RELOADING"] == "1"
        manager.receive()
        assert manager.last == f"READY=1\nSTATUS={shown}; generation 2".encode()
        assert run.stop() == 0
    finally:
        manager.close()


def test_without_notify_socket_nothing_is_sent_and_a_bad_one_is_one_warning(tclrun: Callable[..., TclRun],
                                                                           tmp_path: Path) -> None:
    run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    run.wait_for(r"WARNING: cannot notify systemd \(NOTIFY_SOCKET\): No such file or directory", since=0)
    run.child.kill(signal.SIGUSR1)
    run.wait_for(r"reload: generation 1 is gone")
    assert run.stop() == 0
    assert run.text.count("cannot notify systemd") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_a_notify_socket_only_root_may_write_hears_ready_after_the_switch_to_user(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """READY=1 goes out after the switch to --user: a manager's socket only root may write took it
    as "Permission denied", and the unit failed its start. The socket is now connected at start,
    as root, and every message goes to that peer."""
    path = tmp_path / "notify"
    manager = Manager(str(path))
    try:
        path.chmod(0o755)
        run = tclrun(SCRIPT, "--user", "nobody", env={"NOTIFY_SOCKET": str(path)})
        pid, fields = manager.receive()
        assert pid == run.child.pid and fields["READY"] == "1", fields
        assert run.stop() == 0
        assert manager.receive()[1]["STOPPING"] == "1"
        assert "cannot notify" not in run.text, run.text
    finally:
        manager.close()


def _foreign_notify_sockets(tmp_path: Path) -> list[tuple[Path, str]]:
    """Managers' sockets another user could have put there (the name, and why it is refused)."""
    nobody = pwd.getpwnam("nobody").pw_uid
    open_dir = tmp_path / "open"  # anyone may add and rename entries
    open_dir.mkdir()
    open_dir.chmod(0o777)
    sticky = tmp_path / "sticky"  # as /tmp: the socket is another user's
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = tmp_path / "theirs"  # another user's directory
    theirs.mkdir()
    os.chown(theirs, nobody, -1)
    return [(open_dir / "notify", f"{open_dir} is writable by others"),
            (sticky / "notify", f"{sticky} is writable by others"),
            (theirs / "notify", f"{theirs} is owned by uid {nobody}")]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_as_root_a_notify_socket_another_user_could_have_put_there_is_refused(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """Root sent its messages to whatever socket NOTIFY_SOCKET's name held, at each message: in a
    directory others may write, another user could put any socket of root's there (the journal's,
    a daemon's control socket) for root to write to. Refused at start now, said once; the milter
    serves. (systemd's own, in root's /run/systemd, is heard: the other tests.)"""
    nobody = pwd.getpwnam("nobody").pw_uid
    for path, why in _foreign_notify_sockets(tmp_path):
        manager = Manager(str(path))
        try:
            if "sticky" in str(path):
                os.chown(path, nobody, -1)
            run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": str(path)})
            with run.mta() as mta:
                mta.negotiate()
                assert ("h", b"X-Stamp\0A\0") in mta.message()["eom"]
            assert run.stop() == 0
            assert run.text.count(f"WARNING: NOTIFY_SOCKET {path}: refusing it: {why}, who could put another socket "
                                  "under that name (use a directory only root may write, as systemd's "
                                  "/run/systemd); systemd will not be told when the milter is ready") == 1, run.text
            manager.hears_nothing()
        finally:
            manager.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_as_root_a_link_of_roots_socket_in_a_sticky_directory_is_refused(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """In a sticky directory (/tmp) a socket of root's passes: no one else may rename it. But where
    the kernel does not stop it (fs.protected_hardlinks 0) another user may link any socket of
    root's (the journal's) there, under a name a stale NOTIFY_SOCKET gives, for root to write to:
    a socket with another link is refused there, as a script with one is."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    manager = Manager(str(tmp_path / "roots"))  # root's own socket, elsewhere
    try:
        os.link(tmp_path / "roots", sticky / "notify")  # (as the other user would)
        run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": str(sticky / "notify")})
        assert run.stop() == 0
        assert run.text.count(f"WARNING: NOTIFY_SOCKET {sticky}/notify: refusing it: {sticky}/notify has 2 links "
                              "and is in a directory others may write") == 1, run.text
        manager.hears_nothing()
    finally:
        manager.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_as_root_roots_own_socket_in_a_sticky_directory_is_heard(tclrun: Callable[..., TclRun],
                                                                  tmp_path: Path) -> None:
    """A manager's socket of root's, with no other link, in a sticky directory of root's (a
    container manager's or a test harness's in /tmp): no other user could have put it under that
    name or renamed it, so root connects to it and systemd hears READY=1, with no warning. Refused,
    the unit would fail its start at TimeoutStartSec; the refusals beside it (another user's
    socket there, a second link) must not take this one with them."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    manager = Manager(str(sticky / "notify"))
    try:
        assert os.stat(sticky / "notify").st_nlink == 1
        run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": str(sticky / "notify")})
        pid, fields = manager.receive()
        assert pid == run.child.pid and fields["READY"] == "1", fields
        stamps_and_stops(run)
        assert manager.receive()[1]["STOPPING"] == "1"
        assert "WARNING: NOTIFY_SOCKET" not in run.text and "cannot notify" not in run.text, run.text
    finally:
        manager.close()


def test_a_notify_socket_named_by_a_link_of_ours_is_heard(tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """NOTIFY_SOCKET naming a link to the manager's socket was heard (sendto() follows it); the
    connect at start refused it as "a symbolic link, not a socket". A link no one else could
    have made (in a directory of ours) is followed, as the links on the way are."""
    (tmp_path / "real").mkdir()
    manager = Manager(str(tmp_path / "real" / "notify"))
    try:
        (tmp_path / "notify").symlink_to("real/notify")
        run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        pid, fields = manager.receive()
        assert pid == run.child.pid and fields["READY"] == "1", fields
        assert run.stop() == 0
        assert "WARNING: NOTIFY_SOCKET" not in run.text and "cannot notify" not in run.text, run.text
    finally:
        manager.close()


def test_a_notify_socket_that_is_no_unix_address_is_a_warning_and_the_milter_serves(
        tclrun: Callable[..., TclRun]) -> None:
    """systemd 254 may hand a VSOCK address (``vsock:CID:PORT``), which is not spoken here: the
    log says that systemd will not hear of readiness (a Type=notify unit would time out starting,
    for a reason the journal then gives), and the milter serves; the variable is taken away all the same."""
    run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": "vsock:2:1234"})
    run.wait_for(r"script sees NOTIFY_SOCKET: 0", since=0)
    run.wait_for(r"WARNING: NOTIFY_SOCKET vsock:2:1234: not a unix socket address; systemd will not be told when "
                 r"the milter is ready", since=0)
    stamps_and_stops(run)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reload_a_stop_abandons_is_not_told_as_ready_and_failed(tclrun: Callable[..., TclRun], tmp_path: Path,
                                                                  workers: str) -> None:
    """SIGTERM while a reload loads: systemd heard STOPPING=1, then READY=1 with "the last reload
    failed (see the log)", as if the filter served on after a broken script. Now the stop is the
    last word: the load was abandoned, not failed, and nothing serves on."""
    manager = Manager(str(tmp_path / "notify"))
    try:
        script = tmp_path / "stamp.tcl"
        script.write_text(SCRIPT)
        run = tclrun(script, "--workers", workers, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert manager.receive()[1]["READY"] == "1"
        script.write_text("puts loading; flush stdout\nwhile 1 {}\n" + SCRIPT)
        run.child.kill(signal.SIGUSR1)
        assert manager.receive()[1]["RELOADING"] == "1"
        run.wait_for(r"\nloading\r*\n")
        run.child.kill(signal.SIGTERM)
        assert manager.receive()[1] == {"STOPPING": "1", "STATUS": "stopping"}
        assert run.wait_exit(10) == 0
        run.wait_for(r"reload: generation 2 abandoned", since=0)
        with pytest.raises(socket.timeout):
            pid, fields = manager.receive(timeout=1.0)
            raise AssertionError(fields)
    finally:
        manager.close()


def wait_in_poll(pid: int) -> None:
    """Until the main thread of ``pid`` waits in poll() (a send waiting for room in the queue), as
    /proc tells it (its wchan: the kernel function it sleeps in)."""
    wchan = Path(f"/proc/{pid}/wchan")
    deadline = time.monotonic() + 10
    seen = set()
    while "poll_schedule_timeout" not in (where := wchan.read_text()):
        seen.add(where)
        if time.monotonic() > deadline:
            if seen == {"0"}:  # (running, or a kernel that never tells)
                pytest.skip("/proc/PID/wchan says nothing here")
            raise AssertionError(f"not waiting in poll() but in {seen}")
        time.sleep(0.005)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stop_as_a_reload_begins_abandons_its_load(tclrun: Callable[..., TclRun], tmp_path: Path,
                                                     workers: str) -> None:
    """SIGTERM as a reload begins, before its load watches for stops (here while RELOADING=1
    waits for room in the manager's queue; in the field, as the loading line is written): the
    process's own handler took it, and the load ran to its end, "generation 2 serves" while all
    stopped, however long the load took: here a --python file's setup that sleeps, with no
    -calltimeout. Now the load is abandoned, as it is later in it."""
    manager = Manager(str(tmp_path / "notify"))
    try:
        script = tmp_path / "stamp.tcl"
        script.write_text("milter configure -calltimeout 0\n" + SCRIPT)
        run = tclrun(script, "--workers", workers, env={"NOTIFY_SOCKET": str(tmp_path / "notify")},
                     python=["def setup(milter):\n    pass\n"])
        assert manager.receive()[1]["READY"] == "1"
        (tmp_path / "hooks0.py").write_text("import time\n\ndef setup(milter):\n    time.sleep(600)\n")
        with filled(tmp_path / "notify"):
            run.child.kill(signal.SIGUSR1)
            wait_in_poll(run.child.pid)  # RELOADING=1, before the load
            run.child.kill(signal.SIGTERM)
            assert run.wait_exit(10) == 0, run.text
        assert "reload: generation 2 abandoned: received SIGTERM while it loaded" in run.text, run.text
        assert "generation 2 serves" not in run.text, run.text
        # The supervisor's handler took it first, and its "received SIGTERM: stopping N workers"
        # came before the abandon line: the one stop told twice. It waits for the reload now.
        assert re.findall(rf"\[{run.child.pid}\] \w+: .*SIGTERM", run.text) == [
            f"[{run.child.pid}] WARNING: reload: generation 2 abandoned: received SIGTERM"], run.text
    finally:
        manager.close()


def test_an_abstract_notify_socket_of_bytes_not_utf8_is_heard(
        tclrun: Callable[..., TclRun]) -> None:
    """NOTIFY_SOCKET is bytes: an abstract name that is not UTF-8 (``@`` and the byte 0xff) came
    into Python as a surrogate escape, which str.encode() refused: a UnicodeEncodeError traceback,
    and no milter. The name is the environment's bytes again, and the manager bound to them hears
    READY=1."""
    manager = Manager(b"\0pytclmilter-\xff-" + str(os.getpid()).encode())
    try:
        run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": f"@pytclmilter-\udcff-{os.getpid()}"})
        pid, fields = manager.receive()
        assert pid == run.child.pid and fields["READY"] == "1", fields
        stamps_and_stops(run)
        assert "Traceback" not in run.text and "cannot notify" not in run.text, run.text
    finally:
        manager.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_manager_whose_queue_is_full_holds_the_milter_at_most_a_moment(tclrun: Callable[..., TclRun],
                                                                        tmp_path: Path, workers: str) -> None:
    """A manager that does not read (PID 1 stuck; net.unix.max_dgram_qlen is 10 where systemd's
    sysctl.d does not raise it to 512): each message was a blocking send, and the one that found
    the queue full held the process for ever, READY=1 before the first connection was served.
    Now a send waits a moment, then is given up, said once; the milter serves."""
    with full_queue(tmp_path) as manager:
        run = tclrun(SCRIPT, "--workers", workers, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        run.wait_for(r"WARNING: cannot notify systemd \(NOTIFY_SOCKET\): its queue stayed full for 1 s \(the service "
                     r"manager does not read it\)", since=0)
        stamps_and_stops(run)
        assert run.text.count("cannot notify systemd") == 1, run.text


@pytest.mark.parametrize("workers", ["1", "2"])
def test_once_the_managers_queue_stayed_full_a_reload_and_a_stop_do_not_wait_for_it(
        tclrun: Callable[..., TclRun], tmp_path: Path, workers: str) -> None:
    """After a message timed out in a queue the manager never reads, each later one still waited
    1 s: a reload (RELOADING=1, READY=1) held the milter 2 s, a stop 2.6 s. Now the later ones are
    tried without waiting and dropped, counted in one line, until one goes through again."""
    with full_queue(tmp_path) as manager:
        run = tclrun(SCRIPT, "--workers", workers, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        run.wait_for(r"its queue stayed full for 1 s", since=0)
        start = time.monotonic()
        run.child.kill(signal.SIGUSR1)
        run.wait_for(r"reload: generation 1 is gone")
        with run.mta() as mta:  # answered once the loop is free again
            mta.negotiate()
            assert ("h", b"X-Stamp\0A\0") in mta.message()["eom"]
        reload_took = time.monotonic() - start
        start = time.monotonic()
        assert run.stop() == 0
        stop_took = time.monotonic() - start
        assert (reload_took < 0.9, stop_took < 0.9) == (True, True), (reload_took, stop_took, run.text)
        assert ("WARNING: 3 messages to systemd (NOTIFY_SOCKET) dropped: its queue stayed full to the end\n"
                in run.text), run.text
        assert run.text.count("cannot notify systemd") == 1, run.text


def reads_again_and_hears_a_reload(run: TclRun, manager: Manager) -> None:
    """The manager reads what its queue holds, then hears both messages of a reload (SIGUSR1)."""
    with pytest.raises(socket.timeout):
        while True:
            manager.receive(timeout=0.3)
    run.child.kill(signal.SIGUSR1)
    assert manager.receive()[1]["RELOADING"] == "1"
    assert manager.receive()[1]["READY"] == "1"


def test_once_the_managers_queue_has_room_again_messages_are_heard_and_the_dropped_told(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """The other half of not waiting: a manager that reads again hears the next message (and the
    ones after wait for room again, as before any timed out); the dropped are told in one line."""
    with full_queue(tmp_path) as manager:
        run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        run.wait_for(r"its queue stayed full for 1 s", since=0)
        run.child.kill(signal.SIGUSR1)  # RELOADING=1, READY=1: dropped
        run.wait_for(r"reload: generation 1 is gone")
        reads_again_and_hears_a_reload(run, manager)
        run.wait_for(r"WARNING: 2 messages to systemd \(NOTIFY_SOCKET\) dropped: its queue stayed full before its "
                     r"queue had room again\r?\n")
        run.child.kill(signal.SIGTERM)
        assert manager.receive()[1]["STOPPING"] == "1"
        assert run.wait_exit() == 0
        assert run.text.count("messages to systemd") == 1, run.text


def test_a_message_that_waits_in_vain_a_second_time_is_counted_with_the_dropped(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """The queue full, then read again, then full again: the message that waited 1 s in vain the
    second time was said nowhere (the line of a timed-out message is said once) and left out of
    the count of the dropped, one short. Now it is counted with them."""
    with full_queue(tmp_path) as manager:
        run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        run.wait_for(r"its queue stayed full for 1 s", since=0)  # READY=1
        reads_again_and_hears_a_reload(run, manager)
        run.wait_for(r"reload: generation 1 is gone")
        with filled(tmp_path / "notify"):  # stuck again
            run.child.kill(signal.SIGUSR1)  # RELOADING=1: waits 1 s in vain; READY=1: dropped
            run.wait_for(r"reload: generation 2 is gone")
            assert run.stop() == 0  # STOPPING=1: dropped
        assert ("WARNING: 3 messages to systemd (NOTIFY_SOCKET) dropped: its queue stayed full to the end\n"
                in run.text), run.text
        assert run.text.count("cannot notify systemd") == 1, run.text
