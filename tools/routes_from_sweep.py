"""Measured Triton routes from a device-time sweep (issue 29: flip a default only where measured
faster):

    python tools/routes_from_sweep.py OUT/device.json [--min-gain 0.03] [--dry]
        [-o lass_sparse/backends/triton/routes.json]

Reads ``make gpu-session``'s ``device.json`` (benchmarks/test_device_time.py) and, for each op
the Triton backend routes (lass_sparse/backends/triton/routes.py), picks per row count the
variant with the lowest device time — the geometric mean over the swept shapes of its time
relative to ``v1`` (the sweep's ``ours``) — keeping ``v1`` unless another variant is at least
``--min-gain`` faster. Consecutive row counts with one winner merge into one range. The GPU's
entry in the routes file is replaced (other GPUs' entries stay); ``--dry`` prints only.

Sources: ``device_fwd`` -> masked_linear, ``device_dx`` -> masked_linear_dx, ``device_dw`` ->
masked_linear_dw (and its accumulate), all at rows > 16 only (the CUDA GEMV and small-M kernels
serve fewer rows), ``device_segmented_fwd`` -> segmented_masked_linear,
``device_segmented_fwd_bwd`` minus the forward -> segmented dx and dW. The sweep must have run
with ``v1`` as ``ours``: a GPU that already has routes sweeps with ``LASS_SPARSE_TRITON_ROUTES=0``
for this.

It also reports the CUDA extension's own choices, which are settings, not routes (it writes
nothing for them): the decode GEMV v2 and v3 against v1 (``ours_gemv2`` / ``ours_gemv3`` /
``ours``, forward at <= 16 rows: ``LASS_SPARSE_CUDA_GEMV``), v3 against the default at 17-64
rows, the small-M backward against the Triton kernels (``ours`` /
``ours_no_small`` at <= 16 rows: ``LASS_SPARSE_CUDA_SMALL_BWD_MAX_M``) and against the default
at 17-64 rows (``ours_small64``) and the segmented decode
GEMV against the Triton kernels (``ours`` / ``ours_triton``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "lass_sparse", "backends", "triton", "routes.json")
IMPLS = {"ours": "v1", "ours_wt": "wt", "ours_wt_persistent": "wt_persistent",
         "ours_wt_tma": "wt_tma"}
LINEAR = {"device_fwd": "masked_linear", "device_dx": "masked_linear_dx",
          "device_dw": "masked_linear_dw"}
# Rows the CUDA extension serves itself, whatever the route: the decode GEMV (forward) and the
# small-M dx / dW kernels ("ours" is neither v1 nor any Triton variant there).
CUDA_SMALL_ROWS = 16


class SweepError(ValueError):
    """The sweep cannot give routes (wrong file, routes active, nothing measured)."""


def _times(data: dict) -> dict:
    """{sweep op: {rows: {shape: {variant: seconds}}}} from the benchmarks' extra_info."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        var = IMPLS.get(info.get("impl"))
        if var is None or "device_s" not in info or "op" not in info:
            continue
        op = info["op"]
        if op in LINEAR:
            rows, shape = int(info["M"]), (int(info["N"]), int(info["K"]))
        elif op.startswith("device_segmented_"):
            rows = int(info["T"]) // int(info["pairs"])
            shape = (int(info["N"]), int(info["K"]))
        else:
            continue
        out[op][rows][shape][var] = float(info["device_s"])
    return out


def _winner(per_shape: dict, allowed: tuple[str, ...], min_gain: float) -> tuple[str, float]:
    """(variant, its geometric-mean time relative to v1) over the shapes that measured v1."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for times in per_shape.values():
        if "v1" not in times:
            continue
        for var, t in times.items():
            if var in allowed:
                ratios[var].append(t / times["v1"])
    n = len(ratios.get("v1", []))
    gm = {v: math.exp(sum(map(math.log, r)) / len(r)) for v, r in ratios.items()
          if len(r) == n and n}
    if not gm:
        return "v1", 1.0
    best = min(gm, key=gm.get)
    return (best, gm[best]) if gm[best] <= 1.0 - min_gain else ("v1", 1.0)


def _merge(winners: list[tuple[int, str]]) -> list[list] | None:
    """[(rows, variant)] ascending -> [[max_rows, variant], ..., [None, last]]; None if all v1."""
    if all(v == "v1" for _, v in winners):
        return None
    steps: list[list] = []
    for rows, var in winners:
        if steps and steps[-1][1] == var:
            steps[-1][0] = rows
        else:
            steps.append([rows, var])
    steps[-1][0] = None
    return steps


def routes_from(data: dict, min_gain: float = 0.03) -> tuple[str, dict, list[str]]:
    """(GPU name, its routes, report lines) from a sweep's pytest-benchmark JSON."""
    from lass_sparse.backends.triton.routes import OPS

    mi = data.get("machine_info", {})
    gpu = mi.get("gpu")
    if not gpu:
        raise SweepError("no GPU in machine_info: not a device sweep's JSON")
    if mi.get("triton_routes"):
        raise SweepError(f"the sweep ran with {gpu}'s routes active ('ours' is routed, not v1):"
                         " sweep again with LASS_SPARSE_TRITON_ROUTES=0")
    times = _times(data)
    if not times:
        raise SweepError("no device-time benchmarks of ours and its variants in the file")
    routes, report = {}, []

    def decide(route_op: str, by_rows: dict, skip_rows: int = 0) -> None:
        winners = []
        for rows in sorted(by_rows):
            if rows <= skip_rows:
                continue
            var, rel = _winner(by_rows[rows], OPS[route_op], min_gain)
            winners.append((rows, var))
            report.append(f"{route_op} rows={rows}: {var}"
                          + (f" ({rel:.2f}x v1)" if var != "v1" else ""))
        steps = _merge(winners) if winners else None
        if steps:
            routes[route_op] = steps

    for sweep_op, route_op in LINEAR.items():
        if sweep_op in times:
            decide(route_op, times[sweep_op], CUDA_SMALL_ROWS)
    fwd, both = times.get("device_segmented_fwd", {}), times.get("device_segmented_fwd_bwd", {})
    if fwd:
        decide("segmented_masked_linear", fwd)
    backward = {}
    for rows, shapes in both.items():
        for shape, ts in shapes.items():
            f = fwd.get(rows, {}).get(shape, {})
            bwd = {v: t - f[v] for v, t in ts.items() if v in f}
            if bwd:
                backward.setdefault(rows, {})[shape] = bwd
    if backward:
        for op in ("segmented_masked_linear_dx", "segmented_masked_linear_dw"):
            decide(op, backward)
    return gpu, routes, report


# The CUDA extension's settings the sweep compares: (what, sweep ops, impl timed, its baseline,
# the rows (lowest, highest) compared, the setting to change when the impl loses / wins).
CUDA_CHOICES = (
    ("decode GEMV v2 vs v1 (forward, M <= 16)", ("device_fwd",), "ours_gemv2", "ours",
     (1, CUDA_SMALL_ROWS), "keep v1", "make v2 the default (LASS_SPARSE_CUDA_GEMV)"),
    ("decode GEMV v3 vs v1 (forward, M <= 16)", ("device_fwd",), "ours_gemv3", "ours",
     (1, CUDA_SMALL_ROWS), "keep v1", "make v3 the default (LASS_SPARSE_CUDA_GEMV)"),
    ("GEMV v3 vs the default (forward, 17 <= M <= 64)", ("device_fwd",), "ours_gemv3", "ours",
     (CUDA_SMALL_ROWS + 1, 64), "keep the default", "serve these rows with v3"),
    ("small-M backward vs Triton (M <= 16)", ("device_dx", "device_dw", "device_fwd_bwd"),
     "ours", "ours_no_small", (1, CUDA_SMALL_ROWS),
     "turn it off (LASS_SPARSE_CUDA_SMALL_BWD_MAX_M=0 as the default)", "keep it on"),
    ("small-M backward vs the default (17 <= M <= 64)",
     ("device_dx", "device_dw", "device_fwd_bwd"), "ours_small64", "ours",
     (CUDA_SMALL_ROWS + 1, 64), "keep the default",
     "raise LASS_SPARSE_CUDA_SMALL_BWD_MAX_M's default to 64"),
    ("segmented decode GEMV vs Triton (T <= 64)", ("device_segmented_decode",), "ours",
     "ours_triton", (1, 64), "route it to Triton (backends/cuda.py _takes_segmented)",
     "keep it"),
    ("autocast layer: masked_cast + F.linear vs cast + masked_linear (fwd+bwd)",
     ("device_amp_fwd_bwd",), "ours", "ours_fused", (1, 1 << 30),
     "go back to the fused route under autocast (nn/linear.py autocast_weight_dtype)",
     "keep masked_cast"),
    ("W ⊙ M kept for the backward vs the default (fwd+bwd, M >= 64)", ("device_fwd_bwd",),
     "ours_keep_wm", "ours", (64, 1 << 30), "keep the default",
     "offer keeping W ⊙ M from forward to backward (memory for speed)"),
)


def cuda_choices(data: dict, min_gain: float = 0.03) -> list[str]:
    """One report line per CUDA_CHOICES entry measured in the sweep: the geometric mean of the
    impl's device time over its baseline's, in the cases both ran, and what it suggests."""
    times: dict = defaultdict(dict)  # (op, case) -> {impl: seconds}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "device_s" not in info or "op" not in info:
            continue
        case = tuple(sorted((k, v) for k, v in info.items() if k in ("M", "N", "K", "T")))
        times[(info["op"], case)][info.get("impl")] = float(info["device_s"])
    lines = []
    for what, ops, impl, base, (lo, hi), lose, win in CUDA_CHOICES:
        ratios = [ts[impl] / ts[base] for (op, case), ts in times.items()
                  if op in ops and impl in ts and base in ts
                  and lo <= int(dict(case).get("M", dict(case).get("T", 0))) <= hi]
        if not ratios:
            continue
        gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
        advice = win if gm <= 1.0 - min_gain else lose if gm >= 1.0 + min_gain else "a tie: keep"
        lines.append(f"cuda: {what}: {gm:.2f}x over {len(ratios)} cases -> {advice}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="the sweep's pytest-benchmark JSON (device.json), or the "
                    "partial .jsonl a cut-off sweep leaves")
    ap.add_argument("-o", "--out", default=DEFAULT_OUT, help="routes file to update")
    ap.add_argument("--min-gain", type=float, default=0.03,
                    help="a variant replaces v1 only when this much faster (default 0.03)")
    ap.add_argument("--dry", action="store_true", help="print the routes, write nothing")
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from report import load  # the sweep's JSON, or what a cut-off sweep wrote as it went

    try:
        data = load(a.json)
        gpu, routes, report = routes_from(data, a.min_gain)
    except (OSError, ValueError, SweepError) as e:  # JSONDecodeError, SweepError: ValueErrors
        print(f"routes_from_sweep: {e}", file=sys.stderr)
        return 2
    print("\n".join(report + cuda_choices(data, a.min_gain)))
    print(json.dumps({gpu: routes}, indent=1))
    if a.dry:
        return 0
    from lass_sparse.backends.triton.routes import validate

    table = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            table = json.load(f)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if routes:
        table[gpu] = {"source": f"{os.path.basename(a.json)} "
                                f"(commit {data.get('commit_info', {}).get('id', '?')[:8]}, "
                                f"{stamp}, min gain {a.min_gain:.0%})", "routes": routes}
    else:
        table.pop(gpu, None)  # v1 wins everywhere: no entry
    validate(table, a.out)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
