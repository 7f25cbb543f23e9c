"""Turn a pytest-benchmark JSON file into a markdown table of ratios (ours/dense, ours/naive, ...).

    python benchmarks/report.py benchmarks/results/cpu.json [-o benchmarks/results/<device>.md]

It also reads the JSON-lines file a run writes as it goes under ``LASS_SPARSE_BENCH_PARTIAL``
(benchmarks/conftest.py): what a sweep measured before it was cut off.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

BASELINES = ("dense", "dense32", "naive", "unpack", "reference", "bool", "numpy", "plain",
             "plain_compiled")
# extra_info keys that are inputs of computed columns, not columns of their own
HIDDEN = {"op", "impl", "flop", "bytes", "device_s", "peak_TFLOP/s", "peak_TB/s"}


def load(path: str) -> dict:
    """A ``--benchmark-json`` file, or a ``$LASS_SPARSE_BENCH_PARTIAL`` JSON-lines file (a
    header line with the machine/commit info, then one benchmark a line) in the same shape; a
    last line cut short by a kill is dropped."""
    with open(path) as f:
        if not path.endswith(".jsonl"):
            return json.load(f)
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    if not records or "machine_info" not in records[0]:
        raise ValueError(f"{path}: no header line (machine_info): not a partial-results file")
    return {**records[0], "benchmarks": records[1:]}


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def render(data: dict) -> str:
    mi = data.get("machine_info", {})
    device = mi.get("gpu") or mi.get("cpu_model") or mi.get("cpu", {}).get("brand_raw", "?")
    lines = [
        f"# Benchmarks on {device}",
        "",
        f"- date: {data.get('datetime', '?')}",
        f"- torch {mi.get('torch', '?')}, triton {mi.get('triton', 'n/a')}, "
        f"threads {mi.get('threads', '?')}, python {mi.get('python_version', '?')}",
        f"- active backends: {', '.join(k for k, v in mi.get('backends', {}).items() if v)}",
        "- time = median of pytest-benchmark rounds, all in this one run; "
        "ratio < 1 means ours is faster",
    ]
    peaks = measured_peaks(data)
    if peaks:
        lines.append(f"- measured peaks in this run: {peaks} (bf16 8192³ torch.mm; "
                     "device-to-device copy, bytes read + written); device-time tables: "
                     "device_us = CUDA events over back-to-back calls, graph_us = CUDA-graph "
                     "replay, eager_us = one synchronised call; TFLOP/s and TB/s (share of the "
                     "peak) from the faster device time")
    lines.append("")
    by_op: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        by_op[info["op"]][b["group"]][info["impl"]] = b
    for op, cases in by_op.items():
        impls = sorted({i for c in cases.values() for i in c}, key=lambda i: (i != "ours", i))
        base = [i for i in impls if i in BASELINES]
        lines += [f"## {op}", ""]
        case_keys = {kv.split("=")[0] for kv in next(iter(cases))[len(op) + 1:-1].split()}
        extra = sorted({k for r in cases.values() for b in r.values()
                        for k in b.get("extra_info", {})}
                       - case_keys - HIDDEN)
        device = any("device_s" in b.get("extra_info", {}) for r in cases.values()
                     for b in r.values())
        memory = any("peak_MB" in b.get("extra_info", {}) for r in cases.values()
                     for b in r.values())
        head = ["case"] + [f"{i}" for i in impls] + [f"ours/{b}" for b in base] + extra
        if device:
            head += [f"ours/{b} (device)" for b in base]
        if memory:
            head += [f"ours − {b} MB" for b in base]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for group, row in cases.items():
            case = group[group.index("[") + 1 : -1] if "[" in group else group
            med = {i: row[i]["stats"]["median"] for i in row}
            cells = [case] + [_fmt_time(med[i]) if i in med else "—" for i in impls]
            for b in base:
                ok = "ours" in med and b in med
                cells.append(f"{med['ours'] / med[b]:.2f}×" if ok else "—")
            ours = row.get("ours", {})
            flop = ours.get("extra_info", {}).get("flop")
            if flop and "ours" in med:
                cells[0] += f" ({float(flop) / med['ours'] / 1e9:.1f} GFLOP/s"
                nbytes = ours.get("extra_info", {}).get("bytes")
                cells[0] += f", {float(nbytes) / med['ours'] / 1e9:.1f} GB/s)" if nbytes else ")"
            for k in extra:  # per-implementation values when more than one has them
                vals = [(i, row[i].get("extra_info", {}).get(k)) for i in impls if i in row]
                vals = [(i, v) for i, v in vals if v is not None]
                cells.append(str(vals[0][1]) if len(vals) == 1 else
                             "; ".join(f"{i} {v}" for i, v in vals) or "—")
            if device:
                cells += device_ratios(row, base)
            if memory:
                cells += memory_deltas(row, base)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def measured_peaks(data: dict) -> str:
    """``"790 TFLOP/s, 3.02 TB/s"`` from the first benchmark that recorded the run's peaks."""
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "peak_TFLOP/s" in info:
            return f"{info['peak_TFLOP/s']} TFLOP/s, {info.get('peak_TB/s', '?')} TB/s"
    return ""


def device_ratios(row: dict, base: list[str]) -> list[str]:
    """ours / baseline of the device times (``extra_info["device_s"]``) of one case's row."""
    dev = {i: float(b["extra_info"]["device_s"]) for i, b in row.items()
           if "device_s" in b.get("extra_info", {})}
    return [f"{dev['ours'] / dev[b]:.2f}×" if "ours" in dev and dev.get(b) else "—"
            for b in base]


def memory_deltas(row: dict, base: list[str]) -> list[str]:
    """ours − baseline of ``extra_info["peak_MB"]`` in one case's row."""
    mb = {i: float(b["extra_info"]["peak_MB"]) for i, b in row.items()
          if "peak_MB" in b.get("extra_info", {})}
    return [f"{mb['ours'] - mb[b]:+.1f}" if "ours" in mb and b in mb else "—" for b in base]


def summary(data: dict, rows: int = 40) -> str:
    """A short plain table of the device-time cases (the end of a lent GPU's output): per case
    the device µs of each impl and ours over each baseline, in the file's order (the sweep's
    priority order), at most ``rows`` lines."""
    cases: dict[str, dict[str, float]] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "device_s" in info and "impl" in info:
            cases.setdefault(b["group"], {})[info["impl"]] = float(info["device_s"])
    lines = [f"{'case':58s} device µs per impl; ours/baseline"]
    for group, dev in list(cases.items())[:rows]:
        impls = " ".join(f"{i}={t * 1e6:.1f}" for i, t in dev.items())
        ratios = " ".join(f"/{b}={dev['ours'] / dev[b]:.2f}" for b in BASELINES
                          if "ours" in dev and dev.get(b))
        lines.append(f"{group[:58]:58s} {impls} {ratios}".rstrip())
    if len(cases) > rows:
        lines.append(f"... {len(cases) - rows} more cases in the report")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark --benchmark-json output (or a partial .jsonl)")
    ap.add_argument("-o", "--out", help="write markdown here (default: stdout)")
    ap.add_argument("--summary", type=int, metavar="ROWS",
                    help="print a short plain table of the first ROWS device-time cases instead")
    a = ap.parse_args(argv)
    try:
        data = load(a.json)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        print(f"report: {e}", file=sys.stderr)
        return 2
    if a.summary is not None:
        sys.stdout.write(summary(data, a.summary))
        return 0
    md = render(data)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    else:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
