"""Every ``torch.<...>`` attribute that echofast, its kernels and its benchmarks name exists in the
installed torch. Much of that code runs only on a GPU (CUDA graphs, the GPU benchmarks), which
CI has not: this static check is what tells, in CI's oldest-torch environment, that a newer
API crept into such a path."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("echofast", "kernels", "bench")


def _dotted(node: ast.Attribute) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "torch":
        return ".".join(["torch", *reversed(parts)])
    return None


def _references() -> dict[str, str]:
    """``torch.a.b.c`` (longest chains only) → the first file:line naming it."""
    found: dict[str, str] = {}
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            inner = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                    inner.add(id(node.value))
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and id(node) not in inner:
                    name = _dotted(node)
                    if name:
                        found.setdefault(name, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _resolves(name: str) -> bool:
    obj = torch
    parts = name.split(".")
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if not isinstance(obj, type(torch)):
            return True  # an attribute of an instance or class set at run time: not checkable
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def test_every_torch_attribute_named_exists_in_this_torch():
    refs = _references()
    assert len(refs) > 100 and "torch.cuda.CUDAGraph" in refs  # the scan sees the GPU paths
    missing = {name: where for name, where in refs.items() if not _resolves(name)}
    assert not missing, f"torch {torch.__version__} lacks: {missing}"
