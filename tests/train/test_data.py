"""Data order: global batches independent of ranks/accumulation, resumable by step, seeded items."""

from __future__ import annotations

import itertools
import random
import sys
import types

import numpy as np
import pytest
import torch

from echofast.rng import sample_seed
from echofast.train.config import config_from_dict
from echofast.train.loop import (
    PositionedDataset,
    RandomItems,
    StreamBatchSampler,
    build_dataset,
    collate,
)


def _global_batches(n, batch, world, accum, steps, seed=0, start=0):
    """Per step: the sorted (position, index) pairs of all ranks and micro-batches."""
    its = [
        iter(
            StreamBatchSampler(
                n,
                batch_size=batch,
                world=world,
                rank=r,
                grad_accum=accum,
                seed=seed,
                start_step=start,
            )
        )
        for r in range(world)
    ]
    out = []
    for _ in range(steps):
        pairs = []
        for _ in range(accum):
            for it in its:
                pairs += next(it)
        out.append(sorted(pairs))
    return out


def test_global_batch_is_split_invariant():
    ref = _global_batches(10, batch=12, world=1, accum=1, steps=6)
    assert ref == _global_batches(10, batch=6, world=2, accum=1, steps=6)
    assert ref == _global_batches(10, batch=3, world=2, accum=2, steps=6)
    assert ref == _global_batches(10, batch=1, world=4, accum=3, steps=6)
    assert ref[3:] == _global_batches(10, batch=3, world=4, accum=1, steps=3, start=3)
    positions = [p for step in ref for p, _ in step]
    assert positions == list(range(72))


def test_micro_batch_layout_is_the_documented_one():
    """Micro-batch ``a`` of rank ``r`` at step ``s`` starts at ``s·G + (a·world + r)·batch``:
    accumulation runs over the ranks' interleaved blocks, not over rank-contiguous ones."""
    batch, world, accum = 2, 3, 2
    g = batch * world * accum
    for r in range(world):
        it = iter(StreamBatchSampler(50, batch_size=batch, world=world, rank=r, grad_accum=accum))
        for s in range(2):
            for a in range(accum):
                start = s * g + (a * world + r) * batch
                assert [p for p, _ in next(it)] == list(range(start, start + batch))


def test_epochs_are_permutations():
    s = StreamBatchSampler(7, batch_size=7, seed=3)
    batches = list(itertools.islice(iter(s), 4))
    for b in batches:
        assert sorted(i for _, i in b) == list(range(7))
    assert len({tuple(i for _, i in b) for b in batches}) > 1  # reshuffled per epoch
    other = StreamBatchSampler(7, batch_size=7, seed=4)
    assert next(iter(other)) != batches[0]
    with pytest.raises(ValueError, match="empty"):
        StreamBatchSampler(0, batch_size=1)


class _GlobalRNGDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item(), np.random.rand(), random.random()])


def test_items_are_seeded_by_position_and_global_rngs_untouched():
    ds = PositionedDataset(_GlobalRNGDataset(), seed=1)

    def reseed():
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)

    reseed()
    before = (torch.rand(3), np.random.rand(3), random.random())
    reseed()
    pos_a, a = ds[(17, 2)]
    _, a2 = ds[(17, 2)]
    _, b = ds[(18, 2)]
    # the global streams (torch, NumPy, Python) are not consumed
    assert torch.equal(torch.rand(3), before[0])
    assert np.array_equal(np.random.rand(3), before[1]) and random.random() == before[2]
    assert pos_a == 17 and torch.equal(a, a2) and not torch.equal(a[1:], b[1:])
    positions, batch = collate([ds[(3, 1)], ds[(4, 0)]])
    assert positions.tolist() == [3, 4] and batch.shape == (2, 4)


def test_random_items_structure():
    arch = {"sample_size": 6, "in_channels": 8, "out_channels": 4}
    video = RandomItems("lvdm", 4, arch, frames=8, seed=0)[1]
    assert video["latents"].shape == (8, 4, 6, 6) and video["cond"].shape == (4, 6, 6)
    assert 4 <= video["valid"] <= 8 and 0 <= video["ef"] <= 1
    assert video["latents"][video["valid"] :].abs().sum() == 0
    valid = {RandomItems("lvdm", 16, arch, frames=8, seed=0)[i]["valid"] for i in range(16)}
    assert len(valid) > 1 and min(valid) >= 4  # some windows end early: the mask is exercised
    frame = RandomItems("vae", 4, {"sample_size": 12, "in_channels": 3}, 1, 0)[0]
    assert frame.shape == (3, 12, 12) and frame.abs().max() <= 1
    latent = RandomItems("lidm", 4, {"sample_size": 6, "in_channels": 4}, 1, 0)[3]
    assert latent.shape == (4, 6, 6)
    assert torch.equal(
        latent, RandomItems("lidm", 4, {"sample_size": 6, "in_channels": 4}, 1, 0)[3]
    )


def test_dataset_factory_uses_echofast_data(monkeypatch):
    calls = []

    def make(name):
        class Fake(torch.utils.data.Dataset):
            def __init__(self, root, **kw):
                calls.append((name, root, kw))
                self.epoch = 0

            def set_epoch(self, epoch):
                self.epoch = epoch

            def __len__(self):
                return 3

            def __getitem__(self, i):
                return torch.tensor([float(i), float(self.epoch)])

        return Fake

    import echofast.data  # the real package first; then its datasets module is replaced

    fake = types.ModuleType("echofast.data.datasets")
    for name in ("FrameDataset", "LatentFrameDataset", "LatentVideoDataset"):
        setattr(fake, name, make(name))
    monkeypatch.setitem(sys.modules, "echofast.data.datasets", fake)
    monkeypatch.setattr(echofast.data, "datasets", fake, raising=False)

    def build(kind, **data):
        cfg = config_from_dict({"model": {"type": kind}, "data": data, "seed": 5})
        return build_dataset(cfg, cfg.architecture())

    seeds = [sample_seed(5, k, "dataset") for k in range(2)]
    assert len(build("vae", root="r", size=64)) == 3
    assert calls[-1] == (
        "FrameDataset",
        "r",
        {"split": "TRAIN", "size": 64, "frames_per_video": None, "seed": seeds[0]},
    )
    build("vae", root="r", frames_per_video=4)
    assert calls[-1][2]["frames_per_video"] == 4
    build("lidm", root="r", split="VAL")
    assert calls[-1] == ("LatentFrameDataset", "r", {"split": "VAL", "seed": seeds[0]})
    ds = build("lvdm", root=["a", "b"], frames=32, target_fps=25.0)
    assert len(ds) == 6
    kw = {"split": "TRAIN", "frames": 32, "target_fps": 25.0, "random_window": True}
    assert calls[-2:] == [
        ("LatentVideoDataset", "a", {**kw, "seed": seeds[0]}),
        ("LatentVideoDataset", "b", {**kw, "seed": seeds[1]}),
    ]
    # the loader sets each part's epoch from the stream position (6 items per epoch)
    items = PositionedDataset(ds, seed=0)
    assert items[(13, 4)][1].tolist() == [1.0, 2.0]
    assert items[(5, 0)][1].tolist() == [0.0, 0.0]
    assert [part.epoch for part in ds.datasets] == [0, 0]
