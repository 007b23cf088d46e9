"""``generate``'s progress: the job's bar counts videos, and the LIDM's and LVDM's step bars run
under it (a job whose one batch is the whole job showed 0 % until it was done), cleared when done
so that a long job does not print two lines per batch; ``progress=False`` prints none."""

from __future__ import annotations

from echofast.pipelines.dataset import GenerateConfig, generate_dataset


def _run(weights_root, out, progress):
    cfg = GenerateConfig(
        weights=str(weights_root), out=str(out), num_videos=3, frames=8, fps=30.0, steps=2,
        seed=0, batch_size=2, progress=progress,
    )  # fmt: skip
    generate_dataset(cfg)


def test_step_bars_run_under_the_job_bar(weights_root, tmp_path, capsys):
    _run(weights_root, tmp_path / "ds", progress=True)
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    final = [line for line in lines if line.startswith("generate")]
    assert final and "3/3" in final[-1]
    # two batches (2 videos, then 1) of 2 steps: step bars of 4 and 2 steps, LIDM then LVDM
    for name in ("LIDM", "LVDM"):
        for total in (4, 2):
            assert any(line.startswith(f"{name}:") and f"/{total} " in line for line in lines)


def test_no_progress_prints_nothing(weights_root, tmp_path, capsys):
    _run(weights_root, tmp_path / "ds", progress=False)
    assert capsys.readouterr().err == ""
