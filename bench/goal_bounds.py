"""What issue 9's speed goals demand of the LVDM, from a measured ``echofast bench`` CSV.

For each goal (one video end to end in at most ``--b1-goal`` seconds at batch 1; at least
``--b8-goal`` videos/s at batch 8) it takes, from one run of one card:

* the time per video the other phases took (LIDM, and the VAE decode at its fastest measured
  precision, ``pipeline/echofast+decode-float16`` when present): what is left of the goal is the
  LVDM's budget (the AVI writing runs on a background thread and is not charged);
* the LVDM's work per video (the ``lvdm`` phase's ``gflop`` column: FlopCounterMode's count of
  the diffusers UNet, all windows and steps) and so the TFLOP/s the LVDM must sustain;
* that rate as a fraction of the large bf16 GEMM timed in the same run (``gemm/bf16-8192``),
  next to the fraction the LVDM achieved.

A goal that needs the whole UNet (convolutions, attention, norms) at more than about half of the
GEMM ceiling is beyond what the fastest published SVD engines reach (TensorRT: ~47 % of peak, see
``shared/spec/performance.md``); at more than 100 % it cannot be met at that precision on that
card.

Usage::

    python bench/goal_bounds.py bench/results/echofast_bench_nvidia-h200.csv [--git SHA]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from echofast.benchmark_rows import read_csv
from echofast.errors import EchofastError

GEMM_PATH = "gemm/bf16-8192"


@dataclass
class Bound:
    """One goal against one run: seconds per video allowed and spent, the LVDM's budget."""

    batch: int
    goal_s_per_video: float
    other_s_per_video: float
    lvdm_s_per_video: float
    lvdm_gflop_per_video: float
    gemm_tflops: float

    @property
    def lvdm_budget_s(self) -> float:
        return self.goal_s_per_video - self.other_s_per_video

    @property
    def needed_tflops(self) -> float:
        """TFLOP/s the LVDM must sustain (inf when the other phases alone exceed the goal)."""
        if self.lvdm_budget_s <= 0:
            return float("inf")
        return self.lvdm_gflop_per_video / self.lvdm_budget_s / 1000

    @property
    def needed_fraction(self) -> float:
        return self.needed_tflops / self.gemm_tflops

    @property
    def alone_fraction(self) -> float:
        """The fraction the LVDM would need if every other phase took no time at all."""
        return self.lvdm_gflop_per_video / self.goal_s_per_video / 1000 / self.gemm_tflops

    @property
    def achieved_fraction(self) -> float:
        return self.lvdm_gflop_per_video / self.lvdm_s_per_video / 1000 / self.gemm_tflops


def _select(rows: list[dict[str, str]], git: str | None) -> list[dict[str, str]]:
    """The rows of one git revision (``git``, else the newest run's) of the CSV's first card."""
    if not rows:
        raise EchofastError("the CSV has no rows")
    if git is None:
        git = max(rows, key=lambda r: r["timestamp"])["git_sha"]
    picked = [r for r in rows if r["git_sha"] == git]
    if not picked:
        raise EchofastError(f"no rows of git revision {git!r} in the CSV")
    return picked


def _phase(rows: list[dict[str, str]], batch: int, path: str, phase: str) -> dict | None:
    """The newest row of (batch, path, phase)."""
    hits = [
        r for r in rows if r["path"] == path and r["phase"] == phase and r["batch"] == str(batch)
    ]
    return max(hits, key=lambda r: r["timestamp"]) if hits else None


def bounds(
    rows: list[dict[str, str]], goals: dict[int, float], git: str | None = None
) -> list[Bound]:
    """One :class:`Bound` per batch in ``goals`` ({batch: seconds per video}) measured in the
    selected run; a batch the run did not measure is skipped."""
    rows = _select(rows, git)
    gemm = [float(r["tflops"]) for r in rows if r["path"] == GEMM_PATH and r["tflops"]]
    if not gemm:
        raise EchofastError(f"no {GEMM_PATH} row: the GEMM ceiling was not measured")
    ceiling = max(gemm)
    out = []
    for batch, goal in goals.items():
        lvdm = _phase(rows, batch, "pipeline/echofast", "lvdm")
        lidm = _phase(rows, batch, "pipeline/echofast", "lidm")
        if lvdm is None or lidm is None or not lvdm["gflop"]:
            continue
        decodes = [
            float(r["s_per_video"])
            for r in (
                _phase(rows, batch, path, "decode")
                for path in ("pipeline/echofast", "pipeline/echofast+decode-float16")
            )
            if r is not None
        ]
        out.append(
            Bound(
                batch=batch,
                goal_s_per_video=goal,
                other_s_per_video=float(lidm["s_per_video"]) + min(decodes, default=0.0),
                lvdm_s_per_video=float(lvdm["s_per_video"]),
                lvdm_gflop_per_video=float(lvdm["gflop"]) / batch,
                gemm_tflops=ceiling,
            )
        )
    return out


def format_bounds(found: list[Bound], card: str) -> list[str]:
    lines = [f"{card}: GEMM ceiling {found[0].gemm_tflops:.0f} TFLOP/s" if found else card]
    for b in found:
        lines.append(
            f"  batch {b.batch}: goal {b.goal_s_per_video:.3f} s/video; LIDM + fastest decode "
            f"{b.other_s_per_video:.3f} s -> LVDM budget {b.lvdm_budget_s:.3f} s for "
            f"{b.lvdm_gflop_per_video / 1000:.1f} TFLOP = {b.needed_tflops:.0f} TFLOP/s, "
            f"{b.needed_fraction:.0%} of the GEMM ceiling ({b.alone_fraction:.0%} were the other "
            f"phases free; achieved: {b.lvdm_s_per_video:.3f} s, {b.achieved_fraction:.0%})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="an echofast bench CSV (bench/results/...)")
    p.add_argument("--git", help="git revision of the run to use (default: the newest run's)")
    p.add_argument("--b1-goal", type=float, default=0.5, help="seconds per video at batch 1")
    p.add_argument("--b8-goal", type=float, default=3.0, help="videos per second at batch 8")
    a = p.parse_args(argv)
    try:
        rows = read_csv(a.csv)
        found = bounds(rows, {1: a.b1_goal, 8: 1.0 / a.b8_goal}, a.git)
    except EchofastError as e:
        print(f"goal_bounds: {e}", file=sys.stderr)
        return 2
    print("\n".join(format_bounds(found, _select(rows, a.git)[0]["card"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
