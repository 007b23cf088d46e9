"""Build script for echofast's compiled extension ``echofast._C``.

Project metadata lives in pyproject.toml; this file only declares the packages and the
pybind11 extension. Environment variables:

    ECHOFAST_SKIP_EXT=1     pure-Python install, no extension at all
    ECHOFAST_FORCE_CUDA=1   fail the build when the CUDA toolkit is missing or unusable
    CUDA_HOME / CUDA_PATH   CUDA toolkit to use; otherwise nvcc is looked up on PATH
    ECHOFAST_BUILD_JOBS     parallel compile jobs (default: one per CPU core)

The CUDA sources (csrc/cuda/*.cu) are compiled with nvcc for CUDA_ARCHES and the CUDA runtime
is linked statically, so the extension imports on machines without a CUDA driver.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pybind11 import __version__ as PYBIND11_VERSION
from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, ExecError, PlatformError

ROOT = Path(__file__).resolve().parent
CXX_STD = 17
CUDA_ARCHES = ("sm_80", "sm_90", "compute_90")
CXX_WARNINGS = ["-Wall", "-Wextra"]
CUDART_STATIC_LIBS = ["cudart_static", "pthread", "dl", "rt"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _log(message: str) -> None:
    print(f"echofast build: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CudaToolkit:
    nvcc: str
    found_via: str
    version: str
    library_dir: str


def _find_nvcc() -> tuple[str | None, str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            if nvcc.is_file():
                return str(nvcc), f"${var}"
            return None, f"{var}={home} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not found on PATH and neither CUDA_HOME nor CUDA_PATH is set"
    return nvcc, "PATH"


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)


def _cudart_static_dir(nvcc: str) -> str | None:
    candidates = []
    try:
        dryrun = _run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
        for line in (dryrun.stdout + dryrun.stderr).splitlines():
            if "LIBRARIES=" in line:
                candidates += re.findall(r'-L"?([^"\s]+)"?', line)
    except (OSError, subprocess.SubprocessError):
        pass
    top = Path(nvcc).resolve().parent.parent
    candidates += [str(top / "lib64"), str(top / "lib")]
    for directory in candidates:
        if (Path(directory) / "libcudart_static.a").is_file():
            return os.path.normpath(directory)
    return None


def find_cuda() -> tuple[CudaToolkit | None, str]:
    """Locate nvcc and libcudart_static.a; on failure return (None, reason)."""
    nvcc, found_via = _find_nvcc()
    if nvcc is None:
        return None, found_via
    try:
        output = _run([nvcc, "--version"]).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"`{nvcc} --version` failed: {exc}"
    match = re.search(r"release [\d.]+, V(\d+(?:\.\d+)*)", output) or re.search(
        r"release (\d+(?:\.\d+)*)", output
    )
    if match is None:
        return None, f"cannot parse the CUDA version from `{nvcc} --version`: {output!r}"
    library_dir = _cudart_static_dir(nvcc)
    if library_dir is None:
        return None, f"libcudart_static.a not found for {nvcc}"
    return CudaToolkit(nvcc, found_via, match.group(1), library_dir), ""


def _gencode_flags(arches: tuple[str, ...]) -> list[str]:
    flags = []
    for arch in arches:
        kind, number = arch.split("_")
        flags.append(f"-gencode=arch=compute_{number},code={kind}_{number}")
    return flags


def _c_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BuildExt(build_ext):
    """build_ext that adds the CUDA sources, compiled by nvcc, when a CUDA toolkit is usable."""

    def build_extensions(self) -> None:
        cuda, reason = find_cuda()
        if cuda is None and _env_flag("ECHOFAST_FORCE_CUDA"):
            raise PlatformError(
                f"ECHOFAST_FORCE_CUDA=1 but the CUDA toolkit is not usable: {reason}. Put nvcc "
                "on PATH or set CUDA_HOME to a toolkit that ships libcudart_static.a."
            )
        nvcc_flags = self._nvcc_flags()
        for ext in self.extensions:
            if cuda is not None:
                self._add_cuda(ext, cuda)
        self._log_config(cuda, reason, nvcc_flags)
        if cuda is not None:
            self._teach_nvcc(cuda.nvcc, nvcc_flags)
        super().build_extensions()

    @staticmethod
    def _nvcc_flags() -> list[str]:
        host_flags = ",".join(["-fPIC", "-fvisibility=hidden", *CXX_WARNINGS])
        return [
            f"-std=c++{CXX_STD}",
            "-O3",
            "--threads=0",
            f"--compiler-options={host_flags}",
            "-Icsrc/include",
            "-DECHOFAST_WITH_CUDA",
            *_gencode_flags(CUDA_ARCHES),
        ]

    @staticmethod
    def _add_cuda(ext: Pybind11Extension, cuda: CudaToolkit) -> None:
        ext.sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.cu"))
        ext.define_macros += [
            ("ECHOFAST_WITH_CUDA", None),
            ("ECHOFAST_CUDA_ARCHES", _c_string(";".join(CUDA_ARCHES))),
            ("ECHOFAST_NVCC_VERSION", _c_string(cuda.version)),
        ]
        ext.library_dirs.append(cuda.library_dir)
        ext.libraries += CUDART_STATIC_LIBS
        ext.extra_link_args.append("-Wl,--exclude-libs,libcudart_static.a")

    def _teach_nvcc(self, nvcc: str, nvcc_flags: list[str]) -> None:
        compiler = self.compiler
        compiler.src_extensions = [*compiler.src_extensions, ".cu"]
        default_compile = compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if ext != ".cu":
                return default_compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
            try:
                compiler.spawn([nvcc, "-c", src, "-o", obj, *nvcc_flags])
            except ExecError as exc:
                raise CompileError(exc) from exc

        compiler._compile = _compile

    def _log_config(self, cuda: CudaToolkit | None, reason: str, nvcc_flags: list[str]) -> None:
        cxx = getattr(self.compiler, "compiler_so_cxx", None) or self.compiler.compiler_so
        for ext in self.extensions:
            _log(f"extension {ext.name}: pybind11 {PYBIND11_VERSION}, C++{CXX_STD}")
            if cuda is None:
                _log(f"CUDA: skipped ({reason}); building the C++ part only")
                _log("      set ECHOFAST_FORCE_CUDA=1 to make a missing CUDA toolkit an error")
            else:
                _log(f"CUDA: enabled, nvcc {cuda.version} at {cuda.nvcc} (via {cuda.found_via})")
                _log(f"CUDA arches: {' '.join(CUDA_ARCHES)}")
                _log(f"nvcc flags: {shlex.join(nvcc_flags)}")
                _log(f"CUDA runtime: static, {cuda.library_dir}/libcudart_static.a")
            macros = [n if v is None else f"{n}={v}" for n, v in ext.define_macros]
            _log(f"C++ compiler: {shlex.join(cxx)}")
            _log(f"C++ flags: {shlex.join(ext.extra_compile_args)}")
            _log(f"C++ macros: {' '.join(macros) or '(none)'}")
            _log(f"sources: {' '.join(ext.sources)}")
            libs = [f"-l{lib}" for lib in ext.libraries]
            _log(f"link flags: {shlex.join([*ext.extra_link_args, *libs]) or '(none)'}")


def _packages() -> list[str]:
    kernels = ["echofast.kernels", *(f"echofast.kernels.{p}" for p in find_packages("kernels"))]
    return [*find_packages(include=["echofast", "echofast.*"]), *kernels]


def _ext_modules() -> list[Pybind11Extension]:
    if _env_flag("ECHOFAST_SKIP_EXT"):
        if _env_flag("ECHOFAST_FORCE_CUDA"):
            raise SystemExit("error: ECHOFAST_SKIP_EXT=1 and ECHOFAST_FORCE_CUDA=1 conflict")
        _log("ECHOFAST_SKIP_EXT=1: pure-Python install, extension echofast._C is not built")
        return []
    depends = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in {".h", ".hpp", ".cuh", ".cu", ".cpp"}
    )
    return [
        Pybind11Extension(
            "echofast._C",
            sources=["csrc/module.cpp", "csrc/cpu/build_info.cpp", "csrc/cpu/video.cpp"],
            include_dirs=["csrc/include"],
            depends=depends,
            extra_compile_args=["-O3", "-ffp-contract=off", *CXX_WARNINGS],
            cxx_std=CXX_STD,
        )
    ]


with ParallelCompile("ECHOFAST_BUILD_JOBS"):
    setup(
        packages=_packages(),
        package_dir={"echofast.kernels": "kernels"},
        package_data={
            "echofast.kernels": ["*.json"],  # tuned tile tables
            "echofast.train": ["configs/*.toml"],
            "echofast.weights": [
                "demo/*.json",
                "demo/*.md",
                "demo/*.png",
                "demo/*/*.json",
                "demo/*/*.safetensors",
            ],
        },
        ext_modules=_ext_modules(),
        cmdclass={"build_ext": BuildExt},
    )
