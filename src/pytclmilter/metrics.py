"""``--metrics``: what meter.py counts, served to Prometheus over HTTP by prometheus_client.

The engine counts into a list of integers (meter.py). In one process the exporter reads that
list when scraped. With ``--workers`` the supervisor makes an anonymous shared mapping before it
forks (:class:`Block`, a slot of 64-bit cells per worker); each worker copies its list into its
slot once a second (:data:`PUBLISH_EVERY`) and when it stops, and the supervisor's endpoint sums
the slots. This rather than prometheus_client's multiprocess mode: that mode writes a file per
process under a directory that must exist before the first import (made as root, handed to the
user we drop to, cleaned at stop) and takes a lock, a ``getpid()`` and a write to a mapped file
per count; here a count is a list item incremented, there is no file, and the mapping goes away
with the processes. The price: a scrape may be a second behind the workers, and a worker killed
outright loses at most its last second of counts. A worker that dies is *retired*: the
supervisor adds its counters to a running total before its slot is cleared for the
replacement, and forgets its gauge (its connections are gone).

The HTTP side is bounded: one thread accepts, at most :data:`MAX_SCRAPES` threads answer, a
scrape has :data:`SCRAPE_TIMEOUT` seconds in all to send its request and read the answer (then
its connection is shut down: a client that trickles a byte now and then cannot hold a slot),
and a connection beyond that is closed at once (with a warning at most once a minute). When
``accept()`` fails for want of descriptors (the MTA's connections took them all), the thread waits
:data:`ACCEPT_RETRY` seconds before it tries again, with a warning at most once a minute: the
waiting scrape keeps the socket readable, and socketserver alone tried again at once, for ever, a
core's worth of CPU taken from the event loop, silently. It runs apart from the event loop, which
it never blocks; rendering takes the GIL for about a millisecond.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import mmap
import os
import socket
import sys
import threading
from http import HTTPStatus
from socketserver import TCPServer, ThreadingMixIn
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import quote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector as _CollectorBase

from . import meter as m
from .accept import limit_text
from .callbacks import EVENTS
from .connspec import ConnSpec, ConnSpecError, parse_metrics
from .inetaddr import sockaddr
from .shared import Stats
from .logline import escape
from .repeats import Repeated, tell_counts

log = logging.getLogger("pytclmilter")

MAX_SCRAPES = 4
PUBLISH_EVERY = 1.0  # seconds between a worker's copies of its counts into shared memory
SCRAPE_TIMEOUT = 10.0
ACCEPT_RETRY = 0.5  # seconds before accepting again after accept() found no descriptor or memory
_WARN_EVERY = 60.0
#: accept() failing for want of a resource of the process or the system, not because of the client.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_GAUGES = frozenset({m.OPEN})


class Block:
    """The cells of ``slots`` processes in one shared mapping, and what dead workers counted."""

    def __init__(self, slots: int) -> None:
        # An anonymous mapping is MAP_SHARED: a forked worker writes the very pages we read.
        self._map = mmap.mmap(-1, slots * m.CELLS * 8)
        self._view = memoryview(self._map).cast("q")
        self.slots = slots
        self._retired = [0] * m.CELLS
        self._lock = threading.Lock()

    def cells(self, slot: int) -> memoryview:
        return self._view[slot * m.CELLS:(slot + 1) * m.CELLS]

    def publish(self, slot: int, counts: list[int]) -> None:
        """A worker's counts into its slot (one copy in C: the supervisor reads them from there)."""
        self.cells(slot)[:] = array.array("q", counts)

    def retire(self, slot: int) -> None:
        """The worker of ``slot`` is gone: keep its counts, drop its gauges, clear the slot."""
        cells = self.cells(slot)
        with self._lock:
            for i in range(m.CELLS):
                if i not in _GAUGES:
                    self._retired[i] += cells[i]
                cells[i] = 0

    def totals(self) -> list[int]:
        with self._lock:
            out = list(self._retired)
            for slot in range(self.slots):
                for i, value in enumerate(self.cells(slot)):
                    out[i] += value
        return out


async def publishing(publish: Callable[[], None]) -> None:
    """In a worker: its counts into shared memory every PUBLISH_EVERY seconds (until cancelled)."""
    while True:
        await asyncio.sleep(PUBLISH_EVERY)
        publish()


class Collector(_CollectorBase):
    """prometheus_client's custom collector: the families, built from the cells when scraped."""

    def __init__(self, totals: Callable[[], list[int]], stats: Stats, workers_alive: Callable[[], int]) -> None:
        self.totals = totals
        self.stats = stats
        self.workers_alive = workers_alive

    def describe(self) -> list[Metric]:
        """The families this collector gives: a scrape that names some (`?name[]=...`) is
        answered from them (without it, and with auto_describe off, such a scrape got none)."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        t = self.totals()
        yield from _connections(t)
        yield CounterMetricFamily("pytclmilter_protocol_errors", "Connections closed because the MTA broke "
                                  "the milter protocol (a garbled, oversize or out-of-order packet)",
                                  value=t[m.PROTOCOL_ERRORS])
        yield _labelled(CounterMetricFamily("pytclmilter_verdicts", "Verdicts given, as the verdict log lines "
                                            "count them: one per message, and one per recipient or connection "
                                            "refused; dry_run=\"true\": would have been given (--dry-run)",
                                            labels=["verdict", "stage", "dry_run"]),
                        ((v, s, _bool(d)) for v in m.VERDICTS for s in m.STAGES for d in (False, True)),
                        t[m.MESSAGES:m.ERRORS])
        yield _labelled(CounterMetricFamily("pytclmilter_modifications", "Modifications sent at end of "
                                            "message; dry_run=\"true\": would have been sent (--dry-run)",
                                            labels=["action", "dry_run"]),
                        ((a, _bool(d)) for a in m.ACTIONS for d in (False, True)), t[m.MODIFICATIONS:m.CELLS])
        yield from _callbacks(t)
        stats = self.stats
        reloads = CounterMetricFamily("pytclmilter_reloads", "Script reloads, by result", labels=["result"])
        reloads.add_metric(["ok"], stats.reloads_ok)
        reloads.add_metric(["failed"], stats.reloads_failed)
        reloads.add_metric(["abandoned"], stats.reloads_abandoned)
        yield reloads
        yield GaugeMetricFamily("pytclmilter_generation", "Generation of the script serving new connections "
                                "(1 at start, one more at each reload)", value=stats.generation)
        yield GaugeMetricFamily("pytclmilter_workers_alive", "Processes serving connections",
                                value=self.workers_alive())


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


def _labelled(family: Any, labels: Iterable[tuple[str, ...]], values: list[int]) -> Any:
    """A labelled series appears from its first count on (most combinations never happen)."""
    for label, value in zip(labels, values):
        if value:
            family.add_metric(list(label), value)
    return family


def _connections(t: list[int]) -> Iterator[Metric]:
    yield GaugeMetricFamily("pytclmilter_connections_open", "MTA connections open now", value=t[m.OPEN])
    yield CounterMetricFamily("pytclmilter_connections", "MTA connections accepted", value=t[m.TOTAL])
    yield CounterMetricFamily("pytclmilter_connections_refused", "MTA connections closed at once, unanswered, "
                              "at the connection limit (--max-connections)", value=t[m.REFUSED])
    yield _labelled(CounterMetricFamily("pytclmilter_connections_closed", "MTA connections closed, by reason "
                                        "(eof and quit: the MTA ended the session)", labels=["reason"]),
                    ((r,) for r in m.REASONS), t[m.CLOSED:m.MESSAGES])


def _callbacks(t: list[int]) -> Iterator[Metric]:
    pairs = [(e, lang) for e in EVENTS for lang in m.LANGUAGES]
    hist = HistogramMetricFamily("pytclmilter_callback_duration_seconds", "Time callbacks took, by event and "
                                 "language (failed ones included)", labels=["event", "language"])
    for p, (event, lang) in enumerate(pairs):
        counts = t[m.BUCKETS + p * (len(m.BOUNDS) + 1):m.BUCKETS + (p + 1) * (len(m.BOUNDS) + 1)]
        if not any(counts):
            continue
        buckets, running = [], 0
        for bound, n in zip([*(repr(b) for b in m.BOUNDS), "+Inf"], counts):
            running += n
            buckets.append((bound, running))
        hist.add_metric([event, lang], buckets, t[m.SUMS + p] / 1e9)
    yield hist
    yield _labelled(CounterMetricFamily("pytclmilter_callback_errors", "Callbacks that failed (an error, or "
                                        "stopped by the time limit), answered with -onerror",
                                        labels=["event", "language"]), pairs, t[m.ERRORS:m.OVERRUNS])
    yield _labelled(CounterMetricFamily("pytclmilter_callback_time_limit_overruns", "Callbacks that ran past "
                                        "the time limit (-calltimeout): stopped by it, or back late from code "
                                        "it cannot stop", labels=["event", "language"]),
                    pairs, t[m.OVERRUNS:m.SUMS])


# ------------------------------------------------------------------ HTTP


class _Handler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT  # for reading the request and writing the answer
    raw_requestline: bytes  # (read by handle() before parse_request; typeshed leaves it out)

    def parse_request(self) -> bool:
        """A request line without a version (``GET /metrics``, HTTP/0.9) has no headers, but
        http.server read on for them until SCRAPE_TIMEOUT cut the connection: 10 s and no
        answer. Refused at once, with a status line a person trying with nc can read."""
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(line.split()) == 2:
            self.command, self.requestline, self.request_version, self.close_connection = "", line, "HTTP/1.0", True
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                            explain="Send HTTP/1.0 or later: GET /metrics HTTP/1.0")
            return False
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is not worth a log line."""


class _Server(ThreadingMixIn, WSGIServer):
    """At most MAX_SCRAPES requests at once; more are closed at once, with a warning now and then."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, spec: ConnSpec) -> None:
        self.address_family = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
        self._free = threading.BoundedSemaphore(MAX_SCRAPES)
        self._refused = Repeated(_WARN_EVERY, tell=_refused_told)  # scrapes past the slots
        self._exhausted = Repeated(_WARN_EVERY, tell=_exhausted_told)  # accepts that failed for want of descriptors
        self._failed = Repeated(_WARN_EVERY, tell=_failed_told)  # scrapes whose handler raised, by the exception's type
        self._pause = threading.Event().wait  # (a test counts the waits)
        #: The scrapes' connections from accept to close: a worker forked meanwhile closes its
        #: copies (Exporter.forget). A set's add and discard are atomic: no lock a fork could strand.
        self.scrapes: set[socket.socket] = set()
        # (4-tuple for IPv6: a link-local address's interface, fe80::1%eth0, kept: listener.py's bind)
        super().__init__(sockaddr(self.address_family, spec.host or "", spec.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's name (getfqdn): not needed, and slow when DNS is.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()

    def get_request(self) -> tuple[socket.socket, Any]:
        """socketserver returns quietly when this raises, and its loop calls again at once while
        the scrape waits in the queue: out of descriptors, wait a little and say so once a minute."""
        try:
            request, client = super().get_request()
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                self._cannot_accept(exc)
            raise
        self.scrapes.add(request)
        return request, client

    def close_request(self, request: Any) -> None:
        """(socketserver's one close of every request get_request gave, served or refused)"""
        super().close_request(request)
        self.scrapes.discard(request)

    def service_actions(self) -> None:
        """Each turn of serve_forever (every poll_interval): the counts of failures not logged one
        by one whose minute is over, here or elsewhere in the process; in a --workers
        supervisor nothing else ticks (repeats.tell_counts)."""
        tell_counts()

    def _cannot_accept(self, exc: OSError) -> None:
        missed = self._exhausted.due("accept")
        if missed is not None:
            since = f"; {missed} failed accepts since the last warning" if missed else ""
            log.warning("metrics: cannot accept a scrape: %s (open-files limit %s)%s; trying again every %g s "
                        "(warned at most once a minute)", exc.strerror or exc, limit_text(), since, ACCEPT_RETRY)
        self._pause(ACCEPT_RETRY)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._free.acquire(blocking=False):
            self._refuse()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._free.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(SCRAPE_TIMEOUT, _cut, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._free.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver printed a traceback on stderr for every scrape that failed, outside the
        log: a port scanner or a client that resets (or is cut at SCRAPE_TIMEOUT) made 20 lines
        each. A client gone is not the filter's failure: nothing; anything else, one warning a
        minute (the place is the exception's type: its text may quote the client)."""
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, OSError):
            self.scrape_failed(str(client_address[0]), exc)

    def scrape_failed(self, client: str, exc: BaseException) -> None:
        """A scrape that failed, from ``client``: one warning a minute, by the exception's type."""
        missed = self._failed.due(type(exc).__name__)
        if missed is not None:
            since = f"; {missed} more since the last warning" if missed else ""
            log.warning("metrics: a scrape from %s failed: %s: %s%s (warned at most once a minute)",
                        client, type(exc).__name__, escape(str(exc)), since)

    def _refuse(self) -> None:
        missed = self._refused.due("")
        if missed is not None:
            _refused_told(self._refused, "", missed + 1)


def _refused_told(_refused: Repeated, _label: str, count: int) -> None:
    log.warning("metrics: %d scrapes at once already; %d connection(s) closed unanswered "
                "(warned at most once a minute)", MAX_SCRAPES, count)


def _exhausted_told(_exhausted: Repeated, _label: str, count: int) -> None:
    log.warning("metrics: %d more failed accepts of a scrape since the last warning (warned at most once a minute)",
                count)


def _failed_told(_failed: Repeated, name: str, count: int) -> None:
    log.warning("metrics: %d more scrapes failed with %s since the last warning (warned at most once a minute)",
                count, name)


def _cut(request: socket.socket) -> None:
    """A scrape's time is up: end its connection (the handler's read or write returns)."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed meanwhile: the scrape was done


def _url(host: str, port: int) -> str:
    """The endpoint's URL; an IPv6 zone (``fe80::1%eth0``, which getsockname leaves out) written
    as RFC 6874 has it, ``[fe80::1%25eth0]``: a bare ``%`` makes the URL invalid."""
    addr, percent, zone = host.partition("%")
    if ":" in addr:
        addr = f"[{addr}%25{quote(zone, safe='')}]" if percent else f"[{addr}]"
    return f"http://{addr}:{port}/metrics"


def _app(registry: CollectorRegistry, failed: Callable[[str, BaseException], None]) -> Callable[..., Iterable[bytes]]:
    """The WSGI app. What prometheus_client raises (``Accept: application/openmetrics-text;
    version=abc`` makes it compare a str with an int) wsgiref caught itself and printed as a
    traceback on stderr, outside the log and its once-a-minute limit, for each such request:
    ``failed`` (the server's warning) and a 500 instead."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"the metrics are at /metrics\n"]
        try:
            result: Iterable[bytes] = metrics(environ, start_response)
        except Exception as exc:
            failed(str(environ.get("REMOTE_ADDR", "-")), exc)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")],
                           sys.exc_info())
            return [b"the metrics could not be served for this request (the filter's log says why)\n"]
        return result

    return app


class Exporter:
    """Serves the counts ``totals()`` gives at http://HOST:PORT/metrics from a thread of its own."""

    def __init__(self, text: str, totals: Callable[[], list[int]], stats: Stats,
                 workers_alive: Callable[[], int]) -> None:
        spec = parse_metrics(text)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(totals, stats, workers_alive))
        try:
            self._server = _Server(spec)
        except OSError as exc:
            raise ConnSpecError(f'metrics "{escape(text)}": cannot listen: {exc.strerror or exc}') from None
        self._server.set_app(_app(registry, self._server.scrape_failed))
        self.url = _url(spec.host or "", self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics at %s", self.url)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        tell_counts(ended_only=False)  # (a --workers supervisor's own: its workers tell theirs)

    def forget(self) -> None:
        """In a forked worker: close this process's copies of the listening socket and of the
        scrapes' connections (no thread serves them here; each copy lived as long as the worker),
        those the fork came too early to find recorded too (:func:`_close_unrecorded`).
        A scrape's socket is detached before its descriptor is closed: were the object freed
        later, it must not close that number again, which may be another file's by then."""
        self._server.socket.close()
        for request in self._server.scrapes:
            fd = request.detach()  # (-1: closed in the supervisor before the fork)
            if fd >= 0:
                os.close(fd)
        self._server.scrapes.clear()
        _close_unrecorded(self._server.address_family, self._server.server_address)


def _close_unrecorded(family: int, listening: tuple[Any, ...]) -> None:
    """In a forked worker: close the scrapes' connections no list names. The metrics thread
    records one (_Server.scrapes) only once accept() has returned it, and a fork may come in
    between (the descriptor made, the thread waiting for the GIL). Such a one is a connected
    TCP socket whose own address is the metrics listener's (its port; its host too unless that
    listens on every address): no other socket can have that as its own, the kernel gives no
    listening port to an outgoing connection, and another listener on it is not connected. Its
    descriptor is closed without an object that could close that number again later."""
    host, port = str(listening[0]), int(listening[1])
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # (no /proc: what was recorded was closed all the same)
        return
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)  # (fails for what is no socket, and the listing's own, closed)
        except OSError:
            continue
        try:
            ours = sock.family == family and sock.type == socket.SOCK_STREAM and _accepted_at(sock, host, port)
        except OSError:
            ours = False
        finally:
            sock.detach()
        if ours:
            os.close(fd)


def _accepted_at(sock: socket.socket, host: str, port: int) -> bool:
    """A connected TCP socket whose own address is ``host`` (unless every address) and ``port``."""
    own_host, own_port = sock.getsockname()[:2]
    return (own_port == port and host in (own_host, "0.0.0.0", "::")
            and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
