"""The temporal resnets' (3,1,1) convolution in its two forms (a (3,1) Conv2d over (T, H·W), and
three GEMMs on shifted token rows) against ``F.conv3d``, and the models' choice between them
(``TEMPORAL_GEMMS_DEVICES``, ``TEMPORAL_GEMMS_MAX_DIM``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import echofast.nn.spatiotemporal as st


def _operands(shape, n=None, seed=0):
    b, c, t, h, w = shape
    g = torch.Generator().manual_seed(seed)
    n = n or c
    x = torch.randn(shape, generator=g).to(memory_format=torch.channels_last_3d)
    weight = torch.randn(n, c, 3, 1, 1, generator=g) / (3 * c) ** 0.5
    bias = torch.randn(n, generator=g) * 0.1
    return x, weight, bias


def _rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(
    "shape, n", [((2, 12, 5, 3, 5), None), ((1, 8, 1, 4, 4), 6), ((3, 5, 2, 1, 7), 9)]
)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("form", [st.temporal_conv2d, st.temporal_conv_gemms])
def test_each_form_is_a_temporal_conv3d(form, shape, n, with_bias):
    x, weight, bias = (t.double() for t in _operands(shape, n))
    x = x.to(memory_format=torch.channels_last_3d)
    bias = bias if with_bias else None
    y = form(x, weight, bias)
    ref = F.conv3d(x, weight, bias, padding=(1, 0, 0))
    assert y.shape == ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


def test_the_conv2d_form_takes_any_strides():
    x, weight, bias = _operands((2, 6, 4, 3, 5))
    for view in (x.contiguous(), x.transpose(3, 4).contiguous().transpose(3, 4), x[:1]):
        torch.testing.assert_close(
            st.temporal_conv2d(view, weight, bias), F.conv3d(view, weight, bias, padding=(1, 0, 0))
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_conv3d(dtype):
    x, weight, bias = _operands((2, 64, 9, 5, 7), seed=3)
    ref = F.conv3d(x.double(), weight.double(), bias.double(), padding=(1, 0, 0))
    low = [t.to(dtype) for t in (x, weight, bias)]
    torch_err = _rel(F.conv3d(*low, padding=(1, 0, 0)), ref)
    for form in (st.temporal_conv2d, st.temporal_conv_gemms):
        assert _rel(form(*low), ref) <= 2 * torch_err, form.__name__


def _block(seed=0):
    torch.manual_seed(seed)
    block = st.TemporalResnetBlock(64, 8, 1e-5).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 5, 3, 4).to(memory_format=torch.channels_last_3d)
    return block, x, torch.randn(2, 8)


def test_the_block_takes_the_gemms_on_their_devices_in_inference(monkeypatch):
    block, x, temb = _block()
    with torch.no_grad():
        want = block.branch(x, temb)
    calls, gemms = [], st.temporal_conv_gemms

    def counted(*args):
        calls.append(args[0].shape)
        return gemms(*args)

    monkeypatch.setattr(st, "temporal_conv_gemms", counted)
    monkeypatch.setattr(st, "TEMPORAL_GEMMS_DEVICES", frozenset({"cpu"}))
    with torch.no_grad():
        got = block.branch(x, temb)
    assert len(calls) == 2  # conv1 and conv2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # not channels-last-3d: the Conv2d form
        block.branch(x.contiguous(), temb)
    assert len(calls) == 2
    got = block.branch(x, temb)  # autograd: the Conv2d form
    assert len(calls) == 2 and got.requires_grad


@pytest.mark.parametrize("limit, taken", [(64, 2), (63, 0)])
def test_maps_wider_than_the_limit_keep_the_conv2d_form(monkeypatch, limit, taken):
    block, x, temb = _block()  # 64 channels
    calls, gemms = [], st.temporal_conv_gemms
    monkeypatch.setattr(st, "temporal_conv_gemms", lambda *a: calls.append(1) or gemms(*a))
    monkeypatch.setattr(st, "TEMPORAL_GEMMS_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(st, "TEMPORAL_GEMMS_MAX_DIM", limit)
    with torch.no_grad():
        block.branch(x, temb)
    assert len(calls) == taken


def test_no_device_takes_the_gemms_by_default():
    assert st.TEMPORAL_GEMMS_DEVICES == frozenset()
    assert st.TEMPORAL_GEMMS_MAX_DIM == 128


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_forms_within_twice_conv3d_and_capturable(dtype):
    """On CUDA (cuBLAS and cuDNN, TF32 off for the fp32 reference) at an LVDM-like site; the GEMM
    form also replays in a CUDA graph as the pipelines run it."""
    x, weight, bias = (t.cuda() for t in _operands((2, 128, 16, 8, 8), seed=5))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = F.conv3d(x.double(), weight.double(), bias.double(), padding=(1, 0, 0))
    low = [t.to(dtype) for t in (x, weight, bias)]
    torch_err = _rel(F.conv3d(*low, padding=(1, 0, 0)), ref)
    for form in (st.temporal_conv2d, st.temporal_conv_gemms):
        assert _rel(form(*low), ref) <= 2 * torch_err, form.__name__
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        st.temporal_conv_gemms(*low)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = st.temporal_conv_gemms(*low)
    low[0].copy_(low[0].flip(2))
    graph.replay()
    torch.testing.assert_close(out, st.temporal_conv_gemms(*low), rtol=0, atol=0)
