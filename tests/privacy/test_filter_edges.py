"""Edges of the privacy filter's arithmetic and bookkeeping, against numpy's Pearson
correlation and percentile: negative maxima, ties, |r| <= 1, TF32, the percentile's range, which
frame of a candidate clip and which reference frame a score names, the reference step, the
cached state and the digests that identify the model and the reference."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from privacy.phantom_latents import write_random_latents

import echofast.privacy.filter as flt_mod
from echofast.data.datasets import load_latents, read_latent_records
from echofast.privacy import (
    Calibration,
    PrivacyError,
    PrivacyFilter,
    ReIdentificationModel,
    calibrate,
    evaluate_reid,
    max_correlation,
    normalize_clip,
    unit_rows,
)
from echofast.privacy.data import FrameSet, LatentClips, PairDataset
from echofast.privacy.filter import (
    max_correlation_views,
    model_digest,
    read_evaluation,
    reference_digest,
)


def _pearson(queries: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """(Q, G) Pearson correlations by numpy's corrcoef."""
    q = queries.shape[0]
    return np.corrcoef(torch.cat([queries, gallery]).double().numpy())[:q, q:]


def test_queries_anticorrelated_with_the_whole_gallery_keep_their_negative_max():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 24, generator=g, dtype=torch.float64)
    q = base + 0.3 * torch.randn(5, 24, generator=g, dtype=torch.float64)
    gallery = -base + 0.3 * torch.randn(7, 24, generator=g, dtype=torch.float64)
    want = _pearson(q, gallery)
    assert (want.max(axis=1) < -0.5).all()
    v, i = max_correlation(unit_rows(q), unit_rows(gallery))
    np.testing.assert_allclose(v.numpy(), want.max(axis=1), atol=2e-6)
    np.testing.assert_array_equal(i.numpy(), want.argmax(axis=1))


def test_embedding_pads_batches_keeps_the_mode_and_refuses_non_finite_values():
    torch.manual_seed(0)
    model = ReIdentificationModel(layers=(1, 1, 1, 1), width=4, n_features=8).train()
    frames = torch.rand(5, 4, 10, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1
    alone = torch.cat([flt_mod.embed(model, frames[k : k + 1]) for k in range(5)])
    assert torch.equal(flt_mod.embed(model, frames), alone)
    assert model.training
    with torch.no_grad():
        model.model.fc.bias[3] = float("nan")
    with pytest.raises(PrivacyError, match="not finite"):
        flt_mod.embed(model, frames)


def test_a_constant_embedding_correlates_zero_with_everything():
    g = torch.Generator().manual_seed(2)
    rows = torch.rand(4, 16, generator=g)
    rows[1] = 0.7
    unit = unit_rows(rows)
    assert torch.equal(unit[1], torch.zeros(16))
    v, _ = max_correlation(unit[[1]], unit[[0, 2, 3]])
    assert v.tolist() == [0.0]
    np.testing.assert_allclose(unit[[0, 2, 3]].norm(dim=1).numpy(), 1.0, atol=1e-6)


def test_tied_gallery_rows_name_the_lowest_index_across_gallery_chunks(monkeypatch):
    monkeypatch.setattr(flt_mod, "GALLERY_CHUNK", 4)
    g = torch.Generator().manual_seed(4)
    gallery = torch.randn(11, 16, generator=g)
    gallery[[6, 9]] = gallery[2].clone()  # the same row in the first, second and third chunk
    gallery[[8, 10]] = gallery[5].clone()  # and another in the second and third
    v, i = max_correlation(unit_rows(gallery[[9, 10, 2]]), unit_rows(gallery))
    assert i.tolist() == [2, 5, 2]
    assert v.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_identical_rows_never_score_above_one():
    g = torch.Generator().manual_seed(5)
    rows = unit_rows(torch.rand(600, 37, generator=g))
    v, i = max_correlation(rows, rows)
    assert float(v.max()) <= 1.0 and float(v.min()) >= 1.0 - 1e-6
    assert torch.equal(i, torch.arange(600))


def test_the_correlation_product_runs_without_tf32_and_restores_the_setting():
    from torch.overrides import TorchFunctionMode

    seen = []

    class RecordTF32(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
                seen.append(torch.backends.cuda.matmul.allow_tf32)
            return func(*args, **(kwargs or {}))

    rows = unit_rows(torch.randn(3, 8, generator=torch.Generator().manual_seed(6)))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with RecordTF32():
            max_correlation(rows, rows)
        after = torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert seen and not any(seen)
    assert after is True


def test_an_empty_gallery_is_refused():
    with pytest.raises(PrivacyError, match="gallery is empty"):
        max_correlation(unit_rows(torch.rand(2, 8)), torch.zeros(0, 8))


def test_views_tied_at_the_max_name_the_first_views_gallery_row():
    g = torch.Generator().manual_seed(7)
    gallery = unit_rows(torch.randn(6, 12, generator=g))
    other = unit_rows(torch.randn(1, 12, generator=g))
    first = torch.cat([gallery[[4]], other])  # query 0: exact copy of row 4 in view 0
    second = torch.cat([gallery[[1]], gallery[[3]]])  # and of row 1 in view 1; query 1 moves
    v, i = max_correlation_views([first, second], gallery)
    assert i.tolist() == [4, 3]
    assert v.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("percentile", [0, 100, -1, 100.5])
def test_percentile_outside_the_open_interval_is_refused(percentile):
    rows = unit_rows(torch.rand(4, 8))
    with pytest.raises(ValueError, match="percentile must be in"):
        calibrate(rows, rows, percentile)


@pytest.mark.parametrize("percentile", [0.5, 37.3, 99.5])
def test_tau_is_numpys_linear_percentile(percentile):
    g = torch.Generator().manual_seed(8)
    train, test = torch.rand(41, 16, generator=g), torch.rand(13, 16, generator=g)
    cal = calibrate(unit_rows(train), unit_rows(test), percentile)
    want = _pearson(train, test).max(axis=1)
    np.testing.assert_allclose(cal.values, want, atol=2e-6)
    assert cal.tau == pytest.approx(np.percentile(want, percentile), abs=2e-6)
    assert cal.percentile == percentile


# ---- a filter on random latents -----------------------------------------------------------


@pytest.fixture(scope="module")
def reid(model_dir):
    return ReIdentificationModel.from_pretrained(model_dir)  # per-frame normalisation


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    splits = {"TRAIN": 6, "VAL": 3, "TEST": 4}
    return write_random_latents(tmp_path_factory.mktemp("reference"), splits, frames=8, seed=11)


@pytest.fixture(scope="module")
def stepped(reid, reference):
    """Reference frames 0 and 4 of every clip (8 frames each)."""
    return PrivacyFilter.from_reference(reid, reference, frame_step=4, percentile=90)


def _normalised(flt, clip):
    return normalize_clip(clip, flt.model.normalization)


def _clips(root, split):
    records = read_latent_records(root, split)
    return [r.name for r in records], [load_latents(r.path)[0] for r in records]


def test_reference_bookkeeping_counts_each_split(stepped, reference):
    train, _ = _clips(reference, "TRAIN")
    test, _ = _clips(reference, "TEST")
    assert stepped.frame_step == 4
    assert (stepped.num_train_clips, stepped.num_test_clips) == (len(train), len(test))
    assert stepped.num_test_frames == 2 * len(test)
    assert stepped.gallery_clip == [n for n in train for _ in range(2)]
    assert stepped.gallery_frame.tolist() == [0, 4] * len(train)
    assert stepped.calibration.percentile == 90
    assert stepped.tau == pytest.approx(np.percentile(stepped.calibration.values, 90), abs=0)


def test_a_clip_names_its_copied_frame_and_the_reference_frame_it_copies(stepped, reference):
    names, train = _clips(reference, "TRAIN")
    _, val = _clips(reference, "VAL")
    clip = val[0].clone()  # frames 0 and 4 are checked (the reference's step)
    clip[4] = train[5][4]  # per-frame normalisation: an exact copy of a gallery frame
    scores = stepped.score_clips([val[1], clip], ["fresh", "copied"])
    assert scores.names == ["fresh", "copied"]
    assert scores.max_corr[1] == pytest.approx(1.0, abs=1e-6)
    assert scores.candidate_frame.tolist()[1] == 4
    assert (scores.nearest_clip[1], int(scores.nearest_frame[1])) == (names[5], 4)
    assert scores.kept.tolist() == [bool(v < stepped.tau) for v in scores.max_corr]
    assert not scores.kept[1]
    # the fresh clip: its max over frames 0 and 4, and where that max was found
    v, i = stepped.score_frames(_normalised(stepped, val[1])[[0, 4]])
    k = int(np.argmax(v))
    assert scores.max_corr[0] == v.max()
    assert scores.candidate_frame[0] == 4 * k
    assert scores.nearest_clip[0] == stepped.gallery_clip[int(i[k])]
    assert scores.nearest_frame[0] == stepped.gallery_frame[int(i[k])]


def test_clips_listed_out_of_order_are_scored_by_name(stepped):
    g = torch.Generator().manual_seed(12)
    frames = _normalised(stepped, torch.randn(3, 4, 6, 6, generator=g))
    v, i = stepped.score_frames(frames)
    fs = FrameSet(frames, torch.tensor([1, 1, 0]), torch.tensor([0, 2, 5]), ["a", "b"])
    scores = stepped.score_frame_set(fs)
    assert scores.names == ["b", "a"]
    assert scores.max_corr.tolist() == [max(v[0], v[1]), v[2]]
    assert scores.candidate_frame.tolist() == [2 * int(v[1] > v[0]), 5]
    missing = FrameSet(frames, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), ["a", "b"])
    with pytest.raises(PrivacyError, match="no checked frame"):
        stepped.score_frame_set(missing)


def test_only_the_reference_step_is_checked_unless_another_is_given(stepped, reference):
    _, train = _clips(reference, "TRAIN")
    _, val = _clips(reference, "VAL")
    clip = val[2].clone()
    clip[3] = train[0][0]  # frame 3: not checked with the reference's step of 4
    default = stepped.score_clips([clip], ["c"])
    every = stepped.score_clips([clip], ["c"], frame_step=1)
    assert default.max_corr[0] < 1 - 1e-3
    assert every.max_corr[0] == pytest.approx(1.0, abs=1e-6)
    assert every.candidate_frame.tolist() == [3] and not every.kept[0]


def test_gallery_rows_restrict_the_scoring_to_a_subset(stepped):
    frames = _normalised(
        stepped, torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(10))
    )
    rows = torch.tensor([7, 2, 10, 4])
    v, i = stepped.score_frames(frames, rows)
    views = unit_rows(flt_mod.embed(stepped.model, frames))
    want = (views @ stepped.gallery_unit[rows].T).double().numpy()
    np.testing.assert_allclose(v, want.max(axis=1), atol=1e-6)
    np.testing.assert_array_equal(i, want.argmax(axis=1))


def test_the_cached_state_round_trips_exactly(reid, tmp_path):
    g = torch.Generator().manual_seed(9)
    flt = PrivacyFilter(
        reid,
        unit_rows(torch.rand(5, reid.n_features, generator=g)),
        ["a", "a", "b", "c", "c"],
        np.array([0, 3, 0, 1, 6]),
        Calibration(tau=0.1234567891234, percentile=87.5, values=np.array([0.1, 0.2, 1 / 3])),
        frame_step=3,
        num_test_frames=17,
        num_train_clips=3,
        num_test_clips=9,
        frame_shape=(4, 6, 6),
        shift_tolerance=1,
    )
    back = PrivacyFilter.load(flt.save(tmp_path / "state.safetensors"), reid)
    assert back.tau == flt.tau and back.calibration.percentile == 87.5
    np.testing.assert_array_equal(back.calibration.values, flt.calibration.values)
    assert torch.equal(back.gallery_unit, flt.gallery_unit)
    assert back.gallery_clip == flt.gallery_clip
    assert back.gallery_frame.tolist() == [0, 3, 0, 1, 6]
    for key in ("frame_step", "num_test_frames", "num_train_clips", "num_test_clips"):
        assert getattr(back, key) == getattr(flt, key), key
    assert (back.frame_shape, back.shift_tolerance) == ((4, 6, 6), 1)


def _two_clip_filter(reid, **kwargs) -> PrivacyFilter:
    return PrivacyFilter(
        reid,
        unit_rows(torch.rand(2, reid.n_features)),
        ["a", "b"],
        np.zeros(2, dtype=np.int64),
        Calibration(0.5, 95.0, np.zeros(1)),
        frame_step=0,
        num_test_frames=1,
        num_train_clips=2,
        num_test_clips=1,
        **kwargs,
    )


def test_frames_with_channels_the_model_does_not_take_are_refused(reid):
    with pytest.raises(PrivacyError, match="4-channel frames"):
        _two_clip_filter(reid, frame_shape=(3, 6, 6))


def test_the_filter_keeps_the_device_it_is_given(reid):
    flt = _two_clip_filter(reid, frame_shape=(4, 6, 6), device="meta")
    assert flt.device == torch.device("meta")


# ---- the model's evaluation and the digests ------------------------------------------------


def test_evaluation_scores_are_sigmoids_of_the_pair_head_and_the_mode_is_kept(reid, reference):
    clips = LatentClips(reference, "TEST", normalization=reid.normalization)
    reid.train()
    try:
        result, labels, scores = evaluate_reid(
            reid, clips, seed=3, pairs_per_video=4, n_bootstrap=20
        )
        assert reid.training
    finally:
        reid.eval()
    pairs = PairDataset(clips, seed=3, pairs_per_video=4, shuffle=False)
    drawn = [pairs.pair(p) for p in range(len(pairs))]
    a = torch.stack([clips.frame(i, f) for i, f, _, _, _ in drawn])
    b = torch.stack([clips.frame(j, h) for _, _, j, h, _ in drawn])
    with torch.no_grad():
        logits = reid(a, b).reshape(-1).double()
    np.testing.assert_allclose(scores, torch.sigmoid(logits).numpy(), atol=1e-6)
    np.testing.assert_array_equal(labels, [y for *_, y in drawn])
    assert 0 <= result.auc <= 1


def test_evaluation_pairs_of_one_class_are_refused(reid, reference):
    clips = LatentClips(reference, "TEST", normalization=reid.normalization)
    seed = next(
        s
        for s in range(100)
        if len({p[-1] for p in map(PairDataset(clips, seed=s, shuffle=False).pair, range(4))}) == 1
    )
    with pytest.raises(PrivacyError, match="one class only"):
        evaluate_reid(reid, clips, seed=seed, n_bootstrap=20)


def test_model_digest_hashes_the_weights_and_the_config(model_dir, tmp_path):
    d = model_digest(model_dir)
    weights = model_dir / f"{model_dir.name}_best_network.safetensors"
    assert d["weights_file"] == weights.name
    assert d["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    config = (model_dir / "config.json").read_bytes()
    assert d["config_sha256"] == hashlib.sha256(config).hexdigest()
    pickled = tmp_path / "reidentification_pickled"
    pickled.mkdir()
    shutil.copy(model_dir / "config.json", pickled / "config.json")
    reid = ReIdentificationModel.from_pretrained(model_dir)
    torch.save(reid.state_dict(), pickled / "reidentification_pickled_best_network.pth")
    assert model_digest(pickled, allow_pickle=True)["weights_file"].endswith(".pth")


def test_reference_digest_follows_the_file_list_the_manifest_and_the_latent_sizes(
    reference, tmp_path
):
    root = tmp_path / "ref"
    shutil.copytree(reference, root)
    (root / "encode.json").write_text(json.dumps({"scaling_factor": 0.18215}))
    base = reference_digest(root)
    assert reference_digest(root) == base
    manifest = root / "encode.json"
    text = manifest.read_text()
    manifest.write_text(text + " ")
    assert reference_digest(root) != base
    manifest.write_text(text)
    assert reference_digest(root) == base
    latent = next(iter(sorted((root / "Latents").iterdir())))
    latent.write_bytes(latent.read_bytes() + b" ")
    assert reference_digest(root) != base


@pytest.mark.parametrize(
    "content", ["{", json.dumps({"auc": 0.9}), json.dumps({"test_auc": {"auc": "high"}})]
)
def test_an_unreadable_evaluation_is_refused(tmp_path, content):
    assert read_evaluation(tmp_path) is None
    (tmp_path / "evaluation.json").write_text(content)
    with pytest.raises(PrivacyError, match="unreadable evaluation"):
        read_evaluation(tmp_path)
