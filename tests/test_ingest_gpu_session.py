"""bench/ingest_gpu_session.py: a GPU session's archives (one per device call, in order) taken
into a tree: new CSV rows appended once, logs into the card's folder, the tuned table checked;
a bad archive changes nothing. The last test feeds it what gpu_session.sh itself packs."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ingest_gpu_session as ingest  # noqa: E402

CARD = "nvidia-h100-80gb-hbm3"
FIELDS = ["card", "git_sha", "path", "median_ms"]
COMMITTED = [
    {"card": "NVIDIA H100", "git_sha": "aaa", "path": "unet/echofast", "median_ms": "16.69"},
    {"card": "NVIDIA H100", "git_sha": "aaa", "path": "unet/diffusers", "median_ms": "41.3"},
]
ENTRY = {
    "arch": "sm_90",
    "dtype": "float16",
    "k": 128,
    "n": 512,
    "m": 81920,
    "config": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    "median_us": 90.5,
    "default_us": 120.25,
}


def _csv_text(fields, rows):
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _table(*entries):
    return json.dumps({"format": 1, "note": "test", "entries": list(entries)}, indent=1) + "\n"


def _archive(path: Path, members: dict[str, str | bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _tree(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "kernels").mkdir()
    (repo / f"bench/results/echofast_bench_{CARD}.csv").write_text(_csv_text(FIELDS, COMMITTED))
    (repo / "kernels/geglu_linear_tuned.json").write_text(_table())
    logs = repo / f"bench/results/logs_{CARD}"
    logs.mkdir()
    (logs / "tests_gpu.log.gz").write_bytes(gzip.compress(b"an earlier session's tests\n"))
    return repo


def _snapshot(repo: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _kernels_available():
    try:
        import echofast.kernels.geglu_linear  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the tuned table is checked by echofast.kernels.geglu_linear: {e}")


def test_two_calls_are_taken_in_once_each(tmp_path, capsys):
    _kernels_available()
    repo = _tree(tmp_path)
    csv_name = f"bench/results/echofast_bench_{CARD}.csv"
    first_new = [
        {"card": "NVIDIA H100", "git_sha": "bbb", "path": "unet/echofast", "median_ms": "15.1"},
        {"card": "NVIDIA H100", "git_sha": "bbb", "path": "unet/diffusers", "median_ms": "41.0"},
    ]
    # the second call starts from a fresh copy of the tree: the committed rows, then its own,
    # with a column the file did not have
    second_new = [{**first_new[0], "median_ms": "7.5", "batch": "8"}]
    big_log = b"x" * (ingest.GZIP_ABOVE + 1)
    first = _archive(
        tmp_path / "1.tar.gz",
        {
            csv_name: _csv_text(FIELDS, COMMITTED + first_new),
            f"bench/results/geglu_tune_{CARD}.csv": _csv_text(
                ["card", "m"], [{"card": "H", "m": "5"}]
            ),
            "logs/build.log": "built\n",
            "logs/bench_b1.log": "first call\n",
            "kernels/geglu_linear_tuned.json": _table(ENTRY),
        },
    )
    second = _archive(
        tmp_path / "2.tar.gz",
        {
            csv_name: _csv_text([*FIELDS, "batch"], COMMITTED + second_new),
            "logs/bench_b1.log": "second call\n",
            "logs/tests_gpu.log": big_log,
            "logs/tests_gpu.xml": "<junit/>",
            "kernels/geglu_linear_tuned.json": _table(ENTRY),
        },
    )
    assert ingest.main([str(first), str(second), "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    rows = _rows(repo / csv_name)
    assert rows[:2] == [{**r, "batch": ""} for r in COMMITTED]
    assert rows[2:] == [{**r, "batch": ""} for r in first_new] + second_new
    assert f"{csv_name}: +3 rows (2 already there)" in out
    assert len(_rows(repo / f"bench/results/geglu_tune_{CARD}.csv")) == 1
    logs = repo / f"bench/results/logs_{CARD}"
    assert (logs / "bench_b1.log").read_text() == "second call\n"  # the later call's
    assert (logs / "build.log").read_text() == "built\n"
    assert gzip.decompress((logs / "tests_gpu.log.gz").read_bytes()) == big_log
    assert not (logs / "tests_gpu.xml").exists()
    table = json.loads((repo / "kernels/geglu_linear_tuned.json").read_text())
    assert table["entries"] == [ENTRY]
    assert "+ sm_90 float16 K=128 N=512 M=81920" in out and "90.5 us vs 120.25 us" in out
    assert "left out logs/tests_gpu.xml" in out
    assert not list(repo.rglob("*.ingest-tmp"))

    # taking the same archives in again adds nothing
    before = _snapshot(repo)
    assert ingest.main([str(first), str(second), "--repo", str(repo)]) == 0
    assert f"{csv_name}: +0 rows (5 already there)" in capsys.readouterr().out
    assert _snapshot(repo) == before


def test_a_small_log_replaces_the_gzipped_one_of_an_earlier_session(tmp_path):
    repo = _tree(tmp_path)
    archive = _archive(tmp_path / "a.tar.gz", {"logs/tests_gpu.log": "short\n"})
    assert ingest.main([str(archive), "--repo", str(repo), "--card", CARD]) == 0
    logs = repo / f"bench/results/logs_{CARD}"
    assert (logs / "tests_gpu.log").read_text() == "short\n"
    assert not (logs / "tests_gpu.log.gz").exists()


def test_dry_run_writes_nothing(tmp_path, capsys):
    repo = _tree(tmp_path)
    before = _snapshot(repo)
    new = {**COMMITTED[0], "git_sha": "ccc"}
    archive = _archive(
        tmp_path / "a.tar.gz",
        {f"bench/results/echofast_bench_{CARD}.csv": _csv_text(FIELDS, COMMITTED + [new])},
    )
    assert ingest.main([str(archive), "--repo", str(repo), "--dry-run"]) == 0
    assert "+1 rows" in capsys.readouterr().out
    assert _snapshot(repo) == before


@pytest.mark.parametrize(
    "members, message",
    [
        ({"../outside.csv": "card\nx\n"}, "points outside the tree"),
        ({"/etc/results.csv": "card\nx\n"}, "points outside the tree"),
        ({f"bench/results/x_{CARD}.csv": ""}, "without a header"),
        ({f"bench/results/x_{CARD}.csv": "card\na,b\n"}, "more values than the header"),
        ({f"bench/results/x_{CARD}.csv": b"card\n\xff\xfe\n"}, "not a readable CSV"),
        ({"kernels/geglu_linear_tuned.json": "{not json"}, "not a readable JSON tile table"),
        (
            {"kernels/geglu_linear_tuned.json": _table({**ENTRY, "config": {"BLOCK_M": 96}})},
            "geglu_linear_tuned.json",
        ),
        (
            {
                "bench/results/a_card-one.csv": "card\nx\n",
                "bench/results/b_card-two.csv": "card\ny\n",
                "logs/build.log": "built\n",
            },
            "several cards",
        ),
    ],
)
def test_a_bad_archive_changes_nothing(tmp_path, capsys, members, message):
    if "kernels/geglu_linear_tuned.json" in members:
        _kernels_available()
    repo = _tree(tmp_path)
    before = _snapshot(repo)
    good = _archive(
        tmp_path / "good.tar.gz",
        {
            f"bench/results/echofast_bench_{CARD}.csv": _csv_text(
                FIELDS, [{**COMMITTED[0], "git_sha": "d"}]
            )
        },
    )
    bad = _archive(tmp_path / "bad.tar.gz", members)
    assert ingest.main([str(good), str(bad), "--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "card" not in message:  # the per-archive errors name the archive
        assert str(bad) in err
    assert _snapshot(repo) == before


def test_logs_without_a_card_are_refused(tmp_path, capsys):
    repo = _tree(tmp_path)
    before = _snapshot(repo)
    archive = _archive(tmp_path / "a.tar.gz", {"logs/build.log": "built\n"})
    assert ingest.main([str(archive), "--repo", str(repo)]) == 2
    assert "--card" in capsys.readouterr().err
    assert _snapshot(repo) == before


def test_what_is_not_a_tar_archive_is_named(tmp_path, capsys):
    repo = _tree(tmp_path)
    truncated = tmp_path / "cut.tar.gz"
    whole = _archive(tmp_path / "whole.tar.gz", {"logs/a.log": "x" * 5000})
    truncated.write_bytes(whole.read_bytes()[:40])
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n")
    for path in (text, truncated, tmp_path / "missing.tar.gz"):
        assert ingest.main([str(path), "--repo", str(repo), "--card", CARD]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "archive" in err


def test_links_in_an_archive_are_refused(tmp_path, capsys):
    path = tmp_path / "link.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("logs/build.log")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    assert ingest.main([str(path), "--repo", str(_tree(tmp_path)), "--card", CARD]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_card_of_results_names():
    names = [f"bench/results/echofast_bench_{CARD}.csv", f"bench/results/x_{CARD}.partial.csv"]
    assert ingest.card_of(names) == CARD
    assert ingest.card_of([]) is None


def test_table_changes_name_each_site():
    other = {**ENTRY, "config": {**ENTRY["config"], "num_warps": 8}}
    key = ("sm_90", "float16", 128, 512, 81920)
    gone = ("sm_90", "bfloat16", 256, 1024, 10240)
    lines = ingest.table_changes({key: ENTRY, gone: ENTRY}, {key: other})
    assert lines[0].startswith("  - sm_90 bfloat16 K=256 N=1024 M=10240")
    assert (
        lines[1].startswith("  ~ sm_90 float16 K=128 N=512 M=81920")
        and "'num_warps': 8" in lines[1]
    )
    assert ingest.table_changes({key: ENTRY}, {key: dict(ENTRY)}) == []


def _dry_session(tmp_path: Path, steps: str) -> Path:
    """The archive one dry-run call of gpu_session.sh packs (on CPU its card is 'cpu')."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "GPU_SESSION_STATE": str(tmp_path / "state"),
        "OUT": str(tmp_path / "out"),
        "GPU_SESSION_DRY_RUN": "1",
        "GPU_SESSION_POLL_S": "1",
        "GPU_SESSION_STEPS": steps,
    }
    script = Path(ingest.REPO) / "bench" / "gpu_session.sh"
    done = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return tmp_path / "out" / "gpu_session_results.tar.gz"


def test_what_gpu_session_packs_is_taken_in(tmp_path):
    """gpu_session.sh packs logs and, once geglu_tune has run, the tuned table; the ingester
    reads exactly that layout."""
    _kernels_available()
    archive = _dry_session(tmp_path, "build geglu_tune bench_b1")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"logs/geglu_tune.log", "logs/bench_b1.log", "kernels/geglu_linear_tuned.json"} <= names
    repo = _tree(tmp_path)
    assert ingest.main([str(archive), "--repo", str(repo), "--card", "cpu"]) == 0
    assert (repo / "bench/results/logs_cpu/bench_b1.log").is_file()


def test_a_call_before_geglu_tune_ran_packs_no_table(tmp_path):
    """The tree's committed table is not what geglu_tune wrote: a call on a machine where the
    step has not run packs none, so it cannot undo an earlier call's table."""
    with tarfile.open(_dry_session(tmp_path, "build bench_b1")) as tar:
        assert "kernels/geglu_linear_tuned.json" not in tar.getnames()
