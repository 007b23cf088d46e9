"""Ordered background video writing: the generator hands over a video and goes on computing.

:class:`VideoWriter` takes jobs — "write these frames to this file, then run this bookkeeping
step" (:meth:`VideoWriter.write`) or a bookkeeping step alone (:meth:`VideoWriter.call`) — and
runs them on ``threads`` worker threads (0: inline, in the caller's thread). Guarantees:

* **Order.** Bookkeeping steps run one at a time, in submission order, each only after its own
  file (written atomically by :func:`~echofast.io.video.write_video`) is in place and after
  every earlier job's step. A journal appended from these steps therefore grows exactly as with
  inline writing, and a crash at any point leaves a prefix of it.
* **Bounded memory.** At most ``max_pending`` jobs wait in the queue (plus one per worker being
  written); :meth:`~VideoWriter.write` blocks while the queue is full. CUDA frames are copied
  to pinned host memory asynchronously on the current stream (the worker waits for that copy),
  so the caller never waits for the GPU or for the disk.
* **Errors.** The first failing job (in submission order) stops the writer: its exception —
  the very object, so the same type as inline writing raises — is raised in the caller's thread
  at the next :meth:`~VideoWriter.write` / :meth:`~VideoWriter.call` / :meth:`~VideoWriter.flush`
  / :meth:`~VideoWriter.close`; queued jobs are dropped and no later bookkeeping step runs. An
  ``OSError`` without a file name gets the video's path as its ``filename`` (so its message
  names the file); other exceptions that do not mention the path get a note naming it. The
  failed file leaves nothing behind (atomic write); with ``threads > 1`` a later job that was
  already being encoded may still leave its complete file, without bookkeeping (a resumed job
  rewrites it).
* **Shutdown.** Workers are daemon threads and are joined by :meth:`~VideoWriter.close` or on
  leaving the ``with`` block. Leaving it with an ``Exception`` first finishes the queued jobs
  (their results are valid); with a ``KeyboardInterrupt`` / ``SystemExit`` the queue is dropped
  and only the files being written are finished.

The speed-up comes from FFmpeg and the pixel extension releasing the GIL while they encode.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ..errors import add_note
from .video import write_video

__all__ = ["VideoWriter"]


@dataclass
class _Job:
    seq: int
    path: Path | None
    frames: Any = None
    fps: float | Fraction = 0.0
    ready: Any = None
    """A CUDA event recorded after the copy into ``frames`` (pinned host memory), or None."""
    then: Callable[..., None] | None = None


def _name_file(err: BaseException, path: Path) -> None:
    """Make ``err``'s message (or its notes) name ``path`` without changing its type."""
    if isinstance(err, OSError) and err.errno is not None and err.filename is None:
        err.filename = str(path)
    elif str(path) not in str(err):
        add_note(err, f"while writing {path}")


def _run_write(job: _Job) -> Path:
    if job.ready is not None:
        job.ready.synchronize()
    try:
        return write_video(job.path, job.frames, job.fps)
    except Exception as err:
        _name_file(err, job.path)
        raise


def _run_then(job: _Job, path: Path | None) -> None:
    if job.then is None:
        return
    try:
        if job.path is None:
            job.then()
        else:
            job.then(path)
    except Exception as err:
        if job.path is not None and str(job.path) not in str(err):
            add_note(err, f"in the bookkeeping after writing {job.path}")
        raise


def _to_host(frames: Any) -> tuple[Any, Any]:
    """CUDA tensors → pinned host copy (asynchronous, on the current stream) and its event."""
    if not isinstance(frames, torch.Tensor) or frames.device.type != "cuda":
        return frames, None
    host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
    host.copy_(frames, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class VideoWriter:
    """Writes videos in submission order on background threads (see the module docstring).

    Args:
        threads: worker threads; 0 writes inline in the caller's thread (same results, no
            overlap).
        max_pending: jobs that may wait in the queue before :meth:`write` blocks (>= 1).
        name: prefix of the worker threads' names.
    """

    def __init__(self, threads: int = 1, max_pending: int = 8, *, name: str = "echofast-writer"):
        if not isinstance(threads, int) or threads < 0:
            raise ValueError(f"writer threads must be an int >= 0, got {threads!r}")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.threads = threads
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._next_seq = 0
        self._next_commit = 0
        self._error: BaseException | None = None
        self._error_seq: int | None = None
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{k}", daemon=True)
            for k in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    # ---- caller side -------------------------------------------------------------------

    def write(
        self,
        path: str | Path,
        frames: torch.Tensor,
        fps: float | Fraction,
        then: Callable[[Path], None] | None = None,
    ) -> None:
        """Queue :func:`~echofast.io.video.write_video` ``(path, frames, fps)``, then
        ``then(path)`` once the file is in place (in submission order). ``frames`` must not be
        modified afterwards (CPU frames are not copied). Raises an earlier job's error."""
        path = Path(path)
        if self.threads == 0:
            self._inline(_Job(-1, path, frames, fps, None, then))
            return
        host, ready = _to_host(frames)
        self._put(path, host, fps, ready, then)

    def call(self, step: Callable[[], None]) -> None:
        """Queue ``step()`` to run after every earlier job (in submission order)."""
        if self.threads == 0:
            self._inline(_Job(-1, None, then=step))
            return
        self._put(None, None, 0.0, None, step)

    def flush(self) -> None:
        """Wait until every queued job is done; raise the first failure."""
        with self._cond:
            while self._next_commit < self._next_seq:
                self._cond.wait()
        self._raise()

    def close(self) -> None:
        """:meth:`flush`, then stop and join the workers (also when flushing raised)."""
        try:
            self.flush()
        finally:
            self._shutdown(drop=False)

    def abort(self) -> None:
        """Drop the queued jobs, let the files being written finish, join the workers."""
        self._shutdown(drop=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        if not isinstance(exc, Exception):
            self.abort()
            return
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - the caller's exception goes on; keep this one
            if err is not exc:
                add_note(exc, f"the video writer failed too: {type(err).__name__}: {err}")

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished (queued or being written)."""
        with self._cond:
            return self._next_seq - self._next_commit

    def _inline(self, job: _Job) -> None:
        self._raise()
        if self._closed:
            raise RuntimeError("the video writer is closed")
        try:
            path = _run_write(job) if job.path is not None else None
            _run_then(job, path)
        except BaseException as err:
            self._error = err
            raise

    def _put(self, path: Path | None, frames: Any, fps: Any, ready: Any, then: Any) -> None:
        with self._cond:
            while len(self._queue) >= self.max_pending and self._error is None:
                if self._closed:
                    break
                self._cond.wait()
            if self._closed and self._error is None:
                raise RuntimeError("the video writer is closed")
            if self._error is None:
                self._queue.append(_Job(self._next_seq, path, frames, fps, ready, then))
                self._next_seq += 1
                self._cond.notify_all()
                return
        self._raise()

    def _raise(self) -> None:
        with self._cond:
            err = self._error
        if err is not None:
            raise err

    def _shutdown(self, drop: bool) -> None:
        with self._cond:
            if drop:
                self._drop_queue()
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()

    # ---- worker side (under self._cond unless said otherwise) --------------------------

    def _drop_queue(self) -> None:
        if self._queue:
            self._next_seq = self._queue[0].seq
            self._queue.clear()
            self._cond.notify_all()

    def _fail(self, seq: int, err: BaseException) -> None:
        if self._error_seq is None or seq < self._error_seq:
            self._error, self._error_seq = err, seq
            self._drop_queue()

    def _stopped_at(self, seq: int) -> bool:
        return self._error_seq is not None and self._error_seq <= seq

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._cond.notify_all()
                skip = self._stopped_at(job.seq)
            path = None
            if not skip and job.path is not None:
                try:
                    path = _run_write(job)
                except BaseException as err:  # noqa: BLE001 - handed to the caller
                    with self._cond:
                        self._fail(job.seq, err)
            job.frames = job.ready = None
            with self._cond:
                while self._next_commit != job.seq:
                    self._cond.wait()
                commit = not self._stopped_at(job.seq)
            try:
                if commit:
                    _run_then(job, path)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                with self._cond:
                    self._fail(job.seq, err)
            finally:
                with self._cond:
                    self._next_commit += 1
                    self._cond.notify_all()
