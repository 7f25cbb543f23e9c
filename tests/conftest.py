"""Test setup. TRITON_INTERPRET must be set before triton is imported anywhere: only where no
CUDA GPU exists (Triton's CPU interpreter); on a GPU the compiled kernels are what is tested."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lass_sparse  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CORPUS = os.path.join(os.path.dirname(REPO), "shared", "corpus")


def pytest_collection_modifyitems(config, items):
    from lass_sparse.testing import skip_gpu_items_without_cuda

    skip_gpu_items_without_cuda(items)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
