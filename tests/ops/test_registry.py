import pytest
import torch

import lass_sparse
from lass_sparse.ops import registry as _registry


def test_backends_table_has_every_backend_with_reason():
    table = lass_sparse.backends()
    assert set(table) == {"reference", "cpu", "triton", "cuda", "cupy"}
    assert table["reference"]["active"]
    for name, row in table.items():
        assert isinstance(row["reason"], str) and row["reason"], name


def test_use_backend_rejects_unknown_and_inactive():
    with pytest.raises(ValueError, match="unknown backend"):
        with lass_sparse.use_backend("tpu"):
            pass
    inactive = [n for n, r in lass_sparse.backends().items() if not r["active"]]
    if inactive:
        with pytest.raises(RuntimeError, match="not active"):
            with lass_sparse.use_backend(inactive[0]):
                pass


def test_use_backend_forces_and_restores():
    m = torch.rand(4, 40) > 0.5
    with lass_sparse.use_backend("reference"):
        assert _registry.select("pack_mask", "cpu", m).backend == "reference"
    assert _registry.forced_backend() is None


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(_registry.ENV_VAR, "reference")
    assert _registry.select("masked_linear", "cpu").backend == "reference"
    monkeypatch.setenv(_registry.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        _registry.select("masked_linear", "cpu")


@pytest.fixture
def scratch_registry(monkeypatch):
    """A private copy of the registry tables (fake ops/backends do not leak)."""
    monkeypatch.setattr(_registry, "_impls", {k: list(v) for k, v in _registry._impls.items()})
    monkeypatch.setattr(_registry, "_status", dict(_registry._status))
    return _registry


def test_forced_backend_that_declines_a_call_raises_instead_of_running(scratch_registry):
    """A forced kernel never runs past what its supports() allows (e.g. the 16-row decode GEMV
    accumulator): it raises BackendCannotServe, naming what the kernel needs."""
    ran = []
    _registry.set_status("cupy", True, "fake")
    _registry.register("masked_linear", "cupy", ("cpu",), supports=lambda x, *a: x.shape[0] <= 16,
                       requires="at most 16 rows")(lambda *a: ran.append(a) or "gemv")
    x17, x16 = torch.zeros(17, 8), torch.zeros(16, 8)
    with lass_sparse.use_backend("cupy"):
        assert _registry.dispatch("masked_linear", "cpu", x16) == "gemv"
        with pytest.raises(_registry.BackendCannotServe,
                           match=r"forced backend 'cupy' cannot serve.*float32\[17, 8\].*"
                                 r"at most 16 rows"):
            _registry.dispatch("masked_linear", "cpu", x17)
    assert len(ran) == 1
    # unforced, a declined call falls through to the next backend
    assert _registry.select("masked_linear", "cpu", x17).backend != "cupy"


def test_forced_backend_without_a_kernel_for_the_device_raises(scratch_registry):
    _registry.set_status("cupy", True, "fake")
    _registry.register("masked_linear", "cupy", ("cuda",))(lambda *a: None)
    with lass_sparse.use_backend("cupy"):
        with pytest.raises(_registry.BackendCannotServe, match="no kernel for cpu tensors"):
            _registry.select("masked_linear", "cpu", torch.zeros(2, 8))


def test_device_guard_runs_cuda_kernels_on_the_tensors_device(scratch_registry, monkeypatch):
    """Triton and cupy launch on the *current* device: their kernels run inside
    torch.cuda.device(tensor's device) when that is another device (no guard when it is the
    current one, or the device has no index)."""
    entered = []

    class FakeGuard:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            dev = self.dev
            entered.append(torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev))

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", FakeGuard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen = []
    _registry.register("fake_op", "reference", ("cuda",), device_guard=True)(
        lambda *a: seen.append(list(entered)) or 1)
    _registry.register("fake_op2", "reference", ("cuda",))(lambda *a: 2)
    assert _registry.dispatch("fake_op", torch.device("cuda", 1)) == 1
    assert seen == [[torch.device("cuda", 1)]] and entered[-1] == "exit"
    entered.clear()
    assert _registry.dispatch("fake_op2", torch.device("cuda", 1)) == 2
    assert entered == []  # no guard for kernels that set the device themselves
    from lass_sparse.ops.bodies import _dispatch

    seen.clear()
    _dispatch("fake_op", torch.device("cuda", 3))  # ops pass the tensor's device through
    assert seen == [[torch.device("cuda", 3)]]
    entered.clear()
    seen.clear()
    for dev in (torch.device("cuda", 0), torch.device("cuda"), "cuda:0"):  # already current
        assert _registry.dispatch("fake_op", dev) == 1
    assert entered == [] and seen == [[], [], []]
    assert _registry.dispatch("fake_op", "cuda:2") == 1 and seen[-1] == [torch.device("cuda", 2)]


def test_broken_backend_fails_tests_instead_of_skipping(scratch_registry):
    from lass_sparse.testing import require_backend

    _registry.set_status("cuda", False, "built but fails to import", broken=True)
    assert _registry.broken() == {"cuda": "built but fails to import"}
    with pytest.raises(pytest.fail.Exception, match="broken: built but fails to import"):
        require_backend("cuda")
    _registry.set_status("cuda", False, "not built")
    with pytest.raises(pytest.skip.Exception, match="not built"):
        require_backend("cuda")


def test_one_kernel_per_dispatch_key():
    """DESIGN §3: one kernel per dispatch key, for every op and overload in our namespaces. A
    second registration on a key leaves the first in the dispatcher's table as ``(inactive)``;
    torch.library itself registers ADInplaceOrView twice for a mutating custom op (not ours)."""
    ops = [n for n in torch._C._dispatch_get_all_op_names()
           if n.split("::")[0] in ("lass_sparse", "lass_sparse_cpu")]
    assert "lass_sparse::masked_linear" in ops and "lass_sparse::masked_linear.registry" in ops
    for op in ops:
        rows = [ln for ln in torch._C._dispatch_dump(op).splitlines()
                if " registered at " in ln and not ln.startswith("debug")]
        keys = [ln.split(": registered at ")[0] for ln in rows]
        stale = [k for k in keys
                 if k.endswith("(inactive)") and not k.startswith("ADInplaceOrView")]
        assert not stale, f"{op}: overridden kernels {stale}"
        active = [k for k in keys if not k.endswith("(inactive)")]
        assert len(active) == len(set(active)), f"{op}: {keys}"
        if op.endswith(".registry"):  # the deferral overloads: the op's Python body only
            assert active == ["CompositeExplicitAutograd[alias]"], f"{op}: {keys}"
    if lass_sparse.backends()["cpu"]["active"]:  # native CPU kernels come from csrc/cpu
        for name in ("masked_linear", "segmented_masked_linear", "masked_adamw_", "pack_mask"):
            cpu = [ln for ln in torch._C._dispatch_dump(f"lass_sparse::{name}").splitlines()
                   if ln.startswith("CPU:")]
            assert len(cpu) == 1 and "csrc/cpu/" in cpu[0], cpu
