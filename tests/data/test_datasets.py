"""Dataset readers: FileList parsing, fps resampling, windows, padding, latent datasets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from echofast.data import (
    DatasetError,
    EchoVideoDataset,
    FrameDataset,
    LatentFrameDataset,
    LatentVideoDataset,
    read_records,
    resample_indices,
    window_indices,
    write_filelist,
)
from echofast.data.datasets import normalize_split, phase_offsets, to_model_pixels
from echofast.io import read_video, write_video


def reference_indices(n: int, fps: float, target: float) -> np.ndarray:
    """echosyn/common/datasets.py (Latent): new count, then linspace(0, n, m, endpoint=False)."""
    m = int(np.floor(target / fps * n))
    return np.linspace(0, n, m, endpoint=False).round().astype(int)


@pytest.mark.parametrize(
    "n, fps, target",
    [
        (100, 50, 32),
        (211, 50, 32),
        (64, 32, 32),
        (30, 30, 32),
        (97, 47, 32),
        # target / fps * n rounds just below an integer, target * n / fps does not
        (39, 20.8, 32),
    ],
)
def test_resample_indices_match_reference(n, fps, target):
    ours = resample_indices(n, fps, target)
    np.testing.assert_array_equal(ours, reference_indices(n, fps, target))
    assert len(ours) == math.floor(target / fps * n)
    assert ours.min() >= 0 and ours.max() < n
    # "nearest frame at time i / target": within one source frame of i * fps / target
    assert np.abs(ours - np.arange(len(ours)) * fps / target).max() <= 1.0


def test_resample_edge_cases():
    np.testing.assert_array_equal(resample_indices(10, 32, 32), np.arange(10))
    assert len(resample_indices(1, 50, 32)) == 1  # floor gives 0: keep one frame
    assert len(resample_indices(0, 50, 32)) == 0
    np.testing.assert_array_equal(resample_indices(10, 50, 32, offset=1), [1, 3, 4, 6, 8, 9])
    with pytest.raises(ValueError):
        resample_indices(10, 0, 32)


def test_windows_eval_train_and_short():
    idx, valid = window_indices(200, 50, 32, 64)
    np.testing.assert_array_equal(idx, reference_indices(200, 50, 32)[:64])
    assert valid == 64
    idx, valid = window_indices(40, 50, 32, 64)  # 25 resampled frames: padded later
    assert valid == 25 and len(idx) == 25
    m = len(reference_indices(200, 50, 32))  # 128
    starts, offsets = set(), set()
    for s in range(300):
        idx, valid = window_indices(200, 50, 32, 64, np.random.default_rng(s))
        assert valid == 64 and idx.max() < 200
        assert np.all(np.diff(idx) >= 1)
        base = reference_indices(200, 50, 32)
        hits = [
            (st, off)
            for st in range(m - 64 + 1)
            for off in range(phase_offsets(200, 50, 32))
            if np.array_equal(base[st : st + 64] + off, idx)
        ]
        assert hits
        starts.add(hits[0][0])
        offsets.add(hits[0][1])
    assert 0 in starts and m - 64 in starts  # the last start is reachable (reference: never)
    assert offsets == {0, 1}


def test_normalize_split():
    assert [normalize_split(s) for s in ("train", " Val ", "TEST", "3", "8", "9")] == [
        "TRAIN",
        "VAL",
        "TEST",
        "TRAIN",
        "VAL",
        "TEST",
    ]


SPEC_SPLITS = {  # spec "Output dataset": the reference datasets' TRAIN/VAL/TEST sizes
    "dynamic": (7465, 1288, 1277),  # EchoNet-Dynamic, 10,030 videos
    "ped_a4c": (2580, 336, 368),  # EchoNet-Pediatric A4C, 3,284 videos
    "ped_psax": (3559, 448, 519),  # EchoNet-Pediatric PSAX, 4,526 videos
}


@pytest.mark.parametrize(
    "dataset, num_videos, expected",
    [
        ("dynamic", 10030, (7465, 1288, 1277)),
        ("ped_a4c", 3284, (2580, 336, 368)),
        ("ped_psax", 4526, (3559, 448, 519)),
        # scaled: TRAIN and VAL the nearest integers to their shares, TEST the remainder
        ("dynamic", 1000, (744, 128, 128)),  # shares 744.27, 128.41, 127.32
        ("dynamic", 20000, (14885, 2568, 2547)),  # 14885.34, 2568.30, 2546.36
        ("ped_a4c", 1000, (786, 102, 112)),  # 785.63, 102.31, 112.06
        ("ped_psax", 1000, (786, 99, 115)),  # 786.35, 98.98, 114.67
    ],
)
def test_split_counts_follow_the_reference_proportions(dataset, num_videos, expected):
    """split_counts without given splits: the reference dataset's proportions (spec) scaled to
    ``num_videos``; TEST takes the rounding remainder (docstring)."""
    from fractions import Fraction

    from echofast.data import split_counts, split_of

    counts = split_counts(num_videos, None, dataset)
    assert counts == expected and sum(counts) == num_videos
    ref = SPEC_SPLITS[dataset]
    for count, share in zip(counts[:2], ref[:2]):
        assert abs(count - Fraction(num_videos * share, sum(ref))) < Fraction(1, 2)
    train, val, _ = counts
    edges = {0: "TRAIN", train - 1: "TRAIN", train: "VAL", train + val - 1: "VAL"}
    edges.update({train + val: "TEST", num_videos - 1: "TEST"})
    assert {i: split_of(i, counts) for i in edges} == edges


# ------------------------------------------------------------------------------------------
# Video datasets (constant frames of value 4·t identify the decoded frame)
# ------------------------------------------------------------------------------------------


def _video_dataset(root: Path, spec: list[tuple[str, int, float, str]]) -> Path:
    rows = []
    for name, n, fps, split in spec:
        frames = (np.arange(n, dtype=np.uint8)[:, None, None] * 4).repeat(16, 1).repeat(16, 2)
        write_video(root / "Videos" / f"{Path(name).stem}.avi", frames, fps)
        rows.append(
            {
                "FileName": name,
                "EF": 40 + len(rows),
                "FPS": fps,
                "NumberOfFrames": n,
                "FrameHeight": 16,
                "FrameWidth": 16,
                "Split": split,
            }
        )
    write_filelist(root, rows)
    return root


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return _video_dataset(
        root,
        [("a", 50, 50.0, "train"), ("b.avi", 20, 25.0, "TRAIN"), ("c", 12, 30.0, "VAL")],
    )


def _frame_ids(video: torch.Tensor) -> np.ndarray:
    return np.rint(video.float().mean((1, 2)).numpy() / 4).astype(int)


def test_records(videos, tmp_path):
    recs = read_records(videos, "TRAIN")
    assert [r.name for r in recs] == ["a", "b"]
    assert recs[1].path == videos / "Videos" / "b.avi" and recs[1].fps == 25.0
    assert recs[0].ef == 40.0 and recs[0].num_frames == 50 and recs[0].split == "TRAIN"
    assert [r.name for r in read_records(videos, ["val", "test"])] == ["c"]
    assert len(read_records(videos, "ALL")) == len(read_records(videos, None)) == 3
    (videos / "Videos" / "c.avi").rename(tmp_path / "c.avi")
    try:
        assert [r.name for r in read_records(videos, None)] == ["a", "b"]
    finally:
        (tmp_path / "c.avi").rename(videos / "Videos" / "c.avi")
    with pytest.raises(DatasetError, match="FileList"):
        read_records(tmp_path)
    with pytest.raises(DatasetError, match="no videos"):
        EchoVideoDataset(videos, "TEST")


def test_video_dataset_windows(videos):
    ds = EchoVideoDataset(videos, "TRAIN", frames=16, target_fps=32, random_window=False)
    item = ds[0]
    assert item["video"].shape == (16, 16, 16) and item["video"].dtype == torch.uint8
    assert item["valid"] == 16 and item["name"] == "a" and item["fps"] == 32.0
    assert item["ef"].dtype == torch.float32 and float(item["ef"]) == pytest.approx(0.40)
    np.testing.assert_array_equal(_frame_ids(item["video"]), reference_indices(50, 50, 32)[:16])
    short = ds[1]  # 20 frames at 25 fps → 25 resampled frames (upsampled)
    np.testing.assert_array_equal(
        _frame_ids(short["video"][: short["valid"]]), reference_indices(20, 25, 32)[:16]
    )
    ds = EchoVideoDataset(videos, "VAL", frames=16, target_fps=32, random_window=False)
    item = ds[0]  # 12 frames at 30 fps → 12 resampled frames, padded with 4 zeros
    assert item["valid"] == 12
    assert item["video"][12:].abs().sum() == 0
    np.testing.assert_array_equal(_frame_ids(item["video"][:12]), reference_indices(12, 30, 32))
    train = EchoVideoDataset(videos, "TRAIN", frames=16, seed=3)
    first = train[0]["video"]
    assert torch.equal(train[0]["video"], first)  # seeded: reproducible
    seen = set()
    for epoch in range(8):
        train.set_epoch(epoch)
        seen.add(tuple(_frame_ids(train[0]["video"])))
    assert len(seen) > 1
    kept = EchoVideoDataset(videos, "TRAIN", frames=30, drop_short=True).records
    assert [r.name for r in kept] == ["a"]  # b lasts 0.8 s < 30 frames at 32 fps


def _set_filelist_column(root: Path, column: str, values: dict[str, str]) -> None:
    """Rewrite FileList.csv with ``column`` set to ``values[FileName]`` (others kept)."""
    import csv

    path = root / "FileList.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row[column] = values.get(row["FileName"], row[column])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_video_dataset_refuses_rows_without_a_numeric_ef(tmp_path):
    spec = [(name, 8, 32.0, "VAL" if name == "b" else "TRAIN") for name in "abcde"]
    root = _video_dataset(tmp_path / "v", spec)
    _set_filelist_column(root, "EF", {"c": "", "d": "abc", "e": "nan"})
    filelist = str(root / "FileList.csv")
    with pytest.raises(DatasetError) as caught:
        EchoVideoDataset(root, "TRAIN", frames=4)
    message = str(caught.value)
    assert message.startswith(f"{filelist}: 3 of 4 row(s) of split 'TRAIN' have no usable EF")
    assert "in column 'EF'" in message
    assert "row 3 (FileName 'c'): EF is empty" in message
    assert "row 4 (FileName 'd'): EF 'abc' is not a number" in message
    assert "row 5 (FileName 'e'): EF 'nan' is not finite" in message
    assert float(EchoVideoDataset(root, "VAL", frames=4)[0]["ef"]) == pytest.approx(0.41)
    lenient = EchoVideoDataset(root, "TRAIN", frames=4, require_ef=False, random_window=False)
    assert [r.name for r in lenient.records] == ["a", "c", "d", "e"]
    assert float(lenient[0]["ef"]) == pytest.approx(0.40)
    assert all(math.isnan(float(lenient[i]["ef"])) for i in (1, 2, 3))


def test_video_dataset_names_a_missing_ef_column(tmp_path):
    root = _video_dataset(tmp_path / "v", [("a", 8, 32.0, "TRAIN")])
    path = root / "FileList.csv"
    path.write_text("FileName,FPS,Split\na,32.0,TRAIN\n")
    with pytest.raises(DatasetError, match=r"FileList.csv: no column 'EF' \(columns: 'FileName', "):
        EchoVideoDataset(root, "TRAIN", frames=4)
    assert math.isnan(float(EchoVideoDataset(root, "TRAIN", frames=4, require_ef=False)[0]["ef"]))


def test_read_records_takes_non_finite_numbers_as_missing(tmp_path):
    (tmp_path / "FileList.csv").write_text("FileName,EF,FPS,NumberOfFrames\nv,inf,nan,1e400\n")
    (record,) = read_records(tmp_path, require_files=False)
    assert (record.ef, record.fps, record.num_frames, record.row_number) == (None, None, None, 1)


def test_frame_dataset(videos):
    ds = FrameDataset(videos, "TRAIN", size=None)
    assert len(ds) == 50 + 20
    x = ds[53]  # video b, frame 3
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    frames, _ = read_video(videos / "Videos" / "b.avi")
    torch.testing.assert_close(x, frames[3].float().div(128).sub(1).expand(3, 16, 16))
    assert -1 <= x.min() and x.max() < 1
    resized = FrameDataset(videos, "TRAIN", size=8)[0]
    assert resized.shape == (3, 8, 8)
    sampled = FrameDataset(videos, "TRAIN", size=16, frames_per_video=3, seed=0)
    assert len(sampled) == 6 and sampled[4].shape == (3, 16, 16)
    assert torch.equal(sampled[4], sampled[4])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)))
    assert batch.shape == (4, 3, 16, 16)


def test_to_model_pixels():
    x = to_model_pixels(torch.tensor([[[0, 128, 255]]], dtype=torch.uint8))
    assert x.shape == (1, 3, 1, 3)
    torch.testing.assert_close(x[0, :, 0], torch.tensor([[-1.0, 0.0, 255 / 128 - 1]] * 3))


# ------------------------------------------------------------------------------------------
# Latent datasets (latents[t] = t identifies the frame)
# ------------------------------------------------------------------------------------------


def _latent_dataset(root: Path, spec: list[tuple[str, int, float, str]]) -> Path:
    (root / "Latents").mkdir(parents=True)
    rows = []
    for i, (name, n, fps, split) in enumerate(spec):
        lat = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, 3, 3)
        save_file(
            {"latents": lat.contiguous()},
            str(root / "Latents" / f"{name}.safetensors"),
            metadata={"fps": repr(fps)},
        )
        rows.append({"FileName": name, "EF": 10 * (i + 1), "FPS": fps, "Split": split})
    write_filelist(root, rows)
    return root


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    return _latent_dataset(
        root, [("x", 100, 50.0, "TRAIN"), ("y", 30, 32.0, "TRAIN"), ("z", 70, 32.0, "VAL")]
    )


def test_latent_video_dataset(latents):
    ds = LatentVideoDataset(latents, "TRAIN", frames=32, random_window=False)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"latents", "ef", "cond", "valid", "name"}
    assert item["latents"].shape == (32, 4, 3, 3) and item["latents"].dtype == torch.float32
    assert item["cond"].shape == (4, 3, 3) and item["valid"] == 32 and item["name"] == "x"
    assert float(item["ef"]) == pytest.approx(0.1)
    ids = item["latents"][:, 0, 0, 0].numpy()
    np.testing.assert_array_equal(ids, reference_indices(100, 50, 32)[:32])
    assert 0 <= float(item["cond"][0, 0, 0]) < 100  # drawn from the whole video
    assert torch.equal(ds[0]["cond"], item["cond"])  # evaluation: deterministic
    short = ds[1]  # 30 frames at 32 fps: 30 valid, 2 zero frames
    assert short["valid"] == 30 and short["latents"][30:].abs().sum() == 0
    np.testing.assert_array_equal(short["latents"][:30, 0, 0, 0].numpy(), np.arange(30))

    train = LatentVideoDataset(latents, "TRAIN", frames=32, seed=1)
    a, b = train[0], train[0]
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["cond"], b["cond"])
    conds, starts = set(), set()
    for epoch in range(20):
        train.set_epoch(epoch)
        it = train[0]
        conds.add(float(it["cond"][0, 0, 0]))
        starts.add(float(it["latents"][0, 0, 0, 0]))
        assert it["valid"] == 32
    assert len(conds) > 5 and len(starts) > 3
    assert max(conds) > float(train[0]["latents"][-1, 0, 0, 0]) or min(conds) < 30
    unseeded = LatentVideoDataset(latents, "TRAIN", frames=32)
    assert len({float(unseeded[0]["cond"][0, 0, 0]) for _ in range(20)}) > 1

    loader = torch.utils.data.DataLoader(train, batch_size=2)
    batch = next(iter(loader))
    assert batch["latents"].shape == (2, 32, 4, 3, 3) and batch["cond"].shape == (2, 4, 3, 3)
    assert batch["ef"].dtype == torch.float32 and batch["ef"].shape == (2,)
    assert batch["valid"].tolist() == [32, 30] and batch["name"] == ["x", "y"]


def test_latent_frame_dataset(latents):
    ds = LatentFrameDataset(latents, "TRAIN", seed=0)
    assert len(ds) == 2
    x = ds[0]
    assert x.shape == (4, 3, 3) and x.dtype == torch.float32
    assert torch.equal(ds[0], x)
    values = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        values.add(float(ds[1][0, 0, 0]))
    assert len(values) > 5 and all(0 <= v < 30 for v in values)
    assert len(LatentFrameDataset(latents, "VAL")) == 1
    with pytest.raises(DatasetError):
        LatentFrameDataset(latents, "TEST")


def test_latent_dataset_fps_from_metadata(tmp_path):
    root = _latent_dataset(tmp_path / "m", [("v", 64, 64.0, "TRAIN")])
    text = (root / "FileList.csv").read_text().replace(",64.0,", ",,")
    (root / "FileList.csv").write_text(text)
    item = LatentVideoDataset(root, "TRAIN", frames=32, random_window=False)[0]
    np.testing.assert_array_equal(item["latents"][:, 0, 0, 0].numpy(), np.arange(0, 64, 2))


def test_latent_video_dataset_needs_ef(tmp_path):
    root = _latent_dataset(
        tmp_path / "n", [("a", 8, 32.0, "TRAIN"), ("b", 8, 32.0, "TRAIN"), ("c", 8, 32.0, "VAL")]
    )
    text = (root / "FileList.csv").read_text().replace("b,20,", "b,,").replace("c,30,", "c,,")
    (root / "FileList.csv").write_text(text)
    with pytest.raises(
        DatasetError,
        match=r"FileList.csv: 1 of 2 row\(s\) of split 'TRAIN' have no usable EF in column 'EF', "
        r"which conditions the LVDM: row 2 \(FileName 'b'\): EF is empty; .*require_ef=False",
    ):
        LatentVideoDataset(root, "TRAIN", frames=4)
    assert len(LatentVideoDataset(root, "VAL", frames=4, require_ef=False)) == 1
    item = LatentVideoDataset(root, "TRAIN", frames=4, require_ef=False)[1]
    assert item["name"] == "b" and math.isnan(float(item["ef"]))


def test_read_records_takes_a_byte_order_mark_and_names_bad_bytes(tmp_path):
    """Spreadsheet programs save CSV with a BOM; the column names must still be found."""
    from echofast.data.datasets import DatasetError, read_records

    path = tmp_path / "FileList.csv"
    path.write_bytes(b"\xef\xbb\xbfFileName,EF,Split\r\nv0,50,TRAIN\r\n")
    records = read_records(tmp_path, require_files=False)
    assert [(r.name, r.ef) for r in records] == [("v0", 50.0)]
    path.write_bytes(b"FileName,EF\nv\xe9,50\n")
    with pytest.raises(DatasetError, match="FileList.csv: not UTF-8"):
        read_records(tmp_path, require_files=False)


# ------------------------------------------------------------------------------------------
# FileList parsing, seeded draws and frame-rate errors
# ------------------------------------------------------------------------------------------


def test_read_records_needs_a_filename_column_and_names_the_file(tmp_path):
    (tmp_path / "FileList.csv").write_text("Name,EF,Split\na,50,TRAIN\n")
    with pytest.raises(DatasetError) as caught:
        read_records(tmp_path, require_files=False)
    assert (
        str(caught.value) == f"{tmp_path / 'FileList.csv'}: FileList lacks column(s) ['FileName']"
    )


def test_read_records_trims_names_skips_blank_rows_and_keeps_fractional_ef(tmp_path):
    (tmp_path / "Videos" / "dir.avi").mkdir(parents=True)  # a folder is not a video
    (tmp_path / "Videos" / "a.avi").write_bytes(b"")
    text = "FileName,EF,FPS,NumberOfFrames,Split\n a.avi ,52.5,50.0,17, val\n,40,,,VAL\n"
    (tmp_path / "FileList.csv").write_text(text + "dir,40,,,VAL\n")
    (rec,) = read_records(tmp_path, "VAL")
    assert (rec.name, rec.path, rec.split) == ("a", tmp_path / "Videos" / "a.avi", "VAL")
    assert rec.ef == 52.5 and rec.fps == 50.0 and rec.row_number == 1
    assert rec.num_frames == 17 and type(rec.num_frames) is int
    for split in (None, "all", [" All ", "VAL"]):
        names = [r.name for r in read_records(tmp_path, split, require_files=False)]
        assert names == ["a", "dir"]


def test_missing_ef_message_lists_ten_rows_then_counts_the_rest(tmp_path):
    (tmp_path / "FileList.csv").write_text(
        "FileName,EF,Split\nv1,  ,TRAIN\n" + "".join(f"v{i},,TRAIN\n" for i in range(2, 12))
    )
    records = read_records(tmp_path, "TRAIN", require_files=False)
    from echofast.data.datasets import _check_ef

    with pytest.raises(DatasetError) as caught:
        _check_ef(records, tmp_path / "FileList.csv", "TRAIN", "test")
    message = str(caught.value)
    assert "row 1 (FileName 'v1'): EF is empty;" in message
    assert "11 of 11 row(s)" in message and "row 10 (FileName 'v10')" in message
    assert "row 11 (" not in message and "; (+1 more);" in message


def test_resample_refuses_a_target_rate_that_is_not_positive():
    for target in (0, -32.0, None):
        with pytest.raises(ValueError, match="must be positive"):
            resample_indices(10, 32, target)


def test_heavy_upsampling_draws_phase_zero():
    """20 frames at 8 fps → 80 at 32 fps: idx[1] is 0, so the only phase is 0."""
    assert resample_indices(20, 8, 32)[1] == 0 and phase_offsets(20, 8, 32) == 1
    idx, valid = window_indices(20, 8, 32, 16, np.random.default_rng(0))
    assert valid == 16 and np.all(np.diff(idx) >= 0)


def test_seeded_video_windows_draw_from_seed_epoch_and_index(videos):
    """Module docstring: item i in epoch e draws from numpy.random.default_rng([seed, e, i])."""
    ds = EchoVideoDataset(videos, "TRAIN", frames=8, target_fps=32, seed=11)
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        for i, (n, fps) in enumerate([(50, 50.0), (20, 25.0)]):
            want, valid = window_indices(n, fps, 32, 8, np.random.default_rng([11, epoch, i]))
            item = ds[i]
            assert item["valid"] == valid
            np.testing.assert_array_equal(_frame_ids(item["video"]), want)


def test_sampled_frames_draw_from_seed_epoch_and_index(videos):
    ds = FrameDataset(videos, "TRAIN", size=None, frames_per_video=4, seed=2)
    frames, _ = read_video(videos / "Videos" / "a.avi")
    for i in range(4):
        k = int(np.random.default_rng([2, 0, i]).integers(len(frames)))
        torch.testing.assert_close(ds[i], to_model_pixels(frames[k]), rtol=0, atol=0)


def test_frame_count_comes_from_the_filelist_without_decoding(tmp_path):
    (tmp_path / "Videos").mkdir()
    (tmp_path / "Videos" / "a.avi").write_bytes(b"not decoded")
    write_filelist(tmp_path, [{"FileName": "a", "NumberOfFrames": 9, "Split": "TRAIN"}])
    assert len(FrameDataset(tmp_path, "TRAIN")) == 9


def test_frame_dataset_resizes_like_antialiased_bilinear(tmp_path):
    frames = np.random.default_rng(3).integers(0, 256, (2, 16, 16), dtype=np.uint8)
    write_video(tmp_path / "Videos" / "r.avi", frames, 25)
    write_filelist(tmp_path, [{"FileName": "r", "NumberOfFrames": 2, "Split": "TRAIN"}])
    got = FrameDataset(tmp_path, "TRAIN", size=6)[1]
    decoded, _ = read_video(tmp_path / "Videos" / "r.avi")
    want = torch.nn.functional.interpolate(
        to_model_pixels(decoded[1])[None], size=(6, 6), mode="bilinear", antialias=True
    )[0]
    torch.testing.assert_close(got, want)


def test_latent_files_may_lie_in_the_dataset_root(tmp_path):
    root = _latent_dataset(tmp_path / "r", [("v", 6, 32.0, "TRAIN")])
    (root / "Latents" / "v.safetensors").rename(root / "v.safetensors")
    (root / "Latents").rmdir()
    item = LatentVideoDataset(root, "TRAIN", frames=4, random_window=False)[0]
    np.testing.assert_array_equal(item["latents"][:, 0, 0, 0].numpy(), np.arange(4))


def test_latent_clip_without_a_frame_rate_is_a_dataset_error(tmp_path):
    root = tmp_path / "nofps"
    (root / "Latents").mkdir(parents=True)
    save_file({"latents": torch.zeros(6, 4, 2, 2)}, str(root / "Latents" / "v.safetensors"))
    write_filelist(root, [{"FileName": "v", "EF": 50, "Split": "TRAIN"}])
    with pytest.raises(DatasetError, match=r"v.safetensors: no frame rate"):
        LatentVideoDataset(root, "TRAIN", frames=4)[0]


def test_evaluation_condition_frame_is_fixed_per_epoch_and_not_the_window(latents):
    ds = LatentVideoDataset(latents, "TRAIN", frames=32, random_window=False, seed=4)
    conds = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        assert torch.equal(ds[0]["cond"], item["cond"])
        assert float(item["latents"][0, 0, 0, 0]) == 0  # phase 0, start 0
        conds.append(float(item["cond"][0, 0, 0]))
    assert len(set(conds)) > 3
    assert item["cond"].untyped_storage().nbytes() == item["cond"].numel() * 4


def test_latent_frames_reach_the_last_frame(tmp_path):
    root = _latent_dataset(tmp_path / "f", [("v", 3, 32.0, "TRAIN")])
    ds = LatentFrameDataset(root, "TRAIN", seed=0)
    seen = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        seen.add(float(ds[0][0, 0, 0]))
    assert seen == {0.0, 1.0, 2.0}


def test_half_precision_latent_files_are_read_as_float32(tmp_path):
    root = tmp_path / "half"
    (root / "Latents").mkdir(parents=True)
    half = torch.randn(5, 4, 2, 2).to(torch.float16)
    save_file({"latents": half}, str(root / "Latents" / "v.safetensors"))
    write_filelist(root, [{"FileName": "v", "EF": 50, "FPS": 32, "Split": "TRAIN"}])
    item = LatentVideoDataset(root, "TRAIN", frames=8, random_window=False)[0]
    assert item["latents"].dtype == item["cond"].dtype == torch.float32
    torch.testing.assert_close(item["latents"][:5], half.float(), rtol=0, atol=0)
    frame = LatentFrameDataset(root, "TRAIN", seed=0)[0]
    assert frame.dtype == torch.float32 and any(torch.equal(frame, h.float()) for h in half)
