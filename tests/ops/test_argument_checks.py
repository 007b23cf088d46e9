"""Bad arguments to the public ops raise typed errors that name the argument, instead of NaN
outputs, silent truncation or errors from deep inside PyTorch."""

from __future__ import annotations

import pytest
import torch

from echofast import ops

_META = torch.device("meta")


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
@pytest.mark.parametrize("op", ["group_norm", "layer_norm", "add_layer_norm"])
def test_bad_eps_is_rejected(op, eps):
    x = torch.randn(2, 4, 3, 3)
    calls = {
        "group_norm": lambda: ops.group_norm(x, 2, eps=eps),
        "layer_norm": lambda: ops.layer_norm(x, eps=eps),
        "add_layer_norm": lambda: ops.add_layer_norm(x, torch.zeros_like(x), eps=eps),
    }
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        calls[op]()


def test_zero_eps_is_allowed():
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(
        ops.group_norm(x, 2, eps=0.0), torch.nn.functional.group_norm(x, 2, eps=0.0)
    )


def test_group_norm_empty_add_is_a_value_error():
    with pytest.raises(ValueError, match=r"add must be \(M, 4\).*got \(0, 4\)"):
        ops.group_norm(torch.randn(2, 4, 3, 3), 2, add=torch.zeros(0, 4))


@pytest.mark.parametrize("name", ["weight", "bias", "scale", "shift", "add"])
def test_group_norm_names_a_parameter_on_another_device(name):
    shapes = {"weight": (4,), "bias": (4,), "scale": (2, 4), "shift": (2, 4), "add": (2, 4)}
    kwargs = {name: torch.zeros(shapes[name], device=_META)}
    with pytest.raises(ValueError, match=rf"group_norm: {name} .* is on meta, x on cpu"):
        ops.group_norm(torch.randn(2, 4, 3, 3), 2, **kwargs)


@pytest.mark.parametrize("name", ["k", "v"])
def test_attention_names_an_input_on_another_device(name):
    q = torch.randn(1, 2, 5, 8)
    kv = {"k": q, "v": q, name: torch.zeros(1, 2, 5, 8, device=_META)}
    with pytest.raises(ValueError, match=rf"attention: {name} .* is on meta, q on cpu"):
        ops.attention(q, kv["k"], kv["v"])


@pytest.mark.parametrize("name", ["residual", "bias", "bias2", "weight", "out"])
def test_bias_residual_names_an_argument_on_another_device(name):
    y = torch.randn(2, 4, 3, 3)
    shapes = {"residual": y.shape, "bias": (4,), "bias2": (4,), "weight": (1,), "out": y.shape}
    kwargs = {name: torch.zeros(shapes[name], device=_META)}
    with pytest.raises(ValueError, match=rf"bias_residual: {name} .* is on meta, y on cpu"):
        ops.bias_residual(y, **kwargs)


def test_bias_residual_weight_must_be_a_tensor():
    with pytest.raises(TypeError, match="weight must be a one-element tensor, got float"):
        ops.bias_residual(torch.randn(2, 4, 3, 3), weight=0.5)


@torch.no_grad()
def test_integer_out_is_rejected_not_truncated():
    y = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="bias_residual: out must be floating point"):
        ops.bias_residual(y, residual=y.clone(), out=torch.zeros(y.shape, dtype=torch.int64))
    x, w1, w2 = torch.randn(3, 6), torch.randn(8, 6), torch.randn(5, 4)
    with pytest.raises(ValueError, match="feed_forward: out must be floating point"):
        ops.feed_forward(x, w1, None, w2, None, out=torch.zeros(3, 5, dtype=torch.int64))


@pytest.mark.parametrize("residual", [True, False])
def test_add_layer_norm_with_no_rows(residual):
    x = torch.randn(2, 0, 6)
    h, y = ops.add_layer_norm(
        x, torch.zeros_like(x) if residual else None, torch.randn(2, 6), backend="torch"
    )
    assert h.shape == y.shape == x.shape
    if not residual:
        assert h is not x  # h = x + add in a new tensor
