"""Latent frames for the filter and the re-identification trainer: which files are read, which
frames are picked and how they are normalised, how bad files are named, and how training pairs
are drawn. Tiny random latents written in the ``echofast encode`` layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from privacy.phantom_latents import write_latents

from echofast.data import write_filelist
from echofast.data.datasets import DatasetError
from echofast.privacy.data import (
    Augmentation,
    FrameShapeError,
    LatentClips,
    PairDataset,
    candidate_files,
    check_frame_shapes,
    check_reference_shift_tolerance,
    check_shift_tolerance,
    frames_from_clips,
    load_candidates,
    load_split_frames,
    replace_ring,
    sample_pair,
    select_frames,
    shifted_view,
    split_frame_shape,
)
from echofast.privacy.model import normalize_clip


def _latents(root: Path, clips: dict[str, tuple[str, torch.Tensor]]) -> Path:
    """A latent dataset: ``clips`` maps a name to (split, latents), in FileList order."""
    for name, (_, x) in clips.items():
        write_latents(root / "Latents" / f"{name}.safetensors", x)
    rows = [{"FileName": n, "EF": 50, "FPS": 2, "Split": s} for n, (s, _) in clips.items()]
    write_filelist(root, rows)
    return root


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- views ---------------------------------------------------------------------------------


def _np_view(x: np.ndarray, dy: int, dx: int, ring: int) -> np.ndarray:
    """numpy: move (C, h, w) by (dy, dx) with edge replication, then rebuild the outer ring
    from the interior by edge replication."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx), 1)
    pad = np.pad(x, ((0, 0), (p, p), (p, p)), mode="edge")
    moved = pad[:, p - dy : p - dy + h, p - dx : p - dx + w]
    if ring == 0:
        return moved
    inner = moved[:, ring:-ring, ring:-ring]
    return np.pad(inner, ((0, 0), (ring, ring), (ring, ring)), mode="edge")


@pytest.mark.parametrize("hw", [(5, 5), (7, 5), (6, 9)])
@pytest.mark.parametrize(("dy", "dx", "ring"), [(0, 0, 1), (1, -1, 1), (-2, 1, 2), (0, 2, 0)])
def test_views_match_numpy_edge_padding(hw, dy, dx, ring):
    x = _rand(3, 2, *hw, seed=sum(hw))
    want = np.stack([_np_view(f, dy, dx, ring) for f in x.numpy()])
    view = shifted_view(x, dy, dx, "clip", ring)
    assert np.array_equal(view.numpy(), want)
    assert torch.equal(
        replace_ring(x, ring),
        torch.from_numpy(np.stack([_np_view(f, 0, 0, ring) for f in x.numpy()])),
    )
    for mode in ("frame", "channel"):
        again = shifted_view(x, dy, dx, mode, ring)
        assert torch.allclose(again, normalize_clip(torch.from_numpy(want), mode), atol=1e-6)


# ---- augmentation --------------------------------------------------------------------------


def _edits(aug: Augmentation, x: torch.Tensor, normalization: str = "clip", n: int = 40):
    return [aug.apply(x, np.random.default_rng(k), normalization) for k in range(n)]


def test_augmented_shifts_cover_both_directions_and_clip_frames_are_not_renormalised():
    x = _rand(2, 6, 7)
    aug = Augmentation(max_shift=1, gain=0.0, offset=0.0, noise=0.0)
    views = {
        (dy, dx): shifted_view(x[None], dy, dx, "clip")[0] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    }
    seen = set()
    for y in _edits(aug, x):
        found = [d for d, view in views.items() if torch.equal(y, view)]
        assert found, "not a pure shift of the frame"
        seen.update(found)
    assert seen == set(views)


def test_augmented_gain_offset_and_noise_scale_with_the_frame():
    x = 100 * _rand(3, 8, 8)  # std ~100: the offset and the noise are relative to it
    std = float(x.std())
    ratios, offsets = [], []
    for y in _edits(Augmentation(gain=0.5, offset=0.0, noise=0.0), x):
        ratios.append((y / x).mean(dim=(1, 2)))
        assert torch.allclose(y / x, ratios[-1][:, None, None].expand_as(x), rtol=1e-4)
    ratios = torch.cat(ratios)
    assert 0.5 <= float(ratios.min()) < 0.8 and 1.2 < float(ratios.max()) <= 1.5
    for y in _edits(Augmentation(gain=0.0, offset=0.3, noise=0.0), x):
        d = y - x
        offsets.append(d.mean(dim=(1, 2)))
        assert torch.allclose(d, offsets[-1][:, None, None].expand_as(x), atol=1e-3)
    offsets = torch.cat(offsets) / std
    assert -0.3 <= float(offsets.min()) < -0.2 and 0.2 < float(offsets.max()) <= 0.3
    spread = [float((y - x).std()) / std for y in _edits(Augmentation(0, 0.0, 0.0, 0.4), x)]
    assert 0 < min(spread) < 0.1 and 0.3 < max(spread) < 0.45


@pytest.mark.parametrize("mode", ["frame", "channel"])
def test_augmented_frames_are_normalised_again_per_frame(mode):
    x = normalize_clip(_rand(3, 6, 6), mode)
    for y in _edits(Augmentation(max_shift=1), x, mode, n=5):
        assert torch.allclose(y, normalize_clip(y, mode), atol=1e-6)


def test_augmentation_defaults_keep_reference_pairs():
    """Off by default: no copy positives, no shift."""
    aug = Augmentation()
    assert (aug.copy_positives, aug.max_shift) == (0.0, 0)


# ---- shapes and shift tolerance ------------------------------------------------------------


def test_frame_shapes_are_compared_with_the_first_clip_which_errors_name():
    clips = [_rand(2, 4, 6, 6), _rand(4, 6, 6), _rand(1, 3, 6, 6)]
    with pytest.raises(FrameShapeError, match=r"^c: .*\(3, 6, 6\).*but a has .*\(4, 6, 6\)"):
        check_frame_shapes(clips, ["a", "b", "c"])
    with pytest.raises(FrameShapeError, match=r"^b: expected \(T, C, h, w\) or \(C, h, w\)"):
        check_frame_shapes([clips[0], _rand(1, 2, 4, 6, 6)], ["a", "b"])
    assert check_frame_shapes(clips[:2], ["a", "b"]) == (4, 6, 6)
    assert check_frame_shapes([], []) is None


def test_checked_shift_tolerance_is_a_python_int():
    value = check_shift_tolerance(np.int64(2), (4, 6, 6))
    assert value == 2 and type(value) is int


def test_split_frame_shape_reads_the_first_file_of_the_split(tmp_path):
    root = _latents(
        tmp_path / "d",
        {
            "t0": ("TEST", _rand(2, 4, 3, 3)),
            "a": ("TRAIN", _rand(2, 4, 6, 8)),
            "b": ("TRAIN", _rand(3, 5, 5)),
        },
    )
    assert split_frame_shape(root) == (4, 6, 8)
    assert check_reference_shift_tolerance(2, root) == 2  # TRAIN's 6x8, not TEST's 3x3
    assert check_reference_shift_tolerance(0, tmp_path / "nothing") == 0  # reads nothing
    with pytest.raises(DatasetError, match="no encoded videos in split 'VAL'"):
        split_frame_shape(root, "VAL")


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ({"latents": torch.zeros(6, 6)}, FrameShapeError, r"got shape \(6, 6\)"),
        ({"other": torch.zeros(4, 6, 6)}, DatasetError, "cannot read latents under key"),
        (b"not safetensors", DatasetError, "cannot read latents under key"),
    ],
    ids=["2-d", "no-key", "garbage"],
)
def test_unreadable_first_files_are_named(tmp_path, content, error, message):
    from safetensors.torch import save_file

    root = _latents(tmp_path / "d", {"a": ("TRAIN", _rand(2, 4, 6, 6))})
    file = root / "Latents" / "a.safetensors"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        save_file(content, str(file))
    with pytest.raises(error, match=f"{file}: .*{message}"):
        split_frame_shape(root)
    with pytest.raises(error, match=str(file)):
        load_candidates(root / "Latents")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"other": torch.zeros(2, 4, 6, 6)}, "cannot read latents under key 'latents'"),
        (b"not safetensors", "cannot read latents under key 'latents'"),
    ],
    ids=["no-key", "garbage"],
)
def test_an_unreadable_reference_or_training_file_is_named(tmp_path, content, message):
    """Any file of a split, not only the first: the filter's gallery and calibration frames
    (load_split_frames) and the re-identification trainer's clips (LatentClips) name it in a
    DatasetError (they raised safetensors' own error, which names no file)."""
    from safetensors.torch import save_file

    clips = {k: ("TRAIN", _rand(2, 4, 6, 6, seed=i)) for i, k in enumerate("abc")}
    root = _latents(tmp_path / "d", clips)
    file = root / "Latents" / "b.safetensors"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        save_file(content, str(file))
    with pytest.raises(DatasetError, match=f"^{file}: {message}"):
        load_split_frames(root, "TRAIN", frame_step=0, normalization="frame")
    with pytest.raises(DatasetError, match=f"^{file}: {message}"):
        LatentClips(root, "TRAIN", normalization="frame")


# ---- frames --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "step", "want"),
    [
        (0, 0, []),
        (0, 2, []),
        (1, 0, [0]),
        (7, 0, [0]),
        (1, 3, [0]),
        (7, 3, [0, 3, 6]),
        (6, 3, [0, 3]),
        (5, 1, [0, 1, 2, 3, 4]),
    ],
)
def test_selected_frames(length, step, want):
    assert select_frames(length, step) == want


def test_negative_frame_step_is_refused():
    with pytest.raises(ValueError, match="frame_step must be >= 0, got -1"):
        select_frames(4, -1)


def test_frames_are_picked_after_normalising_the_whole_clip():
    clips = [_rand(5, 4, 6, 6, seed=1), _rand(4, 6, 6, seed=2) * 3, _rand(2, 4, 6, 6, seed=3)]
    fs = frames_from_clips(clips, ["a", "b", "c"], frame_step=2, normalization="clip")
    want = torch.cat(
        [
            normalize_clip(clips[0])[[0, 2, 4]],
            normalize_clip(clips[1])[None],
            normalize_clip(clips[2])[[0]],
        ]
    )
    assert torch.equal(fs.frames, want)
    assert fs.clip_index.tolist() == [0, 0, 0, 1, 2] and fs.frame_index.tolist() == [0, 2, 4, 0, 0]
    assert fs.names == ["a", "b", "c"] and fs.num_clips == 3 and len(fs) == 5
    bad = clips[0].clone()
    bad[3, 1, 2, 2] = float("nan")
    with pytest.raises(DatasetError, match="^b: latents hold NaN or inf"):
        frames_from_clips([clips[0], bad], ["a", "b"], frame_step=0, normalization="frame")
    with pytest.raises(DatasetError, match=r"^e: latents hold no frames \(shape \(0, 4, 6, 6\)\)"):
        frames_from_clips([clips[0], clips[0][:0]], ["a", "e"], frame_step=0, normalization="clip")
    with pytest.raises(FrameShapeError, match=r"^c: .*\(4, 5, 5\).*but a has"):
        frames_from_clips(
            [clips[0], _rand(4, 5, 5)], ["a", "c"], frame_step=0, normalization="frame"
        )
    with pytest.raises(FrameShapeError, match=r"^a: .*\(4, 6, 6\).*the gallery has"):
        frames_from_clips(
            clips[:1],
            ["a"],
            frame_step=0,
            normalization="frame",
            frame_shape=(4, 5, 5),
            expected_from="the gallery",
        )


def test_split_frames_come_in_filelist_order_and_name_files(tmp_path):
    clips = {
        "z": ("TRAIN", _rand(3, 4, 6, 6, seed=1)),
        "v": ("VAL", _rand(2, 4, 6, 6)),
        "a": ("TRAIN", _rand(4, 6, 6, seed=2)),
    }
    root = _latents(tmp_path / "d", clips)
    fs = load_split_frames(root, "TRAIN", frame_step=1, normalization="frame")
    assert fs.names == ["z", "a"] and fs.clip_index.tolist() == [0, 0, 0, 1]
    assert torch.equal(fs.frames[3], normalize_clip(clips["a"][1], "frame"))
    with pytest.raises(DatasetError, match="no encoded videos in split 'TEST'"):
        load_split_frames(root, "TEST", frame_step=0, normalization="frame")
    file = root / "Latents" / "z.safetensors"
    with pytest.raises(FrameShapeError, match=rf"^{file}: .*\(4, 6, 6\).*but G has .*\(4, 5, 5\)"):
        load_split_frames(
            root,
            "TRAIN",
            frame_step=0,
            normalization="frame",
            frame_shape=(4, 5, 5),
            expected_from="G",
        )
    write_latents(root / "Latents" / "a.safetensors", _rand(4, 5, 5))
    file = root / "Latents" / "a.safetensors"
    with pytest.raises(FrameShapeError, match=rf"^{file}: .*\(4, 5, 5\)"):
        load_split_frames(root, "TRAIN", frame_step=0, normalization="frame")


def test_split_frames_refuse_listed_videos_without_latents(tmp_path):
    """A TRAIN video listed in FileList.csv without its latent file would silently leave that
    patient out of the gallery (the dataset readers skip such rows): refused, naming the file;
    a row of another split does not matter."""
    clips = {"a": ("TRAIN", _rand(2, 4, 6, 6)), "b": ("TRAIN", _rand(2, 4, 6, 6, seed=1)),
             "t": ("TEST", _rand(2, 4, 6, 6, seed=2))}  # fmt: skip
    root = _latents(tmp_path / "d", clips)
    rows = [{"FileName": n, "EF": 50, "FPS": 2, "Split": s} for n, (s, _) in clips.items()]
    write_filelist(root, [*rows, {"FileName": "gone", "EF": 50, "FPS": 2, "Split": "TRAIN"}])
    gone = root / "Latents" / "gone.safetensors"
    with pytest.raises(DatasetError, match=rf"1 of the 3 TRAIN videos it lists .*{gone}"):
        load_split_frames(root, "TRAIN", frame_step=0, normalization="frame")
    assert len(load_split_frames(root, "TEST", frame_step=0, normalization="frame")) == 1


# ---- candidates ----------------------------------------------------------------------------


def test_candidates_are_every_filelist_row_or_every_sorted_file(tmp_path):
    root = _latents(tmp_path / "d", {"t": ("TEST", _rand(4, 6, 6)), "r": ("TRAIN", _rand(4, 6, 6))})
    assert [n for n, _ in candidate_files(root)] == ["t", "r"]  # all splits, FileList order
    loose = tmp_path / "loose"
    names = ["m", "b.x", "z", "a"]
    for k, name in enumerate(names):
        write_latents(loose / f"{name}.safetensors", _rand(2, 4, 6, 6, seed=k))
    (loose / "notes.txt").write_text("not a candidate")
    items = candidate_files(loose)
    assert items == [(n, loose / f"{n}.safetensors") for n in sorted(names)]
    got_names, paths, clips = load_candidates(loose)
    assert got_names == sorted(names) and paths == [p for _, p in items]
    assert torch.equal(clips[0], _rand(2, 4, 6, 6, seed=3))
    write_latents(loose / "c.safetensors", _rand(4, 7, 7))
    with pytest.raises(FrameShapeError, match=rf"{loose / 'c.safetensors'}: .*\(4, 7, 7\)"):
        load_candidates(loose)


def test_missing_or_empty_candidate_folders_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="candidate folder does not exist"):
        candidate_files(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no candidate latent files \(\*\.safetensors\)"):
        load_candidates(tmp_path / "empty")


# ---- training clips and pairs --------------------------------------------------------------


def test_training_clips_skip_images_and_short_clips(tmp_path):
    clips = {
        "img": ("TRAIN", _rand(4, 6, 6)),
        "one": ("TRAIN", _rand(1, 4, 6, 6)),
        "two": ("TRAIN", _rand(2, 4, 6, 6, seed=1)),
        "val": ("VAL", _rand(2, 4, 6, 6)),
        "three": ("TRAIN", _rand(3, 4, 6, 6, seed=2)),
    }
    root = _latents(tmp_path / "d", clips)
    lc = LatentClips(root, "TRAIN", normalization="frame")
    assert lc.names == ["two", "three"] and lc.skipped == ["img", "one"]
    assert lc.lengths.tolist() == [2, 3] and lc.frame_shape == (4, 6, 6) and len(lc) == 2
    assert torch.equal(lc.frame(1, 2), normalize_clip(clips["three"][1], "frame")[2])
    with pytest.raises(DatasetError, match=r"has 1 clip\(s\) with >= 3 frames"):
        LatentClips(root, "TRAIN", normalization="frame", min_frames=3)


def test_training_clips_refuse_too_few_clips_nan_and_mixed_shapes(tmp_path):
    two = _rand(2, 4, 6, 6)
    root = _latents(tmp_path / "a", {"x": ("TRAIN", two), "y": ("TRAIN", _rand(1, 4, 6, 6))})
    with pytest.raises(DatasetError, match=r"split 'TRAIN' has 1 clip\(s\) with >= 2 frames"):
        LatentClips(root, "TRAIN", normalization="frame")
    bad = two.clone()
    bad[1, 0, 0, 0] = float("inf")
    root = _latents(tmp_path / "b", {"x": ("TRAIN", two), "y": ("TRAIN", bad)})
    with pytest.raises(DatasetError, match=r"y\.safetensors: latents hold NaN or inf"):
        LatentClips(root, "TRAIN", normalization="frame")
    root = _latents(tmp_path / "c", {"x": ("TRAIN", two), "y": ("TRAIN", _rand(2, 4, 5, 5))})
    with pytest.raises(FrameShapeError, match=r"y\.safetensors: .*\(4, 5, 5\).*x\.safetensors"):
        LatentClips(root, "TRAIN", normalization="frame")


def test_pairs_follow_the_reference_rule():
    lengths = np.array([3, 5, 2, 7])
    seen = {0.0: set(), 1.0: set()}
    for k in range(1600):
        a, fa, b, fb, y = sample_pair(np.random.default_rng(k), k % 4, lengths)
        assert a == k % 4 and 0 <= fa < lengths[a] and 0 <= fb < lengths[b]
        assert (b != a) if y == 0.0 else (b == a and fb != fa)
        seen[y].add((a, b) if y == 0.0 else (a, fa, fb))
    assert seen[0.0] == {(a, b) for a in range(4) for b in range(4) if a != b}
    assert len(seen[1.0]) == sum(n * (n - 1) for n in lengths)  # every other frame reached


@pytest.fixture
def six_clips(tmp_path) -> LatentClips:
    clips = {f"c{k}": ("TRAIN", _rand(2 + k % 3, 4, 6, 6, seed=k)) for k in range(6)}
    return LatentClips(_latents(tmp_path / "d", clips), "TRAIN", normalization="clip")


def test_pair_positions_anchor_videos_in_order_per_epoch(six_clips):
    ds = PairDataset(six_clips, seed=5, pairs_per_video=3, shuffle=False)
    assert len(ds) == 18
    assert [ds.pair(p)[0] for p in range(18)] == [p % 6 for p in range(18)]
    first = [ds.pair(p) for p in range(18)]
    x1, x2, y = ds[4]
    a, fa, b, fb, label = first[4]
    assert torch.equal(x1, six_clips.frame(a, fa)) and torch.equal(x2, six_clips.frame(b, fb))
    assert y.item() == label and {p[4] for p in first} == {0.0, 1.0}
    ds.set_epoch(1)
    assert [ds.pair(p)[0] for p in range(18)] == [p % 6 for p in range(18)]
    assert [ds.pair(p) for p in range(18)] != first  # each epoch draws new pairs


def test_shuffled_order_is_a_new_permutation_each_epoch(six_clips):
    ds = PairDataset(six_clips, seed=5, pairs_per_video=2)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        orders.append(ds.order().tolist())
        assert sorted(orders[-1]) == list(range(6))
        assert [ds.pair(p)[0] for p in range(12)] == orders[-1] * 2
    assert orders[0] == orders[2] != orders[1] and orders[0] != list(range(6))
    # the documented key: no pair position's generator key collides with it
    assert orders[1] == np.random.default_rng([5, 1, 2**31]).permutation(6).tolist()


def test_augmented_negative_pairs_edit_both_videos(six_clips):
    aug = Augmentation(gain=0.0, offset=0.0, noise=0.0, copy_positives=1.0)
    ds = PairDataset(six_clips, seed=1, shuffle=False, augmentation=aug)
    plain = PairDataset(six_clips, seed=1, shuffle=False)
    negatives = [p for p in range(6) if ds.pair(p)[4] == 0.0]
    assert negatives
    for p in negatives:
        assert ds.pair(p) == plain.pair(p)
        a, fa, b, fb, _ = ds.pair(p)
        x1, x2, _ = ds[p]
        assert torch.equal(x1, six_clips.frame(a, fa)) and torch.equal(x2, six_clips.frame(b, fb))
