"""Take what GPU session calls brought back into the tree.

    python bench/ingest_gpu_session.py CALL1/gpu_session_results.tar.gz [CALL2/... ...]

Each archive is what one call of ``bench/gpu_session.sh`` left in ``$OUT``. Give every call's
archive, in the order the calls ran:

- ``bench/results/*.csv``: the rows not already in the tree's file of the same name are appended.
  A call's CSV is the committed file plus that call's rows, and a later call on the same machine
  starts from a fresh copy of the tree, so appending the new rows of each call, in order, keeps
  every row exactly once.
- ``logs/*.log``: copied to ``bench/results/logs_<card>/`` (gzip-compressed above 256 KiB), a later
  call's log of a step replacing an earlier one's. ``<card>`` is the slug in the CSV names
  (``--card`` when the archives hold no CSV).
- ``kernels/geglu_linear_tuned.json`` (the GEGLU GEMM's tiles, once ``geglu_tune`` has run): checked
  with the launcher's own reader, then written over the tree's table; the entries it adds, changes
  or drops are printed.

Every archive is read and checked before anything is written, and each file is written to a
temporary name first and then renamed: a bad archive leaves the tree as it was. ``--dry-run``
prints what would change.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
TABLE = "kernels/geglu_linear_tuned.json"
GZIP_ABOVE = 256 * 1024


class IngestError(Exception):
    """An archive that cannot be taken in; the message names the archive and the member."""


@dataclass
class Archive:
    """The members of one call's archive that are taken in, by kind."""

    path: Path
    csvs: dict[str, tuple[list[str], list[dict]]] = field(default_factory=dict)
    logs: dict[str, bytes] = field(default_factory=dict)
    table: bytes | None = None
    ignored: list[str] = field(default_factory=list)


def _member_path(archive: Path, name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise IngestError(f"{archive}: member {name!r} points outside the tree")
    return PurePosixPath(*[p for p in path.parts if p != "."])


def _parse_csv(archive: Path, name: str, data: bytes) -> tuple[list[str], list[dict]]:
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise IngestError(f"{archive}: {name}: not a readable CSV file: {e}") from None
    if not fields:
        raise IngestError(f"{archive}: {name}: a results CSV without a header")
    if any(None in row for row in rows):
        raise IngestError(f"{archive}: {name}: a row has more values than the header has columns")
    return fields, rows


def read_archive(path: Path) -> Archive:
    """The CSVs, logs and tuned table of one archive (nothing is extracted to disk)."""
    archive = Archive(path)
    try:
        tar = tarfile.open(path, "r:gz")
    except (OSError, tarfile.TarError, EOFError) as e:
        raise IngestError(f"{path}: not a whole gzip-compressed tar archive: {e}") from None
    with tar:
        try:
            _read_members(tar, archive)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise IngestError(f"{path}: truncated or corrupt archive: {e}") from None
    return archive


def _read_members(tar: tarfile.TarFile, archive: Archive) -> None:
    path = archive.path
    for member in tar.getmembers():
        if member.isdir():
            continue
        name = _member_path(path, member.name)
        if not member.isfile():
            raise IngestError(f"{path}: member {member.name!r} is not a regular file")
        kind = (str(name.parent), name.suffix)
        data = tar.extractfile(member).read()
        if kind == ("bench/results", ".csv"):
            archive.csvs[str(name)] = _parse_csv(path, str(name), data)
        elif kind == ("logs", ".log"):
            archive.logs[name.name] = data
        elif str(name) == TABLE:
            archive.table = data
        else:
            archive.ignored.append(str(name))


def card_of(csv_names: list[str]) -> str | None:
    """The card slug of results CSV names ``<what>_<card>[.partial].csv`` (slugs have no
    underscore); None when there are none. IngestError when they name several cards."""
    slugs = {
        PurePosixPath(n).name.removesuffix(".csv").removesuffix(".partial").rsplit("_", 1)[-1]
        for n in csv_names
    }
    if len(slugs) > 1:
        raise IngestError(f"the archives' CSVs name several cards: {sorted(slugs)}")
    return slugs.pop() if slugs else None


def _read_tree_csv(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file() or not path.stat().st_size:
        return [], []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def merge_rows(
    fields: list[str], rows: list[dict], new_fields: list[str], new_rows: list[dict]
) -> tuple[list[str], list[dict], int]:
    """(the union of the columns, ``rows`` followed by those of ``new_rows`` not already there,
    how many were added). A missing column counts as empty when rows are compared."""
    union = fields + [f for f in new_fields if f not in fields]

    def key(row: dict) -> tuple:
        return tuple(row.get(f) or "" for f in union)

    seen = {key(r) for r in rows}
    merged = list(rows)
    for row in new_rows:
        if key(row) not in seen:
            seen.add(key(row))
            merged.append(row)
    return union, merged, len(merged) - len(rows)


def _csv_bytes(fields: list[str], rows: list[dict]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _table_entries(path: Path, data: bytes, where: str) -> dict[tuple, dict]:
    try:
        from echofast.kernels.geglu_linear import read_tuned_table
    except ImportError as e:
        raise IngestError(f"{where}: cannot check the tuned table without Triton: {e}") from None
    path.write_bytes(data)
    try:
        entries = read_tuned_table(path)
    except ValueError as e:
        raise IngestError(f"{where}: {e}") from None
    return {(e["arch"], e["dtype"], e["k"], e["n"], e["m"]): e for e in entries}


def table_changes(old: dict[tuple, dict], new: dict[tuple, dict]) -> list[str]:
    """One line per entry the new table adds, changes or drops."""

    def site(key: tuple) -> str:
        return "{} {} K={} N={} M={}".format(*key)

    def timing(e: dict) -> str:
        if "median_us" in e and "default_us" in e:
            return f" ({e['median_us']} us vs {e['default_us']} us with the default tiles)"
        return ""

    lines = []
    for key in sorted(old.keys() | new.keys()):
        if key not in old:
            lines.append(f"  + {site(key)}: {new[key]['config']}{timing(new[key])}")
        elif key not in new:
            lines.append(f"  - {site(key)}: {old[key]['config']}")
        elif old[key]["config"] != new[key]["config"]:
            lines.append(f"  ~ {site(key)}: {old[key]['config']} -> {new[key]['config']}")
    return lines


def plan(archives: list[Archive], repo: Path, card: str | None) -> tuple[dict, list[str]]:
    """({tree path: new content, or None to remove it}, report lines) for ``archives`` taken in
    order."""
    writes: dict[Path, bytes | None] = {}
    report: list[str] = []
    tables: dict[Path, tuple[list[str], list[dict]]] = {}
    added: dict[Path, int] = {}
    for archive in archives:
        for name, (new_fields, new_rows) in archive.csvs.items():
            target = repo / name
            fields, rows = tables.get(target) or _read_tree_csv(target)
            fields, rows, n = merge_rows(fields, rows, new_fields, new_rows)
            tables[target] = fields, rows
            added[target] = added.get(target, 0) + n
        for name in archive.ignored:
            report.append(f"{archive.path}: left out {name} (not a results CSV, log or table)")
    for target, (fields, rows) in tables.items():
        if added[target]:
            writes[target] = _csv_bytes(fields, rows)
        rel = target.relative_to(repo)
        report.append(f"{rel}: +{added[target]} rows ({len(rows) - added[target]} already there)")

    logs = {name: data for archive in archives for name, data in archive.logs.items()}
    if logs:
        card = card or card_of([n for a in archives for n in a.csvs])
        if card is None:
            raise IngestError("the archives hold logs but no results CSV: name the card (--card)")
        folder = repo / "bench" / "results" / f"logs_{card}"
        for name, data in sorted(logs.items()):
            stale = folder / (name + ".gz")
            if len(data) > GZIP_ABOVE:
                stale, name, data = folder / name, name + ".gz", gzip.compress(data, mtime=0)
            writes[folder / name] = data
            if stale.exists():  # an earlier session's log of the step, in the other form
                writes[stale] = None
        report.append(f"{folder.relative_to(repo)}/: {len(logs)} logs ({', '.join(sorted(logs))})")

    with_table = [a for a in archives if a.table is not None]
    if with_table:
        last = with_table[-1]
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp) / "table.json"
            new = _table_entries(scratch, last.table, f"{last.path}: {TABLE}")
            target = repo / TABLE
            old = (
                _table_entries(scratch, target.read_bytes(), str(target))
                if target.is_file()
                else {}
            )
        changes = table_changes(old, new)
        if changes:
            writes[target] = last.table
        report.append(f"{TABLE}: {len(new)} entries, {len(changes)} changed")
        report.extend(changes)
    return writes, report


def write_all(writes: dict[Path, bytes | None]) -> None:
    """Each file to a temporary name beside it, then renamed over the target (None: removed)."""
    for path, data in writes.items():
        if data is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".ingest-tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Append a GPU session's results (one archive per call, in order) to the tree."
    )
    parser.add_argument("archives", nargs="+", type=Path, help="gpu_session_results.tar.gz files")
    parser.add_argument("--repo", type=Path, default=REPO, help="the tree (default: this one)")
    parser.add_argument("--card", help="the card's slug for the logs' folder (default: the CSVs')")
    parser.add_argument("--dry-run", action="store_true", help="print what would change")
    args = parser.parse_args(argv)
    try:
        archives = [read_archive(p) for p in args.archives]
        writes, report = plan(archives, args.repo.resolve(), args.card)
    except IngestError as e:
        print(f"ingest_gpu_session.py: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report))
    removed = sum(data is None for data in writes.values())
    counts = f"{len(writes) - removed} files written, {removed} removed"
    if args.dry_run:
        print(f"dry run: {counts} if run without --dry-run")
    else:
        write_all(writes)
        print(counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
