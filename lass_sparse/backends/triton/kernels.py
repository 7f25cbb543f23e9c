"""Triton kernels: masked linear forward, dx, masked dW (+accumulate), segmented (mixed pairs),
and the fused QKV projection writing ``[3, B, H, T, Dh]`` directly.

Every kernel reads the packed mask as int32 words, ``BLOCK_K / 32`` words per weight row per K
step, and expands them in registers: ``(word >> lane) & 1``. ``W ⊙ M`` is never written to memory;
the dW mask is applied in the epilogue so off-mask entries are exactly 0. fp32 inputs follow
torch's matmul precision: IEEE ``tl.dot`` unless ``torch.backends.cuda.matmul.allow_tf32`` (or
``torch.set_float32_matmul_precision("high")``) allows TF32 (always IEEE under
``TRITON_INTERPRET=1``); accumulation is always fp32. Row offsets (row index × stride) and the QKV
output offsets are computed in int64, so tensors past 2³¹ elements index correctly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...ops.segments import device_tiles, readable, spans
from .._cuda_common import cublas_min_m
from .common import AUTOTUNE, INTERPRET, _dw_tile, _ieee, _rna, _rows, cdiv  # noqa: F401


@triton.jit
def _expand(words, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 words [BLOCK_R, BLOCK_K // 32] -> keep mask [BLOCK_R, BLOCK_K] (LSB first)."""
    lanes = tl.arange(0, 32)
    bits = (words[:, :, None] >> lanes[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_R, BLOCK_K)) != 0


@triton.jit
def _qkv_offsets(rm, rn, D, T, H, DH):
    """For rows ``rm`` of x[B*T, D] and columns ``rn`` of y[., 3D]: which of q/k/v (0/1/2) and
    the int64 offset inside that ``[B, H, T, Dh]`` tensor."""
    rm64 = rm.to(tl.int64)
    b_idx, t_idx = rm64 // T, rm64 % T
    which, rem = rn // D, rn % D
    h_idx, d_idx = rem // DH, rem % DH
    off = ((b_idx[:, None] * H + h_idx[None, :]) * T + t_idx[:, None]) * DH + d_idx[None, :]
    return which, off


@triton.jit
def _load_masked_w(w_ptr, bits_ptr, rn, k0, N, K, NW, swn, sbn,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rn, k0:k0+BLOCK_K] with pruned (and out-of-range) entries zeroed: [BLOCK_N, BLOCK_K]."""
    rk = k0 + tl.arange(0, BLOCK_K)
    rw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    w = tl.load(w_ptr + _rows(rn, swn)[:, None] + rk[None, :],
                mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
    words = tl.load(bits_ptr + _rows(rn, sbn)[:, None] + rw[None, :],
                    mask=(rn[:, None] < N) & (rw[None, :] < NW), other=0)
    keep = _expand(words, BLOCK_N, BLOCK_K)
    return tl.where(keep, w, 0.0)


@triton.jit
def _xwt_bias(x_ptr, w_ptr, bits_ptr, b_ptr, rm, hi, rn, N, K, NW, sxm, swn, sbn,
              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile ``x[rm, :] @ (W ⊙ M)[rn, :]ᵀ (+ b[rn])``, rows ``>= hi`` read as 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + _rows(rm, sxm)[:, None] + rk[None, :],
                    mask=(rm[:, None] < hi) & (rk[None, :] < K), other=0.0)
        w = _load_masked_w(w_ptr, bits_ptr, rn, k0, N, K, NW, swn, sbn, BLOCK_N, BLOCK_K)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(_rna(x), tl.trans(_rna(w)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bits_ptr, b_ptr, y_ptr, tile_lo, tile_hi, tile_pair,
                M, N, K, NW, sxm, swn, sbn, sbp, sym, syn,
                HAS_BIAS: tl.constexpr, SEGMENTED: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SEGMENTED:  # one tile = rows [lo, hi) of one segment, mask of its pair
        lo = tl.load(tile_lo + pid_m)
        hi = tl.load(tile_hi + pid_m)
        bits_ptr += tl.load(tile_pair + pid_m).to(tl.int64) * sbp
    else:
        lo = pid_m * BLOCK_M
        hi = M
    rm = lo + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _xwt_bias(x_ptr, w_ptr, bits_ptr, b_ptr, rm, hi, rn, N, K, NW, sxm, swn, sbn,
                    HAS_BIAS, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + _rows(rm, sym)[:, None] + _rows(rn, syn)[None, :],
             acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < hi) & (rn[None, :] < N))


@triton.jit
def _dx_kernel(dy_ptr, w_ptr, bits_ptr, dx_ptr, tile_lo, tile_hi, tile_pair,
               M, N, K, NW, sdm, swn, sbn, sbp, sxm,
               SEGMENTED: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[M, K] = dy[M, N] @ (W ⊙ M)[N, K]."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    if SEGMENTED:
        lo = tl.load(tile_lo + pid_m)
        hi = tl.load(tile_hi + pid_m)
        bits_ptr += tl.load(tile_pair + pid_m).to(tl.int64) * sbp
    else:
        lo = pid_m * BLOCK_M
        hi = M
    rm = lo + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + _rows(rm, sdm)[:, None] + rn[None, :],
                     mask=(rm[:, None] < hi) & (rn[None, :] < N), other=0.0)
        w = _load_masked_w(w_ptr, bits_ptr, rn, k0, N, K, NW, swn, sbn, BLOCK_N, BLOCK_K)
        if IEEE:
            acc += tl.dot(dy, w, input_precision="ieee")
        else:
            acc += tl.dot(_rna(dy), _rna(w))
    tl.store(dx_ptr + _rows(rm, sxm)[:, None] + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < hi) & (rk[None, :] < K))


@triton.jit
def _dw_kernel(dy_ptr, x_ptr, bits_ptr, dw_ptr, seg_lo, seg_hi, seg_pair, S,
               M, N, K, NW, sdm, sxm, sbn, sbp, swn,
               ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[N, K] = Σ_s (dy_sᵀ x_s) ⊙ M_pair(s) over row segments s (one segment when not mixed);
    ``ACCUMULATE``: add into dW where the mask is 1, leave the rest untouched."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rw = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    union = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int1)
    for s in range(0, S):
        lo = tl.load(seg_lo + s)
        hi = tl.load(seg_hi + s)
        pair = tl.load(seg_pair + s).to(tl.int64)
        acc = _dw_tile(dy_ptr, x_ptr, rn, rk, lo, hi, N, K, sdm, sxm, IEEE, BLOCK_N, BLOCK_K,
                       BLOCK_M)
        words = tl.load(bits_ptr + pair * sbp + _rows(rn, sbn)[:, None] + rw[None, :],
                        mask=(rn[:, None] < N) & (rw[None, :] < NW), other=0)
        keep = _expand(words, BLOCK_N, BLOCK_K)
        total += tl.where(keep, acc, 0.0)
        union = union | keep
    ptrs = dw_ptr + _rows(rn, swn)[:, None] + rk[None, :]
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    if ACCUMULATE:
        old = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
        total = tl.where(union, old + total, old)
    tl.store(ptrs, total.to(dw_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _qkv_kernel(x_ptr, w_ptr, bits_ptr, b_ptr, q_ptr, k_ptr, v_ptr, M, D, NW, T, H, DH, sbn,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = x[M=B*T, D] @ (W ⊙ M)[3D, D]ᵀ + b, stored straight into q, k, v [B, H, T, Dh] (three
    buffers: a custom op's outputs may not alias each other)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = 3 * D
    acc = _xwt_bias(x_ptr, w_ptr, bits_ptr, b_ptr, rm, M, rn, n3, D, NW, D, D, sbn,
                    HAS_BIAS, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    which, off = _qkv_offsets(rm, rn, D, T, H, DH)
    which = which[None, :]
    ptrs = tl.where(which == 0, q_ptr + off, tl.where(which == 1, k_ptr + off, v_ptr + off))
    tl.store(ptrs, acc.to(q_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < n3))


@triton.jit
def _apply_mask_kernel(src_ptr, bits_ptr, out_ptr, N, K, NW, ssn, sbn, son,
                       ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = src ⊙ M (``out`` may be ``src``), or with ``ACCUMULATE`` out += src ⊙ M (entries off
    the mask keep their exact bits)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rw = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    v = tl.load(src_ptr + _rows(rn, ssn)[:, None] + rk[None, :], mask=inb, other=0.0)
    words = tl.load(bits_ptr + _rows(rn, sbn)[:, None] + rw[None, :],
                    mask=(rn[:, None] < N) & (rw[None, :] < NW), other=0)
    keep = _expand(words, BLOCK_N, BLOCK_K)
    ptrs = out_ptr + _rows(rn, son)[:, None] + rk[None, :]
    if ACCUMULATE:
        old = tl.load(ptrs, mask=inb, other=0.0)
        v = tl.where(keep, (old.to(tl.float32) + v.to(tl.float32)).to(old.dtype), old)
    else:
        v = tl.where(keep, v, 0.0)
    tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=inb)


# ---------------------------------------------------------------------------------- launchers

_DUMMY: dict = {}


def _dummy(device) -> torch.Tensor:
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _DUMMY[key]


# (BLOCK_N, BLOCK_K, num_warps, num_stages) candidates; BLOCK_M comes from the M bucket. Chosen
# with `python -m lass_sparse.backends.triton.aot_check --all-configs --dtype bf16 fp32 tf32`:
# each fits sm_80's 163 KB and sm_90's 227 KB of shared memory at BLOCK_M = 128 and spills at
# most a few hundred bytes (tests/ops/test_triton.py checks it). "ieee": fp32 without TF32.
_CANDIDATES = {
    "16bit": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 8, 4)],
    "tf32": [(64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 8, 2)],
    "ieee": [(32, 32, 4, 2), (64, 32, 8, 2)],
}
IEEE_MAX_BLOCK_M = 64  # IEEE fp32 tl.dot is FMA: larger tiles spill registers
_TUNED: dict[tuple, tuple] = {}


def _bucket_m(m: int) -> int:
    return 16 if m <= 16 else 64 if m <= 256 else 128


def candidates(dtype: torch.dtype, bm: int) -> list[tuple]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) configs tried for this dtype and M
    bucket (``aot_check`` compiles each of them for sm_80/sm_90 and checks that it fits)."""
    if dtype != torch.float32:
        return [(bm, *c) for c in _CANDIDATES["16bit"]]
    if _ieee(dtype):
        return [(min(bm, IEEE_MAX_BLOCK_M), *c) for c in _CANDIDATES["ieee"]]
    return [(bm, *c) for c in _CANDIDATES["tf32"]]


def _config(kind: str, m: int, n: int, k: int, dtype: torch.dtype, launch=None, *,
            make_launch=None) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for this (kind, M bucket, N, K, dtype).

    Under the interpreter: one small fixed config. On a GPU: the fastest candidate, timed once
    per key with ``triton.testing.do_bench`` (``launch(cfg)`` must be safe to repeat; or
    ``make_launch()`` builds it, only when a key is timed); candidates that fail (do not fit the
    device) are skipped. ``LASS_SPARSE_TRITON_AUTOTUNE=0``: first candidate.
    """
    if INTERPRET:
        return 16, 32, 32, 1, 1
    bm = _bucket_m(m)
    cands = candidates(dtype, bm)
    if not AUTOTUNE:
        return cands[0]
    key = (kind, bm, n, k, dtype, _ieee(dtype), torch.cuda.current_device())
    if key not in _TUNED:
        from triton.testing import do_bench

        if launch is None:
            launch = make_launch()
        best, best_t = cands[0], float("inf")
        for c in cands:
            try:
                t = do_bench(lambda c=c: launch(c), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - e.g. OutOfResources: the config does not fit
                continue
            if t < best_t:
                best, best_t = c, t
        _TUNED[key] = best
    return _TUNED[key]


# Rows from which the GEMM-shaped ops take the "W ⊙ M in one pass, then cuBLAS" route: on an
# H200 (benchmarks/results/nvidia-h200-run2-caa4181.md) the fused kernels ran 2.5-8x slower
# than cuBLAS at M >= 256, while one mask pass plus cuBLAS costs about what the naive bool-mask
# way does. The masked weight is a transient of W's size, freed after the call; the packed bits
# stay the only stored mask. Off under the interpreter unless LASS_SPARSE_CUBLAS_MIN_M is set.
CUBLAS_MIN_M = cublas_min_m(2**62 if INTERPRET else 64)


def apply_mask(src: torch.Tensor, bits: torch.Tensor, out: torch.Tensor | None = None,
               accumulate: bool = False) -> torch.Tensor:
    """``src ⊙ M`` into ``out`` (new if None; may be ``src``), or ``out += src ⊙ M``."""
    n, k = src.shape
    if out is None:
        out = torch.empty(n, k, dtype=src.dtype, device=src.device)
    if n == 0 or k == 0:
        return out
    bn, bk, warps = (16, 32, 1) if INTERPRET else (32, 128, 4)
    grid = (cdiv(n, bn), cdiv(k, bk))
    _apply_mask_kernel[grid](src, bits, out, n, k, bits.shape[-1], src.stride(0),
                             bits.stride(-2), out.stride(0), ACCUMULATE=accumulate,
                             BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out


def masked_cast(weight, bits, dtype):
    """(W ⊙ M).to(dtype): the mask pass with an output of another dtype (one pass)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    k = weight.shape[-1]
    if out.numel():
        apply_mask(weight.reshape(-1, k), bits.reshape(-1, bits.shape[-1]), out.view(-1, k))
    return out


def _same_dtype(*ts) -> bool:
    """cuBLAS takes one dtype; the fused kernels also mix them."""
    return len({t.dtype for t in ts if t is not None}) == 1


def _by_pair(segs) -> dict[int, list[tuple[int, int]]]:
    """Segments grouped by pair (first-seen order): the cuBLAS route masks W once per pair."""
    out: dict[int, list[tuple[int, int]]] = {}
    for a, b, p in segs:
        out.setdefault(p, []).append((a, b))
    return out


def _per_pair_dense(segs, weight, bits_bank, rows) -> None:
    """The cuBLAS route: ``rows(W ⊙ M_p, a, b)`` for every segment, W ⊙ M_p written once per
    pair into one W-sized transient reused pair after pair."""
    wm = torch.empty_like(weight)
    for p, pair_spans in _by_pair(segs).items():
        apply_mask(weight, bits_bank[p], out=wm)
        for a, b in pair_spans:
            rows(wm, a, b)


def _known_spans(seg_offsets, seg_pair) -> list:
    """The table's segments when its values may be read (else [], which routes to the kernels:
    their tile tables are then built on the device; ops/segments.py)."""
    return spans(seg_offsets, seg_pair) if readable(seg_offsets, seg_pair) else []


def _route_segments(segs, t: int) -> bool:
    return bool(segs) and t / len(segs) >= CUBLAS_MIN_M


def _variant_wt(op: str, rows: int, *tensors):
    """``kernels_wt`` and the variant name when it serves this call, else None (``v1``: this
    file). The variant: ``$LASS_SPARSE_TRITON_VARIANT`` if set (every op), else the measured
    route of this GPU for ``op`` at ``rows`` rows (routes.py; ``v1`` without one)."""
    from . import kernels_wt, routes

    v = os.environ.get("LASS_SPARSE_TRITON_VARIANT")
    if v:
        kernels_wt.variant()  # raises on an unknown name
    else:
        v = routes.choose(op, rows, tensors[0].device)
    if v == "v1":
        return None
    return (kernels_wt, v) if kernels_wt.takes(*tensors) else None


def _seg_rows(x, seg_pair) -> int:
    """Rows per segment, the segmented ops' route key (no table read: T / S)."""
    return x.shape[0] // max(seg_pair.numel(), 1)


def masked_linear(x, weight, bits, bias):
    if (wt := _variant_wt("masked_linear", x.shape[0], x, weight, bias)) is not None:
        return wt[0].masked_linear(x, weight, bits, bias, var=wt[1])
    m, k = x.shape
    n = weight.shape[0]
    if m >= CUBLAS_MIN_M and n > 0 and _same_dtype(x, weight, bias):
        return torch.nn.functional.linear(x, apply_mask(weight, bits), bias)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    d = _dummy(x.device)

    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        grid = (cdiv(m, bm), cdiv(n, bn))
        _fwd_kernel[grid](x, weight, bits, bias if bias is not None else x, y, d, d, d,
                          m, n, k, bits.shape[1], x.stride(0), weight.stride(0), bits.stride(0),
                          0, y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                          SEGMENTED=False, IEEE=_ieee(x.dtype), BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, num_warps=warps, num_stages=stages)

    launch(_config("fwd", m, n, k, x.dtype, launch))
    return y


def masked_linear_dx(grad_out, weight, bits):
    if (wt := _variant_wt("masked_linear_dx", grad_out.shape[0], grad_out, weight)) is not None:
        return wt[0].masked_linear_dx(grad_out, weight, bits)
    m, n = grad_out.shape
    k = weight.shape[1]
    dx = torch.empty(m, k, dtype=grad_out.dtype, device=grad_out.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    if m >= CUBLAS_MIN_M and _same_dtype(grad_out, weight):
        return torch.mm(grad_out, apply_mask(weight, bits), out=dx)
    d = _dummy(grad_out.device)

    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        grid = (cdiv(m, bm), cdiv(k, bk))
        _dx_kernel[grid](grad_out, weight, bits, dx, d, d, d, m, n, k, bits.shape[1],
                         grad_out.stride(0), weight.stride(0), bits.stride(0), 0, dx.stride(0),
                         SEGMENTED=False, IEEE=_ieee(grad_out.dtype), BLOCK_M=bm, BLOCK_N=bn,
                         BLOCK_K=bk, num_warps=warps, num_stages=stages)

    launch(_config("dx", m, n, k, grad_out.dtype, launch))
    return dx


def _dw(grad_out, x, bits_bank, lo, hi, pair, out, accumulate):
    m, n = grad_out.shape
    k = x.shape[1]
    if n == 0 or k == 0:
        return out
    if m >= CUBLAS_MIN_M and bits_bank.dim() == 2 and _same_dtype(grad_out, x, out):
        # one segment: (dyᵀ x) ⊙ M
        prod = torch.mm(grad_out.t(), x)
        return apply_mask(prod, bits_bank, out=out, accumulate=accumulate)

    def launch(cfg, dst=out, acc=accumulate):
        bm, bn, bk, warps, stages = cfg
        grid = (cdiv(n, bn), cdiv(k, bk))
        _dw_kernel[grid](grad_out, x, bits_bank, dst, lo, hi, pair, lo.shape[0], m, n, k,
                         bits_bank.shape[-1], grad_out.stride(0), x.stride(0),
                         bits_bank.stride(-2), bits_bank.stride(0) if bits_bank.dim() == 3 else 0,
                         dst.stride(0), ACCUMULATE=acc, IEEE=_ieee(grad_out.dtype), BLOCK_M=bm,
                         BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)

    def make_launch():  # candidates are timed on a scratch buffer: accumulate only once
        scratch = torch.empty_like(out)
        return lambda c: launch(c, dst=scratch, acc=False)

    launch(_config("dw", 64, n, k, grad_out.dtype, make_launch=make_launch))
    return out


def _one_segment(m: int, device):
    z = torch.zeros(1, dtype=torch.int32, device=device)
    return z, torch.full((1,), m, dtype=torch.int32, device=device), z


def masked_linear_dw(grad_out, x, bits):
    if (wt := _variant_wt("masked_linear_dw", grad_out.shape[0], grad_out, x)) is not None:
        return wt[0].masked_linear_dw(grad_out, x, bits)
    out = torch.empty(grad_out.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    return _dw(grad_out, x, bits, *_one_segment(x.shape[0], x.device), out, False)


def masked_linear_dw_accumulate_(grad, grad_out, x, bits):
    if (wt := _variant_wt("masked_linear_dw", grad_out.shape[0], grad_out, x)) is not None:
        return wt[0].masked_linear_dw_accumulate_(grad, grad_out, x, bits)
    _dw(grad_out, x, bits, *_one_segment(x.shape[0], x.device), grad, True)


def segmented_masked_linear(x, weight, bits_bank, seg_offsets, seg_pair, bias):
    if (wt := _variant_wt("segmented_masked_linear", _seg_rows(x, seg_pair), x, weight,
                          bias)) is not None:
        return wt[0].segmented_masked_linear(x, weight, bits_bank, seg_offsets, seg_pair, bias)
    t, k = x.shape
    n = weight.shape[0]
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0 or n == 0:
        return y
    segs = _known_spans(seg_offsets, seg_pair)
    if _route_segments(segs, t) and _same_dtype(x, weight, bias):
        def rows(wm, a, b):
            y[a:b] = torch.nn.functional.linear(x[a:b], wm, bias)

        _per_pair_dense(segs, weight, bits_bank, rows)
        return y

    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        lo, hi, pr = device_tiles(seg_offsets, seg_pair, bm, x, bits_bank)
        if lo.numel() == 0:
            return
        grid = (lo.numel(), cdiv(n, bn))
        _fwd_kernel[grid](x, weight, bits_bank, bias if bias is not None else x, y, lo, hi, pr,
                          t, n, k, bits_bank.shape[-1], x.stride(0), weight.stride(0),
                          bits_bank.stride(1), bits_bank.stride(0), y.stride(0), y.stride(1),
                          HAS_BIAS=bias is not None, SEGMENTED=True, IEEE=_ieee(x.dtype),
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                          num_stages=stages)

    launch(_config("seg_fwd", 64, n, k, x.dtype, launch))
    return y


def segmented_masked_linear_dx(grad_out, weight, bits_bank, seg_offsets, seg_pair):
    if (wt := _variant_wt("segmented_masked_linear_dx", _seg_rows(grad_out, seg_pair),
                          grad_out, weight)) is not None:
        return wt[0].segmented_masked_linear_dx(grad_out, weight, bits_bank, seg_offsets,
                                                seg_pair)
    t, n = grad_out.shape
    k = weight.shape[1]
    dx = torch.zeros(t, k, dtype=grad_out.dtype, device=grad_out.device)
    if t == 0 or k == 0 or n == 0:
        return dx
    segs = _known_spans(seg_offsets, seg_pair)
    if _route_segments(segs, t) and _same_dtype(grad_out, weight):
        _per_pair_dense(segs, weight, bits_bank,
                        lambda wm, a, b: torch.mm(grad_out[a:b], wm, out=dx[a:b]))
        return dx

    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        lo, hi, pr = device_tiles(seg_offsets, seg_pair, bm, grad_out, bits_bank)
        if lo.numel() == 0:
            return
        grid = (lo.numel(), cdiv(k, bk))
        _dx_kernel[grid](grad_out, weight, bits_bank, dx, lo, hi, pr, t, n, k,
                         bits_bank.shape[-1], grad_out.stride(0), weight.stride(0),
                         bits_bank.stride(1), bits_bank.stride(0), dx.stride(0), SEGMENTED=True,
                         IEEE=_ieee(grad_out.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         num_warps=warps, num_stages=stages)

    launch(_config("seg_dx", 64, n, k, grad_out.dtype, launch))
    return dx


def segmented_masked_linear_dw(grad_out, x, bits_bank, seg_offsets, seg_pair):
    if (wt := _variant_wt("segmented_masked_linear_dw", _seg_rows(x, seg_pair), grad_out,
                          x)) is not None:
        return wt[0].segmented_masked_linear_dw(grad_out, x, bits_bank, seg_offsets, seg_pair)
    out = torch.zeros(grad_out.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    segs = _known_spans(seg_offsets, seg_pair)
    if _route_segments(segs, x.shape[0]) and out.numel() and _same_dtype(grad_out, x):
        for a, b, p in segs:
            apply_mask(torch.mm(grad_out[a:b].t(), x[a:b]), bits_bank[p], out=out,
                       accumulate=True)
        return out
    lo, hi, pr = device_tiles(seg_offsets, seg_pair, None, x, bits_bank)
    if lo.numel() == 0:
        return out
    return _dw(grad_out, x, bits_bank, lo, hi, pr, out, False)


def masked_qkv_proj(x, weight, bits, bias, num_heads):
    b, t, d = x.shape
    dh = d // num_heads
    q, k, v = (torch.empty(b, num_heads, t, dh, dtype=x.dtype, device=x.device)
               for _ in range(3))
    m = b * t
    if m == 0 or d == 0:
        return q, k, v
    if m >= CUBLAS_MIN_M and _same_dtype(x, weight, bias):
        y = torch.nn.functional.linear(x.reshape(m, d), apply_mask(weight, bits), bias)
        y5 = y.view(b, t, 3, num_heads, dh)
        for i, out in enumerate((q, k, v)):
            out.copy_(y5[:, :, i].transpose(1, 2))
        return q, k, v

    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        grid = (cdiv(m, bm), cdiv(3 * d, bn))
        _qkv_kernel[grid](x, weight, bits, bias if bias is not None else x, q, k, v, m, d,
                          bits.shape[1], t, num_heads, dh, bits.stride(0),
                          HAS_BIAS=bias is not None, IEEE=_ieee(x.dtype), BLOCK_M=bm,
                          BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)

    launch(_config("qkv", m, 3 * d, d, x.dtype, launch))
    return q, k, v
