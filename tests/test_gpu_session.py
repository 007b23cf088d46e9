"""bench/gpu_session.sh, the one-call GPU session, run on CPU with GPU_SESSION_DRY_RUN=1: the
steps' commands are printed instead of run, so the control flow (detached worker, per-call time
budget, continuation in a second call, statuses, summary, what comes back in $OUT) is tested
here; the commands themselves are tested by their own tests (echofast bench, pytest -m gpu)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"
STEPS = re.search(r'^ALL_STEPS="([^"]+)"', SCRIPT.read_text(), re.M).group(1).split()


def _run(tmp_path, *args, script=SCRIPT, **env):
    full = {
        **os.environ,
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GPU_SESSION_STATE": str(tmp_path / "state"),
        "OUT": str(tmp_path / "out"),
        "GPU_SESSION_DRY_RUN": "1",
        "GPU_SESSION_POLL_S": "1",
        **env,
    }
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=full, timeout=120
    )


def _statuses(text):
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(\w+)\s+(ok|FAIL|TIMEOUT|not-run|skipped|pending)\s", text, re.M)
        if m.group(1) in STEPS
    }


def test_syntax_and_plan(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    out = _run(tmp_path, "--plan")
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^  (\w+)\s+\d+$", out.stdout, re.M)
    assert listed == STEPS
    # the most wanted results first: the build, the batch-1 benchmark (changes end to end), the
    # GPU tests, issue 9's ratios and batch 8, the steps not run since the first lease; the
    # code-path microbenchmarks (confirmed by the third lease) and the GEGLU re-tuning late
    assert STEPS[:5] == ["build", "bench_b1", "tests_gpu", "unet_compile", "bench_b8"]
    assert STEPS[-6:-3] == ["group_norm", "feed_forward", "geglu"]
    assert STEPS[-3:] == ["geglu_tune", "patch", "bench_compile"]
    assert re.search(r"\d+/\d+ tests collected", out.stdout)  # pytest -m gpu selects some


def test_one_call_runs_every_step_in_order(tmp_path):
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "DONE" in out.stdout
    assert _statuses(out.stdout) == dict.fromkeys(STEPS, "ok")
    commands = re.findall(r"^\+ (.*)$", out.stdout, re.M)
    bench = [c for c in commands if " bench " in f" {c} " and "--out" in c]
    assert "--batch-size 1 --no-compile" in bench[0]
    assert "--compile --no-pipeline --no-profile" in bench[1]
    assert "--batch-size 8" in bench[2]
    assert "--compile --compile-echofast" in bench[3]
    # the tuner writes the tree's table, then the package is installed again, before the
    # steps after it (patch, the compiled pipelines)
    (tune,) = [c for c in commands if "bench/tune_geglu_linear.py" in c]
    assert "--write-table kernels/geglu_linear_tuned.json" in tune
    (patch,) = [c for c in commands if "bench/bench_patch.py" in c]
    marks = (bench[2], tune, "installing the package again", patch, bench[3])
    order = [out.stdout.index(s) for s in marks]
    assert order == sorted(order)
    assert any("bench/memory_profile.py --batch-size 1 8" in c for c in commands)
    (conv,) = [c for c in commands if "bench/bench_temporal_conv.py" in c]
    assert "--csv bench/results/temporal_conv_" in conv
    for script in ("bench_group_norm.py", "bench_geglu.py"):  # no inductor compiles there
        (call,) = [c for c in commands if script in c]
        assert "--providers echofast_triton," in call and "torch_compile" not in call
    assert any("-m gpu --ignore=tests/triton tests" in c for c in commands)
    with tarfile.open(tmp_path / "out" / "gpu_session_results.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("logs/bench_b1.log") for n in names)
    assert "kernels/geglu_linear_tuned.json" in names  # to commit
    assert (tmp_path / "out" / "gpu_session_summary.txt").read_text().count(" ok ") == len(STEPS)


def test_a_second_call_runs_what_the_first_had_no_time_for(tmp_path):
    first = _run(tmp_path, GPU_SESSION_WAIT_S="30")  # under every step's minimum of 45 s
    assert first.returncode == 0, first.stderr
    assert "MORE" in first.stdout
    assert _statuses(first.stdout) == dict.fromkeys(STEPS, "not-run")
    second = _run(tmp_path, SKIP="tests_gpu,patch")
    assert "DONE" in second.stdout
    want = {**dict.fromkeys(STEPS, "ok"), "tests_gpu": "skipped", "patch": "skipped"}
    assert _statuses(second.stdout) == want
    third = _run(tmp_path)
    assert "every step has run on this machine" in third.stdout and "DONE" in third.stdout
    assert "+ nvidia-smi" not in third.stdout  # nothing ran again


@pytest.mark.parametrize("steps", ["bench_b1 nonsense", "tests_triton"])
def test_unknown_steps_are_refused(tmp_path, steps):
    out = _run(tmp_path, GPU_SESSION_STEPS=steps)
    assert out.returncode == 2 and "unknown step" in out.stderr
    assert not (tmp_path / "state").exists()


def test_benchmarks_compare_with_the_cards_committed_rows(tmp_path):
    """The card's committed echofast_bench CSV, copied when the machine's first worker starts,
    is the --compare baseline of every benchmark step (not the rows this session appends)."""
    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    script = repo / "bench" / "gpu_session.sh"
    script.write_text(SCRIPT.read_text())
    committed = repo / "bench" / "results" / "echofast_bench_cpu.csv"
    committed.write_text("card,path\nearlier,rows\n")
    out = _run(tmp_path, script=script, GPU_SESSION_STEPS="bench_b1 bench_b8")
    assert out.returncode == 0, out.stderr
    baseline = tmp_path / "state" / "baseline.csv"
    assert baseline.read_text() == committed.read_text()
    bench = [c for c in re.findall(r"^\+ (.*)$", out.stdout, re.M) if " bench " in f" {c} "]
    assert len(bench) == 2 and all(f"--compare {baseline} --threshold 10" in c for c in bench)


def test_build_fails_when_the_triton_backends_cannot_run(tmp_path):
    """A device whose torch pins a Triton older than the kernels are checked with would time the
    PyTorch fallbacks in every kernel benchmark: the build step's check (printed in a dry run)
    exits non-zero with the reason there, and zero with a recent Triton."""
    from echofast.ops._triton import triton_too_old

    out = _run(tmp_path, GPU_SESSION_STEPS="build")
    assert out.returncode == 0, out.stderr
    check = next(c for c in re.findall(r"^\+ (.*)$", out.stdout, re.M) if "triton_too_old" in c)
    program = check.split(" -c ", 1)[1]
    fake = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda d: '3.1.0' if d == 'triton' else real(d)\n"
    )
    old = subprocess.run([sys.executable, "-c", fake + program], capture_output=True, text=True)
    assert old.returncode == 1 and "triton 3.1.0 is older than 3.6" in old.stderr, old.stderr
    here = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert here.returncode == (1 if triton_too_old() else 0), here.stderr
