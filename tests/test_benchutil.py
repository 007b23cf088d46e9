"""bench/benchutil.py: CSV rows appended without losing or misaligning earlier rows, and the
code's version for rows written from a copy of the tree without .git."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import benchutil  # noqa: E402
import pytest  # noqa: E402


def test_append_csv_merges_new_columns(tmp_path):
    path = tmp_path / "sub" / "rows.csv"
    benchutil.append_csv(path, [{"a": 1, "b": 2}])
    benchutil.append_csv(path, [{"a": 3, "c": 4}, {"c": 5, "b": 6}])
    benchutil.append_csv(path, [{"b": 7, "a": 8}])
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["a", "b", "c"]
    assert [tuple(r.values()) for r in rows] == [
        ("1", "2", ""),
        ("3", "", "4"),
        ("", "6", "5"),
        ("8", "7", ""),
    ]
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_git_sha_from_the_environment(monkeypatch):
    monkeypatch.setenv("ECHOFAST_GIT_SHA", "abc1234")
    assert benchutil.git_sha() == "abc1234"
    monkeypatch.delenv("ECHOFAST_GIT_SHA")
    assert benchutil.git_sha()  # git describe here, or "unknown"


def test_choice_list_parses_a_subset_and_names_the_unknown():
    import argparse

    parse = benchutil.choice_list(("eager", "triton", "compile"))
    assert parse("triton, eager") == ["triton", "eager"]
    with pytest.raises(argparse.ArgumentTypeError, match="'cuda'.*eager,triton,compile"):
        parse("eager,cuda")
    with pytest.raises(argparse.ArgumentTypeError, match="empty"):
        parse(" , ")


@pytest.mark.parametrize("fused", [False, True], ids=["cpu_chunks", "fused_like_cuda"])
def test_the_scripts_record_every_norm_and_geglu_call_of_the_lvdm(monkeypatch, fused):
    """Each script's call-site recorder on a small LVDM on the CPU: every LayerNorm (module call
    or the residual-fused ``add_forward``), GroupNorm and GEGLU of the model runs once per call,
    so the recorded calls add up to the model's modules of that type (a recorder whose wrapper
    lost a keyword of the model's calls fails here, not on the GPU). The exception: the
    cross-attention norms (``norm2``), which never run with a one-token context (the attention's
    output does not depend on its queries). ``fused``: the blocks' GPU path (the residual adds
    fused into the next LayerNorm) instead of the CPU's chunked one."""
    import bench_geglu
    import bench_group_norm
    import bench_layer_norm
    import torch
    from support.configs import LVDM_SMALL_CONFIG

    from echofast.models import LVDM
    from echofast.nn import GroupNorm, LayerNorm
    from echofast.nn.spatiotemporal import GEGLU

    if fused:
        monkeypatch.setattr("echofast.nn.spatiotemporal.CPU_CHUNK_BYTES", 0)
    torch.manual_seed(0)
    model = LVDM.from_config(LVDM_SMALL_CONFIG)
    site_args = {"device": "cpu", "config": LVDM_SMALL_CONFIG, "frames": 8, "size": 8}
    for script, module_type in (
        (bench_layer_norm, LayerNorm),
        (bench_group_norm, GroupNorm),
        (bench_geglu, GEGLU),
    ):
        sites = script.lvdm_call_sites(2, **site_args)
        instances = sum(
            isinstance(m, module_type) and not (module_type is LayerNorm and n.endswith(".norm2"))
            for n, m in model.named_modules()
        )
        assert instances and sum(sites.values()) == instances, (script.__name__, sites)
