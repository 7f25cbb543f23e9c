"""Test setup. TRITON_INTERPRET must be set before triton is imported anywhere."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lass_sparse  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CORPUS = os.path.join(os.path.dirname(REPO), "shared", "corpus")


def pytest_collection_modifyitems(config, items):
    from lass_sparse.testing import skip_gpu_items_without_cuda

    skip_gpu_items_without_cuda(items)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
