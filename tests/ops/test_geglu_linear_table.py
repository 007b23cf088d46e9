"""The GEGLU GEMM's tuned tile table (``kernels/geglu_linear_tuned.json``): the shipped table
loads, a broken one fails loudly naming the file and the entry, and a launch picks the entry for
its architecture, dtype, K and N whose M is nearest (the GPU run of every shipped entry against
fp64 is in test_geglu_cuda.py)."""

from __future__ import annotations

import json

import pytest
import torch
from support.triton_interp import kernels_module

kernel = kernels_module("geglu_linear")

GOOD = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


BASE = {"arch": "sm_90", "dtype": "float16", "k": 256, "n": 1024, "m": 20480}


def write(tmp_path, entries, **top):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "entries": entries, **top}))
    return path


def test_the_shipped_table_loads_and_is_installed_next_to_the_kernel():
    assert kernel.TUNED_TABLE.is_file(), kernel.TUNED_TABLE
    for e in kernel.read_tuned_table(kernel.TUNED_TABLE):
        assert e["arch"].startswith("sm_") and e["dtype"] in ("float16", "bfloat16")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 0}, r"entries\[1\]: k = 0 is not a positive integer"),
        ({"arch": 90}, r"entries\[1\]: arch = 90 is not a string"),
        ({"m": True}, r"m = True is not a positive integer"),
        ({"config": {**GOOD, "BLOCK_N": 96}}, "BLOCK_N = 96 is not a power of two"),
        ({"config": {**GOOD, "BLOCK_K": 8}}, "BLOCK_K = 8 is below 16"),
        ({"config": {**GOOD, "num_stages": 0}}, "num_stages = 0 is not a positive integer"),
        ({"config": {**GOOD, "warps": 4}}, r"unknown keys \['warps'\]"),
        ({"config": {"BLOCK_M": 64}}, "missing"),
        ({"config": [64]}, "must be an object"),
    ],
)
def test_a_broken_entry_names_the_file_and_the_entry(tmp_path, change, message):
    path = write(tmp_path, [{**BASE, "config": GOOD}, {**BASE, "config": GOOD, **change}])
    with pytest.raises(ValueError, match=message) as info:
        kernel.read_tuned_table(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not a readable JSON tile table"),
        ('{"format": 2, "entries": []}', "expected"),
        ('{"format": 1}', "expected"),
        ('[{"format": 1}]', "expected"),
    ],
)
def test_a_broken_table_fails_loudly(tmp_path, text, message):
    path = tmp_path / "table.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        kernel.read_tuned_table(path)
    assert str(path) in str(info.value)


def test_the_nearest_m_in_log_scale_is_chosen(tmp_path):
    other = {**GOOD, "BLOCK_M": 128, "num_warps": 8}
    path = write(
        tmp_path,
        [{**BASE, "m": 20480, "config": GOOD}, {**BASE, "m": 163840, "config": other}],
    )
    entries = kernel.read_tuned_table(path)

    def pick(m, **key):
        where = {"arch": "sm_90", "dtype": torch.float16, "k": 256, "n": 1024, **key}
        return kernel.tuned_config(entries, m=m, **where)

    assert pick(20480) == GOOD and pick(1) == GOOD and pick(57000) == GOOD
    assert pick(58000) == other and pick(10**7) == other  # sqrt(20480 * 163840) = 57926
    assert pick(20480, n=512) is None and pick(20480, k=128) is None
    assert pick(20480, arch="sm_80") is None and pick(20480, dtype=torch.bfloat16) is None
