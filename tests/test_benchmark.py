"""``echofast bench`` (echofast.benchmark): the CPU smoke run of every code path, the reference-way
baseline against echofast's pipelines, and the measurement helpers against independent oracles.

No timing is asserted (speed is reported by the benchmark, never tested): the tests check that
the rows exist and are consistent with each other, that ``--compare`` flags what is slower, and
that the baseline computes what the reference computes.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echofast import benchmark as bench
from echofast import benchmark_measure as measure
from echofast import benchmark_reference as reference
from echofast import benchmark_rows as bench_rows
from echofast.errors import EchofastError
from echofast.pipelines import LIDMPipeline, LVDMPipeline

pytest.importorskip("diffusers", reason="the baselines are diffusers' modules")

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_smoke_run_rows_ratios_and_compare(tmp_path, capsys):
    """One smoke run (CPU: tiny models, 12 frames = 2 windows, 2 steps) with --graphs,
    --compile (eager backend) and --compare against a planted earlier CSV whose echofast total
    was impossibly fast."""
    out, old = tmp_path / "bench.csv", tmp_path / "old.csv"
    card = measure.card_name(torch.device("cpu"))
    planted = [
        {
            "card": card,
            "config": "smoke",
            "dtype": "float32",
            "frames": 12,
            "steps": 2,
            "batch": 2,
            "path": path,
            "phase": "total" if path.startswith("pipeline") else "call",
            "median_s": 1e-9,
        }
        for path in ("pipeline/echofast", "unet/echofast", "unet/diffusers")
    ]
    planted.append({**planted[1], "path": "gemm/fp32-512-cpu", "batch": ""})
    bench_rows.append_csv(old, planted)
    argv = ["--smoke", "--device", "cpu", "--batch-size", "2", "--graphs", "--no-progress"]
    argv += ["--compile", "--compile-echofast", "--compile-backend", "eager"]  # no codegen
    argv += ["--out", str(out)]
    status = bench.main_bench([*argv, "--compare", str(old), "--threshold", "50"])
    text = capsys.readouterr().out
    assert status == 1, text  # two planted rows are "regressions"
    assert "smoke configuration" in text and "2 regression(s)" in text
    assert text.count("REGRESSION") == 2
    assert "baseline   b=2 unet/diffusers call" in text  # slower, but not echofast's code
    assert "CUDA graphs need CUDA" in text and "s/video" in text

    rows = _read(out)
    assert {r["card"] for r in rows} == {card} and {r["config"] for r in rows} == {"smoke"}
    by = {(r["path"], r["phase"]): r for r in rows}
    for phase in ("total", "end_to_end", "lidm", "lvdm", "decode", "avi"):
        assert ("pipeline/echofast", phase) in by
    for phase in ("total", "lidm", "lvdm", "decode"):
        assert ("pipeline/reference", phase) in by
        assert ("pipeline/echofast+compile", phase) in by
        assert ("pipeline/reference+compile", phase) in by
    unet_paths = ("unet/echofast", "unet/echofast+graphs", "unet/echofast+compile")
    for path in (*unet_paths, "unet/diffusers", "unet/diffusers+compile", "gemm/fp32-512-cpu"):
        assert (path, "call") in by
    assert all(float(r["median_s"]) > 0 for r in rows)

    ours, ref = by["pipeline/echofast", "total"], by["pipeline/reference", "total"]
    med = float(ours["median_s"])
    assert float(ours["s_per_video"]) == pytest.approx(med / 2, rel=1e-5)
    assert float(ours["frames_per_s"]) == pytest.approx(2 * 12 / med, rel=1e-5)
    assert float(ours["speedup_vs_reference"]) == pytest.approx(
        float(ref["median_s"]) / med, rel=1e-4
    )
    phases = sum(float(by["pipeline/echofast", p]["median_s"]) for p in ("lidm", "lvdm", "decode"))
    assert med == pytest.approx(phases, rel=1e-4)  # one timed run: total = sum of its phases

    # FLOPs: 2 videos x 2 windows per call; the diffusers count per window, scaled
    one_window = measure.count_flops(lambda: _diffusers_lvdm_call())
    for path in ("unet/echofast", "unet/diffusers"):
        assert float(by[path, "call"]["gflop"]) == pytest.approx(4 * one_window / 1e9, rel=1e-5)
        assert int(by[path, "call"]["kernels"]) > 100
    assert "ran eagerly" in by["unet/echofast+graphs", "call"]["note"]
    # as the pipeline calls it: the run-constant work precomputed, fewer ops per step
    step = by["unet/echofast+step", "call"]
    assert 0 < int(step["kernels"]) < int(by["unet/echofast", "call"]["kernels"])
    assert float(step["gflop"]) == float(by["unet/echofast", "call"]["gflop"])
    lvdm = by["pipeline/echofast", "lvdm"]
    assert float(lvdm["gflop"]) == pytest.approx(2 * 4 * one_window / 1e9, rel=1e-5)


def test_no_pipeline_times_unet_calls_only(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    argv = ["--smoke", "--device", "cpu", "--batch-size", "1", "--no-progress", "--no-pipeline"]
    argv += ["--compile", "--compile-backend", "eager", "--no-profile", "--out", str(out)]
    assert bench.main_bench(argv) == 0, capsys.readouterr().out
    paths = {r["path"] for r in _read(out)}
    assert not any(p.startswith("pipeline/") for p in paths), paths
    assert {"unet/echofast", "unet/diffusers", "unet/diffusers+compile"} <= paths


def _diffusers_lvdm_call():
    """One window of the smoke LVDM through diffusers (the same random init as the bench)."""
    models = _models()
    x = torch.randn(1, 8, 8, 8, 8)
    with torch.no_grad():
        return models.d_lvdm(
            x, 500, encoder_hidden_states=torch.rand(1, 1, 1), added_time_ids=torch.zeros(1, 1)
        )


_MODELS = {}


def _models():
    if "smoke" not in _MODELS:
        _MODELS["smoke"] = reference.build_models(bench.SMOKE_CONFIGS, torch.device("cpu"), seed=3)
    return _MODELS["smoke"]


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@torch.no_grad()
def test_reference_way_matches_echofast_pipelines():
    """The baseline loops (diffusers modules and scheduler) compute what echofast's pipelines
    compute on the same weights and per-sample noise: sampling, stitching, padding, decode."""
    m = _models()
    steps = 3
    ours = LIDMPipeline(m.lidm)(
        2, generator=_gens([1, 2]), num_inference_steps=steps, progress=False
    )
    theirs = reference.reference_lidm(
        m.d_lidm,
        reference.diffusers_scheduler(),
        2,
        steps,
        generator=_gens([1, 2]),
        autocast_dtype=None,
    )
    assert _rel(theirs, ours.latents) <= 1e-5

    cond, ef = ours.latents, torch.tensor([40.0, 40.0])  # equal EFs: the reference pairing agrees
    pipe = LVDMPipeline(m.lvdm, m.vae)
    video = pipe(
        cond,
        ef,
        num_frames=11,
        generator=_gens([5, 6]),
        num_inference_steps=steps,
        output_type="latent",
        progress=False,
    ).latents
    ref = reference.reference_lvdm(
        m.d_lvdm,
        reference.diffusers_scheduler(),
        cond,
        ef,
        11,
        steps,
        generator=_gens([5, 6]),
        autocast_dtype=None,
    )
    assert ref.shape == video.shape == (2, 11, 4, 6, 6)
    assert _rel(ref, video) <= 1e-5

    pixels = reference.reference_decode(m.d_vae, ref)
    assert pixels.shape == (2, 11, 3, 12, 12) and pixels.dtype == torch.uint8
    gray = pipe.decode(video)
    # echofast averages the channels before the uint8 truncation, the reference after; where no
    # channel saturates the two differ by less than one level
    inside = ((pixels > 0) & (pixels < 255)).all(dim=2)
    assert inside.float().mean() > 0.3
    assert (pixels.float().mean(dim=2) - gray.float())[inside].abs().max() < 1.0


def test_reference_pairs_ef_like_the_reference():
    """With different EFs the baseline repeats them with repeat_interleave over window-major
    batches (the reference's bug, kept: it costs the same): window 0 of sample 1 gets sample 0's
    EF. Checked through the conditioning the UNet receives."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        @property
        def device(self):
            return torch.device("cpu")

        def forward(self, x, t, encoder_hidden_states, added_time_ids):
            seen.append(encoder_hidden_states.flatten().tolist())
            return self.inner(
                x, t, encoder_hidden_states=encoder_hidden_states, added_time_ids=added_time_ids
            )

    m = _models()
    with torch.no_grad():
        reference.reference_lvdm(
            Spy(m.d_lvdm),
            reference.diffusers_scheduler(),
            torch.randn(2, 4, 6, 6),
            torch.tensor([20.0, 80.0]),
            12,
            1,
            generator=torch.Generator(),
            autocast_dtype=None,
        )
    assert seen == [pytest.approx([0.2, 0.2, 0.8, 0.8])]


def test_compare_flags_only_slower_rows_of_the_same_card():
    key = {"config": "full", "dtype": "float16", "frames": 192, "steps": 64, "batch": 1}
    old = [
        {**key, "card": "A", "path": "pipeline/echofast", "phase": "total", "median_s": "1.0"},
        {**key, "card": "A", "path": "pipeline/reference", "phase": "total", "median_s": "1.0"},
        {**key, "card": "A", "path": "unet/echofast", "phase": "call", "median_s": "1.0"},
        {**key, "card": "A", "path": "gemm/bf16-8192", "phase": "call", "median_s": "1.0"},
        {**key, "card": "A", "path": "unet/diffusers", "phase": "call", "median_s": "1.0"},
        {**key, "card": "B", "path": "unet/diffusers", "phase": "call", "median_s": "1.0"},
    ]
    new = [
        {**key, "card": "A", "path": "pipeline/echofast", "phase": "total", "median_s": 1.2},
        {**key, "card": "A", "path": "pipeline/reference", "phase": "total", "median_s": 1.05},
        {**key, "card": "A", "path": "unet/echofast", "phase": "call", "median_s": 0.5},
        {**key, "card": "A", "path": "gemm/bf16-8192", "phase": "call", "median_s": 3.0},
        {**key, "card": "A", "path": "unet/diffusers", "phase": "call", "median_s": 9.0},
    ]
    lines, regressions = bench_rows.compare(new, old, threshold_pct=10)
    assert len(lines) == 5  # the card-B row matches nothing
    assert len(regressions) == 1 and "pipeline/echofast total" in regressions[0]
    # baselines (GEMM ceiling, diffusers) slower: labelled, never flagged
    assert sum(line.startswith("baseline") for line in lines) == 2
    assert "+20.0%" in regressions[0]
    assert bench_rows.compare(new, old, threshold_pct=25)[1] == []


def test_csv_files_are_checked(tmp_path):
    with pytest.raises(EchofastError, match="does not exist"):
        bench_rows.read_csv(tmp_path / "missing.csv")
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(EchofastError, match="not an echofast bench CSV"):
        bench_rows.read_csv(foreign)
    with pytest.raises(EchofastError, match="other columns"):
        bench_rows.append_csv(foreign, [{"card": "x"}])
    assert foreign.read_text() == "a,b\n1,2\n"  # never rewritten


def test_quantiles_match_numpy():
    values = list(np.random.default_rng(0).normal(size=17))
    for q in (0.2, 0.5, 0.8):
        assert measure.quantile(values, q) == pytest.approx(np.quantile(values, q), rel=1e-12)
    t = measure.Timing([3.0, 1.0, 2.0])
    assert (t.median, t.p20, t.p80) == (2.0, pytest.approx(1.4), pytest.approx(2.6))


def test_flop_count_includes_attention():
    """Attention FLOPs are counted (SDPA decomposed by the MATH backend): 4·L²·D per head for
    QKᵀ and PV, plus a matmul's 2·M·N·K."""
    n, heads, length, d = 2, 3, 10, 16
    q, k, v = (torch.randn(n, heads, length, d) for _ in range(3))
    assert measure.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == (
        n * heads * 4 * length * length * d
    )
    a, b = torch.randn(5, 7), torch.randn(7, 11)
    assert measure.count_flops(lambda: a @ b) == 2 * 5 * 7 * 11


def test_kernel_count_on_cpu_counts_dispatched_ops():
    x = torch.randn(8, 8)
    count, what, times = measure.count_kernels(lambda: ((x + 1) * 2).sum(), torch.device("cpu"))
    assert times is None
    assert count == 3 and "ATen ops" in what  # add, mul, sum


def test_command_line_errors(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main_bench(["--help"])
    assert info.value.code == 0 and "--compare" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as info:
            bench.main_bench(["--dtype", "float16", "--no-csv"])
        assert info.value.code == 2
    with pytest.raises(SystemExit):
        bench.main_bench(["--frames", "0", "--no-csv"])
    assert measure.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_every_triton_kernel_has_a_kind():
    """Each kernel entry point under kernels/ is named by its own kind in the profile tables,
    none falls in "other"."""
    source = "\n".join(p.read_text() for p in sorted(KERNELS_DIR.glob("*.py")))
    names = re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", source)
    assert "_ff_fwd_kernel" in names and len(names) >= 15
    kinds = {name: measure.kernel_kind(name) for name in names}
    assert "other" not in kinds.values(), kinds
    assert kinds["_ff_fwd_kernel"] == "triton feed-forward"
    assert kinds["_bias_residual_kernel"] == "triton bias + residual"


def test_kernel_time_table_by_kind():
    """Device time per kind of CUDA kernel, from kernel names as cuBLAS, cuDNN, PyTorch and
    Triton name them (the GPU benchmark prints it for every UNet call it profiles)."""
    kernels = [
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", 40.0),
        ("nvjet_hsh_192x128_64x4_1x2_h_bz_coopA_NTN", 30.0),
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", 50.0),
        ("_gn_fwd_fused_kernel", 5.0),
        ("_gn_fwd_fused_kernel", 7.0),
        ("_attn_fwd_kernel", 9.0),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half>", 4.0),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>", 3.0),
        ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", 2.0),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int>", 1.0),
        ("some_unknown_kernel", 0.5),
        (
            "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::"
            "native::CUDAFunctor_add<c10::Half>>(at::TensorIteratorBase&, at::native::CUDAFunctor"
            "_add<c10::Half> const&)::{lambda(int)#1}>(int, at::native::gpu_kernel_impl_nocast)",
            6.0,
        ),
        ("_layer_norm_fwd_kernel", 1.5),
    ]
    table = measure.kernel_time_table(kernels)
    kinds = table["kinds"]
    assert kinds["GEMM"] == (2, 70.0) and kinds["convolution"] == (1, 50.0)
    assert kinds["triton GroupNorm"] == (2, 12.0) and kinds["triton attention"] == (1, 9.0)
    assert kinds["layer norm"] == (1, 4.0) and kinds["copy / cast"] == (1, 2.0)
    assert kinds["elementwise / reduction"] == (1, 3.0) and kinds["concatenation"] == (1, 1.0)
    assert kinds["other"] == (1, 0.5) and kinds["triton LayerNorm"] == (1, 1.5)
    assert kinds["elementwise, strided"] == (1, 6.0)  # "nocast" is not a cast
    assert list(kinds)[0] == "GEMM"  # longest kind first
    assert table["kernels"][0][0].startswith("sm90_xmma_fprop")  # longest kernel first
    assert table["kernels"][3] == ("_gn_fwd_fused_kernel", 2, 12.0)
    text = "\n".join(measure.format_kernel_times(table, top=3))
    assert "GEMM" in text and "0.070 ms" in text and text.count("x  ") == 3


def test_op_time_table_by_input_shape():
    """The convolutions and matrix products of a profiled call by input shape, from a real
    profile (CPU times here; the GPU benchmark reads the device times of an eager UNet call)."""
    from torch.profiler import ProfilerActivity, profile

    conv = torch.nn.Conv2d(3, 5, 3)
    lin = torch.nn.Linear(7, 4)
    x, v = torch.randn(2, 3, 9, 11), torch.randn(6, 7)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            conv(x)
        lin(v)
        (x + 1).relu()  # not listed
    ops = measure.op_time_table(prof.key_averages(group_by_input_shape=True), "cpu_time_total")
    assert {name for name, *_ in ops} == {"aten::convolution", "aten::addmm"}
    (conv_row,) = [r for r in ops if r[0] == "aten::convolution"]
    assert conv_row[2] == 3 and "[2, 3, 9, 11]" in conv_row[1] and "[5, 3, 3, 3]" in conv_row[1]
    assert [r[3] for r in ops] == sorted((r[3] for r in ops), reverse=True)
    table = {"kinds": {"GEMM": (1, 1.0)}, "kernels": [("k", 1, 1.0)], "ops": ops}
    text = "\n".join(measure.format_kernel_times(table, top=5))
    assert "by input shape" in text and "convolution  [[2, 3, 9, 11]" in text


class _Clock:
    """A stand-in ``time.perf_counter`` that moves only when told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_time_call_times_only_the_calls_after_the_warmup(monkeypatch):
    clock, calls = _Clock(), []
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    seconds = [5.0, 7.0, 0.25, 0.5, 2.0]

    def fn(i):
        calls.append(i)
        clock.now += seconds[i]

    timing = measure.time_call(fn, torch.device("cpu"), warmup=2, repeats=3)
    assert calls == [0, 1, 2, 3, 4] and timing.samples == [0.25, 0.5, 2.0]


def test_phase_clock_adds_each_lap_to_its_phase(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    phases = measure.PhaseClock(torch.device("cpu"))
    for name, sec in (("lidm", 1.5), ("lvdm", 4.0), ("lidm", 0.25)):
        clock.now += sec
        phases.lap(name)
    assert phases.phases == {"lidm": 1.75, "lvdm": 4.0}


def test_quantile_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="quantile of no values"):
        measure.quantile([], 0.5)


def test_cpu_card_names_and_their_file_names():
    card = measure.card_name(torch.device("cpu"))
    assert card.startswith("cpu: ") and measure.card_slug(card).startswith("cpu-")
    assert measure.card_slug("cpu: Intel(R) Xeon(R) CPU @ 2.20GHz") == (
        "cpu-intel-r-xeon-r-cpu-2-20ghz"
    )
    assert measure.card_slug("(?)") == "unknown"


def test_cpu_gemm_ceiling_is_an_fp32_512_product():
    timing, flop, label = measure.gemm_ceiling(torch.device("cpu"), repeats=4)
    assert label == "gemm/fp32-512-cpu" and flop == 2 * 512**3
    assert len(timing.samples) == 4 and min(timing.samples) > 0


def test_git_revision_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv("ECHOFAST_GIT_SHA", "abc1234-dirty")
    env = measure.environment(torch.device("cpu"))
    assert env["git_sha"] == "abc1234-dirty" and env["device"] == "cpu"


def test_short_kernel_names_keep_the_functors_of_the_part_cut():
    exact = "k" * 110
    assert measure.short_kernel_name(exact) == exact
    head = "void at::native::vectorized_elementwise_kernel<4, " + "x" * 20
    name = head + ", at::native::AddFunctor<float>, at::native::direct_copy_kernel_cuda, y>"
    assert measure.short_kernel_name(name, width=len(name)) == name
    cut = measure.short_kernel_name(name, width=60)
    assert cut == name[:20] + " .. AddFunctor, direct_copy_kernel_cuda"
    plain = "z" * 200
    assert measure.short_kernel_name(plain) == "z" * 70
    many = "q" * 80 + "".join(f" F{i}Functor" for i in range(9))
    assert (
        measure.short_kernel_name(many, width=80)
        == "q" * 40 + " .. " + (", ".join(f"F{i}Functor" for i in range(9))[:38])
    )


def test_cpu_name_is_the_model_name_line_of_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Xeon: Gold\n")
    real = measure.Path
    monkeypatch.setattr(measure, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert measure.cpu_name() == "Xeon: Gold"
    info.unlink()  # no /proc (macOS, Windows): what the platform module says
    import platform

    assert measure.cpu_name() == (platform.processor() or platform.machine() or "cpu")


def _git(cwd, *args):
    import subprocess

    run = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return run.stdout.strip()


def test_git_revision_of_the_working_directory_marks_a_dirty_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("ECHOFAST_GIT_SHA", raising=False)
    monkeypatch.chdir(tmp_path)
    _git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("a")
    _git(tmp_path, "add", "f")
    _git(tmp_path, "commit", "-q", "-m", "x")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert measure.git_sha() == head
    (tmp_path / "f").write_text("b")
    assert measure.git_sha() == f"{head}-dirty"


def test_kernel_time_shares_are_percentages_even_of_nothing():
    table = measure.kernel_time_table([("_gn_fwd_fused_kernel", 30.0), ("cat_kernel", 10.0)])
    lines = measure.format_kernel_times(table)
    assert lines[0] == "GPU time of one call by kind (0.04 ms in kernels):"
    assert lines[1].split() == ["triton", "GroupNorm", "0.030", "ms", "75.0", "%", "1", "kernels"]
    table = measure.kernel_time_table([("_gn_fwd_fused_kernel", 0.0), ("cat_kernel", 0.0)])
    lines = measure.format_kernel_times(table)
    assert lines[0] == "GPU time of one call by kind (0.00 ms in kernels):"
    assert lines[1].split()[-6:] == ["0.000", "ms", "0.0", "%", "1", "kernels"]


def test_environment_columns_are_the_installed_versions():
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return ""

    env = measure.environment(torch.device("cpu"))
    assert env["triton"] == installed("triton") and env["diffusers"] == installed("diffusers")
    assert env["torch"] == torch.__version__ and env["cuda"] == (torch.version.cuda or "")
    assert env["card"] == measure.card_name(torch.device("cpu"))
    assert measure.environment(torch.device("cpu", 0))["device"] == "cpu:0"


def test_autocast_context_is_nothing_for_float32_and_autocast_otherwise():
    import warnings

    a, b = torch.randn(3, 4), torch.randn(4, 2)
    for dtype in (None, torch.float32):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # CPU autocast warns for a dtype it does not support
            with reference.autocast_context(torch.device("cpu"), dtype):
                assert (a @ b).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with reference.autocast_context(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_models_are_seeded_and_diffusers_twins_share_their_weights():
    m = _models()  # seed 3
    for ours, theirs in ((m.vae, m.d_vae), (m.lidm, m.d_lidm), (m.lvdm, m.d_lvdm)):
        mine, other = ours.state_dict(), theirs.state_dict()
        assert mine.keys() == other.keys()
        assert all(torch.equal(mine[k], other[k]) for k in mine)
    cpu = torch.device("cpu")
    again = reference.build_models(bench.SMOKE_CONFIGS, cpu, seed=3, with_diffusers=False)
    other = reference.build_models(bench.SMOKE_CONFIGS, cpu, seed=4, with_diffusers=False)
    assert again.d_lvdm is None and again.diffusers_missing == "baselines not requested"
    w = "conv_in.weight"
    assert torch.equal(again.lvdm.state_dict()[w], m.lvdm.state_dict()[w])
    assert not torch.equal(other.lvdm.state_dict()[w], m.lvdm.state_dict()[w])
    with pytest.raises(ValueError, match="needs configs or weights"):
        reference.build_models(None, cpu)


def test_flops_per_window_are_the_diffusers_count_of_one_window():
    """Counted on one window of the pipeline's UNet input although a batch has several."""
    from types import SimpleNamespace

    setup = SimpleNamespace(models=_models(), plan=SimpleNamespace(frames=12), seed=0)
    setup.device = torch.device("cpu")
    assert bench._lvdm_shapes(setup, 1)[0] == 2
    assert bench._flop_per_window(setup) == measure.count_flops(_diffusers_lvdm_call)


def test_temporal_gemms_paths_take_the_gemms_and_only_they(tmp_path, capsys, monkeypatch):
    """``--temporal-gemms``: a pipeline path and a step-call path beside the defaults, in which
    (and only in which) the temporal convolutions run as three GEMMs; the device set is restored
    afterwards."""
    import echofast.nn.spatiotemporal as st

    gemm_calls, gemms = [], st.temporal_conv_gemms
    monkeypatch.setattr(st, "temporal_conv_gemms", lambda *a: gemm_calls.append(1) or gemms(*a))
    per_path: list[tuple[str, int]] = []

    def counting(fn, name_of):
        def wrapped(*args, **kwargs):
            before = len(gemm_calls)
            out = fn(*args, **kwargs)
            per_path.append((name_of(*args), len(gemm_calls) - before))
            return out

        return wrapped

    monkeypatch.setattr(bench, "run_echofast", counting(bench.run_echofast, lambda *a: a[4]))
    monkeypatch.setattr(bench, "time_call", counting(bench.time_call, lambda *a: "unet call"))
    out = tmp_path / "bench.csv"
    argv = ["--smoke", "--device", "cpu", "--batch-size", "1", "--no-progress", "--no-reference"]
    argv += ["--no-avi", "--no-profile", "--steps", "1", "--unet-repeats", "1", "--warmup", "0"]
    argv += ["--temporal-gemms", "--out", str(out)]
    assert bench.main_bench(argv) == 0, capsys.readouterr().out
    assert st.TEMPORAL_GEMMS_DEVICES == frozenset()
    paths = [r["path"] for r in _read(out) if r["phase"] in ("total", "call")]
    unet_paths = ["unet/echofast", "unet/echofast+step", "unet/echofast+step+temporal-gemms"]
    assert paths[1:] == ["pipeline/echofast", "pipeline/echofast+temporal-gemms", *unet_paths]
    pipelines, calls = per_path[:2], per_path[2:]
    assert [p for p, _ in pipelines] == paths[1:3]
    assert pipelines[0][1] == 0 and pipelines[1][1] > 0
    assert [n == 0 for _, n in calls] == [True, True, False]
