"""``echofast encode``: latents equal the VAE's posterior mean × scaling_factor, resume, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from support.models import rel_err, save_diffusers
from support.weights import TINY_VAE

from echofast.data import LatentFrameDataset, LatentVideoDataset, write_filelist
from echofast.data.datasets import DatasetError
from echofast.data.echonet import read_filelist
from echofast.data.encode import EncodeConflict, main_encode
from echofast.fsutil import sha256_file
from echofast.io import read_video, write_video

SPEC = [("v0", 7, 50.0, "TRAIN"), ("v1.avi", 5, 32.0, "TRAIN"), ("v2", 6, 30.0, "VAL")]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("vae")
    model = save_diffusers(AutoencoderKL, TINY_VAE, folder)
    return folder, model


@pytest.fixture
def videos(tmp_path):
    root = tmp_path / "videos"
    rng = np.random.default_rng(0)
    rows = []
    for name, n, fps, split in SPEC:
        frames = rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)
        frames = np.cumsum(frames, axis=2, dtype=np.uint8)  # some structure for MJPEG
        write_video(root / "Videos" / f"{name.removesuffix('.avi')}.avi", frames, fps)
        rows.append({"FileName": name, "EF": 50 + len(rows), "FPS": fps, "Split": split})
    write_filelist(root, rows)
    return root


def _encode(vae_dir, src, out, *extra) -> int:
    args = ["--vae", str(vae_dir), "--input", str(src), "--out", str(out), "--no-progress"]
    return main_encode([*args, "--batch-size", "3", "--device", "cpu", *extra])


def _latents(path):
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor("latents"), fh.metadata()


def test_latents_match_vae_posterior_mean(tiny_vae, videos, tmp_path):
    vae_dir, ref = tiny_vae
    out = tmp_path / "lat"
    assert _encode(vae_dir, videos, out) == 0
    for name, n, fps, _ in SPEC:
        stem = name.removesuffix(".avi")
        got, meta = _latents(out / "Latents" / f"{stem}.safetensors")
        frames, _ = read_video(videos / "Videos" / f"{stem}.avi")
        x = (frames.float() / 128 - 1)[:, None].repeat(1, 3, 1, 1)
        with torch.no_grad():
            want = ref.encode(x).latent_dist.mean * ref.config.scaling_factor
        assert got.dtype == torch.float32 and got.shape == (n, 4, 8, 8) == want.shape
        assert rel_err(got, want) <= 1e-5
        assert float(meta["fps"]) == fps and int(meta["frames"]) == n
    with open(out / "FileList.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["FileName"] for r in rows] == ["v0", "v1.avi", "v2"]
    assert [int(r["NumberOfFrames"]) for r in rows] == [7, 5, 6]
    assert [float(r["FPS"]) for r in rows] == [50.0, 32.0, 30.0]
    manifest = json.loads((out / "encode.json").read_text())
    assert manifest["scaling_factor"] == TINY_VAE["scaling_factor"]
    # the trainers' readers load it
    item = LatentVideoDataset(out, "TRAIN", frames=4, random_window=False)[1]
    assert item["latents"].shape == (4, 4, 8, 8) and item["name"] == "v1"
    assert float(item["ef"]) == pytest.approx(0.51)
    assert LatentFrameDataset(out, "VAL")[0].shape == (4, 8, 8)


def test_resume_skips_finished_videos(tiny_vae, videos, tmp_path, capsys):
    vae_dir, _ = tiny_vae
    out = tmp_path / "lat"
    assert _encode(vae_dir, videos, out) == 0
    files = sorted((out / "Latents").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    assert _encode(vae_dir, videos, out) == 0
    printed = capsys.readouterr().out
    assert "encoded 0 video(s)" in printed and "3 already done; FileList.csv lists 3" in printed
    assert {p.name: p.stat().st_mtime_ns for p in files} == stamps
    (out / "Latents" / "v1.safetensors").unlink()
    (out / "Latents" / "v2.safetensors").write_bytes(b"torn")  # not a finished file
    assert _encode(vae_dir, videos, out) == 0
    assert "encoded 2 video(s)" in capsys.readouterr().out
    assert (out / "Latents" / "v0.safetensors").stat().st_mtime_ns == stamps["v0.safetensors"]
    assert _latents(out / "Latents" / "v2.safetensors")[0].shape == (6, 4, 8, 8)
    assert not list((out / "Latents").glob(".*.tmp"))


def test_resume_encodes_again_a_video_replaced_under_its_name(tiny_vae, videos, tmp_path, capsys):
    """A dataset regenerated (or replaced) under the same FileNames and encoded again into the
    same --out: the changed video is encoded again, the others kept (its old latents were kept
    as 'already done', beside the new FileList row's EF)."""
    vae_dir, ref = tiny_vae
    out = tmp_path / "lat"
    assert _encode(vae_dir, videos, out) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "Latents").iterdir()}
    frames = np.full((7, 16, 16), 200, dtype=np.uint8)
    write_video(videos / "Videos" / "v0.avi", frames, 50.0)
    capsys.readouterr()
    assert _encode(vae_dir, videos, out) == 0
    assert "encoded 1 video(s) in" in capsys.readouterr().out
    got, meta = _latents(out / "Latents" / "v0.safetensors")
    decoded, _ = read_video(videos / "Videos" / "v0.avi")
    x = (decoded.float() / 128 - 1)[:, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mean * ref.config.scaling_factor
    assert rel_err(got, want) <= 1e-5
    assert meta["source_sha256"] == sha256_file(videos / "Videos" / "v0.avi")
    for name in ("v1.safetensors", "v2.safetensors"):
        assert (out / "Latents" / name).stat().st_mtime_ns == stamps[name]


def test_corrupt_video_is_reported_and_others_encoded(tiny_vae, videos, tmp_path, capsys):
    vae_dir, _ = tiny_vae
    (videos / "Videos" / "v1.avi").write_bytes(b"RIFF not really a video")
    out = tmp_path / "lat"
    assert _encode(vae_dir, videos, out) == 1
    printed = capsys.readouterr()
    assert "encoded 2 video(s)" in printed.out and "FileList.csv lists 2" in printed.out
    err = printed.err
    assert "1 video(s) failed" in err and "v1" in err and "v1.avi" in err
    assert sorted(p.name for p in (out / "Latents").iterdir()) == [
        "v0.safetensors",
        "v2.safetensors",
    ]
    with open(out / "FileList.csv", newline="") as fh:
        assert [r["FileName"] for r in csv.DictReader(fh)] == ["v0", "v2"]


def test_non_finite_latents_are_reported_not_written(
    tiny_vae, videos, tmp_path, monkeypatch, capsys
):
    from echofast.data import encode

    real = encode.encode_frames

    def nan_for_v1(vae, frames, **kw):  # v1 is the 5-frame video
        if len(frames) == 5:
            return torch.full((5, 4, 2, 2), float("nan"))
        return real(vae, frames, **kw)

    monkeypatch.setattr(encode, "encode_frames", nan_for_v1)
    out = tmp_path / "lat"
    assert _encode(tiny_vae[0], videos, out) == 1
    err = capsys.readouterr().err
    assert "1 video(s) failed" in err and "v1" in err and "non-finite latents" in err
    assert sorted(p.name for p in (out / "Latents").iterdir()) == [
        "v0.safetensors",
        "v2.safetensors",
    ]


def test_refusals(tiny_vae, videos, tmp_path):
    from diffusers import AutoencoderKL

    vae_dir, _ = tiny_vae
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(EncodeConflict, match="not an echofast latent dataset"):
        _encode(vae_dir, videos, foreign)
    out = tmp_path / "lat"
    assert _encode(vae_dir, videos, out) == 0
    other = tmp_path / "other_vae"
    save_diffusers(AutoencoderKL, TINY_VAE, other, seed=5)
    with pytest.raises(EncodeConflict, match="another VAE"):
        _encode(other, videos, out)
    with pytest.raises(EncodeConflict, match=r"differs in \['dtype'\]"):
        _encode(vae_dir, videos, out, "--dtype", "bfloat16")
    with pytest.raises(EncodeConflict, match="differ"):
        _encode(vae_dir, videos, videos)


def test_input_without_its_videos_is_refused_before_writing(tiny_vae, videos, tmp_path):
    vae_dir, _ = tiny_vae
    latents = tmp_path / "lat"
    assert _encode(vae_dir, videos, latents) == 0
    out = tmp_path / "again"
    with pytest.raises(DatasetError, match=r"lat is a latent dataset \(encode.json\)"):
        _encode(vae_dir, latents, out)
    assert not out.exists()
    for video in (videos / "Videos").iterdir():
        video.unlink()
    with pytest.raises(DatasetError, match=r"none of the 3 video\(s\) .*\(first: .*v0\.avi\)"):
        _encode(vae_dir, videos, out)
    assert not out.exists()


def test_weights_root_and_real_size(tmp_path):
    """A weights root (holding vae/) is accepted, and 112×112 frames give 4×14×14 latents with
    the reference's 4-block layout (here with few channels)."""
    from diffusers import AutoencoderKL

    config = dict(TINY_VAE, block_out_channels=[8, 8, 16, 16], norm_num_groups=4)
    config["down_block_types"] = ["DownEncoderBlock2D"] * 4
    config["up_block_types"] = ["UpDecoderBlock2D"] * 4
    ref = save_diffusers(AutoencoderKL, config, tmp_path / "weights" / "vae")
    src = tmp_path / "big"
    frames = np.random.default_rng(1).integers(0, 256, (2, 112, 112), dtype=np.uint8)
    write_video(src / "Videos" / "big.avi", frames, 32)
    write_filelist(src, [{"FileName": "big", "EF": 60, "FPS": 32, "Split": "TEST"}])
    assert _encode(tmp_path / "weights", src, tmp_path / "lat") == 0
    got, _ = _latents(tmp_path / "lat" / "Latents" / "big.safetensors")
    assert got.shape == (2, 4, 14, 14)
    decoded, _ = read_video(src / "Videos" / "big.avi")
    x = (decoded.float() / 128 - 1)[:, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mean * ref.config.scaling_factor
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["v0", "../v1"], "not a plain file name"),
        (["v0", ".."], "not a plain file name"),
        (["v0", "v0.avi"], "same video as 'v0'"),
        (["v0", "sub\\v1"], "not a plain file name"),
    ],
)
def test_unsafe_or_duplicate_filenames_are_refused(tiny_vae, videos, tmp_path, names, message):
    write_filelist(videos, [{"FileName": n, "EF": 50} for n in names])
    out = tmp_path / "lat"
    with pytest.raises(DatasetError, match=message):
        _encode(tiny_vae[0], videos, out)
    assert not out.exists()


def test_read_filelist_bom_and_bad_bytes(tmp_path):
    path = tmp_path / "FileList.csv"
    path.write_bytes(b"\xef\xbb\xbfFileName,EF\r\nv0,50\r\n")
    assert read_filelist(path) == [{"FileName": "v0", "EF": "50"}]
    path.write_bytes(b"FileName,EF\nv\xe9,50\n")
    with pytest.raises(ValueError, match="FileList.csv: not UTF-8"):
        read_filelist(path)


def test_filelist_keeps_all_columns_with_the_decoded_fps_and_frames(tiny_vae, videos, tmp_path):
    (videos / "FileList.csv").write_text(
        "FileName,EF,Split,FPS,Notes\nv0,50,TRAIN,99,a\nv1.avi,51,TRAIN,99,b\nv2,52,VAL,99,c\n"
    )
    out = tmp_path / "lat"
    assert _encode(tiny_vae[0], videos, out) == 0
    assert float(_latents(out / "Latents" / "v0.safetensors")[1]["fps"]) == 50.0
    header, *lines = (out / "FileList.csv").read_text().splitlines()
    assert header == "FileName,EF,Split,FPS,Notes,NumberOfFrames"
    rows = [line.split(",") for line in lines]
    assert [(n, ef, s, float(fps), x, int(t)) for n, ef, s, fps, x, t in rows] == [
        ("v0", "50", "TRAIN", 50.0, "a", 7),
        ("v1.avi", "51", "TRAIN", 32.0, "b", 5),
        ("v2", "52", "VAL", 30.0, "c", 6),
    ]


def test_resume_redoes_foreign_files_and_clears_temporaries(tiny_vae, videos, tmp_path, capsys):
    """A readable (T, C, h, w) file counts as finished (its FPS from the FileList when it has
    no fps metadata); a file of another shape is redone; a crashed run's temporaries go."""
    from safetensors.torch import save_file

    out = tmp_path / "lat"
    assert _encode(tiny_vae[0], videos, out) == 0
    save_file({"latents": torch.zeros(7, 4, 8, 8)}, str(out / "Latents" / "v0.safetensors"))
    save_file({"latents": torch.zeros(5, 8, 8)}, str(out / "Latents" / "v1.safetensors"))
    temporary = out / "Latents" / ".v2.safetensors.x1y2.tmp"
    temporary.write_bytes(b"half")
    capsys.readouterr()
    assert _encode(tiny_vae[0], videos, out) == 0
    assert "encoded 1 video(s)" in capsys.readouterr().out
    assert _latents(out / "Latents" / "v1.safetensors")[0].shape == (5, 4, 8, 8)
    assert not temporary.exists()
    rows = read_filelist(out / "FileList.csv")
    got = [(float(r["FPS"]), int(r["NumberOfFrames"])) for r in rows]
    assert got == [(50.0, 7), (32.0, 5), (30.0, 6)]  # v0: the FileList's 50.0


def test_manifest_mismatch_and_damage_are_refused(tiny_vae, videos, tmp_path):
    """Same weights with another architecture config, or another scaling factor, is another
    VAE; an unreadable encode.json is not guessed at."""
    import shutil

    vae_dir, _ = tiny_vae
    out = tmp_path / "lat"
    assert _encode(vae_dir, videos, out) == 0
    other = tmp_path / "regrouped_vae"
    shutil.copytree(vae_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "norm_num_groups": 4}))
    with pytest.raises(EncodeConflict, match=r"differs in \['vae_sha256'\]"):
        _encode(other, videos, out)
    manifest = json.loads((out / "encode.json").read_text())
    (out / "encode.json").write_text(json.dumps({**manifest, "scaling_factor": 0.18215}))
    with pytest.raises(EncodeConflict, match=r"differs in \['scaling_factor'\]"):
        _encode(vae_dir, videos, out)
    (out / "encode.json").write_text("{not json")
    with pytest.raises(EncodeConflict, match="unreadable manifest"):
        _encode(vae_dir, videos, out)


def test_vae_digest_covers_the_files_the_vae_loads(tiny_vae, tmp_path):
    """The manifest's VAE digest changes with the weights the VAE loads (single file or shards)
    and its config, not with another variant's file or a stray file beside them."""
    import shutil

    from echofast.data.encode import _vae_digest
    from echofast.models import VAE

    folder = tmp_path / "vae"
    shutil.copytree(tiny_vae[0], folder)
    base = _vae_digest(folder)
    model = VAE.from_pretrained(folder)
    model.half().save_pretrained(tmp_path / "half", variant="fp16")  # (its config differs)
    shutil.copy(tmp_path / "half" / "diffusion_pytorch_model.fp16.safetensors", folder)
    (folder / "diffusion_pytorch_model-old.safetensors").write_bytes(b"stray")
    assert _vae_digest(folder) == base
    with torch.no_grad():
        model.float().decoder.conv_out.bias.add_(1)
    model.save_pretrained(folder)
    changed = _vae_digest(folder)
    assert changed != base
    model.save_pretrained(folder, max_shard_size=20_000)
    shards = sorted(folder.glob("diffusion_pytorch_model-0*.safetensors"))
    assert len(shards) > 1 and _vae_digest(folder) not in (base, changed)
    assert _vae_digest(folder).count("+") == len(shards)


def test_bad_arguments(tiny_vae, videos, tmp_path, capsys):
    from echofast.data.encode import EncodeConfig, encode_dataset

    out = tmp_path / "lat"
    with pytest.raises(SystemExit) as exit_:
        _encode(tiny_vae[0], videos, out, "--batch-size", "0")
    assert exit_.value.code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err
    base = dict(vae=str(tiny_vae[0]), input=str(videos), out=str(out), progress=False)
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        encode_dataset(EncodeConfig(**base, batch_size=0))
    with pytest.raises(ValueError, match="dtype must be one of"):
        encode_dataset(EncodeConfig(**base, dtype="float64"))
    write_filelist(videos, [])
    with pytest.raises(DatasetError, match="lists no videos"):
        encode_dataset(EncodeConfig(**base))
    assert not out.exists()


def test_out_reaching_the_input_by_another_path_is_refused(tiny_vae, videos):
    with pytest.raises(EncodeConflict, match="--out must differ from --input"):
        _encode(tiny_vae[0], videos, videos / "Videos" / "..")


def test_latents_with_one_infinite_value_are_reported(tiny_vae, videos, tmp_path, monkeypatch):
    from echofast.data import encode

    real = encode.encode_frames

    def inf_in_v2(vae, frames, **kw):  # v2 is the 6-frame video
        latents = real(vae, frames, **kw)
        if len(frames) == 6:
            latents[5, 3, 0, 1] = float("inf")
        return latents

    monkeypatch.setattr(encode, "encode_frames", inf_in_v2)
    out = tmp_path / "lat"
    assert _encode(tiny_vae[0], videos, out) == 1
    assert not (out / "Latents" / "v2.safetensors").exists()


def test_cli_batch_size_reaches_the_vae(tiny_vae, videos, tmp_path, monkeypatch):
    from echofast.data import encode

    real, sizes = encode.encode_frames, []

    def spy(vae, frames, **kw):
        sizes.append(kw["batch_size"])
        return real(vae, frames, **kw)

    monkeypatch.setattr(encode, "encode_frames", spy)
    assert _encode(tiny_vae[0], videos, tmp_path / "lat") == 0
    assert sizes == [3, 3, 3]


def test_vae_folder_prefers_its_own_config(tmp_path):
    from echofast.data.encode import vae_folder

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    assert vae_folder(tmp_path) == tmp_path / "vae"
    (tmp_path / "config.json").write_text("{}")
    assert vae_folder(tmp_path) == tmp_path
