"""Shared fixtures. Helpers for each area live in tests/support/."""

from __future__ import annotations

import gc
from typing import Any, Iterator

import pytest

from support.postfix import postfix_factory

postfix = pytest.fixture(postfix_factory, name="postfix")


@pytest.fixture
def tcl_host() -> Iterator[Any]:
    """A TclHost in this process, closed and freed on this thread when the test ends. Left as
    garbage (a host and its milter refer to each other), it would be freed by whichever thread
    next collects, such as a later test's serving thread, and Tcl aborts the process when an
    interpreter is deleted from a thread other than its own."""
    from pytclmilter.tcl.interp import TclHost

    host = TclHost()
    yield host
    host.close()
    del host
    gc.collect()

