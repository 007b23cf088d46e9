"""The FID/IS/FVD protocol (selection, resampling, clips, statistics, CLI) with tiny stand-in
feature networks (the real ones are tested in test_extractors.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echofast.data.echonet import read_filelist, write_filelist
from echofast.eval import fidelity
from echofast.eval.fidelity import (
    Extractors,
    MetricsError,
    ReferenceStats,
    build_reference,
    compute_metrics,
    load_frames,
    main_metrics,
    select_reference_videos,
)
from echofast.io import write_video

SIZE = 32


class TinyImages:
    """Stand-in for the Inception: 3×3 average-pooled grey levels, probabilities over 5 classes."""

    weight = torch.linspace(-2, 2, 45).reshape(9, 5)

    def extract(self, images: torch.Tensor):
        x = images.float() / 255
        if x.ndim == 4:
            x = x.mean(1)
        f = F.adaptive_avg_pool2d(x[:, None], 3).flatten(1)
        return f, torch.softmax(4 * f @ self.weight, 1)


class TinyClips:
    """Stand-in for the I3D: per clip the mean, spread and motion, and a 2×2 mean image."""

    def extract(self, clips: torch.Tensor):
        x = clips.float() / 255
        motion = (x[:, 1:] - x[:, :-1]).abs().mean((1, 2, 3))
        pooled = F.adaptive_avg_pool2d(x.mean(1)[:, None], 2).flatten(1)
        return torch.cat(
            [x.mean((1, 2, 3))[:, None], x.std((1, 2, 3))[:, None], motion[:, None], pooled], 1
        )


def extractors(batch=5, clip_frames=40) -> Extractors:
    return Extractors(TinyImages(), TinyClips(), "inc-fp", "i3d-fp", batch, clip_frames)


def clip_frames(seed: int, frames: int, shift: float = 0.0) -> np.ndarray:
    """A bright blob that moves and breathes; ``shift`` brightens everything."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cx, cy, r0 = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 8)
    t = np.arange(frames)[:, None, None]
    r = r0 * (1 + 0.3 * np.sin(2 * np.pi * t / rng.uniform(12, 30)))
    img = 40 + 150 * (((xx - cx - 0.1 * t) ** 2 + (yy - cy) ** 2) < r**2) + shift
    img = img + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root, specs, shift: float = 0.0):
    """``specs``: list of (frames, fps, split); writes Videos/ and FileList.csv."""
    rows = []
    for i, (frames, fps, split) in enumerate(specs):
        name = f"v{i:03d}"
        write_video(root / "Videos" / f"{name}.avi", clip_frames(i, frames, shift), fps)
        rows.append(
            {
                "FileName": name,
                "EF": 50 + i,
                "FPS": fps,
                "NumberOfFrames": frames,
                "FrameHeight": SIZE,
                "FrameWidth": SIZE,
                "Split": split,
            }
        )
    write_filelist(root, rows)
    return root


def test_reference_selection_follows_the_reference_script(tmp_path):
    specs = [
        (40, 50, "TRAIN"),
        (20, 50, "TRAIN"),
        (30, 50, "VAL"),
        (26, 50, "TRAIN"),
        (60, 50, "TRAIN"),
        (24, 50, "TRAIN"),
        (50, 50, "TEST"),
        (25, 50, "TRAIN"),
    ]
    root = make_dataset(tmp_path / "real", specs)
    chosen = select_reference_videos(root, 16, max_videos=3)
    # pandas' sample(frac=1, random_state=42) order, TRAIN rows lasting >= 16/32 s = 25 frames
    order = np.random.RandomState(42).permutation(len(specs))
    expected = [f"v{i:03d}" for i in order if specs[i][2] == "TRAIN" and specs[i][0] >= 25][:3]
    assert [r.name for r in chosen] == expected
    with pytest.raises(MetricsError, match="lasts 4 s"):
        select_reference_videos(root, 128)


def test_frames_are_resampled_to_32_fps(tmp_path):
    root = make_dataset(tmp_path / "d", [(50, 50, "TRAIN")])
    frames = load_frames(root / "Videos" / "v000.avi", 50, size=SIZE)
    assert len(frames) == math.floor(32 / 50 * 50) == 32
    resized = load_frames(root / "Videos" / "v000.avi", 50, size=16)
    assert resized.shape == (32, 16, 16) and resized.dtype == torch.uint8
    # antialiased bilinear, rounded to the nearest grey level (not truncated)
    x = F.interpolate(frames[:, None].float(), size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(
        resized, x[:, 0].round().clamp(0, 255).to(torch.uint8), atol=0, rtol=0
    )


def test_reference_statistics_equal_direct_computation(tmp_path):
    specs = [(48, 50, "TRAIN"), (30, 50, "TRAIN"), (40, 40, "TRAIN"), (64, 60, "TRAIN")]
    root = make_dataset(tmp_path / "real", specs)
    ref = build_reference(root, 16, extractors(), size=SIZE, progress=False)
    names = sorted(r.name for r in select_reference_videos(root, 16))
    videos = [
        load_frames(root / "Videos" / f"{n}.avi", specs[int(n[1:])][1], size=SIZE)[:16]
        for n in names
    ]
    feats = TinyImages().extract(torch.cat(videos))[0].double().numpy()
    mu, sigma = ref.stats["fid"]
    np.testing.assert_allclose(mu.numpy(), feats.mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(feats.T, bias=True), atol=1e-12)
    clips = TinyClips().extract(torch.stack(videos)).double().numpy()
    np.testing.assert_allclose(ref.stats["fvd16"][0].numpy(), clips.mean(0), atol=1e-12)
    assert ref.protocol["counts"] == {"fid": 64, "fvd16": 4}
    assert ref.protocol["videos"] == 4 and ref.protocol["inception"] == "inc-fp"


def test_fvd16_windows_of_a_128_frame_set(tmp_path):
    root = make_dataset(tmp_path / "real", [(130, 32, "TRAIN"), (140, 32, "TRAIN")])
    ref = build_reference(root, 128, extractors(clip_frames=128), size=SIZE, seed=3, progress=False)
    assert set(ref.stats) == {"fid", "fvd16", "fvd128"}
    clips = []
    for k, name in enumerate(["v000", "v001"]):
        video = load_frames(root / "Videos" / f"{name}.avi", 32, size=SIZE)[:128]
        start = int(np.random.default_rng([3, k]).integers(128 - 16 + 1))
        clips.append(video[start : start + 16])
    expected = TinyClips().extract(torch.stack(clips)).double().mean(0)
    torch.testing.assert_close(ref.stats["fvd16"][0], expected, atol=1e-12, rtol=0)
    assert ref.protocol["counts"]["fid"] == 256


def test_identical_sets_give_zero_and_shifts_grow(tmp_path):
    specs = [(16, 32, "TRAIN")] * 12
    real = make_dataset(tmp_path / "real", specs)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    same = compute_metrics(real, ref, extractors(), is_splits=4, progress=False)
    assert abs(same["metrics"]["fid"]) < 1e-9 and abs(same["metrics"]["fvd16"]) < 1e-9
    assert same["counts"]["fid_images"] == 192 and same["counts"]["fvd16_videos"] == 12
    assert same["metrics"]["is_mean"] >= 1.0
    values = []
    for shift in (15, 60):
        gen = make_dataset(tmp_path / f"gen{shift}", specs, shift=shift)
        values.append(compute_metrics(gen, ref, extractors(), is_splits=4, progress=False))
    assert 0 < values[0]["metrics"]["fid"] < values[1]["metrics"]["fid"]
    assert 0 < values[0]["metrics"]["fvd16"] < values[1]["metrics"]["fvd16"]


def test_generated_side_limits_and_short_videos(tmp_path):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 4)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    gen = make_dataset(tmp_path / "gen", [(20, 32, "TRAIN"), (10, 32, "TEST"), (30, 32, "VAL")])
    out = compute_metrics(
        gen, ref, extractors(), fid_images=35, fvd_videos=5, is_splits=5, progress=False
    )
    assert out["counts"]["fid_images"] == 35  # 20 + 10 + 5: first frames in file-name order
    assert out["counts"]["fvd16_videos"] == 2 and out["counts"]["fvd16_skipped_short"] == 1
    # FVD16 of the generated side: the first 16 frames (offset 0) of each long enough video
    clips = [load_frames(gen / "Videos" / f"{n}.avi", 32, size=SIZE)[:16] for n in ("v000", "v002")]
    feats = TinyClips().extract(torch.stack(clips)).double().numpy()
    mu, sigma = feats.mean(0), np.cov(feats.T, bias=True)
    expected = fidelity.frechet_distance(mu, sigma, *ref.stats["fvd16"])
    assert out["metrics"]["fvd16"] == pytest.approx(expected, rel=1e-9)
    wrong = Extractors(TinyImages(), None, "other-weights", None)
    with pytest.raises(MetricsError, match="inception weights differ"):
        compute_metrics(gen, ref, wrong, progress=False)


def fake_load(inception, i3d, **kw):
    """``load_extractors`` with the tiny stand-ins for whichever weights are named."""
    return Extractors(
        TinyImages() if inception else None,
        TinyClips() if i3d else None,
        "inc-fp" if inception else None,
        "i3d-fp" if i3d else None,
    )


def test_cli_reference_cache_and_compute(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECHOFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fidelity, "load_extractors", fake_load)
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 5)
    gen = make_dataset(tmp_path / "gen", [(16, 32, "TRAIN")] * 5, shift=30)
    args = [
        "reference",
        "--dataset",
        str(real),
        "--frames",
        "16",
        "--size",
        str(SIZE),
        "--inception-weights",
        "x",
        "--i3d-weights",
        "y",
        "--no-progress",
        "--workers",
        "1",
    ]
    assert main_metrics(args) == 0
    cached = list((tmp_path / "cache" / "reference").glob("real-16f-*.safetensors"))
    assert len(cached) == 1
    capsys.readouterr()
    assert main_metrics(args) == 0
    assert "cached" in capsys.readouterr().out
    ref = ReferenceStats.load(cached[0])
    assert ref.protocol["counts"] == {"fid": 80, "fvd16": 5}
    compute = [
        "compute",
        "--dataset",
        str(gen),
        "--reference",
        str(cached[0]),
        "--inception-weights",
        "x",
        "--i3d-weights",
        "y",
        "--is-splits",
        "5",
        "--no-progress",
        "--workers",
        "0",
    ]
    assert main_metrics(compute) == 0
    result = json.loads((gen / "metrics.json").read_text())
    assert set(result["metrics"]) == {"fid", "is_mean", "is_std", "fvd16"}
    assert result["metrics"]["fid"] > 0 and result["reference_file"] == str(cached[0])
    with pytest.raises(MetricsError, match="exists"):
        main_metrics(compute)
    assert main_metrics([*compute, "--overwrite"]) == 0
    # FVD only: a reference without FID statistics cannot give FID
    fvd_only = [
        "reference",
        "--dataset",
        str(real),
        "--frames",
        "16",
        "--size",
        str(SIZE),
        "--i3d-weights",
        "y",
        "--no-progress",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "fvd.st"),
    ]
    assert main_metrics(fvd_only) == 0
    only = ReferenceStats.load(tmp_path / "fvd.st")
    assert set(only.stats) == {"fvd16"} and only.protocol["inception"] is None
    with pytest.raises(MetricsError, match="nothing to compute"):
        main_metrics(
            [
                "compute",
                "--dataset",
                str(gen),
                "--reference",
                str(tmp_path / "fvd.st"),
                "--inception-weights",
                "x",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )


def edit_filelist(root, **changes):
    """Rewrite ``root/FileList.csv`` with ``changes[FileName] = {column: value}`` applied."""
    rows = read_filelist(root / "FileList.csv")
    for row in rows:
        row.update(changes.get(row["FileName"], {}))
    write_filelist(root, rows)


def numpy_inception_score(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """The original Inception Score: exp of the mean KL(p(y|x) ‖ p(y)) per equal part."""
    scores = []
    for part in np.array_split(probs, splits):
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_filelist_fps_is_the_source_rate_and_must_be_positive(tmp_path):
    path = tmp_path / "v.avi"
    write_video(path, clip_frames(0, 50), 50)
    assert len(load_frames(path, 25, size=SIZE)) == math.floor(32 / 25 * 50) == 64
    assert len(load_frames(path, None, size=SIZE)) == 32  # the file's own 50 fps
    with pytest.raises(MetricsError, match="no frame rate"):
        load_frames(path, -25.0, size=SIZE)


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_flags(flags: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize("before", [(True, False), (False, True)])
def test_exact_fp32_turns_tf32_off_and_restores_both_flags(before):
    saved = _tf32_flags()
    _set_tf32_flags(before)
    try:
        with pytest.raises(RuntimeError, match="inside"), fidelity.exact_fp32():
            assert _tf32_flags() == (False, False)
            raise RuntimeError("inside")
        assert _tf32_flags() == before
    finally:
        _set_tf32_flags(saved)


def test_unusable_reference_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(MetricsError, match="does not exist"):
        ReferenceStats.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(MetricsError, match="not a readable safetensors"):
        ReferenceStats.load(tmp_path / "junk.safetensors")
    tensors = {"fid.mu": torch.zeros(3), "fid.sigma": torch.eye(3)}
    save_file(tensors, tmp_path / "other.safetensors", metadata={"format": "other"})
    with pytest.raises(MetricsError, match="not an echofast reference statistics"):
        ReferenceStats.load(tmp_path / "other.safetensors")
    meta = {"format": fidelity.STATS_FORMAT, "protocol": json.dumps({"version": 2})}
    save_file(tensors, tmp_path / "future.safetensors", metadata=meta)
    with pytest.raises(MetricsError, match="statistics version 2"):
        ReferenceStats.load(tmp_path / "future.safetensors")
    meta["protocol"] = json.dumps({"frames": 16})  # no version at all
    save_file(tensors, tmp_path / "unversioned.safetensors", metadata=meta)
    with pytest.raises(MetricsError, match="statistics version None"):
        ReferenceStats.load(tmp_path / "unversioned.safetensors")


def test_reference_selection_across_splits_and_durations_from_the_files(tmp_path):
    root = make_dataset(tmp_path / "all", [(30, 50, "TRAIN"), (30, 50, "VAL"), (30, 50, "TEST")])
    assert {r.name for r in select_reference_videos(root, 16, split="all")} == {
        "v000",
        "v001",
        "v002",
    }
    # without NumberOfFrames the duration is the decoded length over the FileList FPS (else the
    # file's): 20 frames at 25 fps last 0.8 s, at the file's 50 fps only 0.4 s (< 16/32 s)
    root = make_dataset(tmp_path / "d", [(20, 50, "TRAIN"), (20, 50, "TRAIN"), (40, 50, "TRAIN")])
    edit_filelist(
        root,
        v000={"FPS": 25, "NumberOfFrames": ""},
        v001={"FPS": "", "NumberOfFrames": ""},
        v002={"FPS": "", "NumberOfFrames": ""},
    )
    assert sorted(r.name for r in select_reference_videos(root, 16)) == ["v000", "v002"]


def test_a_split_with_no_rows_is_named_with_the_splits_listed(tmp_path):
    """A typo in --split says which splits there are (a split whose videos are all too short
    keeps its own message)."""
    root = make_dataset(tmp_path / "r", [(30, 50, "TRAIN"), (30, 50, "VAL"), (8, 50, "TEST")])
    edit_filelist(root, v001={"Split": ""})
    with pytest.raises(
        MetricsError, match=r"FileList.csv: no TRIAN rows .*lists \(blank\), TEST, TRAIN"
    ):
        select_reference_videos(root, 16, split="TRIAN")
    with pytest.raises(MetricsError, match="no TEST video lasts"):
        select_reference_videos(root, 16, split="TEST")


def test_a_filelist_that_overstates_a_video_is_refused(tmp_path):
    root = make_dataset(tmp_path / "real", [(10, 32, "TRAIN")])
    edit_filelist(root, v000={"NumberOfFrames": 40})
    with pytest.raises(MetricsError, match="FileList says"):
        build_reference(root, 16, extractors(), size=SIZE, progress=False)
    one_short = make_dataset(tmp_path / "short", [(15, 32, "TRAIN")])
    edit_filelist(one_short, v000={"NumberOfFrames": 16})
    with pytest.raises(MetricsError, match="v000.avi: 15 frames at 32 fps after resampling"):
        build_reference(one_short, 16, extractors(), size=SIZE, progress=False)
    with pytest.raises(MetricsError, match="Inception weights"):
        build_reference(root, 16, Extractors(), size=SIZE, progress=False)


def test_reference_fvd_clips_are_the_first_videos_by_name(tmp_path):
    root = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 4)
    ref = build_reference(root, 16, extractors(), size=SIZE, fvd_videos=2, progress=False)
    assert ref.protocol["counts"] == {"fid": 64, "fvd16": 2}
    assert ref.protocol["fvd16_offset"] == "0"
    clips = [load_frames(root / "Videos" / f"{n}.avi", 32, size=SIZE) for n in ("v000", "v001")]
    feats = TinyClips().extract(torch.stack(clips)).double().numpy()
    np.testing.assert_allclose(ref.stats["fvd16"][0].numpy(), feats.mean(0), atol=1e-12)
    np.testing.assert_allclose(
        ref.stats["fvd16"][1].numpy(), np.cov(feats.T, bias=True), atol=1e-12
    )
    loaded = ReferenceStats.load(ref.save(tmp_path / "ref.safetensors"))
    assert loaded.protocol == ref.protocol and set(loaded.stats) == {"fid", "fvd16"}
    for name, (mu, sigma) in ref.stats.items():
        assert torch.equal(loaded.stats[name][0], mu) and torch.equal(loaded.stats[name][1], sigma)


def test_generated_side_reads_in_file_name_order_and_stops_when_done(tmp_path):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 4)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    gen = make_dataset(tmp_path / "gen", [(16, 32, "TRAIN")] * 3, shift=20)
    write_filelist(gen, read_filelist(gen / "FileList.csv")[::-1])
    out = compute_metrics(
        gen, ref, extractors(), fid_images=32, fvd_videos=1, is_splits=4, progress=False
    )
    counts = out["counts"]
    assert counts["videos_read"] == 2 and counts["fid_images"] == 32
    assert counts["fvd16_videos"] == 1 and counts["fid_images_reference"] == 64
    videos = [load_frames(gen / "Videos" / f"{n}.avi", 32, size=SIZE) for n in ("v000", "v001")]
    feats, probs = TinyImages().extract(torch.cat(videos))
    feats = feats.double().numpy()
    expected = fidelity.frechet_distance(
        feats.mean(0), np.cov(feats.T, bias=True), *ref.stats["fid"]
    )
    assert out["metrics"]["fid"] == pytest.approx(expected, rel=1e-9)
    is_mean, is_std = numpy_inception_score(probs.double().numpy(), 4)
    assert out["metrics"]["is_mean"] == pytest.approx(is_mean, rel=1e-9)
    assert out["metrics"]["is_std"] == pytest.approx(is_std, rel=1e-4)
    clip = TinyClips().extract(videos[0][None]).double().numpy()
    expected = fidelity.frechet_distance(clip[0], np.zeros((7, 7)), *ref.stats["fvd16"])
    assert out["metrics"]["fvd16"] == pytest.approx(expected, rel=1e-9)
    # IS needs as many frames as splits, no more
    out = compute_metrics(gen, ref, extractors(), fid_images=32, is_splits=32, progress=False)
    assert "is_mean" in out["metrics"] and out["not_computed"] == {}
    out = compute_metrics(gen, ref, extractors(), fid_images=32, is_splits=33, progress=False)
    assert "is_mean" not in out["metrics"] and "fid" in out["metrics"]
    assert out["not_computed"] == {
        "is": "32 generated frame(s), fewer than the 33 IS splits (--is-splits)"
    }


def test_only_the_networks_given_are_used(tmp_path):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 3)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    images_only = Extractors(TinyImages(), None, "inc-fp", None)
    out = compute_metrics(real, ref, images_only, split="train", is_splits=4, progress=False)
    assert set(out["metrics"]) == {"fid", "is_mean", "is_std"}
    assert out["split"] == "TRAIN" and out["weights"] == {"inception": "inc-fp", "i3d": None}
    with pytest.raises(MetricsError, match=r"no videos in split 'VAL' \(--split; it lists TRAIN\)"):
        compute_metrics(real, ref, extractors(), split="VAL", progress=False)
    edit_filelist(real, v000={"Split": "TEST"})
    with pytest.raises(MetricsError, match=r"'VAL' \(--split; it lists TEST, TRAIN\)"):
        compute_metrics(real, ref, extractors(), split="VAL", progress=False)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ECHOFAST_CACHE", str(tmp_path / "own"))
    assert fidelity.cache_dir() == tmp_path / "own"
    monkeypatch.delenv("ECHOFAST_CACHE")
    assert fidelity.cache_dir() == tmp_path / "xdg" / "echofast"


def test_cli_reference_refuses_to_replace_other_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "load_extractors", fake_load)
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 2)
    out = tmp_path / "ref.safetensors"
    args = ["reference", "--dataset", str(real), "--frames", "16", "--size", str(SIZE)]
    args += ["--i3d-weights", "y", "--no-progress", "--workers", "0", "--out", str(out)]
    assert main_metrics([*args, "--seed", "0"]) == 0
    with pytest.raises(MetricsError, match=r"made differently \(differs in \['seed'\]\)"):
        main_metrics([*args, "--seed", "1"])
    assert ReferenceStats.load(out).protocol["seed"] == 0
    assert main_metrics([*args, "--seed", "1", "--overwrite"]) == 0
    assert ReferenceStats.load(out).protocol["seed"] == 1


def test_generated_side_reads_on_until_every_clip_length_is_served(tmp_path):
    real = make_dataset(tmp_path / "real", [(130, 32, "TRAIN"), (140, 32, "TRAIN")])
    ref = build_reference(real, 128, extractors(clip_frames=128), size=SIZE, progress=False)
    gen = make_dataset(tmp_path / "gen", [(16, 32, "TRAIN"), (130, 32, "TRAIN"), (20, 32, "TEST")])
    out = compute_metrics(
        gen,
        ref,
        extractors(clip_frames=128),
        fid_images=16,
        fvd_videos=1,
        is_splits=2,
        progress=False,
    )
    counts = out["counts"]
    assert counts["videos_read"] == 2 and counts["fid_images"] == 16
    assert counts["fvd16_videos"] == 1 and counts["fvd128_videos"] == 1
    assert counts["fvd128_skipped_short"] == 1 and set(out["metrics"]) >= {"fvd16", "fvd128"}


def test_reference_identity_defaults_and_what_it_separates(tmp_path):
    """The documented protocol (3,125 videos of 16 frames, 2,048 of 128; 2,048 FVD clips; 32
    fps; 112 px); the split's spelling does not matter; FVD clip counts and seeds do, as does
    the cache file they name."""
    root = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")])
    ex = extractors()
    ident = fidelity.reference_identity(root, 16, ex)
    assert (ident["target_videos"], ident["fvd_videos"], ident["fvd_lengths"]) == (3125, 2048, [16])
    assert (ident["split"], ident["fps"], ident["size"]) == ("TRAIN", 32.0, 112)
    long = fidelity.reference_identity(root, 128, ex)
    assert (long["target_videos"], long["fvd_lengths"]) == (2048, [16, 128])
    assert fidelity.reference_identity(root, 16, ex, split="train") == ident
    paths = {fidelity.reference_cache_path(ident)}
    for changed in ({"fvd_videos": 100}, {"seed": 1}, {"max_videos": 7}):
        other = fidelity.reference_identity(root, 16, ex, **changed)
        assert other != ident, changed
        paths.add(fidelity.reference_cache_path(other))
    assert len(paths) == 4
    with pytest.raises(MetricsError, match=f"{tmp_path / 'nothing'}: no FileList.csv"):
        fidelity.reference_identity(tmp_path / "nothing", 16, ex)


def test_fvd_lengths_are_16_and_the_reference_length():
    assert fidelity.fvd_lengths(16) == (16,)
    assert fidelity.fvd_lengths(128) == (16, 128)
    with pytest.raises(MetricsError, match="need >= 16 frames, got 15"):
        fidelity.fvd_lengths(15)


def test_generated_side_defaults_are_the_documented_protocol(tmp_path):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 2)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    out = compute_metrics(real, ref, extractors(), progress=False)
    proto = out["protocol"]
    assert (proto["fid_images"], proto["fvd_videos"], proto["is_splits"]) == (50_000, 2048, 10)
    assert out["split"] == "ALL" and out["counts"]["fid_images"] == 32


def test_reference_duration_from_the_file_rate_when_the_filelist_has_none(tmp_path):
    # NumberOfFrames given but no FPS: the file's 50 fps makes 20 frames last 0.4 s < 0.5 s
    root = make_dataset(tmp_path / "d", [(20, 50, "TRAIN"), (40, 50, "TRAIN")])
    edit_filelist(root, v000={"FPS": ""}, v001={"FPS": ""})
    assert [r.name for r in select_reference_videos(root, 16)] == ["v001"]


def test_i3d_weights_other_than_the_references_are_refused(tmp_path):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 2)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    wrong = Extractors(None, TinyClips(), None, "other-i3d")
    with pytest.raises(MetricsError, match="i3d weights differ"):
        compute_metrics(real, ref, wrong, progress=False)


def test_no_generated_video_long_enough_for_fvd_is_refused_naming_the_dataset(tmp_path):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 2)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    gen = make_dataset(tmp_path / "gen", [(10, 32, "TRAIN"), (12, 32, "TEST")])
    with pytest.raises(MetricsError, match=f"{gen}: no video has 16 frames at 32 fps"):
        compute_metrics(gen, ref, extractors(), is_splits=2, progress=False)


def test_an_inception_only_reference_leaves_fvd_and_its_weights_out(tmp_path):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 2)
    images_only = Extractors(TinyImages(), None, "inc-fp", None)
    ref = build_reference(real, 16, images_only, size=SIZE, progress=False)
    out = compute_metrics(real, ref, extractors(), is_splits=2, progress=False)
    assert set(out["metrics"]) == {"fid", "is_mean", "is_std"}
    assert out["weights"] == {"inception": "inc-fp", "i3d": None}


def test_default_cache_is_under_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("ECHOFAST_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fidelity.cache_dir() == tmp_path / ".cache" / "echofast"


def test_features_are_computed_on_the_networks_device():
    net = torch.nn.Linear(2, 2).to("meta")
    assert fidelity._device_of(Extractors(None, net)) == torch.device("meta")
    assert fidelity._device_of(Extractors(TinyImages(), None)) == torch.device("cpu")


def test_cli_passes_the_protocol_options(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "load_extractors", fake_load)
    with pytest.raises(MetricsError, match="give --inception-weights"):
        main_metrics(["reference", "--dataset", str(tmp_path), "--frames", "16"])
    real = make_dataset(tmp_path / "real", [(30, 40, "VAL")] * 3 + [(30, 40, "TRAIN")] * 2)
    ref = tmp_path / "ref.safetensors"
    args = ["reference", "--dataset", str(real), "--frames", "16", "--size", str(SIZE)]
    args += ["--fps", "25", "--max-videos", "2", "--fvd-videos", "1", "--split", "VAL"]
    args += ["--inception-weights", "x", "--i3d-weights", "y", "--no-progress"]
    assert main_metrics([*args, "--workers", "0", "--out", str(ref)]) == 0
    proto = ReferenceStats.load(ref).protocol
    assert (proto["fps"], proto["target_videos"], proto["fvd_videos"]) == (25.0, 2, 1)
    assert (proto["split"], proto["counts"]) == ("VAL", {"fid": 32, "fvd16": 1})
    out = tmp_path / "m.json"
    compute = ["compute", "--dataset", str(real), "--reference", str(ref), "--out", str(out)]
    compute += ["--split", "TRAIN", "--fid-images", "21", "--fvd-videos", "1", "--is-splits", "3"]
    compute += ["--inception-weights", "x", "--i3d-weights", "y", "--no-progress"]
    assert main_metrics([*compute, "--workers", "0"]) == 0
    result = json.loads(out.read_text())
    assert (result["split"], result["counts"]["fid_images"], result["counts"]["fvd16_videos"]) == (
        "TRAIN",
        21,
        1,
    )
    assert (result["protocol"]["is_splits"], result["protocol"]["fps"]) == (3, 25.0)


def test_convert_refuses_an_output_that_is_not_safetensors(tmp_path):
    with pytest.raises(MetricsError, match="must be a .safetensors file"):
        main_metrics(["convert", "i3d", "--input", "x.ckpt", "--out", str(tmp_path / "i3d.pt")])


class CountingImages(TinyImages):
    """TinyImages that counts the frames it is given."""

    def __init__(self):
        self.seen = 0

    def extract(self, images: torch.Tensor):
        self.seen += len(images)
        return super().extract(images)


def test_a_listed_video_that_is_missing_is_refused_before_any_feature(tmp_path, monkeypatch):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 3)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    gen = make_dataset(tmp_path / "gen", [(16, 32, "TRAIN")] * 3)
    (gen / "Videos" / "v002.avi").unlink()  # the generated side used to leave it out silently
    counting = CountingImages()
    ex = Extractors(counting, None, "inc-fp", None, batch_size=5)
    with pytest.raises(MetricsError, match=r"gen/FileList\.csv: 1 listed video\(s\).*v002\.avi"):
        compute_metrics(gen, ref, ex, is_splits=2, progress=False)
    assert counting.seen == 0
    monkeypatch.setattr(fidelity, "load_extractors", lambda *a, **kw: ex)
    out = tmp_path / "metrics.json"
    cli = ["compute", "--dataset", str(gen), "--reference", "x", "--inception-weights", "x"]
    monkeypatch.setattr(ReferenceStats, "load", classmethod(lambda cls, path: ref))
    with pytest.raises(MetricsError, match="v002"):
        main_metrics([*cli, "--out", str(out), "--no-progress", "--workers", "0"])
    assert not out.exists() and counting.seen == 0
    (real / "Videos" / "v001.avi").unlink()  # and the reference side before decoding any video
    with pytest.raises(MetricsError, match=r"real/FileList\.csv: 1 listed video\(s\).*v001\.avi"):
        build_reference(real, 16, ex, size=SIZE, progress=False)
    assert counting.seen == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_video_is_named_without_a_worker_traceback(tmp_path, workers):
    from echofast.io.video import VideoDecodeError

    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 3)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    (real / "Videos" / "v001.avi").write_bytes(b"not a video")
    with pytest.raises(VideoDecodeError) as caught:
        compute_metrics(real, ref, extractors(), is_splits=2, workers=workers, progress=False)
    message = str(caught.value)
    assert message.startswith(str(real / "Videos" / "v001.avi") + ": not a readable avi file")
    assert "Traceback" not in message and "worker" not in message


def test_a_negative_filelist_fps_is_refused_naming_the_row(tmp_path):
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 3)
    ref = build_reference(real, 16, extractors(), size=SIZE, progress=False)
    edit_filelist(real, v001={"FPS": -32})
    named = r"real/FileList\.csv: a frame rate must be positive: row 2 \(v001\): FPS -32"
    with pytest.raises(MetricsError, match=named):
        select_reference_videos(real, 16)
    with pytest.raises(MetricsError, match=named):
        compute_metrics(real, ref, extractors(), is_splits=2, progress=False)
    edit_filelist(real, v001={"FPS": 0})  # zero or empty: the file's own rate
    assert len(select_reference_videos(real, 16)) == 3


def test_an_output_that_is_a_folder_is_refused_before_any_feature(tmp_path, monkeypatch):
    counting = CountingImages()
    ex = Extractors(counting, None, "inc-fp", None, batch_size=5)
    monkeypatch.setattr(fidelity, "load_extractors", lambda *a, **kw: ex)
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 2)
    folder = tmp_path / "results"
    folder.mkdir()
    common = ["--inception-weights", "x", "--no-progress", "--workers", "0", "--out", str(folder)]
    with pytest.raises(MetricsError, match=f"{folder} is a folder; --out names the file"):
        main_metrics(["reference", "--dataset", str(real), "--frames", "16", *common])
    ref = tmp_path / "ref.safetensors"
    build_reference(real, 16, ex, size=SIZE, progress=False).save(ref)
    counting.seen = 0
    with pytest.raises(MetricsError, match=f"{folder} is a folder; --out names the file"):
        main_metrics(
            ["compute", "--dataset", str(real), "--reference", str(ref), *common, "--overwrite"]
        )
    assert counting.seen == 0 and list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "side, option, value",
    [
        ("compute", "fid_images", 0),
        ("compute", "fvd_videos", 0),
        ("compute", "is_splits", 0),
        ("compute", "fid_images", -5),
        ("reference", "fvd_videos", 0),
        ("reference", "max_videos", 0),
    ],
)
def test_counts_below_one_are_refused_naming_the_option(tmp_path, side, option, value):
    """They failed only after the whole run (AttributeError, or a misleading 'no video has 16
    frames'), or were ignored (--max-videos 0 took one video)."""
    real = make_dataset(tmp_path / "real", [(16, 32, "TRAIN")] * 3)
    counting = CountingImages()
    ex = Extractors(counting, TinyClips(), "inc-fp", "i3d-fp", batch_size=5)
    ref = build_reference(real, 16, ex, size=SIZE, progress=False)
    counting.seen = 0
    named = f"--{option.replace('_', '-')} {value}: must be at least 1"
    with pytest.raises(MetricsError, match=named):
        if side == "compute":
            compute_metrics(real, ref, ex, progress=False, **{"is_splits": 2, option: value})
        else:
            build_reference(real, 16, ex, size=SIZE, progress=False, **{option: value})
    assert counting.seen == 0
