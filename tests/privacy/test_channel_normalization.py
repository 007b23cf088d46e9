"""``normalization = "channel"``: min-max per frame and channel, exactly invariant to a positive
per-channel gain and any offset, so brightness-edited copies are exact copies for the filter."""

from __future__ import annotations

import pytest
import torch

from echofast.privacy import PrivacyFilter, ReIdentificationModel
from echofast.privacy.audit import brightness, run_audit
from echofast.privacy.model import normalize_clip
from echofast.privacy.report import FilterSetup


def test_channel_normalization_per_plane_and_invariant():
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(5, 4, 7, 9, generator=g)
    y = normalize_clip(clip, "channel")
    assert torch.allclose(y.amin(dim=(-2, -1)), torch.full((5, 4), -1.0))
    assert torch.allclose(y.amax(dim=(-2, -1)), torch.full((5, 4), 1.0))
    gain = 0.5 + torch.rand(1, 4, 1, 1, generator=g)
    offset = torch.randn(1, 4, 1, 1, generator=g)
    torch.testing.assert_close(normalize_clip(clip * gain + offset, "channel"), y)
    assert torch.equal(normalize_clip(clip[2], "channel"), y[2])  # an image = a one-frame clip
    flat = clip.clone()
    flat[1, 3] = 2.0
    assert (normalize_clip(flat, "channel")[1, 3] == 0).all()  # constant plane -> 0, not NaN


def test_config_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ReIdentificationModel(layers=(1, 1, 1, 1), width=8, n_features=16, normalization="channel")
    m.save_pretrained(tmp_path / "reid")
    again = ReIdentificationModel.from_pretrained(tmp_path / "reid")
    assert again.normalization == "channel"
    assert '"pmone-channel"' in (tmp_path / "reid" / "config.json").read_text()


@pytest.mark.parametrize("tolerance", [0, 1])
def test_brightness_copies_are_exact_copies(phantom_latents, tolerance):
    torch.manual_seed(0)
    model = ReIdentificationModel(
        layers=(1, 1, 1, 1), width=8, n_features=32, normalization="channel"
    )
    flt = PrivacyFilter.from_reference(
        model, phantom_latents, frame_step=0, shift_tolerance=tolerance
    )
    audit, scores = run_audit(
        FilterSetup(flt, {}, {}, True), phantom_latents, num_planted=30, strengths=(0.5,)
    )
    for kind in ("exact", "brightness"):
        assert audit["positive_control"][kind]["fraction_caught"] == 1.0, kind
        assert (scores[kind] > 1 - 1e-5).all(), kind
    x = torch.randn(4, 6, 6)
    edited = brightness(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(normalize_clip(edited, "channel"), normalize_clip(x, "channel"))
