import pytest
import torch

import lass_sparse
from lass_sparse import _registry


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
