"""Malformed weight pickles are reported as :class:`WeightsError` naming the file, whatever the
unpickler trips on (``load_numpy_pickle``'s documented contract)."""

from __future__ import annotations

import struct

import pytest

from echofast.errors import WeightsError
from echofast.eval.weights import load_numpy_pickle, read_weights_file

PROTO4 = b"\x80\x04"


@pytest.mark.parametrize(
    "data",
    [
        # FRAME whose 8-byte length exceeds sys.maxsize (OverflowError in the unpickler)
        PROTO4 + b"\x95" + struct.pack("<Q", 2**64 - 1) + b"N.",
        # BINBYTES8 / BINUNICODE8 announcing 2**62 bytes (MemoryError in the unpickler)
        PROTO4 + b"\x8e" + struct.pack("<Q", 2**62) + b"xx",
        PROTO4 + b"\x8d" + struct.pack("<Q", 2**62) + b"xx",
    ],
    ids=["frame-length", "binbytes8-length", "binunicode8-length"],
)
def test_corrupt_length_fields_are_weights_errors(tmp_path, data):
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=r"corrupt\.ckpt"):
        load_numpy_pickle(path)
    with pytest.raises(WeightsError, match=r"corrupt\.ckpt"):
        read_weights_file(path, allow_pickle=True)
