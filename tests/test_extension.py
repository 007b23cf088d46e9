"""The compiled extension echofast._C: build configuration and CUDA device queries."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from echofast import _ext

CUDA_ERROR_NAME = re.compile(r"cudaError\w+")
VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )


@pytest.fixture(scope="module")
def ext():
    if _env_flag("ECHOFAST_SKIP_EXT"):
        pytest.skip("ECHOFAST_SKIP_EXT is set: pure-Python install without echofast._C")
    return _ext.load()


@pytest.fixture(scope="module")
def info(ext) -> dict:
    return ext.build_info()


@pytest.fixture(scope="module")
def cuda_ext(ext, info):
    if not info["cuda"]:
        pytest.skip("echofast._C was built without CUDA (no usable CUDA toolkit at build time)")
    return ext


def test_ext_wrapper_reports_the_build(ext, info):
    assert _ext.available()
    assert _ext.load() is ext
    assert _ext.build_info() == {"built": True, **info}


def test_ext_wrapper_without_extension():
    if not _env_flag("ECHOFAST_SKIP_EXT"):
        pytest.skip("ECHOFAST_SKIP_EXT is not set: the extension is expected to be built")
    if _ext.available():
        pytest.skip("echofast._C is installed although ECHOFAST_SKIP_EXT is set")
    info = _ext.build_info()
    assert info["built"] is False
    assert "ECHOFAST_SKIP_EXT" in info["reason"]
    with pytest.raises(ImportError) as excinfo:
        _ext.load()
    assert isinstance(excinfo.value, _ext.ExtensionUnavailable)
    assert isinstance(excinfo.value.__cause__, ImportError)


def test_build_info_fields(info):
    assert set(info) == {
        "cuda",
        "cuda_arches",
        "nvcc_version",
        "cudart_version",
        "cxx_standard",
        "compiler",
        "pybind11_version",
    }
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_arches"], list)
    assert all(isinstance(arch, str) for arch in info["cuda_arches"])
    assert info["cxx_standard"] == "c++17"
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert VERSION.match(info["pybind11_version"])
    if info["cuda"]:
        assert VERSION.match(info["nvcc_version"])
        assert VERSION.match(info["cudart_version"])
        assert info["nvcc_version"].startswith(info["cudart_version"])
    else:
        assert info["cuda_arches"] == []
        assert info["nvcc_version"] is None
        assert info["cudart_version"] is None


def test_cuda_build_when_nvcc_is_available(info):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    if not info["cuda"] and not _env_flag("ECHOFAST_FORCE_CUDA"):
        pytest.skip(
            f"nvcc is on PATH ({nvcc}) but echofast._C was built without CUDA; "
            "reinstall with ECHOFAST_FORCE_CUDA=1 to require the CUDA build"
        )
    assert info["cuda"], "ECHOFAST_FORCE_CUDA is set but echofast._C was built without CUDA"
    assert {"sm_80", "sm_90", "compute_90"} <= set(info["cuda_arches"])


def test_cuda_error_is_a_runtime_error(ext):
    assert issubclass(ext.CudaError, RuntimeError)
    assert ext.CudaError.__module__ == "echofast._C"


def test_without_cuda_the_device_query_raises(ext, info):
    if info["cuda"]:
        pytest.skip("echofast._C was built with CUDA")
    for call in (ext.cuda_device_count, lambda: ext.cuda_device_properties(0)):
        with pytest.raises(ext.CudaError, match="built without CUDA"):
            call()


def test_device_query(cuda_ext):
    try:
        count = cuda_ext.cuda_device_count()
    except cuda_ext.CudaError as exc:
        assert CUDA_ERROR_NAME.search(str(exc)), str(exc)
        with pytest.raises(cuda_ext.CudaError, match=CUDA_ERROR_NAME):
            cuda_ext.cuda_device_properties(0)
        return

    assert isinstance(count, int) and count >= 1
    for index in range(count):
        props = cuda_ext.cuda_device_properties(index)
        assert props["index"] == index
        assert isinstance(props["name"], str) and props["name"]
        assert props["major"] >= 7 and props["minor"] >= 0
        assert props["total_memory"] > 2**30
        assert props["multi_processor_count"] > 0
        assert VERSION.match(props["driver_version"])
        assert VERSION.match(props["runtime_version"])
    for index in (count, count + 7, -1):
        with pytest.raises(cuda_ext.CudaError) as excinfo:
            cuda_ext.cuda_device_properties(index)
        message = str(excinfo.value)
        assert re.search(rf"index {index}\b", message), message
        assert re.search(rf"\b{count} CUDA device", message), message


def test_device_query_does_not_crash_the_process(cuda_ext, tmp_path):
    result = _run_python(
        """
        import json
        import echofast._C as C

        out = {}
        for name, call in [
            ("count", C.cuda_device_count),
            ("props0", lambda: C.cuda_device_properties(0)),
            ("props_big", lambda: C.cuda_device_properties(1 << 20)),
        ]:
            try:
                out[name] = {"ok": call()}
            except C.CudaError as exc:
                out[name] = {"error": str(exc)}
        print(json.dumps(out))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "error" in out["props_big"]
    if "error" in out["count"]:
        assert CUDA_ERROR_NAME.search(out["count"]["error"])


def test_extension_does_not_import_torch(ext, tmp_path):
    result = _run_python(
        """
        import json
        import sys

        import echofast

        before = set(sys.modules)
        import echofast._C

        print(json.dumps(sorted(set(sys.modules) - before)))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    new_modules = json.loads(result.stdout)
    assert "echofast._C" in new_modules
    torch_modules = [m for m in new_modules if m == "torch" or m.startswith("torch.")]
    assert not torch_modules, f"importing echofast._C imported {torch_modules}"


def test_cuda_runtime_is_linked_statically(cuda_ext):
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not available")
    result = subprocess.run([ldd, cuda_ext.__file__], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "libcudart" not in result.stdout
    assert "libcuda.so" not in result.stdout
    assert "libtorch" not in result.stdout and "libc10" not in result.stdout


# ---- video pixel path entry points (validation only; conversions: tests/io/) ----------------


def _planes(data: int, **changes) -> dict:
    planes = {
        "data": (data, data, data),
        "frame_stride": (0, 0, 0),
        "row_stride": (4, 2, 2),
        "table": 0,
        "frames": 1,
        "height": 4,
        "width": 4,
        "layout": 0,
        "channels": 3,
        "full_range": True,
        "chroma_shift": (1, 1),
    }
    planes.update(changes)
    return planes


def _frames(data: int, **changes) -> dict:
    frames = {
        "data": data,
        "dtype": 0,
        "frames": 1,
        "height": 4,
        "width": 4,
        "channels": 1,
        "stride": (16, 4, 1, 0),
    }
    frames.update(changes)
    return frames


def test_video_entry_points_validate_descriptors(ext):
    import numpy as np

    src = np.full(64, 128, np.uint8)
    dst = np.zeros(64, np.uint8)
    ext.planes_to_frames(_planes(src.ctypes.data), _frames(dst.ctypes.data), 0, 1, -1, 0)
    assert (dst[:16] == 128).all()
    bad = [
        ({"src": _planes(1, layout=7)}, "layout = 7"),
        ({"src": _planes(1, chroma_shift=(2, 1))}, "chroma shift = 2"),
        ({"src": _planes(1, layout=1, channels=2)}, "packed channels = 2"),
        ({"src": _planes(1, height=0)}, "height = 0"),
        ({"src": _planes(0)}, "null data pointer of plane"),
        ({"src": _planes(1, frames=2)}, "source has 2 frames, destination 1"),
        ({"dst": _frames(1, dtype=9)}, "dtype code = 9"),
        ({"dst": _frames(1, channels=2)}, "channels = 2"),
        ({"dst": _frames(1, stride=(16, -4, 1, 0))}, "negative frame stride in dimension = 1"),
        ({"resize": 5}, "resize = 5"),
        ({"device": -2}, "got -2"),
        ({"src": _planes(1, table=1), "device": 0}, "CPU-only"),
        ({"src": {**_planes(1), "extra": 1}}, "unknown key 'extra'"),
        ({"src": {k: v for k, v in _planes(1).items() if k != "width"}}, "missing key 'width'"),
        ({"src": {**_planes(1), "data": (1, 1)}}, "'data' needs 3 values, got 2"),
    ]
    for change, message in bad:
        args = {"src": _planes(1), "dst": _frames(1), "resize": 0, "device": -1, **change}
        with pytest.raises(ValueError, match=re.escape(message)):
            ext.planes_to_frames(args["src"], args["dst"], args["resize"], 1, args["device"], 0)
    with pytest.raises(ValueError, match="full-range 4:2:0"):
        ext.frames_to_planes(_frames(1), _planes(1, chroma_shift=(0, 0)), 1, -1, 0)
    with pytest.raises(ValueError, match="source is 2x4x4, destination 1x4x4"):
        ext.frames_to_planes(_frames(1, frames=2), _planes(1), 1, -1, 0)


def test_rgb_to_yuv420_averages_partial_chroma_blocks(ext):
    """At odd sizes (reachable through the C API; echofast.io.frames_to_yuv needs even sizes)
    an edge block's Cb/Cr are those of the mean of the 2 or 1 pixels it has: a flat colour
    gives the same chroma in every block, the BT.601 full-range value."""
    import numpy as np

    r, g, b = 30, 60, 220
    rgb = np.empty((1, 3, 3, 3), np.uint8)
    rgb[...] = (r, g, b)
    y, u, v = np.zeros(9, np.uint8), np.zeros(4, np.uint8), np.zeros(4, np.uint8)
    src = _frames(rgb.ctypes.data, height=3, width=3, channels=3, stride=(27, 9, 3, 1))
    dst = _planes(0, height=3, width=3, row_stride=(3, 2, 2))
    dst["data"] = (y.ctypes.data, u.ctypes.data, v.ctypes.data)
    ext.frames_to_planes(src, dst, 1, -1, 0)
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    assert (u == u[0]).all() and abs(int(u[0]) - cb) <= 1, (u, cb)
    assert (v == v[0]).all() and abs(int(v[0]) - cr) <= 1, (v, cr)
    assert (y == y[0]).all() and abs(int(y[0]) - luma) <= 1, (y, luma)


def test_video_cuda_entry_points_fail_cleanly_without_a_gpu(ext, info):
    if info["cuda"]:
        try:
            ext.cuda_device_count()
        except ext.CudaError:
            pass
        else:
            pytest.skip("a CUDA device is usable: tests/io/test_video_cuda.py covers it")
        message = CUDA_ERROR_NAME
    else:
        message = "built without CUDA"
    with pytest.raises(ext.CudaError, match=message):
        ext.planes_to_frames(_planes(1), _frames(1), 0, 1, 0, 0)
    with pytest.raises(ext.CudaError, match=message):
        ext.frames_to_planes(_frames(1), _planes(1), 1, 0, 0)


# ---- the lazy loader in echofast._ext (with the import faked: no dependence on the build) ------


@pytest.fixture
def fresh_loader(monkeypatch):
    """echofast._ext as before its first load(), importing through a recording fake; the real
    loader's state comes back at teardown."""
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_failure", None)
    monkeypatch.delenv(_ext.SKIP_ENV, raising=False)
    calls = []
    outcome = {"result": types.SimpleNamespace(build_info=lambda: {"cuda": False})}

    def import_module(name):
        calls.append(name)
        if isinstance(outcome["result"], BaseException):
            raise outcome["result"]
        return outcome["result"]

    monkeypatch.setattr(_ext, "importlib", types.SimpleNamespace(import_module=import_module))
    return calls, outcome


def _unavailable() -> _ext.ExtensionUnavailable:
    with pytest.raises(_ext.ExtensionUnavailable) as excinfo:
        _ext.load()
    return excinfo.value


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "Yes", "on", " 1 ", "on\n"])
def test_skip_flag_makes_the_extension_unavailable(fresh_loader, monkeypatch, value):
    calls, _ = fresh_loader
    monkeypatch.setenv(_ext.SKIP_ENV, value)
    exc = _unavailable()
    assert exc.reason.startswith("ECHOFAST_SKIP_EXT=1 is set: the extension is not loaded")
    assert str(exc) == f"echofast._C is unavailable: {exc.reason}"
    assert exc.name == "echofast._C" and isinstance(exc.__cause__, ImportError)
    assert _ext.available() is False
    assert _ext.build_info() == {"built": False, "reason": exc.reason}
    assert calls == []


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off", "2"])
def test_other_skip_flag_values_load_the_extension(fresh_loader, monkeypatch, value):
    calls, outcome = fresh_loader
    monkeypatch.setenv(_ext.SKIP_ENV, value)
    assert _ext.load() is outcome["result"]
    assert _ext.build_info() == {"built": True, "cuda": False}
    assert calls == ["echofast._C"]


def test_the_first_outcome_is_kept(fresh_loader, monkeypatch):
    calls, outcome = fresh_loader
    monkeypatch.setenv(_ext.SKIP_ENV, "1")
    first = _unavailable()
    monkeypatch.delenv(_ext.SKIP_ENV)
    assert _unavailable().reason == first.reason and not _ext.available()
    monkeypatch.setattr(_ext, "_failure", None)
    module = _ext.load()
    monkeypatch.setenv(_ext.SKIP_ENV, "1")
    outcome["result"] = ImportError("not called again")
    assert _ext.load() is module and _ext.available()
    assert calls == ["echofast._C"]


def test_the_cached_failure_keeps_no_caller_alive(fresh_loader):
    """The failure is cached for the process; its traceback would keep the first caller's
    frames and their locals alive (with torch 2.5 a DDP job's process group and its TCPStore
    thread outlived destroy_process_group that way)."""
    import gc
    import weakref

    calls, outcome = fresh_loader
    cause = ImportError("libfoo.so: undefined symbol: bar")
    cause.__context__ = KeyError("earlier")
    outcome["result"] = cause

    class Held:
        pass

    def first_caller() -> weakref.ref:
        held = Held()
        assert not _ext.available()
        return weakref.ref(held)

    ref = first_caller()
    gc.collect()
    assert ref() is None
    assert cause.__traceback__ is None and cause.__context__.__traceback__ is None
    assert _unavailable().__cause__ is cause and calls == ["echofast._C"]


@pytest.mark.parametrize(
    "error, reason",
    [
        (ModuleNotFoundError("No module named 'echofast._C'", name="echofast._C"),
         "echofast is installed without its compiled extension (built with ECHOFAST_SKIP_EXT=1?)"),
        (ModuleNotFoundError("No module named 'pybind11_dep'", name="pybind11_dep"),
         "ModuleNotFoundError: No module named 'pybind11_dep'"),
        (ImportError("libfoo.so: undefined symbol: bar"),
         "ImportError: libfoo.so: undefined symbol: bar"),
    ],
)  # fmt: skip
def test_an_import_failure_is_reported_with_its_cause(fresh_loader, error, reason):
    calls, outcome = fresh_loader
    outcome["result"] = error
    exc = _unavailable()
    assert exc.reason.startswith(reason) and exc.__cause__ is error
    assert _unavailable().__cause__ is error
    assert _ext.build_info() == {"built": False, "reason": exc.reason}
    assert calls == ["echofast._C"]
