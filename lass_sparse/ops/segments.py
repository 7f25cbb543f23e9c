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

A table that is not known on the host while a CUDA graph is being captured (a device→host read is
an error there) — e.g. one a compiled model builds on the device — is never read: it is checked
on the device (``torch._assert_async``) and its tile tables are computed on the device with a
static size (:func:`device_tiles`), so a replay uses the table's values at replay time.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["host_table", "remember", "spans", "device_tiles", "readable", "check_on_device",
           "bounded"]


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
    """Register the values of a table its caller built and will not change in place. A CUDA
    table is registered with the C++ extension too (``lass_sparse_cpu::remember_table``): the
    CUDA entries then take segmented calls with it straight from the dispatcher."""
    with _LOCK:
        _TABLES[seg_offsets] = _Entry(weakref.ref(seg_pair), None, list(offs), list(pairs))
    if seg_offsets.is_cuda and _native_remember() is not None:
        _native_remember()(seg_offsets, seg_pair, list(offs), list(pairs))


@functools.cache
def _native_remember():
    """``lass_sparse_cpu::remember_table`` where the C++ extension is built, else None."""
    try:
        return torch.ops.lass_sparse_cpu.remember_table.default
    except (AttributeError, RuntimeError):
        return None


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


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def readable(seg_offsets: Tensor, seg_pair: Tensor) -> bool:
    """The table's values may be had on the host: known already (remembered, or read before and
    unchanged), or a read is allowed (not during CUDA graph capture)."""
    return not _capturing(seg_offsets) or _entry(seg_offsets, seg_pair) is not None


def check_on_device(op: str, t: int, p: int, seg_offsets: Tensor, seg_pair: Tensor) -> None:
    """The value checks of an unreadable table, asserted on the device without a sync (a bad
    table fails at a later CUDA call, as PyTorch's own device asserts do; on the CPU at once)."""
    offs = seg_offsets.to(torch.int64)
    ok = (offs[0] == 0) & (offs[-1] == t) & (offs[1:] >= offs[:-1]).all()
    ok &= ((seg_pair >= 0) & (seg_pair < p)).all()
    torch._assert_async(ok, f"{op}: seg_offsets must be non-decreasing from 0 to T={t} and "
                            f"seg_pair ids in [0, P={p})")


def bounded(seg_offsets: Tensor, seg_pair: Tensor, rows: int, p: int) -> tuple[Tensor, Tensor]:
    """int64 offsets clamped to ``[0, rows]`` and made non-decreasing, pair ids clamped to
    ``[0, p)``: an unread table can then address no row or mask outside the tensors (its errors
    are :func:`check_on_device`'s)."""
    offs = seg_offsets.to(torch.int64).clamp(0, rows).cummax(0).values
    return offs, seg_pair.to(torch.int64).clamp(0, max(p - 1, 0))


def _spans(e: _Entry) -> list[tuple[int, int, int]]:
    offs = e.offs
    return [(offs[i], offs[i + 1], p) for i, p in enumerate(e.pairs) if offs[i + 1] > offs[i]]


def spans(seg_offsets: Tensor, seg_pair: Tensor) -> list[tuple[int, int, int]]:
    """The non-empty segments as ``(first row, end row, pair)``."""
    return _spans(_lookup(seg_offsets, seg_pair))


def device_tiles(seg_offsets: Tensor, seg_pair: Tensor, block_m: int | None, x: Tensor,
                 bank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The non-empty segments of the rows of ``x`` as int32 ``(lo, hi, pair)`` on its device;
    with ``block_m``, split into tiles of at most ``block_m`` rows. Built (one host→device copy)
    once per table; for an unreadable table (:func:`readable`) computed on the device at every
    call instead, padded with empty tiles (``lo == hi``) to the static bound
    ``cdiv(T, block_m) + S``, offsets clamped to ``[0, T]`` and pairs to the ``bank``'s range, so
    no tile reaches outside the tensors before :func:`check_on_device`'s assert fires."""
    if not readable(seg_offsets, seg_pair):
        return _tiles_on_device(seg_offsets, seg_pair, block_m, x.device, x.shape[0],
                                bank.shape[0])
    e = _lookup(seg_offsets, seg_pair)
    key = (block_m, x.device)
    got = e.derived.get(key)
    if got is None:
        lo, hi, pr = [], [], []
        for a, b, p in _spans(e):
            step = block_m or b - a
            for s in range(a, b, step):
                lo.append(s)
                hi.append(min(b, s + step))
                pr.append(p)
        got = tuple(torch.tensor(v, dtype=torch.int32).to(x.device) for v in (lo, hi, pr))
        e.derived[key] = got
    return got


def _tiles_on_device(seg_offsets: Tensor, seg_pair: Tensor, block_m: int | None,
                     device: torch.device, rows: int, p: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`device_tiles` from tensor ops of static size (no host read)."""
    offs, pairs = bounded(seg_offsets.to(device), seg_pair.to(device), rows, p)
    if block_m is None or pairs.numel() == 0:
        return tuple(v.to(torch.int32) for v in (offs[:-1], offs[1:], pairs))
    lens = offs[1:] - offs[:-1]
    ntiles = (lens + block_m - 1) // block_m
    cum = torch.cumsum(ntiles, 0)
    idx = torch.arange((rows + block_m - 1) // block_m + pairs.numel(), device=device)
    seg = torch.searchsorted(cum, idx, right=True)
    valid = seg < pairs.numel()
    seg = seg.clamp_max(pairs.numel() - 1)
    lo = offs[seg] + (idx - (cum[seg] - ntiles[seg])) * block_m
    hi = torch.minimum(offs[seg + 1], lo + block_m)
    zero = torch.zeros_like(lo)
    return tuple(torch.where(valid, v, zero).to(torch.int32) for v in (lo, hi, pairs[seg]))
