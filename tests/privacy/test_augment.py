"""Augmented re-identification pairs (``[augment]``): the reference draws are kept, edits are
seeded per pair, copies of one frame appear as positives, the config is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from privacy.phantom_latents import reid_config

from echofast.errors import ConfigError
from echofast.privacy.audit import shift
from echofast.privacy.data import Augmentation, LatentClips, PairDataset, translate
from echofast.train.reid import reid_config_from_dict


@pytest.fixture(scope="module")
def clips(phantom_latents):
    return LatentClips(phantom_latents, "TRAIN", normalization="frame")


def test_translate_moves_content_and_replicates_the_edge():
    x = torch.randn(3, 7, 9)
    for dy, dx in [(0, 0), (1, 0), (0, -1), (2, -1), (-2, 2)]:
        y = translate(x, dy, dx)
        assert y.shape == x.shape
        rolled = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        ys, xs = slice(max(dy, 0), 7 + min(dy, 0)), slice(max(dx, 0), 9 + min(dx, 0))
        assert torch.equal(y[:, ys, xs], rolled[:, ys, xs])
    y = translate(x, 2, 0)
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(y[:, 1], x[:, 0])
    moved = shift(x, torch.Generator().manual_seed(3))
    assert any(torch.equal(moved, translate(x, *d)) for d in [(0, 1), (0, -1), (1, 0), (-1, 0)])


def test_augmented_pairs_keep_the_reference_draws(clips):
    plain = PairDataset(clips, seed=7, pairs_per_video=3)
    aug = PairDataset(
        clips, seed=7, pairs_per_video=3, augmentation=Augmentation(copy_positives=0.0)
    )
    for epoch in (0, 4):
        plain.set_epoch(epoch)
        aug.set_epoch(epoch)
        for p in range(len(plain)):
            assert plain.pair(p) == aug.pair(p)
            a1, a2, y = aug[p]
            b1, b2, z = aug[p]
            assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(y, z)
            r1, r2, _ = plain[p]
            assert not torch.equal(a1, r1) and not torch.equal(a2, r2)
            assert a1.amin() == -1 and a1.amax() == 1
            assert float(torch.corrcoef(torch.stack([a1.flatten(), r1.flatten()]))[0, 1]) > 0.5


def test_copy_positives_pair_a_frame_with_an_edited_copy(clips):
    plain = PairDataset(clips, seed=3, pairs_per_video=8)
    always = PairDataset(
        clips, seed=3, pairs_per_video=8, augmentation=Augmentation(copy_positives=1.0)
    )
    labels = []
    for p in range(len(plain)):
        a, fa, b, fb, y = always.pair(p)
        ref = plain.pair(p)
        kept = 3 if y == 1 else 5  # a positive's second frame becomes the anchor frame
        assert ref[:kept] == (a, fa, b, fb, y)[:kept] and ref[4] == y
        if y == 1:
            assert (a, fa) == (b, fb)
            x1, x2, _ = always[p]
            assert not torch.equal(x1, x2)
        labels.append(y)
    assert 0 < np.mean(labels) < 1


def test_augment_config(phantom_latents, tmp_path):
    base = reid_config(phantom_latents, tmp_path)
    cfg = reid_config_from_dict({**base, "augment": {"enabled": True, "max_shift": 1}})
    assert cfg.augment.augmentation() == Augmentation(max_shift=1)
    assert reid_config_from_dict(base).augment.augmentation() is None
    for key, value in [
        ("max_shift", -1),
        ("gain", 1.0),
        ("offset", -0.1),
        ("noise", -1.0),
        ("copy_positives", 1.5),
    ]:
        with pytest.raises(ConfigError, match=f"augment.{key}"):
            reid_config_from_dict({**base, "augment": {"enabled": True, key: value}})
    with pytest.raises(ConfigError, match=r"augment.shift"):
        reid_config_from_dict({**base, "augment": {"shift": 1}})
