"""``echofast bench``'s command line: the plan each mode and flag gives, the checks on flag
values, and what a run writes and returns (nothing is measured: the models and the measuring are
stand-ins, so these run in milliseconds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers", reason="echofast.benchmark imports the baselines' modules")

from echofast import benchmark as bench  # noqa: E402
from echofast import benchmark_rows as rows_mod  # noqa: E402
from echofast.errors import EchofastError  # noqa: E402


def _plan(argv):
    p = bench._parser()
    return bench._resolve(p.parse_args(argv), p)[1]


def _run(monkeypatch, argv, measure=None, diffusers_missing=""):
    """``main_bench(argv)`` with stand-in models and ``measure(setup)`` instead of measuring;
    returns (exit status, the run's Setup)."""
    seen = []
    models = SimpleNamespace(diffusers_missing=diffusers_missing)
    monkeypatch.setattr(bench, "build_models", lambda *a, **k: models)

    def fake_measure(setup):
        seen.append(setup)
        if measure is not None:
            measure(setup)

    monkeypatch.setattr(bench, "_measure", fake_measure)
    status = bench.main_bench(["--device", "cpu", "--no-progress", *argv])
    return status, (seen[0] if seen else None)


def test_cpu_default_is_the_documented_smoke_plan_without_compile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, setup = _run(monkeypatch, ["--no-csv"])
    assert status == 0
    # the --help text: smoke 12 frames, 2 steps, batch 1 2, 1 timed run after 1 warm-up
    assert setup.plan == bench.Plan("smoke", frames=12, steps=2, batch_sizes=(1, 2), repeats=1,
                                    warmup=1, unet_repeats=1)  # fmt: skip
    assert setup.dtype == torch.float32 and not setup.compile and setup.reference
    assert setup.journal.out is None
    assert not list(tmp_path.iterdir())  # --no-csv: no results file, no journal
    assert not _run(monkeypatch, ["--no-csv", "--full"])[1].compile  # not on a CPU either


def test_every_flag_sets_its_own_plan_field():
    argv = ["--device", "cpu", "--frames", "5", "--steps", "3", "--batch-size", "4", "6"]
    argv += ["--repeats", "7", "--warmup", "0", "--unet-repeats", "9"]
    assert _plan(argv) == bench.Plan("smoke", frames=5, steps=3, batch_sizes=(4, 6), repeats=7,
                                     warmup=0, unet_repeats=9)  # fmt: skip
    assert _plan(["--device", "cpu", "--full"]) == bench.FULL_PLAN


@pytest.mark.parametrize(
    "flags", [["--batch-size", "1", "0"], ["--decode-chunk", "0"], ["--warmup", "-1"]]
)
def test_values_below_their_minimum_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as info:
        _plan(["--device", "cpu", *flags])
    assert info.value.code == 2 and "must be >=" in capsys.readouterr().err


def test_a_bad_compare_csv_fails_before_measuring(tmp_path, monkeypatch):
    old = tmp_path / "old.csv"
    old.write_text("a,b\n1,2\n")
    monkeypatch.setattr(bench, "build_models", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(EchofastError, match="old.csv: not an echofast bench CSV"):
        bench.main_bench(["--device", "cpu", "--no-csv", "--compare", str(old)])


def test_a_failed_path_gives_exit_status_1_and_keeps_the_other_rows(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.csv"

    def measure(setup):
        setup.record([bench._row(setup, 1, "unet/echofast", "call", bench.Timing([0.5]))])
        setup.failures.append("pipeline/reference b=1: ValueError: boom")

    status, _ = _run(monkeypatch, ["--out", str(out)], measure)
    assert status == 1
    assert "FAILED: pipeline/reference b=1: ValueError: boom" in capsys.readouterr().out
    assert [r["path"] for r in rows_mod.read_csv(out)] == ["unet/echofast"]


def test_each_run_has_its_own_id(tmp_path, monkeypatch):
    out = tmp_path / "bench.csv"

    def measure(setup):
        setup.record([bench._row(setup, 1, "unet/echofast", "call", bench.Timing([0.5]))])

    for _ in range(2):
        assert _run(monkeypatch, ["--out", str(out)], measure)[0] == 0
    runs = [r["run"] for r in rows_mod.read_csv(out)]
    assert len(runs) == 2 and runs[0] != runs[1]


def test_the_default_results_file_is_named_after_the_card(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def measure(setup):
        setup.record([bench._row(setup, 1, "unet/echofast", "call", bench.Timing([0.5]))])
        setup.env["card"] = "changed"  # the name is taken before measuring

    assert _run(monkeypatch, [], measure)[0] == 0
    card = bench.environment(torch.device("cpu"))["card"]
    (path,) = (tmp_path / "bench" / "results").iterdir()
    assert path.name == f"echofast_bench_{bench.card_slug(card)}.csv"


def test_without_diffusers_the_baselines_are_skipped_with_a_note(monkeypatch, capsys):
    status, setup = _run(monkeypatch, ["--no-csv"], diffusers_missing="diffusers not installed")
    assert status == 0 and not setup.reference
    assert "note: baselines skipped: diffusers not installed" in capsys.readouterr().out


def test_weights_runs_are_their_own_configuration():
    """--weights rows are never compared with the random-weight rows of the same mode."""
    assert _plan(["--device", "cpu", "--weights", "/w"]).config == "weights"
    assert _plan(["--device", "cpu", "--full", "--weights", "/w"]).config == "weights"


def test_report_prints_the_table_measures_nothing_and_succeeds(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.csv"
    row = {"run": "r1", "card": "c", "config": "smoke", "batch": 1, "phase": "call"}
    rows_mod.append_csv(out, [{**row, "path": "unet/echofast", "median_s": 0.002}])
    monkeypatch.setattr(bench, "build_models", lambda *a, **k: pytest.fail("measured"))
    assert bench.main_bench(["--report", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("run r1 | c |") and "2.000" in text


@pytest.mark.parametrize(
    ("flags", "compile_note", "graphs_note"),
    [([], True, False), (["--compile"], False, False), (["--no-compile", "--graphs"], False, True)],
)
def test_notes_say_what_a_cpu_run_skips(monkeypatch, capsys, flags, compile_note, graphs_note):
    status, setup = _run(monkeypatch, ["--no-csv", *flags])
    text = capsys.readouterr().out
    assert status == 0 and setup.compile == ("--compile" in flags)
    assert ("note: torch.compile baseline skipped on CPU/smoke" in text) == compile_note
    assert ("note: --graphs: CUDA graphs need CUDA; on cpu" in text) == graphs_note


def test_the_run_says_where_its_rows_went(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.csv"

    def measure(setup):
        setup.record(
            [bench._row(setup, b, "unet/echofast", "call", bench.Timing([0.5])) for b in (1, 2)]
        )

    assert _run(monkeypatch, ["--out", str(out)], measure)[0] == 0
    assert f"2 rows appended to {out}" in capsys.readouterr().out
    assert _run(monkeypatch, ["--no-csv"], measure)[0] == 0
    assert "rows appended" not in capsys.readouterr().out


@pytest.mark.parametrize(("mode", "compiled"), [("--smoke", False), ("--full", True)])
def test_on_cuda_the_compiled_baseline_is_timed_by_default_except_in_smoke(
    monkeypatch, mode, compiled
):
    """The plan a GPU gets (nothing runs on the GPU: CUDA is only said to be there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    env = dict.fromkeys(("card", "torch", "cuda", "triton", "diffusers", "git_sha"), "x")
    monkeypatch.setattr(bench, "environment", lambda device: dict(env))
    status, setup = _run(monkeypatch, ["--device", "cuda", mode, "--no-csv"])
    assert status == 0 and setup.device.type == "cuda"
    assert setup.compile is compiled and setup.dtype == torch.float16
    assert setup.plan.config == mode[2:]
