"""bench/tune_geglu_linear.py on the CPU: its candidates, call sites, checks, choice of winners
and the tuned table it writes (which the kernel's launcher then reads). The timing itself needs
a GPU (the GPU session's ``geglu_tune`` step)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from support.triton_interp import kernels_module

kernel = kernels_module("geglu_linear")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import tune_geglu_linear as tune  # noqa: E402


@pytest.mark.parametrize("k", [40, 128, 512])
def test_candidates_start_with_the_default_and_respect_the_limits(k):
    found = tune.candidates(k)
    assert found[0] == kernel.GPU_CONFIG
    keys = [tune.config_key(c) for c in found]
    assert len(set(keys)) == len(keys)
    for config in found:
        kernel.check_config(config, "candidate")
        bm, bn, bk, warps, stages, _ = tune.config_key(config)
        assert 2 * bm * bn // (32 * warps) <= 128
        assert stages * (bm + 2 * bn) * bk * 2 <= tune.SMEM_LIMIT
        assert bk <= max(32, k) or config == kernel.GPU_CONFIG
    assert max(key[2] for key in keys[1:]) == min(128, 1 << (max(32, k).bit_length() - 1))
    persistent = [c for c in found if "PROGRAMS_PER_SM" in c]
    assert {c["PROGRAMS_PER_SM"] for c in persistent} == {1, 2}
    assert len({tune.config_key(c)[:3] for c in persistent}) == len(persistent) // 2
    if k >= 128:
        assert (len(found), len(persistent)) == (115, 24)
        assert tune.config_name(persistent[-1]) == "m128n64k128w8s3p2"


def test_lvdm_sites_are_every_geglu_projection_of_a_call():
    """On a small LVDM on the CPU: K is the block's width, N four times it, M the tokens of
    ``windows`` windows at that level; the counts add up to the model's GEGLU modules."""
    from support.configs import LVDM_SMALL_CONFIG

    from echofast.models import LVDM
    from echofast.nn.spatiotemporal import GEGLU

    frames, size, windows = 8, 8, 3
    site_args = {"device": "cpu", "config": LVDM_SMALL_CONFIG, "frames": frames, "size": size}
    sites = tune.lvdm_sites(windows, **site_args)
    model = LVDM.from_config(LVDM_SMALL_CONFIG)
    assert sum(sites.values()) == sum(isinstance(m, GEGLU) for m in model.modules())
    widths = LVDM_SMALL_CONFIG["block_out_channels"]
    for m, k, n in sites:
        assert k in widths and n == 4 * k
        level = int(math.log(windows * frames * size * size // m, 4))
        assert m == windows * frames * (size >> level) ** 2


def test_measure_rejects_a_failing_or_wrong_candidate_before_timing():
    x, w, b = torch.randn(33, 16), torch.randn(40, 16), torch.randn(40)
    ref = tune.reference(x, w, b)

    def broken(*args, config):
        raise RuntimeError("out of resources: shared memory\nmore")

    def wrong(x, w, b, config):
        return tune.reference(x, w, b) * 1.01

    result = tune.measure(broken, kernel.GPU_CONFIG, (x, w, b), ref, 0.0)
    assert result == {"status": "error: RuntimeError: out of resources: shared memory"}
    result = tune.measure(wrong, kernel.GPU_CONFIG, (x, w, b), ref, 1e-4)
    assert result["status"] == "wrong" and result["err"] == pytest.approx(0.01, rel=1e-3)
    assert tune.accepted(1e-3, 5e-4, torch.float16) and not tune.accepted(2e-3, 5e-4, torch.float16)


def _row(windows, m, config, us, *, default=False, status="ok", k=128, n=512):
    return {
        "card": "Test GPU",
        "dtype": "float16",
        "windows": windows,
        "m": m,
        "k": k,
        "n": n,
        "count": 15,
        "config": tune.config_name(config),
        "config_dict": config,
        "is_default": default,
        "status": status,
        "median_us": us,
        "tflops": 2 * m * k * 2 * n / (us * 1e-6) / 1e12,
        "triton": "3.6.0",
        "git": "abc",
    }


FAST = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
FASTER = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}


def test_winners_replace_the_measured_sites_entries_and_keep_the_others(tmp_path):
    d = kernel.GPU_CONFIG
    rows = [
        _row(5, 81920, d, 100.0, default=True),
        _row(5, 81920, FAST, 80.0),
        _row(5, 81920, FASTER, 70.0, status="wrong"),  # faster but wrong: never chosen
        _row(40, 655360, d, 800.0, default=True),
        _row(40, 655360, FAST, 790.0),  # 1.3 % faster: below --min-gain
    ]
    table = tmp_path / "tuned.json"
    stale = {"arch": "sm_90", "dtype": "float16", "k": 128, "n": 512, "m": 655360, "config": FAST}
    other = {**stale, "arch": "sm_80", "config": FASTER}
    table.write_text(json.dumps({"format": 1, "note": "kept", "entries": [stale, other]}))

    entries, measured = tune.table_entries(rows, "sm_90", min_gain=0.03)
    assert [(e["m"], e["config"]) for e in entries] == [(81920, FAST)]
    assert entries[0]["median_us"] == 80.0 and entries[0]["default_us"] == 100.0
    assert measured == {
        ("sm_90", "float16", 128, 512, 81920),
        ("sm_90", "float16", 128, 512, 655360),
    }
    tune.write_table(table, entries, measured)

    loaded = kernel.read_tuned_table(table)
    assert json.loads(table.read_text())["note"] == "kept"
    assert sorted((e["arch"], e["m"]) for e in loaded) == [("sm_80", 655360), ("sm_90", 81920)]
    assert not list(tmp_path.glob("*.tmp"))
    # the launcher's choice: the nearest M in log scale, per architecture
    pick = lambda arch, m: kernel.tuned_config(loaded, arch, torch.float16, m, 128, 512)  # noqa: E731
    assert pick("sm_90", 81920) == FAST and pick("sm_90", 10**6) == FAST
    assert pick("sm_80", 1000) == FASTER
    assert pick("sm_89", 81920) is None
    assert kernel.tuned_config(loaded, "sm_90", torch.bfloat16, 81920, 128, 512) is None

    lines = tune.report(rows)
    assert any("81920" in ln and "1.25x" in ln and tune.config_name(FAST) in ln for ln in lines)
    assert lines[-1].startswith("per LVDM call at 40 windows: 12.000 ms with the default tiles")


def test_the_tuner_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.main(["--budget-s", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_loop_checks_every_candidate_against_the_default_and_keeps_to_its_budget(monkeypatch):
    """tune() with the GPU parts replaced: every candidate at every site, in order, each checked
    against the default's error at that shape; the budget stops it between candidates."""
    import argparse
    from collections import Counter

    calls = []

    def fake_measure(fwd, config, inputs, ref, bar, rep=20):
        calls.append((tune.config_name(config), inputs[0].shape[0], bar))
        err = 1e-4 * inputs[0].shape[0] if bar is None else 1e-6
        return {"status": "ok", "err": err, "median_us": 100.0 - len(calls), "tflops": 1.0}

    monkeypatch.setattr(tune, "measure", fake_measure)
    monkeypatch.setattr(
        tune,
        "_inputs",
        lambda m, k, n, dtype, seed: (torch.zeros(m, k), torch.zeros(2 * n, k), None),
    )
    monkeypatch.setattr(tune, "reference", lambda x, w, b: None)
    sites = {1: Counter({(4, 128, 512): 3, (2, 256, 1024): 1}), 8: Counter({(32, 128, 512): 3})}
    args = argparse.Namespace(dtype="float16", budget_s=3600.0, compile_workers=1)
    rows = tune.tune(args, sites, "Test GPU", {"torch": "t", "triton": "3.6.0", "git": "g"})

    n = len(tune.candidates(128))
    assert len(rows) == len(calls) == 3 * n
    names = [tune.config_name(c) for c in tune.candidates(128)]
    assert [c[0] for c in calls[::3]] == names
    assert all(r["is_default"] == (r["config"] == names[0]) for r in rows)
    # the default sets the bar at each shape; every later candidate is checked against it
    assert {(m, bar) for _, m, bar in calls[:3]} == {(4, None), (2, None), (32, None)}
    assert {(m, bar) for _, m, bar in calls[3:]} == {(4, 4e-4), (2, 2e-4), (32, 32e-4)}
    assert {r["windows"] for r in rows} == {1, 8} and rows[0]["card"] == "Test GPU"

    calls.clear()
    args.budget_s = -1.0  # spent before the first candidate
    assert tune.tune(args, sites, "Test GPU", {}) == [] and calls == []


def test_compiling_ahead_runs_in_spawned_workers(monkeypatch):
    """The worker pool's plumbing (spawned processes import the script and launch each
    configuration): on the CPU under the Triton interpreter, where nothing is compiled."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned workers
    configs = tune.candidates(128)[:3]
    broken = {**configs[0], "BLOCK_N": 48}  # tl.arange needs a power of two
    failed = tune.precompile([*configs, broken], "float16", [(32, 16)], workers=2, device="cpu")
    assert failed == [f"{tune.config_name(broken)} K=32: InterpreterError"]
