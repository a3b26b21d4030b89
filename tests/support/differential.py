"""The same filter on C libmilter and on pytclmilter, driven through the same conversations.

* :func:`build_difffilter` compiles ``difffilter.c`` (skips without gcc or libmilter-dev);
  :class:`CFilter` and :class:`TclFilter` run it and ``difffilter.tcl`` on unix sockets. Both
  write one line per callback call to a log file and answer as an instruction file says (the C
  file's header describes both); the file is read at every option negotiation, and the
  connections of one filter come one after the other.
* :func:`converse` drives one connection with an MTA model: a generator that yields
  :class:`Command` and is sent each final reply (None at EOF, :data:`SKIPPED` for an event the
  negotiation skipped, :data:`NO_REPLY` for one it did not wait on). A reply is awaited only
  where the MTA waits; once the model has yielded :data:`UNCERTAIN` (it sent something out of
  order), a second filter is asked first whether the command will be answered at all, since
  libmilter drops some commands without a word. :func:`replay` sends a recorded command list,
  waiting where it is told, not reacting to the replies.
* What one run saw is a list of :class:`Step`: the frames that came while the MTA waited on one
  command (``at``: its index) or after it shut its side (``at`` = "eof", or "eof@N" when the
  filter closed while the MTA waited on command N), and the log lines written meanwhile. Both
  filters log a callback before they answer and close the socket after their last callback, so
  the split of the lines between steps is exact, not a matter of timing.

The frames are built and read with :mod:`support.engine`'s raw MTA helpers, not with
pytclmilter's codec.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Iterable, Sequence

import pytest

from .engine import FINAL, WAIT, RawMTA, frame
from .tclrun import TclRun, spawn

HERE = Path(__file__).resolve().parent
MFAPI = Path("/usr/include/libmilter/mfapi.h")
#: The longest wait for a reply or for the filter's EOF: a bound against a hung filter, far above
#: what either filter takes on a busy machine; nothing is measured against it.
REPLY_WAIT = 30.0


@dataclass(frozen=True)
class Command:
    """One frame as the MTA sends it; ``waits``: the MTA reads a reply before it goes on."""

    code: bytes
    payload: bytes = b""
    waits: bool = False

    @property
    def frame(self) -> bytes:
        return frame(self.code, self.payload)


@dataclass
class Step:
    at: str
    frames: list[tuple[bytes, bytes]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNCERTAIN = _Marker("UNCERTAIN")  # yielded by a model: probe its further commands (converse)
SKIPPED = (b"-", b"")  # sent to a model for an event it did not send (negotiated away)
NO_REPLY = (b"", b"")  # sent to a model for a command it did not wait on
Reply = tuple[bytes, bytes]
Model = Generator["Command | _Marker", "Reply | None", None]


@dataclass
class Run:
    """What one connection sent (and whether it waited for each reply) and saw."""

    commands: list[Command]
    awaited: list[bool]
    steps: list[Step]


def build_difffilter(directory: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (apt-get install gcc): cannot build the libmilter filter")
    if not MFAPI.exists():
        pytest.skip("libmilter headers missing (apt-get install libmilter-dev): cannot build the libmilter filter")
    exe = directory / "difffilter"
    build = subprocess.run([gcc, "-Wall", "-Werror", "-o", str(exe), str(HERE / "difffilter.c"), "-lmilter",
                            "-lpthread"], capture_output=True, text=True)
    assert build.returncode == 0, f"gcc failed:\n{build.stderr}"
    return exe


class LogTail:
    """The lines a filter appended to its log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        self.offset = path.stat().st_size

    def take(self) -> list[str]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode("ascii").splitlines()


class Filter:
    """One filter process on a unix socket, with its instruction file and log."""

    answers_eom_chunk_twice = False

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket_path = directory / f"{name}.sock"
        self.instructions = directory / f"{name}.instructions"
        self.instructions.write_text("")
        self.log = LogTail(directory / f"{name}.log")

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(str(self.socket_path))
        return sock

    def instruct(self, lines: Iterable[str]) -> None:
        self.instructions.write_text("".join(f"{line}\n" for line in lines))

    def close(self) -> None:
        raise NotImplementedError


class CFilter(Filter):
    answers_eom_chunk_twice = True  # (see _Driver._second_reply)

    def __init__(self, exe: Path, directory: Path, unregistered: Sequence[str] = ()) -> None:
        super().__init__(directory, "libmilter")
        spec = f"unix:{self.socket_path}"
        self.proc = subprocess.Popen([str(exe), spec, str(self.instructions), str(self.log.path), *unregistered],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("difffilter: listening"), f"difffilter did not start: {line!r}"

    def close(self) -> None:
        self.proc.kill()  # libmilter looks at its stop flag only every 5 s
        self.proc.wait(WAIT)


class TclFilter(Filter):
    def __init__(self, directory: Path, unregistered: Sequence[str] = ()) -> None:
        super().__init__(directory, "pytclmilter")
        self.run: TclRun = spawn(directory, HERE / "difffilter.tcl", connection=f"unix:{self.socket_path}",
                                 args=[str(self.instructions), str(self.log.path), *unregistered])

    def close(self) -> None:
        self.run.kill()


# ---------------------------------------------------------------- driving a connection


class _Driver:
    def __init__(self, filt: Filter) -> None:
        self.filter = filt
        self.mta = RawMTA(filt.connect())
        self.commands: list[Command] = []
        self.awaited: list[bool] = []
        self.steps: list[Step] = []
        self.ended = False
        self.pending_lines: list[str] = []  # lines taken before their step (_second_reply)
        filt.log.take()  # (nothing: the previous connection ended before this one started)

    def step(self, at: str, frames: list[Reply]) -> None:
        self.steps.append(Step(at, frames, self.pending_lines + self.filter.log.take()))
        self.pending_lines = []

    def send(self, command: Command, wait: bool) -> Reply | None:
        """Send one command; its final reply if ``wait``, None at EOF."""
        index = len(self.commands)
        self.commands.append(command)
        self.awaited.append(wait)
        try:
            self.mta.send_raw(command.frame)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the filter closed: the next read says so, whenever it closed
        if not wait:
            return NO_REPLY
        frames: list[Reply] = []
        while True:
            try:
                code, payload = self.mta.recv_frame(REPLY_WAIT)
            except EOFError:
                self.step(f"eof@{index}", frames)
                self.ended = True
                return None
            frames.append((code, payload))
            if (code[0] in FINAL or code == b"O") and not self._second_reply(command, frames):
                self.step(str(index), frames)
                return code, payload

    def _second_reply(self, command: Command, frames: list[Reply]) -> bool:
        """Whether a second final reply follows this one: libmilter's, to an EOM carrying a body
        chunk whose body callback answered other than continue (docs/protocol.md §2.4). It calls
        no eom callback then: the last line logged is the body callback's."""
        if not (self.filter.answers_eom_chunk_twice and command.code == b"E" and command.payload):
            return False
        finals = sum(1 for code, _ in frames if code[0] in FINAL)
        if finals == 1:
            self.pending_lines = self.filter.log.take()
            return bool(self.pending_lines) and self.pending_lines[-1].startswith("body ")
        return False

    def close(self) -> Run:
        """Shut the write side, collect everything up to the filter's EOF as the last step."""
        if not self.ended:
            try:
                self.mta.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            frames: list[Reply] = []
            while True:
                try:
                    frames.append(self.mta.recv_frame(REPLY_WAIT))
                except EOFError:
                    break
            self.step("eof", frames)
        self.mta.close()
        return Run(self.commands, self.awaited, self.steps)


Probe = Callable[[list[Command], list[bool]], bool]


def converse(filt: Filter, model: Model, probe: Probe | None = None) -> Run:
    """Drive one connection with ``model`` (see the module docstring).

    After the model yields UNCERTAIN, a command the MTA waits on is first sent to ``probe``
    (the commands so far, which of them were awaited): only if that says it is answered does
    the driver wait for its reply; otherwise the model gets NO_REPLY, as an MTA would after its
    timeout.
    """
    driver = _Driver(filt)
    uncertain = False
    try:
        item = next(model)
        while not driver.ended:
            if item is UNCERTAIN:
                uncertain = True
                item = model.send(NO_REPLY)
                continue
            assert isinstance(item, Command)
            wait = item.waits
            if wait and uncertain and probe is not None:
                wait = probe(driver.commands + [item], driver.awaited)
            item = model.send(driver.send(item, wait))
    except StopIteration:
        pass
    finally:
        model.close()
    return driver.close()


def replay(filt: Filter, commands: Sequence[Command], awaited: Sequence[bool]) -> Run:
    """Send ``commands``, waiting for a reply where ``awaited`` says so, not reacting to the replies."""

    driver = _Driver(filt)
    for command, wait in zip(commands, awaited):
        if driver.send(command, wait) is None:
            break
    return driver.close()


def answered(filt: Filter, commands: list[Command], awaited: list[bool]) -> bool:
    """Whether ``filt`` answers the last of ``commands`` (the others sent as ``awaited`` says)."""
    run = replay(filt, commands, [*awaited, False])
    return any(code[0] in FINAL for code, _ in run.steps[-1].frames)


def offer(version: int, actions: int, protocol: int) -> Command:
    return Command(b"O", struct.pack("!III", version, actions, protocol), waits=True)
