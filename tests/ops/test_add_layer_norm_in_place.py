"""add_layer_norm's reference writes h over the residual without autograd, whatever the
residual's layout (its docstring: "always in the reference")."""

from __future__ import annotations

import torch

from echofast.ops import add_layer_norm


@torch.no_grad()
def test_reference_writes_h_over_a_transposed_residual_with_rows_to_add():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, 8, generator=g)
    r = torch.randn(8, 6, generator=g).t()  # (6, 8), rows with stride 1 along dim 0
    add = torch.randn(2, 8, generator=g)
    want = r + x + add.repeat_interleave(3, 0)
    h, _ = add_layer_norm(x, r, add, backend="torch")
    torch.testing.assert_close(h, want)
    assert h.data_ptr() == r.data_ptr()
    torch.testing.assert_close(r, want)  # the residual holds h, not a partial sum
