"""echofast.rng.randn_tensor follows diffusers' ``randn_tensor``: drawn on the generator's device
in the requested dtype, then moved; one generator per batch item, given as a list or a tuple."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor

from echofast.rng import randn_tensor


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(3, 2, 5), (1, 4), (2, 1, 3, 7)])
def test_generator_lists_and_tuples_draw_as_diffusers(shape, dtype):
    seeds = range(11, 11 + shape[0])
    want = diffusers_randn_tensor(shape, generator=_gens(*seeds), dtype=dtype)
    for gens in (_gens(*seeds), tuple(_gens(*seeds))):
        got = randn_tensor(shape, generator=gens, dtype=dtype)
        assert got.dtype == dtype and got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_one_generator_draws_as_diffusers(dtype):
    want = diffusers_randn_tensor(
        (2, 3, 5), generator=torch.Generator().manual_seed(4), dtype=dtype
    )
    got = randn_tensor((2, 3, 5), generator=torch.Generator().manual_seed(4), dtype=dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("generator", [torch.Generator().manual_seed(0), _gens(1, 2)])
def test_a_cpu_generator_serves_any_device(generator):
    """Drawn on the generator's CPU, then moved: the meta device stands for a GPU here."""
    out = randn_tensor((2, 3), generator=generator, device="meta", dtype=torch.float64)
    assert out.device.type == "meta" and out.shape == (2, 3) and out.dtype == torch.float64


def test_without_a_generator_the_global_one_draws_on_the_cpu():
    with torch.random.fork_rng():
        torch.manual_seed(123)
        want = torch.randn(4, 3)
        torch.manual_seed(123)
        got = randn_tensor((4, 3))
    assert got.device == torch.device("cpu") and torch.equal(got, want)


def test_the_draw_happens_on_the_generators_device(monkeypatch):
    """On a GPU, ``torch.randn(device="cuda", generator=<CPU generator>)`` fails, so the draw must
    be made on the generator's CPU whatever ``device`` is (here: meta)."""
    devices = []
    real_randn = torch.randn

    def randn(*args, device=None, **kwargs):
        devices.append(torch.device(device))
        return real_randn(*args, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    randn_tensor((2, 3), generator=torch.Generator().manual_seed(0), device="meta")
    randn_tensor((2, 3), generator=_gens(1, 2), device="meta")
    randn_tensor((2, 3), device="meta")
    assert [d.type for d in devices] == ["cpu", "cpu", "cpu", "meta"]
