"""``echofast encode`` writes the decoded video's frame rate to the latent FileList.csv, which the
latent loaders read first (before the files' ``fps`` metadata) to resample to ``target_fps``."""

from __future__ import annotations

import numpy as np
from safetensors import safe_open
from support.models import save_diffusers
from support.weights import TINY_VAE

from echofast.data import write_filelist
from echofast.data.echonet import read_filelist
from echofast.data.encode import main_encode
from echofast.io import read_video, write_video


def test_filelist_fps_is_the_decoded_rate_at_full_precision(tmp_path):
    """An NTSC-rate clip (30000/1001 fps) must not be listed as 29.97: the FileList's FPS and
    the latent file's metadata should give the same rate."""
    from diffusers import AutoencoderKL

    save_diffusers(AutoencoderKL, TINY_VAE, tmp_path / "vae")
    src = tmp_path / "videos"
    frames = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    write_video(src / "Videos" / "ntsc.avi", frames, 30000 / 1001)
    write_filelist(src, [{"FileName": "ntsc", "EF": 55, "FPS": 29.97, "Split": "TRAIN"}])
    _, decoded = read_video(src / "Videos" / "ntsc.avi")
    out = tmp_path / "lat"
    args = ["--vae", str(tmp_path / "vae"), "--input", str(src), "--out", str(out)]
    assert main_encode([*args, "--no-progress", "--device", "cpu"]) == 0
    with safe_open(str(out / "Latents" / "ntsc.safetensors"), framework="pt") as fh:
        assert float(fh.metadata()["fps"]) == decoded
    assert float(read_filelist(out / "FileList.csv")[0]["FPS"]) == decoded
