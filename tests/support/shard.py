"""``ECHOFAST_TEST_SHARD=i/n``: one of n processes that share a test run (tests/conftest.py)."""

from __future__ import annotations

import pytest


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n; anything else stops the run, naming the value."""
    index, sep, count = text.partition("/")
    if sep and index.isdigit() and count.isdigit() and int(index) < int(count):
        return int(index), int(count)
    raise pytest.UsageError(
        f"ECHOFAST_TEST_SHARD must be i/n with 0 <= i < n (e.g. 0/2), got {text!r}"
    )
