"""tools/gpu_check.py, exercised on CPU: its case list (every public op, the nn modules and
MaskedAdamW, through the public API) on every backend that serves CPU tensors, its table, its
exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from gpu_check_loader import load_gpu_check

import lass_sparse as ls
from lass_sparse.ops import registry as _registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.py")
CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if ls.backends()[b]["active"]]


def _load():
    return load_gpu_check()


def test_dry_run_passes_every_case_on_every_cpu_backend(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--dry", "--out",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "lass_sparse.backends():" in r.stdout
    table = (tmp_path / "gpu_check.md").read_text()
    names = [c[0] for c in _load().cases(True)]
    for op in ("pack_mask", "unpack_mask", "magnitude_mask", "masked_cast", "masked_linear",
               "segmented",
               "masked_qkv_proj", "masked_adamw_", "MaskedLinear", "MaskedMultiheadAttention",
               "MaskedAdamW", "MaskedAdamW capturable"):
        assert any(op in n for n in names), op
    for backend in CPU_BACKENDS:
        for n in names:
            assert f"| {backend} | {n} | fp32 | PASS |" in table, (backend, n)
    assert "| FAIL |" not in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    msg = r.stderr.strip().splitlines()
    assert len(msg) == 1 and "no CUDA device" in msg[0]
    assert not (tmp_path / "gpu_check.md").exists()


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(_registry, "_impls", {k: list(v) for k, v in _registry._impls.items()})
    monkeypatch.setattr(_registry, "_status", dict(_registry._status))


def test_a_wrong_kernel_fails_the_run_but_the_table_is_written(tmp_path, scratch_registry):
    """A backend returning wrong values, one raising, and one that runs a call it should have
    declined: each becomes a FAIL row, the others still run, the exit status is 1."""
    gc = _load()
    real = [i for i in _registry._impls["masked_linear"] if i.backend == "reference"][0].fn
    # a fake "cuda" backend on CPU tensors (the real cpu kernels sit in the dispatcher, where a
    # registry entry cannot replace them)
    _registry.set_status("cuda", True, "fake")
    _registry.register("masked_linear", "cuda", ("cpu",))(
        lambda x, w, b, bias: real(x, w, b, bias) * 1.01)
    _registry.register("unpack_mask", "cuda", ("cpu",))(
        lambda bits, k: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    rc = gc.main(["--device", "cpu", "--dry", "--backends", "cuda", "--out", str(tmp_path)])
    assert rc == 1
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| cuda | masked_linear M=5 | fp32 | FAIL | AssertionError: out0" in table
    assert "| cuda | unpack_mask | fp32 | FAIL | RuntimeError: kernel exploded" in table
    assert "| cuda | pack_mask | fp32 | PASS |" in table
    assert "| cuda | masked_qkv_proj | fp32 | PASS |" in table  # qkv does not use masked_linear


def test_forced_backend_that_cannot_serve_is_na_only_where_expected(monkeypatch,
                                                                    scratch_registry):
    """cuda/cupy must decline masked_linear with M > 16 (BackendCannotServe -> N/A); running it
    anyway (supports() skipped) is a FAIL; declining elsewhere is a FAIL too."""
    gc = _load()
    _registry.set_status("cupy", True, "fake")
    _registry.register("masked_linear", "cupy", ("cpu",), supports=lambda x, *a: x.shape[0] <= 16,
                       requires="at most 16 rows")(
        [i for i in _registry._impls["masked_linear"] if i.backend == "reference"][0].fn)
    rows = {r.case: r for r in gc.run_cases("cpu", ["cupy"], ["fp32"], True, only="M=")}
    assert rows["masked_linear M=64"].status == "N/A"
    assert "at most 16 rows" in rows["masked_linear M=64"].detail or \
        "cannot serve" in rows["masked_linear M=64"].detail
    assert rows["masked_linear M=5"].status == "PASS"
    monkeypatch.setattr(gc, "_expected_na", lambda *a: False)
    rows = {r.case: r for r in gc.run_cases("cpu", ["cupy"], ["fp32"], True, only="M=64")}
    assert rows["masked_linear M=64"].status == "FAIL"
    monkeypatch.setattr(gc, "_expected_na", lambda *a: True)
    rows = {r.case: r for r in gc.run_cases("cpu", ["cupy"], ["fp32"], True, only="M=5")}
    assert rows["masked_linear M=5"].status == "FAIL" and "supports() skipped" in \
        rows["masked_linear M=5"].detail


def test_profile_step_runs_on_cpu_and_writes_both_tables(tmp_path):
    """tools/profile_step.py (the last step of the GPU check) on CPU, tiny config."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "profile_step.py"),
                        "--device", "cpu", "--config", "tiny", "--batch", "2", "--iters", "1",
                        "--rows", "5", "--out", str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (tmp_path / "profile.txt").read_text()
    assert "## masked_linear fwd+bwd" in text and "## joint step tiny batch=2x24" in text
    assert text.count("ours/dense") == 2 and text.count("### ours") == 2
    assert "lass_sparse" in text  # our ops show up in the profile (record_function ranges)


def test_the_gpu_session_script_parses_and_names_existing_tests():
    """tools/gpu_session.sh (make gpu-session) runs only on a lent GPU: here, its syntax and
    every test file / test it names must exist (a rename would waste the GPU's minutes)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "tools", "gpu_session.sh")
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = open(script).read()
    named = re.findall(r"((?:tests|benchmarks)/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(named) >= 8
    for path, test in named:
        src = os.path.join(root, path)
        assert os.path.exists(src), path
        if test:
            assert re.search(rf"^def {test}\(", open(src).read(), re.M), f"{path}::{test}"


_FAKE_GPU_PY = r'''
"""Stands in for the GPU machine's python in gpu_session.sh: pip and the heredoc succeed at
once, pytest_timeout is absent, every pytest run hangs until the script's timeout kills it,
the sweep's after writing two benchmarks to its partial file; scripts run for real."""
import json, os, sys, time
args = sys.argv[1:]
if args[:2] == ["-m", "pip"] or args[:1] == ["-"]:
    sys.exit(0)
if args[:1] == ["-c"]:
    sys.exit(1)
if args[:2] == ["-m", "pytest"]:
    partial = os.environ.get("LASS_SPARSE_BENCH_PARTIAL")
    if partial and "benchmarks/test_device_time.py" in args:
        with open(partial, "w") as f:
            f.write(json.dumps({"machine_info": {"gpu": "Fake GPU", "torch": "x"},
                                "commit_info": {"id": "0123456789"}}) + "\n")
            for impl, t in (("ours", 2e-4), ("dense", 1e-4)):
                f.write(json.dumps({
                    "group": "device_fwd[dtype=bf16 M=64 N=4096 K=4096]",
                    "extra_info": {"op": "device_fwd", "impl": impl, "dtype": "bf16", "M": "64",
                                   "N": "4096", "K": "4096", "device_s": t},
                    "stats": {"median": t}}) + "\n")
            f.write('{"group": "cut off by the kil')
    time.sleep(1000)
os.execv(sys.executable, [sys.executable] + args)
'''


def _gpu_session(tmp_path, name: str, **budgets) -> tuple[subprocess.CompletedProcess, str,
                                                            float]:
    """gpu_session.sh run on the fake GPU python under ``budgets``: (result, session.log,
    wall seconds)."""
    import time

    fake = tmp_path / "fake_python"
    if not fake.exists():
        fake.write_text(f"#!{sys.executable}\n{_FAKE_GPU_PY}")
        fake.chmod(0o755)
    env = dict(os.environ, GPU_PY=str(fake), OUT=str(tmp_path / name),
               TRITON_CACHE_DIR=str(tmp_path / "tc"), BUILD_S="5", TEST_S="2", HARDEN_S="2",
               SWEEP_S="3", TRANSLATE_S="2", SWEEP_MIN="3", TAIL_S="6", PHASE_MIN_S="2",
               **{k: str(v) for k, v in budgets.items()})
    t = time.monotonic()
    r = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_session.sh")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t
    return r, (tmp_path / name / "session.log").read_text(), wall


def test_the_gpu_session_script_keeps_its_deadline_and_reports_a_cut_off_sweep(tmp_path):
    """gpu_session.sh with every pytest run hanging: each phase is killed at its budget, clipped
    to the deadline, the script ends by DEADLINE_S, and the report and routes come from what the
    sweep wrote before it was killed; with a shorter deadline the phases it leaves no time for
    are skipped with a log line, the sweep's share kept from the tests."""
    # 30 s: build at once, tests 2 s, hardening 2, the sweep 3, the report, the beam search 2
    # (about 10 s in all: each phase killed at its own budget; the rest is slack for a busy CPU)
    r, log, wall = _gpu_session(tmp_path, "full", DEADLINE_S=30)
    assert r.returncode == 0, r.stderr + log
    assert wall < 30, (wall, log)
    for phase in ("tests", "hardening", "sweep", "translate"):
        assert f"{phase} rc=124" in log, log  # each killed by its own timeout
    assert "skipped" not in log and "report of device.partial.jsonl" in log, log
    md = (tmp_path / "full" / "device.md").read_text()
    assert "Fake GPU" in md and "M=64" in md
    assert "2.00×" in md  # ours / dense, from the two records before the cut-off line
    assert "Fake GPU" in (tmp_path / "full" / "routes.txt").read_text()
    assert "ours=200.0 dense=100.0 /dense=2.00" in r.stdout  # the summary the tool returns
    # 9 s: the sweep's 3 s and the tail's 6 leave the tests nothing; the sweep gets at most
    # 9 - 2 - 6 = 1 s (under PHASE_MIN_S); the beam search 2 s, or nothing on a slow start
    r, log, wall = _gpu_session(tmp_path, "short", DEADLINE_S=9)
    assert r.returncode == 0, r.stderr + log
    assert wall < 9 + 3, (wall, log)  # the deadline, and the end's own few steps
    for phase in ("GPU tests of issue 29's new paths", "hardening", "device-time sweep"):
        assert f"{phase} skipped: " in log, log
    assert "translate rc=124" in log or "beam search skipped" in log, log
    assert not (tmp_path / "short" / "device.md").exists(), log


def test_partial_results_file_matches_the_benchmark_json(tmp_path):
    """``LASS_SPARSE_BENCH_PARTIAL`` (benchmarks/conftest.py): one line per benchmark as it
    finishes, read back by report.load into what ``--benchmark-json`` writes."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from report import load, render

    partial, full = tmp_path / "p.jsonl", tmp_path / "full.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", LASS_SPARSE_BENCH_PARTIAL=str(partial))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "benchmarks/test_overhead.py", "-k", "cpu", "--benchmark-only",
                        "--benchmark-max-time=0.001", "--benchmark-min-rounds=2",
                        f"--benchmark-json={full}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, want = load(str(partial)), load(str(full))
    assert got["machine_info"]["torch"] == want["machine_info"]["torch"] == torch.__version__
    assert got["commit_info"]["id"] == want["commit_info"]["id"]
    assert len(got["benchmarks"]) == len(want["benchmarks"]) >= 2
    for g, w in zip(got["benchmarks"], want["benchmarks"]):
        assert (g["group"], g["name"], g["extra_info"]) == (w["group"], w["name"], w["extra_info"])
        assert g["stats"]["median"] == w["stats"]["median"]
    assert render(got).split("\n", 3)[3] == render(want).split("\n", 3)[3]  # but the date line
    (tmp_path / "bad.jsonl").write_text('{"group": 1}\n')
    with pytest.raises(ValueError, match="no header line"):
        load(str(tmp_path / "bad.jsonl"))
