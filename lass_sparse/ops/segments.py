"""The host view of a segment table (``seg_offsets``, ``seg_pair``), read from the device once.

Every segmented op needs the table's values on the host: the checks, the per-pair routes, the
row-tile tables of the v1 Triton kernels. Reading a CUDA tensor's values is a device→host sync,
so a table is read once and remembered, keyed by the offsets tensor itself (weakly: the entry
goes with the tensor) together with the pair tensor and both version counters: a change made in
place through PyTorch (which bumps the version) forces a new read.

Tensors made under ``torch.inference_mode`` have no version counter: they are read at every call,
unless registered with :func:`remember` by code that built them and never changes them — the
nn layers do that for the tables of their mixed-pair batches, which they build on the host. A
forward and backward of a mixed-pair model then reads no table from the device at all, and its
CUDA calls can be captured into a graph.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["host_table", "remember", "spans", "device_tiles"]


@dataclass
class _Entry:
    pair: weakref.ref
    versions: tuple[int, int] | None  # None: registered by its builder, never changed in place
    offs: list[int]
    pairs: list[int]
    derived: dict = field(default_factory=dict)  # e.g. device tile tables, per (block_m, device)


_TABLES = WeakTensorKeyDictionary()
_LOCK = threading.Lock()


def _versions(seg_offsets: Tensor, seg_pair: Tensor) -> tuple[int, int] | None:
    if seg_offsets.is_inference() or seg_pair.is_inference():
        return None
    return seg_offsets._version, seg_pair._version


def _entry(seg_offsets: Tensor, seg_pair: Tensor) -> _Entry | None:
    with _LOCK:
        e = _TABLES.get(seg_offsets)
    if e is None or e.pair() is not seg_pair:
        return None
    if e.versions is not None and e.versions != _versions(seg_offsets, seg_pair):
        return None
    return e


def remember(seg_offsets: Tensor, seg_pair: Tensor, offs: list[int], pairs: list[int]) -> None:
    """Register the values of a table its caller built and will not change in place."""
    with _LOCK:
        _TABLES[seg_offsets] = _Entry(weakref.ref(seg_pair), None, list(offs), list(pairs))


def _lookup(seg_offsets: Tensor, seg_pair: Tensor) -> _Entry:
    e = _entry(seg_offsets, seg_pair)
    if e is None:
        e = _Entry(weakref.ref(seg_pair), _versions(seg_offsets, seg_pair),
                   seg_offsets.tolist(), seg_pair.tolist())
        if e.versions is not None:  # untracked tensors are not cached (see the module's text)
            with _LOCK:
                _TABLES[seg_offsets] = e
    return e


def host_table(seg_offsets: Tensor, seg_pair: Tensor) -> tuple[list[int], list[int]]:
    """``(offsets, pairs)`` as Python lists (do not modify them)."""
    e = _lookup(seg_offsets, seg_pair)
    return e.offs, e.pairs


def _spans(e: _Entry) -> list[tuple[int, int, int]]:
    offs = e.offs
    return [(offs[i], offs[i + 1], p) for i, p in enumerate(e.pairs) if offs[i + 1] > offs[i]]


def spans(seg_offsets: Tensor, seg_pair: Tensor) -> list[tuple[int, int, int]]:
    """The non-empty segments as ``(first row, end row, pair)``."""
    return _spans(_lookup(seg_offsets, seg_pair))


def device_tiles(seg_offsets: Tensor, seg_pair: Tensor, block_m: int | None,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The non-empty segments as int32 ``(lo, hi, pair)`` on ``device``; with ``block_m``, split
    into tiles of at most ``block_m`` rows. Built (one host→device copy) once per table."""
    e = _lookup(seg_offsets, seg_pair)
    key = (block_m, torch.device(device))
    got = e.derived.get(key)
    if got is None:
        lo, hi, pr = [], [], []
        for a, b, p in _spans(e):
            step = block_m or b - a
            for s in range(a, b, step):
                lo.append(s)
                hi.append(min(b, s + step))
                pr.append(p)
        got = tuple(torch.tensor(v, dtype=torch.int32).to(device) for v in (lo, hi, pr))
        e.derived[key] = got
    return got
