"""Measured Triton routes (lass_sparse/backends/triton/routes.py) and the tool that derives them
from a device-time sweep (tools/routes_from_sweep.py): the table's checks, the choice by op and
rows, the override and off switches, the kernels taking the routed variant (interpreter, CPU
tensors with the device lookup stubbed), and the tool on a synthetic sweep."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

import lass_sparse as ls
from lass_sparse.bitmask import pack_mask_reference

routes = pytest.importorskip("lass_sparse.backends.triton.routes")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool():
    spec = importlib.util.spec_from_file_location(
        "routes_from_sweep", os.path.join(REPO, "tools", "routes_from_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


GOOD = {"GPU X": {"source": "test", "routes": {
    "masked_linear": [[64, "wt"], [1024, "wt_tma"], [None, "v1"]],
    "segmented_masked_linear_dw": [[None, "wt"]]}}}


def test_the_packaged_table_is_valid():
    assert isinstance(routes.table(), dict)  # validated on load (empty without the file)


@pytest.mark.parametrize("bad,match", [
    ({"G": {"routes": {"masked_qkv_proj": [[None, "wt"]]}}}, "unknown op"),
    ({"G": {"routes": {"masked_linear_dx": [[None, "wt_tma"]]}}}, r"one of \('v1', 'wt'\)"),
    ({"G": {"routes": {"masked_linear": [[64, "wt"], [32, "v1"], [None, "v1"]]}}}, "ascending"),
    ({"G": {"routes": {"masked_linear": [[64, "wt"]]}}}, "null only in the last"),
    ({"G": {"routes": {"masked_linear": [[None, "wt"], [64, "v1"]]}}}, "null only in the last"),
    ({"G": {"routes": {"masked_linear": []}}}, "non-empty list"),
    ({"G": {"source": "x"}}, "expected {'source'"),
    ([], "object of GPU names"),
])
def test_a_bad_table_is_refused_naming_the_entry(bad, match):
    with pytest.raises(ValueError, match=match):
        routes.validate(bad)


def test_choose_by_op_and_rows(monkeypatch):
    routes.validate(GOOD)
    monkeypatch.setattr(routes, "for_device", lambda d: GOOD["GPU X"]["routes"])
    dev = torch.device("cpu")
    assert [routes.choose("masked_linear", m, dev) for m in (1, 64, 65, 1024, 5000)] == [
        "wt", "wt", "wt_tma", "wt_tma", "v1"]
    assert routes.choose("masked_linear_dx", 64, dev) == "v1"  # no route: the default
    assert routes.choose("segmented_masked_linear_dw", 10**6, dev) == "wt"


def test_no_routes_off_the_gpu_or_when_switched_off(monkeypatch):
    monkeypatch.setattr(routes, "table", lambda: GOOD)
    assert routes.for_device(torch.device("cpu")) is None
    monkeypatch.setenv(routes.ENV, "0")
    assert routes.for_device(torch.device("cuda", 0)) is None  # never asks CUDA
    assert routes.choose("masked_linear", 8, torch.device("cuda", 0)) == "v1"


def test_the_cuda_entries_leave_routed_ops_to_the_triton_kernels(monkeypatch):
    """The CUDA extension's cuBLAS route (csrc/cuda/binding.cpp) takes each op from
    ``cublas_min_m()`` rows, except ops a measured route names for any GPU model (no device
    query at import), or none with the routes switched off."""
    from lass_sparse.backends import cuda

    class Module:  # the extension's set_option
        def __init__(self):
            self.options = {}

        def set_option(self, name, value):
            self.options[name] = value

    monkeypatch.setattr(cuda, "cublas_rows", dict(cuda.cublas_rows))
    monkeypatch.delenv("LASS_SPARSE_CUBLAS_MIN_M", raising=False)
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    mod = Module()
    assert cuda.set_cublas_routes(mod, routed=lambda op: False) == dict.fromkeys(cuda.CUBLAS_OPS,
                                                                                64)
    assert mod.options == {f"cublas_min_m.{op}": 64 for op in cuda.CUBLAS_OPS}
    monkeypatch.setenv("LASS_SPARSE_CUBLAS_MIN_M", "256")
    monkeypatch.setattr(routes, "table", lambda: {"GPU Y": {"source": "t", "routes": {
        "masked_linear_dx": [[None, "wt"]]}}})
    assert cuda.set_cublas_routes(mod) == {"masked_linear": 256, "masked_linear_dx": -1,
                                           "masked_linear_dw": 256, "masked_qkv_proj": 256}
    assert mod.options["cublas_min_m.masked_linear_dx"] == -1
    monkeypatch.setenv(routes.ENV, "0")
    assert set(cuda.set_cublas_routes(mod).values()) == {256}
    assert set(cuda.set_cublas_routes(mod, min_m=-1).values()) == {-1}
    # the registry's predicates for a forced "cuda" follow the same rows
    cuda.set_cublas_routes(mod, min_m=64, routed=lambda op: False)
    x, w = torch.empty(64, 8, dtype=torch.bfloat16), torch.empty(4, 8, dtype=torch.bfloat16)
    assert cuda._takes_linear(x, w, None) and cuda._takes_linear(x[:16], w.float(), None)
    assert not cuda._takes_linear(x[:17], w, None) and not cuda._takes_linear(x, w.float(), None)
    assert cuda._takes_grad("masked_linear_dx")(x, w) and not cuda._takes_grad(
        "masked_linear_dx")(x[:63], w)
    assert not cuda._takes_accumulate(w.float(), x, x, None) and cuda._takes_accumulate(
        w, x, x, None)
    x3 = x.view(4, 16, 8)
    assert cuda._takes_qkv(x3, w, None, None, 2) and not cuda._takes_qkv(x3[:, :15], w, None,
                                                                         None, 2)
    # B*T <= 16: the decode GEMV's (cached decoding steps)
    assert cuda._takes_qkv(x3[:, :4], w, None, None, 2) and not cuda._takes_qkv(
        x3[:, :5], w, None, None, 2)
    monkeypatch.setenv("LASS_SPARSE_TRITON_VARIANT", "wt")  # a variant under test: Triton's
    assert not cuda._takes_linear(x, w, None) and not cuda._takes_grad("masked_linear_dw")(x, x)
    assert cuda._takes_linear(x[:16], w, None)  # the decode GEMV is not a Triton variant
    assert not cuda._takes_linear(x[:40], w, None)
    monkeypatch.setenv("LASS_SPARSE_CUDA_GEMV", "v3")  # the one-pair segmented GEMV: 64 rows
    assert cuda._takes_linear(x[:40], w, None) and cuda._takes_linear(x, w, None)


def test_the_cuda_entries_take_small_backward_rows(monkeypatch):
    """dx / dW of at most ``small_bwd_max_m()`` rows (16 by default, up to the kernels' limit
    of 64) take the small-M kernels, a float32 grad of 16-bit inputs included; off with the
    variable <= 0 or while a Triton variant is under test; a non-integer value is an error
    naming it."""
    from lass_sparse.backends import _cuda_common as cc
    from lass_sparse.backends import cuda

    class Module:
        def __init__(self):
            self.options = {}

        def set_option(self, name, value):
            self.options[name] = value

    monkeypatch.setattr(cuda, "small_rows", cuda.small_rows)
    monkeypatch.setattr(cuda, "cublas_rows", dict.fromkeys(cuda.CUBLAS_OPS, -1))
    monkeypatch.delenv(cc.SMALL_BWD_ENV, raising=False)
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    mod = Module()
    assert cuda.set_small_bwd(mod) == 16 == cc.SMALL_BWD_DEFAULT and cc.SMALL_BWD_MAX_M == 64
    assert mod.options == {"small_bwd_max_m": 16}
    x, w = torch.empty(16, 8, dtype=torch.bfloat16), torch.empty(4, 8, dtype=torch.bfloat16)
    dx, dw = cuda._takes_grad("masked_linear_dx"), cuda._takes_grad("masked_linear_dw")
    assert dx(x, w) and dw(x, x) and not dx(torch.empty(17, 4, dtype=torch.bfloat16), w)
    assert not dx(x, w.float())  # one dtype
    assert cuda._takes_accumulate(w.float(), x, x, None) and cuda._takes_accumulate(w, x, x, None)
    assert not cuda._takes_accumulate(w.half(), x, x, None)
    monkeypatch.setenv("LASS_SPARSE_TRITON_VARIANT", "wt")
    assert not dx(x, w) and not cuda._takes_accumulate(w.float(), x, x, None)
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT")
    monkeypatch.setenv(cc.SMALL_BWD_ENV, "4")
    assert cuda.set_small_bwd(mod) == 4 and not dx(x[:5], w) and dx(x[:4], w)
    monkeypatch.setenv(cc.SMALL_BWD_ENV, "99")
    assert cuda.set_small_bwd(mod) == 64
    assert dx(torch.empty(64, 4, dtype=torch.bfloat16), w) and not dx(
        torch.empty(65, 4, dtype=torch.bfloat16), w)
    monkeypatch.setenv(cc.SMALL_BWD_ENV, "0")
    assert cuda.set_small_bwd(mod) == -1 and mod.options["small_bwd_max_m"] == -1
    assert not dx(x[:1], w) and not cuda._takes_accumulate(w.float(), x[:1], x[:1], None)
    monkeypatch.setenv(cc.SMALL_BWD_ENV, "many")
    with pytest.raises(ValueError, match="LASS_SPARSE_CUDA_SMALL_BWD_MAX_M must be an integer"):
        cuda.set_small_bwd(mod)


def test_the_native_entries_take_integer_options():
    """``<extension>.set_option(name, value) -> previous`` (csrc/common/entry_module.h)."""
    if not ls.backends()["cpu"]["active"]:
        pytest.skip("the C++ extension is not built")
    from lass_sparse import _C

    old = _C.set_option("cublas_min_m.masked_linear_dw", 128)
    try:
        assert _C.set_option("cublas_min_m.masked_linear_dw", 7) == 128
    finally:
        _C.set_option("cublas_min_m.masked_linear_dw", old)
    assert _C.set_option("small_bwd_max_m", 5) == -1  # the CPU extension keeps it unused
    assert _C.set_option("small_bwd_max_m", -1) == 5
    with pytest.raises(ValueError, match="unknown option nope"):
        _C.set_option("nope", 1)


@pytest.mark.triton
@pytest.mark.skipif(not ls.backends()["triton"]["active"], reason="triton backend inactive")
def test_the_triton_kernels_take_the_routed_variant(monkeypatch):
    """masked_linear at 9 rows routes to wt_tma, at 40 rows to v1 (table above, 'GPU X');
    $LASS_SPARSE_TRITON_VARIANT overrides the table; results equal the reference either way."""
    wt = pytest.importorskip("lass_sparse.backends.triton.kernels_wt")
    table = {"masked_linear": [[16, "wt_tma"], [None, "v1"]],
             "segmented_masked_linear": [[None, "wt"]]}
    monkeypatch.setattr(routes, "for_device", lambda d: table)
    monkeypatch.delenv(wt.VARIANT_ENV, raising=False)
    seen = []
    real = wt.masked_linear
    monkeypatch.setattr(wt, "masked_linear",
                        lambda *a, **k: seen.append(k.get("var")) or real(*a, **k))
    real_seg = wt.segmented_masked_linear
    monkeypatch.setattr(wt, "segmented_masked_linear",
                        lambda *a: seen.append("seg") or real_seg(*a))
    w = torch.randn(24, 64)
    mask = torch.rand(24, 64) > 0.5
    bits = pack_mask_reference(mask)
    with ls.use_backend("triton"):
        for m in (9, 40):
            x = torch.randn(m, 64)
            torch.testing.assert_close(ls.masked_linear(x, w, bits), x @ (w * mask).T,
                                       atol=1e-4, rtol=1e-4)
        assert seen == ["wt_tma"]
        monkeypatch.setenv(wt.VARIANT_ENV, "wt")  # the override: every op, every M
        ls.masked_linear(torch.randn(40, 64), w, bits)
        assert seen == ["wt_tma", "wt"]
        monkeypatch.delenv(wt.VARIANT_ENV)
        bank = torch.stack([bits, pack_mask_reference(torch.rand(24, 64) > 0.5)])
        ls.segmented_masked_linear(torch.randn(6, 64), w, bank, torch.tensor([0, 2, 6]),
                                   torch.tensor([1, 0]))
        assert seen[-1] == "seg"


def _bench(op, impl, t, **case):
    return {"extra_info": {"op": op, "impl": impl, "device_s": t,
                           **{k: str(v) for k, v in case.items()}}}


def _sweep(routes_active=False):
    bs = []
    shapes = [(4096, 4096), (4096, 1024)]
    rel = {16: {"ours_wt": 0.5}, 64: {"ours_wt": 0.8, "ours_wt_tma": 0.7},
           256: {"ours_wt": 0.9, "ours_wt_tma": 0.75}, 1024: {"ours_wt": 0.99},
           4096: {"ours_wt": 1.2, "ours_wt_persistent": 1.1}}
    for m, others in rel.items():
        for n, k in shapes:
            bs.append(_bench("device_fwd", "ours", 1e-4, M=m, N=n, K=k))
            bs.append(_bench("device_fwd", "dense", 5e-5, M=m, N=n, K=k))  # not a variant
            for impl, r in others.items():
                bs.append(_bench("device_fwd", impl, 1e-4 * r, M=m, N=n, K=k))
            bs.append(_bench("device_dx", "ours", 1e-4, M=m, N=n, K=k))
            bs.append(_bench("device_dx", "ours_wt", 1e-4 * (0.98 if m < 1024 else 0.5),
                             M=m, N=n, K=k))
    for n, k in shapes:
        seg = dict(pairs=16, T=4096, N=n, K=k)
        bs.append(_bench("device_segmented_fwd", "ours", 2e-4, **seg))
        bs.append(_bench("device_segmented_fwd", "ours_wt", 1e-4, **seg))
        bs.append(_bench("device_segmented_fwd_bwd", "ours", 6e-4, **seg))
        bs.append(_bench("device_segmented_fwd_bwd", "ours_wt", 5.5e-4, **seg))  # bwd 4.5 vs 4
    return {"machine_info": {"gpu": "GPU X", "triton_routes": routes_active}, "benchmarks": bs,
            "commit_info": {"id": "0123456789abcdef"}}


def test_the_tool_picks_the_fastest_variant_per_rows_and_merges_ranges():
    gpu, got, report = _tool().routes_from(_sweep())
    assert gpu == "GPU X"
    # fwd: 16 rows skipped (the CUDA GEMV's), 64 and 256 wt_tma, 1024 wt is < 3% faster: v1
    assert got["masked_linear"] == [[256, "wt_tma"], [None, "v1"]]
    # dx: 16 rows skipped (the CUDA small-M kernel's), 2% faster is below the min gain; from
    # 1024 rows wt is 2x faster
    assert got["masked_linear_dx"] == [[256, "v1"], [None, "wt"]]
    assert not any(line.startswith(("masked_linear_dx rows=16", "masked_linear rows=16"))
                   for line in report)
    assert got["segmented_masked_linear"] == [[None, "wt"]]
    assert "segmented_masked_linear_dx" not in got  # its backward is slower under wt
    routes.validate({gpu: {"source": "t", "routes": got}})
    assert any("0.70x v1" in line for line in report)


def test_the_tool_reports_the_cuda_extensions_settings():
    """The CUDA extension's settings (not routes): v2 GEMV vs v1 at <= 16 rows, the small-M
    backward vs Triton, the segmented decode GEMV vs Triton, the autocast route, keeping W ⊙ M
    for the backward; rows above their ranges ignored."""
    bs = []
    for m in (1, 4, 16, 64):
        case = dict(M=m, N=4096, K=4096)
        bs += [_bench("device_fwd", "ours", 1e-5, **case),
               _bench("device_fwd", "ours_gemv2", (0.5 if m <= 16 else 9) * 1e-5, **case),
               _bench("device_dx", "ours", 2e-5, **case),
               _bench("device_dx", "ours_no_small", 1e-5, **case)]
    for t in (4, 16, 64):
        case = dict(T=t, N=4096, K=4096)
        bs += [_bench("device_segmented_decode", "ours", 1e-5, **case),
               _bench("device_segmented_decode", "ours_triton", 1.01e-5, **case)]
    bs += [_bench("device_fwd", "ours_gemv3", 2e-5, M=64, N=4096, K=4096),
           _bench("device_dx", "ours_small64", 1e-5, M=64, N=4096, K=4096)]
    for m in (256, 4096):
        case = dict(M=m, N=4096, K=4096)
        bs += [_bench("device_amp_fwd_bwd", "ours", 0.8e-4, **case),
               _bench("device_amp_fwd_bwd", "ours_fused", 1e-4, **case),
               _bench("device_fwd_bwd", "ours", 1e-4, **case),
               _bench("device_fwd_bwd", "ours_keep_wm", 1.1e-4, **case)]
    lines = _tool().cuda_choices({"benchmarks": bs})
    assert lines == [
        "cuda: decode GEMV v2 vs v1 (forward, M <= 16): 0.50x over 3 cases -> make v2 the "
        "default (LASS_SPARSE_CUDA_GEMV)",
        "cuda: GEMV v3 vs the default (forward, 17 <= M <= 64): 2.00x over 1 cases -> keep "
        "the default",
        "cuda: small-M backward vs Triton (M <= 16): 2.00x over 3 cases -> turn it off "
        "(LASS_SPARSE_CUDA_SMALL_BWD_MAX_M=0 as the default)",
        "cuda: small-M backward vs the default (17 <= M <= 64): 0.50x over 1 cases -> raise "
        "LASS_SPARSE_CUDA_SMALL_BWD_MAX_M's default to 64",
        "cuda: segmented decode GEMV vs Triton (T <= 64): 0.99x over 3 cases -> a tie: keep",
        "cuda: autocast layer: masked_cast + F.linear vs cast + masked_linear (fwd+bwd): 0.80x "
        "over 2 cases -> keep masked_cast",
        "cuda: W ⊙ M kept for the backward vs the default (fwd+bwd, M >= 64): 1.10x over 2 "
        "cases -> keep the default"]
    assert _tool().cuda_choices({"benchmarks": []}) == []


def test_the_tool_writes_the_table_and_refuses_a_routed_sweep(tmp_path, capsys):
    tool = _tool()
    src = tmp_path / "device.json"
    out = tmp_path / "routes.json"
    out.write_text(json.dumps({"Other GPU": {"source": "s", "routes": {
        "masked_linear_dw": [[None, "wt"]]}}}))
    src.write_text(json.dumps(_sweep()))
    assert tool.main([str(src), "-o", str(out)]) == 0
    table = routes.validate(json.loads(out.read_text()))
    assert set(table) == {"Other GPU", "GPU X"}
    assert "commit 01234567" in table["GPU X"]["source"]
    src.write_text(json.dumps(_sweep(routes_active=True)))
    assert tool.main([str(src), "-o", str(out), "--dry"]) == 2
    assert "LASS_SPARSE_TRITON_ROUTES=0" in capsys.readouterr().err
