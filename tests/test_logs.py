"""The log handler of the subcommands: lines of one event-loop iteration in one write, none lost."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
from collections.abc import Callable

import pytest

from pytclmilter import logline
from pytclmilter.commands.logs import STDERR_FORMAT, CoalescingStreamHandler, LeanLogRecord, LineFormatter


class Stream(io.StringIO):
    """stderr as the handler sees it, remembering each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def make_logger(name: str) -> tuple[logging.Logger, Stream, CoalescingStreamHandler]:
    stream = Stream()
    handler = CoalescingStreamHandler(stream)
    handler.setFormatter(LineFormatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger(f"test-logs.{name}")
    logger.handlers[:] = [handler]
    logger.filters[:] = []
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream, handler


def test_lines_of_one_loop_iteration_go_out_in_one_write_after_it() -> None:
    log, stream, _ = make_logger("batch")

    async def main() -> list[str]:
        log.info("verdict accept 1")
        log.info("verdict accept 2")
        seen_inside = list(stream.writes)
        await asyncio.sleep(0)  # the loop's next iteration: the flush has run
        return seen_inside

    inside = asyncio.run(main())
    assert inside == []
    assert stream.writes == ["INFO: verdict accept 1\nINFO: verdict accept 2\n"]


def test_a_warning_goes_out_at_once_after_the_lines_before_it() -> None:
    log, stream, _ = make_logger("warning")

    async def main() -> None:
        log.info("first")
        log.warning("trouble")
        assert stream.getvalue() == "INFO: first\nWARNING: trouble\n"
        log.info("after")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert stream.getvalue() == "INFO: first\nWARNING: trouble\nINFO: after\n"


def test_outside_a_running_loop_every_line_goes_out_at_once() -> None:
    log, stream, _ = make_logger("plain")
    log.info("starting")
    assert stream.writes == ["INFO: starting\n"]
    thread = threading.Thread(target=lambda: log.debug("from a thread"))
    thread.start()
    thread.join()
    assert stream.writes == ["INFO: starting\n", "DEBUG: from a thread\n"]


def test_lines_left_by_a_loop_that_stopped_are_written_by_the_next_loop_and_by_flush() -> None:
    log, stream, handler = make_logger("stopped")
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0))
        log_in_loop = loop.run_until_complete(_log_and_stop(log, loop))
    finally:
        loop.close()
    assert log_in_loop and stream.getvalue() == ""  # the loop stopped before its flush ran

    async def later() -> None:
        log.info("next loop")
        await asyncio.sleep(0)

    asyncio.run(later())  # a new loop schedules its own flush: nothing stays behind
    assert stream.getvalue() == "INFO: left behind\nINFO: next loop\n"
    log.info("outside")
    handler.flush()
    assert stream.getvalue().endswith("INFO: outside\n")


async def _log_and_stop(log: logging.Logger, loop: asyncio.AbstractEventLoop) -> bool:
    log.info("left behind")
    loop.stop()  # run_until_complete returns before the scheduled flush
    return True


def test_the_stderr_line_is_what_the_standard_formatter_writes() -> None:
    """LineFormatter writes the `run` format out by hand (cheaper per line); the text must be the
    standard Formatter's, character for character, and tracebacks still follow the line."""
    ours, standard = LineFormatter(STDERR_FORMAT), logging.Formatter(STDERR_FORMAT)
    standard.formatTime = ours.formatTime  # type: ignore[method-assign]  # the same clock text
    record = logging.LogRecord("pytclmilter", logging.INFO, "", 0, "%s: verdict %s at %s", ("conn#7", "reject", "rcpt"), None)
    record.process = 4242
    assert ours.format(record) == standard.format(record)
    assert ours.format(record).endswith(" pytclmilter[4242] INFO: conn#7: verdict reject at rcpt")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("pytclmilter", logging.ERROR, "", 0, "callback failed", (), sys.exc_info())
    failed.process = 4242
    text = ours.format(failed)
    assert text.startswith(standard.formatTime(failed)) and "ERROR: callback failed\nTraceback" in text
    assert text.rstrip().endswith("ValueError: boom")


def test_the_lean_record_is_the_standard_record_made_faster() -> None:
    """setup_logging's record factory: the same attributes and values as logging.LogRecord (the
    clock aside), and the standard record itself where a caller or a mapping argument is given."""
    from pytclmilter.commands.logs import setup_logging

    setup_logging("info")
    assert logging.getLogRecordFactory() is LeanLogRecord
    try:
        args = ("conn#3", "accept", "eom")
        lean = logging.getLogger("pytclmilter").makeRecord("pytclmilter", logging.INFO, "(unknown file)", 0,
                                                           "%s: verdict %s at %s", args, None)
        standard = logging.LogRecord("pytclmilter", logging.INFO, "(unknown file)", 0, "%s: verdict %s at %s",
                                     args, None)
        ours, theirs = vars(lean), vars(standard)
        clock = {"created", "msecs", "relativeCreated"}
        assert set(theirs) <= set(ours) <= set(theirs) | {"taskName"}
        assert {k: v for k, v in ours.items() if k in theirs and k not in clock} == \
               {k: v for k, v in theirs.items() if k not in clock}
        assert abs(lean.relativeCreated - standard.relativeCreated) < 1000  # ms since logging started
        assert lean.getMessage() == "conn#3: verdict accept at eom"
        mapped = LeanLogRecord("x", logging.INFO, "(unknown file)", 0, "%(a)s", ({"a": 1},), None)
        assert mapped.getMessage() == "1" and mapped.args == {"a": 1}
        located = LeanLogRecord("x", logging.INFO, "/srv/filter.py", 7, "m", (), None)
        assert (located.filename, located.module, located.lineno) == ("filter.py", "filter", 7)
    finally:
        logging.setLogRecordFactory(logging.LogRecord)
        logline.set_sink(None)


def test_a_handler_filter_still_decides() -> None:
    """The handler skips filter() only when it has no filters: one that drops lines still does."""
    log, stream, handler = make_logger("filtered")
    handler.addFilter(lambda record: "secret" not in record.getMessage())
    log.info("public")
    log.info("a secret")
    assert stream.getvalue() == "INFO: public\n"


@pytest.fixture
def run_logging(monkeypatch):  # type: ignore[no-untyped-def]
    """A logger set up as `pytclmilter run` sets up the root logger (stderr line, lean records,
    the handler as logline's sink), on a fixed clock; undone afterwards."""
    monkeypatch.setattr(time, "time", lambda: 1764676800.25)
    log, stream, handler = make_logger("direct")
    handler.setFormatter(LineFormatter(STDERR_FORMAT))
    logging.setLogRecordFactory(LeanLogRecord)
    logline.set_sink(handler)
    emitted: list[logging.LogRecord] = []
    emit = handler.emit
    handler.emit = lambda record: (emitted.append(record), emit(record))[-1]  # type: ignore[method-assign]
    yield log, stream, handler, emitted
    logline.set_sink(None)
    logging.setLogRecordFactory(logging.LogRecord)


def test_a_line_handed_straight_to_the_handler_is_the_line_logging_writes(run_logging) -> None:  # type: ignore[no-untyped-def]
    """logline.info makes no record when the handler is the line's only way out: the text is
    what the same call through logging writes, and it waits for the flush like any line."""
    log, stream, handler, emitted = run_logging
    log.handlers[:] = [handler]  # (pytest adds handlers of its own for each test phase)
    assert handler.takes(log, logging.INFO)
    logline.info(log, "%s: verdict %s at %s", "conn#1", "accept", "eom")
    assert not emitted  # no record was made or emitted
    handler.addFilter(lambda record: True)  # now logging's own path
    logline.info(log, "%s: verdict %s at %s", "conn#1", "accept", "eom")
    assert len(emitted) == 1
    direct, through_logging = stream.getvalue().splitlines()
    assert direct == through_logging
    assert direct.endswith(f",250 pytclmilter[{os.getpid()}] INFO: conn#1: verdict accept at eom")

    async def in_loop() -> list[str]:
        handler.filters.clear()
        logline.info(log, "waits")
        seen = list(stream.writes)
        await asyncio.sleep(0)
        return seen

    before = list(stream.writes)
    assert asyncio.run(in_loop()) == before and stream.getvalue().endswith(" INFO: waits\n")
    logline.info(log, "%s: %d", "not a number", "x")  # a bad format: logging's own report, no exception
    assert len(emitted) == 2


def _second_handler(log: logging.Logger) -> None:
    log.addHandler(logging.StreamHandler(io.StringIO()))


def _parent_handler(log: logging.Logger) -> None:
    log.propagate = True
    assert log.parent is not None
    log.parent.addHandler(logging.StreamHandler(io.StringIO()))


@pytest.mark.parametrize("change", [
    _second_handler,
    _parent_handler,
    lambda log: log.addFilter(lambda record: True),
    lambda log: log.setLevel(logging.WARNING),
    lambda log: log.handlers[0].setLevel(logging.WARNING),
    lambda log: log.handlers[0].setFormatter(LineFormatter("%(levelname)s %(message)s")),
    lambda log: logging.setLogRecordFactory(logging.LogRecord),
], ids=["second handler", "handler up the hierarchy", "logger filter", "logger level", "handler level",
        "other format", "other record factory"])
def test_a_line_goes_through_logging_when_anything_else_could_see_it(
        run_logging, change: Callable[[logging.Logger], None]) -> None:  # type: ignore[no-untyped-def]
    log, _, handler, emitted = run_logging
    log.handlers[:] = [handler]
    assert handler.takes(log, logging.INFO)
    parent = log.parent
    kept = list(parent.handlers) if parent is not None else []
    try:
        change(log)
        assert not handler.takes(log, logging.INFO)
        logline.info(log, "routed")
        assert len(emitted) == (1 if log.isEnabledFor(logging.INFO) and handler.level <= logging.INFO else 0)
    finally:
        if parent is not None:
            parent.handlers[:] = kept
