"""One torch thread for tests of tiny models: one thread is fastest for them, and two OpenMP
threads wait on each other (seconds per UNet call) whenever anything else runs on a 2-core
machine. Use as ``_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)``."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def one_torch_thread() -> Iterator[None]:
    """Run with ``torch.set_num_threads(1)``; the previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
