"""Load test of ``lass-sparse serve`` on 127.0.0.1: throughput and latency by batching mode and
concurrency, and memory of one LaSS model serving N directions vs N dense models.

::

    python benchmarks/serve_load.py                       # the full run: results/serving.{md,png}
    python benchmarks/serve_load.py --quick --out /tmp/x  # a bounded smoke run

Latency/throughput: for each batching mode (``cross``: batches mix directions; ``pair``: one
direction per batch; ``none``: one request at a time) a server is started on the published
models (results/models, stage lass, every supervised and zero-shot direction) and driven by
closed-loop clients (1, 8, 32, 64), each sending one sentence per request (beam 4) for the
directions in turn. The three servers run side by side and the modes take turns at each level
(rounds of a few seconds; medians over the rounds), so a shared machine's load hits them alike.
Throughput counts sentences answered in the measured window; latencies are of the requests
started and answered in it.

Memory: server RSS after one request per served direction, for 1, 6 and 16 directions of one
model with a MaskBank, against a process that holds the same number of dense models (same
imports, one translation each). Both for the published tiny model and for a Transformer-base
model with random weights and random masks (16 directions: en<->de fr es it pt ru zh ar).

Everything is bounded: ``OMP_NUM_THREADS`` (``--threads``, default 1) for the server, a few
seconds per level, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lass_sparse.serve.process import ServerProcess  # noqa: E402

MODES = ("cross", "pair", "none")
LEVELS = (1, 8, 32, 64)
LANGS16 = ("de", "fr", "es", "it", "pt", "ru", "zh", "ar")


# --------------------------------------------------------------------------- load generation


def sentences_by_lang(limit: int = 40) -> dict[str, list[str]]:
    """Source sentences per language from the demo corpus's multi-way test set."""
    from lass_sparse.mt.corpus import load_corpus

    cp = load_corpus("demo", None, max_train=1)
    rows = cp.test[:limit]
    return {lang: [r[lang] for r in rows if r.get(lang)] for lang in rows[0]}


def _quantile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


async def _level(url: str, pairs: Sequence[str], texts: dict[str, list[str]], clients: int,
                 seconds: float, warmup: float, beam: int) -> dict:
    import httpx

    done: list[tuple[float, float, float]] = []  # (start, end, latency)
    errors: dict[int, int] = {}
    t_start = time.monotonic() + warmup
    t_end = t_start + seconds
    counter = [0]

    async def client(cid: int, c: httpx.AsyncClient) -> None:
        while time.monotonic() < t_end:
            i = counter[0]
            counter[0] += 1
            pair = pairs[i % len(pairs)]
            pool = texts[pair.split("-")[0]]
            body = {"pair": pair, "text": pool[(i // len(pairs)) % len(pool)], "beam": beam}
            t0 = time.monotonic()
            r = await c.post("/v1/translate", json=body)
            t1 = time.monotonic()
            if r.status_code != 200:
                errors[r.status_code] = errors.get(r.status_code, 0) + 1
                continue
            done.append((t0, t1, t1 - t0))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        before = (await c.get("/metrics")).text
        await asyncio.gather(*(client(i, c) for i in range(clients)))
        after = (await c.get("/metrics")).text
    window = [d for d in done if d[0] >= t_start and d[1] <= t_end]
    answered = [d for d in done if t_start <= d[1] <= t_end]
    lat = [d[2] for d in window]
    batches = _metric(after, "lass_serve_batch_sentences_count") - _metric(
        before, "lass_serve_batch_sentences_count")
    sents = _metric(after, "lass_serve_batch_sentences_sum") - _metric(
        before, "lass_serve_batch_sentences_sum")
    pairs_sum = _metric(after, "lass_serve_batch_pairs_sum") - _metric(
        before, "lass_serve_batch_pairs_sum")
    return {"clients": clients, "sentences_per_s": len(answered) / seconds,
            "p50_ms": 1e3 * _quantile(lat, 0.5), "p99_ms": 1e3 * _quantile(lat, 0.99),
            "mean_ms": 1e3 * statistics.fmean(lat) if lat else float("nan"),
            "requests": len(window), "errors": errors,
            "mean_batch": sents / batches if batches else float("nan"),
            "mean_batch_pairs": pairs_sum / batches if batches else float("nan")}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def load_test(run: str, stage: str, masks: str, *, modes: Sequence[str] = MODES,
              levels: Sequence[int] = LEVELS, seconds: float = 3.0, warmup: float = 1.0,
              beam: int = 4, threads: int = 1, repeats: int = 1, log=print) -> list[dict]:
    """One server per mode, all started together; for each concurrency level the modes take
    turns (``repeats`` rounds of ``seconds`` each), so they are compared under the same load of
    a shared machine. Rows of the table: per (mode, level) the medians over the rounds."""
    import httpx

    from lass_sparse.serve.process import wait_all

    texts = sentences_by_lang()
    servers = {mode: ServerProcess(["--run", run, "--stage", stage, "--masks", masks,
                                    "--batching", mode, "--log-level", "warning",
                                    "--max-queue", "4096"], threads=threads, cwd=REPO)
               for mode in modes}
    rows = []
    try:
        wait_all(list(servers.values()))
        pairs = httpx.get(servers[modes[0]].url + "/v1/pairs").json()["pairs"]
        for clients in levels:
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            for _ in range(repeats):
                for mode in modes:
                    runs[mode].append(asyncio.run(_level(servers[mode].url, pairs, texts,
                                                         clients, seconds, warmup, beam)))
            for mode in modes:
                rs = runs[mode]
                r = {k: statistics.median(x[k] for x in rs)
                     for k in ("sentences_per_s", "p50_ms", "p99_ms", "mean_ms", "mean_batch",
                               "mean_batch_pairs")}
                errors: dict[int, int] = {}
                for x in rs:
                    for code, n in x["errors"].items():
                        errors[code] = errors.get(code, 0) + n
                r.update(mode=mode, clients=clients, directions=len(pairs), errors=errors,
                         requests=sum(x["requests"] for x in rs), rounds=len(rs))
                log(f"  {mode:5s} clients {clients:3d}: {r['sentences_per_s']:7.1f} sent/s  "
                    f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  batch "
                    f"{r['mean_batch']:.1f} ({r['mean_batch_pairs']:.1f} pairs)  "
                    f"errors {r['errors'] or 0}")
                rows.append(r)
    finally:
        for srv in servers.values():
            srv.stop()
    rows.sort(key=lambda r: (modes.index(r["mode"]), r["clients"]))
    return rows


# --------------------------------------------------------------------------------- memory


def make_random_run(out: str, config: str = "base", langs: Sequence[str] = LANGS16,
                    alpha: float = 0.5, seed: int = 0) -> str:
    """A run folder with ``config`` weights (stage ``model``: the published ``lass`` weights
    for ``tiny``, random ones otherwise) and a MaskBank of random masks for en<->``langs``
    (``masks16.safetensors``), with the published tokenizer."""
    import torch

    from lass_sparse.lass.checkpoint import save_checkpoint
    from lass_sparse.lass.model import Seq2Seq, make_config
    from lass_sparse.masks import MaskBank
    from lass_sparse.nn import masked_parameters

    src = os.path.join(REPO, "results", "models")
    with open(os.path.join(src, "run.json")) as f:
        info = json.load(f)
    cfg = make_config(config, info["model"]["vocab_size"], mask_output_proj=True)
    info["model"] = cfg.to_dict()
    info["pairs"] = [f"en-{x}" for x in langs]  # the directions a dense model serves
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(src, info["tokenizer"]), os.path.join(out, info["tokenizer"]))
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(info, f, indent=1)
    torch.manual_seed(seed)
    model = Seq2Seq(cfg)
    if config == "tiny":
        shutil.copytree(os.path.join(src, "lass"), os.path.join(out, "model"))
    else:
        save_checkpoint(os.path.join(out, "model", "ckpt"), model, None, {"step": 0})
    names = masked_parameters(model)
    bank = MaskBank({n: model.get_parameter(n).shape for n in names}, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    for x in langs:
        for d in (f"en-{x}", f"{x}-en"):
            bank.add_pair(d, {n: torch.rand(s, generator=g) >= alpha
                              for n, s in bank.shapes.items()})
    bank.save(os.path.join(out, "masks16.safetensors"))
    return out


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def dense_rss(run: str, stage: str, pairs: Sequence[str]) -> dict:
    """In a fresh process: the server's imports, then one dense model per direction, each
    translating one sentence; RSS before and after (KiB)."""
    code = (
        "import json, os, sys\n"
        "import torch\n"
        "import lass_sparse.serve.app, uvicorn\n"
        "from lass_sparse.serve.engine import NativeEngine\n"
        "def rss():\n"
        "    return [int(l.split()[1]) for l in open('/proc/self/status')"
        " if l.startswith('VmRSS:')][0]\n"
        "run, stage, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]\n"
        "base = rss()\n"
        "engines = []\n"
        "for p in pairs:\n"
        "    e = NativeEngine.from_run(run, stage, None, pairs=[p], zero_shot=False)\n"
        "    e.run(e.prepare(p, ['Open the file'], 4), 1, 4)\n"
        "    engines.append(e)\n"
        "params = sum(q.numel() * q.element_size() for e in engines"
        " for q in e.model.parameters())\n"
        "print(json.dumps({'base_kib': base, 'rss_kib': rss(), 'param_bytes': params}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code, run, stage, *pairs], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def lass_rss(run: str, stage: str, masks: str, pairs: Sequence[str]) -> dict:
    """A real server serving ``pairs`` after one request per direction: RSS (KiB) and what its
    /health reports (parameter and mask bytes)."""
    import httpx

    srv = ServerProcess(["--run", run, "--stage", stage, "--masks", masks, "--no-zero-shot",
                         "--pairs", *pairs, "--log-level", "warning"], cwd=REPO)
    with srv:
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            for p in pairs:
                r = c.post("/v1/translate", json={"pair": p, "text": "Open the file", "beam": 1,
                                                  "max_len": 4})
                r.raise_for_status()
            # and one mixed batch over every pair (the stacked masks of the segmented kernel)
            body = [{"pair": p, "text": "Open the file", "beam": 1, "max_len": 4} for p in pairs]

            async def burst():
                async with httpx.AsyncClient(base_url=srv.url, timeout=300) as ac:
                    await asyncio.gather(*(ac.post("/v1/translate", json=b) for b in body))

            asyncio.run(burst())
            health = c.get("/health").json()
        rss = _rss_kib(srv.pid)
    return {"rss_kib": rss, "param_bytes": health["parameter_bytes"],
            "mask_bytes": health["mask_bytes"]}


def memory_test(counts: Sequence[int] = (1, 6, 16), configs: Sequence[str] = ("tiny", "base"),
                log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            run = make_random_run(os.path.join(tmp, config), config)
            dirs = [d for x in LANGS16 for d in (f"en-{x}", f"{x}-en")]
            for n in counts:
                pairs = dirs[:n]
                lass = lass_rss(run, "model", "masks16.safetensors", pairs)
                dense = dense_rss(run, "model", pairs)
                row = {"config": config, "directions": n, "lass_rss_mib": lass["rss_kib"] / 1024,
                       "dense_rss_mib": dense["rss_kib"] / 1024,
                       "dense_base_mib": dense["base_kib"] / 1024,
                       "lass_model_mib": (lass["param_bytes"] + lass["mask_bytes"]) / 2**20,
                       "dense_model_mib": dense["param_bytes"] / 2**20}
                log(f"  {config:4s} {n:2d} directions: LaSS server {row['lass_rss_mib']:7.1f} "
                    f"MiB (model+masks {row['lass_model_mib']:6.1f})  dense x{n} "
                    f"{row['dense_rss_mib']:7.1f} MiB (models {row['dense_model_mib']:7.1f})")
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------- report


def machine() -> dict:
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit,
            "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def render(rows: list[dict], mem: list[dict], meta: dict, args: argparse.Namespace) -> str:
    lines = [
        "# `lass-sparse serve`: load test",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores (shared with other work while this "
        f"ran; 1-min load average at the start {meta['load']:.1f}), Python {meta['python']}, "
        f"torch {meta['torch']}, git commit `{meta['commit']}`. Written by "
        "`python benchmarks/serve_load.py` "
        f"(per level and mode {args.repeats} rounds of {args.seconds:g} s after {args.warmup:g} "
        "s of warm-up, the modes taking turns within a round, medians shown; server "
        f"`--threads {args.threads}` / OMP_NUM_THREADS={args.threads}, beam {args.beam}, "
        "default window `--max-wait-ms 5`, `--max-batch-sentences 64`).",
        "",
        "## Throughput and latency",
        "",
        "The published tiny model (results/models, stage `lass`, masks.safetensors: every "
        "supervised and zero-shot direction). Closed-loop clients on 127.0.0.1, one sentence "
        f"per request, the requests spread over all {rows[0]['directions'] if rows else 0} "
        "directions in turn. `cross`: batches mix "
        "directions (one forward per decoder step, each row under its own mask); `pair`: a "
        "batch holds one direction (as a server per direction would); `none`: one request at "
        "a time. *batch*: mean sentences per batch (and distinct directions in it).",
        "",
        "| batching | clients | sentences/s | p50 ms | p99 ms | batch (pairs) | requests |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        err = f" ({sum(r['errors'].values())} errors)" if r["errors"] else ""
        lines.append(f"| {r['mode']} | {r['clients']} | {r['sentences_per_s']:.1f} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} "
                     f"({r['mean_batch_pairs']:.1f}) | {r['requests']}{err} |")
    best = {m: max((r for r in rows if r["mode"] == m), key=lambda r: r["sentences_per_s"])
            for m in {r["mode"] for r in rows}}
    if {"cross", "pair", "none"} <= set(best):
        c, p, n = (best[m]["sentences_per_s"] for m in ("cross", "pair", "none"))
        lines += ["", f"Peak throughput (sentences/s): cross-pair {c:.1f}, one pair per batch "
                  f"{p:.1f}, one request at a time {n:.1f}; cross/pair {c / p:.2f}x, "
                  f"cross/none {c / n:.2f}x."]
    if mem:
        lines += [
            "", "## Memory: one model for N directions vs N dense models", "",
            "*LaSS server*: RSS of a `lass-sparse serve` process after one request per "
            "direction and one batch mixing all of them (`--pairs` the first N of "
            "en<->de fr es it pt ru zh ar, `--no-zero-shot`). *N dense models*: RSS of one "
            "process with the same imports holding N copies of the model (one per direction, "
            "as N fine-tuned dense models would be), each having translated one sentence; "
            f"the imports alone take {mem[0]['dense_base_mib']:.0f} MiB. *model bytes*: "
            "parameters (+ 1-bit masks). `tiny`: the published model's weights with random "
            "masks for the directions it has no mask for; `base`: Transformer-base "
            "(d 512, 6+6 layers) with random weights and random masks, α = 0.5.",
            "",
            "| model | directions | LaSS server RSS MiB | model + masks MiB | N dense models "
            "RSS MiB | dense model bytes MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m in mem:
            lines.append(f"| {m['config']} | {m['directions']} | {m['lass_rss_mib']:.0f} | "
                         f"{m['lass_model_mib']:.1f} | {m['dense_rss_mib']:.0f} | "
                         f"{m['dense_model_mib']:.1f} |")
    lines += ["", "Plot: results/serving.png (p50 and p99 latency against throughput, one "
              "curve per batching mode, points labelled by the number of clients).", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"cross": "tab:blue", "pair": "tab:orange", "none": "tab:gray"}
    labels = {"cross": "cross-pair batching", "pair": "one pair per batch",
              "none": "one request at a time"}
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        x = [r["sentences_per_s"] for r in rs]
        ax.plot(x, [r["p50_ms"] for r in rs], "o-", color=colors[mode],
                label=f"{labels[mode]} (p50)")
        ax.plot(x, [r["p99_ms"] for r in rs], "x--", color=colors[mode], alpha=0.6,
                label=f"{labels[mode]} (p99)")
        for r in rs:
            ax.annotate(str(r["clients"]), (r["sentences_per_s"], r["p50_ms"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (sentences/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"lass-sparse serve, {rows[0]['directions']} directions, beam 4 "
                 f"(CPU, {meta['commit']}); labels: clients", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=os.path.join(REPO, "results", "models"))
    ap.add_argument("--stage", default="lass")
    ap.add_argument("--masks", default="masks.safetensors")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--levels", nargs="+", type=int, default=list(LEVELS))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds per level; the modes take turns within a round")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", nargs="*", default=["tiny", "base"],
                    help="model configs for the memory table (none: skip it)")
    ap.add_argument("--quick", action="store_true",
                    help="a bounded smoke run: levels 1 and 8, 1.5 s each, tiny memory only")
    ap.add_argument("--out", default=os.path.join(REPO, "results", "serving"),
                    help="writes OUT.md and OUT.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.levels, args.seconds, args.warmup, args.memory = [1, 8], 1.5, 0.5, ["tiny"]
        args.repeats = 1
    meta = machine()
    t0 = time.monotonic()
    print(f"load test ({', '.join(args.modes)}; clients {args.levels}):")
    rows = load_test(args.run, args.stage, args.masks, modes=args.modes, levels=args.levels,
                     seconds=args.seconds, warmup=args.warmup, beam=args.beam,
                     threads=args.threads, repeats=args.repeats)
    mem = []
    if args.memory:
        print("memory:")
        mem = memory_test(configs=args.memory)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(render(rows, mem, meta, args))
    plot(rows, args.out + ".png", meta)
    print(f"wrote {args.out}.md and {args.out}.png in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
