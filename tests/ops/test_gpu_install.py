"""The lent GPU machine installs with `pip install --no-build-isolation --no-deps -e .` against
its preinstalled software: the declared requirements must admit those versions."""

from __future__ import annotations

import os

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_MACHINE = {"python": "3.12.3", "torch": "2.11.0", "triton": "3.6.0", "numpy": "2.5.2",
               "cupy-cuda13x": "14.2.0", "safetensors": "0.8.0", "tqdm": "4.67.1",
               "setuptools": "80.9.0", "pytest": "8.4.2"}


def _requirements():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)
    reqs = list(cfg["project"]["dependencies"]) + list(cfg["build-system"]["requires"])
    for extra in ("triton", "cupy"):
        reqs += cfg["project"]["optional-dependencies"][extra]
    return cfg, [Requirement(r) for r in reqs]


def test_requirements_admit_the_gpu_machines_versions():
    cfg, reqs = _requirements()
    assert cfg["project"]["requires-python"]
    py = Version(GPU_MACHINE["python"])
    from packaging.specifiers import SpecifierSet

    assert py in SpecifierSet(cfg["project"]["requires-python"])
    checked = 0
    for r in reqs:
        have = GPU_MACHINE.get(r.name)
        if have is None:
            continue
        checked += 1
        assert r.specifier.contains(have, prereleases=True), f"{r} excludes {r.name} {have}"
    assert checked >= 4


@pytest.mark.parametrize("bad", ["torch>=2.12", "triton>=3.7", "numpy<2.4"])
def test_the_check_catches_a_constraint_that_excludes_them(bad):
    r = Requirement(bad)
    assert not r.specifier.contains(GPU_MACHINE[r.name])
