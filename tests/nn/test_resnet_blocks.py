"""``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D`` and the 2D stages against diffusers' modules
with the same random weights, in every option the models use (time embedding added or as scale
and shift, none, channel change, up/down resampling, output rescale), on the CPU's path and on
the fused-epilogue path (``FUSED_EPILOGUE_DEVICES``, CUDA's, run here on the CPU with the op's
reference), and the constructors' refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import Downsample2D as DiffusersDownsample
from diffusers.models.resnet import ResnetBlock2D as DiffusersResnet
from diffusers.models.resnet import Upsample2D as DiffusersUpsample
from diffusers.models.unets.unet_2d_blocks import ResnetDownsampleBlock2D, ResnetUpsampleBlock2D
from support.models import rel_err

import echofast.nn.resnet as resnet_nn
from echofast.nn import Downsample2D, ResnetBlock2D, Upsample2D
from echofast.nn.blocks2d import DownStage2D, UpStage2D


def _ours_like(ref: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    """ours with ref's weights (diffusers' Downsample2D also lists its conv as ``Conv2d_0``)."""
    state = {k: v for k, v in ref.state_dict().items() if "Conv2d_0" not in k}
    ours.load_state_dict(state)
    return ours.eval()


# (in, out, temb_channels, time_embedding_norm, output_scale_factor, up, down)
BLOCKS = {
    "same": (8, 8, 6, "default", 1.0, False, False),
    "wider": (8, 16, 6, "default", 1.0, False, False),
    "narrower": (16, 8, 6, "default", 1.0, False, False),
    "scale_shift": (8, 16, 6, "scale_shift", 1.0, False, False),
    "no_temb": (16, 8, None, "default", 1.0, False, False),
    "rescaled": (8, 16, 6, "default", 2.0, False, False),
    "up": (8, 8, 6, "default", 1.0, True, False),
    "down": (8, 8, None, "default", 1.0, False, True),
}


@pytest.mark.parametrize("fused", [False, True], ids=["cpu_path", "fused_epilogue"])
@pytest.mark.parametrize("name", list(BLOCKS))
@torch.no_grad()
def test_resnet_block_matches_diffusers(name, fused, monkeypatch, random_weights):
    cin, cout, temb_ch, norm, scale, up, down = BLOCKS[name]
    if fused:
        monkeypatch.setattr(resnet_nn, "FUSED_EPILOGUE_DEVICES", frozenset({"cpu"}))
    kw = dict(groups=4, eps=1e-5, time_embedding_norm=norm, output_scale_factor=scale)
    shape = dict(in_channels=cin, out_channels=cout, temb_channels=temb_ch, up=up, down=down)
    ref = random_weights(DiffusersResnet(**shape, **kw), seed=cin + cout)
    ours = _ours_like(ref, ResnetBlock2D(**shape, **kw))
    g = torch.Generator().manual_seed(cout)
    x = torch.randn(3, cin, 6, 5, generator=g)
    temb = None if temb_ch is None else torch.randn(3, temb_ch, generator=g)
    want = ref(x, temb)
    got = ours(x.clone(), temb)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(time_embedding_norm="ada_group"), "unsupported time_embedding_norm 'ada_group'"),
    ],
)
def test_resnet_block_refuses_an_unknown_time_embedding_norm(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResnetBlock2D(8, temb_channels=4, groups=4, **kwargs)


def test_scale_shift_needs_a_time_embedding():
    block = ResnetBlock2D(8, temb_channels=4, groups=4, time_embedding_norm="scale_shift")
    with pytest.raises(ValueError, match="temb is required"):
        block(torch.randn(1, 8, 3, 3))


@pytest.mark.parametrize("padding", [0, 1])
@torch.no_grad()
def test_downsample_matches_diffusers(padding, random_weights):
    """padding=0 pads one zero row and column at the bottom and right (the LDM encoders)."""
    ref = random_weights(DiffusersDownsample(4, use_conv=True, out_channels=6, padding=padding), 1)
    ours = _ours_like(ref, Downsample2D(4, use_conv=True, out_channels=6, padding=padding))
    x = torch.randn(2, 4, 7, 6)
    torch.testing.assert_close(ours(x), ref(x))


def test_pooling_downsample_keeps_the_channels():
    with pytest.raises(ValueError, match="pooling downsample keeps channels: 4 != 6"):
        Downsample2D(4, use_conv=False, out_channels=6)


@pytest.mark.parametrize("size", [None, (7, 9)])
@torch.no_grad()
def test_upsample_matches_diffusers(size, random_weights):
    ref = random_weights(DiffusersUpsample(4, use_conv=True, out_channels=6), 2)
    ours = _ours_like(ref, Upsample2D(4, use_conv=True, out_channels=6))
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(ours(x, size), ref(x, output_size=size))


STAGE = dict(eps=1e-5, groups=4, temb_channels=6, time_embedding_norm="scale_shift")


@torch.no_grad()
def test_resnet_resampled_stages_match_diffusers(random_weights):
    """The resnet down/upsamplers get the time embedding (scale/shift here, which needs it)."""
    kw = dict(resnet_eps=1e-5, resnet_groups=4, temb_channels=6)
    kw.update(resnet_time_scale_shift="scale_shift")
    g = torch.Generator().manual_seed(3)
    temb = torch.randn(2, 6, generator=g)
    ref_down = random_weights(
        ResnetDownsampleBlock2D(8, 16, num_layers=2, add_downsample=True, **kw), 4
    )
    down = DownStage2D(8, 16, num_layers=2, downsample="resnet", **STAGE)
    _ours_like(ref_down, down)
    x = torch.randn(2, 8, 6, 6, generator=g)
    want, want_skips = ref_down(x, temb)
    got, skips = down(x, temb)
    assert rel_err(got, want) <= 1e-5 and len(skips) == len(want_skips) == 3
    ref_up = random_weights(
        ResnetUpsampleBlock2D(8, 16, 16, num_layers=2, add_upsample=True, **kw), 5
    )
    up = UpStage2D(8, 16, prev_output_channels=16, num_layers=2, upsample="resnet", **STAGE)
    _ours_like(ref_up, up)
    h = torch.randn(2, 16, 3, 3, generator=g)
    res = (torch.randn(2, 8, 3, 3, generator=g), torch.randn(2, 16, 3, 3, generator=g))
    assert rel_err(up(h, res, temb), ref_up(h, res, temb)) <= 1e-5


@pytest.mark.parametrize("stage", [DownStage2D, UpStage2D])
def test_stages_refuse_an_unknown_resampler(stage):
    kw = dict(temb_channels=None, num_layers=1, eps=1e-5, groups=4)
    if stage is UpStage2D:
        kw.update(prev_output_channels=None, upsample="pixel_shuffle")
    else:
        kw.update(downsample="pixel_unshuffle")
    with pytest.raises(ValueError, match="unsupported (up|down)sample 'pixel_"):
        stage(8, 8, **kw)
