"""The derived columns of ``echofast bench`` rows (throughput, TFLOP/s, fraction of the GEMM
ceiling, end-to-end time), the printed per-video table, the CSV's number format and
``--compare``'s choice of the old row, from planted timings (nothing is measured: fast)."""

from __future__ import annotations

import csv
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="echofast.benchmark imports the baselines' modules")

from echofast import benchmark as bench  # noqa: E402
from echofast import benchmark_rows as bench_rows  # noqa: E402
from echofast.benchmark_measure import Timing  # noqa: E402


def _setup(gemm_tflops=None, frames=12):
    plan = bench.Plan("smoke", frames=frames, steps=2, batch_sizes=(3,), repeats=5, warmup=0,
                      unet_repeats=4)  # fmt: skip
    return SimpleNamespace(
        plan=plan,
        env={"card": "card-x", "run": "r1"},
        dtype=torch.float32,
        gemm_tflops=gemm_tflops,
        device=torch.device("cpu"),
        profile=False,
        failures=[],
        seed=0,
    )


def test_pipeline_rows_derive_throughput_flops_and_end_to_end():
    rng = np.random.default_rng(0)
    batch, frames, flop = 3, 12, 7.5e12
    phases = {p: rng.uniform(0.5, 2.0, 5) for p in ("lidm", "lvdm", "decode", "avi")}
    timings = {p: Timing(list(v)) for p, v in phases.items()}
    setup = _setup(gemm_tflops=4.0, frames=frames)
    rows = bench._pipeline_rows(setup, batch, "pipeline/echofast", timings, 123.4,
                                ("lidm", "lvdm", "decode"), flop, "n")  # fmt: skip
    by = {r["phase"]: r for r in rows}
    assert set(by) == {"total", "end_to_end", "lidm", "lvdm", "decode", "avi"}
    total = phases["lidm"] + phases["lvdm"] + phases["decode"]  # per timed run
    for phase, samples in (("total", total), ("end_to_end", total + phases["avi"])):
        r = by[phase]
        med = np.quantile(samples, 0.5)
        assert r["median_s"] == pytest.approx(med, rel=1e-12)
        assert (r["p20_s"], r["p80_s"]) == pytest.approx(np.quantile(samples, [0.2, 0.8]))
        assert r["s_per_video"] == pytest.approx(med / batch)
        assert r["frames_per_s"] == pytest.approx(batch * frames / med)
        assert r["videos_per_s"] == pytest.approx(batch / med)
        assert r["repeats"] == 5 and r["batch"] == batch and r["card"] == "card-x"
    assert by["total"]["peak_mem_mib"] == 123.4
    for phase, samples in phases.items():
        med = np.quantile(samples, 0.5)
        assert by[phase]["median_s"] == pytest.approx(med)
        assert by[phase]["s_per_video"] == pytest.approx(med / batch)
    lvdm = by["lvdm"]
    tflops = flop / np.quantile(phases["lvdm"], 0.5) / 1e12
    assert lvdm["gflop"] == pytest.approx(7500.0)
    assert lvdm["tflops"] == pytest.approx(tflops)
    assert lvdm["gemm_fraction"] == pytest.approx(tflops / 4.0)
    assert all(by[p]["gflop"] == "" for p in ("lidm", "decode", "total"))


def test_unet_call_rows_tflops_and_fraction_of_the_gemm_ceiling(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "_unet_inputs", lambda setup, batch: [(None, 1, None, None)])

    def fake_time_call(fn, device, warmup, repeats):
        seen.append(repeats)
        fn(0)
        return Timing([0.25, 0.5, 2.0, 0.75])

    monkeypatch.setattr(bench, "time_call", fake_time_call)
    unets = {"unet/echofast": lambda x, t, **kw: None, "unet/diffusers": lambda x, t, **kw: None}
    rows = list(bench.run_unet_calls(_setup(gemm_tflops=5.0), 2, 3e12, unets))
    assert [r["path"] for r in rows] == list(unets) and seen == [4, 4]
    for r in rows:
        assert r["median_s"] == pytest.approx(0.625) and r["phase"] == "call"
        assert r["gflop"] == pytest.approx(3000.0)
        assert r["tflops"] == pytest.approx(3e12 / 0.625 / 1e12)
        assert r["gemm_fraction"] == pytest.approx(4.8 / 5.0)


def _row(**kw):
    row = {k: "" for k in bench_rows.CSV_FIELDS}
    row.update(kw)
    return row


def test_the_table_prints_p20_and_p80_per_video():
    row = _row(batch=4, path="pipeline/echofast", phase="total", median_s=8.0, p20_s=6.0,
               p80_s=10.0, s_per_video=2.0)  # fmt: skip
    lines = bench_rows.summary_table([row]).splitlines()
    cells = lines[1].split()
    assert cells[:6] == ["4", "pipeline/echofast", "total", "2", "1.5", "2.5"]


def test_csv_keeps_six_significant_digits(tmp_path):
    out = tmp_path / "b.csv"
    bench_rows.append_csv(out, [_row(median_s=1.23456789, tflops=0.000123456789, batch=2)])
    bench_rows.append_csv(out, [_row(median_s=2.0, batch=8)])
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["median_s"] for r in rows] == ["1.23457", "2"]
    assert rows[0]["tflops"] == "0.000123457" and rows[1]["batch"] == "8"
    assert out.read_text().count("timestamp,run,") == 1  # one header


def test_compare_uses_the_latest_old_row_of_the_card():
    key = dict(config="full", dtype="float16", frames=192, steps=64, batch=1,
               path="pipeline/echofast", phase="total")  # fmt: skip
    old = [
        {**key, "card": "A", "median_s": "0.5", "git_sha": "first"},
        {**key, "card": "A", "median_s": "1.0", "git_sha": "latest"},
        {**key, "card": "B", "median_s": "9.0", "git_sha": "other-card"},
    ]
    lines, regressions = bench_rows.compare([{**key, "card": "A", "median_s": 1.05}], old, 10)
    assert len(lines) == 1 and regressions == []
    assert "latest" in lines[0] and "+5.0%" in lines[0]
    lines, regressions = bench_rows.compare([{**key, "card": "B", "median_s": 1.0}], old, 10)
    assert regressions == [] and "-88.9%" in lines[0] and lines[0].startswith("ok")
    # exactly at the threshold is not a regression; just above is
    assert bench_rows.compare([{**key, "card": "A", "median_s": 1.5}], old, 50)[1] == []
    assert len(bench_rows.compare([{**key, "card": "A", "median_s": 1.51}], old, 50)[1]) == 1


@pytest.mark.parametrize(
    "path,new_median,threshold,status",
    [
        ("unet/echofast", 2.0, "50", 1),
        ("unet/echofast", 2.0, "150", 0),
        ("unet/echofast", 0.5, "0", 0),
        ("unet/diffusers", 9.0, "10", 0),  # a slower baseline is never a regression
    ],
)
def test_compare_exit_status(tmp_path, monkeypatch, capsys, path, new_median, threshold, status):
    from echofast.benchmark_measure import card_name

    key = dict(config="k", dtype="float32", frames=3, steps=2, batch=1, path=path, phase="call")
    old = tmp_path / "old.csv"
    bench_rows.append_csv(old, [_row(**key, card=card_name(torch.device("cpu")), median_s=1.0)])
    monkeypatch.setattr(
        bench, "build_models", lambda *a, **k: SimpleNamespace(diffusers_missing="")
    )

    def fake_measure(setup):
        row = bench._row(setup, 1, path, "call", Timing([new_median]))
        setup.record([{**row, **key}])

    monkeypatch.setattr(bench, "_measure", fake_measure)
    argv = ["--device", "cpu", "--no-csv", "--no-progress", "--compare", str(old)]
    assert bench.main_bench([*argv, "--threshold", threshold]) == status
    text = capsys.readouterr().out
    assert "1 matching rows" in text and ("1 regression(s)" in text) == bool(status)


def test_ratios_pair_every_echofast_row_with_its_baselines_of_the_same_batch_and_phase():
    rng = np.random.default_rng(1)
    ours = ("pipeline/echofast", "pipeline/echofast+compile", "unet/echofast", "unet/echofast+step")
    bases = ("pipeline/reference", "pipeline/reference+compile", "unet/diffusers")
    rows = [
        _row(batch=b, path=p, phase=ph, median_s=float(rng.uniform(0.1, 9.0)))
        for b in (1, 3)
        for ph in ("total", "lvdm")
        for p in (*ours, *bases)
    ]
    rows.append(_row(batch=1, path="unet/diffusers+compile", phase="total", median_s=""))
    bench_rows.add_ratios(rows)
    med = {(r["batch"], r["path"], r["phase"]): r["median_s"] for r in rows}
    for r in rows:
        ref = comp = None
        if r["path"] in ours:
            family = r["path"].split("/")[0]
            ref, comp = {"pipeline": bases[:2], "unet": (bases[2], "unet/diffusers+compile")}[
                family
            ]
        for col, base in (("speedup_vs_reference", ref), ("speedup_vs_compiled", comp)):
            other = med.get((r["batch"], base, r["phase"]))
            if other not in (None, ""):
                assert r[col] == pytest.approx(other / r["median_s"], rel=1e-12), (r, col)
            else:
                assert r[col] == "", (r, col)


def test_compare_skips_rows_without_a_median_and_labels_every_baseline():
    key = dict(config="full", dtype="float16", frames=192, steps=64, batch=1, phase="total")
    old = [
        {**key, "card": "A", "path": "pipeline/echofast", "median_s": "2.0", "git_sha": "ok"},
        {**key, "card": "A", "path": "pipeline/echofast", "median_s": "", "git_sha": "empty"},
        {**key, "card": "A", "path": "pipeline/reference", "median_s": "1.0"},
        {**key, "card": "A", "path": "pipeline/echofast+compile", "median_s": "1.0"},
        {**key, "card": "A", "path": "unet/echofast", "median_s": "0"},
        {**key, "card": "A", "path": "unet/diffusers", "median_s": "1.0", "dtype": "float32"},
        {**key, "card": "A", "path": "unet/echofast+compile", "median_s": "1.0"},
    ]
    new = [
        {**key, "card": "A", "path": "pipeline/echofast", "median_s": 2.1},
        {**key, "card": "A", "path": "pipeline/echofast", "median_s": ""},
        {**key, "card": "A", "path": "pipeline/reference", "median_s": 5.0},
        {**key, "card": "A", "path": "pipeline/echofast+compile", "median_s": 5.0},
        {**key, "card": "A", "path": "unet/echofast", "median_s": 1.0},
        {**key, "card": "A", "path": "unet/diffusers", "median_s": 1.0},  # another dtype
        {**key, "card": "A", "path": "unet/echofast+compile", "median_s": 1.2},
    ]
    lines, regressions = bench_rows.compare(new, old, 10)
    labels = ["ok", "baseline", "REGRESSION", "ok", "REGRESSION"]
    assert [line.split()[0] for line in lines] == labels
    assert "(+5.0%, ok -> ?)" in lines[0]  # the latest old row with a median
    assert "+0.0%" in lines[3]  # no ratio to an old median of zero
    assert regressions == [lines[2], lines[4]] and "pipeline/echofast+compile total" in lines[2]


def test_the_call_table_prints_milliseconds_percent_of_gemm_and_dashes():
    rows = [
        _row(
            batch=2,
            path="unet/echofast",
            phase="call",
            median_s=0.0125,
            tflops=3.5,
            gemm_fraction=0.4321,
            kernels=612,
            speedup_vs_reference=2.5,
        ),
        _row(batch="", path="gemm/fp32-512-cpu", phase="call", median_s=0.002, tflops=0.1),
    ]
    lines = bench_rows.summary_table(rows).splitlines()
    assert lines[0] == "" and lines[1].split()[:3] == ["batch", "path", "(1"]
    assert lines[2].split() == ["2", "unet/echofast", "12.500", "3.5", "43.2%", "612", "2.50", "-"]
    assert lines[3].split() == ["-", "gemm/fp32-512-cpu", "2.000", "0.1", "-", "-", "-", "-"]
    # text cells left-aligned, numbers right-aligned under their headers
    assert lines[1] == "batch " + "path (1 LVDM call)".ljust(34) + (
        "  ms/call  TFLOP/s  of GEMM  kernels  vs ref vs comp"
    )
    assert lines[2] == "2     " + "unet/echofast".ljust(34) + (
        "   12.500      3.5    43.2%      612    2.50       -"
    )


class _Stop(BaseException):
    pass


def test_the_gemm_ceiling_row(monkeypatch):
    setup = bench.Setup(torch.device("cpu"), _setup().plan, torch.float32, {"card": "c"}, None)
    monkeypatch.setattr(bench, "gemm_ceiling", lambda device: (
        Timing([2.0, 0.5, 1.0]), 3e12, "gemm/fp32-512-cpu"))  # fmt: skip
    monkeypatch.setattr(bench, "_flop_per_window", lambda setup: (_ for _ in ()).throw(_Stop))
    with pytest.raises(_Stop):
        bench._measure(setup)
    (row,) = setup.rows
    assert setup.gemm_tflops == pytest.approx(3.0)
    assert (row["path"], row["phase"], row["batch"], row["dtype"]) == (
        "gemm/fp32-512-cpu", "call", "", "fp32")  # fmt: skip
    assert (row["median_s"], row["gflop"], row["tflops"]) == (1.0, 3000.0, pytest.approx(3.0))


def test_a_failing_unet_call_is_reported_and_the_others_still_run(monkeypatch):
    warmups = []
    monkeypatch.setattr(bench, "_unet_inputs", lambda setup, batch: [(None, 1, None, None)])

    def fake_time_call(fn, device, warmup, repeats):
        warmups.append(warmup)
        fn(0)
        return Timing([0.5])

    def broken(x, t, **kw):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(bench, "time_call", fake_time_call)
    setup = _setup()  # warm-up 0: a UNet call still gets one untimed call (graph capture)
    setup.profile = True
    unets = {"unet/broken": broken, "unet/echofast": lambda x, t, **kw: None}
    rows = list(bench.run_unet_calls(setup, 2, None, unets))
    assert [r["path"] for r in rows] == ["unet/echofast"] and warmups == [1, 1]
    assert setup.failures == ["unet/broken b=2: RuntimeError: no kernel"]
    assert rows[0]["kernels"] == 0 and rows[0]["note"].startswith("kernels = ATen ops")


def _models():
    lin = torch.nn.Linear(2, 2)
    return SimpleNamespace(lidm=lin, lvdm=lin, vae=lin, d_lidm=lin, d_lvdm=lin, d_vae=lin,
                           source="random weights")  # fmt: skip


def test_reference_rows_on_cpu_are_float32(monkeypatch):
    timings = {p: Timing([1.0]) for p in ("lidm", "lvdm", "decode")}
    monkeypatch.setattr(bench, "_runs", lambda setup, desc, run, weights: (timings, "", 2.0))
    setup = _setup()
    setup.models, setup.env["diffusers"] = _models(), "0.0"
    setup.dtype = torch.float16  # echofast's precision: not the reference's
    rows = bench.run_reference(setup, 1, None, (None, None), "pipeline/reference")
    assert {r["dtype"] for r in rows} == {"float32"}
    assert "fp32 (CPU: no autocast)" in rows[0]["note"]


@pytest.mark.parametrize("avi", [True, False])
def test_echofast_path_passes_its_options_to_the_pipelines(monkeypatch, tmp_path, avi):
    import echofast.io
    import echofast.pipelines

    seen, written = {}, []

    class Stage:
        def __init__(self, name):
            self.name = name

        def __call__(self, *args, **kw):
            seen[self.name], seen[self.name + " args"] = kw, args
            return SimpleNamespace(latents=torch.zeros(1))

        def decode(self, latents, chunk, dtype):
            seen["decode"] = (chunk, dtype)
            return torch.zeros(3, 2, 4, 4, dtype=torch.uint8)

    class Pipe:
        def __init__(self, lidm, lvdm, vae):
            self.lidm_pipe, self.lvdm_pipe = Stage("lidm"), Stage("lvdm")

    monkeypatch.setattr(echofast.pipelines, "EchoSyntheticPipeline", Pipe)
    monkeypatch.setattr(echofast.io, "write_video", lambda path, video, fps: written.append(fps))
    setup = _setup()
    setup.plan = bench.Plan("smoke", 12, 2, (3,), repeats=1, warmup=0, unet_repeats=1)
    setup.models, setup.decode_chunk, setup.avi = _models(), 5, avi
    setup.graphs, setup.progress = True, False  # --graphs on a CPU: eager UNet calls
    setup.seed = 4
    rows = bench.run_echofast(setup, 3, None, decode_dtype=torch.bfloat16)
    assert seen["lidm"]["seed"] == seen["lvdm"]["seed"] == 4
    assert seen["lidm args"] == (3,) and torch.equal(seen["lvdm args"][1], bench._efs(3, 4))
    assert seen["lidm"]["cuda_graphs"] is False and seen["lvdm"]["cuda_graphs"] is False
    assert seen["lvdm"]["num_frames"] == 12 and seen["lvdm"]["num_inference_steps"] == 2
    assert seen["decode"] == (5, torch.bfloat16) and "decode bfloat16 chunk 5" in rows[0]["note"]
    assert written == ([32.0] * 3 if avi else [])
    assert ("end_to_end" in {r["phase"] for r in rows}) == avi


def test_warmup_runs_are_not_timed_but_the_first_one_is_reported():
    calls = iter(range(10))

    def run():
        i = next(calls)
        return {"lidm": 10.0 * (i + 1), "lvdm": 0.5 * i}

    setup = _setup()
    setup.plan, setup.progress = dataclasses.replace(setup.plan, warmup=2, repeats=3), False
    timings, peak, first = bench._runs(setup, "x", run, 0)
    assert first == 10.0 and peak == ""
    assert timings["lidm"].samples == [30.0, 40.0, 50.0]
    assert timings["lvdm"].samples == [1.0, 1.5, 2.0]


def test_without_a_ceiling_the_lvdm_row_has_no_fraction_of_it():
    timings = {p: Timing([1.0, 2.0]) for p in ("lidm", "lvdm", "decode")}
    rows = bench._pipeline_rows(_setup(), 1, "pipeline/echofast", timings, "",
                                ("lidm", "lvdm", "decode"), 4e12, "n")  # fmt: skip
    (lvdm,) = [r for r in rows if r["phase"] == "lvdm"]
    assert lvdm["tflops"] == pytest.approx(4 / 1.5) and lvdm["gemm_fraction"] == ""


def test_unet_calls_rotate_their_input_sets(monkeypatch):
    sets = [(torch.zeros(1), 900, None, None), (torch.ones(1), 500, None, None)]
    monkeypatch.setattr(bench, "_unet_inputs", lambda setup, batch: sets)
    seen = []

    def fake_time_call(fn, device, warmup, repeats):
        for i in range(warmup + repeats):
            fn(i)
        return Timing([1.0])

    monkeypatch.setattr(bench, "time_call", fake_time_call)
    unets = {"unet/echofast": lambda x, t, **kw: seen.append(t)}
    list(bench.run_unet_calls(_setup(), 1, None, unets))
    assert seen == [900, 500, 900, 500, 900]  # one warm-up, four timed calls


def test_a_failing_pipeline_path_is_reported_and_the_unet_calls_still_run(monkeypatch):
    setup = bench.Setup(torch.device("cpu"), _setup().plan, torch.float32, {"card": "c"},
                        SimpleNamespace(lvdm=None, d_lvdm=None), reference=False,
                        progress=False)  # fmt: skip
    monkeypatch.setattr(bench, "gemm_ceiling", lambda device: (Timing([1.0]), 1e12, "gemm/x-1"))
    monkeypatch.setattr(bench, "_flop_per_window", lambda setup: 1e9)
    monkeypatch.setattr(bench, "_lvdm_shapes", lambda setup, batch: (2, 8, (2 * batch, 8)))
    monkeypatch.setattr(bench, "run_echofast", lambda *a: 1 / 0)

    def unet_calls(setup, batch, flop, unets):
        yield bench._row(setup, batch, "unet/echofast", "call", Timing([0.5]))

    monkeypatch.setattr(bench, "run_unet_calls", unet_calls)
    bench._measure(setup)
    assert setup.failures == ["pipeline/echofast b=3: ZeroDivisionError: division by zero"]
    assert [r["path"] for r in setup.rows] == ["gemm/x-1", "unet/echofast"]


def test_reference_path_samples_from_the_seed_and_decodes_what_it_sampled(monkeypatch):
    seen = {}
    images, videos = torch.randn(2, 4, 6, 6), torch.randn(2, 12, 4, 6, 6)

    def lidm(unet, scheduler, n, steps, *, generator, autocast_dtype):
        seen["lidm"] = (unet, n, steps, generator.initial_seed(), autocast_dtype)
        return images

    def lvdm(unet, scheduler, cond, ef, frames, steps, *, generator, autocast_dtype):
        seen["lvdm"] = (unet, cond, ef, frames, steps, generator.initial_seed(), autocast_dtype)
        return videos

    monkeypatch.setattr(bench, "reference_lidm", lidm)
    monkeypatch.setattr(bench, "reference_lvdm", lvdm)
    monkeypatch.setattr(bench, "reference_decode", lambda vae, x: seen.setdefault("decode", x))
    setup = _setup()
    setup.plan = bench.Plan("smoke", 12, 2, (2,), repeats=1, warmup=0, unet_repeats=1)
    setup.models, setup.env["diffusers"], setup.seed, setup.progress = _models(), "0.0", 7, False
    unets = (object(), object())
    rows = bench.run_reference(setup, 2, None, unets, "pipeline/reference")
    assert seen["lidm"] == (unets[0], 2, 2, 7, None)  # CPU: no autocast
    unet, cond, ef, frames, steps, seed, autocast = seen["lvdm"]
    assert unet is unets[1] and cond is images and torch.equal(ef, bench._efs(2, 7))
    assert (frames, steps, seed, autocast) == (12, 2, 7, None)
    assert seen["decode"] is videos
    assert [r["phase"] for r in rows] == ["total", "lidm", "lvdm", "decode"]


def test_a_unet_that_ran_eagerly_says_why_in_its_row(monkeypatch):
    monkeypatch.setattr(bench, "_unet_inputs", lambda setup, batch: [(None, 1, None, None)])
    monkeypatch.setattr(bench, "time_call", lambda fn, device, warmup, repeats: Timing([0.5]))

    class Fallback:
        last_reasons = ["capture failed", "dynamic shape"]

        def __call__(self, x, t, **kw):
            return None

    setup = _setup()
    setup.profile = True
    quiet = Fallback()
    quiet.last_reasons = []
    rows = list(bench.run_unet_calls(setup, 1, None, {"unet/a": Fallback(), "unet/b": quiet}))
    assert rows[0]["note"] == "ran eagerly: capture failed; dynamic shape"
    assert rows[1]["note"].startswith("kernels = ATen ops")


@pytest.mark.parametrize(("reference", "pipelines"), [(True, True), (False, True), (True, False)])
def test_paths_run_cheapest_first_with_their_models_and_flops(monkeypatch, reference, pipelines):
    """echofast, its extra decode precisions, the reference, the compiled reference, compiled
    echofast; the FLOPs of a run are a window's times the windows of a call times the steps."""
    models = SimpleNamespace(lidm="lidm", lvdm="lvdm", d_lidm="d_lidm", d_lvdm="d_lvdm")
    plan = bench.Plan("smoke", 12, 3, (1, 2), repeats=1, warmup=0, unet_repeats=1)
    setup = bench.Setup(torch.device("cpu"), plan, torch.float32, {"card": "c"}, models,
                        decode_dtypes=(torch.bfloat16,), reference=reference, compile=True,
                        compile_echofast=True, compile_backend="eager", progress=False,
                        pipelines=pipelines)  # fmt: skip
    monkeypatch.setattr(bench.torch, "compile", lambda m, dynamic, backend: (m, backend))
    monkeypatch.setattr(bench, "gemm_ceiling", lambda device: (Timing([1.0]), 1e12, "gemm/x-1"))
    monkeypatch.setattr(bench, "_flop_per_window", lambda setup: 5e9)
    monkeypatch.setattr(bench, "_lvdm_shapes", lambda setup, batch: (2, 8, (2 * batch, 8)))
    ran, calls = [], []
    speed = {"s_per_video": 1.0, "frames_per_s": 1.0, "videos_per_s": 1.0}

    def run_echofast(setup, batch, flop, unets, path, decode_dtype):
        ran.append((batch, path, flop, unets, decode_dtype))
        return [speed]

    def run_reference(setup, batch, flop, unets, path):
        ran.append((batch, path, flop, unets, None))
        return [speed]

    def run_unet_calls(setup, batch, flop, unets):
        calls.append((batch, flop, unets))
        return iter(())

    monkeypatch.setattr(bench, "run_echofast", run_echofast)
    monkeypatch.setattr(bench, "run_reference", run_reference)
    monkeypatch.setattr(bench, "run_unet_calls", run_unet_calls)
    bench._measure(setup)
    eager = ("d_lidm", "eager"), ("d_lvdm", "eager")  # what torch.compile gave
    ours = [
        ("pipeline/echofast", None, torch.float32),
        ("pipeline/echofast+decode-bfloat16", None, torch.bfloat16),
    ]
    theirs = [
        ("pipeline/reference", ("d_lidm", "d_lvdm"), None),
        ("pipeline/reference+compile", eager, None),
    ]
    compiled = [
        ("pipeline/echofast+compile", (("lidm", "eager"), ("lvdm", "eager")), torch.float32)
    ]
    expected = [*ours, *(theirs if reference else []), *compiled] if pipelines else []
    assert ran == [
        (b, path, 5e9 * 2 * b * 3, unets, dtype) for b in (1, 2) for path, unets, dtype in expected
    ]
    assert [(b, flop) for b, flop, _ in calls] == [(1, 5e9 * 2), (2, 5e9 * 4)]
    unets = calls[0][2]
    names = ["unet/echofast", "unet/echofast+step"]
    names += ["unet/diffusers", "unet/diffusers+compile"] if reference else []
    assert list(unets) == [*names, "unet/echofast+compile"]
    assert unets["unet/echofast"] == "lvdm" and unets["unet/echofast+compile"] == ("lvdm", "eager")
    if reference:
        assert unets["unet/diffusers"] == "d_lvdm"
        assert unets["unet/diffusers+compile"] == ("d_lvdm", "eager")


@pytest.mark.parametrize(
    "other", [{"frames": 96}, {"steps": 32}, {"batch": 8}, {"config": "weights"}, {"phase": "lvdm"}]
)
def test_compare_matches_only_the_same_shape_and_configuration(other):
    key = dict(card="A", config="full", dtype="float16", frames=192, steps=64, batch=1,
               path="pipeline/echofast", phase="total")  # fmt: skip
    old = [{**key, **other, "median_s": "0.5"}]
    assert bench_rows.compare([{**key, "median_s": 1.0}], old, 10) == ([], [])
    old.append({**key, "median_s": "0.5"})
    assert len(bench_rows.compare([{**key, "median_s": 1.0}], old, 10)[1]) == 1


def test_compare_takes_no_ratio_to_a_nonpositive_old_median():
    key = dict(card="A", config="k", dtype="float32", frames=1, steps=1, batch=1,
               path="unet/echofast", phase="call")  # fmt: skip
    lines, regressions = bench_rows.compare(
        [{**key, "median_s": 2.0}], [{**key, "median_s": "-1"}], 0
    )
    assert regressions == [] and lines[0].startswith("ok") and "(+0.0%" in lines[0]


def test_rows_are_stamped_in_utc_iso_format():
    from datetime import datetime, timezone

    row = bench._row(_setup(), 1, "unet/echofast", "call", Timing([1.0]))
    stamp = datetime.strptime(row["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 120


def test_host_paced_gpu_rows_are_labelled_not_flagged():
    """On CUDA, the AVI writing and eager UNet calls are paced by the host (they varied by
    20-100 % between H100 machines for the same code): slower is ``host``, not a regression;
    the same rows on the CPU, and graph-replayed calls on CUDA, are flagged."""
    key = dict(config="full", dtype="float16", frames=192, steps=64, batch=1, card="A")
    cases = [
        ("cuda", "pipeline/echofast", "avi", "host"),
        ("cuda", "unet/echofast", "call", "host"),
        ("cuda", "unet/echofast+step", "call", "host"),
        ("cuda", "unet/echofast+compile", "call", "host"),
        ("cuda", "unet/echofast+graphs+step", "call", "REGRESSION"),
        ("cuda", "pipeline/echofast", "lvdm", "REGRESSION"),
        ("cpu", "pipeline/echofast", "avi", "REGRESSION"),
        ("cpu", "unet/echofast", "call", "REGRESSION"),
    ]
    for device, path, phase, label in cases:
        old = [{**key, "device": device, "path": path, "phase": phase, "median_s": "1.0"}]
        new = [{**key, "device": device, "path": path, "phase": phase, "median_s": 1.5}]
        lines, regressions = bench_rows.compare(new, old, 10)
        assert lines[0].split()[0] == label, (device, path, phase)
        assert bool(regressions) == (label == "REGRESSION")
        faster = bench_rows.compare([{**new[0], "median_s": 0.5}], old, 10)[0]
        assert faster[0].split()[0] == "ok"
