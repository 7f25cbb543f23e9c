"""What a GPU machine would select and launch, checked on CPU with simulated CUDA availability:
backend registration and selection, the test-suite setup (interpreter only without a GPU), the
CUDA-extension loader, and the cupy launches (raw pointers, device guard, dtype groups) against
a fake cupy."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import lass_sparse as ls
from lass_sparse.backends import _cuda_common
from lass_sparse.ops import registry as _registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.is_available() is True; registry tables private to the test."""
    monkeypatch.setattr(_registry, "_impls", {k: list(v) for k, v in _registry._impls.items()})
    monkeypatch.setattr(_registry, "_status", dict(_registry._status))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_simulated_cuda_selection(fake_cuda):
    """With CUDA, Triton serves CUDA tensors (not explicit-only, under a device guard), the
    tests pick CUDA tensors for it, and forcing it for CPU tensors is a clear error."""
    from lass_sparse.testing import triton_device

    for lst in _registry._impls.values():  # as on a GPU machine: no interpreter kernels
        lst[:] = [i for i in lst if i.backend != "triton"]
    importlib.reload(importlib.import_module("lass_sparse.backends.triton"))
    assert ls.backends()["triton"]["active"], ls.backends()["triton"]["reason"]
    for op in ("masked_linear", "masked_linear_dx", "masked_linear_dw", "masked_qkv_proj",
               "segmented_masked_linear"):
        tri = [i for i in _registry._impls[op] if i.backend == "triton" and "cuda" in i.devices]
        assert len(tri) == 1 and not tri[0].explicit_only and tri[0].device_guard, op
    assert triton_device() == "cuda"
    x = torch.zeros(64, 32)
    assert _registry.select("masked_linear", "cuda", x).backend == "triton"
    assert _registry.select("masked_linear", "cuda", x.double()).backend != "triton"
    with ls.use_backend("triton"):
        assert _registry.select("masked_linear", triton_device(), x).backend == "triton"
        with pytest.raises(_registry.BackendCannotServe, match="no kernel for cpu tensors"):
            _registry.select("masked_linear", "cpu", x)
        with pytest.raises(_registry.BackendCannotServe, match="float32, float16 or bfloat16"):
            _registry.select("masked_linear", "cuda", x.double())


@pytest.mark.parametrize("conftest", ["tests/conftest.py", "benchmarks/conftest.py"])
@pytest.mark.parametrize("cuda", [True, False])
def test_conftest_sets_the_interpreter_only_without_a_gpu(conftest, cuda):
    code = (f"import torch; torch.cuda.is_available = lambda: {cuda}\n"
            f"import runpy, os, sys; sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r})\n"
            f"runpy.run_path({os.path.join(REPO, conftest)!r})\n"
            "print('INTERP=' + str(os.environ.get('TRITON_INTERPRET')))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == ("INTERP=None" if cuda else "INTERP=1")


def test_cuda_extension_loader_reports_built_but_broken():
    from lass_sparse.backends import cuda

    def fail(name):
        raise ImportError(f"dynamic module does not define module export function (PyInit_{name})")

    spec = types.SimpleNamespace(origin="/x/lass_sparse/_cuda.abi3.so")
    mod, reason, broken = cuda.load(import_module=fail, find_spec=lambda n: spec)
    assert mod is None and broken and "was built (/x/lass_sparse/_cuda.abi3.so)" in reason
    mod, reason, broken = cuda.load(import_module=fail, find_spec=lambda n: None)
    assert mod is None and not broken and "not built" in reason
    sentinel = object()
    assert cuda.load(import_module=lambda n: sentinel, find_spec=lambda n: spec)[0] is sentinel


def test_cuda_backend_broken_status_with_simulated_gpu(fake_cuda, monkeypatch):
    """The module-level load: a built but unimportable _cuda marks the backend broken."""
    from lass_sparse.backends import cuda

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: types.SimpleNamespace(origin="/x/_cuda.so")
                        if n == cuda.MODULE else None)
    real_import = importlib.import_module

    def imp(name, package=None):
        if name == cuda.MODULE:
            raise ImportError("undefined symbol")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", imp)
    try:
        importlib.reload(cuda)
        st = _registry.status()["cuda"]
        assert not st.active and st.broken and "fails to import" in st.reason
    finally:
        monkeypatch.undo()
        importlib.reload(cuda)


class _FakeCupy(types.ModuleType):
    """Records RawModule compiles and kernel launches."""

    def __init__(self):
        super().__init__("cupy")
        self.launches, self.compiles, self.devices = [], [], []
        fake = self

        class Fn:
            def __init__(self, name):
                self.name = name

            def __call__(self, grid, block, args, shared_mem=0):  # cupy's RawKernel call
                fake.launches.append((self.name, grid, block, args, list(fake.devices)))

        class RawModule:
            def __init__(self, code, options):
                fake.compiles.append(options)

            def get_function(self, name):
                return Fn(name)

        class Ctx:
            def __init__(self, *a):
                self.a = a

            def __enter__(self):
                fake.devices.append(self.a)

            def __exit__(self, *e):
                fake.devices.pop()

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(ExternalStream=lambda *a: Ctx("stream", *a),
                                          Device=lambda d: Ctx("device", d),
                                          get_cuda_path=lambda: None)


@pytest.fixture
def fake_cupy(fake_cuda, monkeypatch):
    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda d=None: types.SimpleNamespace(cuda_stream=1234))
    from lass_sparse.backends import cupy as cupy_backend

    monkeypatch.setattr(_cuda_common, "cuda_include_dirs", lambda: ["/fake/cuda/include"])
    importlib.reload(cupy_backend)
    assert ls.backends()["cupy"]["active"], ls.backends()["cupy"]["reason"]
    impls = {op: [i for i in lst if i.backend == "cupy"][0] for op, lst in
             _registry._impls.items() if any(i.backend == "cupy" for i in lst)}
    yield fake, impls
    monkeypatch.undo()
    importlib.reload(cupy_backend)  # back to "no CUDA GPU visible"


def test_cupy_passes_raw_pointers_not_cupy_arrays(fake_cupy):
    """bf16 has no cupy dtype (torch exports it as '<V2'): every tensor goes as its address."""
    fake, impls = fake_cupy
    assert all(i.device_guard for i in impls.values())
    x = torch.randn(3, 70, dtype=torch.bfloat16)
    w = torch.randn(40, 70, dtype=torch.bfloat16)
    bits = ls.pack_mask(torch.rand(40, 70) > 0.5)
    y = impls["masked_linear"].fn(x, w, bits, None)
    name, grid, block, args, ctx = fake.launches[-1]
    assert name == "lass_decode_gemv_bf16" and grid == (5,) and block == (256,)
    assert [a for a in args[:5]] == [np.uint64(x.data_ptr()), np.uint64(w.data_ptr()),
                                     np.uint64(bits.data_ptr()), np.uint64(0),
                                     np.uint64(y.data_ptr())]
    assert all(isinstance(a, (np.uint64, np.int32, np.int64, np.float32)) for a in args)
    assert ("device", 0) in ctx and any(c[0] == "stream" and c[1] == 1234 for c in ctx)
    assert fake.compiles == [("--std=c++17", "-I/fake/cuda/include")]
    impls["magnitude_mask"].fn(w, 0.5)
    assert fake.launches[-1][0] == "lass_magnitude_pack_bf16"
    assert fake.launches[-1][3][0] == np.uint64(w.contiguous().data_ptr())


def test_cupy_skips_empty_launches_and_groups_adamw_by_dtype(fake_cupy):
    fake, impls = fake_cupy
    n0 = len(fake.launches)
    impls["masked_linear"].fn(torch.randn(3, 70), torch.randn(0, 70),
                              torch.zeros(0, 3, dtype=torch.int32), None)
    impls["pack_mask"].fn(torch.zeros(0, 40, dtype=torch.bool))
    assert len(fake.launches) == n0
    ps = [torch.zeros(4, 40), torch.zeros(4, 40, dtype=torch.bfloat16), torch.zeros(7)]
    gs = [torch.zeros_like(p) for p in ps]
    ms = [torch.zeros(p.shape) for p in ps]
    vs = [torch.zeros(p.shape) for p in ps]
    bits = [ls.pack_mask(torch.ones(4, 40, dtype=torch.bool)), None, None]
    impls["masked_adamw_"].fn(ps, gs, ms, vs, bits, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
    names = sorted(ln[0] for ln in fake.launches[n0:])
    assert names == ["lass_masked_adamw_bf16", "lass_masked_adamw_f32"]


def test_cupy_without_cuda_headers_is_inactive_with_a_clear_reason(fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy())
    monkeypatch.setattr(_cuda_common, "cuda_include_dirs", lambda: [])
    from lass_sparse.backends import cupy as cupy_backend

    try:
        importlib.reload(cupy_backend)
        st = _registry.status()["cupy"]
        assert not st.active and "cuda_bf16.h was not found" in st.reason
    finally:
        monkeypatch.undo()
        importlib.reload(cupy_backend)
