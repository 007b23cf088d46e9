"""Every Triton kernel compiles for sm_90 (H100/H200) with the installed Triton, on this machine
with no GPU (bench/triton_aot.py): a kernel that only the interpreter accepts (e.g. a plain
Python global read inside @triton.jit) fails here instead of in a GPU lease."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from support.triton_interp import require_triton

require_triton()

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "triton_aot.py"


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile, not a cache hit
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--csv", str(tmp_path / "aot.csv")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "aot.csv").open()))
    assert rows and all(r["status"] == "ok" for r in rows)
    assert all(int(r["registers"]) > 0 for r in rows)  # resource usage was read
    kernels = {r["kernel"].split(".")[0] for r in rows}
    assert kernels == {
        "group_norm",
        "attention",
        "window_step",
        "geglu",
        "geglu_linear",
        "feed_forward",
        "layer_norm",
        "bias_residual",
    }
    assert "kernels never launched" not in out.stdout
    # compiled with the JIT's alignment hints: the channels-last GroupNorm rows kernels over
    # whole contiguous rows (DENSE: CG a power of two and a multiple of 16) load 16 bytes per
    # thread
    dense = [
        r
        for r in rows
        if r["kernel"].endswith("_gn_fwd_rows_stats_kernel") and "DENSE=True" in r["variant"]
    ]
    assert dense and all("LDG.E.128" in r["global_loads"] for r in dense), dense


def test_the_named_tuning_case_compiles_the_tuners_candidates(tmp_path):
    """``--cases geglu_linear_tuning`` (not in the default run): the first candidates of
    bench/tune_geglu_linear.py, each with its own tiles, warps and stages."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    csv_path = tmp_path / "aot.csv"
    args = ["--quick", "--cases", "geglu_linear_tuning", "--csv", str(csv_path)]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["case"] for r in rows] == [
        "geglu_linear tuning m128n64k32w8s3",
        "geglu_linear tuning m64n32k32w4s2",
        "geglu_linear tuning m64n32k32w4s3",
        "geglu_linear tuning m64n32k32w4s4",
    ]
    assert all(r["status"] == "ok" and int(r["local_bytes"]) == 0 for r in rows)
    assert len({r["shared_bytes"] for r in rows}) == 4  # the stages reach the compiler


def test_compiling_in_several_processes_gives_the_same_rows_in_the_same_order(tmp_path):
    """``--jobs``: the variants shared out to spawned processes (each records the cases again)
    come back as one process's rows, targets outer, variants in launch order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    rows = {}
    for jobs in (1, 2):
        csv_path = tmp_path / f"aot{jobs}.csv"
        args = ["--quick", "--cases", "bias_residual", "--target", "cuda:90", "cuda:80"]
        args += ["--jobs", str(jobs), "--csv", str(csv_path)]
        out = subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
        rows[jobs] = [
            {k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(csv_path.open())
        ]
    assert len(rows[1]) >= 4 and rows[2] == rows[1]
    half = len(rows[1]) // 2
    assert {r["target"] for r in rows[1][:half]} == {"cuda:90"}
    assert [r["variant"] for r in rows[1][:half]] == [r["variant"] for r in rows[1][half:]]


def test_a_bad_jobs_count_is_refused():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--jobs", "0"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert out.returncode == 2 and "--jobs: must be a whole number >= 1, got '0'" in out.stderr


def test_a_kernel_that_only_the_interpreter_accepts_fails(tmp_path):
    """The check can fail: a module-level Python float read inside a kernel."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, triton, triton.language as tl\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "import triton_aot as aot\n"
        "SCALE = 0.5\n"
        "@triton.jit\n"
        "def _bad_kernel(x_ptr, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE)\n"
        "v = aot.Variant(_bad_kernel, {'x_ptr': '*fp32', 'BLOCK': 'constexpr'}, {'BLOCK': 64},"
        " {'num_warps': 4}, 'probe')\n"
        "row = aot.compile_variant(v, aot._target('cuda:90'))\n"
        "print(row['status'], row.get('error', ''))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("FAIL") and "SCALE" in out.stdout
