"""``echofast report DATASET``: one shareable page about a synthetic dataset.

Gathers, when present: the dataset's FileList.csv (videos per split, EF range), the generation
manifest ``generation.json``, the privacy report ``privacy_report.json`` (its top-level scalar
fields, and every PNG in its folder), the fidelity metrics (``metrics.json`` from ``echofast
metrics compute``) and the downstream EF results (``results.json`` of ``echofast evaluate ef``,
with its scatter and Bland–Altman figures). Missing parts are listed with the command that makes
them; a file named explicitly (``--metrics``, ``--downstream``, ``--privacy``) must exist, and
every file read must be a JSON object of its kind (its ``format``), else :class:`ReportError`.
Writes ``report.md`` (figures linked by relative path) and ``report.html`` (figures
embedded, self-contained) into the dataset folder or ``--out``; a report is a derived view and is
rewritten on every run (atomically).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EchofastError
from ..fsutil import atomic_write_text

DEFAULT_DOWNSTREAM = Path("evaluation") / "ef" / "results.json"

METRICS_FORMAT = "echofast-metrics"
"""``format`` of ``echofast metrics compute``'s JSON (:data:`echofast.eval.fidelity
.METRICS_FORMAT`)."""
DOWNSTREAM_FORMAT = "echofast-ef-evaluation"
"""``format`` of ``echofast evaluate ef``'s results.json (:data:`echofast.eval.downstream
.RESULTS_FORMAT`)."""
PRIVACY_FORMAT = "echofast-privacy-report"
"""``format`` of a privacy report (:data:`echofast.privacy.report.REPORT_FORMAT`)."""
PRIVACY_WHAT = "a privacy report (privacy_report.json of echofast generate / privacy-filter)"
METRICS_WHAT = "fidelity metrics (the JSON of `echofast metrics compute`)"
DOWNSTREAM_WHAT = "downstream results (results.json of `echofast evaluate ef`, or its folder)"


class ReportError(EchofastError, ValueError):
    """The dataset folder is missing, or an input file is missing, not readable JSON, or not
    the kind of file expected."""


@dataclass(frozen=True)
class Input:
    """A JSON file a section reads: ``explicit`` when the user named it (then it must exist)."""

    path: Path
    explicit: bool = False


@dataclass
class Section:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    """("text", str) | ("table", (header, rows)) | ("image", (path, caption))."""

    def text(self, s: str) -> None:
        self.blocks.append(("text", s))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("image", (path, caption)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: not readable JSON ({err})") from None


def _read_input(src: Input, fmt: str, what: str, option: str) -> dict[str, Any] | None:
    """The JSON object of ``src``, or None when a default file does not exist. An explicitly
    named file that does not exist, or any file that is not a JSON object with ``format`` =
    ``fmt``, raises :class:`ReportError` naming the file."""
    if not src.path.is_file():
        if not src.explicit:
            return None
        problem = "is a folder" if src.path.is_dir() else "does not exist"
        raise ReportError(f"{src.path} (given as {option}) {problem}; expected {what}")
    data = _read_json(src.path)
    if not isinstance(data, dict):
        raise ReportError(
            f"{src.path}: holds a JSON {type(data).__name__}, not an object; expected {what}"
        )
    if data.get("format") != fmt:
        raise ReportError(
            f"{src.path}: format {data.get('format')!r}, not {fmt!r}; expected {what}"
        )
    return data


def _malformed(path: Path, what: str, err: Exception) -> ReportError:
    return ReportError(f"{path}: malformed {what} ({type(err).__name__}: {err})")


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _dataset_section(root: Path) -> Section:
    sec = Section("Dataset")
    path = root / "FileList.csv"
    if not path.is_file():
        sec.text(f"No FileList.csv in {root}.")
        return sec
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"{path}: not a readable CSV file ({err})") from None
    splits: dict[str, int] = {}
    efs = []
    for r in rows:
        key = (r.get("Split") or "").strip().upper() or "?"
        splits[key] = splits.get(key, 0) + 1
        try:
            efs.append(float(r.get("EF") or "nan"))
        except ValueError:
            continue
    efs = [e for e in efs if e == e]
    table = [[k, n] for k, n in sorted(splits.items())] + [["all", len(rows)]]
    sec.table(["split", "videos"], table)
    if efs:
        mean = sum(efs) / len(efs)
        sec.text(f"EF (%): min {min(efs):.1f}, mean {mean:.1f}, max {max(efs):.1f}.")
    frames = sorted({r.get("NumberOfFrames") for r in rows if r.get("NumberOfFrames")})
    fps = sorted({r.get("FPS") for r in rows if r.get("FPS")})
    if frames or fps:
        sec.text(f"Frames per video: {', '.join(frames[:6])}; FPS: {', '.join(fps[:6])}.")
    return sec


def _generation_section(root: Path) -> Section:
    sec = Section("Generation")
    path = root / "generation.json"
    if not path.is_file():
        sec.text("No generation.json (not made by `echofast generate`).")
        return sec
    man = _read_json(path)
    if not isinstance(man, dict):
        raise ReportError(f"{path}: not a JSON object (got {type(man).__name__})")
    args = man.get("arguments", {})
    if not isinstance(args, dict):
        raise ReportError(f"{path}: 'arguments' is not a JSON object (got {type(args).__name__})")
    rows = [[k, _fmt(v) if _scalar(v) else json.dumps(v)] for k, v in sorted(args.items())]
    for key in ("echofast_version", "weights_root", "seed_rule"):
        if key in man:
            rows.append([key, _fmt(man[key])])
    sec.table(["argument", "value"], rows)
    return sec


def _privacy_section(src: Input) -> Section:
    sec = Section("Privacy filter")
    data = _read_input(src, PRIVACY_FORMAT, PRIVACY_WHAT, "--privacy")
    if data is None:
        sec.text(f"No {src.path.name} (run the privacy filter).")
        return sec
    rows = [[k, _fmt(v)] for k, v in data.items() if _scalar(v)]
    if rows:
        sec.table(["field", "value"], rows)
    for png in sorted(src.path.parent.glob("*.png")):
        sec.image(png, png.name)
    return sec


def _metrics_section(src: Input, root: Path) -> Section:
    sec = Section("Fidelity metrics")
    data = _read_input(src, METRICS_FORMAT, METRICS_WHAT, "--metrics")
    if data is None:
        sec.text(f"No {src.path.name} (run `echofast metrics compute`).")
        return sec
    try:
        _metrics_blocks(sec, data, root)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise _malformed(src.path, METRICS_WHAT, err) from None
    return sec


def _metrics_blocks(sec: Section, data: dict[str, Any], root: Path) -> None:
    metrics = data.get("metrics", {})
    names = {
        "fid": "FID",
        "is_mean": "IS (mean)",
        "is_std": "IS (std)",
        "fvd16": "FVD16",
        "fvd128": "FVD128",
    }
    rows = [[names.get(k, k), _fmt(v)] for k, v in metrics.items()]
    rows += [[k.upper(), f"not computed: {why}"] for k, why in data.get("not_computed", {}).items()]
    sec.table(["metric", "value"], rows)
    ref = data.get("reference", {})
    counts = data.get("counts", {})
    dataset = data.get("dataset")
    where = f"Computed on {dataset or '?'} ({data.get('split', '?')} rows)"
    if dataset and Path(dataset) != root.resolve():
        where += f", not on this report's dataset {root.resolve()}"
    sec.text(
        f"{where}. Reference: {ref.get('dataset', '?')} ({ref.get('split', '?')}, "
        f"{ref.get('frames', '?')} frames at {ref.get('fps', '?')} fps, "
        f"{ref.get('videos', '?')} videos). Generated frames for FID/IS: "
        f"{counts.get('fid_images', '-')}; FVD clips: "
        + ", ".join(f"{k}={v}" for k, v in counts.items() if k.endswith("_videos"))
        + "."
    )


def _downstream_section(src: Input, root: Path) -> Section:
    sec = Section("Downstream EF regression")
    data = _read_input(src, DOWNSTREAM_FORMAT, DOWNSTREAM_WHAT, "--downstream")
    if data is None:
        sec.text(
            f"No {src.path} (run `echofast evaluate ef --train {root} --test REAL --out "
            f"{src.path.parent}`)."
        )
        return sec
    try:
        _downstream_blocks(sec, data, src.path)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise _malformed(src.path, DOWNSTREAM_WHAT, err) from None
    return sec


def _downstream_blocks(sec: Section, data: dict[str, Any], path: Path) -> None:
    cfg = data.get("config", {})
    rows = []
    for split, res in data.get("results", {}).items():
        for mode in ("all_clips", "one_clip"):
            r = res.get(mode)
            if not r:
                continue
            cells = [split, mode.replace("_", " "), r.get("n")]
            for k in ("r2", "mae", "rmse"):
                e = r[k]
                cells.append(f"{e['value']:.3f} ({e['ci_low']:.3f}–{e['ci_high']:.3f})")
            rows.append(cells)
    sec.text(
        f"R(2+1)D trained on {cfg.get('train', '?')} ({data.get('train_videos', '?')} videos, "
        f"{cfg.get('epochs', '?')} epochs, best epoch {data.get('best_epoch')}), tested on "
        f"{cfg.get('test', '?')}. Intervals: {data.get('ci', 'bootstrap')}."
    )
    sec.table(["split", "clips", "videos", "R²", "MAE", "RMSE"], rows)
    for key, caption in (("scatter", "Predicted vs actual EF"), ("bland_altman", "Bland–Altman")):
        name = data.get("figures", {}).get(key)
        if name and (path.parent / name).is_file():
            sec.image(path.parent / name, caption)


def build_sections(root: Path, metrics: Input, downstream: Input, privacy: Input) -> list[Section]:
    return [
        _dataset_section(root),
        _generation_section(root),
        _privacy_section(privacy),
        _metrics_section(metrics, root),
        _downstream_section(downstream, root),
    ]


def render_markdown(title: str, sections: list[Section], base: Path) -> str:
    out = [f"# {title}", "", f"_echofast {__version__}_", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for kind, value in sec.blocks:
            if kind == "text":
                out += [value, ""]
            elif kind == "table":
                header, rows = value
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += [
                    "| " + " | ".join(_fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows
                ]
                out.append("")
            else:
                path, caption = value
                rel = os.path.relpath(path, base).replace(os.sep, "/")
                out += [f"![{caption}]({rel})", ""]
    return "\n".join(out)


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:.2em .6em;text-align:left}img{max-width:100%}</style></head><body>",
        f"<h1>{e(title)}</h1><p><em>echofast {e(__version__)}</em></p>",
    ]
    for sec in sections:
        out.append(f"<h2>{e(sec.title)}</h2>")
        for kind, value in sec.blocks:
            if kind == "text":
                out.append(f"<p>{e(value)}</p>")
            elif kind == "table":
                header, rows = value
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
                for r in rows:
                    out.append("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>")
                out.append("</table>")
            else:
                path, caption = value
                data = base64.b64encode(Path(path).read_bytes()).decode()
                out.append(
                    f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(
    root: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    metrics: str | os.PathLike | None = None,
    downstream: str | os.PathLike | None = None,
    privacy: str | os.PathLike | None = None,
    formats: tuple[str, ...] = ("md", "html"),
) -> list[Path]:
    """Write the report(s); returns their paths."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such dataset folder")
    folder = Path(out) if out else root
    down = Path(downstream) if downstream else root / DEFAULT_DOWNSTREAM
    if down.is_dir():
        down = down / "results.json"
    sections = build_sections(
        root,
        Input(Path(metrics), True) if metrics else Input(root / "metrics.json"),
        Input(down, bool(downstream)),
        Input(Path(privacy), True) if privacy else Input(root / "privacy_report.json"),
    )
    title = f"EchoNet-Synthetic dataset report: {root.resolve().name}"
    written = []
    if "md" in formats:
        written.append(
            atomic_write_text(folder / "report.md", render_markdown(title, sections, folder))
        )
    if "html" in formats:
        written.append(atomic_write_text(folder / "report.html", render_html(title, sections)))
    return written


def main_report(argv: list[str]) -> int:
    """``echofast report DATASET``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="echofast report",
        description="Gather a dataset's generation manifest, privacy report, fidelity metrics "
        "and downstream EF results into report.md and a self-contained report.html.",
    )
    p.add_argument("dataset", help="dataset folder (EchoNet layout)")
    p.add_argument("--out", help="folder for report.md / report.html (default: DATASET)")
    p.add_argument("--metrics", help="metrics JSON (default DATASET/metrics.json)")
    p.add_argument(
        "--downstream",
        help=f"results.json of `echofast evaluate ef` or its folder (default "
        f"DATASET/{DEFAULT_DOWNSTREAM.as_posix()})",
    )
    p.add_argument("--privacy", help="privacy report JSON (default DATASET/privacy_report.json)")
    p.add_argument("--format", default="md,html", help="md, html or md,html (default both)")
    a = p.parse_args(argv)
    formats = tuple(f.strip() for f in a.format.split(",") if f.strip())
    if not formats or set(formats) - {"md", "html"}:
        raise ValueError(f"--format must list md and/or html, got {a.format!r}")
    paths = write_report(
        a.dataset,
        out=a.out,
        metrics=a.metrics,
        downstream=a.downstream,
        privacy=a.privacy,
        formats=formats,
    )
    for path in paths:
        print(path)
    return 0
