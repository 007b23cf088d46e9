"""Fuzzing read_video: mutated copies of small clips give frames or VideoDecodeError, quickly.

Hundreds of mutations (bit flips, truncations, header-field overwrites, zeroed runs, JPEG
frame-size edits) of an MJPEG AVI and an H.264 MP4 are decoded in one child process, so that a
crash (in FFmpeg, PyAV or the extension) fails this test instead of killing pytest. Half of
them are read as gray uint8, half as resized RGB float16 (the packed and resize paths).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

FUZZ = """
import json, sys, time
from pathlib import Path

import numpy as np
import torch

from echofast.io import VideoDecodeError, read_video

MUTATIONS = {"bitflip": 110, "truncate": 50, "header": 70, "zero_run": 25, "sof": 25}
EXTREMES = [0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 20]
MARKERS = (0xC0, 0xC4, 0xDB)


def pick(rng, values):
    return int(values[int(rng.integers(0, len(values)))])


def mutate(data, kind, rng):
    data = bytearray(data)
    if kind == "bitflip":
        for pos in rng.integers(0, len(data), rng.integers(1, 9)):
            data[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == "truncate":
        del data[int(rng.integers(0, len(data))) :]
    elif kind == "header":
        pos = int(rng.integers(0, min(len(data), 600) - 4))
        value = pick(rng, EXTREMES) if rng.random() < 0.7 else int(rng.integers(0, 2**32))
        data[pos : pos + 4] = value.to_bytes(4, "little")
    elif kind == "zero_run":
        pos = int(rng.integers(0, len(data)))
        end = min(len(data), pos + int(rng.integers(1, 65)))
        data[pos:end] = bytes(end - pos)
    elif kind == "sof":
        # JPEG frame / Huffman / quantisation table headers: sizes, counts, lengths
        marks = [i for i in range(len(data) - 9) if data[i] == 0xFF and data[i + 1] in MARKERS]
        if marks:
            pos = pick(rng, marks) + int(rng.integers(2, 9))
            value = pick(rng, EXTREMES[:3]) if rng.random() < 0.5 else int(rng.integers(0, 65536))
            data[pos : pos + 2] = value.to_bytes(2, "big")
    return bytes(data)


out_dir = Path(sys.argv[1])
rng = np.random.default_rng(20240611)
summary = {"frames": 0, "errors": 0, "other": [], "slowest_s": 0.0, "cases": 0}
n = 0
for seed in map(Path, sys.argv[2:]):
    data = seed.read_bytes()
    for kind, count in MUTATIONS.items():
        if kind == "sof" and seed.suffix != ".avi":
            continue
        for _ in range(count):
            path = out_dir / f"m{n}{seed.suffix}"
            path.write_bytes(mutate(data, kind, rng))
            kwargs = {} if n % 2 else {"grayscale": False, "size": 16, "dtype": torch.float16}
            start = time.perf_counter()
            try:
                frames, fps = read_video(path, time_limit=20, **kwargs)
                assert len(frames) >= 1 and frames.dtype == kwargs.get("dtype", torch.uint8)
                summary["frames"] += 1
            except VideoDecodeError as err:
                assert str(path) in str(err)
                summary["errors"] += 1
            except Exception as err:  # anything else is a finding
                summary["other"].append(f"{kind} {path.name}: {type(err).__name__}: {err}")
            summary["slowest_s"] = max(summary["slowest_s"], time.perf_counter() - start)
            path.unlink()
            n += 1
summary["cases"] = n
print(json.dumps(summary))
"""


def test_mutated_clips_never_crash(tmp_path, codec_clips):
    seeds = [codec_clips["mjpeg420"], codec_clips["h264"]]
    work = tmp_path / "mutants"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FUZZ), str(work), *map(str, seeds)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"fuzz process died ({result.returncode}):\n{result.stderr}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["cases"] >= 500
    assert not summary["other"], summary["other"][:10]
    assert summary["frames"] > 50 and summary["errors"] > 50, summary
    assert summary["slowest_s"] < 10, summary
    assert list(work.iterdir()) == []
