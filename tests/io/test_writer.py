"""`echofast.io.VideoWriter`: order of the steps, files identical to inline writing, bounded
queue, typed errors naming the file with nothing partial left, shutdown on interrupts."""

from __future__ import annotations

import errno
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

import echofast.io.writer as writer_mod
from echofast.fsutil import atomic_write
from echofast.io import VideoEncodeError, VideoWriter, write_video

WAIT_S = 30.0


def _frames(k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    return torch.randint(0, 256, (3 + k % 3, 8, 10), dtype=torch.uint8, generator=g)


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _no_writer_threads() -> bool:
    return not any(t.name.startswith("echofast-writer") for t in threading.enumerate())


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_steps_run_in_submission_order_after_their_file(tmp_path, monkeypatch, threads):
    """Earlier jobs are made slower, so with 3 workers later files are finished first: the steps
    still run in submission order, each after its own file is in place, and the files are the
    bytes inline writing gives."""
    n = 9
    real = writer_mod.write_video

    def slow_write(path, frames, fps):
        time.sleep(0.02 * (n - int(Path(path).stem)))
        return real(path, frames, fps)

    monkeypatch.setattr(writer_mod, "write_video", slow_write)
    log: list[tuple] = []
    finished: list[int] = []

    def step(k, path):
        log.append(("video", k, path.name, path.is_file()))

    with VideoWriter(threads, max_pending=4) as w:
        for k in range(n):
            w.write(tmp_path / "bg" / f"{k}.avi", _frames(k), 25, then=lambda p, k=k: step(k, p))
            if k % 3 == 1:
                w.call(lambda k=k: log.append(("call", k)))
        w.call(lambda: finished.append(len(log)))
    expected = []
    for k in range(n):
        expected.append(("video", k, f"{k}.avi", True))
        if k % 3 == 1:
            expected.append(("call", k))
    assert log == expected and finished == [len(expected)]
    for k in range(n):
        write_video(tmp_path / "inline" / f"{k}.avi", _frames(k), 25)
        assert (tmp_path / "bg" / f"{k}.avi").read_bytes() == (
            tmp_path / "inline" / f"{k}.avi"
        ).read_bytes()
    _wait_for(_no_writer_threads, "the workers to end")


def _disk_full_on(bad: int, calls: list):
    """A write_video that fills a temporary file and then fails like a full disk on call
    number ``bad`` (1-based), through the real atomic writer."""
    real = writer_mod.write_video

    def write(path, frames, fps):
        calls.append(Path(path).name)
        if len(calls) == bad:

            def partial(tmp):
                Path(tmp).write_bytes(b"RIFF partial")
                raise OSError(errno.ENOSPC, "No space left on device")

            atomic_write(path, partial)
        return real(path, frames, fps)

    return write


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_disk_full_surfaces_typed_names_the_file_and_stops(tmp_path, monkeypatch, threads):
    calls: list[str] = []
    monkeypatch.setattr(writer_mod, "write_video", _disk_full_on(2, calls))
    steps: list[str] = []
    w = VideoWriter(threads, max_pending=8)
    with pytest.raises(OSError) as info:
        with w:
            for k in range(6):
                w.write(tmp_path / f"v{k}.avi", _frames(k), 25, then=lambda p: steps.append(p.name))
    err = info.value
    assert err.errno == errno.ENOSPC and str(tmp_path / "v1.avi") in str(err)
    assert steps == ["v0.avi"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "v1.avi" not in left and not [n for n in left if n.startswith(".")]
    if threads <= 1:  # one worker: nothing after the failed job is even started
        assert calls == ["v0.avi", "v1.avi"] and left == ["v0.avi"]
    with pytest.raises(OSError) as again:
        w.write(tmp_path / "late.avi", _frames(0), 25)
    assert again.value is err and not (tmp_path / "late.avi").exists()
    _wait_for(_no_writer_threads, "the workers to end")


@pytest.mark.parametrize("threads", [1, 2])
def test_failed_job_gets_no_step_and_the_earliest_failure_wins(tmp_path, monkeypatch, threads):
    """A failed file's step never runs; with two workers the second job fails first (the first
    is slow), yet the error raised is the first job's: the first in submission order."""

    def write(path, frames, fps):
        if path.name == "a.avi":
            time.sleep(0.3 if threads > 1 else 0.0)
        raise RuntimeError(f"cannot write {path}")

    monkeypatch.setattr(writer_mod, "write_video", write)
    steps: list = []
    with pytest.raises(RuntimeError, match="a.avi"):
        with VideoWriter(threads, max_pending=8) as w:
            w.write(tmp_path / "a.avi", _frames(0), 25, then=steps.append)
            w.write(tmp_path / "b.avi", _frames(1), 25, then=steps.append)
    assert steps == []
    _wait_for(_no_writer_threads, "the workers to end")


@pytest.mark.parametrize("threads", [0, 1])
def test_error_that_does_not_name_the_file_gets_a_note(tmp_path, monkeypatch, threads):
    def write(path, frames, fps):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(writer_mod, "write_video", write)
    with pytest.raises(RuntimeError, match="encoder exploded") as info:
        with VideoWriter(threads) as w:
            w.write(tmp_path / "x.avi", _frames(0), 25)
    assert f"while writing {tmp_path / 'x.avi'}" in getattr(info.value, "__notes__", [])
    _wait_for(_no_writer_threads, "the workers to end")


def test_error_surfaces_at_the_next_submit(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(writer_mod, "write_video", _disk_full_on(1, calls))
    with pytest.raises(OSError, match="No space left"), VideoWriter(1) as w:
        w.write(tmp_path / "a.avi", _frames(0), 25)
        _wait_for(lambda: w.pending == 0, "the failure")
        w.write(tmp_path / "b.avi", _frames(1), 25)
        pytest.fail("the second write must raise the first one's error")
    assert calls == ["a.avi"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", [0, 1])
def test_bad_frames_raise_the_inline_error(tmp_path, threads):
    bad = torch.zeros(2, 7, 8, dtype=torch.uint8)  # odd height: no 4:2:0
    with pytest.raises(VideoEncodeError, match=r"v\.avi: H and W must be even"):
        with VideoWriter(threads) as w:
            w.write(tmp_path / "v.avi", bad, 25)
    assert list(tmp_path.iterdir()) == []


def test_failing_step_stops_later_steps(tmp_path):
    steps: list[int] = []

    def step(k, path):
        if k == 1:
            raise OSError(errno.EIO, "journal unwritable", str(tmp_path / "journal"))
        steps.append(k)

    with pytest.raises(OSError, match="journal unwritable") as info, VideoWriter(1) as w:
        for k in range(4):
            w.write(tmp_path / f"{k}.avi", _frames(k), 25, then=lambda p, k=k: step(k, p))
    assert steps == [0]
    assert any("1.avi" in note for note in info.value.__notes__)


def test_queue_is_bounded(tmp_path, monkeypatch):
    release = threading.Event()
    real = writer_mod.write_video

    def blocked(path, frames, fps):
        assert release.wait(WAIT_S)
        return real(path, frames, fps)

    monkeypatch.setattr(writer_mod, "write_video", blocked)
    submitted: list[int] = []
    w = VideoWriter(1, max_pending=2)

    def producer():
        for k in range(6):
            w.write(tmp_path / f"{k}.avi", _frames(k), 25)
            submitted.append(k)

    thread = threading.Thread(target=producer)
    thread.start()
    _wait_for(lambda: len(submitted) == 3, "1 job in the worker and 2 queued")
    time.sleep(0.2)
    assert len(submitted) == 3 and w.pending == 3  # the 4th waits for room
    release.set()
    thread.join(WAIT_S)
    w.close()
    assert submitted == list(range(6)) and len(list(tmp_path.glob("*.avi"))) == 6


def test_caller_exception_finishes_queued_jobs(tmp_path):
    steps: list[int] = []
    with pytest.raises(ZeroDivisionError), VideoWriter(1, max_pending=8) as w:
        for k in range(4):
            w.write(tmp_path / f"{k}.avi", _frames(k), 25, then=lambda p, k=k: steps.append(k))
        _ = 1 / 0
    assert steps == [0, 1, 2, 3]
    _wait_for(_no_writer_threads, "the workers to end")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupt_drops_the_queue_and_joins(tmp_path, monkeypatch, interrupt):
    started, release = threading.Event(), threading.Event()
    real = writer_mod.write_video

    def blocked(path, frames, fps):
        started.set()
        assert release.wait(WAIT_S)
        return real(path, frames, fps)

    monkeypatch.setattr(writer_mod, "write_video", blocked)
    steps: list[int] = []
    threading.Timer(0.3, release.set).start()
    with pytest.raises(interrupt), VideoWriter(1, max_pending=8) as w:
        for k in range(4):
            w.write(tmp_path / f"{k}.avi", _frames(k), 25, then=lambda p, k=k: steps.append(k))
        assert started.wait(WAIT_S)
        raise interrupt
    assert steps == [0]  # the file being written is finished and recorded, the queue dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.avi"]
    assert _no_writer_threads() and all(t.daemon for t in w._workers)


def test_caller_exception_keeps_a_note_of_the_writer_failure(tmp_path, monkeypatch):
    def write(path, frames, fps):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(writer_mod, "write_video", write)
    with pytest.raises(ZeroDivisionError) as info, VideoWriter(1) as w:
        w.write(tmp_path / "x.avi", _frames(0), 25)
        _wait_for(lambda: w.pending == 0, "the failure")
        _ = 1 / 0
    assert "the video writer failed too: RuntimeError: encoder exploded" in info.value.__notes__
    _wait_for(_no_writer_threads, "the workers to end")


@pytest.mark.parametrize("threads", [0, 1])
def test_writer_error_leaving_the_block_gets_no_note_about_itself(tmp_path, monkeypatch, threads):
    calls: list[str] = []
    monkeypatch.setattr(writer_mod, "write_video", _disk_full_on(1, calls))
    with pytest.raises(OSError) as info, VideoWriter(threads) as w:
        w.write(tmp_path / "a.avi", _frames(0), 25)
        w.flush()
    assert not any("failed too" in note for note in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("threads", [0, 1])
def test_interrupt_in_a_step_stops_the_writer(tmp_path, threads):
    def interrupt(path):
        raise KeyboardInterrupt

    w = VideoWriter(threads)
    with pytest.raises(KeyboardInterrupt) as first:
        w.write(tmp_path / "a.avi", _frames(0), 25, then=interrupt)
        w.flush()
    with pytest.raises(KeyboardInterrupt) as again:
        w.write(tmp_path / "b.avi", _frames(1), 25)
    assert again.value is first.value and not (tmp_path / "b.avi").exists()
    w.abort()
    _wait_for(_no_writer_threads, "the workers to end")


def test_written_frames_are_released_before_earlier_jobs_finish(tmp_path, monkeypatch):
    """With two workers, the second file is done while the first is still being written: the
    writer no longer holds the second job's frames while its step waits for its turn."""
    release = threading.Event()
    real = writer_mod.write_video

    def write(path, frames, fps):
        if path.name == "a.avi":
            assert release.wait(WAIT_S)
        return real(path, frames, fps)

    monkeypatch.setattr(writer_mod, "write_video", write)
    steps: list[str] = []
    w = VideoWriter(2)
    w.write(tmp_path / "a.avi", _frames(0), 25, then=lambda p: steps.append(p.name))
    frames = _frames(1)
    ref = weakref.ref(frames)
    w.write(tmp_path / "b.avi", frames, 25, then=lambda p: steps.append(p.name))
    del frames
    _wait_for(lambda: (tmp_path / "b.avi").is_file(), "the second file")
    _wait_for(lambda: ref() is None, "the second job's frames to be released")
    assert steps == []
    release.set()
    w.close()
    assert steps == ["a.avi", "b.avi"]


def test_default_writer_writes_on_a_background_thread(tmp_path):
    names: list[str] = []

    def step(path):
        names.append(threading.current_thread().name)

    with VideoWriter() as w:
        w.write(tmp_path / "a.avi", _frames(0), 25, then=step)
    assert names == ["echofast-writer-0"]
    assert (tmp_path / "a.avi").read_bytes() == write_video(
        tmp_path / "inline.avi", _frames(0), 25
    ).read_bytes()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="threads"):
        VideoWriter(-1)
    with pytest.raises(ValueError, match="max_pending"):
        VideoWriter(1, max_pending=0)
    for threads in (0, 1):
        w = VideoWriter(threads)
        w.close()
        with pytest.raises(RuntimeError, match="closed"):
            w.call(lambda: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_frames_are_staged_in_stream_order(tmp_path):
    """CUDA frames are copied to host on the caller's stream: overwriting them right after
    submitting (same stream) does not change the file, which equals inline writing's."""
    frames = [_frames(k).cuda() for k in range(4)]
    expected = []
    for k, f in enumerate(frames):
        expected.append(write_video(tmp_path / f"inline{k}.avi", f.cpu(), 25).read_bytes())
    with VideoWriter(1) as w:
        for k, f in enumerate(frames):
            w.write(tmp_path / f"bg{k}.avi", f, 25)
            f.fill_(0)
    assert [(tmp_path / f"bg{k}.avi").read_bytes() for k in range(4)] == expected
