"""tools/gpu_check.py as a module, for the tests (a plain module: tests/ and benchmarks/ each
have a conftest.py, so ``from conftest import ...`` would be ambiguous)."""

from __future__ import annotations

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_gpu_check():
    """tools/gpu_check.py loaded as the module ``gpu_check`` (its case list and runner)."""
    spec = importlib.util.spec_from_file_location("gpu_check",
                                                  os.path.join(REPO, "tools", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
