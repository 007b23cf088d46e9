"""The filter fails closed on latent frames whose shape differs from the reference gallery's
(the re-identification ResNet pools globally, so it would score them), and the CLIs refuse a
non-empty ``--out`` before any work. Tiny random latents and an untrained model: fast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from privacy.phantom_latents import write_latents
from safetensors.torch import save_file

import echofast.privacy.cli as privacy_cli
from echofast.cli import main
from echofast.data import write_filelist
from echofast.privacy import PrivacyError, PrivacyFilter, ReIdentificationModel, setup_filter
from echofast.privacy.audit import run_audit
from echofast.privacy.data import FrameShapeError, ShiftToleranceError
from echofast.privacy.report import FilterSetup

SHAPE = (4, 6, 6)
SPLITS = {"TRAIN": 6, "VAL": 3, "TEST": 4}


def _reference(root: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A latent dataset of random 2-frame clips; ``shapes``: another frame shape per split."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for split, n in SPLITS.items():
        shape = (shapes or {}).get(split, SHAPE)
        for i in range(n):
            name = f"{split.lower()}_{i}"
            clip = torch.randn(2, *shape, generator=g)
            write_latents(root / "Latents" / f"{name}.safetensors", clip)
            rows.append({"FileName": name, "EF": 50, "FPS": 2, "NumberOfFrames": 2, "Split": split})
    write_filelist(root, rows)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return _reference(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def flt(model_dir, reference) -> PrivacyFilter:
    return setup_filter(model_dir, reference).filter


def _common(model_dir: Path, reference: Path, out: Path) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--reference",
        str(reference),
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]


@pytest.mark.parametrize(
    "candidate",
    [(2, 4, 12, 12), (2, 4, 7, 7), (2, 3, 6, 6), (4, 12, 12)],
    ids=["larger", "7x7", "3-channel", "larger-image"],
)
def test_filter_cli_refuses_candidates_of_another_shape(
    model_dir, reference, tmp_path, capsys, candidate
):
    file = write_latents(tmp_path / "cands" / "Latents" / "c.safetensors", torch.randn(candidate))
    out = tmp_path / "out"
    args = ["privacy-filter", *_common(model_dir, reference, out), "--candidates"]
    assert main([*args, str(tmp_path / "cands")]) == 1
    err = capsys.readouterr().err
    assert "FrameShapeError" in err and str(file) in err, err
    assert f"{tuple(candidate[-3:])}" in err and f"{SHAPE}" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cands"]
    file.unlink()
    write_latents(file, torch.randn(SHAPE))
    assert main([*args, str(tmp_path / "cands")]) == 0  # the corrected retry runs
    assert (out / "privacy_report.json").is_file()


def test_candidates_of_mixed_shapes_name_the_file(model_dir, reference, tmp_path, capsys):
    write_latents(tmp_path / "cands" / "a.safetensors", torch.randn(SHAPE))
    odd = write_latents(tmp_path / "cands" / "b.safetensors", torch.randn(4, 7, 7))
    args = ["privacy-filter", *_common(model_dir, reference, tmp_path / "out")]
    assert main([*args, "--candidates", str(tmp_path / "cands")]) == 1
    err = capsys.readouterr().err
    assert str(odd) in err and "(4, 7, 7)" in err and f"{SHAPE}" in err, err


def test_filter_cli_refuses_candidates_encoded_with_another_vae(model_dir, tmp_path, capsys):
    """Phantom videos encoded by ``echofast encode`` with two VAEs (same architecture, other
    weights): the latents have the same shape, so nothing else would notice."""
    from diffusers import AutoencoderKL
    from support.models import save_diffusers
    from support.weights import TINY_VAE

    videos = tmp_path / "videos"
    make = ["phantom", "--out", str(videos), "--num-videos", "6", "--frames", "4", "--fps", "2",
            "--size", "16", "--splits", "3,1,2", "--no-progress"]  # fmt: skip
    assert main(make) == 0
    for seed in (0, 1):
        save_diffusers(AutoencoderKL, TINY_VAE, tmp_path / f"vae{seed}", seed)
        encode = ["encode", "--vae", str(tmp_path / f"vae{seed}"), "--input", str(videos),
                  "--out", str(tmp_path / f"latents{seed}"), "--no-progress"]  # fmt: skip
        assert main(encode) == 0
    out = tmp_path / "out"
    args = ["privacy-filter", *_common(model_dir, tmp_path / "latents0", out), "--candidates"]
    capsys.readouterr()
    assert main([*args, str(tmp_path / "latents1")]) == 1
    err = capsys.readouterr().err
    assert "EncodingMismatchError" in err and "vae_sha256" in err, err
    assert str(tmp_path / "latents1" / "encode.json") in err, err
    assert not out.exists()
    assert main([*args, str(tmp_path / "latents0")]) == 0  # the reference's own VAE: filtered
    assert (out / "privacy_report.json").is_file()


def test_scoring_refuses_frames_of_another_shape(flt):
    assert flt.frame_shape == SHAPE
    with pytest.raises(FrameShapeError, match=r"cand: .*\(4, 7, 7\).*\(4, 6, 6\)"):
        flt.score_clips([torch.randn(4, 7, 7)], ["cand"])
    with pytest.raises(FrameShapeError, match=r"\(3, 6, 6\).*\(4, 6, 6\)"):
        flt.score_frames(torch.randn(2, 3, 6, 6))
    assert len(flt.score_clips([torch.randn(SHAPE)], ["ok"]).names) == 1


def test_reference_splits_must_share_the_frame_shape(model_dir, tmp_path):
    root = _reference(tmp_path / "ref", {"TEST": (4, 8, 8)})
    with pytest.raises(FrameShapeError, match=r"test_0\.safetensors.*\(4, 8, 8\).*\(4, 6, 6\)"):
        setup_filter(model_dir, root)


def test_reference_channels_must_suit_the_model(model_dir, tmp_path):
    root = _reference(tmp_path / "ref", {split: (3, 6, 6) for split in SPLITS})
    with pytest.raises(PrivacyError, match=r"\(3, 6, 6\).*4-channel"):
        setup_filter(model_dir, root)
    bare = tmp_path / model_dir.name
    bare.mkdir()
    for name in ("config.json", f"{model_dir.name}_best_network.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(PrivacyError, match=r"TEST latent frames of shape \(3, 6, 6\)"):
        setup_filter(bare, root)  # no evaluation.json: the AUC is computed on TEST


def test_audit_refuses_heldout_frames_of_another_shape(model_dir, flt, tmp_path, capsys):
    root = _reference(tmp_path / "ref", {"VAL": (4, 7, 7)})
    setup = FilterSetup(flt, {}, {}, True)
    with pytest.raises(FrameShapeError, match=r"val_0\.safetensors.*\(4, 7, 7\).*\(4, 6, 6\)"):
        run_audit(setup, root, num_planted=2, strengths=(0.5,))
    out = tmp_path / "audit"
    args = ["privacy-audit", *_common(model_dir, root, out), "--num-planted", "2"]
    assert main([*args, "--strengths", "0.5"]) == 1
    assert "val_0.safetensors" in capsys.readouterr().err and not out.exists()


def test_cache_keeps_the_frame_shape_and_an_old_cache_is_recalibrated(
    model_dir, reference, flt, tmp_path
):
    from safetensors import safe_open

    cache = tmp_path / "reference.safetensors"
    flt.save(cache)
    assert PrivacyFilter.load(cache, flt.model).frame_shape == SHAPE
    with safe_open(str(cache), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "frame_shape"}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - no iter
    save_file(tensors, str(cache), metadata=meta)
    again = setup_filter(model_dir, reference, cache=cache).filter
    assert again.frame_shape == SHAPE and again.tau == flt.tau
    assert PrivacyFilter.load(cache, flt.model).frame_shape == SHAPE


@pytest.mark.parametrize("command", ["privacy-filter", "privacy-audit"])
def test_non_empty_out_is_refused_before_the_work(
    model_dir, reference, tmp_path, monkeypatch, command
):
    def no_work(*args, **kwargs):
        raise AssertionError("the filter was set up before --out was checked")

    monkeypatch.setattr(privacy_cli, "setup_filter", no_work)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    extra = ["--candidates", str(reference)] if command == "privacy-filter" else []
    with pytest.raises(privacy_cli.OutputConflict, match="not empty"):
        getattr(privacy_cli, f"main_{command.replace('-', '_')}")(
            [*_common(model_dir, reference, out), *extra]
        )
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("command", ["privacy-filter", "privacy-audit"])
@pytest.mark.parametrize(
    ("tolerance", "message"),
    [
        ("3", r"--shift-tolerance 3: .*reference.* \(TRAIN\) has 6x6 latent frames .* at most 2"),
        ("100", r"--shift-tolerance 100: .* 6x6 latent frames .* at most 2"),
        ("-1", r"--shift-tolerance must be >= 0, got -1"),
    ],
    ids=["3", "100", "-1"],
)
def test_shift_tolerance_the_frames_do_not_allow_is_refused_before_the_work(
    model_dir, reference, tmp_path, capsys, monkeypatch, command, tolerance, message
):
    """A ring as wide as half the latent frame left nothing to embed (an untyped RuntimeError
    from torch after the candidates were read and the filter set up)."""

    def no_work(*args, **kwargs):
        raise AssertionError("work began before --shift-tolerance was checked")

    monkeypatch.setattr(privacy_cli, "setup_filter", no_work)
    monkeypatch.setattr("echofast.privacy.data.load_candidates", no_work)
    out = tmp_path / "out"
    extra = ["--candidates", str(reference)] if command == "privacy-filter" else []
    args = [command, *_common(model_dir, reference, out), *extra]
    assert main([*args, "--shift-tolerance", tolerance]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: ShiftToleranceError: {message}", err), err
    assert list(tmp_path.iterdir()) == []


def test_setup_filter_checks_the_shift_tolerance_first(model_dir, reference, monkeypatch):
    import echofast.privacy.filter as privacy_filter
    import echofast.privacy.report as privacy_report

    def no_work(*args, **kwargs):
        raise AssertionError("work began before shift_tolerance was checked")

    monkeypatch.setattr(privacy_report, "model_strength", no_work)
    monkeypatch.setattr(privacy_filter, "load_split_frames", no_work)
    with pytest.raises(ShiftToleranceError, match=r"shift_tolerance 3: .* 6x6 latent frames"):
        setup_filter(model_dir, reference, shift_tolerance=3)
    model = ReIdentificationModel(layers=(1, 1, 1, 1), width=8, n_features=32)
    with pytest.raises(ShiftToleranceError, match=r"shift_tolerance 3: .* 6x6 latent frames"):
        PrivacyFilter.from_reference(model, reference, shift_tolerance=3)


def test_largest_shift_tolerance_the_frames_allow_filters(model_dir, reference, tmp_path):
    out = tmp_path / "out"
    args = ["privacy-filter", *_common(model_dir, reference, out), "--candidates"]
    assert main([*args, str(reference), "--shift-tolerance", "2"]) == 0
    report = json.loads((out / "privacy_report.json").read_text())
    assert '"shift_tolerance": 2' in json.dumps(report)
