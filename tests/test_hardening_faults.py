"""Faults under real load through a private Postfix, scaled down from ``scripts/faults`` (5 000 messages).

500 messages over 32 SMTP sessions pass Postfix (``milter_default_action = tempfail``) and
``pytclmilter run`` of a script that adds ``X-Filtered: yes``, while the milter is stopped with
SIGTERM and restarted, killed with SIGKILL and restarted, or raises in 10 % of the messages.
Refused messages are sent again, as the sending MTA would. Every message must end up delivered
with the filter's header, queued for retry, or refused to the sender: none delivered unfiltered,
none missing. The counting lives in scripts/faults.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postfix

ROOT = Path(__file__).resolve().parents[1]


def load_faults():
    loader = importlib.machinery.SourceFileLoader("faults_script", str(ROOT / "scripts" / "faults"))
    spec = importlib.util.spec_from_loader("faults_script", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["faults_script"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


faults = load_faults()
MESSAGES = 500


@pytest.fixture(scope="module")
def shared_postfix(tmp_path_factory):
    from support.postfix import free_port, postfix_factory

    gen = postfix_factory(tmp_path_factory)
    make = next(gen)
    pf = make(milter=f"inet:127.0.0.1:{free_port()}", settings=faults.SETTINGS)
    yield pf
    try:
        next(gen)
    except StopIteration:
        pass


@pytest.mark.parametrize("scenario", ["term", "kill", "raise"])
def test_no_mail_lost_or_unfiltered_under_faults(shared_postfix, tmp_path, scenario, record_property):
    fig = faults.run_scenario(shared_postfix, scenario, MESSAGES, 32, 2, tmp_path)
    print(faults.report(fig))
    for key in ("faults_injected", "first_tempfailed", "retried", "delivered_filtered", "queued",
                "refused_final", "missing", "delivered_unfiltered", "load_seconds"):
        record_property(key, getattr(fig, key))
    assert fig.ok, faults.report(fig)
    assert fig.delivered_unfiltered == 0 and fig.missing == 0
    assert fig.delivered_filtered + fig.queued + fig.refused_final == MESSAGES
    if scenario in ("term", "kill"):
        assert fig.faults_injected >= 1 and fig.milter_starts == fig.faults_injected + 1
    if scenario == "kill":
        assert -9 in fig.exit_codes
    if scenario == "raise":
        assert fig.first_tempfailed == MESSAGES // 10  # seq % 30 in {3, 13, 23}
        assert fig.milter_errors_logged == MESSAGES // 10
    for f in shared_postfix.sink_dir.rglob("*"):
        if f.is_file():
            f.unlink()
