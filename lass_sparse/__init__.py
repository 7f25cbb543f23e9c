"""lass_sparse: 1-bit packed per-pair masks fused into PyTorch kernels for LaSS
(Language-Specific Sub-networks for multilingual translation)."""

from __future__ import annotations

from .bitmask import validate_bits
from .ops import (
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
from .ops import registry as _registry
from .ops.registry import use_backend

__version__ = "0.1.0"

from .backends import load_all as _load_backends  # noqa: E402
from .masks import MaskBank  # noqa: E402
from .nn import (  # noqa: E402
    MaskedLinear,
    MaskedMultiheadAttention,
    MaskedTiedLinear,
    active_pair,
    attach,
    convert,
    materialized,
    set_active_pair,
)

_load_backends()


# Defined after the import above: the function shadows the subpackage attribute on purpose.
def backends() -> dict[str, dict[str, object]]:
    """For each backend (reference, cpu, triton, cuda, cupy): ``{"active": bool, "reason": str}``.

    ``reason`` says why an inactive backend is off and what to do about it.
    """
    return {
        n: {"active": s.active, "reason": s.reason} for n, s in _registry.status().items()
    }

__all__ = [
    "MaskBank",
    "MaskedLinear",
    "MaskedMultiheadAttention",
    "MaskedTiedLinear",
    "active_pair",
    "attach",
    "backends",
    "convert",
    "materialized",
    "set_active_pair",
    "magnitude_mask",
    "masked_adamw_",
    "masked_adamw_capturable_",
    "masked_cast",
    "masked_linear",
    "masked_qkv_proj",
    "pack_mask",
    "segmented_masked_linear",
    "unpack_mask",
    "use_backend",
    "validate_bits",
]
