"""Issue 29's decode GEMV v2 (``LASS_SPARSE_CUDA_GEMV=v2``; csrc/cuda/lass_kernels.cuh
``decode_gemv2``): without a GPU, what nvcc makes of it (128-bit streamed loads, x from shared
memory, no local memory, no spills) and that the cupy loader launches it as the compiled launcher
does; on a GPU, both backends against the reference."""

from __future__ import annotations

import re

import pytest
import torch

import lass_sparse as ls
from lass_sparse.backends import _cuda_common as cc
from lass_sparse.testing import require_backend, within_torch_error

MTS, ROWS = (1, 2, 4, 8, 16), (2, 4)


def test_v2_ptx_streams_w_with_vector_loads_and_reads_x_from_shared(sm90_build):
    fns = sm90_build.ptx
    for sfx in ("f32", "f16", "bf16"):
        for mt in MTS:
            for rows in ROWS:
                f = fns[f"lass_decode_gemv2_{sfx}_m{mt}_r{rows}"]
                assert len(re.findall(r"ld\.global\.cs\.v4", f)) >= rows, (sfx, mt, rows)
                assert re.search(r"st\.shared\.v4", f) and re.search(r"ld\.shared\.v4", f)
                assert not re.search(r"ld\.local|st\.local", f), (sfx, mt, rows)
                # 16-bit global loads: the bias, once per output row of the warp
                assert len(re.findall(r"ld\.global[.a-z:_]*\.[ub]16", f)) <= rows


def test_every_kernel_compiles_without_spills_or_stack(sm90_build):
    """Every entry of lass_kernels.cu (v2 GEMV, small-M backward, ... all of them) keeps its
    working set in registers on sm_90."""
    v2 = [n for n in sm90_build.ptxas if n.startswith("lass_decode_gemv2_")]
    assert len(v2) == 3 * len(MTS) * len(ROWS)
    assert len(sm90_build.ptxas) == len(sm90_build.ptx)
    for name, b in sm90_build.ptxas.items():
        assert "0 bytes spill stores" in b and "0 bytes stack frame" in b, (name, b[:300])
        assert int(re.search(r"Used (\d+) registers", b).group(1)) <= 255, name


def test_cupy_plan_mirrors_the_launcher(monkeypatch):
    monkeypatch.delenv(cc.GEMV2_ENV, raising=False)
    x = torch.zeros(16, 4096, dtype=torch.bfloat16)
    w = torch.zeros(4096, 4096, dtype=torch.bfloat16)
    assert cc.gemv2_plan(x, w) is None  # default: v1
    monkeypatch.setenv(cc.GEMV2_ENV, "v2")
    a = cc.abi()
    assert cc.gemv2_plan(x, w) == ("m16_r2", 4096 // (a["kGemv2Threads"] // 32 * 2), 1024,
                                   16 * 1024 * 2)
    big = torch.zeros(16384, 8192, dtype=torch.bfloat16)
    assert cc.gemv2_plan(torch.zeros(1, 8192, dtype=torch.bfloat16), big)[:3] == (
        "m1_r4", 16384 // 32, 8192)
    assert cc.gemv2_plan(torch.zeros(3, 70), torch.zeros(5, 70)) is None  # K % 8: v1
    names = set(re.findall(r"LASS_GEMV2_KERNEL\(SUFFIX, T, (\d+), (\d+)\)",
                           cc._source("lass_kernels.cuh")))
    assert names == {(str(m), str(r)) for m in MTS for r in ROWS}
    for mt in MTS:
        plan = cc.gemv2_plan(torch.zeros(mt, 512), torch.zeros(64, 512))
        assert plan[0] == f"m{mt}_r2" and plan[3] <= a["kGemv2SmemBytes"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cupy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_v2_matches_reference(monkeypatch, backend, dtype):
    require_backend(backend)
    monkeypatch.setenv(cc.GEMV2_ENV, "v2")
    dev = "cuda"
    for m, n, k in ((1, 70, 64), (3, 257, 4104), (16, 300, 8192), (9, 17000, 256),
                    (5, 33, 20000)):
        x = torch.randn(m, k, device=dev, dtype=dtype)
        w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
        mask = torch.rand(n, k, device=dev) > 0.5
        w[~mask & (torch.rand(n, k, device=dev) > 0.9)] = float("nan")  # never used
        b = torch.randn(n, device=dev, dtype=dtype)
        bits = ls.pack_mask(mask)
        exact = x.double() @ torch.where(mask, w.double(), 0).T + b.double()
        with ls.use_backend("reference"):
            same = ls.masked_linear(x, w, bits, b)
        with ls.use_backend(backend):
            y = ls.masked_linear(x, w, bits, b)
        assert not y.isnan().any()
        ok, msg = within_torch_error(y, same, exact)
        assert ok, (m, n, k, msg)
