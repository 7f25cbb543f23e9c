"""Issue 29's "W as A" Triton kernels: a selectable variant beside ``kernels.py`` (the default).

``LASS_SPARSE_TRITON_VARIANT`` picks, per call, what the triton backend's GEMM-shaped ops run:

- ``v1`` (default): ``kernels.py`` — the fused kernels below ``LASS_SPARSE_CUBLAS_MIN_M`` rows,
  the "W ⊙ M in one pass, then cuBLAS" route from there on;
- ``wt``: the kernels here at every M (no W-sized transient);
- ``wt_persistent``: the same, forward on a persistent grid (one program per SM);
- ``wt_tma``: the same, the forward's x tiles loaded by the TMA unit (a host-built tensor
  descriptor, [BLOCK_M, 32] boxes; needs 16-byte aligned x rows, else the pointer loads run).

What differs from ``kernels.py``:

- forward and dx compute the *transposed* product, ``yᵀ = (W ⊙ M) xᵀ`` and ``dxᵀ = (W ⊙ M)ᵀ
  dyᵀ``, so the masked weight tile is the first (A) operand of ``tl.dot``: on Hopper wgmma takes
  A from registers, where the mask is applied, and B (x, dy) from shared memory; a small M
  becomes wgmma's N (8..256), not a padded 64-row M;
- the mask words are loaded by *broadcast pointers* — a [rows, BLOCK_K] tile of int32 where the 32
  columns of one word read the same address — and expanded with a shift, ``(word >> (k % 32)) &
  1``: the keep-mask has the W tile's own layout (no reshape, so no layout conversion);
- programs are ordered with a GROUP swizzle (tiles of GROUP weight-row blocks walk all x blocks
  while those W rows stay in L2), BLOCK_N up to 256;
- optional split-K for small M: partial sums into an fp32 workspace ``[SPLIT_K, M, N]``, summed
  by ``torch.sum`` (a fixed order: deterministic, no atomics);
- dW is one GEMM ``dyᵀ x`` with the mask in the epilogue; accumulation into ``grad`` (fp32 or x's
  dtype) *stores only on-mask entries*, so off-mask entries keep their exact bits;
- the segmented forward and dx are one launch each over a device-side tile table (per-segment
  tile counts, their cumulative sum, all on the device: no host sync), dx split-K over N when
  the tiles are few; the segmented dW is one launch over (N, K) tiles, each walking the segments
  with the pair's mask in the epilogue of each segment's GEMM, split over the rows into an fp32
  workspace when the tiles are few (summed in a fixed order); no W ⊙ M transient for any pair.

Calls the variant does not take (mixed dtypes, float64) run ``kernels.py``'s kernels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...ops.segments import bounded, readable
from .common import INTERPRET, _dot, _dw_tile, _ieee, _rows, cdiv

VARIANT_ENV = "LASS_SPARSE_TRITON_VARIANT"
VARIANTS = ("v1", "wt", "wt_persistent", "wt_tma")
SPLIT_K_ENV = "LASS_SPARSE_TRITON_SPLIT_K"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def variant() -> str:
    """The triton backend's kernel variant for this call (``$LASS_SPARSE_TRITON_VARIANT``)."""
    v = os.environ.get(VARIANT_ENV) or "v1"
    if v not in VARIANTS:
        raise ValueError(f"{VARIANT_ENV}={v!r}: expected one of {', '.join(VARIANTS)}")
    return v


def takes(*tensors) -> bool:
    """The variant serves calls whose float tensors share one dtype of fp32/fp16/bf16."""
    dts = {t.dtype for t in tensors if t is not None}
    return len(dts) == 1 and next(iter(dts)) in _FLOATS


# ------------------------------------------------------------------------------------ device


@triton.jit
def _swizzle(pid, num_a, num_b, GROUP: tl.constexpr):
    """Tile ``pid`` -> (a, b) block indices, GROUP a-blocks walking all b-blocks together."""
    in_group = GROUP * num_b
    first_a = (pid // in_group) * GROUP
    size_a = tl.minimum(num_a - first_a, GROUP)
    a = first_a + (pid % in_group) % size_a
    b = (pid % in_group) // size_a
    return a, b


@triton.jit
def _masked_w(w_ptr, bits_ptr, rn, rk, N, K, swn, sbn):
    """(W ⊙ M)[rn, rk] as a [len(rn), len(rk)] tile (rn along dim 0). The mask word of each
    element is loaded through its own pointer (the 32 columns of a word share the address: a
    broadcast load) and expanded with a shift: the keep-mask has the W tile's layout."""
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    w = tl.load(w_ptr + _rows(rn, swn)[:, None] + rk[None, :], mask=inb, other=0.0)
    word = tl.load(bits_ptr + _rows(rn, sbn)[:, None] + (rk // 32)[None, :], mask=inb, other=0)
    keep = ((word >> (rk % 32)[None, :]) & 1) != 0
    return tl.where(keep, w, 0.0)


@triton.jit
def _masked_wt(w_ptr, bytes_ptr, rk, rn, N, K, swn, sbn8):
    """(W ⊙ M)ᵀ[rk, rn] as a [len(rk), len(rn)] tile (the dx operand). The mask is read as
    *bytes* (the little-endian int32 words viewed as uint8: bit k % 8 of byte k // 8), by
    broadcast pointers: a byte per weight in the staged tile instead of an int32."""
    inb = (rk[:, None] < K) & (rn[None, :] < N)
    w = tl.load(w_ptr + _rows(rn, swn)[None, :] + rk[:, None], mask=inb, other=0.0)
    byte = tl.load(bytes_ptr + _rows(rn, sbn8)[None, :] + (rk // 8)[:, None], mask=inb, other=0)
    keep = ((byte.to(tl.int32) >> (rk % 8)[:, None]) & 1) != 0
    return tl.where(keep, w, 0.0)


@triton.jit
def _fwd_tile(x_ptr, w_ptr, bits_ptr, rn, rm, hi, k_lo, k_hi, N, K, sxm, swn, sbn,
              IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, X_DESC: tl.constexpr = False):
    """fp32 ``yᵀ[rn, rm] = Σ_{k in [k_lo, k_hi)} (W ⊙ M)[rn, k] x[rm, k]``; rows ``>= hi`` of x
    read as 0. The masked W tile is the dot's A operand. ``X_DESC``: ``x_ptr`` is a TMA tensor
    descriptor of x with [BLOCK_M, 32] blocks (rows ``rm`` from ``rm[0]``; ``hi`` must be M:
    the TMA unit fills rows past M, and columns past K, with zeros)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    lanes = tl.arange(0, 32)
    m_lo = tl.min(rm, axis=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        for j in tl.static_range(BLOCK_K // 32):  # one mask word per weight row per step
            rk = k0 + j * 32 + lanes
            inb = (rn[:, None] < N) & (rk[None, :] < K)
            w = tl.load(w_ptr + _rows(rn, swn)[:, None] + rk[None, :], mask=inb, other=0.0)
            word = tl.load(bits_ptr + _rows(rn, sbn) + (k0 // 32 + j), mask=rn < N, other=0)
            a = tl.where(((word[:, None] >> lanes[None, :]) & 1) != 0, w, 0.0)
            if X_DESC:
                xt = tl.trans(x_ptr.load([m_lo, k0 + j * 32]))
            else:
                xt = tl.load(x_ptr + _rows(rm, sxm)[None, :] + rk[:, None],
                             mask=(rm[None, :] < hi) & (rk[:, None] < K), other=0.0)
            acc = _dot(a, xt, acc, IEEE)
    return acc


@triton.jit
def _store_yt(acc, y_ptr, b_ptr, ws_ptr, pid_k, rn, rm, hi, M, N, sym,
              HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Write the yᵀ tile: into y[rm, rn] (+ bias), or as split ``pid_k``'s fp32 partial."""
    inb = (rn[:, None] < N) & (rm[None, :] < hi)
    if SPLIT:
        ptrs = ws_ptr + pid_k.to(tl.int64) * M * N + _rows(rm, N)[None, :] + rn[:, None]
        tl.store(ptrs, acc, mask=inb)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + _rows(rm, sym)[None, :] + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=inb)


@triton.jit
def _fwd_wt_kernel(x_ptr, w_ptr, bits_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, K_SPLIT,
                   sxm, swn, sbn, sym,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP: tl.constexpr, X_DESC: tl.constexpr = False):
    """y[M, N] = x @ (W ⊙ M)ᵀ (+ b), computed as yᵀ = (W ⊙ M) xᵀ; grid (tiles, SPLIT_K)."""
    pid_n, pid_m = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = pid_k * K_SPLIT
    acc = _fwd_tile(x_ptr, w_ptr, bits_ptr, rn, rm, M, k_lo, tl.minimum(K, k_lo + K_SPLIT), N, K,
                    sxm, swn, sbn, IEEE, BLOCK_N, BLOCK_M, BLOCK_K, X_DESC)
    _store_yt(acc, y_ptr, b_ptr, ws_ptr, pid_k, rn, rm, M, M, N, sym, HAS_BIAS, SPLIT)


@triton.jit
def _fwd_wt_persistent_kernel(x_ptr, w_ptr, bits_ptr, b_ptr, y_ptr, M, N, K,
                              sxm, swn, sbn, sym,
                              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                              NUM_PROGS: tl.constexpr, X_DESC: tl.constexpr = False):
    """The forward on a persistent grid (Triton's 09-persistent-matmul): NUM_PROGS programs
    (one per SM) walk the swizzled tile list."""
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    for tile in tl.range(tl.program_id(0), num_n * num_m, NUM_PROGS, flatten=True):
        pid_n, pid_m = _swizzle(tile, num_n, num_m, GROUP)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = _fwd_tile(x_ptr, w_ptr, bits_ptr, rn, rm, M, 0, K, N, K, sxm, swn, sbn, IEEE,
                        BLOCK_N, BLOCK_M, BLOCK_K, X_DESC)
        _store_yt(acc, y_ptr, b_ptr, y_ptr, 0, rn, rm, M, M, N, sym, HAS_BIAS, False)


@triton.jit
def _seg_tile(pid_m, offs_ptr, pair_ptr, cum_ptr, S, BLOCK_M: tl.constexpr,
              BLOCK_S: tl.constexpr):
    """Row tile ``pid_m`` of the device-side tile table (``cum``: the segments' cumulative
    row-tile counts) -> (segment s, first row, end row, pair); ``s == S`` past the table's end."""
    rs = tl.arange(0, BLOCK_S)
    cum = tl.load(cum_ptr + rs, mask=rs < S, other=2**30)
    s = tl.sum((cum <= pid_m).to(tl.int32), axis=0)  # the segment of this tile
    prev = tl.sum(tl.where(rs == s - 1, cum, 0), axis=0)  # tiles before segment s
    ok = s < S
    lo = tl.load(offs_ptr + s, mask=ok, other=0) + (pid_m - prev).to(tl.int64) * BLOCK_M
    hi = tl.load(offs_ptr + s + 1, mask=ok, other=0)
    pair = tl.load(pair_ptr + s, mask=ok, other=0).to(tl.int64)
    return s, lo, hi, pair


@triton.jit
def _seg_fwd_wt_kernel(x_ptr, w_ptr, bits_ptr, b_ptr, y_ptr, offs_ptr, pair_ptr, cum_ptr,
                       S, T, N, K, sxm, swn, sbn, sbp, sym,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """Mixed pairs in one launch. Program (m, n): m indexes the device-side tile table and
    programs past its end exit; the tile's mask is its segment's pair's, read from the bank (no
    W ⊙ M anywhere)."""
    s, lo, hi, pair = _seg_tile(tl.program_id(0), offs_ptr, pair_ptr, cum_ptr, S, BLOCK_M,
                                BLOCK_S)
    if s < S:
        rm = lo + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _fwd_tile(x_ptr, w_ptr, bits_ptr + pair * sbp, rn, rm, hi, 0, K, N, K, sxm, swn,
                        sbn, IEEE, BLOCK_N, BLOCK_M, BLOCK_K)
        _store_yt(acc, y_ptr, b_ptr, y_ptr, 0, rn, rm, hi, T, N, sym, HAS_BIAS, False)


@triton.jit
def _dx_tile(dy_ptr, w_ptr, bytes_ptr, rk, rm, hi, n_lo, n_hi, N, K, sdm, swn, sbn8,
             IEEE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """fp32 ``dxᵀ[rk, rm] = Σ_{n in [n_lo, n_hi)} (W ⊙ M)ᵀ[rk, n] dyᵀ[n, rm]``; rows ``>= hi`` of
    dy read as 0. The masked W tile is the dot's A operand."""
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        a = _masked_wt(w_ptr, bytes_ptr, rk, rn, N, K, swn, sbn8)
        dyt = tl.load(dy_ptr + _rows(rm, sdm)[None, :] + rn[:, None],
                      mask=(rm[None, :] < hi) & (rn[:, None] < n_hi), other=0.0)
        acc = _dot(a, dyt, acc, IEEE)
    return acc


@triton.jit
def _store_dxt(acc, dx_ptr, ws_ptr, pid_s, rk, rm, hi, M, K, sxm, SPLIT: tl.constexpr):
    """Write the dxᵀ tile: into dx[rm, rk], or as split ``pid_s``'s fp32 partial."""
    inb = (rk[:, None] < K) & (rm[None, :] < hi)
    if SPLIT:
        ptrs = ws_ptr + pid_s.to(tl.int64) * M * K + _rows(rm, K)[None, :] + rk[:, None]
        tl.store(ptrs, acc, mask=inb)
    else:
        tl.store(dx_ptr + _rows(rm, sxm)[None, :] + rk[:, None],
                 acc.to(dx_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _dx_wt_kernel(dy_ptr, w_ptr, bits_ptr, dx_ptr, ws_ptr, M, N, K, N_SPLIT, sdm, swn, sbn, sxm,
                  SPLIT: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """dx[M, K] = dy @ (W ⊙ M), computed as dxᵀ = (W ⊙ M)ᵀ dyᵀ (the masked tile is A); grid
    (tiles, SPLIT_K over N)."""
    pid_k, pid_m = _swizzle(tl.program_id(0), tl.cdiv(K, BLOCK_K), tl.cdiv(M, BLOCK_M), GROUP)
    pid_s = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_lo = pid_s * N_SPLIT
    acc = _dx_tile(dy_ptr, w_ptr, bits_ptr, rk, rm, M, n_lo, tl.minimum(N, n_lo + N_SPLIT), N,
                   K, sdm, swn, sbn, IEEE, BLOCK_K, BLOCK_M, BLOCK_N)
    _store_dxt(acc, dx_ptr, ws_ptr, pid_s, rk, rm, M, M, K, sxm, SPLIT)


@triton.jit
def _seg_dx_wt_kernel(dy_ptr, w_ptr, bytes_ptr, dx_ptr, ws_ptr, offs_ptr, pair_ptr, cum_ptr,
                      S, T, N, K, N_SPLIT, sdm, swn, sbn8, sbp8, sxm,
                      SPLIT: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Segmented dx in one launch: program (m, k, split) takes row tile m of the device-side
    tile table (as the segmented forward) and computes its dxᵀ tile with its pair's mask;
    split-K over N into an fp32 workspace when the tiles are few."""
    s, lo, hi, pair = _seg_tile(tl.program_id(0), offs_ptr, pair_ptr, cum_ptr, S, BLOCK_M,
                                BLOCK_S)
    if s < S:
        pid_s = tl.program_id(2)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rm = lo + tl.arange(0, BLOCK_M)
        n_lo = pid_s * N_SPLIT
        acc = _dx_tile(dy_ptr, w_ptr, bytes_ptr + pair * sbp8, rk, rm, hi, n_lo,
                       tl.minimum(N, n_lo + N_SPLIT), N, K, sdm, swn, sbn8, IEEE, BLOCK_K,
                       BLOCK_M, BLOCK_N)
        _store_dxt(acc, dx_ptr, ws_ptr, pid_s, rk, rm, hi, T, K, sxm, SPLIT)


@triton.jit
def _keep(bits_ptr, rn, rk, N, K, sbn):
    """The [len(rn), len(rk)] keep-mask (False outside W), one broadcast word load per element."""
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    word = tl.load(bits_ptr + _rows(rn, sbn)[:, None] + (rk // 32)[None, :], mask=inb, other=0)
    return ((word >> (rk % 32)[None, :]) & 1) != 0


@triton.jit
def _dw_wt_kernel(dy_ptr, x_ptr, bits_ptr, dw_ptr, M, N, K, sdm, sxm, sbn, swn,
                  ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """dW[N, K] = (dyᵀ x) ⊙ M as one GEMM, the mask applied in the epilogue. ``ACCUMULATE``:
    dW += ..., stored on mask-1 entries only (off-mask entries are never written)."""
    pid_n, pid_k = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = _dw_tile(dy_ptr, x_ptr, rn, rk, 0, M, N, K, sdm, sxm, IEEE, BLOCK_N, BLOCK_K, BLOCK_M)
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    keep = _keep(bits_ptr, rn, rk, N, K, sbn)
    ptrs = dw_ptr + _rows(rn, swn)[:, None] + rk[None, :]
    if ACCUMULATE:
        on = inb & keep
        old = tl.load(ptrs, mask=on, other=0.0).to(tl.float32)
        tl.store(ptrs, (old + acc).to(dw_ptr.dtype.element_ty), mask=on)
    else:
        tl.store(ptrs, tl.where(keep, acc, 0.0).to(dw_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _seg_dw_wt_kernel(dy_ptr, x_ptr, bits_ptr, dw_ptr, ws_ptr, offs_ptr, pair_ptr, S, T, N, K,
                      T_SPLIT, sdm, sxm, sbn, sbp, swn,
                      SPLIT: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """Segmented dW[N, K] = Σ_s (dy_sᵀ x_s) ⊙ M_pair(s) in one launch: program (tile, split)
    walks the segments that meet its rows ``[split * T_SPLIT, +T_SPLIT)``, one GEMM per segment
    with that pair's mask in its epilogue, summed in fp32 in segment order. Split over the rows
    (T is the GEMM's reduction dim) into an fp32 workspace when the (N, K) tiles are few."""
    pid_n, pid_k = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    pid_t = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_lo = pid_t.to(tl.int64) * T_SPLIT
    r_hi = tl.minimum(r_lo + T_SPLIT, T)
    total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for s in range(0, S):
        lo = tl.maximum(tl.load(offs_ptr + s), r_lo)
        hi = tl.minimum(tl.load(offs_ptr + s + 1), r_hi)
        if lo < hi:
            acc = _dw_tile(dy_ptr, x_ptr, rn, rk, lo, hi, N, K, sdm, sxm, IEEE, BLOCK_N,
                           BLOCK_K, BLOCK_M)
            pair = tl.load(pair_ptr + s).to(tl.int64)
            total += tl.where(_keep(bits_ptr + pair * sbp, rn, rk, N, K, sbn), acc, 0.0)
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    if SPLIT:
        ptrs = ws_ptr + pid_t.to(tl.int64) * N * K + _rows(rn, K)[:, None] + rk[None, :]
        tl.store(ptrs, total, mask=inb)
    else:
        tl.store(dw_ptr + _rows(rn, swn)[:, None] + rk[None, :],
                 total.to(dw_ptr.dtype.element_ty), mask=inb)


# ------------------------------------------------------------------------------------- host

# (BLOCK_A, BLOCK_M, BLOCK_K, GROUP, num_warps, num_stages): BLOCK_A is the masked operand's
# block (weight rows for the forward, weight columns for dx, dW's N block); BLOCK_M the x rows
# (wgmma's N: 8..256). dW: (BLOCK_N, BLOCK_K, BLOCK_M, ...). Checked to fit sm_90 by aot_check.
_CANDIDATES = {
    "16bit": {"small": [(128, 16, 128, 8, 4, 4), (128, 32, 128, 8, 4, 4), (64, 16, 256, 8, 4, 3)],
              "mid": [(128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3)],
              "large": [(128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3),
                        (256, 128, 64, 8, 8, 3)]},
    "tf32": {"small": [(128, 16, 64, 8, 4, 3)], "mid": [(128, 64, 32, 8, 4, 3)],
             "large": [(128, 128, 32, 8, 8, 3)]},
    "ieee": {"small": [(32, 16, 32, 8, 4, 2)], "mid": [(32, 32, 32, 8, 4, 2)],
             "large": [(64, 32, 32, 8, 4, 2)]},
}
_DW_CANDIDATES = {"16bit": [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4)],
                  "tf32": [(128, 128, 32, 8, 8, 3)], "ieee": [(32, 32, 32, 8, 4, 2)]}
_INTERP_CFG = (16, 16, 32, 2, 1, 1)
_TUNED: dict[tuple, tuple] = {}


def _kind(dtype) -> str:
    return "16bit" if dtype != torch.float32 else "ieee" if _ieee(dtype) else "tf32"


def _bucket(m: int) -> str:
    return "small" if m <= 32 else "mid" if m <= 256 else "large"


def candidates(op: str, dtype, m: int) -> list[tuple]:
    if op in ("dw", "seg_dw"):
        return list(_DW_CANDIDATES[_kind(dtype)])
    return list(_CANDIDATES[_kind(dtype)][_bucket(m)])


def _num_sms(device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(op: str, m: int, n: int, k: int, dtype, launch) -> tuple:
    """The fastest candidate for (op, M bucket, N, K, dtype), timed once (as kernels._config);
    one small fixed config under the interpreter."""
    if INTERPRET:
        return _INTERP_CFG
    cands = candidates(op, dtype, m)
    from .common import AUTOTUNE

    if not AUTOTUNE:
        return cands[0]
    key = (op, _bucket(m), n, k, dtype, _ieee(dtype), torch.cuda.current_device())
    if key not in _TUNED:
        from triton.testing import do_bench

        best, best_t = cands[0], float("inf")
        for c in cands:
            try:
                t = do_bench(lambda c=c: launch(c), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config that does not fit this device
                continue
            if t < best_t:
                best, best_t = c, t
        _TUNED[key] = best
    return _TUNED[key]


def split_k(m: int, tiles: int, depth: int, block: int, sms: int) -> int:
    """Split-K factor: ``$LASS_SPARSE_TRITON_SPLIT_K`` if set, else (M <= 64 only) enough splits
    to give every SM a program, each keeping >= 4 K blocks."""
    forced = os.environ.get(SPLIT_K_ENV)
    if forced:
        return max(1, min(int(forced), cdiv(depth, block)))
    if m > 64 or tiles >= sms:
        return 1
    return max(1, min(cdiv(sms, tiles), depth // (4 * block)))


def _chunks(depth: int, block: int, parts: int) -> tuple[int, int]:
    """(chunk, parts): ``depth`` cut into ``parts`` chunks of whole ``block``s (fewer parts when
    some would be empty)."""
    chunk = cdiv(cdiv(depth, parts), block) * block
    return chunk, cdiv(depth, chunk)


def _check(op: str, **tensors) -> None:
    """Every tensor the kernel touches (``bias`` may be None): a tensor, on one device, rows
    contiguous (last stride 1) — the launchers below index rows by stride(0) and columns by 1."""
    dev = None
    for name, t in tensors.items():
        if t is None and name == "bias":  # the one optional tensor
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if dev is None:
            dev = t.device
        if t.device != dev:
            raise ValueError(f"{op}: {name} must be on {dev} with the other tensors, got "
                             f"{t.device}")
        if t.dim() >= 1 and t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have unit stride in its last dim, got stride "
                             f"{tuple(t.stride())}")


def _check_linear(op, x, weight, bits, bias=None, xname="x"):
    _check(op, **{xname: x}, weight=weight, bits=bits, bias=bias)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] and xname == "x":
        raise ValueError(f"{op}: {xname} must be [M, K] and weight [N, K], got "
                         f"{list(x.shape)} and {list(weight.shape)}")
    if x.dtype not in _FLOATS or weight.dtype != x.dtype or (bias is not None
                                                              and bias.dtype != x.dtype):
        raise TypeError(f"{op}: {xname}, weight (and bias) must share one dtype of float32, "
                        f"float16 or bfloat16, got {x.dtype}, {weight.dtype}"
                        + ("" if bias is None else f", {bias.dtype}"))
    n, k = weight.shape
    if bits.dtype != torch.int32 or list(bits.shape[-2:]) != [n, (k + 31) // 32]:
        raise ValueError(f"{op}: bits must be int32[..., {n}, {(k + 31) // 32}], got "
                         f"{bits.dtype}{list(bits.shape)}")
    if bias is not None and list(bias.shape) != [n]:
        raise ValueError(f"{op}: bias must be [{n}], got {list(bias.shape)}")


def _x_descriptor(x: torch.Tensor, block_m: int):
    """A TMA descriptor of x with [block_m, 32] boxes, or None where TMA cannot read x (rows
    not 16-byte aligned) or Triton has no host descriptors."""
    elt = x.element_size()
    if (x.stride(1) != 1 or (x.stride(0) * elt) % 16 or x.data_ptr() % 16
            or (x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9)):
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - Triton without host descriptors
        return None
    return TensorDescriptor.from_tensor(x, [block_m, 32])


def masked_linear(x, weight, bits, bias, var: str | None = None):
    """``var``: ``wt``, ``wt_persistent`` or ``wt_tma`` (None: ``$LASS_SPARSE_TRITON_VARIANT``)."""
    _check_linear("masked_linear", x, weight, bits, bias)
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    var = var or variant()
    persistent = var == "wt_persistent"
    sms = _num_sms(x.device)
    b = bias if bias is not None else x

    def launch(cfg, split=None):
        ba, bm, bk, group, warps, stages = cfg
        tiles = cdiv(n, ba) * cdiv(m, bm)
        desc = _x_descriptor(x, bm) if var == "wt_tma" else None
        xa = x if desc is None else desc
        if persistent:
            _fwd_wt_persistent_kernel[(min(sms, tiles),)](
                x, weight, bits, b, y, m, n, k, x.stride(0), weight.stride(0), bits.stride(0),
                y.stride(0), HAS_BIAS=bias is not None, IEEE=_ieee(x.dtype), BLOCK_N=ba,
                BLOCK_M=bm, BLOCK_K=bk, GROUP=group, NUM_PROGS=min(sms, tiles),
                num_warps=warps, num_stages=stages)
            return None
        k_split, s = _chunks(k, bk, split_k(m, tiles, k, bk, sms) if split is None else split)
        ws = torch.empty(s, m, n, dtype=torch.float32, device=x.device) if s > 1 else y
        _fwd_wt_kernel[(tiles, s)](
            xa, weight, bits, b, y, ws, m, n, k, k_split, x.stride(0), weight.stride(0),
            bits.stride(0), y.stride(0), HAS_BIAS=bias is not None, SPLIT=s > 1,
            IEEE=_ieee(x.dtype), BLOCK_N=ba, BLOCK_M=bm, BLOCK_K=bk, GROUP=group,
            X_DESC=desc is not None, num_warps=warps, num_stages=stages)
        return ws if s > 1 else None

    ws = launch(_config("fwd_p" if persistent else "fwd_tma" if var == "wt_tma" else "fwd",
                        m, n, k, x.dtype, launch))
    if ws is not None:  # fixed-order sum of the split partials: deterministic
        acc = ws.sum(0)
        if bias is not None:
            acc += bias.float()
        y.copy_(acc)
    return y


def masked_linear_dx(grad_out, weight, bits):
    _check_linear("masked_linear_dx", grad_out, weight, bits, xname="grad_out")
    m, n = grad_out.shape
    k = weight.shape[1]
    if n != weight.shape[0]:
        raise ValueError(f"masked_linear_dx: grad_out must be [M, {weight.shape[0]}], got "
                         f"{list(grad_out.shape)}")
    dx = torch.empty(m, k, dtype=grad_out.dtype, device=grad_out.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    sms = _num_sms(dx.device)

    def launch(cfg, split=None):
        ba, bm, bn, group, warps, stages = cfg  # ba: K block (masked operand rows), bn: N step
        tiles = cdiv(k, ba) * cdiv(m, bm)
        n_split, s = _chunks(n, bn, split_k(m, tiles, n, bn, sms) if split is None else split)
        ws = torch.empty(s, m, k, dtype=torch.float32, device=dx.device) if s > 1 else dx
        _dx_wt_kernel[(tiles, s)](
            grad_out, weight, bits.view(torch.uint8), dx, ws, m, n, k, n_split,
            grad_out.stride(0), weight.stride(0), 4 * bits.stride(0), dx.stride(0), SPLIT=s > 1,
            IEEE=_ieee(grad_out.dtype), BLOCK_K=ba, BLOCK_M=bm, BLOCK_N=bn, GROUP=group,
            num_warps=warps, num_stages=stages)
        return ws if s > 1 else None

    ws = launch(_config("dx", m, n, k, grad_out.dtype, launch))
    if ws is not None:
        torch.sum(ws, 0, out=dx) if dx.dtype == torch.float32 else dx.copy_(ws.sum(0))
    return dx


def _dw_into(grad_out, x, bits, out, accumulate: bool):
    op = "masked_linear_dw_accumulate_" if accumulate else "masked_linear_dw"
    _check(op, grad_out=grad_out, x=x, bits=bits, grad=out)
    m, n = grad_out.shape
    k = x.shape[1]
    if x.shape[0] != m or list(out.shape) != [n, k]:
        raise ValueError(f"{op}: grad_out [M, N], x [M, K] and grad [N, K] disagree: "
                         f"{list(grad_out.shape)}, {list(x.shape)}, {list(out.shape)}")
    if bits.dtype != torch.int32 or list(bits.shape) != [n, (k + 31) // 32]:
        raise ValueError(f"{op}: bits must be int32[{n}, {(k + 31) // 32}], got "
                         f"{bits.dtype}{list(bits.shape)}")
    if n == 0 or k == 0:
        return out

    def launch(cfg, dst=out, acc=accumulate):
        bn, bk, bm, group, warps, stages = cfg
        grid = (cdiv(n, bn) * cdiv(k, bk),)
        _dw_wt_kernel[grid](grad_out, x, bits, dst, m, n, k, grad_out.stride(0), x.stride(0),
                            bits.stride(0), dst.stride(0), ACCUMULATE=acc,
                            IEEE=_ieee(grad_out.dtype), BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm,
                            GROUP=group, num_warps=warps, num_stages=stages)

    if INTERPRET or not accumulate:
        cfg = _config("dw", m, n, k, grad_out.dtype, launch)
    else:  # candidates are timed on a scratch buffer: accumulate exactly once
        scratch = None

        def timed(c):
            nonlocal scratch
            if scratch is None:
                scratch = torch.empty_like(out)
            launch(c, dst=scratch, acc=False)

        cfg = _config("dw", m, n, k, grad_out.dtype, timed)
    launch(cfg)
    return out


def masked_linear_dw(grad_out, x, bits):
    out = torch.empty(grad_out.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    return _dw_into(grad_out, x, bits, out, False)


def masked_linear_dw_accumulate_(grad, grad_out, x, bits):
    _dw_into(grad_out, x, bits, grad, True)


def tile_table(seg_offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """int32 cumulative row-tile counts of the segments, computed on the device (no sync)."""
    lens = (seg_offsets[1:] - seg_offsets[:-1]).clamp_min(0)
    return torch.cumsum((lens + block_m - 1) // block_m, 0).to(torch.int32)


def _check_segs(op, bits_bank, seg_offsets, seg_pair, rows):
    """The segment table's shapes (its values are the op's checks', read once per table, or
    asserted on the device during CUDA graph capture: then bounded here, ops/segments.py)."""
    _check(op, bits_bank=bits_bank, seg_offsets=seg_offsets, seg_pair=seg_pair)
    if bits_bank.dim() != 3:
        raise ValueError(f"{op}: bits_bank must be int32[P, N, ceil(K/32)], got "
                         f"{list(bits_bank.shape)}")
    s = seg_pair.numel()
    if seg_offsets.dim() != 1 or seg_offsets.numel() != s + 1:
        raise ValueError(f"{op}: seg_offsets must have len(seg_pair) + 1 = {s + 1} entries, got "
                         f"{list(seg_offsets.shape)}")
    if not readable(seg_offsets, seg_pair):
        return s, *(v.contiguous() for v in bounded(seg_offsets, seg_pair, rows,
                                                    bits_bank.shape[0]))
    return s, seg_offsets.to(torch.int64).contiguous(), seg_pair.to(torch.int64).contiguous()


def segmented_masked_linear(x, weight, bits_bank, seg_offsets, seg_pair, bias):
    op = "segmented_masked_linear"
    _check_linear(op, x, weight, bits_bank, bias)
    _check(op, x=x, seg_offsets=seg_offsets)
    s, offs, pairs = _check_segs(op, bits_bank, seg_offsets, seg_pair, x.shape[0])
    t, k = x.shape
    n = weight.shape[0]
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0 or n == 0 or s == 0:
        return y
    tables: dict = {}

    def launch(cfg):
        ba, bm, bk, _group, warps, stages = cfg
        if bm not in tables:
            tables[bm] = tile_table(offs, bm)
        grid = (cdiv(t, bm) + s, cdiv(n, ba))  # >= the table's tiles
        _seg_fwd_wt_kernel[grid](
            x, weight, bits_bank, bias if bias is not None else x, y, offs, pairs, tables[bm],
            s, t, n, k, x.stride(0), weight.stride(0), bits_bank.stride(1),
            bits_bank.stride(0), y.stride(0), HAS_BIAS=bias is not None, IEEE=_ieee(x.dtype),
            BLOCK_N=ba, BLOCK_M=bm, BLOCK_K=bk, BLOCK_S=triton.next_power_of_2(max(s, 2)),
            num_warps=warps, num_stages=stages)

    launch(_config("seg_fwd", max(t // s, 1), n, k, x.dtype, launch))
    return y


def segmented_masked_linear_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair):
    op = "segmented_masked_linear_dx"
    _check_linear(op, grad_out, weight, bits_bank, xname="grad_out")
    s, offs, pairs = _check_segs(op, bits_bank, seg_offsets, seg_pair, grad_out.shape[0])
    t, n = grad_out.shape
    k = weight.shape[1]
    if n != weight.shape[0]:
        raise ValueError(f"{op}: grad_out must be [T, {weight.shape[0]}], got "
                         f"{list(grad_out.shape)}")
    dx = torch.empty(t, k, dtype=grad_out.dtype, device=grad_out.device)
    if t == 0 or k == 0:
        return dx
    if n == 0 or s == 0:
        return dx.zero_()
    sms = _num_sms(dx.device)
    tables: dict = {}

    def launch(cfg, split=None):
        ba, bm, bn, _group, warps, stages = cfg  # ba: K block (masked operand rows), bn: N step
        if bm not in tables:
            tables[bm] = tile_table(offs, bm)
        row_tiles = cdiv(t, bm) + s  # >= the table's tiles
        n_split, sp = _chunks(n, bn, split_k(max(t // s, 1), row_tiles * cdiv(k, ba), n,
                                             bn, sms) if split is None else split)
        ws = torch.empty(sp, t, k, dtype=torch.float32, device=dx.device) if sp > 1 else dx
        _seg_dx_wt_kernel[(row_tiles, cdiv(k, ba), sp)](
            grad_out, weight, bits_bank.view(torch.uint8), dx, ws, offs, pairs, tables[bm], s, t,
            n, k, n_split, grad_out.stride(0), weight.stride(0), 4 * bits_bank.stride(1),
            4 * bits_bank.stride(0), dx.stride(0), SPLIT=sp > 1, IEEE=_ieee(grad_out.dtype),
            BLOCK_K=ba, BLOCK_M=bm, BLOCK_N=bn, BLOCK_S=triton.next_power_of_2(max(s, 2)),
            num_warps=warps, num_stages=stages)
        return ws if sp > 1 else None

    ws = launch(_config("seg_dx", max(t // s, 1), n, k, grad_out.dtype, launch))
    if ws is not None:  # fixed-order sum of the split partials: deterministic
        torch.sum(ws, 0, out=dx) if dx.dtype == torch.float32 else dx.copy_(ws.sum(0))
    return dx


def segmented_masked_linear_dw(grad_out, x, bits_bank, seg_offsets, seg_pair):
    op = "segmented_masked_linear_dw"
    _check(op, grad_out=grad_out, x=x)
    if grad_out.dim() != 2 or x.dim() != 2 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: grad_out must be [T, N] and x [T, K], got "
                         f"{list(grad_out.shape)} and {list(x.shape)}")
    s, offs, pairs = _check_segs(op, bits_bank, seg_offsets, seg_pair, x.shape[0])
    t, n = grad_out.shape
    k = x.shape[1]
    if x.dtype not in _FLOATS or grad_out.dtype != x.dtype:
        raise TypeError(f"{op}: grad_out and x must share one dtype of float32, float16 or "
                        f"bfloat16, got {grad_out.dtype}, {x.dtype}")
    if bits_bank.dtype != torch.int32 or list(bits_bank.shape[1:]) != [n, (k + 31) // 32]:
        raise ValueError(f"{op}: bits_bank must be int32[P, {n}, {(k + 31) // 32}], got "
                         f"{bits_bank.dtype}{list(bits_bank.shape)}")
    out = torch.empty(n, k, dtype=x.dtype, device=x.device)
    if n == 0 or k == 0:
        return out
    if t == 0 or s == 0:
        return out.zero_()
    sms = _num_sms(x.device)

    def launch(cfg, split=None):
        bn, bk, bm, group, warps, stages = cfg
        tiles = cdiv(n, bn) * cdiv(k, bk)
        # the split is over T, the reduction dim: "small M" is always true here (m = 0)
        t_split, sp = _chunks(t, bm, split_k(0, tiles, t, bm, sms) if split is None else split)
        ws = torch.empty(sp, n, k, dtype=torch.float32, device=x.device) if sp > 1 else out
        _seg_dw_wt_kernel[(tiles, sp)](
            grad_out, x, bits_bank, out, ws, offs, pairs, s, t, n, k, t_split,
            grad_out.stride(0), x.stride(0), bits_bank.stride(1), bits_bank.stride(0),
            out.stride(0), SPLIT=sp > 1, IEEE=_ieee(x.dtype), BLOCK_N=bn, BLOCK_K=bk,
            BLOCK_M=bm, GROUP=group, num_warps=warps, num_stages=stages)
        return ws if sp > 1 else None

    ws = launch(_config("seg_dw", t, n, k, x.dtype, launch))
    if ws is not None:  # fixed-order sum of the split partials: deterministic
        out.copy_(ws.sum(0))
    return out
