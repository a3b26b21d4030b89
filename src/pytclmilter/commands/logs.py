"""Logging as the subcommands set it up: one line format, stderr or syslog, cheap per line.

Every record is guarded on its way out (``logline.guard``, stderr and syslog alike): control
characters escaped, continuation lines indented, whatever its call site did. The verdict line's
direct path (logline.info) is not: its arguments are escaped where they are given, which costs
less than checking the whole line again.

``pytclmilter run`` logs one line per message (its verdict), so the cost of a line is part of
the cost of a message: the time is formatted once per second, the pid is known rather than
asked for, no caller frame is looked up, and lines logged while the event loop handles one batch
of ready sockets reach stderr together (warnings and errors at once), in writes of whole lines of
at most logline.OUTPUT_LINE bytes (PIPE_BUF), a longer line folded as a script's output is.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import logging.handlers
import os
import select
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any, TextIO

from .. import logline
from .common import UsageError

_pid = os.getpid()
STDERR_FORMAT = "%(asctime)s pytclmilter[%(process)d] %(levelname)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"  # where --syslog sends its lines (a test points it at a socket of its own)


def _before_fork() -> None:
    for handler in logging.getLogger().handlers:  # a child must not write its parent's pending lines again
        if isinstance(handler, CoalescingStreamHandler):
            handler.flush()


def _forked() -> None:
    global _pid
    _pid = os.getpid()
    for handler in logging.getLogger().handlers:  # nor send its parent's backlog
        if isinstance(handler, CoalescingStreamHandler) and handler.nowait is not None:
            handler.nowait.forget()


os.register_at_fork(before=_before_fork, after_in_child=_forked)  # --workers: each logs its own pid


def flush_log() -> None:
    """Write the lines waiting for the loop's turn (CoalescingStreamHandler) now: before work
    that holds the loop, so that the log says what is under way."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup_logging(level: str, syslog: bool = False, daemon: bool = False) -> bool:
    """Log to stderr, or with ``syslog`` to syslog; whether it is syslog. With stderr closed
    (``2>&-``: Python's sys.stderr is None), a ``daemon`` (run) logs to syslog, as a milter such
    as OpenDKIM does, and says why in its first line; it ended with exit 1 and not a word (the
    first line raised). Nowhere to log is a UsageError (on stdout, if open). Other commands
    drop their log lines: their reports go to stdout."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    closed = sys.stderr is None
    instead = closed and daemon and not syslog
    handler: logging.Handler
    if syslog or instead:
        if not os.path.exists(SYSLOG_SOCKET):
            why = "stderr is closed, and syslog cannot take the log instead: " if instead else "--syslog: "
            raise UsageError(f"{why}{SYSLOG_SOCKET} does not exist (is a syslog daemon running?)")
        handler = SyslogHandler(address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(LineFormatter("pytclmilter[%(process)d]: %(levelname)s: %(message)s"))
    elif closed:
        handler = logging.NullHandler()
    else:
        handler = CoalescingStreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter(STDERR_FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # Our log lines never show the caller's file and line, thread or process name: skip the stack
    # walk and the look-ups (logging HOWTO, "Optimization"); the stack walk alone was a tenth of
    # the cost of a message.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False  # os.getpid() is a system call per line: LineFormatter knows the pid
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False  # a look-up per line
    if LeanLogRecord.fits():
        logging.setLogRecordFactory(LeanLogRecord)
    logline.set_sink(handler if isinstance(handler, CoalescingStreamHandler) else None)
    warnings.showwarning = _show_warning
    if instead:
        logging.getLogger("pytclmilter").warning(
            "stderr is closed: logging to syslog (%s, facility mail) instead; start pytclmilter with --syslog, "
            "or with stderr open (to the journal or a file)", SYSLOG_SOCKET)
    return syslog or instead


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """warnings.showwarning: a warning (a --python file's, quoting a sender, say) as a log record
    of py.warnings, escaped and guarded as every record is (LineFormatter); Python's own wrote
    it straight to stderr, the log under systemd, its controls and line breaks raw. As
    logging.captureWarnings, less the empty continuation line its final LF made; a warning
    shown to a file of its own (``file``) is written there as Python writes it."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    if file is not None:
        file.write(text)
        return
    logging.getLogger("py.warnings").warning("%s", text.rstrip("\n"))


class SyslogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that, while syslog cannot be reached (its daemon restarting or stopped),
    says so once on stderr and counts the lines lost, then says how many in the first line that
    gets through; logging's own handleError printed a traceback of some 18 lines on stderr for
    every line, a flood at one verdict line a message."""

    def __init__(self, address: str, facility: int) -> None:
        super().__init__(address=address, facility=facility)
        self.lost = 0  # lines not sent since syslog could last be reached

    def _connect_unixsocket(self, address: Any) -> None:
        """Connect as SysLogHandler does, then never wait: a syslog daemon that stops reading
        (stuck on a full disk) fills the socket's queue, and a blocking send would hold the event
        loop, every MTA connection with it. A line that finds the queue full is lost and counted
        (handleError). A stream socket (a syslog without datagrams) stays blocking: a partial
        send would garble the stream."""
        # (SysLogHandler's own, also called by its emit to reconnect once after a failed send;
        # private, so typeshed does not declare it nor the socket it sets)
        getattr(super(), "_connect_unixsocket")(address)
        sock = getattr(self, "socket", None)
        if isinstance(sock, socket.socket) and sock.type == socket.SOCK_DGRAM:
            sock.setblocking(False)

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        lost = self.lost
        super().emit(record)  # (reconnects once if sending fails)
        if lost and self.lost == lost:  # this one got through: syslog is back
            self.lost = 0
            super().emit(_lost(lost, f"while {self.address} could not be reached"))

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):  # a bug in a call site or a formatter: as logging reports it
            super().handleError(record)
            return
        if not self.lost:
            why = ("it takes no more lines (its queue is full: is the syslog daemon stuck?)"
                   if isinstance(exc, BlockingIOError) else exc.strerror or exc)
            try:  # (stderr closed: sys.stderr is None, and the notice has nowhere to go)
                sys.stderr.write(f"pytclmilter: cannot log to {self.address}: {why}; log lines "
                                 "are lost (and counted) until it can be reached again\n")
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass
        self.lost += 1


_NO_FILE = "(unknown file)"  # the caller Logger._log gives a record when _srcfile is None
_NO_FUNC = "(unknown function)"  # ... and its function
_START = logging.LogRecord("", logging.INFO, _NO_FILE, 0, "", (), None)  # for relativeCreated


def _lost(count: int, when: str) -> logging.LogRecord:
    """The warning that follows lines a handler could not write (syslog, stderr) once it can."""
    return logging.LogRecord("pytclmilter", logging.WARNING, _NO_FILE, 0, "%d log lines were lost %s",
                             (count, when), None)


class LeanLogRecord(logging.LogRecord):
    """A LogRecord that sets its attributes straight: less than half the cost of the standard one.

    With no caller looked up, LogRecord.__init__ still derives a file and module name from
    "(unknown file)" with two os.path calls, looks for a mapping argument and reads logging's
    flags: a third of the cost of a verdict line. Those attributes are the same on every line
    of ours. Used only when ``fits()``: the standard record of this Python has exactly the
    attributes set here; a record with a caller, a mapping argument or no function name (which
    the standard record keeps as None; Logger gives "(unknown function)") is made the standard way.
    """

    def __init__(self, name: str, level: int, pathname: str, lineno: int, msg: object, args: Any,
                 exc_info: Any, func: str | None = None, sinfo: str | None = None, **kwargs: Any) -> None:
        if (pathname != _NO_FILE or func is None
                or (args and len(args) == 1 and isinstance(args[0], Mapping) and args[0])):
            super().__init__(name, level, pathname, lineno, msg, args, exc_info, func, sinfo, **kwargs)
            return
        created = time.time()
        self.name, self.msg, self.args = name, msg, args
        self.levelname, self.levelno = logging.getLevelName(level), level
        self.pathname = self.filename = self.module = _NO_FILE
        self.exc_info, self.exc_text, self.stack_info = exc_info, None, sinfo
        self.lineno, self.funcName = lineno, func
        self.created, self.msecs = created, int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - _START.created) * 1000 + _START.relativeCreated
        self.thread = self.threadName = self.processName = self.process = self.taskName = None

    @staticmethod
    def fits() -> bool:
        """This Python's records have the attributes set above (3.11: no taskName; set anyway), and
        the flags that would fill thread, process and task are off."""
        standard = set(vars(_START)) | {"taskName"}  # (the flags change values, not which attributes)
        lean = set(vars(LeanLogRecord("", logging.INFO, _NO_FILE, 0, "", (), None, _NO_FUNC)))
        flags = (logging.logThreads, logging.logMultiprocessing, logging.logProcesses,
                 getattr(logging, "logAsyncioTasks", False))
        return standard == lean and not any(flags)


class LineFormatter(logging.Formatter):
    """logging.Formatter with the date and time formatted once per second, not once per line,
    and the process id known rather than asked of the kernel for every line."""

    _second = -1
    _text = ""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._stderr_line = fmt == STDERR_FORMAT  # the line format() writes out itself

    def format(self, record: logging.LogRecord) -> str:
        if record.process is None:
            record.process = _pid
        if not self._stderr_line or record.exc_info or record.exc_text or record.stack_info:
            return logline.guard(super().format(record))  # (the prefix is printable: the same text)
        # The stderr line written out: Formatter.format's generic path (usesTime() scanning the
        # format, a %-format of the record's __dict__) is a third of the cost of a line.
        record.message = message = record.getMessage()
        if len(message) > logline.LONGEST or not message.isprintable():  # (inline: a call costs more)
            message = logline.guard(message)
        return self.stderr_line(record.created, record.msecs, record.process, record.levelname, message)

    def stderr_line(self, created: float, msecs: float, process: object, levelname: str, message: str) -> str:
        """STDERR_FORMAT filled in (for a record, or for a line that never became one: logline.info's
        direct path, whose arguments are escaped by its callers, so the message needs no guard)."""
        text = self._text if int(created) == self._second else self._date_time(created)  # (no call per line)
        return f"{text},{int(msecs):03d} pytclmilter[{process}] {levelname}: {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return (self.default_msec_format or "%s,%03d") % (self._date_time(record.created), record.msecs)

    def _date_time(self, created: float) -> str:
        """The date and time text of ``created``, formatted once per second."""
        if int(created) != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(created))
            self._second = int(created)
        return self._text


class CoalescingStreamHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes the info and debug lines of one event-loop iteration at once.

    Under load every connection's verdict line was a write system call of its own, a tenth of
    the filter's CPU. Here a line logged inside the running loop waits in memory until the
    loop's current batch of callbacks is done (``call_soon``), so a line is late by at most one
    iteration. A warning or error, a line from another thread or from outside the loop, a flush,
    a fork and logging.shutdown() write everything pending at once, in order: in writes of whole
    lines of at most PIPE_BUF bytes, so that another writer's line cannot land inside one of ours.
    """

    lock: threading.RLock  # made by Handler.__init__ (createLock), never None here

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        #: stderr when it is a socket (systemd's journal) or a pipe: written without waiting.
        self.nowait = NoWaitStderr.of(stream)
        self._retrying = False  # a _retry is scheduled
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on
        self._flush_thread = 0  # ... and the thread that runs it

    def handle(self, record: logging.LogRecord) -> Any:
        """Handler.handle without the call to filter() when there are no filters (one line a message)."""
        if self.filters:
            return super().handle(record)
        with self.lock:
            self.emit(record)
        return True

    def takes(self, logger: logging.Logger, level: int) -> bool:
        """logline's DirectSink: a record at ``level`` from ``logger`` would come to this handler
        and no other, meet no filter on its way, and be a LeanLogRecord written as the stderr
        line; so write_line() writes what logging would."""
        formatter = self.formatter
        if (self.filters or logger.filters or level < self.level or not logger.isEnabledFor(level)
                or not isinstance(formatter, LineFormatter) or not formatter._stderr_line
                or logging.getLogRecordFactory() is not LeanLogRecord):
            return False
        handlers = 0
        walk: logging.Logger | None = logger  # Logger.callHandlers' walk up the hierarchy
        while walk is not None:
            for handler in walk.handlers:
                if handler is not self:
                    return False
                handlers += 1
            walk = walk.parent if walk.propagate else None
        return handlers == 1

    def write_line(self, level: int, message: str) -> None:
        """The line of a record that takes() said would be written here, without making the record."""
        formatter = self.formatter
        assert isinstance(formatter, LineFormatter)  # takes() checked it
        created = time.time()
        line = formatter.stderr_line(
            created, int((created - int(created)) * 1000), _pid, logging.getLevelName(level), message)
        with self.lock:
            self._pending.append(line + self.terminator)
            if level >= logging.WARNING or not self._defer():
                self._write_pending()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            formatter = self.formatter  # (Handler.format is one call more, for its default formatter)
            line = formatter.format(record) if formatter is not None else self.format(record)
            self._pending.append(line + self.terminator)
        except Exception:  # noqa: BLE001 - as StreamHandler: report the broken record, go on
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or not self._defer():
            self._write_pending()

    def _defer(self) -> bool:
        """Let the line wait for the end of the loop's iteration; False outside a running loop."""
        scheduled = self._flush_on
        if scheduled is not None and self._flush_thread == threading.get_ident() and scheduled.is_running():
            return True  # the flush is due in this thread's running loop (get_running_loop costs a getpid)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if scheduled is not loop:  # (a loop that stopped before its flush ran is replaced)
            self._flush_on, self._flush_thread = loop, threading.get_ident()
            loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_on = None
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        data = "".join(self._pending)
        self._pending.clear()
        if self.nowait is not None:
            self._send(data)
            return
        try:
            self._write_stream(data)
        except (OSError, ValueError):  # stderr closed or gone: nothing better to do with the lines
            pass

    def _write_stream(self, data: str) -> None:
        """A terminal's or a file's: in writes of whole lines of at most OUTPUT_LINE bytes, long
        lines folded, as a pipe's (NoWaitStderr), when the stream's bytes can be had."""
        stream = self.stream
        binary = getattr(stream, "buffer", None)
        if binary is None or len(data) < logline.OUTPUT_FOLDED:
            stream.write(data)
            stream.flush()
            return
        stream.flush()
        lines = logline.folded_lines(data.encode(stream.encoding, stream.errors or "strict"))
        start = 0
        while start < len(lines):
            end = logline.write_end(lines, start)
            binary.write(lines[start:end])
            binary.flush()
            start = end

    def _send(self, data: str) -> None:
        """To stderr (NoWaitStderr), as far as it takes it now; then the count of lines it lost, once
        it has taken all it held back."""
        if self.nowait is None:
            return
        lost = self.nowait.send(data)
        if self.nowait.holding and not self._retrying:
            self._retry_soon()
        if lost and self.formatter is not None:
            notice = _lost(lost, "while stderr took no more (its reader was not reading)")
            self._pending.append(self.formatter.format(notice) + self.terminator)
            self._write_pending()

    def _retry_soon(self) -> None:
        """What stderr held back is written again shortly by the running loop, not only
        with the next line (none may come for a while); without a loop, with the next line."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._retrying = True
        loop.call_later(RETRY_EVERY, self._retry)

    def _retry(self) -> None:
        self.acquire()
        try:
            self._retrying = False
            self._send("")
        finally:
            self.release()

    def close(self) -> None:
        """At exit: what stderr holds back gets a few seconds to go."""
        self.acquire()
        try:
            self._write_pending()
            if self.nowait is not None:
                self.nowait.drain(5.0)
        finally:
            self.release()
        super().close()


#: What stderr may hold back while its reader takes no more (NoWaitStderr): beyond, lines are lost.
STDERR_BACKLOG = 1 << 20
#: Seconds between tries to write what stderr holds back.
RETRY_EVERY = 0.05


class NoWaitStderr:
    """stderr when it is a socket (systemd's stream to journald) or a pipe (a supervisor's, a
    log collector's): written without waiting, so that a reader that stops reading never holds
    the event loop (a blocking write held every MTA connection with it). What it does not take
    now waits, up to STDERR_BACKLOG; beyond, whole lines are lost and counted. The flag is per
    call (MSG_DONTWAIT, RWF_NOWAIT): the descriptor, shared with anything else writing to
    stderr, stays blocking. Where RWF_NOWAIT is refused (a named FIFO, a kernel before pipes took
    it), a file description of our own on the same pipe is opened non-blocking instead
    (:meth:`_reopened`). A terminal or a file is written as it always was."""

    def __init__(self, fd: int, is_socket: bool, encoding: str, errors: str) -> None:
        self._fd = fd
        self._sock = socket.socket(fileno=fd) if is_socket else None
        self._rwf_nowait = True  # (pipes: until a kernel refuses the flag)
        self._encoding, self._errors = encoding, errors
        self._backlog = b""
        self._lost = 0

    @classmethod
    def of(cls, stream: TextIO) -> "NoWaitStderr | None":
        try:
            fd = stream.fileno()
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)):
                return None
            own = os.dup(fd)  # (its own descriptor: closing it leaves stderr)
        except (OSError, ValueError, AttributeError):
            return None
        return cls(own, stat.S_ISSOCK(mode), getattr(stream, "encoding", None) or "utf-8",
                   getattr(stream, "errors", None) or "strict")

    @property
    def holding(self) -> bool:
        """Lines wait for the reader to take them."""
        return bool(self._backlog)

    def send(self, text: str) -> int:
        """Write what was held back and ``text``, as far as the reader takes them now; the
        number of lines lost, once all held back has gone (0 until then)."""
        data = self._backlog + logline.folded_lines(text.encode(self._encoding, self._errors))
        try:
            sent = self._write_lines(data)
        except OSError:  # the reader is gone: nothing better to do with the lines
            self._backlog = b""
            return 0
        self._backlog = self._bounded(data[sent:])
        if self._backlog or not self._lost:
            return 0
        lost, self._lost = self._lost, 0
        return lost

    def _write_lines(self, data: bytes) -> int:
        """Write ``data`` (folded lines) in writes of whole lines of at most OUTPUT_LINE bytes
        (logline.write_end), as far as the reader takes them now: the bytes written. One write
        of a whole batch could let another writer's line (a thread's `puts`, another --workers
        process's log) land inside one of ours, past PIPE_BUF."""
        sent = 0
        view = memoryview(data)
        while sent < len(data):
            end = logline.write_end(data, sent)
            try:
                done = self._write_now(view[sent:end])
            except BlockingIOError:
                break
            sent += done
            if sent < end:  # (a socket's partial send: the rest waits)
                break
        return sent

    def _write_now(self, data: bytes | memoryview) -> int:
        if self._sock is not None:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        if self._rwf_nowait:
            try:
                return os.pwritev(self._fd, [data], -1, os.RWF_NOWAIT)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._rwf_nowait = False
                self._fd = self._reopened()
        return os.write(self._fd, data)

    def _reopened(self) -> int:
        """Our descriptor of the pipe, made non-blocking through a file description of its own
        (opened anew through /proc: O_NONBLOCK on the shared one would change stderr for whoever
        else writes it); the one we have, blocking, when that cannot be had. Before, a named
        FIFO whose reader stopped held the milter after 64 KiB of log."""
        try:
            own = os.open(f"/proc/self/fd/{self._fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return self._fd
        os.close(self._fd)
        return own

    def _bounded(self, rest: bytes) -> bytes:
        """``rest`` cut to STDERR_BACKLOG at a line's end (a line begun on stderr is kept
        whole, or the stream would carry half a line); the lines cut off are counted."""
        if len(rest) <= STDERR_BACKLOG:
            return rest
        end = rest.rfind(b"\n", 0, STDERR_BACKLOG) + 1
        if end == 0:  # (one line longer than the bound: keep up to its end)
            end = rest.find(b"\n") + 1 or len(rest)
        self._lost += rest.count(b"\n", end)
        return rest[:end]

    def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the reader to take what was held back (at exit)."""
        deadline = time.monotonic() + seconds
        while self._backlog and time.monotonic() < deadline:
            select.select([], [self._fd], [], max(deadline - time.monotonic(), 0))
            self.send("")

    def forget(self) -> None:
        """In a forked child: the parent sends what it held back."""
        self._backlog = b""
        self._lost = 0
