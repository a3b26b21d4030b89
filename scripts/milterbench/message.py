"""The benchmark message's headers, shared by the ones that send it.

scripts/loadgen.c sends them (its header table, in C) after a Received header, with X-Mailer
"pytclmilter loadgen"; scripts/bench_inproc.py feeds the same to the engine in process; postfix
mode's smtp-source message has them too. Postfix does not show its own Received header to milters.
"""

from __future__ import annotations

HEADERS = [
    ("From", "Bench Sender <sender@client.bench.test>"),
    ("To", "<rcpt1@sink.bench.test>, <rcpt2@sink.bench.test>"),
    ("Subject", "milter benchmark message"),
    ("Date", "Tue, 25 Nov 2025 12:00:00 +0000"),
    ("Message-ID", "<bench.0001@client.bench.test>"),
    ("MIME-Version", "1.0"),
    ("Content-Type", "text/plain; charset=us-ascii"),
    ("Content-Transfer-Encoding", "7bit"),
]
