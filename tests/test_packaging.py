"""Packaging contracts: what `import echofast` loads, and how the package is installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_json(code: str, cwd: Path):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Facts about the installed distribution, gathered outside the source tree."""
    return _run_json(
        """
        import importlib.metadata as md
        import importlib.util
        import json

        import echofast

        try:
            import echofast.kernels as kernels
        except ImportError as exc:
            kernels, kernels_error = None, repr(exc)
        else:
            kernels_error = None
        dist = md.distribution("echofast")
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
        top_kernels = importlib.util.find_spec("kernels")
        print(json.dumps({
            "version": dist.version,
            "editable": direct_url.get("dir_info", {}).get("editable", False),
            "files": [str(f) for f in dist.files or []],
            "root": str(dist.locate_file("")),
            "scripts": {
                ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"
            },
            "echofast_file": echofast.__file__,
            "echofast_version": getattr(echofast, "__version__", None),
            "kernels_name": kernels and kernels.__name__,
            "kernels_file": kernels and kernels.__file__,
            "kernels_error": kernels_error,
            "top_level_kernels": top_kernels.origin if top_kernels else None,
        }))
        """,
        tmp_path_factory.mktemp("installed"),
    )


def test_import_is_cheap(tmp_path):
    loaded = _run_json(
        """
        import json
        import sys

        import echofast

        after_import = {m: m in sys.modules for m in ("triton", "echofast._C")}
        import echofast._ext

        ext_loaded = "echofast._C" in sys.modules
        import torch

        print(json.dumps({
            **after_import,
            "echofast._C after importing echofast._ext": ext_loaded,
            "cuda initialised": torch.cuda.is_initialized(),
        }))
        """,
        tmp_path,
    )
    assert not any(loaded.values()), loaded


def test_tests_run_against_the_installed_package(installed):
    import echofast

    imported = Path(echofast.__file__).resolve()
    hint = "run `pytest` (not `python -m pytest`) after `pip install .`"
    assert imported == Path(installed["echofast_file"]).resolve(), (
        f"the tests import echofast from {imported}, but the installed package is at "
        f"{installed['echofast_file']}; {hint}"
    )
    if not installed["editable"]:
        assert not imported.is_relative_to(REPO / "echofast"), (
            f"echofast was imported from the source tree ({imported}); {hint}"
        )


def test_metadata(installed):
    assert installed["version"] == "0.1.0"
    assert installed["echofast_version"] in (None, installed["version"])
    assert installed["scripts"].get("echofast") == "echofast.cli:main"


def test_kernels_is_installed_inside_echofast(installed):
    assert installed["kernels_error"] is None, installed["kernels_error"]
    assert installed["kernels_name"] == "echofast.kernels"
    kernels_dir = Path(installed["kernels_file"]).resolve().parent
    if installed["editable"]:
        assert kernels_dir == REPO / "kernels"
    else:
        assert kernels_dir == Path(installed["echofast_file"]).resolve().parent / "kernels"
        assert "echofast/kernels/__init__.py" in installed["files"]


def test_no_top_level_kernels_package(installed):
    top_level = {Path(f).parts[0] for f in installed["files"]}
    assert "kernels" not in top_level, sorted(top_level)
    origin = installed["top_level_kernels"]
    if origin is not None:
        origin = Path(origin).resolve()
        assert origin != REPO / "kernels" / "__init__.py", origin
        installed_files = {(Path(installed["root"]) / f).resolve() for f in installed["files"]}
        assert origin not in installed_files, origin
