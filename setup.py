"""Builds csrc/ into the extension module ``fastbert._wordpiece`` with ninja.

The extension links against nothing but the C++ standard library and Python (through pybind11), so the isolated
build environment needs setuptools, pybind11 and ninja and never torch. Every ``csrc/wordpiece/*.cc`` file is one
translation unit; ninja compiles them in parallel and only recompiles what changed. CUDA sources
(``csrc/wordpiece/*.cu``) are compiled with nvcc when it is found or when ``FASTBERT_CUDA=1`` asks for it, and
are skipped otherwise; ``FASTBERT_CUDA=0`` turns them off.

The packages are every ``fastbert.*`` package found under ``fastbert/`` plus ``fastbert.kernels``: the symlink
``fastbert/kernels -> ../kernels`` to the top-level ``kernels/`` folder, a namespace package with no ``__init__.py``
so that it never shadows Hugging Face's ``kernels`` from the repository root (kernels/README.md says why).
MANIFEST.in puts all of ``csrc/`` (headers, tables, CUDA sources, the table generator) in the sdist.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "csrc" / "wordpiece"
CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror=return-type"]


def _find_nvcc() -> str | None:
    wanted = os.environ.get("FASTBERT_CUDA", "auto")
    if wanted == "0":
        return None
    candidates = [shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")]
    nvcc = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if wanted == "1" and nvcc is None:
        raise RuntimeError("FASTBERT_CUDA=1 but nvcc was not found on PATH or in $CUDA_HOME/bin")
    return nvcc


def _cudart_dir(nvcc: str) -> Path:
    """The directory holding libcudart_static.a. nvcc may be a wrapper script outside the toolkit, and toolkits
    put their libraries in lib64, lib or targets/<arch>/lib, so look in each candidate root."""
    roots = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        str(Path(nvcc).resolve().parent.parent),
        "/usr/local/cuda",
    ]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", *(str(p.relative_to(root)) for p in Path(root).glob("targets/*/lib"))):
            if (Path(root) / sub / "libcudart_static.a").exists():
                return Path(root) / sub
    raise RuntimeError(
        f"nvcc is {nvcc} but libcudart_static.a was not found under {[r for r in roots if r]}; "
        "set CUDA_HOME to the CUDA toolkit, or FASTBERT_CUDA=0 to build without CUDA"
    )


def _ninja_binary() -> str:
    try:
        import ninja  # the PyPI wheel ships the binary

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if found is None:
            raise RuntimeError("ninja is required to build fastbert._wordpiece (pip install ninja)") from None
        return found


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for the extension's sources and runs it."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "wordpiece"
        build_dir.mkdir(parents=True, exist_ok=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)

        includes = [sysconfig.get_paths()["include"], pybind11.get_include(), str(SRC)]
        cxx = os.environ.get("CXX", "c++")
        cflags = CXXFLAGS + [f"-I{p}" for p in includes]
        nvcc = _find_nvcc()
        cu_sources = sorted(SRC.glob("*.cu")) if nvcc else []
        if cu_sources:
            cflags.append("-DFASTBERT_WITH_CUDA")
        ldflags = ["-shared"]
        if sys.platform == "darwin":
            ldflags += ["-undefined", "dynamic_lookup"]

        sources = sorted(SRC.glob("*.cc"))
        objects = []
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {' '.join(shlex.quote(f) for f in cflags)}",
            f"ldflags = {' '.join(ldflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
        ]
        for src in sources:
            obj = build_dir / (src.stem + ".o")
            objects.append(obj)
            lines.append(f"build {obj}: cxx {src}")

        link_extra = []
        if cu_sources:
            archs = os.environ.get("FASTBERT_CUDA_ARCHS", "80;90").split(";")
            gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
            lines += [
                f"nvcc = {nvcc}",
                f"nvflags = -std=c++17 -O3 -Xcompiler -fPIC {gencode} -DFASTBERT_WITH_CUDA -I{SRC}",
                "rule nvcc",
                "  command = $nvcc $nvflags -c $in -o $out",
                "  description = NVCC $in",
            ]
            for src in cu_sources:
                obj = build_dir / (src.stem + ".cu.o")
                objects.append(obj)
                lines.append(f"build {obj}: nvcc {src}")
            link_extra = [f"-L{_cudart_dir(nvcc)}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]

        lines += [
            "rule link",
            f"  command = $cxx $ldflags $in -o $out {' '.join(link_extra)}",
            "  description = LINK $out",
            f"build {out_path}: link {' '.join(str(o) for o in objects)}",
            f"default {out_path}",
        ]
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([_ninja_binary(), "-C", str(build_dir), "-j", jobs], check=True)


PACKAGES = [*find_packages(str(ROOT), include=["fastbert", "fastbert.*"]), "fastbert.kernels"]

setup(
    packages=PACKAGES,
    package_data={"fastbert.recipes": ["*.json"]},  # the shipped --config recipes
    ext_modules=[Extension("fastbert._wordpiece", sources=[str(p.relative_to(ROOT)) for p in SRC.glob("*.cc")])],
    cmdclass={"build_ext": NinjaBuildExt},
)
