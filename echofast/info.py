"""python -m echofast.info / echofast info: versions, the extension, op backends, and the
models' fused paths per device type."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from typing import Any

PACKAGES = ("torch", "numpy", "safetensors", "av", "tqdm", "triton", "diffusers", "xformers")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """Everything ``echofast info`` shows, as a JSON-serialisable dict.

    This is the one place that queries the GPU and loads the extension on purpose.
    """
    import torch

    from . import __version__, _ext
    from .ops import _triton, registered_ops

    info: dict[str, Any] = {
        "echofast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "triton_too_old": _triton.triton_too_old(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "extension": _ext.build_info(),
    }
    from .io import video_backend

    info["video"] = video_backend()
    devices = ["cpu"]
    if info["cuda_available"]:
        devices.append("cuda")
        info["gpu"] = torch.cuda.get_device_name(0)
    if info["extension"].get("built"):
        try:
            info["extension"]["cuda_devices"] = _ext.load().cuda_device_count()
        except RuntimeError as err:
            info["extension"]["cuda_devices"] = f"unavailable: {err}"
    backends: dict[str, dict[str, Any]] = {}
    for name, op in sorted(registered_ops().items()):
        backends[name] = {}
        for device in devices:
            reasons = op.report(device)
            chosen = next((b for b, r in reasons.items() if not r), None)
            backends[name][device] = {
                "selected": chosen,
                "unavailable": {b: r for b, r in reasons.items() if r},
            }
    info["ops"] = backends
    info["model_paths"] = model_paths()
    return info


def model_paths() -> dict[str, dict[str, Any]]:
    """The LVDM's fused paths and the device types that take them in inference (the constants in
    :mod:`echofast.nn.spatiotemporal`, each set from a GPU lease's benchmark)."""
    from .nn import spatiotemporal as st

    return {
        "GEGLU projection + gate (one GEMM)": {"devices": sorted(st.FUSED_GEGLU_DEVICES)},
        "feed-forward (one kernel)": {
            "devices": sorted(st.FUSED_FF_DEVICES),
            "max_width": st.FUSED_FF_MAX_DIM,
        },
        "temporal convolution (three GEMMs)": {
            "devices": sorted(st.TEMPORAL_GEMMS_DEVICES),
            "max_width": st.TEMPORAL_GEMMS_MAX_DIM,
        },
    }


def format_info(info: dict[str, Any]) -> str:
    lines = [f"echofast {info['echofast']}  (python {info['python']}, {info['platform']})", ""]
    lines.append("packages:")
    for name, ver in info["packages"].items():
        note = ""
        if name == "triton" and info["triton_too_old"]:
            note = f"  ({info['triton_too_old']}: the Triton backends are refused)"
        lines.append(f"  {name:<12} {ver or 'not installed'}{note}")
    lines.append(
        f"  torch CUDA   {info['torch_cuda'] or 'none (CPU build)'}; "
        f"GPU available: {info['cuda_available']}" + (f" ({info['gpu']})" if info["gpu"] else "")
    )
    ext = info["extension"]
    lines.append("")
    if ext.get("built"):
        arches = ", ".join(ext.get("cuda_arches") or []) or "-"
        lines.append(
            f"extension echofast._C: built; CUDA: {ext.get('cuda')} (arches: {arches}; "
            f"nvcc {ext.get('nvcc_version')}, cudart {ext.get('cudart_version')})"
        )
        lines.append(f"  CUDA devices: {ext.get('cuda_devices')}")
    else:
        lines.append(f"extension echofast._C: not built ({ext.get('reason')})")
    video = info["video"]
    if video["backend"] == "native":
        if video["cuda"]:
            where = "CPU + CUDA"
        elif video["cuda_built"]:
            where = f"CPU only; CUDA built but not usable here: {video['reason']}"
        else:
            where = f"CPU only: {video['reason']}"
        lines.append(f"video pixel path: native, echofast._C ({where})")
    else:
        lines.append(f"video pixel path: PyAV fallback ({video['reason']})")
    lines.append("")
    lines.append("ops (backend chosen automatically; others and why they cannot run):")
    if not info["cuda_available"]:
        lines.append("  (no CUDA device here: the CPU's choices only)")
    for name, per_device in info["ops"].items():
        for device, entry in per_device.items():
            lines.append(f"  {name:<14} {device:<5} -> {entry['selected']}")
            for backend, reasons in entry["unavailable"].items():
                lines.append(f"      {backend}: {'; '.join(reasons)}")
    lines.append("")
    lines.append(
        "model paths (device types that take them in inference; echofast.nn.spatiotemporal):"
    )
    for name, entry in info["model_paths"].items():
        where = ", ".join(entry["devices"]) or "none (the unfused path everywhere)"
        if entry.get("max_width") is not None and entry["devices"]:
            where += f" (C up to {entry['max_width']})"
        lines.append(f"  {name:<36} {where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="echofast info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
