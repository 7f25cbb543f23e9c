"""The packed-mask format (DESIGN §2) in plain PyTorch, plus the checks every op uses.

A mask ``bool[..., K]`` packs to ``int32[..., ceil(K/32)]``: bit ``j`` (LSB first) of word ``w``
is ``mask[..., 32*w + j]``; padding bits are 0. This equals
``numpy.packbits(mask, axis=-1, bitorder="little")`` padded to a multiple of 4 bytes and viewed
as little-endian int32.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def num_words(k: int) -> int:
    """Words per row for ``k`` columns: ``ceil(k / 32)``."""
    return (k + WORD_BITS - 1) // WORD_BITS


def _shape(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def check_bits(bits: torch.Tensor, rows: tuple[int, ...], k: int, op: str, name: str = "bits"):
    """Raise a clear error unless ``bits`` is ``int32[*rows, ceil(k/32)]``."""
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(bits).__name__}")
    want = [*rows, num_words(k)]
    if bits.dtype != torch.int32 or list(bits.shape) != want:
        raise ValueError(
            f"{op}: {name} must be int32{want} (ceil(K/32) words per row, K={k}), "
            f"got {_shape(bits)}"
        )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise unless all given tensors live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            raise ValueError(
                f"{op}: all tensors must be on one device; {items[0][0]} is on {dev}, "
                f"{n} is on {t.device}"
            )


def pack_mask_reference(mask: torch.Tensor) -> torch.Tensor:
    """``bool[..., K] -> int32[..., ceil(K/32)]`` in plain PyTorch (the oracle)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask: mask must be bool[..., K], got {_shape(mask)}")
    *lead, k = mask.shape
    w = num_words(k)
    pad = w * WORD_BITS - k
    m = torch.nn.functional.pad(mask.to(torch.int64), (0, pad)) if pad else mask.to(torch.int64)
    m = m.reshape(*lead, w, WORD_BITS)
    shifts = torch.arange(WORD_BITS, device=mask.device, dtype=torch.int64)
    words = (m << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_mask_reference(bits: torch.Tensor, k: int) -> torch.Tensor:
    """``int32[..., ceil(k/32)] -> bool[..., k]`` in plain PyTorch (the oracle)."""
    if bits.dtype != torch.int32 or bits.dim() < 1 or bits.shape[-1] != num_words(k):
        raise ValueError(
            f"unpack_mask: bits must be int32[..., ceil(k/32)={num_words(k)}], got {_shape(bits)}"
        )
    shifts = torch.arange(WORD_BITS, device=bits.device, dtype=torch.int32)
    out = ((bits.unsqueeze(-1) >> shifts) & 1).bool()
    return out.reshape(*bits.shape[:-1], bits.shape[-1] * WORD_BITS)[..., :k].contiguous()


def padding_word_mask(k: int) -> int:
    """int32 value whose set bits are the padding bits of the last word (0 if none)."""
    r = k % WORD_BITS
    if r == 0:
        return 0
    v = (~((1 << r) - 1)) & 0xFFFFFFFF
    return v - 2**32 if v >= 2**31 else v


def validate_bits(bits: torch.Tensor, k: int, name: str = "bits") -> torch.Tensor:
    """Check that ``bits`` is a well-formed packed mask for ``k`` columns; return it.

    Raises ``ValueError`` for a wrong dtype or last dimension and for nonzero padding bits.
    """
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.int32 or bits.dim() < 1:
        got = _shape(bits) if isinstance(bits, torch.Tensor) else type(bits).__name__
        raise ValueError(f"validate_bits: {name} must be int32[..., ceil(k/32)], got {got}")
    if bits.shape[-1] != num_words(k):
        raise ValueError(
            f"validate_bits: {name} must have ceil(k/32)={num_words(k)} words per row for "
            f"k={k}, got {_shape(bits)}"
        )
    pad = padding_word_mask(k)
    if pad and bits.numel():
        bad = (bits[..., -1] & pad) != 0
        if bool(bad.any()):
            n = int(bad.sum())
            raise ValueError(
                f"validate_bits: {name} has nonzero padding bits (bits {k % WORD_BITS}..31 of the "
                f"last word must be 0 for k={k}) in {n} row(s)"
            )
    return bits


def popcount(bits: torch.Tensor) -> torch.Tensor:
    """Number of set bits per int32 word (int64, same shape), without unpacking."""
    v = bits.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24
