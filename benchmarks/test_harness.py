"""The device-time harness's logic on the CPU (test_device_time.py runs only on a GPU): case
lists, cost and ratio math, report columns, the timed callables and the joint-training stepper
on small shapes."""

from __future__ import annotations

import pytest
import torch
from common import (
    BANDWIDTH_MAX_M,
    DEVICE_M,
    DEVICE_SHAPES,
    SMOKE_DEVICE_CASES,
    Peaks,
    achieved,
    case_id,
    device_cases,
    device_columns,
    eager_time,
    inputs,
    linear_cost,
    mask_budget_bytes,
    share,
    sweep_priority,
)
from report import device_ratios, measured_peaks, memory_deltas, render
from test_device_time import (
    BASE,
    JOINT_PAIRS,
    LINEAR_OPS,
    joint_stepper,
    linear_fn,
    segmented_fn,
    train_stepper,
)

import lass_sparse as ls


def test_device_cases_are_the_issues_shapes_and_rows():
    cases = device_cases()
    assert set(DEVICE_M) == {1, 4, 16, 64, 256, 1024, 4096, 8192}
    assert set(DEVICE_SHAPES) == {(4096, 4096), (4096, 1024), (1024, 4096), (8192, 8192)}
    for shape in DEVICE_SHAPES[:3]:  # every M on the GEMM shapes
        assert [m for s, m in cases if s == shape] == DEVICE_M
    assert [m for s, m in cases if s == (8192, 8192)] == [m for m in DEVICE_M
                                                          if m <= BANDWIDTH_MAX_M]
    assert len(cases) == len(set(cases)) == 3 * 8 + 3
    assert len({case_id(c) for c in cases}) == len(cases)
    assert device_cases(smoke=True) == SMOKE_DEVICE_CASES
    assert set(SMOKE_DEVICE_CASES) <= set(cases)
    assert JOINT_PAIRS == [1, 8, 32]
    assert BASE == dict(vocab=8000, d=512, heads=8, ffn=2048, layers=6)


def test_linear_cost_counts_each_operand_once():
    m, n, k = 16, 4096, 1024
    flop, nbytes = linear_cost("fwd", m, n, k, 2)
    assert flop == 2 * m * n * k
    assert nbytes == 2 * (m * k + n * k + m * n) + n * (k // 32) * 4
    assert linear_cost("fwd", m, n, k, 2, masked=False)[1] == nbytes - n * (k // 32) * 4
    assert linear_cost("fwd", 1, 100, 33, 4)[1] == 4 * (33 + 3300 + 100) + 100 * 2 * 4
    for op in ("dx", "dw"):
        assert linear_cost(op, m, n, k, 2) == (flop, nbytes)
    fb_flop, fb_bytes = linear_cost("fwd_bwd", m, n, k, 2, masked=False)
    assert fb_flop == 3 * flop and fb_bytes == 2 * 2 * (m * k + n * k + m * n)
    with pytest.raises(ValueError, match="op must be one of"):
        linear_cost("bwd", m, n, k, 2)


def test_ratio_math():
    assert achieved(1e12, 2e12, 0.5) == (2.0, 4.0)
    assert share(2.0, 4.0) == 0.5
    assert share(2.0, None) is None and share(2.0, 0.0) is None
    with pytest.raises(ValueError, match="seconds must be > 0"):
        achieved(1.0, 1.0, 0.0)
    weights = 44_040_192  # Transformer-base's masked weights
    assert mask_budget_bytes(weights, 32) == 32 * weights // 8
    assert mask_budget_bytes(9, 1) == 2  # a partial byte counts


def test_device_columns_show_shares_of_the_peaks():
    cols = device_columns(100e-6, 80e-6, 150e-6, 400.0, 1.5, Peaks(800.0, 3.0))
    assert cols == {"device_us": "100.0", "graph_us": "80.0", "eager_us": "150.0",
                    "TFLOP/s": "400.0 (50%)", "TB/s": "1.50 (50%)"}
    cols = device_columns(100e-6, None, 150e-6, 400.0, 1.5, None)
    assert cols["graph_us"] == "—" and cols["TFLOP/s"] == "400.0"
    assert Peaks(790.4, 3.014).info() == {"peak_TFLOP/s": "790", "peak_TB/s": "3.01"}


def _bench(op, impl, group, median, **extra):
    return {"group": group, "stats": {"median": median},
            "extra_info": {"op": op, "impl": impl, **extra}}


def test_report_renders_device_ratios_peaks_and_memory():
    g = "device_fwd[dtype=bf16 M=16 N=4096 K=4096]"
    peaks = {"peak_TFLOP/s": "790", "peak_TB/s": "3.01"}
    data = {"machine_info": {"gpu": "NVIDIA H100"}, "benchmarks": [
        _bench("device_fwd", "ours", g, 2e-4, device_s=1e-4, device_us="100.0",
               **{"TFLOP/s": "5.4 (1%)"}, **peaks),
        _bench("device_fwd", "dense", g, 1e-4, device_s=5e-5, device_us="50.0", **peaks),
        _bench("device_fwd", "naive", g, 4e-4, device_s=2e-4, device_us="200.0", **peaks),
        _bench("joint_peak_memory", "ours", "joint_peak_memory[config=base pairs=32]", 1.0,
               peak_MB="1200.0", mask_budget_MB="168.0"),
        _bench("joint_peak_memory", "dense", "joint_peak_memory[config=base pairs=32]", 1.0,
               peak_MB="1100.0", mask_budget_MB="168.0"),
    ]}
    md = render(data)
    assert "measured peaks in this run: 790 TFLOP/s, 3.01 TB/s" in md
    head = next(ln for ln in md.splitlines() if ln.startswith("| case") and "device" in ln)
    assert "ours/dense (device)" in head and "ours/naive (device)" in head
    assert "device_s" not in head and "peak_TFLOP/s" not in head
    row = next(ln for ln in md.splitlines() if ln.startswith("| dtype=bf16 M=16"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-2:] == ["2.00×", "0.50×"]  # from device_s, not from the eager medians
    assert cells[4:6] == ["2.00×", "0.50×"]  # the eager ratios beside them
    mem = next(ln for ln in md.splitlines() if ln.startswith("| config=base pairs=32"))
    assert mem.rstrip(" |").endswith("+100.0")
    assert measured_peaks({"benchmarks": []}) == ""
    row = {"ours": {"extra_info": {"device_s": 2.0}}, "dense": {"extra_info": {}}}
    assert device_ratios(row, ["dense"]) == ["—"]
    assert memory_deltas({"ours": {"extra_info": {"peak_MB": "1"}}}, ["dense"]) == ["—"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_device_timers_need_a_gpu():
    from common import device_time, graph_time

    for fn in (lambda: device_time(lambda: None), lambda: graph_time(lambda: None),
               Peaks.measure):
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            fn()


def test_eager_time_is_the_median_of_single_calls():
    assert eager_time(torch.mm, torch.eye(8), torch.eye(8), calls=5, device="cpu") > 0


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_the_timed_callables_compute_what_their_names_say(op):
    torch.manual_seed(0)
    x, w, mask, bits = inputs(5, 24, 40, torch.float32)
    out = {impl: linear_fn(op, impl, x, w, mask, bits)() for impl in ("ours", "dense", "naive")}
    torch.testing.assert_close(out["ours"], out["naive"], atol=1e-5, rtol=1e-5)
    if op in ("dw", "fwd_bwd"):  # off-mask dW exactly 0 in ours, not in dense
        assert not out["ours"][~mask].any() and out["dense"][~mask].any()


@pytest.mark.parametrize("op", ["fwd", "fwd_bwd"])
def test_the_segmented_callables_compute_what_their_names_say(op):
    torch.manual_seed(0)
    x, w = torch.randn(12, 40), torch.randn(24, 40)
    masks = torch.rand(3, 24, 40) < 0.5
    bank = torch.stack([ls.pack_mask(mk) for mk in masks])
    offs, pid = torch.tensor([0, 4, 8, 12]), torch.arange(3)
    out = {impl: segmented_fn(op, impl, x, w, masks, bank, offs, pid)()
           for impl in ("ours", "dense", "naive")}
    torch.testing.assert_close(out["ours"], out["naive"], atol=1e-5, rtol=1e-5)
    if op == "fwd":
        torch.testing.assert_close(out["dense"], x @ w.T)
    else:  # dW: each pair's rows land only inside that pair's mask
        assert not out["ours"][~masks.any(0)].any() and out["dense"][~masks.any(0)].any()


@pytest.mark.parametrize("impl", ["ours", "dense", "naive"])
def test_joint_stepper_trains_one_pair_with_every_mask_resident(impl):
    tiny = dict(vocab=50, d=32, heads=2, ffn=64, layers=1)
    step, weights = joint_stepper(impl, 3, batch=2, seq=5, device="cpu", config=tiny)
    assert weights == 2 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 64) + 3 * 32 * 32 + 32 * 32
    step()
    step()


def test_sweep_priority_runs_key_rows_first_with_their_baselines():
    """LASS_SPARSE_SWEEP_PRIORITY=1 order: the key cases' forward and fwd+bwd first, each
    case's impls adjacent with the baselines first; then segmented; dx / dW late."""
    items = []
    for op in LINEAR_OPS:
        for impl in ("ours", "dense", "naive", "ours_wt"):
            for case in (((1024, 4096), 16), ((4096, 4096), 256), ((4096, 4096), 4096)):
                items.append(("test_linear_device_time", dict(op=op, impl=impl, case=case)))
    items.append(("test_segmented_device_time", dict(op="fwd", impl="ours", nk=(4096, 4096))))
    items.append(("test_joint_training_peak_memory", dict(impl="ours", pairs=8)))
    order = sorted(range(len(items)), key=lambda i: sweep_priority(*items[i], i))
    named = [(items[i][0], items[i][1].get("op"), items[i][1].get("impl"),
              items[i][1].get("case")) for i in order]
    key = ((4096, 4096), 4096)
    assert named[:8] == [("test_linear_device_time", op, impl, key)
                         for op in ("fwd", "fwd_bwd")
                         for impl in ("dense", "naive", "ours", "ours_wt")]
    assert named[8][3] == ((4096, 4096), 256)
    seg = next(i for i, n in enumerate(named) if n[0] == "test_segmented_device_time")
    first_dx = next(i for i, n in enumerate(named) if n[1] == "dx")
    assert 16 <= seg < first_dx and named[-1][0] == "test_joint_training_peak_memory"


def test_a_spent_time_budget_skips_benchmarks_and_says_why():
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, LASS_SPARSE_BENCH_BUDGET_S="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "--benchmark-disable",
                        os.path.join(here, "test_harness.py")
                        + "::test_eager_time_is_the_median_of_single_calls"],
                       cwd=os.path.dirname(here), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-2000:]
    assert "time budget spent (LASS_SPARSE_BENCH_BUDGET_S=0)" in r.stdout


@pytest.mark.parametrize("impl", ["plain", "dense", "ours"])
def test_train_stepper_trains_and_its_flops_match_torchs_count(impl):
    """The CLI-training row's step (small dims, CPU): it trains, and the model FLOPs behind its
    MFU equal what torch's FlopCounterMode counts for our models, dense and masked (the plain
    model's causal SDPA is counted a little lower by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    over = dict(d_model=64, heads=2, ffn=128, enc_layers=2, dec_layers=2)
    step, tokens, flops = train_stepper(impl, batch=4, seq=16, device="cpu", **over)
    assert tokens == 4 * 16 * 2
    first = float(step())
    with FlopCounterMode(display=False) as fc:
        step()
    for _ in range(8):
        last = float(step())
    assert last < first
    counted = fc.get_total_flops()
    if impl in ("dense", "ours"):
        assert counted == flops
    else:
        assert 0.97 * flops <= counted <= flops


def test_the_short_summary_lists_cases_in_order_with_ratios(capsys):
    """report.py --summary (the end of a lent GPU's output): one line per device-time case, in
    the file's order, device µs per impl and ours over each baseline; capped rows."""
    from report import main

    def bench(group, impl, s):
        return {"group": group, "extra_info": {"op": "device_fwd", "impl": impl,
                                               "device_s": s}, "stats": {"median": s}}

    data = {"benchmarks": [bench("device_fwd[M=4096]", i, t) for i, t in
                           (("dense", 2e-4), ("ours", 3e-4), ("naive", 6e-4))]
            + [bench("device_fwd[M=1]", "ours", 1e-5), bench("device_fwd[M=2]", "ours", 1e-5)]}
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "device.json")
        with open(path, "w") as f:
            json.dump(data, f)
        assert main([path, "--summary", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("device_fwd[M=4096]")
    assert "ours=300.0" in out[1] and "/dense=1.50" in out[1] and "/naive=0.50" in out[1]
    assert out[2].startswith("device_fwd[M=1]") and out[-1] == "... 1 more cases in the report"
