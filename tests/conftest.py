"""Test setup. TRITON_INTERPRET must be set before triton is imported anywhere: only where no
CUDA GPU exists (Triton's CPU interpreter); on a GPU the compiled kernels are what is tested."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lass_sparse  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpu_check():
    """scripts/gpu_check.py as a module (its case list and runner, for the tests)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("gpu_check",
                                                  os.path.join(REPO, "scripts", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


SHARED_CORPUS = os.path.join(os.path.dirname(REPO), "shared", "corpus")


def pytest_collection_modifyitems(config, items):
    from lass_sparse.testing import skip_gpu_items_without_cuda

    skip_gpu_items_without_cuda(items)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
