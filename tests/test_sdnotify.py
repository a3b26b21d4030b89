"""``Type=notify``: pytclmilter tells systemd when it serves, reloads and stops (sdnotify.py).

The service manager's end is a datagram socket made here, with SO_PASSCRED so that each
message's sender is known, as systemd knows it (its default NotifyAccess=main hears the main
process alone).
"""

from __future__ import annotations

import signal
import socket
import struct
from pathlib import Path
from typing import Callable

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

    def receive(self, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
        """The next message: its sender's pid, and its fields."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pids = [struct.unpack("iII", cdata[:12])[0] for level, kind, cdata in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return pids[0], fields

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("workers, where", [("1", "path"), ("2", "abstract")])
def test_systemd_hears_ready_reloads_and_stop_from_the_main_process(tclrun: Callable[..., TclRun], tmp_path: Path,
                                                                   workers: str, where: str) -> None:
    name = f"pytclmilter-test-{tmp_path.name}"
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

        run.child.kill(signal.SIGTERM)
        pid, fields = manager.receive()
        assert pid == main and fields == {"STOPPING": "1", "STATUS": "stopping"}
        assert run.wait_exit(10) == 0
        with pytest.raises(socket.timeout):  # and nothing from a worker
            manager.receive(timeout=1.0)
    finally:
        manager.close()


def test_without_notify_socket_nothing_is_sent_and_a_bad_one_is_one_warning(tclrun: Callable[..., TclRun],
                                                                           tmp_path: Path) -> None:
    run = tclrun(SCRIPT, env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    run.wait_for(r"WARNING: cannot notify systemd \(NOTIFY_SOCKET\): No such file or directory")
    run.child.kill(signal.SIGUSR1)
    run.wait_for(r"reload: generation 1 is gone")
    assert run.stop() == 0
    assert run.text.count("cannot notify systemd") == 1
