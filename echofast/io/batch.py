"""Many videos at once: :func:`read_videos` decodes files on a thread pool, in input order.

FFmpeg's decoders and the extension release the GIL, so threads decode files in parallel; each
file is decoded and converted on one thread (``threads=1``) so that workers do not oversubscribe
the CPU.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .video import VideoDecodeError, read_video

__all__ = ["VideoResult", "read_videos"]


@dataclass
class VideoResult:
    """One file's outcome: ``frames`` and ``fps`` as :func:`~echofast.io.read_video` returns
    them, or ``error`` (then ``frames`` and ``fps`` are None)."""

    path: Path
    frames: torch.Tensor | None
    fps: float | None
    error: VideoDecodeError | None = None


def _read_one(path: Path, kwargs: dict[str, Any]) -> VideoResult:
    try:
        frames, fps = read_video(path, **kwargs)
    except VideoDecodeError as err:
        return VideoResult(path, None, None, err)
    return VideoResult(path, frames, fps)


def read_videos(
    paths: Iterable[str | os.PathLike],
    *,
    workers: int | None = None,
    errors: str = "raise",
    progress: bool = True,
    desc: str = "read videos",
    **read_kwargs: Any,
) -> Iterator[VideoResult]:
    """Decode ``paths`` with ``workers`` threads, yielding one :class:`VideoResult` per path in
    input order; at most ``2 * workers`` decoded videos wait in memory.

    Args:
        workers: threads (default: the CPUs this process may use, at most 8).
        errors: ``"raise"`` re-raises the first :class:`VideoDecodeError` (in input order) after
            cancelling the files not started; ``"return"`` yields it in the result instead.
        progress: show a tqdm progress bar (files).
        read_kwargs: passed to :func:`~echofast.io.read_video` (``threads`` defaults to 1).
    """
    from tqdm.auto import tqdm

    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    if workers is None:
        try:
            workers = min(8, len(os.sched_getaffinity(0)))
        except AttributeError:
            workers = min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    read_kwargs.setdefault("threads", 1)
    paths = [Path(p) for p in paths]
    pending: deque[Future[VideoResult]] = deque()
    bar = tqdm(total=len(paths), unit="video", desc=desc, disable=not progress)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="echofast-read")
    try:
        todo = iter(paths)
        for path in todo:
            pending.append(executor.submit(_read_one, path, read_kwargs))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(executor.submit(_read_one, nxt, read_kwargs))
            bar.update(1)
            if result.error is not None and errors == "raise":
                raise result.error
            yield result
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
