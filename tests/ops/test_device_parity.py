"""Every public op, the nn modules and the optimizer, per device: CPU always, CUDA where a GPU
exists (``gpu`` marker), each active backend of that device forced, against the reference
backend with the flash-attention tolerance rule (the case list of tools/gpu_check.py, which
``make gpu-check`` runs over every dtype on a lent GPU)."""

from __future__ import annotations

import pytest
from gpu_check_loader import load_gpu_check

import lass_sparse as ls

GC = load_gpu_check()
CASES = [name for name, _, _ in GC.cases(small=True)]
# CPU: the C++ kernels against the reference (the Triton interpreter runs in test_gpu_check's
# dry run); CUDA: every GPU backend.
BACKENDS = {"cpu": ["cpu"], "cuda": list(GC.GPU_BACKENDS)}
DTYPES = {"cpu": ["fp32", "bf16"], "cuda": ["fp32", "tf32", "bf16", "fp16"]}


PAIRS = [pytest.param(d, b, marks=[pytest.mark.gpu] if d == "cuda" else [], id=f"{d}-{b}")
         for d, bs in BACKENDS.items() for b in bs]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("device", "backend"), PAIRS)
def test_backend_matches_reference(device, backend, case):
    info = ls.backends()[backend]
    if not info["active"]:
        pytest.skip(f"backend {backend} inactive: {info['reason']}")
    rows = GC.run_cases(device, [backend], DTYPES[device], small=True, only=case)
    rows = [r for r in rows if r.case == case]
    assert rows, f"no rows for {case}"
    bad = [f"{r.dtype}: {r.status} {r.detail}" for r in rows if r.status not in ("PASS", "N/A")]
    assert not bad, "\n".join(bad)
