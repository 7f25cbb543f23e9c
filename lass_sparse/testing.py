"""Test helpers shared by tests/ and benchmarks/ (no pytest import at module level)."""

from __future__ import annotations

import torch


def skip_gpu_items_without_cuda(items) -> None:
    """Mark every item with the ``gpu`` marker as skipped when no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
