"""``echofast.nn._packing``: which tensors count as packed (back to back in one storage, same
dtype and trailing shape) and when the concatenated weight and bias of a packed group exist."""

from __future__ import annotations

import torch

from echofast.nn._packing import adjacent, concat_view, pack_rows, packed_linear


def test_adjacent_needs_back_to_back_slices_of_one_dtype():
    buf = torch.arange(12.0).view(6, 2)
    assert adjacent([buf[:2], buf[2:3], buf[3:]])
    assert torch.equal(concat_view([buf[:2], buf[2:3], buf[3:]]), buf)
    assert not adjacent([buf[:2], buf[3:]])  # a row between them
    assert not adjacent([buf[2:4], buf[:2]])  # out of order
    assert not adjacent([buf[:2], buf[2:].view(torch.int32)])  # same bytes, another dtype
    assert not adjacent([buf[:2], torch.zeros(2, 2)])  # another storage
    assert not adjacent([]) and not adjacent(None)


def test_packed_linear_needs_the_biases_packed_too():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(rows, 3, generator=g) for rows in (2, 4)]
    bs = [torch.randn(rows, generator=g) for rows in (2, 4)]
    assert packed_linear(ws, bs) is None  # nothing packed yet
    pack_rows(ws)
    assert packed_linear(ws, bs) is None  # weights packed, biases apart
    w, b = packed_linear(ws, None)
    assert b is None and w.data_ptr() == ws[0].data_ptr()
    pack_rows(bs)
    w, b = packed_linear(ws, bs)
    assert torch.equal(w, torch.cat(ws)) and torch.equal(b, torch.cat(bs))
