"""Shared fixtures. Helpers for each area live in tests/support/."""

from __future__ import annotations

import pytest

from support.postfix import postfix_factory

postfix = pytest.fixture(postfix_factory, name="postfix")
