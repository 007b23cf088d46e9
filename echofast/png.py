"""A small dependency-free PNG encoder (8-bit grayscale or RGB), for figures and frame strips."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .fsutil import atomic_write


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def encode_png(pixels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes of ``pixels``: uint8 (H, W) grayscale or (H, W, 3) RGB; ``text`` → tEXt chunks."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or not (
        pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)
    ):
        raise ValueError(
            f"pixels must be uint8 (H, W) or (H, W, 3), got {pixels.dtype} {pixels.shape}"
        )
    if min(pixels.shape[:2]) < 1:
        raise ValueError(f"pixels must be non-empty, got shape {pixels.shape}")
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    rows = np.ascontiguousarray(pixels).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    parts = [
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)),
    ]
    for key, value in (text or {}).items():
        parts.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1")))
    parts += [_chunk(b"IDAT", zlib.compress(raw, 9)), _chunk(b"IEND", b"")]
    return b"".join(parts)


def write_png(
    path: str | os.PathLike, pixels: np.ndarray, text: dict[str, str] | None = None
) -> Path:
    """Write ``pixels`` as a PNG file atomically (see :func:`encode_png`)."""
    data = encode_png(pixels, text)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
