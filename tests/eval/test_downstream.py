"""The EF downstream task: clip sampling, metrics, learning on phantoms, resuming, figures."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.threads import one_torch_thread

import echofast
from echofast.data.echonet import read_filelist, write_filelist
from echofast.data.phantom import PhantomDatasetConfig, write_phantom_dataset
from echofast.eval import downstream
from echofast.eval.downstream import (
    EFConfig,
    EFVideos,
    EvaluationConflict,
    bootstrap,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    regression_report,
    run_ef_evaluation,
)
from echofast.eval.r2plus1d import R2Plus1D, load_backbone
from echofast.eval.weights import save_weights
from echofast.figures import bland_altman_png, save_png, scatter_png
from echofast.io import write_video

_threads = pytest.fixture(autouse=True)(one_torch_thread)


def test_metrics_match_reference_formulas():
    rng = np.random.default_rng(0)
    y = rng.uniform(10, 90, 57)
    p = y + rng.normal(0, 6, 57)
    # scikit-learn's definitions, written out
    assert r2_score(y, p) == pytest.approx(1 - np.mean((y - p) ** 2) / np.var(y), rel=1e-12)
    assert mean_absolute_error(y, p) == pytest.approx(np.mean(np.abs(y - p)), rel=1e-12)
    assert mean_squared_error(y, p) == pytest.approx(np.mean((y - p) ** 2), rel=1e-12)
    rep = regression_report(y, p, samples=500)
    assert rep["rmse"]["value"] == pytest.approx(math.sqrt(np.mean((y - p) ** 2)))
    for k in ("r2", "mae", "rmse"):
        assert rep[k]["ci_low"] <= rep[k]["value"] <= rep[k]["ci_high"]
    assert rep["n"] == 57
    assert r2_score(y, y) == 1.0 and r2_score(y, np.full_like(y, y.mean())) == 0.0
    flat = np.full(4, 50.0)  # constant truth: scikit-learn's finite convention
    assert r2_score(flat, flat) == 1.0 and r2_score(flat, flat + 1) == 0.0


def test_bootstrap_is_echonets():
    y = np.arange(40, dtype=float)
    # a constant error: every resample has MAE 3, so the interval collapses
    assert bootstrap(y, y + 3, mean_absolute_error, samples=300) == (3.0, 3.0, 3.0)
    value, lo, hi = bootstrap(y, y + np.linspace(-5, 5, 40), mean_absolute_error, samples=2000)
    draws = sorted(
        mean_absolute_error(y[i], (y + np.linspace(-5, 5, 40))[i])
        for i in np.random.default_rng(0).integers(0, 40, (2000, 40))
    )
    assert (lo, hi) == (draws[100], draws[1900])  # positions round(0.05·n), round(0.95·n)


@pytest.mark.parametrize("samples", range(1, 12))
def test_bootstrap_with_few_samples(samples):
    y = np.arange(10, dtype=float)
    p = y + np.linspace(-3, 3, 10)
    value, lo, hi = bootstrap(y, p, mean_absolute_error, samples=samples)
    draws = sorted(
        mean_absolute_error(y[i], p[i])
        for i in np.random.default_rng(0).integers(0, 10, (samples, 10))
    )
    last = samples - 1
    assert (lo, hi) == (
        draws[min(round(0.05 * samples), last)],
        draws[min(round(0.95 * samples), last)],
    )
    assert lo <= hi and value == mean_absolute_error(y, p)


@pytest.mark.parametrize("samples, positions", [(50, (2, 48)), (70, (4, 66))])
def test_bootstrap_percentiles_round_halves_to_even_as_echonet(samples, positions):
    """echonet indexes the sorted resamples at Python's ``round``: 2.5 → 2, 47.5 → 48, 3.5 → 4,
    66.5 → 66 (not truncated, not rounded half up)."""
    y = np.linspace(20, 70, 13)
    p = y + np.cos(np.arange(13)) * 4
    draws = sorted(
        mean_absolute_error(y[i], p[i])
        for i in np.random.default_rng(2).integers(0, 13, (samples, 13))
    )
    _, lo, hi = bootstrap(y, p, mean_absolute_error, samples=samples, seed=2)
    assert (lo, hi) == (draws[positions[0]], draws[positions[1]])


def test_too_few_bootstrap_resamples_are_refused_before_any_file(tmp_path):
    cfg = EFConfig(train="t", test="t", out=str(tmp_path / "ev"), bootstrap=10)
    with pytest.raises(ValueError, match="--bootstrap 10: need at least 20"):
        run_ef_evaluation(cfg)
    assert not (tmp_path / "ev").exists()


def _flat_video_dataset(root, lengths):
    """Videos whose frame t is flat grey 8·(t+1) (MJPEG keeps flat frames to ±1)."""
    rows = []
    for i, n in enumerate(lengths):
        frames = np.stack([np.full((32, 32), 8 * (t + 1), np.uint8) for t in range(n)])
        write_video(root / "Videos" / f"c{i}.avi", frames, 25)
        rows.append(
            {"FileName": f"c{i}", "EF": 40 + i, "Split": "TRAIN", "FPS": 25, "NumberOfFrames": n}
        )
    rows.append({"FileName": "noef", "EF": "", "Split": "TRAIN"})
    write_filelist(root, rows)
    return root


def test_clips_follow_echonet_sampling(tmp_path):
    root = _flat_video_dataset(tmp_path, [20, 5])
    ds = EFVideos(root, "TRAIN", frames=4, period=3, mean=(0, 0, 0), std=(8, 8, 8), seed=1)
    assert [r.name for r in ds.records] == ["c0", "c1"]  # the row without EF is left out
    item = ds[0]
    levels = item["video"][0, :, 5, 5].round()  # frame t has level t+1
    start = int(levels[0]) - 1
    assert 0 <= start < 20 - 3 * 3
    assert levels.tolist() == [start + 1 + 3 * k for k in range(4)]
    assert item["video"].shape == (3, 4, 32, 32) and item["ef"] == 40
    ds.set_epoch(1)
    starts = {int(ds[0]["video"][0, 0, 5, 5].round()) for _ in range(3)}
    assert len(starts) == 1  # same (seed, epoch, index): same clip
    # a 5-frame video is zero-padded to frames·period = 12 before sampling
    short = EFVideos(root, "TRAIN", frames=4, period=3, mean=(0, 0, 0), std=(8, 8, 8), mode="all")
    whole = short[1]
    assert whole["video"].shape[1] == 12 and len(whole["starts"]) == 12 - 3 * 3
    assert (whole["video"][:, 5:] == 0).all()
    # the pad-and-crop augmentation shifts the picture by at most `pad` pixels
    padded = EFVideos(root, "TRAIN", frames=4, period=3, mean=(0, 0, 0), std=(8, 8, 8), pad=6)
    for index in range(2):
        clip = padded[index]["video"]
        border = (clip[0, 0] == 0).float()
        assert border.sum() > 0 and (clip[0, 0] != 0).float().sum() >= 26 * 26


def test_crop_offsets_are_below_twice_the_padding(tmp_path):
    """EchoNet crops the zero-padded clip at offsets ``randint(0, 2·pad)``: with pad 1 the
    picture moves down/right by one pixel or not at all, never up/left."""
    root = _flat_video_dataset(tmp_path, [20])
    ds = EFVideos(root, "TRAIN", frames=4, period=3, mean=(0, 0, 0), std=(8, 8, 8), pad=1)
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        image = ds[0]["video"][0, 0]
        assert (image[-1, 1:] != 0).all() and (image[1:, -1] != 0).all(), epoch
        seen.add((bool((image[0] == 0).all()), bool((image[:, 0] == 0).all())))
    assert len(seen) == 4  # both offsets (0 and 1) occur on both axes


def test_training_mean_std_is_the_pixel_mean_and_std(tmp_path):
    root = _flat_video_dataset(tmp_path, [20, 5])
    levels = np.concatenate([8 * (np.arange(n) + 1) for n in (20, 5)]).astype(np.float64)
    mean, std = downstream.training_mean_std(root)
    np.testing.assert_allclose(mean, [levels.mean()] * 3, rtol=1e-9)
    np.testing.assert_allclose(std, [levels.std()] * 3, rtol=1e-9)  # population std (ddof 0)


def test_backbone_from_torchvision_layout(tmp_path):
    kinetics = R2Plus1D(400, width=4, layers=(1, 1, 1, 1))
    path = tmp_path / "r2plus1d.safetensors"
    save_weights(kinetics, path)
    model = R2Plus1D(1, width=4, layers=(1, 1, 1, 1), output_bias=55.6)
    assert sorted(load_backbone(model, path)) == ["fc.bias", "fc.weight"]
    assert torch.equal(
        model.state_dict()["layer3.0.conv1.0.3.weight"],
        kinetics.state_dict()["layer3.0.conv1.0.3.weight"],
    )
    assert float(model.fc.bias.detach()) == pytest.approx(55.6)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_figures_decode(tmp_path):
    av = pytest.importorskip("av")
    y = np.linspace(15, 80, 30)
    p = y + np.sin(y)
    for name, data in (("s.png", scatter_png(y, p, "TEST")), ("b.png", bland_altman_png(y, p))):
        path = save_png(tmp_path / name, data)
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
        assert frame.shape[:2][::-1] == _png_size(data)
        dark = (frame.sum(-1) < 100).sum()
        assert dark > 200  # axes labels, ticks and the 30 dots


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "ph"
    write_phantom_dataset(
        PhantomDatasetConfig(
            out=str(root),
            num_videos=150,
            seed=0,
            frames=(24, 26),
            fps=(24, 24),
            splits=(120, 8, 22),
            size=32,
            hr_range=(60.0, 110.0),
            progress=False,
        )
    )
    return root


def test_regressor_learns_ef_on_phantoms(phantoms, tmp_path):
    """Tiny R(2+1)D, 5 epochs of AdamW on 120 phantom clips; held-out TEST split of 22."""
    cfg = EFConfig(
        train=str(phantoms),
        test=str(phantoms),
        out=str(tmp_path / "ef"),
        epochs=5,
        batch_size=8,
        optimizer="adamw",
        lr=3e-3,
        lr_step_epochs=4,
        frames=8,
        period=3,
        test_period=3,
        pad=2,
        normalization="train",
        width=8,
        layers=(1, 1, 1, 1),
        output_bias=50.0,
        bootstrap=500,
        num_workers=0,
        device="cpu",
        progress=False,
    )
    result = run_ef_evaluation(cfg)
    test = result["results"]["test"]["all_clips"]
    efs = np.array([r["EF"] for r in _rows(phantoms) if r["Split"] == "TEST"], float)
    chance_mae = np.abs(efs - efs.mean()).mean()
    print(
        f"phantom EF regression: TEST R2 {test['r2']['value']:.3f}, MAE "
        f"{test['mae']['value']:.2f} (chance MAE {chance_mae:.2f})"
    )
    assert test["n"] == 22 and test["r2"]["value"] > 0.3
    assert test["mae"]["value"] < 0.75 * chance_mae
    out = tmp_path / "ef"
    for name in (
        "results.json",
        "best.pt",
        "log.csv",
        "test_predictions.csv",
        "val_predictions.csv",
        "test_scatter.png",
        "test_bland_altman.png",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "checkpoints").glob("epoch-*.pt"))) == 1
    assert json.loads((out / "results.json").read_text())["best_epoch"] == result["best_epoch"]


def _rows(root):
    with open(root / "FileList.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def small_phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("small") / "ph"
    write_phantom_dataset(
        PhantomDatasetConfig(
            out=str(root),
            num_videos=14,
            seed=1,
            frames=(12, 14),
            fps=(12, 12),
            splits=(8, 3, 3),
            size=16,
            hr_range=(60.0, 110.0),
            progress=False,
        )
    )
    return root


def _small_cfg(root, out, **kw) -> EFConfig:
    base = dict(
        train=str(root),
        test=str(root),
        out=str(out),
        epochs=3,
        batch_size=3,
        lr=1e-3,
        lr_step_epochs=2,
        frames=4,
        period=2,
        test_period=2,
        pad=1,
        width=2,
        layers=(1, 1, 1, 1),
        bootstrap=50,
        num_workers=0,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return EFConfig(**base)


def _interrupted_run(monkeypatch, cfg: EFConfig, epoch: int, stage: str = "log") -> None:
    """Runs ``cfg`` until a simulated crash in epoch ``epoch``: while its log row is written
    (``stage="log"``) or, the row written, while its checkpoint is (``stage="checkpoint"``)."""
    add, save = downstream._Log.add, downstream._save

    def crash_adding(self, row):
        if stage == "log" and row["epoch"] == epoch:
            raise KeyboardInterrupt("simulated crash")
        add(self, row)

    def crash_saving(path, payload):
        if stage == "checkpoint" and path.name == f"epoch-{epoch:03d}.pt":
            raise KeyboardInterrupt("simulated crash")
        save(path, payload)

    with monkeypatch.context() as m:
        m.setattr(downstream._Log, "add", crash_adding)
        m.setattr(downstream, "_save", crash_saving)
        with pytest.raises(KeyboardInterrupt):
            run_ef_evaluation(cfg)
    assert not (Path(cfg.out) / "results.json").exists()


def test_resume_after_interruption_matches(small_phantoms, tmp_path, monkeypatch):
    whole = run_ef_evaluation(_small_cfg(small_phantoms, tmp_path / "a"))

    _interrupted_run(monkeypatch, _small_cfg(small_phantoms, tmp_path / "b"), epoch=1)
    resumed = run_ef_evaluation(_small_cfg(small_phantoms, tmp_path / "b"))
    assert resumed["results"] == whole["results"]
    assert (tmp_path / "a" / "test_predictions.csv").read_text() == (
        tmp_path / "b" / "test_predictions.csv"
    ).read_text()
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["0", "1", "2"]
    # finished: re-running returns the stored results; another configuration is refused
    assert run_ef_evaluation(_small_cfg(small_phantoms, tmp_path / "b")) == json.loads(
        (tmp_path / "b" / "results.json").read_text()
    )
    with pytest.raises(EvaluationConflict, match="epochs"):
        run_ef_evaluation(_small_cfg(small_phantoms, tmp_path / "b", epochs=4))


def test_finished_evaluation_of_data_changed_since_is_refused(small_phantoms, tmp_path):
    """A dataset regenerated at the same path is other data: its stored results are not
    returned (nor resumed); a folder from before the digests were recorded still returns."""
    root = tmp_path / "data"
    shutil.copytree(small_phantoms, root)
    cfg = _small_cfg(root, tmp_path / "out", epochs=1)
    first = run_ef_evaluation(cfg)
    recorded = tmp_path / "out" / "ef_inputs.json"
    inputs = json.loads(recorded.read_text())
    assert set(inputs) == {
        f"{k} {what}" for k in ("train", "val", "test") for what in ("FileList.csv", "videos")
    }
    # a video regenerated under its name, with the same FileList
    video = next(p for p in sorted((root / "Videos").iterdir()) if p.suffix == ".avi")
    saved = video.read_bytes()
    video.write_bytes(saved + b"\0")
    with pytest.raises(
        EvaluationConflict, match=r"other data: test videos, train videos, val videos changed"
    ):
        run_ef_evaluation(cfg)
    # a folder recorded before the videos were: checked for the rest, and it still returns
    older = {k: v for k, v in inputs.items() if not k.endswith(" videos")}
    recorded.write_text(json.dumps(older))
    assert run_ef_evaluation(cfg) == first
    video.write_bytes(saved)
    recorded.write_text(json.dumps(inputs))
    assert run_ef_evaluation(cfg) == first
    filelist = root / "FileList.csv"
    rows = read_filelist(filelist)
    rows[0].update(EF=str(float(rows[0]["EF"]) + 1))
    write_filelist(root, rows)
    with pytest.raises(
        EvaluationConflict,
        match=r"other data: test FileList.csv, train FileList.csv, val FileList.csv changed",
    ):
        run_ef_evaluation(cfg)
    recorded.write_text(json.dumps(older))
    with pytest.raises(EvaluationConflict, match=r"other data: test FileList.csv, train"):
        run_ef_evaluation(cfg)
    recorded.unlink()
    assert run_ef_evaluation(cfg) == first


@pytest.mark.parametrize("wrong", ["train", "test", "val"])
def test_inputs_are_checked_before_the_run_is_recorded(small_phantoms, tmp_path, wrong):
    from echofast.data.datasets import DatasetError

    out = tmp_path / "ev"
    with pytest.raises(DatasetError, match="nothere"):
        run_ef_evaluation(_small_cfg(small_phantoms, out, **{wrong: str(tmp_path / "nothere")}))
    assert not out.exists()
    result = run_ef_evaluation(_small_cfg(small_phantoms, out, epochs=1))  # the corrected retry
    assert result["results"]["test"]["all_clips"]["n"] == 3


def test_cli_ef(small_phantoms, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "ef",
        "--train",
        str(small_phantoms),
        "--test",
        str(small_phantoms),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--frames",
        "4",
        "--width",
        "2",
        "--layers",
        "1,1,1,1",
        "--bootstrap",
        "20",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    val = shutil.copytree(small_phantoms, tmp_path / "val")
    assert downstream.main_evaluate([*argv, "--val", str(val), "--weight-decay", "0.002"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["test_all_clips"]) == {"r2", "mae", "rmse"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["layers"] == [1, 1, 1, 1] and saved["config"]["optimizer"] == "sgd"
    assert saved["config"]["val"] == str(val.resolve())
    assert saved["config"]["weight_decay"] == 0.002
    assert saved["results"]["val"]["dataset"] == str(val.resolve())
    assert saved["results"]["test"]["dataset"] == str(small_phantoms.resolve())
    for layers in ("1,1", "1,1,1,x", "1,,1,1"):
        with pytest.raises(
            ValueError, match=f"--layers needs 4 comma-separated counts, got '{layers}'"
        ):
            downstream.main_evaluate([*argv[:-1], "--layers", layers])


SCRIPT = """
import os
import sys
import time

from echofast.eval.downstream import main_evaluate


def distributed_threads():
    names = []
    if os.path.isdir("/proc/self/task"):
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/comm") as fh:
                    names.append(fh.read().strip())
            except OSError:
                pass
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


code = main_evaluate(sys.argv[1:])
# threads told to stop may take a moment to end on a loaded machine; one still running after
# 10 s is left behind (and would meet interpreter shutdown)
deadline = time.monotonic() + 10
while distributed_threads() and time.monotonic() < deadline:
    time.sleep(0.05)
left = distributed_threads()
print("distributed threads left:", left)
sys.exit(code or (3 if left else 0))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks(small_phantoms, tmp_path):
    """Two Gloo ranks (env:// as under torchrun) train one epoch; the sharded, gathered TEST
    predictions equal a single-process evaluation of the saved best weights. When the command
    returns, no Gloo or TCPStore thread is left (DDP's lazy import kept the process group alive
    after destroy_process_group, and its threads met interpreter shutdown: a rare SIGABRT)."""
    script = tmp_path / "ef_main.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp"
    args = [
        "ef",
        "--train",
        str(small_phantoms),
        "--test",
        str(small_phantoms),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--frames",
        "4",
        "--width",
        "2",
        "--layers",
        "1,1,1,1",
        "--bootstrap",
        "20",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    root = str(Path(echofast.__file__).resolve().parents[1])
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
    )
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(script), *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                ),
                log,
            )
        )
    try:
        codes = [p.wait(timeout=240) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-2000:] for r in range(2))
    assert codes == [0, 0], logs
    assert logs.count("distributed threads left: []") == 2, logs
    result = json.loads((out / "results.json").read_text())
    assert result["world_size"] == 2 and result["results"]["test"]["all_clips"]["n"] == 3
    assert len((out / "log.csv").read_text().splitlines()) == 2
    state = torch.load(out / "best.pt", weights_only=True)
    model = R2Plus1D(1, width=2, layers=(1, 1, 1, 1))
    model.load_state_dict(state["model"])
    model.eval()
    ds = EFVideos(
        small_phantoms,
        "TEST",
        frames=4,
        period=2,
        mode="all",
        mean=tuple(state["mean"]),
        std=tuple(state["std"]),
    )
    single = downstream._predict_all(model, ds, list(range(len(ds))), 3, "cpu", 0, False, "")
    rows = (out / "test_predictions.csv").read_text().splitlines()[1:]
    gathered = [float(r.split(",")[2]) for r in rows]
    assert gathered == pytest.approx([single[i][0] for i in range(len(ds))], abs=1e-4)


def test_config_identity_leaves_out_run_facts_and_resolves_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    short = EFConfig(train="a", test="b", out="o")
    spelled_out = EFConfig(
        train=str(tmp_path / "a"),
        test=str(tmp_path / "b"),
        val=str(tmp_path / "b"),  # the default: --test's VAL split
        out="elsewhere",
        num_workers=0,
        device="cpu",
        progress=False,
    )
    assert short.identity() == spelled_out.identity()
    assert short.identity()["val"] == str(tmp_path / "b")
    weights = EFConfig(train="a", test="b", out="o", init_weights="w.pt").identity()
    assert weights["init_weights"] == str(tmp_path / "w.pt")
    EFConfig(train="a", test="b", out="o", epochs=0, pad=0, bootstrap=20).check()


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": -1},
        {"batch_size": 0},
        {"frames": 0},
        {"period": 0},
        {"test_period": 0},
        {"pad": -1},
        {"bootstrap": 19},
        {"optimizer": "adam"},
        {"normalization": "dataset"},
    ],
)
def test_config_values_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EFConfig(train="a", test="b", out="o", **bad).check()


def test_non_empty_folder_and_foreign_checkpoints_are_refused(tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EvaluationConflict, match="not empty"):
        run_ef_evaluation(EFConfig(train="t", test="t", out=str(out)))
    with pytest.raises(EvaluationConflict, match=f"{out / 'notes.txt'} exists and is not a folder"):
        run_ef_evaluation(EFConfig(train="t", test="t", out=str(out / "notes.txt")))
    assert (out / "notes.txt").read_text() == "mine"
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(EvaluationConflict, match="not an echofast EF-evaluation checkpoint"):
        downstream._load_ckpt(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationConflict, match="unreadable checkpoint"):
        downstream._load_ckpt(tmp_path / "broken.pt")


def test_pixels_are_normalised_per_channel(tmp_path):
    root = _flat_video_dataset(tmp_path, [6])
    mean, std = (8.0, 20.0, 40.0), (2.0, 4.0, 8.0)
    ds = EFVideos(root, "TRAIN", frames=2, period=3, mean=mean, std=std, mode="all")
    video = ds[0]["video"]
    levels = 8.0 * (np.arange(6) + 1)  # frame t is flat grey 8·(t+1), ±1 after MJPEG
    for c in range(3):
        expected = (levels - mean[c]) / std[c]
        np.testing.assert_allclose(video[c, :, 16, 16].numpy(), expected, atol=1.01 / std[c])
    with pytest.raises(ValueError, match="mode"):
        EFVideos(root, "TRAIN", frames=2, period=3, mode="every")


def test_clip_starts_follow_the_documented_generator(tmp_path):
    """Item ``i`` of epoch ``e`` starts at ``default_rng([seed, e, i, stream]).integers(n)``."""
    root = _flat_video_dataset(tmp_path, [20])
    seen = []
    for stream in range(4):
        ds = EFVideos(root, "TRAIN", frames=4, period=3, std=(8, 8, 8), seed=5, stream=stream)
        ds.set_normalization((0, 0, 0), (8, 8, 8))
        ds.set_epoch(3)
        start = int(ds[0]["video"][0, 0, 5, 5].round()) - 1  # frame t has level t+1
        expected = int(np.random.default_rng([5, 3, 0, stream]).integers(20 - 3 * 3))
        assert start == expected, stream
        seen.append(start)
    assert len(set(seen)) > 1  # the streams draw differently


def test_training_mean_std_reads_only_train_videos(tmp_path):
    root = _flat_video_dataset(tmp_path, [20, 5])
    rows = read_filelist(root / "FileList.csv")
    rows[1]["Split"] = "VAL"
    write_filelist(root, rows)
    levels = 8.0 * (np.arange(20) + 1)
    mean, std = downstream.training_mean_std(root)
    np.testing.assert_allclose(mean, [levels.mean()] * 3, rtol=1e-9)
    np.testing.assert_allclose(std, [levels.std()] * 3, rtol=1e-9)


def test_report_intervals_are_seeded_bootstraps(tmp_path):
    rng = np.random.default_rng(4)
    y = rng.uniform(20, 80, 23)
    p = y + rng.normal(0, 5, 23)
    rep = regression_report(y, p, samples=200, seed=3)
    for key, func in (("r2", r2_score), ("mae", mean_absolute_error)):
        assert tuple(rep[key].values()) == bootstrap(y, p, func, 200, 3)
    mse = bootstrap(y, p, mean_squared_error, 200, 3)
    assert tuple(rep["rmse"].values()) == pytest.approx(tuple(math.sqrt(v) for v in mse))
    assert regression_report(y, p, samples=200, seed=4)["mae"] != rep["mae"]
    with pytest.raises(ValueError, match="samples >= 1"):
        bootstrap(y, p, mean_absolute_error, samples=0)


def _closed_form_report(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """R² as 1 − SS_res/SS_tot, MAE, RMSE, written out."""
    ss_res, ss_tot = ((y - p) ** 2).sum(), ((y - y.mean()) ** 2).sum()
    return {
        "r2": 1 - ss_res / ss_tot,
        "mae": np.abs(y - p).mean(),
        "rmse": math.sqrt(((y - p) ** 2).mean()),
    }


def test_resumed_run_tests_the_best_weights(small_phantoms, tmp_path, monkeypatch):
    """AdamW at a high rate: VAL loss falls, then rises; the epoch-1 weights are the best ones
    (also across a crash after epoch 2 was logged) and are what VAL and TEST numbers come
    from, on clips of every ``test_period``-th frame."""
    cfg = _small_cfg(small_phantoms, tmp_path / "ev", optimizer="adamw", lr=0.1, period=1)
    _interrupted_run(monkeypatch, cfg, epoch=2, stage="checkpoint")
    result = run_ef_evaluation(cfg)
    out = Path(cfg.out)
    # finished: a re-run only returns the stored results
    stored = (out / "results.json").read_text()
    assert run_ef_evaluation(cfg) == json.loads(stored)
    assert (out / "results.json").read_text() == stored
    with open(out / "log.csv", newline="") as fh:
        log = list(csv.DictReader(fh))
    val_losses = [float(r["val_loss"]) for r in log]
    assert [int(r["epoch"]) for r in log] == [0, 1, 2]
    assert [float(r["lr"]) for r in log] == pytest.approx([0.1, 0.1, 0.01])
    best = int(np.argmin(val_losses))
    assert best != len(log) - 1, "the run should overshoot after its best epoch"
    assert result["best_epoch"] == best and result["best_val_loss"] == val_losses[best]
    assert result["train_videos"] == 8
    assert result["normalization"] == {
        "mean": list(downstream.ECHONET_MEAN),
        "std": list(downstream.ECHONET_STD),
    }
    last = torch.load(out / "checkpoints" / "epoch-002.pt", weights_only=True)
    group = last["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == cfg.weight_decay
    # every epoch is len(train) // batch = 8 // 3 = 2 steps
    assert int(last["optimizer"]["state"][0]["step"]) == 3 * 2

    state = torch.load(out / "best.pt", weights_only=True)
    assert state["epoch"] == best
    model = R2Plus1D(1, width=2, layers=(1, 1, 1, 1))
    model.load_state_dict(state["model"])
    model.eval()
    norm = dict(frames=4, period=2, mean=tuple(state["mean"]), std=tuple(state["std"]))
    # the VAL loss of the best epoch: one clip per VAL video, drawn from stream 1
    val = EFVideos(small_phantoms, "VAL", stream=1, **norm)
    val.set_epoch(best)
    with torch.no_grad():
        p = model(torch.stack([val[i]["video"] for i in range(len(val))])).view(-1)
    y = np.array([r.ef for r in val.records])
    assert np.mean((y - p.double().numpy()) ** 2) == pytest.approx(val_losses[best], rel=1e-5)
    # TEST: the mean over every clip start, and one clip from stream 2
    with open(out / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    every = EFVideos(small_phantoms, "TEST", mode="all", **norm)
    one = EFVideos(small_phantoms, "TEST", stream=2, **norm)
    assert [r["FileName"] for r in rows] == [r.name for r in every.records]
    for k, row in enumerate(rows):
        video = every[k]["video"]
        n = video.shape[1] - 3 * 2
        clips = torch.stack([video[:, s + 2 * torch.arange(4)] for s in range(n)])
        with torch.no_grad():
            assert int(row["Clips"]) == n
            assert float(row["Predicted"]) == pytest.approx(float(model(clips).mean()), abs=2e-4)
            single = float(model(one[k]["video"][None]))
            assert float(row["PredictedOneClip"]) == pytest.approx(single, abs=2e-4)
    y = np.array([float(r["EF"]) for r in rows])
    test = result["results"]["test"]
    for kind, column in (("all_clips", "Predicted"), ("one_clip", "PredictedOneClip")):
        p = np.array([float(r[column]) for r in rows])
        for key, value in _closed_form_report(y, p).items():
            assert test[kind][key]["value"] == pytest.approx(value, rel=1e-4, abs=1e-4)
        assert test[kind]["n"] == 3


def test_sgd_keeps_the_reference_momentum_and_decay(small_phantoms, tmp_path, capsys):
    cfg = _small_cfg(small_phantoms, tmp_path / "sgd", epochs=1, weight_decay=3e-4, progress=True)
    run_ef_evaluation(cfg)
    assert "epoch 0" in capsys.readouterr().err  # the progress bar of the epoch
    group = torch.load(tmp_path / "sgd" / "best.pt", weights_only=True)["optimizer"]
    group = group["param_groups"][0]
    assert (group["momentum"], group["weight_decay"], group["lr"]) == (0.9, 3e-4, 1e-3)


def test_defaults_are_the_documented_protocol():
    """The module docstring's EchoNet-Dynamic settings, and the CLI's defaults are the same."""
    assert tuple(round(v, 2) for v in downstream.ECHONET_MEAN) == (32.66, 32.79, 33.08)
    assert tuple(round(v, 2) for v in downstream.ECHONET_STD) == (49.80, 49.89, 50.18)
    d = EFConfig(train="a", test="b", out="o")
    assert (d.epochs, d.batch_size, d.optimizer, d.lr, d.momentum, d.weight_decay) == (
        45,
        20,
        "sgd",
        1e-4,
        0.9,
        1e-4,
    )
    assert (d.lr_step_epochs, d.frames, d.period, d.test_period, d.pad) == (15, 32, 2, 2, 12)
    assert (d.normalization, d.layers, d.output_bias, d.bootstrap) == (
        "echonet",
        (2, 2, 2, 2),
        55.6,
        10_000,
    )


def _cli_config(monkeypatch, argv) -> EFConfig:
    """The EFConfig ``echofast evaluate ef argv`` runs (the run itself replaced)."""
    seen = []
    monkeypatch.setattr(downstream, "run_ef_evaluation", lambda cfg: seen.append(cfg) or {})
    assert downstream.main_evaluate(["ef", *argv]) == 0
    return seen[0]


def test_cli_passes_every_option_to_the_run(monkeypatch):
    need = ["--train", "tr", "--test", "te", "--out", "o"]
    assert _cli_config(monkeypatch, need) == EFConfig(train="tr", test="te", out="o")
    argv = [*need, "--val", "va", "--epochs", "7", "--batch-size", "5", "--optimizer", "adamw"]
    argv += ["--lr", "0.25", "--weight-decay", "0.125", "--lr-step-epochs", "3", "--frames", "6"]
    argv += ["--period", "3", "--test-period", "4", "--pad", "5", "--normalization", "train"]
    argv += ["--width", "9", "--layers", "1,2,3,1", "--output-bias", "41.5"]
    argv += ["--init-weights", "w.pt", "--allow-pickle", "--seed", "11", "--bootstrap", "33"]
    argv += ["--num-workers", "2", "--device", "cpu", "--no-progress"]
    expected = EFConfig(
        train="tr",
        test="te",
        out="o",
        val="va",
        epochs=7,
        batch_size=5,
        optimizer="adamw",
        lr=0.25,
        weight_decay=0.125,
        lr_step_epochs=3,
        frames=6,
        period=3,
        test_period=4,
        pad=5,
        normalization="train",
        width=9,
        layers=(1, 2, 3, 1),
        output_bias=41.5,
        init_weights="w.pt",
        allow_pickle=True,
        seed=11,
        bootstrap=33,
        num_workers=2,
        device="cpu",
        progress=False,
    )
    assert _cli_config(monkeypatch, argv) == expected


def test_training_mean_std_draws_at_most_samples_videos(tmp_path):
    root = _flat_video_dataset(tmp_path, [3, 5, 9])
    per_video = [8.0 * (np.arange(n) + 1) for n in (3, 5, 9)]
    for seed in range(3):
        mean, std = downstream.training_mean_std(root, samples=1, seed=seed)
        assert any(
            np.allclose([mean[0], std[0]], [v.mean(), v.std()], rtol=1e-9) for v in per_video
        ), seed
    subsets = [np.concatenate([per_video[a], per_video[b]]) for a, b in ((0, 1), (0, 2), (1, 2))]
    mean, std = downstream.training_mean_std(root, samples=2, seed=1)
    assert any(np.allclose([mean[0], std[0]], [v.mean(), v.std()], rtol=1e-9) for v in subsets)


def test_a_split_without_ef_labels_is_refused_naming_the_dataset(tmp_path):
    from echofast.data.datasets import DatasetError

    root = _flat_video_dataset(tmp_path, [6, 6, 6])
    rows = read_filelist(root / "FileList.csv")
    rows[1].update(EF="")  # a video without an EF is left out
    rows[2].update(EF="", Split="VAL")
    write_filelist(root, rows)
    assert [r.name for r in EFVideos(root, "TRAIN", frames=2, period=1).records] == ["c0"]
    with pytest.raises(
        DatasetError, match=r"FileList.csv: no VAL videos with an EF \(it lists splits TRAIN, VAL\)"
    ):
        EFVideos(root, "VAL", frames=2, period=1)


@pytest.mark.parametrize(
    "ef, problem",
    [("6O.2", "'6O.2' is not a number"), ("inf", "'inf' is not finite"), ("0.62e3", "outside")],
)
def test_a_filled_in_ef_that_is_not_a_percentage_is_refused_naming_the_row(tmp_path, ef, problem):
    """Only an empty EF marks an unlabelled row; a typo must not shrink the dataset silently."""
    from echofast.data.datasets import DatasetError

    root = _flat_video_dataset(tmp_path, [6, 6, 6])
    rows = read_filelist(root / "FileList.csv")
    rows[1].update(EF=ef)
    write_filelist(root, rows)
    named = r"FileList\.csv: 1 TRAIN row.*row 2 \(FileName 'c1'\)"
    with pytest.raises(DatasetError, match=named):
        EFVideos(root, "TRAIN", frames=2, period=1)
    with pytest.raises(DatasetError, match=problem):
        EFVideos(root, "TRAIN", frames=2, period=1)
    for edge in ("0", "100"):
        rows[1].update(EF=edge)
        write_filelist(root, rows)
        assert len(EFVideos(root, "TRAIN", frames=2, period=1)) == 3


@pytest.mark.parametrize("split", ["TRAIN", "VAL", "TEST"])
def test_a_missing_video_is_refused_before_the_run_is_recorded(small_phantoms, tmp_path, split):
    """As echonet's ``Echo``: a listed video that is missing stops the run (it used to be left
    out, so the TEST numbers silently covered fewer videos)."""
    from echofast.data.datasets import DatasetError

    root = tmp_path / "data"
    shutil.copytree(small_phantoms, root)
    gone = next(r["FileName"] for r in _rows(root) if r["Split"] == split)
    (root / "Videos" / f"{gone}.avi").unlink()
    out = tmp_path / "ev"
    with pytest.raises(DatasetError, match=rf"1 {split} video\(s\) .* missing.*{gone}\.avi"):
        run_ef_evaluation(_small_cfg(root, out))
    assert not out.exists()


def test_checkpoints_are_found_by_epoch_number(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    epochs = [12, 3, 1000, 7, 999, 0, 45, 100, 8, 21, 66, 5]
    for epoch in epochs:
        (folder / f"epoch-{epoch:03d}.pt").write_bytes(b"")
    for stray in ("epoch-best.pt", "epoch-.pt", "epoch.pt"):
        (folder / stray).write_bytes(b"")
    found = downstream._checkpoints(tmp_path)
    assert [e for e, _ in found] == sorted(epochs)
    assert [p.name for _, p in found][-2:] == ["epoch-999.pt", "epoch-1000.pt"]


def test_checkpoints_holding_arbitrary_objects_are_not_unpickled(tmp_path):
    from fractions import Fraction

    path = tmp_path / "epoch-000.pt"
    torch.save({"format": downstream.CHECKPOINT_FORMAT, "epoch": Fraction(1, 3)}, path)
    with pytest.raises(EvaluationConflict, match=f"{path}: unreadable checkpoint"):
        downstream._load_ckpt(path)


def test_zero_epochs_tests_the_initial_weights_in_an_empty_folder(small_phantoms, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()  # an existing empty folder is as good as none
    result = run_ef_evaluation(_small_cfg(small_phantoms, out, epochs=0))
    assert result["best_epoch"] is None and result["best_val_loss"] is None
    assert (out / "log.csv").read_text() == "epoch,train_loss,val_loss,val_r2,lr,seconds\n"
    assert not (out / "best.pt").exists() and result["results"]["test"]["all_clips"]["n"] == 3


def test_training_normalisation_uses_the_training_set_statistics(
    small_phantoms, tmp_path, monkeypatch
):
    """With ``normalization="train"``, every clip (TRAIN, VAL and TEST) is normalised by the
    training set's mean/std, drawn with the run's seed."""
    calls, used = [], set()

    def fake_mean_std(root, samples=128, seed=0):
        calls.append((Path(root), samples, seed))
        return (10.0, 20.0, 30.0), (2.0, 3.0, 4.0)

    getitem = EFVideos.__getitem__

    def recording(self, index):
        used.add((self.mode, self.stream, tuple(self.mean.flatten().tolist())))
        used.add(("std", tuple(self.std.flatten().tolist())))
        return getitem(self, index)

    monkeypatch.setattr(downstream, "training_mean_std", fake_mean_std)
    monkeypatch.setattr(EFVideos, "__getitem__", recording)
    cfg = _small_cfg(small_phantoms, tmp_path / "ev", epochs=1, normalization="train", seed=4)
    result = run_ef_evaluation(cfg)
    assert calls == [(small_phantoms, 128, 4)]
    means = (10.0, 20.0, 30.0)
    assert used == {
        ("random", 0, means),  # training clips
        ("random", 1, means),  # VAL loss
        ("random", 2, means),  # one clip per video
        ("all", 0, means),  # every clip
        ("std", (2.0, 3.0, 4.0)),
    }
    assert result["normalization"] == {"mean": list(means), "std": [2.0, 3.0, 4.0]}


def test_a_checkpoint_of_another_configuration_is_refused(small_phantoms, tmp_path):
    cfg = _small_cfg(small_phantoms, tmp_path / "ev", epochs=1)
    run_ef_evaluation(cfg)
    out = Path(cfg.out)
    (out / "results.json").unlink()
    ckpt = out / "checkpoints" / "epoch-000.pt"
    state = torch.load(ckpt, weights_only=True)
    state["config"] = dict(state["config"], lr=0.5)
    torch.save(state, ckpt)
    with pytest.raises(EvaluationConflict, match=f"{ckpt}: made with another configuration"):
        run_ef_evaluation(cfg)


def test_best_weights_have_the_lowest_val_loss_and_results_are_seeded_reports(
    small_phantoms, tmp_path, monkeypatch
):
    """VAL predictions off by 3, 1, 2, √2, 1 EF points in epochs 0-4 (VAL loss 9, 1, 4, 2, 1):
    epoch 1 is the best (a later tie or a mere improvement on the epoch before does not replace
    it). The reported numbers are :func:`regression_report` of the predictions with the run's
    seed and resample count, for VAL and TEST, one clip and all clips."""
    offsets = iter([3.0, 1.0, 2.0, math.sqrt(2.0), 1.0])
    scripted = {}

    def predict_one(model, ds, indices, batch, device, workers):
        off = next(offsets, None)
        if off is None:  # after training: a fixed function of the video
            p = {i: 30.0 + 0.5 * ds.records[i].ef + (-1) ** i * 2.0 for i in indices}
            scripted[(ds.records[0].split, "one")] = p
            return p
        return {i: ds.records[i].ef + off for i in indices}

    def predict_all(model, ds, indices, batch, device, workers, progress, desc):
        p = {i: (20.0 + 0.7 * ds.records[i].ef + 3.0 * math.cos(i), 5) for i in indices}
        scripted[(ds.records[0].split, "all")] = {i: v[0] for i, v in p.items()}
        return p

    monkeypatch.setattr(downstream, "_predict_one", predict_one)
    monkeypatch.setattr(downstream, "_predict_all", predict_all)
    cfg = _small_cfg(small_phantoms, tmp_path / "ev", epochs=5, seed=3, bootstrap=20)
    result = run_ef_evaluation(cfg)
    with open(tmp_path / "ev" / "log.csv", newline="") as fh:
        log = list(csv.DictReader(fh))
    assert [float(r["val_loss"]) for r in log] == pytest.approx([9, 1, 4, 2, 1], rel=1e-12)
    val = EFVideos(small_phantoms, "VAL", frames=4, period=2)
    y = np.array([r.ef for r in val.records])
    ss_tot = ((y - y.mean()) ** 2).sum()
    r2 = [1 - len(y) * off**2 / ss_tot for off in (3, 1, 2, math.sqrt(2), 1)]
    assert [float(r["val_r2"]) for r in log] == pytest.approx(r2, rel=1e-9)
    assert (result["best_epoch"], result["best_val_loss"]) == (1, pytest.approx(1.0))
    assert torch.load(tmp_path / "ev" / "best.pt", weights_only=True)["epoch"] == 1
    for split in ("val", "test"):
        ds = EFVideos(small_phantoms, split.upper(), frames=4, period=2)
        y = np.array([r.ef for r in ds.records])
        for kind, key in (("one_clip", "one"), ("all_clips", "all")):
            p = scripted[(split.upper(), key)]
            p = np.array([p[i] for i in range(len(y))])
            expected = regression_report(y, p, 20, 3)
            assert result["results"][split][kind] == expected, (split, kind)
            assert expected != regression_report(y, p, 20, 0)


def test_training_starts_from_the_initial_weights(small_phantoms, tmp_path):
    """``init_weights`` (a pickled torchvision-layout file, read only with ``allow_pickle``)
    initialises the backbone; with lr 0 the best weights still hold them."""
    from echofast.eval.weights import WeightsError

    kinetics = R2Plus1D(400, width=2, layers=(1, 1, 1, 1))
    path = tmp_path / "r2plus1d_18.pt"
    torch.save(kinetics.state_dict(), path)
    cfg = _small_cfg(small_phantoms, tmp_path / "ev", epochs=1, lr=0.0, init_weights=str(path))
    with pytest.raises(WeightsError, match="allow"):
        run_ef_evaluation(cfg)
    cfg.allow_pickle = True
    run_ef_evaluation(cfg)
    best = torch.load(tmp_path / "ev" / "best.pt", weights_only=True)["model"]
    for key in ("stem.0.weight", "layer3.0.conv1.0.3.weight", "layer4.0.conv2.1.weight"):
        assert torch.equal(best[key], kinetics.state_dict()[key]), key
    # other initial weights in the same file: another evaluation, refused (ef_inputs.json)
    torch.save(R2Plus1D(400, width=2, layers=(1, 1, 1, 1)).state_dict(), path)
    with pytest.raises(EvaluationConflict, match="other data: init weights changed"):
        run_ef_evaluation(cfg)
