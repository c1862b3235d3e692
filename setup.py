"""Build script: setuptools drives CMake to build the native extension ``maca_kernels._C``.

Metadata lives in pyproject.toml. Build with ``pip install --no-build-isolation -e .`` (torch is not a
build requirement; the extension does not include torch headers). Environment knobs:
  MACA_NATIVE=0     compile without -march=native (portable binary, scalar fallback kernels)
  MACA_BUILD_JOBS   parallel compile jobs (default: CPU count)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by the top-level CMakeLists.txt."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _find_tool(name: str) -> str | None:
    """Prefer the tool installed next to the running interpreter (pip's cmake/ninja wheels)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = _find_tool("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: pip install cmake")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A fixed directory (not setuptools' throw-away temp dir of editable installs) keeps rebuilds
        # incremental: `make build` after a C++ edit recompiles one file.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)

        native = os.environ.get("MACA_NATIVE", "1").lower() not in ("0", "off", "false", "no")
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMACA_OUTPUT_DIR={out_dir}",
            f"-DMACA_NATIVE={'ON' if native else 'OFF'}",
        ]
        ninja = _find_tool("ninja")
        if ninja is not None and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MACA_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("maca_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
