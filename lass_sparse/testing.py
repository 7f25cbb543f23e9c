"""Test helpers shared by tests/, benchmarks/ and tools/gpu_check.py (no pytest import at module
level)."""

from __future__ import annotations

import os
import signal
import subprocess

import torch

from .ops import registry

# Floors of the flash-attention tolerance rule, relative to max |exact| (see within_torch_error).
FLOOR = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def skip_gpu_items_without_cuda(items) -> None:
    """Mark every item with the ``gpu`` marker as skipped when no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require_backend(name: str) -> None:
    """Skip the calling test when backend ``name`` is legitimately unavailable here; fail it when
    the backend is *broken* (e.g. its native module was built but does not import)."""
    import pytest

    st = registry.status()[name]
    if st.broken:
        pytest.fail(f"backend {name!r} is broken: {st.reason}")
    if not st.active:
        pytest.skip(f"backend {name!r} inactive: {st.reason}")


def triton_device() -> str:
    """Where the Triton backend runs here: CUDA tensors with a GPU (compiled kernels), else CPU
    tensors under ``TRITON_INTERPRET=1``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def within_torch_error(ours: torch.Tensor, torch_same: torch.Tensor, exact: torch.Tensor,
                       factor: float = 2.0) -> tuple[bool, str]:
    """The flash-attention tolerance rule: ``ours`` may be off the ``exact`` (float64) result by
    at most ``factor`` × torch's own error in the same dtype and precision mode (``torch_same``:
    the reference backend under the same TF32 setting) plus a small floor per dtype."""
    exact = exact.double()
    scale = float(exact.abs().max()) if exact.numel() else 0.0
    ours_err = float((ours.double() - exact).abs().max()) if exact.numel() else 0.0
    torch_err = float((torch_same.double() - exact).abs().max()) if exact.numel() else 0.0
    bound = factor * torch_err + FLOOR.get(ours.dtype, 1e-6) * (1.0 + scale)
    ok = ours_err <= bound
    return ok, f"err {ours_err:.3g} vs torch {torch_err:.3g} (bound {bound:.3g})"


def assert_grads_like_reference(loss_fn, *leaves: torch.Tensor, **tol) -> None:
    """The grads ``loss_fn().backward()`` left on ``leaves`` (cleared after) equal those of
    the same call under the reference backend."""
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    with registry.use_backend("reference"):
        loss_fn().backward()
    for a, t in zip(got, leaves):
        torch.testing.assert_close(a, t.grad, **tol)


def record_backends(monkeypatch) -> list[str]:
    """The backends the registry runs from now on, in order (it runs only where an op's body
    runs: a C++ entry that defers, or a backend without a native kernel)."""
    seen: list[str] = []
    run = registry._run

    def spy(impl, *a):
        seen.append(impl.backend)
        return run(impl, *a)

    monkeypatch.setattr(registry, "_run", spy)
    return seen


class _Kernels:
    """``<backend>_kernels.<op>(*args)``: the compiled kernel of ``<op>`` (``cpu``: csrc/cpu,
    ``cuda``: csrc/cuda) with its own checks and errors (``native``: no deferral to the op's
    Python body, see csrc/common/entry.h). For tests of what the kernels validate."""

    def __init__(self, backend: str):
        self._backend = backend

    def __getattr__(self, op: str):
        import importlib  # noqa: PLC0415 - only where that extension is built

        return importlib.import_module(f"lass_sparse.backends.{self._backend}").native(op)


cpu_kernels = _Kernels("cpu")
cuda_kernels = _Kernels("cuda")


def run_process_group(cmd: list[str], *, timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a session of its own: on
    timeout the whole process group is killed — the ranks a launcher started too, which
    ``subprocess.run`` would leave running — then ``TimeoutExpired`` is raised."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kw) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:  # exited meanwhile
                pass
            p.communicate()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
