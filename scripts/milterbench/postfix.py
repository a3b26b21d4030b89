"""postfix mode: smtp-source -> one private Postfix (+ milter) -> smtp-sink, beside Postfix alone.

The private Postfix is the test suite's harness (tests/support/postfix.py) with one smtpd listener
per filter and one without a milter, all relaying to a sink that keeps nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from milterbench import BUILD, ROOT, say, warn
from milterbench.load import body_text
from milterbench.measure import OTHER_LOAD_WARN, box_busy, children_cpu, other_load_pct, proc_cpu, \
    set_quiet_budget, wait_quiet
from milterbench.message import HEADERS
from milterbench.report import TARGET_POSTFIX_RATIO, TARGET_POSTFIX_VS_NULL, machine_info, print_info, save_results
from milterbench.rigs import Filter, filters_cpu, make_filters

sys.path.insert(0, str(ROOT / "tests"))  # the harness is the test suite's, as scripts/faults uses it
from support import postfix as harness  # noqa: E402

# 10 headers: Postfix adds its Received: header but does not show it to milters.
SMTP_HEADERS = [*HEADERS, ("X-Mailer", "pytclmilter bench"), ("Reply-To", "<sender@client.bench.test>")]


def message_file(body: int) -> Path:
    """The message smtp-source sends (-F): 10 headers and a text body of about ``body`` bytes."""
    path = BUILD / f"message-{body}.txt"
    lines = [f"{k}: {v}" for k, v in SMTP_HEADERS] + [""]
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    size = 0
    i = 0
    while size < body:
        line = "".join(alphabet[(i + k) % 36] for k in range(76))
        lines.append(line)
        size += 78
        i += 1
    BUILD.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class BenchPostfix(harness.PrivatePostfix):
    """The test harness's instance, plus one smtpd listener per milter, and a sink that keeps nothing.

    services: name -> smtpd_milters value ("" for none). The harness's own smtpd
    (self.smtpd_port, no milter) is not used.
    """

    def __init__(self, services: dict[str, str]) -> None:
        settings = {
            # smtp-source sends many sessions from one client address.
            "smtpd_client_connection_count_limit": 0,
            "smtpd_client_connection_rate_limit": 0,
            "smtpd_client_message_rate_limit": 0,
            "default_process_limit": 200,
            # Verification: cleanup-check logs the header the milter added.
            "milter_command_timeout": "30s",
        }
        super().__init__(None, settings)
        self.services = services
        self.ports: dict[str, int] = {}
        self.check_ports: dict[str, int] = {}

    def _write_config(self) -> None:
        super()._write_config()
        checks = self.config_dir / "bench_header_checks"
        checks.write_text("/^X-Bench: 1$/ WARN bench-header-seen\n")
        lines = [
            "cleanup-check unix n - n - 0 cleanup"
            f" -o milter_header_checks=regexp:{checks} -o syslog_name=postfix/check"
        ]
        used = {self.smtpd_port, self.sink_port}
        for name, milters in self.services.items():
            for table_, extra in ((self.ports, ""), (self.check_ports, " -o cleanup_service_name=cleanup-check")):
                port = harness.free_port()
                while port in used:
                    port = harness.free_port()
                used.add(port)
                table_[name] = port
                lines.append(f"127.0.0.1:{port} inet n - n - - smtpd -o smtpd_milters={milters}"
                             f" -o syslog_name=postfix/{name}{extra}")
        with open(self.config_dir / "master.cf", "a") as f:
            f.write("\n".join(lines) + "\n")
        past = time.time() - 60
        os.utime(self.config_dir / "master.cf", (past, past))

    def _start_sink(self) -> None:
        # The harness's sink dumps every message to a file; here nothing is kept.
        log = open(self.root / "sink.log", "ab")
        try:
            self._sink = subprocess.Popen(
                [harness.SMTP_SINK, "-4", "-u", harness.MAIL_OWNER, "-h", "sink.test",
                 f"{harness.LOCALHOST}:{self.sink_port}", "256"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        finally:
            log.close()
        harness.wait_until(lambda: harness._tcp_listening(harness.LOCALHOST, self.sink_port), 10,
                           message="smtp-sink did not start listening")

    def cpu(self) -> float:
        """CPU seconds of this instance: the master and everything under it, and the sink."""
        total = 0.0
        if self._master_pid is not None:
            total += proc_cpu(self._master_pid)
        if self._sink is not None:
            total += proc_cpu(self._sink.pid)
        return total

    def queued(self) -> int:
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            d = self.queue_dir / sub
            if d.is_dir():
                n += sum(len(files) for _, _, files in os.walk(d))
        return n

    def wait_drained(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queued() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.queued():
            warn(f"the queue did not drain in {timeout:g}s ({self.queued()} files left)")


def smtp_source(port: int, messages: int, sessions: int, msgfile: Path, timeout: float = 600) -> tuple[float, str]:
    """Send with Postfix's smtp-source; the seconds it took and its failure ("" if none)."""
    cmd = ["/usr/sbin/smtp-source", "-4", "-s", str(sessions), "-m", str(messages), "-r", "2", "-F", str(msgfile),
           "-f", "sender@client.bench.test", "-t", "rcpt+@sink.bench.test", "-M", "client.bench.test",
           f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    problem = "" if proc.returncode == 0 else f"smtp-source exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
    return elapsed, problem


@dataclass
class PostfixRun:
    config: str
    rounds: list[float] = field(default_factory=list)  # messages/s per round
    cpu_us: list[float] = field(default_factory=list)
    other_pct: list[float] = field(default_factory=list)
    postfix_us: list[float] = field(default_factory=list)  # Postfix + smtp-source + smtp-sink CPU per message
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.mean(self.rounds) if self.rounds else 0.0


def warm_up(pf: BenchPostfix, filters: list[Filter], runs: dict[str, PostfixRun], sessions: int,
            msgfile: Path) -> None:
    """Start smtpd processes and milter connections, and check that each filter's X-Bench arrives."""
    for name in runs:
        _, problem = smtp_source(pf.ports[name], 2 * sessions, sessions, msgfile)
        if problem:
            runs[name].problems.append(f"warm-up: {problem}")
    for i, f in enumerate(filters):
        _, problem = smtp_source(pf.check_ports[f.name], 10, 2, msgfile)
        want = 10 * (i + 1)  # the checks run one filter after the other
        try:
            harness.wait_until(lambda: pf.log_text().count("bench-header-seen") >= want, 15,
                               message="X-Bench not seen")
        except TimeoutError:
            runs[f.name].problems.append("X-Bench: 1 did not reach Postfix (milter_header_checks)")
        if problem:
            runs[f.name].problems.append(f"check: {problem}")
    pf.wait_drained()


def measure(pf: BenchPostfix, filters: list[Filter], run: PostfixRun, messages: int, sessions: int,
            msgfile: Path, r: int) -> None:
    """One round of one config, appended to ``run`` and printed as a line."""
    flt = next((f for f in filters if f.name == run.config), None)
    pf0 = pf.cpu() + children_cpu()
    ours0 = filters_cpu(filters) + pf0
    box0, t0 = box_busy(), time.monotonic()
    cpu0 = flt.cpu() if flt else 0.0
    elapsed, problem = smtp_source(pf.ports[run.config], messages, sessions, msgfile)
    cpu1 = flt.cpu() if flt else 0.0
    box1, t1 = box_busy(), time.monotonic()
    ours1 = filters_cpu(filters) + pf.cpu() + children_cpu()
    other = other_load_pct(box1 - box0, ours1 - ours0, t1 - t0)
    run.other_pct.append(other)
    rate = messages / elapsed
    run.rounds.append(rate)
    if flt:
        run.cpu_us.append((cpu1 - cpu0) / messages * 1e6)
    if problem:
        run.problems.append(problem)
    pf.wait_drained()  # delivery to the sink is part of Postfix's cost per message
    pf_us = (pf.cpu() + children_cpu() - pf0) / messages * 1e6
    run.postfix_us.append(pf_us)
    cpu_text = f"{(cpu1 - cpu0) / messages * 1e6:17.0f}" if flt else f"{'-':>17}"
    busy = "  machine busy with other work: rerun" if other > OTHER_LOAD_WARN else ""
    say(f"{r + 1:5d} {run.config:10} {rate:8.0f} {cpu_text} {pf_us:18.0f} {other:6.0f}"
        f"{'  ' + problem if problem else ''}{busy}")


def cmd_postfix(opts: argparse.Namespace) -> int:
    if not os.access("/usr/sbin/smtp-source", os.X_OK):
        harness.ensure_postfix_installed()
    messages = opts.messages or (600 if opts.quick else 3000)
    rounds = opts.rounds or (1 if opts.quick else 2)
    set_quiet_budget(10.0 if opts.quick else 60.0)
    info = machine_info()
    say("pytclmilter benchmark: postfix mode")
    print_info(info)
    say(f"  load:         smtp-source -s {opts.sessions} -m {messages} -r 2, {body_text(opts.body)} body,"
        f" {rounds} round(s); one Postfix instance, one smtpd listener per milter; filter log level"
        f" {opts.log_level}")
    filters = make_filters(opts.filters.split(","), opts.log_level, False)
    services = {"none": ""} | {f.name: f"inet:127.0.0.1:{f.port}" for f in filters}
    runs = {name: PostfixRun(name) for name in services}
    msgfile = message_file(opts.body)
    pf = BenchPostfix(services)
    try:
        for f in filters:
            f.start()
        pf.start()
        say(f"  postfix:      {pf.root}")
        warm_up(pf, filters, runs, opts.sessions, msgfile)
        order = list(services)
        say("")
        say(f"{'round':>5} {'config':10} {'msgs/s':>8} {'milter CPU us/msg':>17} {'Postfix CPU us/msg':>18}"
            f" {'other%':>6}")
        for r in range(rounds):
            for name in order if r % 2 == 0 else reversed(order):
                wait_quiet(OTHER_LOAD_WARN, 3 if opts.quick else 10, lambda: filters_cpu(filters))
                measure(pf, filters, runs[name], messages, opts.sessions, msgfile, r)
        milter_warnings = [line for line in pf.log_text().splitlines()
                           if "milter" in line and ("warning" in line or "reject" in line)
                           and "bench-header-seen" not in line]
    finally:
        with contextlib.suppress(Exception):
            pf.close()
        for f in filters:
            f.stop()
    report(runs, milter_warnings)
    payload = {"info": info, "options": vars(opts), "messages": messages,
               "runs": {k: asdict(v) | {"rate": v.rate} for k, v in runs.items()}}
    save_results("postfix", payload, opts.json)
    return 1 if any(r.problems for r in runs.values()) or milter_warnings else 0


def report(runs: dict[str, PostfixRun], milter_warnings: list[str]) -> None:
    """The results table (means over the rounds, ratio to Postfix without a milter and to Postfix with
    the null milter) and the targets."""
    base = runs["none"].rate
    null = runs["null"].rate if "null" in runs else 0.0
    say("")
    say("Results (mean over rounds)")
    say(f"{'config':10} {'msgs/s':>8} {'ratio':>6} {'x null':>6} {'milter CPU us/msg':>17} {'Postfix CPU us/msg':>18}"
        f" {'other%':>6}  notes")
    for name, run in runs.items():
        ratio = run.rate / base if base else 0.0
        cpu = f"{statistics.mean(run.cpu_us):17.0f}" if run.cpu_us else f"{'-':>17}"
        pfu = f"{statistics.mean(run.postfix_us):18.0f}" if run.postfix_us else f"{'-':>18}"
        oth = f"{max(run.other_pct):6.0f}" if run.other_pct else f"{'-':>6}"
        notes = run.problems[:2] + (["machine busy with other work: rerun"]
                                    if run.other_pct and max(run.other_pct) > OTHER_LOAD_WARN else [])
        vs_null = f"{run.rate / null:6.2f}" if null else f"{'-':>6}"
        say(f"{name:10} {run.rate:8.0f} {ratio:6.2f} {vs_null} {cpu} {pfu} {oth}  {'; '.join(notes)}")
    if milter_warnings:
        say(f"\nPostfix logged {len(milter_warnings)} milter warning(s), e.g.:")
        for line in milter_warnings[:5]:
            say(f"  {line}")
    say("")
    say("Targets")
    for name in ("tcl", "python"):
        if name in runs and base:
            ratio = runs[name].rate / base
            say(f"  {name} through Postfix: {ratio:.0%} of Postfix without a milter (target >= "
                f"{TARGET_POSTFIX_RATIO:.0%}): {'MET' if ratio >= TARGET_POSTFIX_RATIO else 'MISSED'}")
        if name in runs and null:
            ratio = runs[name].rate / null
            say(f"  {name} through Postfix: {ratio:.2f} x Postfix with the null milter (target >= "
                f"{TARGET_POSTFIX_VS_NULL:g}x): {'MET' if ratio >= TARGET_POSTFIX_VS_NULL else 'MISSED'}")
