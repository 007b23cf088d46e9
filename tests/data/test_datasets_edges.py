"""Dataset-reader edge cases the main tests leave open: name and split spellings, resampling
with a phase offset, window starts, frame-rate precedence, short clips, FrameDataset caching."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from echofast.data import (
    EchoVideoDataset,
    FrameDataset,
    LatentVideoDataset,
    read_records,
    resample_indices,
    window_indices,
    write_filelist,
)
from echofast.data.datasets import DatasetError, normalize_split, strip_avi, to_model_pixels
from echofast.io import read_video, write_video


def test_strip_avi_and_folds_any_spelling(tmp_path):
    assert [strip_avi(s) for s in ("a.avi", "b.AVI", "c.Avi", "d.mp4", "e")] == [
        "a",
        "b",
        "c",
        "d.mp4",
        "e",
    ]
    folds = {str(i): "TRAIN" for i in range(8)} | {"8": "VAL", "9": "TEST", "10": "10"}
    assert {s: normalize_split(s) for s in folds} == folds
    (tmp_path / "Videos").mkdir()
    (tmp_path / "Videos" / "clip.avi").write_bytes(b"")
    (tmp_path / "FileList.csv").write_text("FileName,Split\nclip.AVI,7\n")
    recs = read_records(tmp_path, "TRAIN")
    assert [(r.name, r.split, r.path.name) for r in recs] == [("clip", "TRAIN", "clip.avi")]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ["a,TRAIN", "b,TEST", "a,TRAIN"],
            "FileName 'a' (row 3) names the same video as 'a' (row 1)",
        ),
        (
            ["a,TRAIN", "a.avi,TEST"],
            "FileName 'a.avi' (row 2) names the same video as 'a' (row 1)",
        ),
    ],
)
@pytest.mark.parametrize("split", ["TEST", None])
def test_a_video_listed_twice_is_refused_naming_both_rows(tmp_path, lines, message, split):
    """Every reader (training, evaluate ef, metrics, privacy) counted such a video twice, or
    had it in two splits; encode alone refused it."""
    (tmp_path / "Videos").mkdir()
    for name in ("a", "b"):
        (tmp_path / "Videos" / f"{name}.avi").write_bytes(b"")
    (tmp_path / "FileList.csv").write_text("FileName,Split\n" + "\n".join(lines) + "\n")
    with pytest.raises(
        DatasetError, match=re.escape(f"FileList.csv: {message}; list each video once")
    ):
        read_records(tmp_path, split, require_files=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # cut short (an interrupted copy): the EF read 29.5 and the row had no split
        (
            "FileName,EF,Split\na,50,TRAIN\nb,29.5",
            "row 2 (FileName 'b') has 2 fields, the header 3 (a truncated or hand-edited file?)",
        ),
        ("FileName,EF,Split\na,50,TRAIN,x\n", "row 1 (FileName 'a') has 4 fields, the header 3"),
        # an unmatched quote swallows the rest of a long file into one field: csv.Error
        (
            'FileName,EF,Split\na,50,TRAIN\n"b,50,TRAIN\n' + "c,50,TRAIN\n" * 20000,
            "not a readable CSV file (row 2: field larger than field limit (131072); an unmatched",
        ),
        ('"FileName' + "x" * 200000, "not a readable CSV file (the header: field larger than"),
    ],
)
def test_a_malformed_csv_is_refused_naming_the_row(tmp_path, text, message):
    (tmp_path / "FileList.csv").write_text(text)
    with pytest.raises(DatasetError, match=re.escape(f"FileList.csv: {message}")):
        read_records(tmp_path, None, require_files=False)


def test_empty_cells_and_blank_lines_are_not_missing_fields(tmp_path):
    (tmp_path / "FileList.csv").write_text("FileName,EF,Split\n\na,,\n\nb,50,TEST\n\n")
    records = read_records(tmp_path, None, require_files=False)
    assert [(r.name, r.ef, r.split) for r in records] == [("a", None, ""), ("b", 50.0, "TEST")]


def test_resample_with_offset_drops_indices_past_the_end():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 120))
        fps = float(rng.choice([25.0, 30.0, 32.0, 50.0, 64.0, 97.0]))
        target = float(rng.choice([16.0, 32.0, 50.0]))
        offset = int(rng.integers(0, 4))
        m = max(1, int(np.floor(target / fps * n)))
        ref = np.linspace(0, n, m, endpoint=False).round().astype(np.int64) + offset
        got = resample_indices(n, fps, target, offset)
        np.testing.assert_array_equal(got, ref[ref < n])
        assert got.size == 0 or got.max() < n


@pytest.mark.parametrize("n, frames", [(17, 16), (20, 16), (33, 32), (5, 4)])
def test_random_window_start_reaches_every_start(n, frames):
    """Same rate (phase 0): the start is uniform over [0, n − frames], both ends included."""
    rng = np.random.default_rng(n)
    starts = set()
    for _ in range(300):
        idx, valid = window_indices(n, 32.0, 32.0, frames, rng)
        assert valid == frames and len(idx) == frames
        np.testing.assert_array_equal(idx, np.arange(idx[0], idx[0] + frames))
        starts.add(int(idx[0]))
    assert starts == set(range(n - frames + 1))


def _latents(root: Path, name: str, n: int, filelist_fps, meta_fps: float) -> None:
    (root / "Latents").mkdir(parents=True, exist_ok=True)
    lat = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, 2, 2)
    save_file(
        {"latents": lat.contiguous()},
        str(root / "Latents" / f"{name}.safetensors"),
        metadata={"fps": repr(meta_fps)},
    )


def test_latent_filelist_fps_wins_over_metadata(tmp_path):
    _latents(tmp_path, "v", 64, 64.0, 32.0)
    write_filelist(tmp_path, [{"FileName": "v", "EF": 50, "FPS": 64.0, "Split": "TRAIN"}])
    item = LatentVideoDataset(tmp_path, "TRAIN", frames=32, random_window=False)[0]
    np.testing.assert_array_equal(item["latents"][:, 0, 0, 0].numpy(), np.arange(0, 64, 2))


def test_drop_short_keeps_only_clips_longer_than_a_window_as_the_reference(tmp_path):
    rows = []
    for name, n in (("exact", 64), ("longer", 65), ("shorter", 63)):
        _latents(tmp_path, name, n, 32.0, 32.0)
        rows.append(
            {"FileName": name, "EF": 50, "FPS": 32.0, "NumberOfFrames": n, "Split": "TRAIN"}
        )
    write_filelist(tmp_path, rows)
    kept = LatentVideoDataset(tmp_path, "TRAIN", frames=64, target_fps=32, drop_short=True)
    assert [r.name for r in kept.records] == ["longer"]  # 64 frames last exactly one window
    assert len(LatentVideoDataset(tmp_path, "TRAIN", frames=64, target_fps=32)) == 3


def test_video_file_fps_wins_over_filelist_fps(tmp_path):
    frames = (np.arange(50, dtype=np.uint8)[:, None, None] * 4).repeat(16, 1).repeat(16, 2)
    write_video(tmp_path / "Videos" / "a.avi", frames, 50)
    write_filelist(
        tmp_path, [{"FileName": "a", "EF": 50, "FPS": 25.0, "NumberOfFrames": 50, "Split": "TRAIN"}]
    )
    item = EchoVideoDataset(tmp_path, "TRAIN", frames=32, target_fps=32, random_window=False)[0]
    ids = np.rint(item["video"][: item["valid"]].float().mean((1, 2)).numpy() / 4).astype(int)
    m = int(np.floor(32 / 50 * 50))
    np.testing.assert_array_equal(ids, np.linspace(0, 50, m, endpoint=False).round()[:32])


def test_frame_dataset_in_order_gives_every_frame(tmp_path):
    rng = np.random.default_rng(5)
    rows = []
    for name, n in (("a", 7), ("b", 5)):
        frames = rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)
        frames = frames // 32 * 32 + 16  # coarse levels survive MJPEG closely
        write_video(tmp_path / "Videos" / f"{name}.avi", frames, 25)
        rows.append({"FileName": name, "EF": 50, "FPS": 25.0, "Split": "TRAIN"})
    write_filelist(tmp_path, rows)  # no NumberOfFrames: counted by decoding
    ds = FrameDataset(tmp_path, "TRAIN", size=None)
    assert len(ds) == 12
    expected = torch.cat([read_video(tmp_path / "Videos" / f"{n}.avi")[0] for n in "ab"])
    for i in range(len(ds)):
        torch.testing.assert_close(ds[i], to_model_pixels(expected[i]), rtol=0, atol=0)
    torch.testing.assert_close(ds[-1], to_model_pixels(expected[-1]), rtol=0, atol=0)
