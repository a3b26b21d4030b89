#!/usr/bin/env python3
"""The benchmark workload of scripts/bench as a pymilter (libmilter-based) filter.

Registers connect, envfrom, envrcpt, header and eom; every callback answers
CONTINUE and eom adds "X-Bench: 1". As in pytclmilter's negotiation, the
header callback asks for no reply (@Milter.noreply -> SMFIP_NR_HDR) and
callbacks that are not overridden are skipped (SMFIP_NO*).

    scripts/bench_pymilter.py inet:8899@127.0.0.1 [--body]
"""

from __future__ import annotations

import argparse
import sys

import Milter


class Bench(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        return Milter.CONTINUE

    def eom(self):
        self.addheader("X-Bench", "1")
        return Milter.CONTINUE


class BenchBody(Bench):
    def body(self, chunk):
        return Milter.CONTINUE


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("connection", nargs="?", default="inet:8899@127.0.0.1")
    p.add_argument("--body", action="store_true", help="also register a body callback")
    opts = p.parse_args()
    Milter.factory = BenchBody if opts.body else Bench
    Milter.set_flags(Milter.ADDHDRS)
    print(f"bench_pymilter: listening on {opts.connection}", flush=True)
    Milter.runmilter("BenchPymilter", opts.connection, timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
