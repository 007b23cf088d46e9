"""`echofast generate` options that do not define the dataset's content (CUDA graphs, writer
threads) and one that does (decode precision); bad values of any option refused before the
folder is made."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from echofast.cli import main
from echofast.errors import BackendUnavailable
from echofast.pipelines.dataset import (
    GenerateConfig,
    GenerationArgumentError,
    Shard,
    _check_arguments,
    generate_dataset,
)


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


#: options that sampling would refuse at its start (or that would write elsewhere than Videos/,
#: or fail on the file system): each refused naming the option, before the folder is made
REFUSED = [
    (dict(dtype="float16"), "--dtype float16: .*needs a CUDA device"),
    (dict(dtype="bfloat16"), "--dtype bfloat16: .*needs a CUDA device"),
    (dict(dtype="float64"), "--dtype must be one of"),
    (dict(decode_dtype="float8"), "--decode-dtype must be one of"),
    (dict(cuda_graphs="yes"), "--cuda-graphs must be auto, on or off"),
    (dict(steps=1001), r"--steps 1001: lidm_dynamic: num_inference_steps must be an integer"),
    (dict(seed=1.0), "--seed must be an int"),
    (dict(fps=1200.0), r"--fps 1200: .*cannot be stored in an AVI \(FFmpeg would store 600\)"),
    (dict(fps=1e-300), r"--fps 1e-300: .*cannot be stored in an AVI"),
    (dict(fps=1e300), r"--fps 1e\+300.*cannot be stored in an AVI"),
    (dict(dataset="adult"), "--dataset must be one of"),
    (dict(splits=(1, 1)), "--splits: splits must be 3 non-negative counts summing to 2"),
    (dict(name_prefix="../up_"), r"--name-prefix '\.\./up_' holds \['/'\]"),
    (dict(name_prefix="a\nb"), "--name-prefix .* holds .*control characters"),
    (dict(name_prefix="x" * 250), r"--name-prefix is too long \(250 bytes\)"),
    (dict(device="meta"), "--device 'meta' holds no data"),
    (dict(device="fpga"), "--device 'fpga': this torch .* cannot use it"),
    (dict(ef_from="no_such_filelist.csv"), "--ef-from no_such_filelist.csv: cannot be read"),
    (dict(privacy="m", reference_latents="r", oversample=float("nan")), "--oversample must be"),
    (dict(privacy="m", reference_latents="r", oversample=float("inf")), "--oversample must be"),
    (dict(privacy="m", reference_latents="r", auc_threshold=2.0), "--auc-threshold must be"),
    (dict(privacy="m", reference_latents="r", privacy_percentile=100.0), "--privacy-percentile"),
    (dict(num_videos=0), "num_videos must be an int >= 1, got 0"),
    (dict(frames=True), "frames must be an int >= 1, got True"),
    (dict(seed=True), "--seed must be an int, got True"),
    (dict(fps=0.0), "fps must be > 0, got 0.0"),
    (dict(fps=-16.0), "fps must be > 0, got -16.0"),
    (dict(ef_range=(10, 50, 90)), r"--ef-range needs LO and HI, got \[10, 50, 90\]"),
    (dict(ef_range=(50,)), r"--ef-range needs LO and HI, got \[50\]"),
    (dict(ef_range=(10, float("inf"))), "--ef-range must be finite numbers"),
    (dict(device="xpu"), "--device 'xpu': this torch .* cannot use it"),
    (dict(privacy="m"), "needs both --privacy and --reference-latents"),
    (dict(reference_latents="r"), "needs both --privacy and --reference-latents"),
    (dict(privacy="m", reference_latents="r", shard=Shard(1, 2)), "does not support sharding"),
    (dict(privacy="m", reference_latents="r", oversample=0.99), "--oversample must be"),
    (dict(privacy="m", reference_latents="r", auc_threshold=-0.01), "--auc-threshold must be"),
    (dict(privacy="m", reference_latents="r", privacy_percentile=0.0), "--privacy-percentile"),
    (dict(privacy="m", reference_latents="r", privacy_frame_step=-1), "--privacy-frame-step"),
    (
        dict(privacy="m", reference_latents="r", privacy_shift_tolerance=True),
        "--privacy-shift-tolerance must be an int >= 0, got True",
    ),
    (
        dict(privacy="m", reference_latents="r", privacy_normalization="pixel"),
        "--privacy-normalization must be one of",
    ),
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(decode_chunk_size=0), "decode_chunk_size must be an int >= 1, got 0"),
    (dict(steps=2.0), "steps must be an int >= 1, got 2.0"),
    (dict(fps=True), "fps must be a finite number, got True"),
    (dict(writer_threads=True), "--writer-threads: writer threads must be an int >= 0, got True"),
    (dict(shard="1/2"), "shard must be a Shard, got '1/2'"),
    (dict(splits=(1, None, 1)), "--splits: "),
    (dict(name_prefix=7), "--name-prefix must be a string, got 7"),
    (dict(dtype=["float32"]), r"--dtype must be one of .*, got \['float32'\]"),
    (dict(privacy="m", reference_latents="r", oversample=True), "--oversample must be .*True"),
    (
        dict(privacy="m", reference_latents="r", privacy_frame_step=True),
        "--privacy-frame-step must be an int >= 0, got True",
    ),
]


@pytest.mark.parametrize(
    ("kw", "message"), REFUSED, ids=[f"{[*k][-1]}={[*k.values()][-1]!r}"[:32] for k, _ in REFUSED]
)
def test_bad_options_refused_before_anything_is_written(weights_root, tmp_path, kw, message):
    out = tmp_path / "ds"
    with pytest.raises(GenerationArgumentError, match=message):
        generate_dataset(_cfg(weights_root, out, **kw))
    assert not out.exists()


def test_values_on_the_edge_of_each_range_are_accepted(weights_root, tmp_path):
    """The inclusive ends of each documented range pass the checks (nothing is written)."""
    accepted = [
        dict(ef_range=(50, 50)),
        dict(fps=16, seed=-1),
        dict(privacy="m", reference_latents="r", oversample=1.0, auc_threshold=0.0),
        dict(privacy="m", reference_latents="r", auc_threshold=1.0, privacy_percentile=1e-9),
        dict(privacy="m", reference_latents="r", privacy_frame_step=0, privacy_normalization=None),
        dict(privacy="m", reference_latents="r", privacy_normalization="channel"),
    ]
    for kw in accepted:
        _check_arguments(_cfg(weights_root, tmp_path / "ds", **kw))
    assert not (tmp_path / "ds").exists()


def test_name_prefix_may_fill_the_file_system_name_limit_exactly(weights_root, tmp_path):
    """The longest file name is video ``num_videos - 1``'s temporary file
    (``.<prefix><index>.avi.XXXXXXXX.tmp``, 24 bytes besides the prefix for a 6-digit index)."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    fits = "p" * (limit - 24)
    _check_arguments(_cfg(weights_root, tmp_path / "ds", name_prefix=fits))
    _check_arguments(_cfg(weights_root, tmp_path / "ds", name_prefix=fits, num_videos=10**6))
    with pytest.raises(GenerationArgumentError, match=f"would take {limit + 1} bytes"):
        _check_arguments(_cfg(weights_root, tmp_path / "ds", name_prefix=fits + "p"))
    # a 7-digit index (video 1000000) takes one byte more
    with pytest.raises(GenerationArgumentError, match=f"video 1000000's .* {limit + 1} bytes"):
        _check_arguments(
            _cfg(weights_root, tmp_path / "ds", name_prefix=fits, num_videos=10**6 + 1)
        )
    assert not (tmp_path / "ds").exists()


def test_name_prefix_limit_is_255_bytes_where_the_file_system_cannot_be_asked(
    weights_root, tmp_path, monkeypatch
):
    def unsupported(path: object, name: str) -> int:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "pathconf", unsupported)
    _check_arguments(_cfg(weights_root, tmp_path / "ds", name_prefix="p" * (255 - 24)))
    with pytest.raises(GenerationArgumentError, match="would take 256 bytes, over the 255-byte"):
        _check_arguments(_cfg(weights_root, tmp_path / "ds", name_prefix="p" * (256 - 24)))


def test_forced_cuda_graphs_that_cannot_run_are_refused_before_anything_is_written(
    weights_root, tmp_path, monkeypatch
):
    out = tmp_path / "ds"
    monkeypatch.setenv("ECHOFAST_CUDA_GRAPHS", "0")
    with pytest.raises(BackendUnavailable) as info:
        generate_dataset(_cfg(weights_root, out, cuda_graphs=True))
    assert "--cuda-graphs on: --device 'cpu' is not a CUDA device" in str(info.value)
    assert "--cuda-graphs on: disabled by ECHOFAST_CUDA_GRAPHS='0'" in str(info.value)
    assert not out.exists()


CLI_REFUSED = [
    (["--dtype", "float16"], "GenerationArgumentError: --dtype float16: "),
    (["--dtype", "bfloat16"], "GenerationArgumentError: --dtype bfloat16: "),
    (["--steps", "1001"], "GenerationArgumentError: --steps 1001: "),
    (["--fps", "1200"], "GenerationArgumentError: --fps 1200: "),
    (["--name-prefix", "../up_"], "GenerationArgumentError: --name-prefix '../up_' "),
    (["--shard", "3/2"], "GenerationArgumentError: --shard: shard index must satisfy"),
    (["--ef-from", "missing.csv"], "GenerationArgumentError: --ef-from missing.csv: "),
]


@pytest.mark.parametrize(
    ("extra", "message"), CLI_REFUSED, ids=[" ".join(e) for e, _ in CLI_REFUSED]
)
def test_cli_refuses_bad_options_before_creating_the_folder(tmp_path, capsys, extra, message):
    """`echofast generate` (demo weights) on CPU: one error line naming the option, no folder."""
    out = tmp_path / "ds"
    argv = ["generate", "--out", str(out), "--num-videos", "2", "--frames", "8", "--steps", "2"]
    assert main([*argv, "--device", "cpu", "--no-progress", *extra]) == 1
    assert message in capsys.readouterr().err
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


def test_shift_tolerance_beyond_the_reference_frames_is_refused_before_writing(
    weights_root, tmp_path
):
    from privacy.phantom_latents import write_phantom_latents

    reference = write_phantom_latents(tmp_path / "latents", weights_root / "vae", (2, 0, 1))
    out = tmp_path / "ds"
    cfg = _cfg(
        weights_root,
        out,
        privacy=str(tmp_path / "model"),
        reference_latents=str(reference),
        privacy_shift_tolerance=100,
    )
    with pytest.raises(GenerationArgumentError, match="--privacy-shift-tolerance 100: .* at most"):
        generate_dataset(cfg)
    assert not out.exists()
