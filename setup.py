"""Build lass_sparse's native extensions.

Always: ``lass_sparse._C``, the C++ CPU kernels (csrc/cpu, OpenMP, -O3).
When torch is a CUDA build and nvcc is found: ``lass_sparse._cuda`` (csrc/cuda).

Environment knobs:
  LASS_SPARSE_SKIP_CUDA_BUILD=1   never build the CUDA extension
  LASS_SPARSE_FORCE_CUDA_BUILD=1  build it even if torch.version.cuda is unset (cross-compile)
  TORCH_CUDA_ARCH_LIST            default "8.0;9.0"
  MAX_JOBS                        parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "lass_sparse builds against an installed torch. Install torch first, then build without "
        "isolation:  pip install torch==2.13.0 && pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _ship_cuda_sources() -> None:
    """Copy the torch-free kernel headers (lass_kernels.cuh and the ABI header lass_abi.h) into
    the package: the cupy backend compiles them at run time in installs that have no csrc/
    tree. The copies are build outputs (git-ignored), never a second checked-in source."""
    dst = os.path.join(HERE, "lass_sparse", "_cuda_src")
    os.makedirs(dst, exist_ok=True)
    for f in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cuh")) + glob.glob(
            os.path.join(HERE, "csrc", "cuda", "*.h")):
        shutil.copyfile(f, os.path.join(dst, os.path.basename(f)))


_ship_cuda_sources()


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def extensions():
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # No implicit FMA contraction: kernels write their FMAs explicitly, and the AVX-512 and
    # portable paths of one kernel then give the same bits (tests compare them).
    cxx = ["-O3", "-ffp-contract=off", *openmp]
    exts = [
        CppExtension(
            "lass_sparse._C",
            _rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
            py_limited_api=True,
        )
    ]
    want_cuda = not _flag("LASS_SPARSE_SKIP_CUDA_BUILD") and (
        _flag("LASS_SPARSE_FORCE_CUDA_BUILD") or torch.version.cuda is not None
    )
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")) + glob.glob(
        os.path.join(HERE, "csrc", "cuda", "*.cpp")
    )
    if want_cuda and not _nvcc():
        print(
            "lass_sparse: skipping the CUDA extension: nvcc not found (set CUDA_HOME or put nvcc "
            "on PATH; LASS_SPARSE_SKIP_CUDA_BUILD=1 silences this)",
            file=sys.stderr,
        )
    elif want_cuda and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        exts.append(
            CUDAExtension(
                "lass_sparse._cuda",
                _rel(cuda_sources),
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3"],
                    "nvcc": ["-O3", "-lineinfo"],
                },
                py_limited_api=True,
            )
        )
    return exts


class BuildExt(BuildExtension):
    """Build the optional CUDA extension softly: if it fails (and the build was not forced), warn
    and install the rest; the cupy backend or Triton then serve CUDA tensors."""

    def build_extension(self, ext):
        if ext.name != "lass_sparse._cuda" or _flag("LASS_SPARSE_FORCE_CUDA_BUILD"):
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(
                f"lass_sparse: WARNING: the CUDA extension failed to build ({e}); continuing "
                "without it. Set LASS_SPARSE_FORCE_CUDA_BUILD=1 to make this an error.",
                file=sys.stderr,
            )


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
