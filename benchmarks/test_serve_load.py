"""A bounded run of benchmarks/serve_load.py (the load test of ``lass-sparse serve``): two
batching modes, 1 and 4 clients, about a second each, on 127.0.0.1. Checks that every request
is answered, that cross-pair batching does batch (across pairs) while ``none`` never does, and
that the report and plot are written."""

from __future__ import annotations

import argparse
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("sentencepiece")

import serve_load  # noqa: E402

RUN = os.path.join(serve_load.REPO, "results", "models")


@pytest.mark.skipif(not os.path.exists(os.path.join(RUN, "run.json")),
                    reason="results/models (the published models) not present")
def test_bounded_load_test(tmp_path):
    import json

    with open(os.path.join(RUN, "run.json")) as f:
        n = len(json.load(f)["pairs"])  # English-centric pairs: 2n supervised, n(n-1) zero-shot
    n_served = 2 * n + n * (n - 1)
    rows = serve_load.load_test(RUN, "lass", "masks.safetensors", modes=("cross", "none"),
                                levels=(1, 4), seconds=1.0, warmup=0.3, beam=2,
                                log=lambda *_: None)
    assert [(r["mode"], r["clients"]) for r in rows] == [("cross", 1), ("cross", 4),
                                                         ("none", 1), ("none", 4)]
    for r in rows:
        assert r["errors"] == {} and r["requests"] > 0 and r["sentences_per_s"] > 0, r
        assert r["p99_ms"] >= r["p50_ms"] > 0 and r["directions"] == n_served
    by = {(r["mode"], r["clients"]): r for r in rows}
    assert by[("none", 4)]["mean_batch"] == 1.0  # one request at a time
    assert by[("cross", 4)]["mean_batch"] > 1.0 and by[("cross", 4)]["mean_batch_pairs"] > 1.0
    meta = serve_load.machine()
    args = argparse.Namespace(seconds=1.0, warmup=0.3, threads=1, beam=2, repeats=1)
    md = serve_load.render(rows, [], meta, args)
    assert "| cross | 4 |" in md and meta["commit"] in md
    serve_load.plot(rows, str(tmp_path / "serving.png"), meta)
    assert (tmp_path / "serving.png").stat().st_size > 10_000
