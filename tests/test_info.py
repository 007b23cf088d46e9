"""`echofast info` / `python -m echofast.info`: versions, extension state, op backends."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_module_json_lists_versions_extension_and_ops():
    out = _run(sys.executable, "-m", "echofast.info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["packages"]["torch"]
    assert "built" in info["extension"]
    assert info["ops"]["group_norm"]["cpu"]["selected"] == "torch"
    assert info["ops"]["attention"]["cpu"]["selected"] == "sdpa"
    assert info["ops"]["layer_norm"]["cpu"]["selected"] == "mixed"  # PyTorch's own on CPU


def test_console_script_text():
    exe = shutil.which("echofast")
    if exe is None:
        pytest.skip("the echofast console script is not on PATH (package not installed?)")
    out = _run(exe, "info")
    assert out.returncode == 0, out.stderr
    assert "extension echofast._C:" in out.stdout
    assert "group_norm" in out.stdout and "attention" in out.stdout


def test_unknown_command_fails_with_usage():
    out = _run(sys.executable, "-m", "echofast", "frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr and "info" in out.stderr


def test_json_keys_are_the_same_with_or_without_a_gpu():
    from echofast.info import collect

    info = collect()
    assert "gpu" in info  # None without CUDA, the device name with it
    assert (info["gpu"] is None) == (not info["cuda_available"])


def _video_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("video pixel path:"))


def test_video_cuda_is_reported_as_this_machine_can_use_it():
    """The video line agrees with the CUDA device query above it: a CUDA build whose runtime
    cannot run here (e.g. cudaErrorInsufficientDriver) is "built but not usable", with why."""
    from echofast.info import collect, format_info

    info = collect()
    video, ext = info["video"], info["extension"]
    if video["backend"] != "native":
        pytest.skip(f"the video pixel path is PyAV here: {video['reason']}")
    devices = ext["cuda_devices"]
    runs = isinstance(devices, int) and devices > 0 and info["cuda_available"]
    assert video["cuda"] == runs
    assert video["cuda_built"] == bool(ext["cuda"])
    line = _video_line(format_info(info))
    if runs:
        assert video["reason"] is None and line.endswith("(CPU + CUDA)")
        return
    assert "CPU + CUDA" not in line and video["reason"] in line
    if video["cuda_built"]:
        assert "CUDA built but not usable here" in line
        if isinstance(devices, str):  # the runtime's own error, as the device query shows it
            assert devices.removeprefix("unavailable: ") in video["reason"]
    else:
        assert "built without CUDA" in video["reason"]


@pytest.mark.parametrize(
    ("built", "runtime", "torch_cuda", "expected"),
    [
        (True, (True, None), True, "(CPU + CUDA)"),
        (
            True,
            (False, "echofast._C cannot use CUDA: old driver"),
            True,
            "(CPU only; CUDA built but not usable here: echofast._C cannot use CUDA: old driver)",
        ),
        (True, (True, None), False, "CUDA built but not usable here: torch ("),
        (
            False,
            (False, "echofast._C was built without CUDA"),
            True,
            "(CPU only: echofast._C was built without CUDA)",
        ),
    ],
    ids=["usable", "runtime-fails", "torch-without-cuda", "built-without-cuda"],
)
def test_video_cuda_states(monkeypatch, built, runtime, torch_cuda, expected):
    import torch

    from echofast.info import collect, format_info
    from echofast.io import pixels, video_backend

    monkeypatch.setattr(
        pixels, "native_status", lambda: {"cpu": True, "cuda": built, "reason": None}
    )
    monkeypatch.setattr(pixels, "cuda_usable", lambda: runtime)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_cuda)
    video = video_backend()
    assert video["backend"] == "native" and video["cuda_built"] == built
    assert video["cuda"] == (runtime[0] and torch_cuda)
    assert (video["reason"] is None) == video["cuda"]
    monkeypatch.undo()
    info = {**collect(), "video": video}
    assert expected in _video_line(format_info(info))
    assert json.loads(json.dumps(info))["video"] == video


def test_a_triton_too_old_for_the_kernels_is_named_beside_its_version(monkeypatch):
    import importlib.metadata

    from echofast.info import collect, format_info
    from echofast.ops import _triton

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda d: "3.1.0" if d == "triton" else real(d)
    )
    _triton.triton_too_old.cache_clear()
    try:
        info = collect()
        assert collect()["triton_too_old"] == _triton.triton_too_old()
    finally:
        _triton.triton_too_old.cache_clear()  # not to leave the faked version cached
    assert info["packages"]["triton"] == "3.1.0"
    assert info["triton_too_old"].startswith("triton 3.1.0 is older than 3.6")
    line = next(x for x in format_info(info).splitlines() if x.strip().startswith("triton "))
    assert "3.1.0  (triton 3.1.0 is older than 3.6" in line and "backends are refused" in line


def test_versions_and_backend_choices_agree_with_their_sources(monkeypatch):
    """Versions are the installed distributions' (None when not installed); per op and device,
    the selected backend is the first one that can run, and only the others are listed, each
    with its reasons."""
    import importlib.metadata

    from echofast import info as info_module
    from echofast.ops import registered_ops

    monkeypatch.setattr(info_module, "PACKAGES", (*info_module.PACKAGES, "no-such-dist-x9"))
    info = info_module.collect()
    assert info["packages"]["diffusers"] == importlib.metadata.version("diffusers")
    assert info["packages"]["torch"] == importlib.metadata.version("torch")
    assert info["packages"]["no-such-dist-x9"] is None
    text = info_module.format_info(info)
    assert any(
        line.split() == ["no-such-dist-x9", "not", "installed"] for line in text.splitlines()
    )
    for name, op in registered_ops().items():
        reasons = op.report("cpu")
        entry = info["ops"][name]["cpu"]
        assert entry["selected"] == next(b for b, why in reasons.items() if not why)
        assert entry["unavailable"] == {b: why for b, why in reasons.items() if why}
        assert entry["selected"] not in entry["unavailable"]


def test_a_too_old_triton_is_named_on_the_triton_line_only(monkeypatch):
    from echofast import info as info_module
    from echofast.ops import _triton

    monkeypatch.setattr(_triton, "triton_too_old", lambda: "triton 3.1.0 is older than 3.6")
    text = info_module.format_info(info_module.collect())
    noted = [line for line in text.splitlines() if "backends are refused" in line]
    assert len(noted) == 1 and noted[0].split()[0] == "triton"


def test_model_paths_are_the_models_settings(monkeypatch):
    """The fused paths' device sets as echofast.nn.spatiotemporal holds them, in JSON and text."""
    import echofast.nn.spatiotemporal as st
    from echofast import info as info_module

    monkeypatch.setattr(st, "TEMPORAL_GEMMS_DEVICES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(st, "FUSED_FF_MAX_DIM", 96)
    monkeypatch.setattr(st, "FUSED_GEGLU_DEVICES", frozenset())
    info = info_module.collect()
    paths = info["model_paths"]
    assert paths["temporal convolution (three GEMMs)"] == {
        "devices": ["cpu", "cuda"],
        "max_width": st.TEMPORAL_GEMMS_MAX_DIM,
    }
    assert paths["feed-forward (one kernel)"] == {
        "devices": sorted(st.FUSED_FF_DEVICES),
        "max_width": 96,
    }
    lines = info_module.format_info(info).splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("model paths"))
    assert lines[start + 1].split() == [
        *"GEGLU projection + gate (one GEMM)".split(),
        *"none (the unfused path everywhere)".split(),
    ]
    assert lines[start + 2].endswith("cuda (C up to 96)")
    assert lines[start + 3].endswith(f"  cpu, cuda (C up to {st.TEMPORAL_GEMMS_MAX_DIM})")


def test_without_cuda_the_ops_section_says_it_lists_the_cpu_only():
    from echofast import info as info_module

    info = info_module.collect()
    for available, shown in ((False, True), (True, False)):
        text = info_module.format_info({**info, "cuda_available": available})
        assert ("(no CUDA device here: the CPU's choices only)" in text) is shown
