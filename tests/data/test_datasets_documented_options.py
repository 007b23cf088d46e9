"""Dataset options as their docstrings describe them: ``drop_short`` at the clip's own rate and
the evaluation conditioning frame's generator."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from echofast.data import EchoVideoDataset, LatentVideoDataset, write_filelist
from echofast.io import write_video


def test_drop_short_at_the_clips_own_rate_drops_clips_no_longer_than_a_window(tmp_path):
    """Module docstring: ``drop_short=True`` drops clips lasting no longer than a window;
    ``target_fps=None`` keeps the clip's own rate, so a window is ``frames`` source frames."""
    rows = []
    for name, n in (("short", 8), ("exact", 16), ("long", 17)):
        write_video(tmp_path / "Videos" / f"{name}.avi", np.zeros((n, 8, 8), np.uint8), 25)
        rows.append({"FileName": name, "EF": 50, "FPS": 25, "NumberOfFrames": n, "Split": "TRAIN"})
    write_filelist(tmp_path, rows)
    kept = EchoVideoDataset(tmp_path, "TRAIN", frames=16, target_fps=None, drop_short=True)
    assert [r.name for r in kept.records] == ["long"]


def test_evaluation_condition_frame_uses_the_documented_generator(tmp_path):
    """LatentVideoDataset docstring: with ``random_window=False`` the conditioning frame is drawn
    from a generator seeded with ``[seed or 0, epoch, index, 1]``."""
    (tmp_path / "Latents").mkdir()
    n = 50
    latents = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, 2, 2)
    save_file({"latents": latents.contiguous()}, str(tmp_path / "Latents" / "v.safetensors"))
    write_filelist(tmp_path, [{"FileName": "v", "EF": 50, "FPS": 32, "Split": "TRAIN"}])
    ds = LatentVideoDataset(tmp_path, "TRAIN", frames=8, random_window=False, seed=7)
    for epoch in range(4):
        ds.set_epoch(epoch)
        want = int(np.random.default_rng([7, epoch, 0, 1]).integers(n))
        assert float(ds[0]["cond"][0, 0, 0]) == want
