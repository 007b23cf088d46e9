"""``echofast report``: gathers what exists, lists what is missing, embeds figures."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from echofast.data.echonet import write_filelist
from echofast.eval.report import (
    DOWNSTREAM_FORMAT,
    METRICS_FORMAT,
    PRIVACY_FORMAT,
    ReportError,
    main_report,
)
from echofast.figures import save_png, scatter_png


def _dataset(root):
    write_filelist(
        root,
        [
            {
                "FileName": f"s{i}",
                "EF": 30 + 10 * i,
                "FPS": 32,
                "NumberOfFrames": 192,
                "Split": split,
            }
            for i, split in enumerate(["TRAIN", "TRAIN", "VAL", "TEST"])
        ],
    )
    (root / "generation.json").write_text(
        json.dumps(
            {
                "echofast_version": "0.1.0",
                "arguments": {"seed": 7, "steps": 64, "splits": [2, 1, 1]},
            }
        )
    )
    return root


def test_full_report(tmp_path, capsys):
    root = _dataset(tmp_path / "synthetic")
    (root / "privacy_report.json").write_text(
        json.dumps(
            {
                "format": PRIVACY_FORMAT,
                "threshold": 0.8123,
                "kept": 3,
                "dropped": 1,
                "scores": [0.1, 0.9],
                "nested": {"a": 1},
                "auc": None,
            }
        )
    )
    y = np.linspace(20, 70, 10)
    save_png(root / "privacy_histogram.png", scatter_png(y, y, "HIST"))
    (root / "metrics.json").write_text(
        json.dumps(
            {
                "format": METRICS_FORMAT,
                "metrics": {"fid": 28.81, "is_mean": 2.26, "is_std": 0.01, "fvd16": 103.5},
                "counts": {"fid_images": 50000, "fvd16_videos": 2048},
                "reference": {
                    "dataset": "/data/EchoNet-Dynamic",
                    "split": "TRAIN",
                    "frames": 128,
                    "fps": 32.0,
                    "videos": 2048,
                },
            }
        )
    )
    ef = root / "evaluation" / "ef"
    ef.mkdir(parents=True)
    entry = {"value": 0.75, "ci_low": 0.71, "ci_high": 0.78}
    report = {"n": 1277, "r2": entry, "mae": entry, "rmse": entry}
    (ef / "results.json").write_text(
        json.dumps(
            {
                "format": DOWNSTREAM_FORMAT,
                "config": {"train": str(root), "test": "/data/real", "epochs": 45},
                "train_videos": 2,
                "best_epoch": 30,
                "ci": "bootstrap",
                "results": {"test": {"all_clips": report, "one_clip": report}},
                "figures": {"scatter": "test_scatter.png", "bland_altman": "test_bland_altman.png"},
            }
        )
    )
    save_png(ef / "test_scatter.png", scatter_png(y, y + 1, "SCATTER"))
    assert main_report([str(root)]) == 0
    md = (root / "report.md").read_text()
    for needle in (
        "| FID | 28.81 |",
        "| FVD16 | 103.5 |",
        "| threshold | 0.8123 |",
        "| kept | 3 |",
        "| TRAIN | 2 |",
        "| seed | 7 |",
        "0.750 (0.710–0.780)",
        "![privacy_histogram.png](privacy_histogram.png)",
        "![Predicted vs actual EF](evaluation/ef/test_scatter.png)",
    ):
        assert needle in md, needle
    assert "scores" not in md and "nested" not in md  # only top-level scalars
    html = (root / "report.html").read_text()
    encoded = base64.b64encode((ef / "test_scatter.png").read_bytes()).decode()
    assert f"data:image/png;base64,{encoded}" in html and "&lt;" not in md
    assert capsys.readouterr().out.split() == [str(root / "report.md"), str(root / "report.html")]


def test_report_lists_missing_parts(tmp_path):
    root = _dataset(tmp_path / "d")
    assert main_report([str(root), "--format", "md", "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "echofast metrics compute" in md
    hint = f"echofast evaluate ef --train {root} --test REAL --out {root / 'evaluation' / 'ef'}`"
    assert hint in md
    assert "No privacy_report.json" in md and not (tmp_path / "r" / "report.html").exists()
    (root / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match="metrics.json"):
        main_report([str(root)])
    with pytest.raises(ReportError, match="no such dataset"):
        main_report([str(tmp_path / "missing")])


def test_ef_summary_skips_rows_without_ef(tmp_path):
    root = tmp_path / "d"
    efs = [30.0, 50.0, "", "n/a"]
    write_filelist(
        root, [{"FileName": f"v{i}", "EF": ef, "Split": "TRAIN"} for i, ef in enumerate(efs)]
    )
    assert main_report([str(root), "--format", "md", "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "EF (%): min 30.0, mean 40.0, max 50.0." in md and "| all | 4 |" in md


def test_format_names_match_the_writers():
    from echofast.eval.downstream import RESULTS_FORMAT
    from echofast.eval.fidelity import METRICS_FORMAT as WRITTEN_METRICS
    from echofast.privacy.report import REPORT_FORMAT

    assert (METRICS_FORMAT, DOWNSTREAM_FORMAT, PRIVACY_FORMAT) == (
        WRITTEN_METRICS,
        RESULTS_FORMAT,
        REPORT_FORMAT,
    )


@pytest.mark.parametrize("option", ["--metrics", "--downstream", "--privacy"])
@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", "null"])
def test_json_that_is_not_an_object_is_refused(tmp_path, option, content):
    root = _dataset(tmp_path / "d")
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ReportError, match=f"{bad}: holds a JSON .*, not an object"):
        main_report([str(root), option, str(bad)])
    assert not (root / "report.md").exists() and not (root / "report.html").exists()


@pytest.mark.parametrize("option", ["--metrics", "--downstream", "--privacy"])
def test_named_files_must_exist(tmp_path, option):
    root = _dataset(tmp_path / "d")
    missing = tmp_path / "nothere.json"
    with pytest.raises(ReportError, match=f"{missing} \\(given as {option}\\) does not exist"):
        main_report([str(root), option, str(missing)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=f"given as {option}"):
        main_report([str(root), option, str(empty)])
    assert not (root / "report.md").exists()


def test_files_of_another_kind_are_refused(tmp_path):
    root = _dataset(tmp_path / "d")
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps({"format": METRICS_FORMAT, "metrics": {"fid": 1.0}}))
    with pytest.raises(ReportError, match=f"{metrics}: format 'echofast-metrics', not "):
        main_report([str(root), "--downstream", str(metrics)])
    with pytest.raises(ReportError, match=f"{metrics}: format"):
        main_report([str(root), "--privacy", str(metrics)])
    (root / "privacy_report.json").write_text(json.dumps({"kept": 3}))  # a default, no format
    with pytest.raises(ReportError, match="privacy_report.json: format None"):
        main_report([str(root)])
    assert not (root / "report.md").exists()


def test_malformed_contents_are_named(tmp_path):
    root = _dataset(tmp_path / "d")
    res = tmp_path / "results.json"
    res.write_text(
        json.dumps({"format": DOWNSTREAM_FORMAT, "results": {"test": {"all_clips": {"n": 3}}}})
    )
    with pytest.raises(ReportError, match=f"{res}: malformed downstream results .*KeyError"):
        main_report([str(root), "--downstream", str(tmp_path)])
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"format": METRICS_FORMAT, "metrics": [1]}))
    with pytest.raises(ReportError, match=f"{metrics}: malformed fidelity metrics"):
        main_report([str(root), "--metrics", str(metrics)])


def _md(root, *args):
    """report.md of ``root`` written alone into ``root/r``."""
    assert main_report([str(root), "--format", "md", "--out", str(root / "r"), *args]) == 0
    return (root / "r" / "report.md").read_text()


def test_split_counts_are_case_blind_sorted_and_name_a_missing_split(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    rows = ["train,192,32", "TRAIN,128,50", "val,64,25", ",48,30", "TEST,32,20"]
    (root / "FileList.csv").write_text(
        "FileName,Split,NumberOfFrames,FPS\n"
        + "".join(f"v{i},{row}\n" for i, row in enumerate(rows))
    )
    md = _md(root)
    table = "| split | videos |\n|---|---|\n| ? | 1 |\n| TEST | 1 |\n| TRAIN | 2 |\n| VAL | 1 |\n"
    assert table + "| all | 5 |" in md
    assert "Frames per video: 128, 192, 32, 48, 64; FPS: 20, 25, 30, 32, 50." in md
    assert "EF (%)" not in md


def test_frames_without_fps_are_still_summarised(tmp_path):
    root = tmp_path / "d"
    write_filelist(root, [{"FileName": "v", "NumberOfFrames": 96, "Split": "TRAIN"}])
    assert "Frames per video: 96; FPS: ." in _md(root)


def test_generation_arguments_sorted_with_json_values_and_run_facts(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    manifest = {
        "arguments": {"steps": 64, "ef": [None, True], "seed": 7, "mode": {"a": "x"}},
        "echofast_version": "9.9",
        "weights_root": "/w",
        "seed_rule": "per-video",
    }
    (root / "generation.json").write_text(json.dumps(manifest))
    rows = [line for line in _md(root).splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "| ef | [null, true] |",
        '| mode | {"a": "x"} |',
        "| seed | 7 |",
        "| steps | 64 |",
        "| echofast_version | 9.9 |",
        "| weights_root | /w |",
        "| seed_rule | per-video |",
    ]


def test_privacy_fields_keep_empty_values_escape_pipes_and_sort_figures(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    report = {"format": PRIVACY_FORMAT, "auc": None, "note": "a|b", "passed": True}
    (root / "privacy_report.json").write_text(json.dumps(report))
    names = ["d.png", "b.png", "e.png", "a.png", "c.png"]
    for name in names:
        save_png(root / name, scatter_png(np.arange(3.0), np.arange(3.0), name))
    md = _md(root)
    assert "| auc |  |\n| note | a\\|b |\n| passed | True |" in md
    figures = [line for line in md.splitlines() if line.startswith("![")]
    assert figures == [f"![{n}](../{n})" for n in sorted(names)]


def _metrics(path, **extra):
    path.write_text(json.dumps({"format": METRICS_FORMAT, "metrics": {"fvd128": 300.0}, **extra}))
    return path


def test_metrics_name_fvd128_and_list_only_generated_clip_counts(tmp_path):
    root = _dataset(tmp_path / "d")
    counts = {"fid_images": 10, "fvd16_videos": 4, "fvd16_videos_reference": 8}
    md = _md(_dataset(root), "--metrics", str(_metrics(tmp_path / "m.json", counts=counts)))
    assert "| FVD128 | 300 |" in md
    assert "Generated frames for FID/IS: 10; FVD clips: fvd16_videos=4." in md
    md = _md(root, "--metrics", str(_metrics(tmp_path / "m.json")))
    assert "Reference: ? (?, ? frames at ? fps, ? videos). Generated frames for FID/IS: -; " in md
    skipped = {"is": "3 generated frame(s), fewer than the 10 IS splits (--is-splits)"}
    md = _md(root, "--metrics", str(_metrics(tmp_path / "m.json", not_computed=skipped)))
    assert "| IS | not computed: 3 generated frame(s), fewer than the 10 IS splits" in md


def test_metrics_name_the_dataset_they_were_computed_on(tmp_path):
    """Metrics of another folder (``--metrics``, or a copied metrics.json) are said to be so."""
    root = _dataset(tmp_path / "d")
    other = _dataset(tmp_path / "other")
    _metrics(root / "metrics.json", dataset=str(root.resolve()), split="ALL")
    md = _md(root)
    assert f"Computed on {root.resolve()} (ALL rows). Reference:" in md
    _metrics(tmp_path / "m.json", dataset=str(other.resolve()), split="TRAIN")
    md = _md(root, "--metrics", str(tmp_path / "m.json"))
    assert (
        f"Computed on {other.resolve()} (TRAIN rows), not on this report's dataset "
        f"{root.resolve()}. Reference:"
    ) in md


def _results(path, results, **extra):
    path.write_text(json.dumps({"format": DOWNSTREAM_FORMAT, "results": results, **extra}))
    return path


def test_downstream_rows_per_clip_mode_and_default_interval(tmp_path):
    root = _dataset(tmp_path / "d")

    def entry(v):
        return {
            "n": 5,
            **{k: {"value": v, "ci_low": v, "ci_high": v} for k in ("r2", "mae", "rmse")},
        }

    res = {
        "val": {"one_clip": entry(0.5)},
        "test": {"all_clips": entry(0.25), "one_clip": entry(1)},
    }
    md = _md(root, "--downstream", str(_results(tmp_path / "res.json", res)))
    rows = [
        line for line in md.splitlines() if line.startswith("| val") or line.startswith("| test")
    ]
    assert [r.split(" | ")[:4] for r in rows] == [
        ["| val", "one clip", "5", "0.500 (0.500–0.500)"],
        ["| test", "all clips", "5", "0.250 (0.250–0.250)"],
        ["| test", "one clip", "5", "1.000 (1.000–1.000)"],
    ]
    assert "| split | clips | videos | R² | MAE | RMSE |\n|---|---|---|---|---|---|" in md
    assert "Intervals: bootstrap." in md


@pytest.mark.parametrize(
    "results",
    [[1], {"test": {"all_clips": {"n": 1, "r2": {"value": "x", "ci_low": 0, "ci_high": 0}}}}],
    ids=["list", "text-value"],
)
def test_malformed_downstream_values_are_named(tmp_path, results):
    root = _dataset(tmp_path / "d")
    res = _results(tmp_path / "res.json", results)
    with pytest.raises(ReportError, match=f"{res}: malformed downstream results"):
        main_report([str(root), "--downstream", str(res)])


@pytest.mark.parametrize("option", ["--metrics", "--privacy"])
def test_a_folder_given_as_a_file_is_named_as_a_folder(tmp_path, option):
    root = _dataset(tmp_path / "d")
    with pytest.raises(ReportError, match=f"{tmp_path} \\(given as {option}\\) is a folder"):
        main_report([str(root), option, str(tmp_path)])


def test_html_escapes_names_and_values_and_ends_with_a_newline(tmp_path, capsys):
    root = tmp_path / "a<b>&c"
    root.mkdir()
    (root / "sub").mkdir()
    report = {"format": PRIVACY_FORMAT, "note": "<i>x</i>"}
    (root / "privacy_report.json").write_text(json.dumps(report))
    assert main_report([str(root / "sub" / ".."), "--format", "html"]) == 0
    assert capsys.readouterr().out.split() == [str(root / "sub" / ".." / "report.html")]
    assert not (root / "report.md").exists()
    page = (root / "report.html").read_text()
    assert "<title>EchoNet-Synthetic dataset report: a&lt;b&gt;&amp;c</title>" in page
    assert "<td>&lt;i&gt;x&lt;/i&gt;</td>" in page and "<i>" not in page
    assert "a<b>" not in page and page.endswith("</body></html>\n")


@pytest.mark.parametrize("fmt", ["pdf", "md,pdf", " , "])
def test_unknown_formats_are_refused(tmp_path, fmt):
    root = _dataset(tmp_path / "d")
    with pytest.raises(ValueError, match="--format must list md and/or html"):
        main_report([str(root), "--format", fmt])
    assert not (root / "report.md").exists()


def test_a_filelist_that_is_not_text_is_named(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "FileList.csv").write_bytes(b"FileName,Split\n\xff\xfe\x00,TRAIN\n")
    with pytest.raises(ReportError, match="FileList.csv: not a readable CSV file"):
        main_report([str(root)])
