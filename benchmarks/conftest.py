"""Benchmark setup. Full runs (``make bench``) use the paper's layer shapes.

Under ``--benchmark-disable`` (CI's smoke run) every benchmark runs once on small shapes and
checks its result against the reference, so the suite doubles as a correctness test.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

if not torch.cuda.is_available():  # the interpreter only where no GPU exists (see tests/conftest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lass_sparse  # noqa: E402,F401

BUDGET_ENV = "LASS_SPARSE_BENCH_BUDGET_S"  # seconds; benchmarks starting later are skipped
PRIORITY_ENV = "LASS_SPARSE_SWEEP_PRIORITY"  # "1": the device sweep in common.sweep_priority order
PARTIAL_ENV = "LASS_SPARSE_BENCH_PARTIAL"  # a .jsonl path: each benchmark's result as it finishes
_T0 = time.monotonic()


def pytest_collection_modifyitems(config, items):
    from lass_sparse.testing import skip_gpu_items_without_cuda

    skip_gpu_items_without_cuda(items)
    if os.environ.get(PRIORITY_ENV) == "1":
        from common import sweep_priority

        keyed = [(sweep_priority(it.originalname, getattr(getattr(it, "callspec", None),
                                                            "params", {}), i), it)
                 for i, it in enumerate(items)]
        items[:] = [it for _, it in sorted(keyed, key=lambda p: p[0])]


@pytest.fixture(autouse=True)
def _time_budget():
    """Skip benchmarks that would start after ``$LASS_SPARSE_BENCH_BUDGET_S`` seconds of the
    session: a lent GPU's run ends with its JSON written, not killed mid-sweep."""
    budget = os.environ.get(BUDGET_ENV)
    if budget and time.monotonic() - _T0 > float(budget):
        pytest.skip(f"time budget spent ({BUDGET_ENV}={budget})")


def pytest_sessionstart(session):
    """With ``$LASS_SPARSE_BENCH_PARTIAL`` set, start that JSON-lines file with the run's
    machine and commit info; ``pytest_runtest_makereport`` appends one line per benchmark."""
    path = os.environ.get(PARTIAL_ENV)
    if not path:
        return
    from datetime import datetime, timezone

    from pytest_benchmark.utils import get_commit_info

    machine_info: dict = {"python_version": platform.python_version()}
    pytest_benchmark_update_machine_info(session.config, machine_info)
    head = {"machine_info": machine_info, "commit_info": get_commit_info(),
            "datetime": datetime.now(timezone.utc).isoformat()}
    with open(path, "w") as f:
        f.write(json.dumps(head, default=str) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Append a finished benchmark's record (as in ``--benchmark-json``, without the raw data)
    to ``$LASS_SPARSE_BENCH_PARTIAL``, flushed to disk: a sweep killed later keeps it."""
    yield
    path = os.environ.get(PARTIAL_ENV)
    bench = item.funcargs.get("benchmark") if call.when == "call" and path else None
    stats = getattr(bench, "stats", None)
    if stats is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(stats.as_dict(include_data=False), default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


@pytest.fixture(scope="session")
def is_smoke(request) -> bool:
    return smoke(request.config)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["cpu_model"] = cpu_name()
    machine_info["backends"] = {
        k: v["active"] for k, v in lass_sparse.backends().items()
    }
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
        try:  # whether "ours" ran this GPU's measured Triton routes (tools/routes_from_sweep.py)
            from lass_sparse.backends.triton import routes

            machine_info["triton_routes"] = routes.for_device(torch.device("cuda")) is not None
        except ImportError:
            pass
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        pass


@pytest.fixture(scope="session")
def device_peaks():
    """The GPU's peaks (bf16 8192³ torch.mm TFLOP/s, device copy TB/s), measured once per run
    for the device-time suites (test_device_time.py)."""
    from common import Peaks

    if not torch.cuda.is_available():
        pytest.skip("device peaks need a CUDA GPU")
    return Peaks.measure()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_generate_tests(metafunc):
    """``device``, ``shape`` and ``m`` parameters: the paper's layer shapes, or small ones in
    smoke runs; CUDA cases carry the ``gpu`` marker and their own batch sizes."""
    from common import DEVICES, FULL_M, FULL_SHAPES, GPU_M, SMOKE_M, SMOKE_SHAPES

    s = smoke(metafunc.config)
    names = metafunc.fixturenames
    if metafunc.definition.get_closest_marker("gpu"):  # a GPU-only benchmark
        DEVICES = [d for d in DEVICES if _dev(d) == "cuda"]
    if "device" in names and "m" in names:  # CUDA gets its own, larger batch sizes
        cases = [pytest.param(_dev(d), m,
                              marks=getattr(d, "marks", ()), id=f"{_dev(d)}-M{m}")
                 for d in DEVICES for m in (SMOKE_M if s else GPU_M if _dev(d) == "cuda"
                                            else FULL_M)]
        metafunc.parametrize("device,m", cases)
    elif "device" in names:
        metafunc.parametrize("device", DEVICES)
    if "shape" in metafunc.fixturenames:
        shapes = SMOKE_SHAPES if s else FULL_SHAPES
        metafunc.parametrize("shape", shapes, ids=[f"{n}x{k}" for n, k in shapes])
    if "m" in metafunc.fixturenames and "device" not in names:
        ms = SMOKE_M if s else FULL_M
        metafunc.parametrize("m", ms, ids=[f"M{m}" for m in ms])


def _dev(p) -> str:
    return p.values[0] if hasattr(p, "values") else p
