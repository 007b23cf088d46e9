"""Counting the ATen ops a call dispatches (by overload packet name)."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """``with CountOps() as ops: ...`` then ``ops.counts["addmm"]``; ``ops.without_views()`` drops
    the ops that only make a view (``view``, ``transpose``, ...: no memory, no kernel)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.view_ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if func.is_view:
            self.view_ops.add(name)
        return func(*args, **(kwargs or {}))

    def without_views(self) -> collections.Counter:
        return collections.Counter({k: n for k, n in self.counts.items() if k not in self.view_ops})
