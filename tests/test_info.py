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
