"""`echofast generate` with the background video writer: the same bytes (videos, FileList.csv,
journal) as inline writing; a disk-full error on the 2nd video surfaces typed, naming the file,
after the 1st is journaled and with no partial 2nd file, and a resume completes the dataset;
kill -9 while the writer's queue holds videos resumes to the same bytes."""

from __future__ import annotations

import dataclasses
import errno
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from pipelines.test_generate import N
from pipelines.test_generate import _cfg as generate_cfg
from privacy.phantom_latents import write_phantom_latents
from support.threads import one_torch_thread

import echofast.io.writer as writer_mod
from echofast.fsutil import atomic_write
from echofast.pipelines.dataset import GenerateConfig, generate_dataset, read_journal
from echofast.privacy import ReIdentificationModel

JOURNAL = Path(".echofast") / "journal-0of1.jsonl"
ATTEMPTS = Path(".echofast") / "privacy" / "attempts.jsonl"


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _cfg(weights_root, out, **kw) -> GenerateConfig:
    return generate_cfg(weights_root, out, **{"seed": 11, **kw})


def _dataset(folder: Path) -> dict[str, bytes]:
    """Every file of the dataset that must not depend on how it was written."""
    files = {f"Videos/{p.name}": p.read_bytes() for p in sorted((folder / "Videos").iterdir())}
    for name in ("FileList.csv", "VolumeTracings.csv", str(JOURNAL)):
        files[name] = (folder / name).read_bytes()
    return files


def _disk_full_on_second(calls: list[str]):
    """A write_video that, on its 2nd call, fills the temporary file and then fails like a full
    disk, through the real atomic writer."""
    real = writer_mod.write_video

    def write(path, frames, fps):
        calls.append(Path(path).name)
        if len(calls) == 2:

            def partial(tmp):
                Path(tmp).write_bytes(b"RIFF partial")
                raise OSError(errno.ENOSPC, "No space left on device")

            atomic_write(path, partial)
        return real(path, frames, fps)

    return write


@pytest.fixture(scope="module")
def inline_run(weights_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("inline") / "ds"
    summary = generate_dataset(_cfg(weights_root, out, writer_threads=0))
    assert summary["complete"] and summary["generated"] == N
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_background_writer_gives_the_inline_bytes(inline_run, weights_root, tmp_path, threads):
    """Videos, FileList.csv and the journal (its lines in sample order) are identical."""
    out = tmp_path / "ds"
    summary = generate_dataset(_cfg(weights_root, out, writer_threads=threads))
    assert summary["complete"] and summary["generated"] == N
    assert _dataset(out) == _dataset(inline_run)
    assert [e["index"] for e in read_journal(out / JOURNAL)] == list(range(N))
    manifest = json.loads((out / "generation.json").read_text())["arguments"]
    assert "writer_threads" not in manifest  # the writer does not define the dataset


def test_disk_full_on_second_video_then_resume(inline_run, weights_root, tmp_path, monkeypatch):
    """The 2nd write fails after filling its temporary file; videos of the next chunk, generated
    meanwhile, are neither written nor journaled."""
    real = writer_mod.write_video
    calls: list[str] = []
    monkeypatch.setattr(writer_mod, "write_video", _disk_full_on_second(calls))
    out = tmp_path / "ds"
    with pytest.raises(OSError) as info:
        generate_dataset(_cfg(weights_root, out, writer_threads=1))
    assert info.value.errno == errno.ENOSPC
    assert "synthetic_000001.avi" in str(info.value)
    assert calls == ["synthetic_000000.avi", "synthetic_000001.avi"]
    assert [e["index"] for e in read_journal(out / JOURNAL)] == [0]
    assert sorted(p.name for p in (out / "Videos").iterdir()) == ["synthetic_000000.avi"]
    monkeypatch.setattr(writer_mod, "write_video", real)
    summary = generate_dataset(_cfg(weights_root, out, writer_threads=1))
    assert summary["already_done"] == 1 and summary["generated"] == N - 1 and summary["complete"]
    assert _dataset(out) == _dataset(inline_run)


DRIVER = textwrap.dedent(
    """
    import dataclasses, json, sys, time
    from pathlib import Path

    import torch

    import echofast.io.writer as w
    from echofast.pipelines.dataset import GenerateConfig, Shard, generate_dataset

    args = json.loads(sys.argv[1])
    args["shard"] = Shard(**args["shard"])
    cfg = GenerateConfig(**args)
    marker = Path(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]))  # the test's: its video 0 meets the resumed ones
    real, calls = w.write_video, []

    def stuck_on_second(path, frames, fps):
        calls.append(path)
        if len(calls) == 2:
            time.sleep(600)  # killed here, with later videos waiting in the queue
        return real(path, frames, fps)

    def put(self, *job, _put=w.VideoWriter._put):
        _put(self, *job)
        if self.pending >= 3:
            marker.touch()

    w.write_video, w.VideoWriter._put = stuck_on_second, put
    generate_dataset(cfg)
    """
)


def test_kill_9_with_videos_queued_then_resume(inline_run, weights_root, tmp_path):
    """SIGKILL while video 1 is being written and videos 2, 3 wait in the queue: only video 0 is
    journaled, and the resumed dataset is byte-identical to the inline one."""
    out, marker = tmp_path / "ds", tmp_path / "queued"
    cfg = _cfg(weights_root, out, writer_threads=1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRIVER,
            json.dumps(dataclasses.asdict(cfg)),
            str(marker),
            str(torch.get_num_threads()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.02)
    assert proc.poll() is None, f"ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    assert marker.exists(), "the writer queue never held videos"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [e["index"] for e in read_journal(out / JOURNAL)] == [0]
    summary = generate_dataset(cfg)
    assert summary["already_done"] == 1 and summary["complete"]
    assert _dataset(out) == _dataset(inline_run)
    assert not list((out / "Videos").glob(".*"))


def test_writer_threads_is_validated(weights_root, tmp_path):
    with pytest.raises(ValueError, match="writer threads"):
        generate_dataset(_cfg(weights_root, tmp_path / "ds", writer_threads=-1))
    assert not (tmp_path / "ds").exists()


@pytest.fixture(scope="module")
def private_inputs(weights_root, tmp_path_factory):
    """Phantom reference latents (12 TRAIN / 2 VAL / 12 TEST) and a tiny random re-id model."""
    reference = write_phantom_latents(
        tmp_path_factory.mktemp("ref"), weights_root / "vae", (12, 2, 12)
    )
    torch.manual_seed(0)
    model = tmp_path_factory.mktemp("models") / "reid"
    ReIdentificationModel(layers=(1, 1, 1, 1), width=8, n_features=32).save_pretrained(model)
    return reference, model


def _private_cfg(weights_root, out, private_inputs, **kw) -> GenerateConfig:
    reference, model = private_inputs
    base = dict(
        frames=8,
        seed=2,
        privacy=str(model),
        reference_latents=str(reference),
        auc_threshold=0.0,
        privacy_percentile=50.0,
        privacy_frame_step=4,
        oversample=3.0,
        num_videos=4,
    )
    base.update(kw)
    return _cfg(weights_root, out, **base)


def test_private_disk_full_on_second_video_then_resume(
    weights_root, private_inputs, tmp_path, monkeypatch
):
    """--privacy: the attempts journal stops exactly before the attempt of the failed video
    (a prefix of the inline run's), and the resumed dataset and report are the inline bytes."""
    ref = tmp_path / "inline"
    generate_dataset(_private_cfg(weights_root, ref, private_inputs, writer_threads=0))
    ref_attempts = read_journal(ref / ATTEMPTS)
    assert any(not e["passed"] for e in ref_attempts[:-1]), "no dropped video: weak test"
    calls: list[str] = []
    real = writer_mod.write_video
    monkeypatch.setattr(writer_mod, "write_video", _disk_full_on_second(calls))
    out = tmp_path / "bg"
    with pytest.raises(OSError, match=r"synthetic_000001\.avi") as info:
        generate_dataset(_private_cfg(weights_root, out, private_inputs, writer_threads=1))
    assert info.value.errno == errno.ENOSPC
    assert [e["index"] for e in read_journal(out / JOURNAL)] == [0]
    assert sorted(p.name for p in (out / "Videos").iterdir()) == ["synthetic_000000.avi"]
    second = next(k for k, e in enumerate(ref_attempts) if e["slot"] == 1)
    assert read_journal(out / ATTEMPTS) == ref_attempts[:second]
    monkeypatch.setattr(writer_mod, "write_video", real)
    generate_dataset(_private_cfg(weights_root, out, private_inputs, writer_threads=1))
    files = ("privacy_report.json", "privacy_report.png", str(ATTEMPTS))
    assert _dataset(out) == _dataset(ref)
    for name in files:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
