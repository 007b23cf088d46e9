"""The dependency-free loss-curve PNG: a valid file of the requested size with a curve on it."""

from __future__ import annotations

import math
import struct
import zlib

import pytest

from echofast.figures import loss_plot_png, write_loss_plot


def decode_png(data: bytes):
    """Minimal decoder for 8-bit RGB, non-interlaced PNGs: (width, height, rows, text chunks)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    stride = 3 * width
    assert len(raw) == height * (stride + 1)
    rows = []
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        assert line[0] == 0  # filter "None"
        rows.append(line[1:])
    text = dict(b.split(b"\x00", 1) for k, b in chunks if k == b"tEXt")
    return width, height, rows, {k.decode(): v.decode() for k, v in text.items()}


def _colors(rows):
    return {bytes(r[i : i + 3]) for r in rows for i in range(0, len(r), 3)}


@pytest.mark.parametrize("size", [(800, 480), (321, 123)])
def test_png_decodes_with_size_and_curve(tmp_path, size):
    steps = list(range(1, 301))
    losses = [2.0 * math.exp(-s / 60) + 0.05 * math.sin(s) + 0.1 for s in steps]
    path = write_loss_plot(tmp_path / "loss.png", steps, losses, *size)
    width, height, rows, text = decode_png(path.read_bytes())
    assert (width, height) == size
    colors = _colors(rows)
    assert bytes((25, 55, 190)) in colors  # the smoothed curve
    assert bytes((255, 255, 255)) in colors and bytes((0, 0, 0)) in colors  # labels
    assert "1..300" in text["Description"] and "log scale" in text["Description"]


def test_png_degenerate_inputs():
    for steps, losses in [
        ([], []),
        ([5], [1.0]),
        ([1, 2], [float("nan"), float("inf")]),
        ([1, 2, 3], [0.5, 0.5, 0.5]),
        ([1, 2, 3], [-1.0, 0.0, 2.0]),
    ]:
        width, height, rows, text = decode_png(loss_plot_png(steps, losses, 200, 100))
        assert (width, height) == (200, 100) and len(rows) == 100
