"""CUDA sources without a GPU: NVRTC compiles the kernel header (the cupy path), the torch binding
passes a syntax check, the host-side AdamW tables are laid out as the kernel expects; and, on a
GPU, the cuda / cupy backends against the reference."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

import lass_sparse as ls
from lass_sparse.backends import _cuda_common as cc
from lass_sparse.backends._cuda_common import (
    adamw_tables,
    cuda_include_dirs,
    kernel_source,
    nvrtc_options,
)
from lass_sparse.testing import require_backend

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nvrtc():
    try:
        import nvidia.cuda_nvrtc as pkg
    except ImportError:
        return None
    libs = glob.glob(os.path.join(list(pkg.__path__)[0], "lib", "libnvrtc.so*"))
    return ctypes.CDLL(sorted(libs)[0]) if libs else None


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernel_header_compiles_with_nvrtc(arch):
    """NVRTC with exactly the cupy backend's options and include folder (cuda_bf16.h)."""
    lib, inc = _nvrtc(), cuda_include_dirs()
    if lib is None or not inc:
        pytest.skip("needs nvidia-cuda-nvrtc (pip) and CUDA headers")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), kernel_source().encode(), b"k.cuh", 0,
                                  None, None) == 0
    opts = [o.encode() for o in nvrtc_options(inc)] + [f"-arch={arch}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()[-3000:]


def test_binding_compiles_and_exports_the_module_init(tmp_path):
    """`import lass_sparse._cuda` needs PyInit__cuda (the extension's name in setup.py): compile
    the binding to an object file and look for the exported symbol."""
    inc = next((d for d in glob.glob("/usr/local/cuda*/include")
                if os.path.exists(os.path.join(d, "cuda_runtime_api.h"))), None)
    if inc is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA toolkit headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")  # generated in CUDA wheels
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    obj = tmp_path / "binding.o"
    r = subprocess.run(["g++", "-std=c++17", "-O0", "-fPIC", "-c", f"-I{tmp_path}", f"-I{tinc}",
                        f"-I{tinc}/torch/csrc/api/include", f"-I{inc}", f"-I{REPO}/csrc",
                        f"-I{sysconfig.get_paths()['include']}", "-DPy_LIMITED_API=0x030A0000",
                        os.path.join(REPO, "csrc", "cuda", "binding.cpp"), "-o", str(obj)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(REPO, "setup.py")) as f:
        assert '"lass_sparse._cuda"' in f.read()
    nm = subprocess.run(["nm", "-g", "--defined-only", str(obj)], capture_output=True, text=True)
    assert nm.returncode == 0, nm.stderr
    exported = {ln.split()[-1] for ln in nm.stdout.splitlines() if " T " in ln}
    assert "PyInit__cuda" in exported  # C linkage: not mangled


def test_launchers_skip_zero_size_grids(tmp_path, nvcc_shared):
    """A zero-size grid is a launch error: every host launcher returns cudaSuccess without
    launching when there is nothing to do (N = 0 or M = 0 for the GEMV, empty masks...). Built
    with nvcc and called without a GPU: a launch attempt would return an error here."""
    lib = nvcc_shared(os.path.join(REPO, "csrc", "cuda", "lass_kernels.cu"), tmp_path / "lk.so",
                      opt="-O0")
    lk = ctypes.CDLL(str(lib))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    gemv = lk.lass_launch_decode_gemv
    gemv.argtypes = [ctypes.c_int, p, p, p, p, p, ctypes.c_int, i64, i64, p]
    for m, n in ((1, 0), (0, 64), (16, 0)):
        assert gemv(0, None, None, None, None, None, m, n, 64, None) == 0, (m, n)
    assert gemv(0, None, None, None, None, None, 1, 8, 64, None) != 0  # a real launch: no GPU
    pack = lk.lass_launch_pack
    pack.argtypes = [p, p, i64, i64, p]
    assert pack(None, None, 0, 40, None) == 0 and pack(None, None, 5, 0, None) == 0
    unpack = lk.lass_launch_unpack
    unpack.argtypes = [p, p, i64, i64, p]
    assert unpack(None, None, 0, 40, None) == 0
    mag = lk.lass_launch_magnitude_pack
    mag.argtypes = [ctypes.c_int, p, ctypes.c_float, p, i64, i64, p]
    assert mag(2, None, 0.5, None, 0, 40, None) == 0
    am = lk.lass_launch_apply_mask  # (dtype, src, bits, out, rows, k, accumulate, stream)
    am.argtypes = [ctypes.c_int, p, p, p, i64, i64, ctypes.c_int, p]
    for rows, k in ((0, 40), (7, 0)):
        assert am(2, None, None, None, rows, k, 1, None) == 0, (rows, k)
    assert am(2, None, None, None, 3, 40, 0, None) != 0  # a real launch: no GPU
    assert am(9, None, None, None, 3, 40, 0, None) != 0  # an unknown dtype code
    # small-M backward (dtype, dy, w, bits, dx, ws, m, n, k, splits, stream) /
    # (dtype, out_dtype, dy, x, bits, out, m, n, k, accumulate, stream)
    sdx = lk.lass_launch_small_dx
    sdx.argtypes = [ctypes.c_int, p, p, p, p, p, ctypes.c_int, i64, i64, ctypes.c_int, p]
    sdw = lk.lass_launch_small_dw
    sdw.argtypes = [ctypes.c_int, ctypes.c_int, p, p, p, p, ctypes.c_int, i64, i64,
                    ctypes.c_int, p]
    for m, n, k in ((0, 8, 8), (4, 0, 8), (4, 8, 0)):
        assert sdx(2, None, None, None, None, None, m, n, k, 1, None) == 0, (m, n, k)
        assert sdw(2, 2, None, None, None, None, m, n, k, 1, None) == 0, (m, n, k)
    assert sdx(2, None, None, None, None, None, 4, 8, 8, 1, None) != 0  # a real launch
    assert sdw(2, 0, None, None, None, None, 4, 8, 8, 1, None) != 0  # fp32 grad, real launch
    assert sdx(2, None, None, None, None, None, 17, 8, 8, 1, None) != 0  # > kSmallBwdMaxM
    assert sdx(2, None, None, None, None, None, 4, 8, 8, 2, None) != 0  # splits without ws
    assert sdx(2, None, None, None, None, None, 4, 8, 8, 0, None) != 0  # splits < 1
    assert sdw(2, 0, None, None, None, None, 4, 8, 8, 0, None) != 0  # fp32 dW: accumulate only
    assert sdw(9, 9, None, None, None, None, 4, 8, 8, 0, None) != 0  # an unknown dtype code
    # the decode GEMV's rows: 16, or 64 with LASS_SPARSE_CUDA_GEMV=v3 (read per call)
    rows = lk.lass_decode_gemv_max_rows
    old = os.environ.pop("LASS_SPARSE_CUDA_GEMV", None)
    try:
        assert rows() == 16
        os.environ["LASS_SPARSE_CUDA_GEMV"] = "v3"
        assert rows() == 64
        assert gemv(0, None, None, None, None, None, 40, 0, 64, None) == 0  # N = 0: no launch
        assert gemv(0, None, None, None, None, None, 40, 8, 64, None) != 0  # a real launch
        assert gemv(0, None, None, None, None, None, 65, 8, 64, None) != 0  # > 64 rows
    finally:
        os.environ.pop("LASS_SPARSE_CUDA_GEMV", None)
        if old is not None:
            os.environ["LASS_SPARSE_CUDA_GEMV"] = old


def test_one_abi_header_for_kernels_binding_and_loader():
    """lass_abi.h is the only definition of the shared structs and constants: the kernel header
    and the binding include it, the loader reads its constants, NVRTC gets it inlined once."""
    cuda = os.path.join(REPO, "csrc", "cuda")
    texts = {f: open(os.path.join(cuda, f)).read() for f in os.listdir(cuda)}
    assert [f for f, t in texts.items() if "struct AdamWTensor {" in t] == ["lass_abi.h"]
    assert [f for f, t in texts.items() if "constexpr int64_t kAdamWChunk" in t] == ["lass_abi.h"]
    for f in ("lass_kernels.cuh", "binding.cpp"):
        assert '#include "lass_abi.h"' in texts[f], f
    assert "65536" not in texts["binding.cpp"] and "512" not in texts["lass_kernels.cu"]
    abi = cc.abi()
    assert abi["dtype_codes"] == {"kFloat32": 0, "kFloat16": 1, "kBFloat16": 2}
    assert cc.DTYPE_CODE == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    assert (cc.GEMV_MAX_M, cc.ADAMW_CHUNK, cc.ADAMW_BLOCK) == (
        abi["kGemvMaxM"], abi["kAdamWChunk"], abi["kAdamWBlock"])
    assert tuple(abi["adamw_fields"]) == cc.ADAMW_FIELDS
    src = kernel_source()
    assert '#include "lass_abi.h"' not in src and src.count("struct AdamWTensor {") == 1
    tracked = subprocess.run(["git", "ls-files", "lass_sparse/_cuda_src"], cwd=REPO,
                             capture_output=True, text=True).stdout.split()
    assert tracked == []  # the shipped headers are build-time copies, not checked in


def test_adamw_tables_layout():
    ps = [torch.zeros(3, 40), torch.zeros(70000)]
    gs = [torch.zeros_like(p) for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    bits = [ls.pack_mask(torch.ones(3, 40, dtype=torch.bool)), None]
    table, ct, cs = adamw_tables(ps, gs, ms, vs, bits, chunk=65536)
    assert table.shape == (2, 8) and table[0, 4] == bits[0].data_ptr() and table[1, 4] == 0
    assert table[0, 5:].tolist() == [120, 40, 2] and table[1, 5:].tolist() == [70000, 70000,
                                                                               2188]
    assert ct.tolist() == [0, 1, 1] and cs.tolist() == [0, 0, 65536]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_gpu_backends_match_reference(backend):
    require_backend(backend)  # a _cuda that was built but does not load fails here
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 300, device=dev, dtype=dtype)
        w = torch.randn(70, 300, device=dev, dtype=dtype)
        mask = torch.rand(70, 300, device=dev) > 0.5
        with ls.use_backend("reference"):
            bits_ref = ls.pack_mask(mask)
            y_ref = ls.masked_linear(x, w, bits_ref)
            mag_ref = ls.magnitude_mask(w, 0.7)
        with ls.use_backend(backend):
            bits = ls.pack_mask(mask)
            assert torch.equal(bits, bits_ref)
            assert torch.equal(ls.unpack_mask(bits, 300), mask)
            assert torch.equal(ls.magnitude_mask(w, 0.7), mag_ref)
            y = ls.masked_linear(x, w, bits)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(y.float(), y_ref.float(), atol=tol * 17, rtol=tol)
    p = torch.randn(64, 100, device=dev)
    g, m, v = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
    b = ls.pack_mask(torch.rand(64, 100, device=dev) > 0.5)
    ref = [t.clone() for t in (p, m, v)]
    with ls.use_backend("reference"):
        ls.masked_adamw_([ref[0]], [g], [ref[1]], [ref[2]], [b], lr=1e-2, step=3)
    with ls.use_backend(backend):
        ls.masked_adamw_([p], [g], [m], [v], [b], lr=1e-2, step=3)
    off = ~ls.unpack_mask(b, 100)
    for a, r in zip((p, m, v), ref):
        assert torch.equal(a[off], r[off])
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


def test_native_checks_word_their_messages_without_iostreams():
    """csrc words errors with LASS_CHECK (common/message.h), never TORCH_CHECK's ostream: an
    extension built on the lent GPU machine segfaulted formatting a number through an ostream."""
    bad = []
    for path in glob.glob(os.path.join(REPO, "csrc", "**", "*.*"), recursive=True):
        if path.endswith("message.h"):
            continue
        with open(path) as f:
            for i, line in enumerate(f, 1):
                code = line.split("//", 1)[0]
                if "TORCH_CHECK" in code or "c10::str(" in code or "stringstream" in code:
                    bad.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
