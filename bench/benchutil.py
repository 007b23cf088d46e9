"""Helpers shared by the benchmark scripts: the code's git version and CSV rows."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path


def git_sha() -> str:
    """``git describe --always --dirty`` of this checkout, or "unknown"."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path``, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
