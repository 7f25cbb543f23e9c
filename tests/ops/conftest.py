"""Fixtures of the op tests: the CUDA kernels compiled once per session for sm_90 (no GPU
needed), PTX and ptxas's resource report together."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVCC = shutil.which("nvcc") or "/usr/local/cuda-13.0/bin/nvcc"


@dataclass
class Sm90Build:
    ptx: dict[str, str]     # entry name (mangled for templates) -> its PTX
    ptxas: dict[str, str]   # entry name -> ptxas -v's report (registers, stack, spills)


@pytest.fixture(scope="session")
def sm90_build(tmp_path_factory) -> Sm90Build:
    """csrc/cuda/lass_kernels.cu compiled with -O3 for sm_90 (nvcc -c, PTX kept)."""
    if not os.path.exists(NVCC):
        pytest.skip("needs nvcc")
    out = tmp_path_factory.mktemp("sm90")
    r = subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90", f"-I{REPO}/csrc", "-c",
                        os.path.join(REPO, "csrc", "cuda", "lass_kernels.cu"), "-o",
                        str(out / "k.o"), "-Xptxas", "-v", "--keep", "--keep-dir", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ptx = (out / "lass_kernels.ptx").read_text()
    entries = {f.split("(")[0].strip(): f for f in re.split(r"\.entry\s+", ptx)[1:]}
    reports = {b.split("'")[0]: b for b in re.split(r"Compiling entry function '", r.stderr)[1:]}
    return Sm90Build(entries, reports)


@pytest.fixture(scope="session")
def nvcc_shared():
    """``build(source, out, opt="-O1") -> out``: a host shared library of a CUDA source (sm_80,
    csrc/ on the include path), built with nvcc; skips where nvcc is missing."""
    if not os.path.exists(NVCC):
        pytest.skip("needs nvcc")

    def build(source: str, out, opt: str = "-O1"):
        r = subprocess.run([NVCC, "-std=c++17", opt, "-arch=sm_80", "-shared", "-Xcompiler",
                            "-fPIC", f"-I{REPO}/csrc", source, "-o", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return out

    return build
