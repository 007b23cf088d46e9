"""`echofast generate --privacy`: candidates filtered, videos checked and replaced, the report,
fail-closed refusals, and resume after kill -9 giving the same dataset and report."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from privacy.phantom_latents import write_phantom_latents
from safetensors.torch import load_file

from echofast.pipelines.dataset import GenerateConfig, generate_dataset, read_journal, requested_ef
from echofast.privacy import PrivacyError, ReIdentificationModel

N, FRAMES, STEPS = 4, 8, 3


@pytest.fixture(scope="module")
def reference(weights_root, tmp_path_factory):
    """Phantom clips encoded with the weights root's VAE: 24 TRAIN / 4 VAL / 24 TEST."""
    return write_phantom_latents(tmp_path_factory.mktemp("ref"), weights_root / "vae", (24, 4, 24))


@pytest.fixture(scope="module")
def reid_dir(tmp_path_factory):
    """A random tiny re-identification model without evaluation.json: its test AUC is computed
    on the reference's TEST split at filter time (near 0.5, so tests pass auc_threshold=0)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "reidentification_tiny"
    ReIdentificationModel(layers=(1, 1, 1, 1), width=8, n_features=32).save_pretrained(folder)
    return folder


PERCENTILE = 50.0


def _cfg(weights_root, out, reid_dir, reference, **kw) -> GenerateConfig:
    base = dict(
        weights=str(weights_root),
        out=str(out),
        num_videos=N,
        frames=FRAMES,
        fps=16.0,
        steps=STEPS,
        seed=2,
        batch_size=2,
        progress=False,
        privacy=str(reid_dir),
        reference_latents=str(reference),
        auc_threshold=0.0,
        privacy_percentile=PERCENTILE,
        privacy_frame_step=4,
        oversample=3.0,
    )
    base.update(kw)
    return GenerateConfig(**base)


def _cli(weights_root, out, reid_dir, reference, *extra) -> list[str]:
    return [
        sys.executable, "-m", "echofast", "generate", "--weights", str(weights_root),
        "--out", str(out), "--num-videos", str(N), "--frames", str(FRAMES), "--fps", "16",
        "--steps", str(STEPS), "--seed", "2", "--batch-size", "2", "--device", "cpu",
        "--no-progress", "--privacy", str(reid_dir), "--reference-latents", str(reference),
        "--auc-threshold", "0", "--privacy-percentile", str(PERCENTILE),
        "--privacy-frame-step", "4", "--oversample", "3", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def private_run(weights_root, reid_dir, reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("priv") / "ds"
    summary = generate_dataset(_cfg(weights_root, out, reid_dir, reference))
    return out, summary


def test_private_dataset_is_consistent(private_run, weights_root, reid_dir, reference):
    out, summary = private_run
    assert summary["complete"] and summary["in_dataset"] == N
    report = json.loads((out / "privacy_report.json").read_text())
    c, tau = report["counts"], report["threshold"]["tau"]
    assert report["privacy_filtered"] and report["status"] == "privacy-filtered"
    assert c["candidates"] == 3 * N and c["kept"] + c["dropped_image_level"] == c["candidates"]
    assert c["videos"] == N and c["video_attempts"] == N + c["dropped_video_level"]
    assert c["frames_checked_per_video"] == 2 and c["real_train_clips"] == 24
    assert sum(report["histograms"]["train_synthetic"]) == c["candidates"]
    assert sum(report["histograms"]["train_video"]) == c["video_attempts"]
    assert len(report["video_check"]["dropped"]) == c["dropped_video_level"]
    attempts = read_journal(out / ".echofast" / "privacy" / "attempts.jsonl")
    cfg = _cfg(weights_root, out, reid_dir, reference)
    rows = [r for r in (out / "FileList.csv").read_text().splitlines()[1:]]
    assert len(rows) == N
    slot = 0
    for e in attempts[: c["video_attempts"]]:
        assert e["passed"] == (e["max_correlation"] < tau)
        assert float(e["EF"]) == requested_ef(cfg, e["candidate"], None)
        if e["passed"]:
            assert e["slot"] == slot and rows[slot].startswith(f"synthetic_{slot:06d},{e['EF']},")
            slot += 1
    kept = [e["candidate"] for e in attempts]
    assert kept == sorted(kept) and len(set(kept)) == len(kept)
    closest = report["closest_synthetic"]
    assert all((e["max_correlation"] < tau) == e["kept"] for e in closest)
    args = json.loads((out / "generation.json").read_text())["arguments"]
    assert args["privacy"]["model"]["weights_sha256"] and args["oversample"] == 3.0
    assert "reference_latents" not in args  # by digest, not by path
    assert (out / "privacy_report.png").read_bytes()[:4] == b"\x89PNG"


def test_attempts_animate_only_the_candidates_the_image_filter_kept(
    weights_root, reid_dir, reference, tmp_path, monkeypatch
):
    """Attempt r animates the r-th candidate the image filter kept, with that candidate's EF
    (PRIVACY_RULE). The filter here drops candidates 0 and 2 besides those it drops itself, so
    attempt r is not candidate r; the candidates are scored again with the saved filter."""
    from echofast.privacy.filter import PrivacyFilter

    real = PrivacyFilter.score_clips

    def drop_0_and_2(self, clips, names, *, frame_step=None):
        scores = real(self, clips, names, frame_step=frame_step)
        if names[0] == "candidate_000000":
            scores.kept[[0, 2]] = False
        return scores

    monkeypatch.setattr(PrivacyFilter, "score_clips", drop_0_and_2)
    out = tmp_path / "ds"
    cfg = _cfg(weights_root, out, reid_dir, reference)
    assert generate_dataset(cfg)["complete"]
    state = out / ".echofast" / "privacy"
    flt = PrivacyFilter.load(
        state / "reference.safetensors", ReIdentificationModel.from_pretrained(reid_dir)
    )
    chunks = sorted(state.glob("candidates-*.safetensors"))
    cands = torch.cat([load_file(str(p))["latents"] for p in chunks])
    names = [f"candidate_{j:06d}" for j in range(len(cands))]
    kept = [j for j, k in enumerate(real(flt, list(cands), names, frame_step=0).kept) if k]
    kept = [j for j in kept if j not in (0, 2)]
    attempts = read_journal(state / "attempts.jsonl")
    assert [e["candidate"] for e in attempts] == kept[: len(attempts)]
    assert [float(e["EF"]) for e in attempts] == [
        requested_ef(cfg, j, None) for j in kept[: len(attempts)]
    ]
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["counts"]["kept"] == len(kept)


def test_a_video_scoring_exactly_tau_is_dropped(
    private_run, weights_root, reid_dir, reference, tmp_path, monkeypatch
):
    """The video check drops a video with any checked frame at or above τ (module docstring,
    PRIVACY_RULE): one whose max correlation equals τ is dropped and the next attempt takes its
    place. The first video that passed in ``private_run`` is given the score τ exactly."""
    import echofast.pipelines.dataset as dataset_module

    ref_out, _ = private_run
    ref = read_journal(ref_out / ".echofast" / "privacy" / "attempts.jsonl")
    tied = next(e for e in ref if e["passed"])
    real = dataset_module._check_videos
    seen = []

    def tie_first_pass(flt, vae, videos, step):
        out = real(flt, vae, videos, step)
        for k, score in enumerate(out):
            if len(seen) == tied["attempt"]:
                assert score[0] == tied["max_correlation"] < flt.tau
                out[k] = (flt.tau, *score[1:])
            seen.append(score[0])
        return out

    monkeypatch.setattr(dataset_module, "_check_videos", tie_first_pass)
    out = tmp_path / "ds"
    summary = generate_dataset(_cfg(weights_root, out, reid_dir, reference))
    assert summary["complete"] and summary["in_dataset"] == N
    tau = summary["privacy"]["tau"]
    attempts = {
        e["attempt"]: e for e in read_journal(out / ".echofast" / "privacy" / "attempts.jsonl")
    }
    e = attempts[tied["attempt"]]
    assert e["candidate"] == tied["candidate"] and e["max_correlation"] == tau
    assert e["passed"] is False and e["slot"] is None
    report = json.loads((out / "privacy_report.json").read_text())
    assert e["candidate"] in [d["candidate"] for d in report["video_check"]["dropped"]]
    # every other attempt is as in private_run; the later passes move up one slot
    moved = 0
    for b in ref:
        a = attempts.get(b["attempt"])
        if a is None or a is e:
            continue
        assert (a["candidate"], a["max_correlation"]) == (b["candidate"], b["max_correlation"])
        assert a["passed"] == b["passed"]
        if b["passed"] and tied["slot"] < b["slot"] < N:
            assert a["slot"] == b["slot"] - 1
            mine, theirs = (f"synthetic_{a['slot']:06d}.avi", f"synthetic_{b['slot']:06d}.avi")
            assert (out / "Videos" / mine).read_bytes() == (
                ref_out / "Videos" / theirs
            ).read_bytes()
            moved += 1
    assert moved >= 1


def test_kill_9_then_resume_gives_same_dataset_and_report(
    private_run, weights_root, reid_dir, reference, tmp_path
):
    ref_out, _ = private_run
    out = tmp_path / "ds"
    proc = subprocess.Popen(
        _cli(weights_root, out, reid_dir, reference),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    journal = out / ".echofast" / "journal-0of1.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(
        _cli(weights_root, out, reid_dir, reference), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "privacy: privacy-filtered" in done.stdout
    for name in ("FileList.csv", "privacy_report.json", "privacy_report.png"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    videos = sorted(p.name for p in (out / "Videos").iterdir())
    assert videos == sorted(p.name for p in (ref_out / "Videos").iterdir())
    for v in videos:
        assert (out / "Videos" / v).read_bytes() == (ref_out / "Videos" / v).read_bytes()


def test_without_privacy_the_report_says_not_filtered(weights_root, tmp_path):
    out = tmp_path / "plain"
    generate_dataset(
        GenerateConfig(
            weights=str(weights_root),
            out=str(out),
            num_videos=1,
            frames=4,
            fps=16.0,
            steps=2,
            progress=False,
        )
    )
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["privacy_filtered"] is False and report["status"] == "NOT privacy-filtered"
    assert (out / "privacy_report.png").is_file()


def test_fail_closed_refusals(weights_root, reid_dir, reference, tmp_path):
    from echofast.pipelines.dataset import Shard

    with pytest.raises(PrivacyError, match=r"test AUC 0\.\d+ is below the threshold 0\.9"):
        generate_dataset(
            _cfg(weights_root, tmp_path / "weak", reid_dir, reference, auc_threshold=0.9)
        )
    assert not (tmp_path / "weak").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="does not support sharding"):
        generate_dataset(
            _cfg(weights_root, tmp_path / "sh", reid_dir, reference, shard=Shard(0, 2))
        )
    other = tmp_path / "other_ref"
    other.mkdir()
    for f in ("FileList.csv",):
        (other / f).write_bytes((reference / f).read_bytes())
    (other / "encode.json").write_text(json.dumps({"vae_sha256": "0" * 16}))
    with pytest.raises(PrivacyError, match="encoded with another VAE"):
        generate_dataset(_cfg(weights_root, tmp_path / "ov", reid_dir, other))
    with pytest.raises(PrivacyError, match="candidate pool is exhausted"):
        generate_dataset(
            _cfg(
                weights_root,
                tmp_path / "ex",
                reid_dir,
                reference,
                oversample=1.0,
                privacy_percentile=1.0,
            )
        )
    report = json.loads((tmp_path / "ex" / "privacy_report.json").read_text())
    assert report["privacy_filtered"] is False and report["reason"].startswith("INCOMPLETE")
    bad = subprocess.run(
        [sys.executable, "-m", "echofast", "generate", "--weights", str(weights_root),
         "--out", str(tmp_path / "c"), "--num-videos", "1", "--privacy", str(reid_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--privacy and --reference-latents go together" in bad.stderr


def _candidate_count(cfg, monkeypatch) -> int:
    """The number of LIDM candidates a private job asks for (stopped before drawing them)."""
    import echofast.pipelines.dataset as dataset_module

    counts = []

    def stop(cfg, pipe, state, count, progress):
        counts.append(count)
        raise RuntimeError("stopped before the candidates")

    monkeypatch.setattr(dataset_module, "_candidates", stop)
    with pytest.raises(RuntimeError, match="stopped before the candidates"):
        generate_dataset(cfg, pipe=SimpleNamespace())
    assert len(counts) == 1
    return counts[0]


def test_candidate_count_is_the_ceiling_of_the_exact_product(
    weights_root, reid_dir, reference, tmp_path, monkeypatch
):
    """M = ceil(oversample · num_videos): 25/11 · 11 is 25 (its float product 25.000000000000004
    must not add a 26th candidate)."""
    cfg = _cfg(
        weights_root, tmp_path / "ds", reid_dir, reference, num_videos=11, oversample=25 / 11
    )
    assert cfg.oversample * cfg.num_videos > 25
    assert _candidate_count(cfg, monkeypatch) == 25


@pytest.mark.parametrize(("num_videos", "oversample", "candidates"), [(3, 1.5, 5), (7, 1.1, 8)])
def test_a_fractional_candidate_count_rounds_up(
    weights_root, reid_dir, reference, tmp_path, monkeypatch, num_videos, oversample, candidates
):
    """M = ceil(oversample · num_videos): 1.5 · 3 = 4.5 asks for 5 candidates, 1.1 · 7 = 7.7 for
    8 (not the 4 and 7 of rounding down: fewer candidates than --oversample promises)."""
    cfg = _cfg(
        weights_root,
        tmp_path / "ds",
        reid_dir,
        reference,
        num_videos=num_videos,
        oversample=oversample,
    )
    assert _candidate_count(cfg, monkeypatch) == candidates


def test_private_attempts_record_the_checked_video_frame_and_the_calibration_is_cached(
    private_run,
):
    out, _ = private_run
    attempts = read_journal(out / ".echofast" / "privacy" / "attempts.jsonl")
    checked = {e["video_frame"] for e in attempts}
    assert checked <= {0, 4} and 4 in checked  # every 4th of 8 frames (privacy_frame_step=4)
    assert (out / ".echofast" / "privacy" / "reference.safetensors").is_file()


def test_private_resume_rewrites_only_the_lost_video(
    private_run, weights_root, reid_dir, reference, tmp_path
):
    """A lost video of a privacy-filtered dataset is animated again (its whole attempt batch is
    recomputed); the other video of that batch is neither rewritten nor journaled twice."""
    ref_out, _ = private_run
    out = tmp_path / "ds"
    shutil.copytree(ref_out, out)
    attempts = read_journal(out / ".echofast" / "privacy" / "attempts.jsonl")
    slots = {}
    for e in attempts:
        if e["passed"] and e["slot"] < N:
            slots.setdefault(e["attempt"] // 2, []).append(e["slot"])
    keep, lost = next(s for s in slots.values() if len(s) == 2)
    videos = out / "Videos"
    (videos / f"synthetic_{lost:06d}.avi").unlink()
    kept_mtime = (videos / f"synthetic_{keep:06d}.avi").stat().st_mtime_ns
    journal = (out / ".echofast" / "journal-0of1.jsonl").read_text()
    summary = generate_dataset(_cfg(weights_root, out, reid_dir, reference))
    assert summary["complete"] and summary["generated"] == 1 and summary["already_done"] == N - 1
    assert (videos / f"synthetic_{keep:06d}.avi").stat().st_mtime_ns == kept_mtime
    for name in ("FileList.csv", "privacy_report.json"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    for video in sorted(videos.iterdir()):
        assert video.read_bytes() == (ref_out / "Videos" / video.name).read_bytes()
    added = (out / ".echofast" / "journal-0of1.jsonl").read_text().removeprefix(journal)
    assert [json.loads(line)["index"] for line in added.splitlines()] == [lost]


def test_a_dropped_video_gives_its_slot_to_the_next_attempt_that_passes(
    private_run, weights_root, reid_dir, reference, tmp_path, monkeypatch
):
    """Video i is the i-th attempt that passed: attempt 1 dropped, attempt 2 becomes video 1.
    The report counts the attempts up to the last video's (attempt 5, computed in its batch and
    dropped too, is surplus). The candidates and the calibration of ``private_run`` are reused
    (its folder, videos and journals removed); the video check drops attempts 1 and 5 only."""
    import echofast.pipelines.dataset as dataset_module

    out = tmp_path / "ds"
    shutil.copytree(private_run[0], out)
    for item in [*(out / "Videos").iterdir(), *(out / ".echofast").rglob("*.jsonl")]:
        item.unlink()
    checked = []

    def drop_second(flt, vae, videos, step):
        scores = []
        for _ in videos:
            scores.append((flt.tau if len(checked) in (1, 5) else -1.0, "clip", 0, 0))
            checked.append(len(checked))
        return scores

    monkeypatch.setattr(dataset_module, "_check_videos", drop_second)
    assert generate_dataset(_cfg(weights_root, out, reid_dir, reference))["complete"]
    attempts = read_journal(out / ".echofast" / "privacy" / "attempts.jsonl")
    assert [(e["attempt"], e["passed"], e["slot"]) for e in attempts] == [
        (0, True, 0),
        (1, False, None),
        (2, True, 1),
        (3, True, 2),
        (4, True, 3),
        (5, False, None),
    ]
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["counts"]["video_attempts"] == 5 and report["counts"]["dropped_video_level"] == 1
    assert [d["candidate"] for d in report["video_check"]["dropped"]] == [attempts[1]["candidate"]]
    with open(out / "FileList.csv", newline="") as fh:
        efs = [row["EF"] for row in csv.DictReader(fh)]
    assert efs == [attempts[r]["EF"] for r in (0, 2, 3, 4)]


def test_reference_latents_without_their_encode_manifest_are_refused(
    weights_root, reid_dir, reference, tmp_path
):
    """Without encode.json nothing says which VAE encoded the reference: refused naming the file,
    before anything is written."""
    bare = tmp_path / "bare_ref"
    bare.mkdir()
    (bare / "FileList.csv").write_bytes((reference / "FileList.csv").read_bytes())
    out = tmp_path / "ds"
    with pytest.raises(PrivacyError, match=r"bare_ref/encode.json is missing: cannot verify"):
        generate_dataset(_cfg(weights_root, out, reid_dir, bare))
    assert not out.exists()


def test_a_resume_reuses_saved_candidates_and_regenerates_a_torn_chunk(
    private_run, weights_root, reid_dir, reference, tmp_path
):
    """The LIDM candidates are saved in chunks of batch_size: a resumed run samples only the
    chunk whose file is torn (rewritten with the same bytes), animates no finished video again
    and gives the same report."""
    from echofast.pipelines import EchoSyntheticPipeline

    ref_out, _ = private_run
    out = tmp_path / "ds"
    shutil.copytree(ref_out, out)
    torn = out / ".echofast" / "privacy" / "candidates-0000002-2.safetensors"
    whole = torn.read_bytes()
    torn.write_bytes(whole[: len(whole) // 2])
    pipe = EchoSyntheticPipeline.from_pretrained(weights_root)
    sampled, lidm = [], pipe.lidm_pipe

    def recording(*args, sample_indices, **kwargs):
        sampled.append(list(sample_indices))
        return lidm(*args, sample_indices=sample_indices, **kwargs)

    def no_videos(*args, **kwargs):
        raise AssertionError("every video is done: nothing is animated")

    pipe.lidm_pipe, pipe.lvdm_pipe = recording, no_videos
    summary = generate_dataset(_cfg(weights_root, out, reid_dir, reference), pipe=pipe)
    assert summary["complete"] and summary["generated"] == 0
    assert sampled == [[2, 3]] and torn.read_bytes() == whole
    for name in ("FileList.csv", "privacy_report.json"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name


def test_a_rerun_removes_the_temporaries_of_writes_a_kill_cut_short(
    private_run, weights_root, reid_dir, reference, tmp_path
):
    """A kill during an atomic write (a candidate chunk, the calibration cache, FileList.csv)
    leaves its temporary file; the rerun removes them and changes nothing else."""
    ref_out, _ = private_run
    out = tmp_path / "ds"
    shutil.copytree(ref_out, out)
    state = out / ".echofast" / "privacy"
    killed = [
        state / ".candidates-0000002-2.safetensors.a1b2c3d4.tmp",
        state / ".reference.safetensors.a1b2c3d4.tmp",
        out / ".FileList.csv.a1b2c3d4.tmp",
    ]
    for tmp in killed:
        tmp.write_bytes(b"cut")
    assert generate_dataset(_cfg(weights_root, out, reid_dir, reference))["complete"]
    assert [p for p in killed if p.exists()] == []
    for name in ("FileList.csv", "privacy_report.json"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
