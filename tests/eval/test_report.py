"""``echofast report``: gathers what exists, lists what is missing, embeds figures."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from echofast.data.echonet import write_filelist
from echofast.eval.report import ReportError, main_report
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
    assert "echofast metrics compute" in md and "echofast evaluate ef" in md
    assert "No privacy_report.json" in md and not (tmp_path / "r" / "report.html").exists()
    (root / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match="metrics.json"):
        main_report([str(root)])
    with pytest.raises(ReportError, match="no such dataset"):
        main_report([str(tmp_path / "missing")])
