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
