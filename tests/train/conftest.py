"""Training tests run torch on one thread (see tests/support/threads.py)."""

from __future__ import annotations

import pytest
from support.threads import one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
