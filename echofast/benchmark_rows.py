"""Rows of ``echofast bench``: the CSV columns, appending and reading CSVs, the journal that
keeps a run's rows on disk as they are measured, ``--compare`` and the printed tables."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import EchofastError

#: The CSV columns, in order ("run": one id per ``echofast bench`` invocation).
CSV_FIELDS = [
    "timestamp",
    "run",
    "card",
    "device",
    "torch",
    "triton",
    "cuda",
    "diffusers",
    "echofast",
    "git_sha",
    "config",
    "dtype",
    "frames",
    "steps",
    "batch",
    "path",
    "phase",
    "repeats",
    "median_s",
    "p20_s",
    "p80_s",
    "s_per_video",
    "frames_per_s",
    "videos_per_s",
    "gflop",
    "tflops",
    "gemm_tflops",
    "gemm_fraction",
    "peak_mem_mib",
    "kernels",
    "speedup_vs_reference",
    "speedup_vs_compiled",
    "note",
]

#: Row identity for ``--compare`` (besides the card).
COMPARE_KEY = ("config", "dtype", "frames", "steps", "batch", "path", "phase")


def add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_reference`` / ``speedup_vs_compiled`` on echofast's rows, per batch and phase
    (baseline median / echofast median)."""
    med = {
        (str(r["batch"]), r["path"], r["phase"]): float(r["median_s"])
        for r in rows
        if r["median_s"] != ""
    }
    pairs = {
        "pipeline/echofast": ("pipeline/reference", "pipeline/reference+compile"),
        "unet/echofast": ("unet/diffusers", "unet/diffusers+compile"),
    }
    for r in rows:
        # every echofast variant (+compile, +graphs, +decode-float16, ...) against the baselines
        family = str(r["path"]).split("+")[0]
        if family not in pairs or r["median_s"] == "":
            continue
        ref, comp = pairs[family]
        for col, base in (("speedup_vs_reference", ref), ("speedup_vs_compiled", comp)):
            other = med.get((str(r["batch"]), base, r["phase"]))
            if other:
                r[col] = other / float(r["median_s"])


# ---- CSV and comparison ------------------------------------------------------------------------


def check_csv(path: Path) -> bool:
    """Whether ``path`` exists with echofast's header (False: absent or empty). A file with another
    header raises, so that a run fails before it measures, not when it writes."""
    if path.is_dir():  # (first: some file systems give an empty directory st_size 0)
        raise EchofastError(f"{path}: is a directory, not a CSV file")
    if not (path.exists() and path.stat().st_size):
        return False
    try:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise EchofastError(f"{path}: existing file is not a readable CSV ({err})") from err
    if header != CSV_FIELDS:
        raise EchofastError(
            f"{path}: existing CSV has other columns ({len(header)}, expected {len(CSV_FIELDS)}); "
            "not appending — write to a new file with --out"
        )
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        complete = fh.read(1) == b"\n"
    if not complete:
        raise EchofastError(
            f"{path}: last line is incomplete (a run stopped while writing?); not appending — "
            "repair the file or write to a new file with --out"
        )
    return True


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` (``CSV_FIELDS`` columns) to ``path``, writing the header when it is new.

    A file whose header differs is refused (never rewritten): pass another ``--out``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not check_csv(path)
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in CSV_FIELDS})
        fh.flush()
        os.fsync(fh.fileno())


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of an earlier ``echofast bench`` CSV (a missing or foreign file raises)."""
    if path.is_dir():
        raise EchofastError(f"{path}: is a directory, not a CSV file")
    if not path.is_file():
        raise EchofastError(f"{path}: CSV file does not exist")
    if not path.stat().st_size:
        raise EchofastError(f"{path}: empty file, not an echofast bench CSV")
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [
                k for k in ("card", "median_s", *COMPARE_KEY) if k not in (reader.fieldnames or [])
            ]
            if missing:
                raise EchofastError(f"{path}: not an echofast bench CSV (no column(s) {missing})")
            return [_checked_row(path, reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise EchofastError(f"{path}: not a readable CSV ({err})") from err


def _checked_row(path: Path, line: int, row: dict[str, str]) -> dict[str, str]:
    """``row`` (read at ``line`` of ``path``) if it has every column and a numeric median."""
    if None in row or None in row.values():
        raise EchofastError(
            f"{path}, line {line}: malformed row (not as many fields as the header's columns)"
        )
    median = row["median_s"]
    try:
        if median != "":
            float(median)
    except ValueError:
        raise EchofastError(f"{path}, line {line}: median_s {median!r} is not a number") from None
    return row


def journal_path(out: Path) -> Path:
    """Where a run appending to ``out`` keeps its rows while it measures."""
    return out.with_name(out.stem + ".partial.csv")


class RowJournal:
    """A run's rows on disk as soon as they are measured.

    Each finished measurement is appended to ``journal_path(out)`` at once, so a run stopped part
    way (a time limit, a crash, ``kill -9``) keeps what it measured (``echofast bench --report``
    prints it). ``finish`` appends the run's complete rows, ratios included, to ``out`` and takes
    this run's rows out of the journal, which is removed when no other run's rows are left in it.
    Both files are checked when the journal is made: a foreign CSV fails the run before it
    measures. ``out=None`` keeps nothing (``--no-csv``)."""

    def __init__(self, out: Path | None, run: str):
        self.out, self.run = out, run
        self.path = None if out is None else journal_path(out)
        if out is not None and self.path is not None:
            check_csv(out)
            check_csv(self.path)

    def add(self, rows: Sequence[dict]) -> None:
        if self.path is not None and rows:
            append_csv(self.path, list(rows))

    def finish(self, rows: list[dict]) -> None:
        if self.out is None or self.path is None:
            return
        if rows:
            append_csv(self.out, rows)
        if not self.path.exists():
            return
        others = [r for r in read_csv(self.path) if r.get("run") != self.run]
        if not others:
            self.path.unlink()
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        append_csv(tmp, others)
        os.replace(tmp, self.path)


#: path prefix of the ceiling rows, measured in their own precision (bf16 on a GPU, fp32 on CPU)
CEILING_PATH = "gemm/"


def run_dtype(rows: Sequence[dict]) -> str:
    """The sampling precision of a run's rows (the ceiling's own aside; several joined by "/";
    "dtype not recorded" for a run that recorded nothing else)."""
    dtypes = sorted({str(r["dtype"]) for r in rows if not str(r["path"]).startswith(CEILING_PATH)})
    return "/".join(dtypes) or "dtype not recorded"


def report(path: Path) -> str:
    """The summary table of every run in an ``echofast bench`` CSV (a results file or a journal
    left by a stopped run), ratios computed from the rows of the same run."""
    runs: dict[str, list[dict]] = {}
    for row in read_csv(path):
        runs.setdefault(row.get("run") or f"git {row.get('git_sha', '?')}", []).append(dict(row))
    if not runs:
        return f"{path}: no rows"
    out = []
    for run, rows in runs.items():
        add_ratios(rows)
        first = rows[0]
        out.append(
            f"run {run} | {first['card']} | git {first.get('git_sha', '?')} | config "
            f"{first['config']}: {first['frames']} frames x {first['steps']} steps, "
            f"{run_dtype(rows)} | {len(rows)} rows"
        )
        out.append(summary_table(rows))
        out.append("")
    return "\n".join(out).rstrip()


#: path prefixes of the rows that measure other code than echofast's
BASELINE_PATHS = (CEILING_PATH, "pipeline/reference", "unet/diffusers")


def is_baseline(path: str) -> bool:
    """Whether a row's path is a baseline (the GEMM ceiling, the reference's way, diffusers)."""
    return path.startswith(BASELINE_PATHS)


def is_host_paced(row: dict) -> bool:
    """Whether a GPU row's time is set by the host rather than the GPU: the AVI writing (FFmpeg
    on the CPU) and UNet calls launched eagerly (no CUDA graph: hundreds of launches per call).
    Between two machines of one kind these varied by 20-100 % for the same code (H100 leases of
    2026-11-26/27: AVI 17 -> 25 ms per video, echofast's eager call 68 -> 164 ms)."""
    if row.get("device") != "cuda":
        return False
    path = str(row["path"])
    return row["phase"] == "avi" or (path.startswith("unet/") and "+graphs" not in path)


def compare(
    new_rows: list[dict], old_rows: list[dict[str, str]], threshold_pct: float
) -> tuple[list[str], list[str]]:
    """(report lines, regressions): each new timing row against the latest old row with the same
    card and key; a regression is a median more than ``threshold_pct`` percent slower. Baseline
    rows (the GEMM ceiling, the reference's way, diffusers' UNets: not echofast's code, and their
    host-bound eager timings vary by 10-15 % between machines of one kind) are reported, labelled
    ``baseline`` when slower, but never flagged; so are echofast's host-paced GPU rows
    (:func:`is_host_paced`), labelled ``host``."""

    def key(r: dict) -> tuple:
        return (str(r["card"]), *(str(r[k]) for k in COMPARE_KEY))

    old = {key(r): r for r in old_rows if r.get("median_s")}
    lines, regressions = [], []
    for r in new_rows:
        if r.get("median_s") in ("", None):
            continue
        o = old.get(key(r))
        if o is None:
            continue
        before, after = float(o["median_s"]), float(r["median_s"])
        change = 100 * (after / before - 1) if before > 0 else 0.0
        slower = change > threshold_pct
        baseline, host = is_baseline(str(r["path"])), is_host_paced(r)
        flag = slower and not (baseline or host)
        label = "REGRESSION" if flag else "ok" if not slower else "baseline" if baseline else "host"
        line = (
            f"{label:<10} b={r['batch']} {r['path']} {r['phase']}: "
            f"{before:.4g} s -> {after:.4g} s ({change:+.1f}%, {o.get('git_sha', '?')} -> "
            f"{r.get('git_sha', '?')})"
        )
        lines.append(line)
        if flag:
            regressions.append(line)
    return lines, regressions


# ---- report ------------------------------------------------------------------------------------


def _g(value: Any, spec: str = ".3g") -> str:
    return "-" if value in ("", None) else format(float(value), spec)


def _cells(row: dict, columns: Sequence[tuple[str, str, int]]) -> str:
    """One table line: ``(column, format spec, width)`` per cell; "-" where a value is absent."""
    cells = []
    for col, spec, width in columns:
        value = row.get(col, "")
        if spec in ("s", "i"):
            text = "-" if value == "" else str(value)
        elif col == "gemm_fraction" and value != "":
            text = f"{100 * float(value):.1f}%"
        elif col == "median_s" and spec == "ms" and value not in ("", None):
            text = f"{1e3 * float(value):.3f}"
        else:
            text = _g(value, spec)
        cells.append(text.ljust(width) if spec == "s" else text.rjust(width))
    return " ".join(cells)


_PIPELINE_COLUMNS = [
    ("batch", "s", 5),
    ("path", "s", 33),
    ("phase", "s", 10),
    ("s_per_video", ".4g", 9),
    ("p20_s", ".4g", 9),
    ("p80_s", ".4g", 9),
    ("frames_per_s", ".4g", 9),
    ("videos_per_s", ".3g", 8),
    ("tflops", ".3g", 8),
    ("peak_mem_mib", ".0f", 9),
    ("speedup_vs_reference", ".2f", 7),
    ("speedup_vs_compiled", ".2f", 7),
]
_CALL_COLUMNS = [
    ("batch", "s", 5),
    ("path", "s", 33),
    ("median_s", "ms", 9),
    ("tflops", ".3g", 8),
    ("gemm_fraction", "", 8),
    ("kernels", "i", 8),
    ("speedup_vs_reference", ".2f", 7),
    ("speedup_vs_compiled", ".2f", 7),
]
_PIPELINE_HEADER = {
    "batch": "batch",
    "path": "path",
    "phase": "phase",
    "s_per_video": "s/video",
    "p20_s": "p20",
    "p80_s": "p80",
    "frames_per_s": "frames/s",
    "videos_per_s": "videos/s",
    "tflops": "TFLOP/s",
    "peak_mem_mib": "peak MiB",
    "speedup_vs_reference": "vs ref",
    "speedup_vs_compiled": "vs comp",
}
_CALL_HEADER = {
    "batch": "batch",
    "path": "path (1 LVDM call)",
    "median_s": "ms/call",
    "tflops": "TFLOP/s",
    "gemm_fraction": "of GEMM",
    "kernels": "kernels",
    "speedup_vs_reference": "vs ref",
    "speedup_vs_compiled": "vs comp",
}


def _header(names: dict[str, str], columns: Sequence[tuple[str, str, int]]) -> str:
    return " ".join(
        names[c].ljust(w) if spec == "s" else names[c].rjust(w) for c, spec, w in columns
    )


def _per_video(row: dict) -> dict:
    """A pipeline row with p20/p80 per video (the CSV keeps seconds per batch)."""
    out = dict(row)
    for col in ("p20_s", "p80_s"):
        if out[col] != "":
            out[col] = float(out[col]) / int(out["batch"])
    return out


def summary_table(rows: list[dict]) -> str:
    """The table printed at the end of a run: pipelines (p20/p80 of the whole batch, s/video of the
    median), then single LVDM calls. Ratios are baseline median / echofast median."""
    pipe = [_per_video(r) for r in rows if r["path"].startswith("pipeline/")]
    calls = [r for r in rows if not r["path"].startswith("pipeline/")]
    out = []
    if pipe:
        out.append(_header(_PIPELINE_HEADER, _PIPELINE_COLUMNS))
        out.extend(_cells(r, _PIPELINE_COLUMNS) for r in pipe)
    if calls:
        out.append("")
        out.append(_header(_CALL_HEADER, _CALL_COLUMNS))
        out.extend(_cells(r, _CALL_COLUMNS) for r in calls)
    return "\n".join(out)
