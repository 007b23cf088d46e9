"""echofast.png writes PNGs that a decoder following the PNG specification (chunk CRCs, IHDR,
zlib-compressed scanlines with their filter byte) reads back to the same pixels and text."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from echofast.png import encode_png, write_png


def _read_png(data: bytes):
    """(pixels, text, chunk names) of an 8-bit, non-interlaced, unfiltered PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, rest = [], memoryview(data)[8:]
    while len(rest):
        length, kind = struct.unpack(">I4s", rest[:8])
        body = bytes(rest[8 : 8 + length])
        assert struct.unpack(">I", rest[8 + length : 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        rest = rest[12 + length :]
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and chunks[-1][1] == b""
    w, h, depth, colour, *methods = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and methods == [0, 0, 0] and colour in (0, 2)
    channels = 1 if colour == 0 else 3
    raw = np.frombuffer(zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT")), np.uint8)
    lines = raw.reshape(h, 1 + w * channels)
    assert not lines[:, 0].any()  # filter type 0 on every scanline
    pixels = lines[:, 1:].reshape((h, w) if colour == 0 else (h, w, 3))
    text = dict(b.decode("latin-1").split("\x00", 1) for k, b in chunks if k == b"tEXt")
    return pixels, text, kinds


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 17), (1, 9, 3), (7, 2, 3), (31, 12, 3)])
def test_pixels_round_trip(shape):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    got, text, kinds = _read_png(encode_png(pixels))
    np.testing.assert_array_equal(got, pixels)
    assert text == {} and kinds == [b"IHDR", b"IDAT", b"IEND"]


def test_a_strided_view_is_written_as_it_looks():
    base = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    view = base.transpose(1, 0, 2)[::2]
    np.testing.assert_array_equal(_read_png(encode_png(view))[0], view)


def test_text_chunks_are_latin1_key_nul_value(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    text = {"Title": "EF 55 %", "Description": "Bland-Altman, µ = 1.5 ± 0.2"}
    path = write_png(tmp_path / "sub" / "fig.png", pixels, text)
    got, read_text, kinds = _read_png(path.read_bytes())
    np.testing.assert_array_equal(got, pixels)
    assert read_text == text and kinds.count(b"tEXt") == 2


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4), np.uint16),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 1), np.uint8),
        np.zeros(4, np.uint8),
        np.zeros((0, 4), np.uint8),
        np.zeros((4, 0, 3), np.uint8),
    ],
    ids=["float32", "uint16", "rgba", "one-channel", "1-d", "no-rows", "no-columns"],
)
def test_other_pixels_are_refused(pixels):
    with pytest.raises(ValueError, match="pixels must be"):
        encode_png(pixels)


def test_write_png_leaves_no_file_when_refused(tmp_path):
    with pytest.raises(ValueError):
        write_png(tmp_path / "x.png", np.zeros((2, 2), np.int64))
    assert list(tmp_path.iterdir()) == []
