"""`echofast generate` options that do not define the dataset's content (CUDA graphs, writer
threads) and one that does (decode precision)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from echofast.cli import main
from echofast.errors import BackendUnavailable
from echofast.pipelines.dataset import GenerateConfig, generate_dataset


def _cfg(weights_root, out, **kw) -> GenerateConfig:
    base = dict(
        weights=str(weights_root),
        out=str(out),
        num_videos=2,
        frames=8,
        fps=16.0,
        steps=2,
        seed=3,
        batch_size=2,
        progress=False,
    )
    return GenerateConfig(**{**base, **kw})


def test_identity_records_decode_dtype_only_when_reduced(tmp_path):
    sha = {"vae": {"weights": "x"}}
    plain = _cfg("w", tmp_path).identity(sha, None)
    assert "decode_dtype" not in plain and "cuda_graphs" not in plain
    assert "writer_threads" not in plain
    assert _cfg("w", tmp_path, decode_dtype="bfloat16").identity(sha, None)["decode_dtype"] == (
        "bfloat16"
    )
    assert _cfg("w", tmp_path, cuda_graphs=False).identity(sha, None) == plain


def test_bad_options_refused_before_anything_is_written(weights_root, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(ValueError, match="decode_dtype"):
        generate_dataset(_cfg(weights_root, out, decode_dtype="float8"))
    with pytest.raises(BackendUnavailable, match="not a CUDA device"):
        generate_dataset(_cfg(weights_root, out, cuda_graphs=True))
    with pytest.raises(ValueError, match="cuda_graphs"):
        generate_dataset(_cfg(weights_root, out, cuda_graphs="yes"))
    assert not out.exists()


def test_decode_dtype_is_part_of_the_dataset(weights_root, tmp_path):
    """bf16 decode gives a dataset of its own (resuming it in fp32 is refused) whose pixels stay
    within a few levels of the fp32 decode of the same latents; the CLI passes the options."""
    import av

    def frames(folder):
        out = []
        for name in ("synthetic_000000", "synthetic_000001"):
            with av.open(str(folder / "Videos" / f"{name}.avi")) as c:
                out.append(np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)]))
        return np.stack(out).astype(np.int16)

    a, b = tmp_path / "fp32", tmp_path / "bf16"
    assert main(["generate", "--weights", str(weights_root), "--out", str(a), "--num-videos",
                 "2", "--frames", "8", "--fps", "16", "--steps", "2", "--seed", "3",
                 "--batch-size", "2", "--no-progress", "--cuda-graphs", "off",
                 "--writer-threads", "0"]) == 0  # fmt: skip
    generate_dataset(_cfg(weights_root, b, decode_dtype="bfloat16"))
    manifest = json.loads((b / "generation.json").read_text())
    assert json.dumps(manifest).count('"bfloat16"') >= 1
    diff = np.abs(frames(a) - frames(b))
    # the precision itself is measured in tests/models/test_vae_precision.py; here: it was used
    # (pixels differ) and the AVIs of a tiny random model stay close (lossy codec included)
    assert 0 < diff.max() <= 8 and diff.mean() < 1.5, (diff.max(), diff.mean())
    with pytest.raises(Exception, match="decode_dtype"):
        generate_dataset(_cfg(weights_root, b))


def test_dtype_auto_is_float16_on_cuda_and_float32_elsewhere():
    """`echofast generate --dtype auto` (the default) samples as the reference does on a GPU
    (fp16 autocast) and in fp32 elsewhere; the dataset records the resolved dtype."""
    from echofast.cli import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("auto", "cuda:1") == "float16"
    for explicit in ("float32", "float16", "bfloat16"):
        assert resolve_dtype(explicit, "cuda") == explicit
        assert resolve_dtype(explicit, "cpu") == explicit
