"""The ops (DESIGN §3): ``torch.library`` custom ops in namespace ``lass_sparse``, one schema and
one Python body each, backends chosen by device and availability.

Modules, by role (each imports only the ones above it):

- :mod:`.registry` — the backend registry: which kernels exist, which are active, which one a call
  runs (``use_backend``, ``$LASS_SPARSE_BACKEND``);
- :mod:`.checks` — input validation with the error wording;
- :mod:`.bodies` — each op's Python body: checks, normalisation, the registry's kernel;
- :mod:`.direct` — when a plain eager call may skip the custom-op wrapper;
- :mod:`.schema` — the custom ops: schemas, fake kernels, autograd, ``<op>.registry`` overloads;
- :mod:`.eager` — the public functions (docstrings with shapes), re-exported here and from
  :mod:`lass_sparse`.

Determinism: no kernel uses atomics or sums across threads, so every op is bit-identical run to
run (at a fixed CPU thread count) and ``torch.use_deterministic_algorithms(True)`` has nothing of
ours to refuse; which CPU routes also keep their bits across thread counts is in
csrc/cpu/linear.h and tests/ops/test_determinism.py.

Adding an op ``foo``:

1. ``checks.py``: ``check_foo`` (dtypes, shapes, devices; ``values=False`` for the fake);
2. ``bodies.py``: ``foo_body`` (check, normalise, ``registry.dispatch("foo", ...)``);
3. ``schema.py``: ``torch.library.custom_op(f"{NS}::foo", bodies.foo_body, ...)``, its fake,
   its autograd if differentiable, and an entry in ``NATIVE_BODIES`` if a C++ kernel registers
   under the name;
4. ``eager.py``: the public ``foo`` (and its name in ``__all__`` below and in
   ``lass_sparse/__init__.py``);
5. ``lass_sparse/reference.py``: the plain-PyTorch oracle, ``@register("foo", "reference", ALL)``;
6. backends: ``lass_sparse/backends/<name>.py`` registrations, native kernels in csrc/ with a
   ``TORCH_LIBRARY_IMPL(lass_sparse, CPU | CUDA)`` entry (csrc/common/entry.h);
7. tests: tests/ops/test_ops.py (opcheck, gradcheck float64, against the reference),
   tests/ops/test_hardening_ops.py (wrong sizes raise), tests/ops/test_determinism.py.
"""

from __future__ import annotations

from . import schema as _schema  # noqa: F401  (defines the ops before anything calls them)
from .eager import (
    magnitude_mask,
    masked_adamw_,
    masked_adamw_capturable_,
    masked_cast,
    masked_linear,
    masked_qkv_proj,
    pack_mask,
    segmented_masked_linear,
    unpack_mask,
)

__all__ = [
    "magnitude_mask",
    "masked_adamw_",
    "masked_adamw_capturable_",
    "masked_cast",
    "masked_linear",
    "masked_qkv_proj",
    "pack_mask",
    "segmented_masked_linear",
    "unpack_mask",
]
