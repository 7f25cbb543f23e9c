"""CUDA kernels run on the CPU: the small-M backward (dx and dW of at most 64 rows;
csrc/cuda/lass_kernels.cuh ``small_dx_*`` / ``small_dw_*``), the segmented decode GEMV
(``seg_gemv_*``), the decode GEMV v2 (``gemv2_*``) and the one-thread-per-item kernels (the
cuBLAS route's mask pass, pack, magnitude). Their bodies are host+device code, so
tests/ops/cuda_emulator.cu (built here with nvcc) runs the launchers' own plans (grid, vector
accesses, dx splits, row chunks, x chunks in shared memory) and the bodies at every grid
position in turn (v2's phases in barrier order; the GEMVs' warp shuffles replayed as the same
butterfly). Checked against the reference: every rows bound, the
three dtypes, odd and misaligned K, several dx splits, NaN/Inf off the mask, dW accumulated into
a grad of x's dtype or float32 with entries off the mask kept bit for bit, segment tables with
empty segments, repeated pairs and out-of-range values (clamped, never read outside)."""

from __future__ import annotations

import ctypes
import os
import re

import pytest
import torch

from lass_sparse import reference as ref
from lass_sparse.backends._cuda_common import DTYPE_CODE, abi
from lass_sparse.bitmask import pack_mask_reference
from lass_sparse.testing import within_torch_error

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_M = abi()["kSmallBwdMaxM"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((64, 64), (300, 96), (130, 37), (1, 8), (70, 200))  # (N, K): odd K, K % 8 != 0


@pytest.fixture(scope="module")
def emu(tmp_path_factory, nvcc_shared):
    lib = nvcc_shared(os.path.join(REPO, "tests", "ops", "cuda_emulator.cu"),
                      tmp_path_factory.mktemp("emu") / "libemu.so")
    e = ctypes.CDLL(str(lib))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    e.emu_small_dx.argtypes = [i32, p, p, p, p, i32, i64, i64, i32, i32]
    e.emu_small_dw.argtypes = [i32, i32, p, p, p, p, i32, i64, i64, i32]
    e.emu_small_dx_vec.argtypes = [i32, p, p, i32, i64]
    e.lass_small_dx_splits.argtypes = [i32, i64, i64, i32, i32]
    e.emu_seg_gemv.argtypes = [i32, p, p, p, p, p, i32, i32, p, p, i32, i64, i64]
    e.emu_gemv2.argtypes = [i32, p, p, p, p, p, i32, i64, i64]
    e.emu_apply_mask.argtypes = [i32, p, p, p, i64, i64, i32]
    e.emu_mask_cast.argtypes = [i32, i32, p, p, p, i64, i64]
    e.emu_pack.argtypes = [p, p, i64, i64]
    e.emu_magnitude.argtypes = [i32, p, ctypes.c_float, p, i64, i64]
    return e


def _problem(m, n, k, dtype, seed=0, nan_off_mask=False):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(m, n, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    keep = torch.rand(n, k, generator=g) < 0.6
    if nan_off_mask:
        w = torch.where(keep, w, torch.full_like(w, float("nan")))
        w[~keep & (torch.rand(n, k, generator=g) < 0.5)] = float("inf")
    return dy, w, x, keep, pack_mask_reference(keep)


def _dx(emu, dy, w, bits, splits=0, sm_count=132):
    m, n = dy.shape
    dx = torch.full((m, w.shape[1]), float("nan"), dtype=dy.dtype)
    used = emu.emu_small_dx(DTYPE_CODE[dy.dtype], dy.data_ptr(), w.data_ptr(), bits.data_ptr(),
                            dx.data_ptr(), m, n, w.shape[1], splits, sm_count)
    assert used >= 1
    return dx, used


def _close(ours, same, exact):
    ok, msg = within_torch_error(ours, same, exact)
    assert ok, msg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (1, 2, 3, 5, 8, 9, 16, 17, 40, 64))
def test_small_dx_matches_the_reference(emu, dtype, m):
    for n, k in SHAPES:
        dy, w, _, _, bits = _problem(m, n, k, dtype, seed=n + k)
        for splits in (1, 0, 3):  # one split, the launcher's choice, three
            dx, used = _dx(emu, dy, w, bits, splits=splits)
            _close(dx, ref.masked_linear_dx(dy, w, bits),
                   ref.masked_linear_dx(dy.double(), w.double(), bits))
            assert splits == 0 or used == splits


def test_small_dx_splits_follow_the_device_and_stay_deterministic(emu):
    # 16 rows, 2048 x 512 bf16 on a 132-SM device: N is split so there are >= 4 blocks per SM,
    # each split over >= 64 weight rows; the sum runs in split order, so results repeat bitwise
    splits = emu.lass_small_dx_splits(16, 2048, 512, DTYPE_CODE[torch.bfloat16], 132)
    assert splits == 2048 // abi()["kSmallDxMinSplitRows"]
    assert emu.lass_small_dx_splits(16, 2048, 512, DTYPE_CODE[torch.bfloat16], 1) == 4
    assert emu.lass_small_dx_splits(1, 63, 4096, DTYPE_CODE[torch.float32], 132) == 1
    dy, w, _, _, bits = _problem(16, 2048, 512, torch.bfloat16)
    a, used = _dx(emu, dy, w, bits)
    b, _ = _dx(emu, dy, w, bits)
    assert used == splits and torch.equal(a.view(torch.int16), b.view(torch.int16))
    _close(a, ref.masked_linear_dx(dy, w, bits),
           ref.masked_linear_dx(dy.double(), w.double(), bits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_dx_misaligned_weights_take_the_scalar_path(emu, dtype):
    m, n, k = 4, 50, 64
    dy, w, _, _, bits = _problem(m, n, k, dtype)
    dx = torch.empty(m, k, dtype=dtype)
    assert emu.emu_small_dx_vec(DTYPE_CODE[dtype], w.data_ptr(), dx.data_ptr(), m, k) == 1
    shifted = torch.empty(n * k + 1, dtype=dtype)[1:].view(n, k)  # 2 or 4 bytes off
    shifted.copy_(w)
    assert emu.emu_small_dx_vec(DTYPE_CODE[dtype], shifted.data_ptr(), dx.data_ptr(), m, k) == 0
    got, _ = _dx(emu, dy, shifted, bits)
    _close(got, ref.masked_linear_dx(dy, w, bits),
           ref.masked_linear_dx(dy.double(), w.double(), bits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_dx_never_uses_weights_off_the_mask(emu, dtype):
    dy, w, _, _, bits = _problem(6, 200, 72, dtype, nan_off_mask=True)
    for splits in (1, 4):
        dx, _ = _dx(emu, dy, w, bits, splits=splits)
        assert torch.isfinite(dx).all()
        _close(dx, ref.masked_linear_dx(dy, w, bits),
               ref.masked_linear_dx(dy.double(), w.double(), bits))


def _dw(emu, dy, x, bits, out, accumulate):
    m, n = dy.shape
    rc = emu.emu_small_dw(DTYPE_CODE[x.dtype], DTYPE_CODE[out.dtype], dy.data_ptr(),
                          x.data_ptr(), bits.data_ptr(), out.data_ptr(), m, n, x.shape[1],
                          int(accumulate))
    assert rc == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (1, 2, 4, 7, 8, 12, 16, 17, 33, 64))
def test_small_dw_matches_the_reference_and_is_zero_off_the_mask(emu, dtype, m):
    for n, k in SHAPES:
        dy, _, x, keep, bits = _problem(m, n, k, dtype, seed=3 * n + k)
        out = torch.full((n, k), float("nan"), dtype=dtype)
        _dw(emu, dy, x, bits, out, False)
        assert (out[~keep] == 0).all() and not out[~keep].signbit().any()
        _close(out, ref.masked_linear_dw(dy, x, bits),
               ref.masked_linear_dw(dy.double(), x.double(), bits))


@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32),
                                              (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32)])
def test_small_dw_accumulates_on_the_mask_and_keeps_the_rest_bitwise(emu, dtype, grad_dtype):
    for m, (n, k) in zip((1, 3, 40, 16, 64), SHAPES):
        dy, _, x, keep, bits = _problem(m, n, k, dtype, seed=m)
        grad = torch.randn(n, k).to(grad_dtype)
        grad[~keep & (torch.rand(n, k) < 0.3)] = float("nan")  # off-mask NaN / -0.0 stay
        grad[~keep & (torch.rand(n, k) < 0.3)] = -0.0
        before = grad.clone()
        _dw(emu, dy, x, bits, grad, True)
        bitview = torch.int32 if grad_dtype == torch.float32 else torch.int16
        assert torch.equal(grad.view(bitview)[~keep], before.view(bitview)[~keep])
        want = before.clone()
        ref.masked_linear_dw_accumulate_(want, dy, x, bits)
        exact = before.double()
        ref.masked_linear_dw_accumulate_(exact, dy.double(), x.double(), bits)
        _close(grad[keep], want[keep], exact[keep])


def test_small_dw_misaligned_outputs_take_the_scalar_path(emu):
    m, n, k = 3, 40, 64
    dy, _, x, _, bits = _problem(m, n, k, torch.bfloat16)
    base = torch.zeros(n * k + 1, dtype=torch.float32)
    grad = base[1:].view(n, k)  # 4 bytes off a 16-byte boundary
    _dw(emu, dy, x, bits, grad, True)
    want = torch.zeros(n, k)
    ref.masked_linear_dw_accumulate_(want, dy, x, bits)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


def test_the_emulated_launchers_refuse_what_the_real_ones_refuse(emu):
    z = torch.zeros(64, dtype=torch.float32)
    args = (z.data_ptr(),) * 4
    assert emu.emu_small_dx(0, *args, MAX_M + 1, 8, 8, 1, 1) == -1
    assert emu.emu_small_dw(0, 0, *args, MAX_M + 1, 8, 8, 0) == -1
    # a float32 dW of 16-bit x only when accumulating (masked_linear_dw returns x's dtype)
    assert emu.emu_small_dw(2, 0, *args, 4, 8, 8, 0) == -1
    assert emu.emu_small_dw(0, 2, *args, 4, 8, 8, 1) == -1


def _small_entries(ptx: dict, kind: str) -> dict:
    """{(type, MT[, out]): PTX} of the small_<kind> kernel instantiations (mangled names)."""
    types = {"f": "f32", "6__half": "f16", "13__nv_bfloat16": "bf16"}
    out = {}
    for name, body in ptx.items():
        m = re.match(rf"_Z\d+lass_small_{kind}I(f|6__half|13__nv_bfloat16)(S0_|f)?Li(\d+)E", name)
        if m:
            t = types[m.group(1)]
            key = (t, int(m.group(3)))
            if kind == "dw":  # the output type: S0_ repeats T; "f" after a 16-bit T is float
                key += ("f32" if m.group(2) == "f" and t != "f32" else "same",)
            out[key] = body
    return out


def test_small_kernels_stream_w_with_vector_loads_and_no_local_memory(sm90_build):
    """dx streams W with evict-first vector loads (16 bytes a row up to 8 rows, 8 above); dW
    loads x and stores dW as vectors; neither touches local memory (registers only)."""
    dx = _small_entries(sm90_build.ptx, "dx")
    dw = _small_entries(sm90_build.ptx, "dw")
    mts = (1, 2, 4, 8, 16)
    assert set(dx) == {(t, mt) for t in ("f32", "f16", "bf16") for mt in mts}
    assert set(dw) == ({(t, mt, "same") for t in ("f32", "f16", "bf16") for mt in mts}
                       | {(t, mt, "f32") for t in ("f16", "bf16") for mt in mts})
    for (t, mt), body in dx.items():
        vec = "v4" if mt <= 8 else "v2"
        assert re.search(rf"ld\.global\.cs\.{vec}", body), (t, mt)
        assert not re.search(r"ld\.local|st\.local", body), (t, mt)
    for key, body in dw.items():
        assert re.search(r"ld\.global(\.nc)?\.v[24]", body) and re.search(r"st\.global\.v[24]",
                                                                          body), key
        assert not re.search(r"ld\.local|st\.local", body), key



def _seg(emu, x, w, bank, offs, ids, bias=None):
    t, k = x.shape
    y = torch.full((t, w.shape[0]), float("nan"), dtype=x.dtype)
    offs, ids = torch.tensor(offs, dtype=torch.long), torch.tensor(ids, dtype=torch.long)
    rc = emu.emu_seg_gemv(DTYPE_CODE[x.dtype], x.data_ptr(), w.data_ptr(), bank.data_ptr(),
                          offs.data_ptr(), ids.data_ptr(), ids.numel(), bank.shape[0],
                          None if bias is None else bias.data_ptr(), y.data_ptr(), t,
                          w.shape[0], k)
    assert rc == 0
    return y, offs, ids


def _bank(p, n, k, seed=0, nan_w=None):
    g = torch.Generator().manual_seed(seed)
    keeps = torch.rand(p, n, k, generator=g) < 0.5
    return keeps, pack_mask_reference(keeps)


TABLES = {  # T rows: (seg_offsets, seg_pair) with P = 4 pairs
    1: ([0, 1], [2]),
    5: ([0, 0, 2, 2, 5], [3, 0, 1, 2]),          # empty segments
    16: ([0, 4, 8, 12, 16], [0, 1, 2, 3]),
    23: ([0, 7, 7, 20, 23], [1, 1, 0, 1]),        # a pair twice, a chunk boundary inside one
    64: ([0, 16, 17, 40, 64], [3, 2, 1, 0]),      # the most rows: 4 chunks
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", sorted(TABLES))
def test_segmented_gemv_matches_the_reference(emu, dtype, t):
    offs, ids = TABLES[t]
    for n, k in ((64, 64), (70, 200), (33, 37)):
        g = torch.Generator().manual_seed(t * 100 + k)
        x = torch.randn(t, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        _, bank = _bank(4, n, k, seed=t + n)
        for bias in (b, None):
            y, o, i = _seg(emu, x, w, bank, offs, ids, bias)
            _close(y, ref.segmented_masked_linear(x, w, bank, o, i, bias),
                   ref.segmented_masked_linear(x.double(), w.double(), bank, o, i,
                                               None if bias is None else bias.double()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_v3_is_the_segmented_kernel_with_one_pair_and_no_table(emu, dtype):
    """LASS_SPARSE_CUDA_GEMV=v3: lass_launch_decode_gemv runs the segmented GEMV with null
    tables (pair 0 for every row) over 1-64 rows: the plain masked linear."""
    for t, (n, k) in zip((1, 7, 16, 17, 40, 64), ((64, 64), (70, 200), (33, 37), (64, 64),
                                                   (70, 200), (20, 96))):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(t, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        bits = pack_mask_reference(torch.rand(n, k, generator=g) < 0.5)
        y = torch.full((t, n), float("nan"), dtype=dtype)
        rc = emu.emu_seg_gemv(DTYPE_CODE[dtype], x.data_ptr(), w.data_ptr(), bits.data_ptr(),
                              None, None, 0, 1, b.data_ptr(), y.data_ptr(), t, n, k)
        assert rc == 0
        _close(y, ref.masked_linear(x, w, bits, b),
               ref.masked_linear(x.double(), w.double(), bits, b.double()))


def test_segmented_gemv_never_uses_weights_off_the_mask(emu):
    t, n, k = 9, 40, 96
    keeps, bank = _bank(3, n, k, seed=4)
    x = torch.randn(t, k)
    w = torch.randn(n, k)
    w[~keeps.any(0)] = float("nan")  # off every pair's mask
    y, o, i = _seg(emu, x, w, bank, [0, 3, 9], [2, 0])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref.segmented_masked_linear(x, w.nan_to_num(), bank, o, i,
                                                              None))


def test_segmented_gemv_clamps_a_bad_table_instead_of_reading_outside(emu):
    """The op checks the table's values before the kernel runs; the kernel itself clamps them
    (offsets into [0, T], non-decreasing; ids into [0, P)), so a bad table read directly gives
    a defined result and no access outside the tensors."""
    t, n, k = 6, 16, 64
    _, bank = _bank(2, n, k, seed=1)
    x, w = torch.randn(t, k), torch.randn(n, k)
    y, *_ = _seg(emu, x, w, bank, [-5, 2, 1, 100], [7, -3, 1])
    # clamped: offsets [0, 2, 2, 6], ids [1, 0, 1]
    want = ref.segmented_masked_linear(x, w, bank, torch.tensor([0, 2, 2, 6]),
                                       torch.tensor([1, 0, 1]), None)
    torch.testing.assert_close(y, want)
    y, *_ = _seg(emu, x, w, bank, [0, 2], [0])  # rows 2.. in no segment: no mask, zeros
    assert torch.equal(y[2:], torch.zeros(t - 2, n))
    assert emu.emu_seg_gemv(0, *(x.data_ptr(),) * 5, 1, 2, None, x.data_ptr(), 65, n, k) == -1


def test_segmented_gemv_loads_w_as_vectors_and_keeps_rows_in_registers(sm90_build):
    """Per lane 16 bytes of W a step (two 16-byte loads for fp32), the rows' accumulators and
    pairs in registers (no local memory), for every dtype and rows bound."""
    seg = {n: b for n, b in sm90_build.ptx.items() if re.match(r"_Z\d+lass_seg_gemv", n)}
    assert len(seg) == 3 * 5
    for name, body in seg.items():
        assert re.search(r"ld\.global(\.nc)?\.v4", body), name
        assert not re.search(r"ld\.local|st\.local", body), name



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (1, 2, 3, 8, 16))
def test_decode_gemv_v2_matches_the_reference(emu, dtype, m):
    """Every rows bound, 2 and 4 output rows per warp (N >= 16384), x in one chunk and in
    several (K beyond the chunk kc, a partial last chunk), bias or not."""
    for n, k in ((64, 64), (100, 200), (24, 2600), (16384, 32)):
        g = torch.Generator().manual_seed(m * 7 + k)
        x = torch.randn(m, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        bits = pack_mask_reference(torch.rand(n, k, generator=g) < 0.6)
        for bias in (b, None):
            y = torch.full((m, n), float("nan"), dtype=dtype)
            rc = emu.emu_gemv2(DTYPE_CODE[dtype], x.data_ptr(), w.data_ptr(), bits.data_ptr(),
                               None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k)
            assert rc == 0
            _close(y, ref.masked_linear(x, w, bits, bias),
                   ref.masked_linear(x.double(), w.double(), bits,
                                     None if bias is None else bias.double()))


def test_decode_gemv_v2_never_uses_weights_off_the_mask_and_refuses_what_v1_serves(emu):
    m, n, k = 4, 40, 512
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    keep = torch.rand(n, k) < 0.5
    bits = pack_mask_reference(keep)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    w_inf = w.masked_fill(~keep, float("inf"))  # held: the kernel reads it
    rc = emu.emu_gemv2(DTYPE_CODE[torch.bfloat16], x.data_ptr(), w_inf.data_ptr(),
                       bits.data_ptr(), None, y.data_ptr(), m, n, k)
    assert rc == 0 and torch.isfinite(y).all()
    _close(y, ref.masked_linear(x, w, bits, None),
           ref.masked_linear(x.double(), w.double(), bits, None))
    odd = torch.randn(m, 36, dtype=torch.bfloat16)  # K % 8 != 0: v1's
    assert emu.emu_gemv2(2, odd.data_ptr(), odd.data_ptr(), bits.data_ptr(), None,
                         y.data_ptr(), m, n, 36) == -1
    assert emu.emu_gemv2(2, x.data_ptr(), w.data_ptr(), bits.data_ptr(), None, y.data_ptr(),
                         17, n, k) == -1



@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_mask_selects_and_accumulates_on_the_mask_only(emu, dtype):
    """The cuBLAS route's mask pass: out = src ⊙ M (exact zeros off the mask, NaN/Inf there
    never copied), in place, or out += src on the mask with off-mask bits kept; 128-bit
    accesses when K % 8 == 0 and both pointers are 16-byte aligned, else scalar."""
    bitview = torch.int32 if dtype == torch.float32 else torch.int16
    for rows, k, shift in ((5, 64, 0), (7, 37, 0), (3, 96, 1)):
        keep = torch.rand(rows, k) < 0.5
        bits = pack_mask_reference(keep)
        base = torch.randn(rows * k + 1).to(dtype)
        src = base[shift:shift + rows * k].view(rows, k)
        src[~keep] = float("nan")
        out = torch.full((rows, k), 7.0, dtype=dtype)
        vec = emu.emu_apply_mask(DTYPE_CODE[dtype], src.data_ptr(), bits.data_ptr(),
                                 out.data_ptr(), rows, k, 0)
        assert vec == int(k % 8 == 0 and shift == 0)
        assert torch.equal(out, torch.where(keep, src, torch.zeros_like(src)))
        grad = torch.randn(rows, k).to(dtype)
        grad[~keep] = -0.0
        before = grad.clone()
        emu.emu_apply_mask(DTYPE_CODE[dtype], src.data_ptr(), bits.data_ptr(), grad.data_ptr(),
                           rows, k, 1)
        assert torch.equal(grad.view(bitview)[~keep], before.view(bitview)[~keep])
        torch.testing.assert_close(grad[keep], (before.float() + src.float())[keep].to(dtype))
        inplace = src.clone()
        emu.emu_apply_mask(DTYPE_CODE[dtype], inplace.data_ptr(), bits.data_ptr(),
                           inplace.data_ptr(), rows, k, 0)
        assert torch.equal(inplace, out)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_mask_cast_kernels_equal_torch_casts_bit_for_bit(emu, half):
    """masked_cast's kernels (fp32 -> 16-bit, 16-bit -> fp32): (W ⊙ M).to(dtype) with torch's
    rounding (nearest even; overflow to Inf), exact zeros off the mask (NaN/Inf there never
    passes), 128-bit accesses only for K % 8 == 0 and 16-byte aligned pointers."""
    for rows, k, shift in ((5, 64, 0), (7, 37, 0), (3, 96, 1), (1, 8, 0)):
        keep = torch.rand(rows, k) < 0.5
        bits = pack_mask_reference(keep)
        for src_dtype, out_dtype in ((torch.float32, half), (half, torch.float32)):
            base = (torch.randn(rows * k + 1) * 3e4).to(src_dtype)  # fp16 overflows: Inf
            src = base[shift:shift + rows * k].view(rows, k)
            src[~keep & (torch.rand(rows, k) < 0.5)] = float("nan")
            src[0, 0] = float("-inf")
            out = torch.full((rows, k), 7.0, dtype=out_dtype)
            vec = emu.emu_mask_cast(DTYPE_CODE[src_dtype], DTYPE_CODE[out_dtype],
                                    src.data_ptr(), bits.data_ptr(), out.data_ptr(), rows, k)
            assert vec == int(k % 8 == 0 and shift == 0), (rows, k, shift)
            want = torch.where(keep, src, torch.zeros_like(src)).to(out_dtype)
            assert torch.equal(out.nan_to_num(1.0), want.nan_to_num(1.0))
            assert torch.equal(out.isnan(), want.isnan())
    f16 = torch.zeros(2, 8, dtype=torch.float16)
    assert emu.emu_mask_cast(DTYPE_CODE[torch.float16], DTYPE_CODE[torch.bfloat16],
                             f16.data_ptr(), bits.data_ptr(), f16.data_ptr(), 1, 8) == -1


def test_pack_and_magnitude_kernels_are_bit_exact(emu):
    for rows, k in ((3, 1), (4, 31), (2, 33), (5, 100)):
        mask = torch.rand(rows, k) < 0.5
        bits = torch.full((rows, (k + 31) // 32), -1, dtype=torch.int32)
        emu.emu_pack(mask.data_ptr(), bits.data_ptr(), rows, k)
        assert torch.equal(bits, pack_mask_reference(mask))
        for dtype in DTYPES:
            w = torch.randn(rows, k).to(dtype)
            thr = float(w.float().abs().median())
            got = torch.full_like(bits, -1)
            assert emu.emu_magnitude(DTYPE_CODE[dtype], w.data_ptr(), thr, got.data_ptr(), rows,
                                     k) == 0
            assert torch.equal(got, pack_mask_reference(w.float().abs() > thr))
