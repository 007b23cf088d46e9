"""What :func:`echofast.patch` did: the models it replaced, the call sites it patched, and what it
left alone (with the reason)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Replacement:
    """A diffusers model (or VAE half) whose forward now runs an echofast model.

    The echofast model holds the diffusers module's own parameter dicts: no weights are copied.
    """

    path: str
    diffusers_class: str
    echofast_class: str


@dataclass(frozen=True)
class PatchedSite:
    """A module whose forward (or attention processor) now calls echofast's ops.

    ``kind`` is one of :data:`SITE_KINDS`; ``detail`` says which op replaced what.
    """

    path: str
    kind: str
    detail: str


@dataclass(frozen=True)
class LeftAlone:
    """A module echofast knows how to accelerate but did not touch, and why."""

    path: str
    what: str
    reason: str


SITE_KINDS = {
    "resnet": "ResnetBlock2D: GroupNorm+SiLU fused (norm1, norm2)",
    "temporal_resnet": "TemporalResnetBlock: GroupNorm+SiLU fused (norm1, norm2)",
    "attention": "Attention: echofast processor (ops.attention, exact single-key path)",
    "group_norm": "GroupNorm: ops.group_norm",
    "autocast": "entry: runs under autocast",
}


def _name(path: str) -> str:
    return path or "<root>"


@dataclass
class PatchReport:
    """Returned by :func:`echofast.patch`; ``str(report)`` is a readable summary.

    Attributes:
        target: class name of the patched object.
        backend: the forced backend per op (empty: automatic choice).
        dtype: the autocast dtype of the patched forwards, or None.
        replaced: whole models whose forward runs an echofast model.
        patched: call sites that run echofast's ops.
        left_alone: modules of a supported kind that were not touched, with the reason.
    """

    target: str
    backend: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    replaced: list[Replacement] = field(default_factory=list)
    patched: list[PatchedSite] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of patched call sites per kind (see :data:`SITE_KINDS`)."""
        return dict(Counter(site.kind for site in self.patched))

    def __str__(self) -> str:
        lines = [f"echofast.patch({self.target})"]
        if self.backend:
            forced = ", ".join(f"{op}={name}" for op, name in sorted(self.backend.items()))
            lines.append(f"  forced backends: {forced}")
        if self.dtype is not None:
            lines.append(f"  autocast dtype: {self.dtype}")
        if self.replaced:
            lines.append("  replaced (parameters shared, not copied):")
            for r in self.replaced:
                lines.append(f"    {_name(r.path)}: {r.diffusers_class} -> {r.echofast_class}")
        if self.patched:
            lines.append("  patched call sites:")
            for kind, n in sorted(self.counts().items()):
                lines.append(f"    {n:4d} x {SITE_KINDS.get(kind, kind)}")
        if self.left_alone:
            lines.append("  left alone:")
            groups: dict[tuple[str, str], list[str]] = {}
            for item in self.left_alone:
                groups.setdefault((item.what, item.reason), []).append(_name(item.path))
            for (what, reason), paths in groups.items():
                shown = ", ".join(paths[:3]) + (
                    f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""
                )
                lines.append(f"    {what} at {shown}: {reason}")
        if not (self.replaced or self.patched):
            lines.append("  nothing was patched")
        return "\n".join(lines)
